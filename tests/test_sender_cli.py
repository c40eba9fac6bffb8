"""dlad-send's command line: what it refuses, and that it refuses it at once, in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sender.cli import SENDER_EXTRA_MODULES, main

ROOT = Path(__file__).resolve().parents[1]


def run_main(capsys, argv) -> tuple[int, str]:
    """Exit status and stderr of ``dlad-send argv`` run in this process."""
    try:
        status = main(argv)
    except SystemExit as exit_info:
        status = exit_info.code
    return status, capsys.readouterr().err


@pytest.fixture()
def no_input_reading(monkeypatch):
    """Fail the test if anything starts loading the input."""
    def refuse(*args, **kwargs):
        raise AssertionError("the input was read before the options were checked")

    monkeypatch.setattr("sender.io.load_volume", refuse)
    monkeypatch.setattr("models.phantoms.make_phantom", refuse)


def test_a_replay_refuses_the_options_a_recorded_stream_cannot_honour(capsys, tmp_path):
    token = tmp_path / "token.txt"
    study = str(tmp_path / "study.dlad")
    status, err = run_main(capsys, [study, "--exact", "--roi", "body", "--study-id", "foo",
                                    "--to", "http://127.0.0.1:9", "--token-file", str(token)])
    assert status == 2 and len(err.splitlines()) == 1
    assert "recorded stream" in err and "--exact, --roi, --study-id cannot apply" in err
    # A value equal to the default is still an option the replay cannot honour.
    status, err = run_main(capsys, [study, "--kappa", "10", "--to", "http://127.0.0.1:9",
                                    "--token-file", str(token)])
    assert status == 2 and "--kappa cannot apply" in err
    # Transport options are the replay's own: it goes on (and stops at the missing token).
    status, err = run_main(capsys, [study, "--retries", "0", "--max-rate", "5", "--to",
                                    "http://127.0.0.1:9", "--token-file", str(token)])
    assert status == 1 and "token" in err and "cannot apply" not in err


@pytest.mark.parametrize("url", ["127.0.0.1:8700", "localhost", "ftp://127.0.0.1:8700"])
def test_a_url_without_an_http_scheme_is_a_bad_argument(capsys, tmp_path, url,
                                                         no_input_reading):
    status, err = run_main(capsys, ["phantom", "--to", url, "--token-file",
                                    str(tmp_path / "token.txt")])
    assert status == 2 and len(err.splitlines()) == 1
    assert f"--to must be http(s)://HOST:PORT[/PATH], got {url!r}" in err


@pytest.mark.parametrize(("options", "message"), [
    (["--to", "127.0.0.1:8700"], "--to must be http(s)://HOST:PORT[/PATH], got '127.0.0.1:8700'"),
    (["--to", "http://127.0.0.1:9", "--retries", "-1"], "--retries must be >= 0"),
    (["--to", "http://127.0.0.1:9", "--max-rate", "0"], "--max-rate must be > 0"),
])
def test_a_live_session_checks_its_connection_options_as_a_one_off_send(capsys, tmp_path,
                                                                        options, message):
    status, err = run_main(capsys, ["--watch", str(tmp_path), "--token-file",
                                    str(tmp_path / "token.txt"), *options])
    assert status == 2 and len(err.splitlines()) == 1 and message in err


def test_bad_options_fail_before_the_input_is_read(capsys, tmp_path, monkeypatch,
                                                   abdomen_dicom, no_input_reading):
    import torch

    out = str(tmp_path / "x.dlad")
    dicom = str(abdomen_dicom)
    cases = [
        ([dicom, "--roi-mask", str(tmp_path / "liver.nii.gz")], 1, "--roi-mask not found"),
        ([dicom, "--roi", "box:1,2,3"], 2, "box spec '1,2,3' has 3 values"),
        ([dicom, "--roi", "box:0,1,0,1,5,2"], 2, "z0 < z1"),
        ([dicom, "--roi", "sphere"], 2, "--roi must be"),
        ([dicom, "--roi-label", "5"], 2, "--roi-label needs --roi-mask"),
        ([dicom, "--threshold", "1.5"], 2, "threshold must be in (0, 1)"),
        ([str(tmp_path / "missing.nii.gz")], 1, "input not found"),
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    cases.append(([dicom, "--device", "cuda"], 2, "CUDA is not available"))
    for argv, expected, message in cases:
        status, err = run_main(capsys, [*argv, "--out", out])
        assert (status, len(err.splitlines())) == (expected, 1), (argv, err)
        assert message in err, (argv, err)
    assert list(tmp_path.iterdir()) == []


def run_without_the_sender_extra(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """dlad-send in a Python where the sender extra's modules cannot be imported (as after
    ``pip install .`` without extras)."""
    hide = "; ".join(f"sys.modules[{module!r}] = None" for module in SENDER_EXTRA_MODULES.values())
    code = f"import sys; {hide}; from sender.cli import main; sys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("argv", [["phantom", "--out", "demo.dlad"],
                                  ["ct.nii.gz", "--out", "study.dlad"],
                                  ["phantom", "--exact", "--to", "http://127.0.0.1:9",
                                   "--token-file", "token.txt"]])
def test_without_the_sender_extra_encoding_says_what_to_install(tmp_path, argv):
    (tmp_path / "ct.nii.gz").write_bytes(b"not read")
    result = run_without_the_sender_extra(argv, tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    missing = ", ".join(SENDER_EXTRA_MODULES.values())
    assert f"needs the sender extra (missing here: {missing})" in result.stderr
    assert "pip install torch==2.13.0 'dlad-stream[sender]'" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_without_the_sender_extra_help_version_and_replays_still_work(tmp_path):
    assert run_without_the_sender_extra(["--version"], tmp_path).returncode == 0
    # A replay gets past the extra (it needs none) and stops at the missing token file.
    result = run_without_the_sender_extra(["study.dlad", "--to", "http://127.0.0.1:9",
                                           "--token-file", "token.txt"], tmp_path)
    assert result.returncode == 1 and "token" in result.stderr
    assert "sender extra" not in result.stderr and "Traceback" not in result.stderr


def test_the_modules_checked_are_those_of_the_sender_extra():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[;\s]", requirement, maxsplit=1)[0]
             for requirement in project["optional-dependencies"]["sender"]}
    live_session = {"pynetdicom", "inotify_simple"}  # --dicom-listen / --watch, not encoding
    assert names == set(SENDER_EXTRA_MODULES) | live_session
