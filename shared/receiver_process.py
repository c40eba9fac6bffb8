"""A receiver (``dlad-receive --listen``) in a child process, and the ready line it prints.

In network mode the receiver prints exactly one line on its standard output, once it listens,
and nothing else there (its log goes to standard error)::

    {"event": "listening", "url": "http://127.0.0.1:41873", "pid": 12345, "out_dir": "received"}

``url`` is where senders post their offers (``dlad-send --to URL``; with port 0 the port the
system chose), ``pid`` the receiver's process id, ``out_dir`` the folder it writes studies to
as given. Scripts that start a receiver read that line instead of scraping the log.

:class:`ReceiverProcess` is the one way this project starts a receiver process: tests,
``scripts/bench_*.py`` and ``dlad-link demo``. It spawns ``python -m receiver.cli`` (this
module does not import :mod:`receiver`: ``shared`` sits below both peers) and waits for the
ready line with a timeout.

Example (the token file and the out-dir exist)::

    with ReceiverProcess.start(Path("out"), Path("token.txt"), Path("receiver.log")) as receiver:
        subprocess.run(["dlad-send", "phantom", "--to", receiver.url, "--token-file", "token.txt"])
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

READY_EVENT = "listening"


class ReceiverStartError(RuntimeError):
    """The receiver exited, or did not print its ready line in time; the message says which."""


def format_ready_line(url: str, pid: int, out_dir: Path | str) -> str:
    """The receiver's ready line (one JSON object, no newline)."""
    return json.dumps({"event": READY_EVENT, "url": url, "pid": pid, "out_dir": str(out_dir)})


def parse_ready_line(line: str | bytes) -> dict:
    """The fields of a ready line.

    Raises:
        ValueError: ``line`` is not a ready line.
    """
    try:
        ready = json.loads(line)
    except ValueError:
        raise ValueError(f"not a ready line: {line[:200]!r}") from None
    if not (isinstance(ready, dict) and ready.get("event") == READY_EVENT
            and isinstance(ready.get("url"), str) and isinstance(ready.get("pid"), int)):
        raise ValueError(f"not a ready line: {line[:200]!r}")
    return ready


class ReceiverProcess:
    """A receiver child process that has printed its ready line.

    The child runs in its own session (a Ctrl-C at the terminal does not reach it: whoever
    started it stops it, with :meth:`stop`), its standard error and anything after the ready
    line on its standard output go to ``log_path``.
    """

    def __init__(self, process: subprocess.Popen, ready: dict, log_path: Path) -> None:
        self.process = process
        self.url: str = ready["url"]
        self.out_dir = Path(ready["out_dir"])
        self.log_path = log_path

    @classmethod
    def start(cls, out_dir: Path, token_file: Path, log_path: Path, *options: str,
              listen: str = "127.0.0.1:0", timeout: float = 60.0,
              cwd: Path | None = None) -> ReceiverProcess:
        """Start ``dlad-receive --listen LISTEN --token-file T --out-dir D OPTIONS``.

        Args:
            out_dir: the receiver's ``--out-dir``.
            token_file: the receiver's ``--token-file``.
            log_path: file for the receiver's log (created or truncated).
            options: more ``dlad-receive`` options (``--snapshot-interval 0.5``...).
            listen: ``HOST:PORT``; port 0 (default) lets the system choose a free one.
            timeout: seconds to wait for the ready line.
            cwd: the child's working directory (default: this process's).

        Raises:
            ReceiverStartError: the receiver exited first (its last log line says why) or
                was not ready within ``timeout`` (it is stopped).
        """
        argv = [sys.executable, "-m", "receiver.cli", "--listen", listen, "--token-file",
                str(token_file), "--out-dir", str(out_dir), *options]
        return cls.spawn(argv, log_path, timeout=timeout, cwd=cwd)

    @classmethod
    def spawn(cls, argv: list[str], log_path: Path, timeout: float = 60.0,
              cwd: Path | None = None) -> ReceiverProcess:
        """Run ``argv`` (a receiver command line) and wait for its ready line: see :meth:`start`."""
        log_path.write_bytes(b"")
        log = open(log_path, "ab")  # appending, like the stdout forwarder: neither overwrites
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=log, cwd=cwd, start_new_session=True)
        finally:
            log.close()  # the child holds its own descriptor
        lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=_forward_stdout, args=(process, log_path, lines), daemon=True,
                         name=f"receiver-{process.pid}-stdout").start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                _stop(process, grace=5.0)
                raise ReceiverStartError(f"the receiver did not print its ready line within "
                                         f"{timeout:g} s (log: {log_path})") from None
            if line is None:
                code = process.wait()
                raise ReceiverStartError(f"the receiver exited with status {code} before it "
                                         f"was ready: {_tail(log_path, 1) or '(no output)'}")
            try:
                return cls(process, parse_ready_line(line), log_path)
            except ValueError:
                continue  # not ours (a library printing on stdout): it is in the log

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, or None while it runs."""
        return self.process.poll()

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of the receiver's log."""
        return _tail(self.log_path, lines)

    def stop(self, grace: float = 30.0) -> int:
        """SIGINT (the receiver's graceful stop: last snapshots written), SIGKILL after
        ``grace`` seconds; return the exit status."""
        return _stop(self.process, grace)

    def __enter__(self) -> ReceiverProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _forward_stdout(process: subprocess.Popen, log_path: Path, lines: queue.Queue) -> None:
    """Hand the child's stdout lines to the starter until the ready line, then append the rest
    to the log (a pipe nobody reads would block the child once full)."""
    ready = False
    with process.stdout, open(log_path, "ab") as log:
        for line in process.stdout:
            if not ready:
                lines.put(line)
                try:
                    parse_ready_line(line)
                    ready = True
                    continue
                except ValueError:
                    pass
            log.write(line)
            log.flush()
    if not ready:
        lines.put(None)


def _stop(process: subprocess.Popen, grace: float) -> int:
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGINT)
            process.wait(grace)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # Progress bars rewrite their line with carriage returns; keep the last state of each.
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.rstrip("\n").split("\n")[-lines:])
