"""The receiver's ready line and the one helper that starts a receiver process."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shared.receiver_process import (
    ReceiverProcess,
    ReceiverStartError,
    format_ready_line,
    parse_ready_line,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def token_file(tmp_path) -> Path:
    path = tmp_path / "token.txt"
    path.write_text("dlad-test-token-0123456789abcdef\n")
    path.chmod(0o600)
    return path


def test_the_receiver_prints_one_ready_line_and_the_helper_reads_it(tmp_path, token_file):
    with ReceiverProcess.start(tmp_path / "out", token_file, tmp_path / "receiver.log",
                               cwd=ROOT) as receiver:
        assert receiver.returncode is None
        assert receiver.url.startswith("http://127.0.0.1:") and not receiver.url.endswith(":0")
        assert receiver.out_dir == tmp_path / "out"
        with urllib.request.urlopen(receiver.url + "/health", timeout=10) as response:
            assert response.status == 200
    assert receiver.returncode == 0  # stopped by SIGINT: a clean exit
    log = receiver.log_path.read_text()
    assert "listening on " + receiver.url in log  # the human log line stays, on stderr
    assert '"event"' not in log  # the ready line went to the helper, not to the log


def test_the_ready_line_is_all_the_receiver_writes_on_stdout(tmp_path, token_file):
    import subprocess

    process = subprocess.Popen(
        [sys.executable, "-m", "receiver.cli", "--listen", "127.0.0.1:0", "--token-file",
         str(token_file), "--out-dir", str(tmp_path / "out")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        ready = parse_ready_line(process.stdout.readline())
        assert ready["pid"] == process.pid and ready["out_dir"] == str(tmp_path / "out")
    finally:
        process.send_signal(2)  # SIGINT
        rest = process.communicate(timeout=30)[0]
    assert process.returncode == 0 and rest == b""


def test_format_and_parse_round_trip_and_reject_other_lines():
    line = format_ready_line("http://127.0.0.1:8700", 42, Path("received"))
    assert "\n" not in line
    assert parse_ready_line(line) == {"event": "listening", "url": "http://127.0.0.1:8700",
                                      "pid": 42, "out_dir": "received"}
    for other in ("", "listening on http://127.0.0.1:8700", "[1, 2]",
                  json.dumps({"event": "listening", "url": 5, "pid": 1}),
                  json.dumps({"event": "other", "url": "http://x", "pid": 1})):
        with pytest.raises(ValueError, match="not a ready line"):
            parse_ready_line(other)


def test_a_receiver_that_exits_first_is_reported_with_its_error(tmp_path):
    missing = tmp_path / "no-token.txt"
    started = time.monotonic()
    with pytest.raises(ReceiverStartError, match="exited with status 1 .*token"):
        ReceiverProcess.start(tmp_path / "out", missing, tmp_path / "receiver.log", cwd=ROOT)
    assert time.monotonic() - started < 30


def test_a_receiver_that_never_gets_ready_is_stopped_after_the_timeout(tmp_path):
    pid_file = tmp_path / "pid"
    silent = [sys.executable, "-c",
              f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
              "print('some library chatter', flush=True); time.sleep(60)"]
    started = time.monotonic()
    with pytest.raises(ReceiverStartError, match="did not print its ready line within 1 s"):
        ReceiverProcess.spawn(silent, tmp_path / "receiver.log", timeout=1.0)
    assert time.monotonic() - started < 10
    with pytest.raises(ProcessLookupError):  # stopped, and reaped
        os.kill(int(pid_file.read_text()), 0)
    assert "some library chatter" in (tmp_path / "receiver.log").read_text()
