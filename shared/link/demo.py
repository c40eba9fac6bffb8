"""``dlad-link demo``: a receiver, an emulated link and a sender, started by one command.

The receiver (``dlad-receive --listen``) and the sender (``dlad-send INPUT --to``) run as
separate processes, as they would on two machines; this process is the link between them: the
signaling proxy and its relays (:mod:`shared.link.signaling`). The demo writes a random token
file (mode 0600) for both, prints the link's counters and the study's progress once per
interval and every milestone the receiver reaches, then a summary; it stops every process it
started when the sender is done, on Ctrl-C or SIGTERM, or after ``--duration``.

The process helpers (:class:`Child`, :func:`write_token_file`, :func:`study_status`,
:func:`milestone_seconds`) are also what ``scripts/bench_link.py`` uses; both start the receiver
with :class:`shared.receiver_process.ReceiverProcess`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from shared.arguments import OneLineErrorParser
from shared.receiver_process import ReceiverProcess, ReceiverStartError
from shared.version import version_text
from shared.webrtc.protocol import MILESTONE_TEXT

from .arguments import (
    add_link_arguments,
    argument_type,
    link_params_from_args,
    parse_address,
    parse_seconds,
)
from .params import LinkParams
from .profiles import get_profile
from .signaling import SignalingProxy
from .units import format_bytes, format_rate

DEFAULT_PROFILE = "wifi-2m"
DEFAULT_SEND = ["phantom", "--exact"]
#: dlad-send options the demo sets itself.
_RESERVED_SEND_OPTIONS = ("--to", "--out", "--token-file")

_DESCRIPTION = """\
Stream a study through an emulated link in one command: start a receiver (dlad-receive
--listen), put it behind the link, and run dlad-send against it. The receiver and the sender
are separate processes; this one is the link. Progress, milestones and a summary are printed;
every process started is stopped at the end, on Ctrl-C or after --duration.
"""

_EPILOG = f"""\
The link starts from --profile (default {DEFAULT_PROFILE}); the other link options change it.
Everything from INPUT on goes to dlad-send (without --to, --out and --token-file, which the
demo sets); with no INPUT the demo sends `{" ".join(DEFAULT_SEND)}` (the built-in synthetic
study with its exact layer).

examples:
  dlad-link demo
  dlad-link demo --profile 4g-12m --seed 1
  dlad-link demo --profile cable-20m --out-dir received/ \\
      ../shared/data/abdomen_ct_dicom --roi-mask ../shared/data/abdomen_ct_liver.nii.gz --exact
  dlad-link demo --profile wifi-2m --loss 2% study.dlad        # a stream written by dlad-send --out

exit status: dlad-send's (0 delivered, and verified with --exact; 1 failed or refused;
3 not delivered completely), 1 when the receiver cannot start, 2 bad arguments,
130 interrupted
"""


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why, in one line."""


class Child:
    """A process started by this module, in its own session, its output going to a log file.

    Its own session keeps a Ctrl-C at the terminal from reaching it: the demo stops its
    processes itself, in order (sender, link, receiver).
    """

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    @classmethod
    async def start(cls, argv: list[str], log_path: Path) -> Child:
        with open(log_path, "wb") as log:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(process, log_path)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        # Progress bars rewrite their line with carriage returns; keep the last state of each.
        return "\n".join(line.rsplit("\r", 1)[-1] for line in text.rstrip("\n").split("\n")[-lines:])

    async def stop(self, grace: float = 10.0) -> int:
        """SIGINT (the graceful stop of dlad-send and dlad-receive), then SIGKILL after `grace` s."""
        if self.process.returncode is None:
            try:
                self.process.send_signal(signal.SIGINT)
                await asyncio.wait_for(self.process.wait(), grace)
            except ProcessLookupError:
                pass
            except asyncio.TimeoutError:
                self.process.kill()
        return await self.process.wait()


def write_token_file(path: Path) -> Path:
    """Write a random bearer token to a new file readable by its owner only."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    return path


def sender_command(send_args: list[str], url: str, token_file: Path) -> list[str]:
    """The ``dlad-send`` command line that streams to `url`, quiet (its errors still print)."""
    return [sys.executable, "-m", "sender.cli", *send_args, "--to", url, "--token-file", str(token_file), "--quiet"]


def study_status(out_dir: Path) -> dict | None:
    """The receiver's status.json of the (first) study in `out_dir`, or None while there is none."""
    for path in sorted(out_dir.glob("*/status.json")):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # replaced atomically, but the folder may be brand new
            return None
    return None


def milestone_seconds(status: dict, origin: float) -> dict[str, float]:
    """Seconds from `origin` (a ``time.time()``) to each milestone the receiver recorded.

    The receiver keeps wall-clock times of its milestones (``times``) and, for the first slice
    whose ROI is exact, seconds since the study's record was created (``milestones_s``).
    """
    times = status.get("times") or {}
    seconds = {name: datetime.fromisoformat(times[name]).timestamp() - origin
               for name in MILESTONE_TEXT if name in times}
    first_roi_slice = (status.get("milestones_s") or {}).get("first_roi_slice")
    if first_roi_slice is not None and "created" in times:
        seconds["first_roi_slice"] = datetime.fromisoformat(times["created"]).timestamp() + first_roi_slice - origin
    return dict(sorted(seconds.items(), key=lambda item: item[1]))


def _applied_bytes(out_dir: Path) -> int:
    """Bytes of the chunks the receiver has applied (its append-only log)."""
    return sum(path.stat().st_size for path in out_dir.glob("*/chunks.dlad"))


class _Progress:
    """Prints, relative to the sender's start: the link and the receiver every interval, and milestones."""

    def __init__(self, proxy: SignalingProxy, out_dir: Path, origin: float) -> None:
        self._proxy = proxy
        self._out_dir = out_dir
        self.origin = origin
        self._started = time.monotonic()
        self._reported: set[str] = set()
        self._previous = proxy.stats
        self._previous_at = self._started
        self.status: dict | None = None

    def _say(self, text: str) -> None:
        print(f"[{time.monotonic() - self._started:6.1f} s] {text}", flush=True)

    def poll(self) -> None:
        """Print the milestones reached since the last call."""
        status = study_status(self._out_dir)
        if status is None:
            return
        self.status = status
        for name, seconds in milestone_seconds(status, self.origin).items():
            if name not in self._reported:
                self._reported.add(name)
                # The receiver may report a milestone a moment after reaching it: say when it was.
                self._say(f"receiver: {MILESTONE_TEXT[name]} at {seconds:.2f} s")

    def tick(self) -> None:
        """Print one line: what the link carried since the last tick, and the receiver's progress."""
        now, stats = time.monotonic(), self._proxy.stats
        up, before = stats.uplink, self._previous.uplink
        elapsed = max(now - self._previous_at, 1e-9)
        delivered = up.packets_forwarded - before.packets_forwarded
        delay = (up.delay_total - before.delay_total) / delivered if delivered else None
        down_rate = (stats.downlink.bytes_forwarded - self._previous.downlink.bytes_forwarded) * 8 / elapsed
        receiver = "waiting for the study"
        if self.status is not None and "chunks_planned" in self.status:
            receiver = (f"{self.status['chunks_applied']}/{self.status['chunks_planned']} chunks, "
                        f"{format_bytes(_applied_bytes(self._out_dir))} applied")
        self._say(f"link up {format_rate((up.bytes_forwarded - before.bytes_forwarded) * 8 / elapsed)}"
                  + (f" (delay {delay * 1e3:.0f} ms)" if delay is not None else "")
                  + f", lost {up.packets_lost - before.packets_lost}, "
                  f"queue-dropped {up.packets_queue_dropped - before.packets_queue_dropped}; "
                  f"down {format_rate(down_rate)} | receiver: {receiver}")
        self._previous, self._previous_at = stats, now


def _summary(status: dict | None, origin: float, proxy: SignalingProxy, out_dir: Path) -> list[str]:
    lines = []
    if status is not None and "chunks_planned" in status:
        verified = {True: ", SHA-256 of the exact volume verified", False: ", SHA-256 MISMATCH",
                    None: ""}[status.get("verified_sha256")]
        lines.append(f"study {status.get('study_id')}: {status['chunks_applied']}/{status['chunks_planned']} "
                     f"chunks, {status.get('state')}{verified}")
        milestones = milestone_seconds(status, origin)
        if milestones:
            lines.append("since the sender started: " + ", ".join(
                f"{MILESTONE_TEXT[name].split(' (')[0]} {seconds:.2f} s" for name, seconds in milestones.items()))
        snapshot = (status.get("snapshot") or {}).get("file")
        if snapshot:
            lines.append(f"received volume: {out_dir / status['folder'] / snapshot}")
    else:
        lines.append("no study arrived at the receiver")
    for name in ("uplink", "downlink"):
        stats = getattr(proxy.stats, name)
        delay = "-" if stats.mean_delay is None else f"{stats.mean_delay * 1e3:.1f} ms"
        lines.append(f"link {name:8}: {format_bytes(stats.bytes_forwarded)} in {stats.packets_forwarded} datagrams "
                     f"delivered, {stats.packets_lost} lost, {stats.packets_queue_dropped} queue-dropped, "
                     f"mean delay {delay}")
    return lines


async def run_demo(send_args: list[str], uplink: LinkParams, downlink: LinkParams, *, listen=("127.0.0.1", 0),
                   out_dir: Path | None = None, seed: int | None = None, interval: float = 1.0,
                   duration: float | None = None) -> int:
    """Run receiver, link and sender until the sender ends; return dlad-send's exit status (130 if interrupted)."""
    # The token and the processes' logs; the received study too unless `out_dir` is given.
    workspace = Path(tempfile.mkdtemp(prefix="dlad-link-demo-"))
    keep_workspace = out_dir is None
    out_dir = out_dir if out_dir is not None else workspace / "received"
    token_file = write_token_file(workspace / "token")
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupted.set)
    print(f"dlad-link demo: uplink   {uplink.describe()}\ndlad-link demo: downlink {downlink.describe()}", flush=True)
    receiver = sender = proxy = None
    try:
        try:
            receiver = await asyncio.to_thread(ReceiverProcess.start, out_dir, token_file,
                                               workspace / "receiver.log")
        except ReceiverStartError as error:
            raise DemoError(str(error)) from None
        receiver_url = receiver.url
        proxy = SignalingProxy(receiver_url, uplink, downlink, listen=listen, seed=seed)
        try:
            await proxy.start()
        except OSError as error:
            raise DemoError(f"cannot listen on {listen[0]}:{listen[1]}: {error.strerror}") from None
        print(f"dlad-link demo: receiver {receiver_url} (out-dir {out_dir}), behind the link at {proxy.url}",
              flush=True)
        print(f"dlad-link demo: dlad-send {' '.join(send_args)} --to {proxy.url}", flush=True)
        origin = time.time()
        sender = await Child.start(sender_command(send_args, proxy.url, token_file), workspace / "sender.log")
        progress = _Progress(proxy, out_dir, origin)
        ended = asyncio.ensure_future(sender.process.wait())
        stop = asyncio.ensure_future(interrupted.wait())
        deadline = None if duration is None else time.monotonic() + duration
        next_tick = time.monotonic() + interval
        while not ended.done() and not stop.done():
            if deadline is not None and time.monotonic() >= deadline:
                print(f"dlad-link demo: stopping after --duration {duration:g} s", flush=True)
                break
            await asyncio.wait({ended, stop}, timeout=0.2)
            progress.poll()
            if interval and time.monotonic() >= next_tick:
                progress.tick()
                next_tick += interval
        stop.cancel()
        if ended.done():
            status = sender.returncode
        else:
            if interrupted.is_set():
                print("dlad-link demo: interrupted; stopping the sender, the link and the receiver", flush=True)
            status = 130 if interrupted.is_set() else await sender.stop()
        if status == 0:
            # The receiver writes its final status.json just after telling the sender it is done.
            settle = time.monotonic() + 5
            while (progress.status or {}).get("state") != "complete" and time.monotonic() < settle:
                await asyncio.sleep(0.1)
                progress.poll()
        elif status != 130:
            print(f"dlad-link demo: dlad-send exited with status {status}:\n{sender.log_tail()}", file=sys.stderr)
        for line in _summary(progress.status, origin, proxy, out_dir):
            print(f"dlad-link demo: {line}", flush=True)
        keep_workspace = keep_workspace or status != 0
        return status
    except DemoError as error:
        print(f"dlad-link demo: error: {error}", file=sys.stderr)
        keep_workspace = True
        return 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if sender is not None:
            await sender.stop()
        if proxy is not None:
            await proxy.stop()
        if receiver is not None:
            await asyncio.to_thread(receiver.stop, 10.0)
        token_file.unlink(missing_ok=True)
        if keep_workspace:
            print(f"dlad-link demo: logs of the receiver and the sender in {workspace}", flush=True)
        else:  # delivered to the given out-dir: the logs hold nothing worth keeping
            shutil.rmtree(workspace, ignore_errors=True)


def _parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="dlad-link demo", description=_DESCRIPTION, epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("send", nargs=argparse.REMAINDER, metavar="INPUT [DLAD-SEND OPTIONS]",
                        help=f"what dlad-send streams and how (default: {' '.join(DEFAULT_SEND)})")
    parser.add_argument("--out-dir", type=Path, metavar="DIR",
                        help="the receiver's out-dir (default: a new folder under the temporary directory)")
    parser.add_argument("--listen", metavar="HOST:PORT", type=argument_type(parse_address),
                        default=("127.0.0.1", 0), help="where the link's signaling proxy listens "
                                                       "(default 127.0.0.1 and a free port)")
    add_link_arguments(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, help="seed of the link's random draws (loss, jitter)")
    run.add_argument("--stats-interval", metavar="S", type=argument_type(parse_seconds), default=1.0,
                     help="seconds between progress lines, 0 for none (default 1)")
    run.add_argument("--duration", metavar="S", type=argument_type(parse_seconds),
                     help="stop everything after S seconds (default: when the sender is done)")
    parser.add_argument("--version", action="version", version=version_text("dlad-link"))
    return parser


def main(argv: list[str]) -> int:
    """``dlad-link demo ...`` (`argv` without the word ``demo``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.profile is None and args.up_profile is None and args.down_profile is None:
        args.profile = get_profile(DEFAULT_PROFILE)
    try:
        uplink, downlink = link_params_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    send_args = args.send or list(DEFAULT_SEND)
    if send_args[0].startswith("-"):
        parser.error(f"dlad-send's INPUT must come first, before {send_args[0]} (use e.g. phantom)")
    reserved = [option for option in send_args if option.split("=")[0] in _RESERVED_SEND_OPTIONS]
    if reserved:
        parser.error(f"{reserved[0]} is set by the demo; give dlad-send's INPUT and other options only")
    logging.basicConfig(level=logging.WARNING, format="dlad-link demo: %(message)s")
    return asyncio.run(run_demo(send_args, uplink, downlink, listen=args.listen, out_dir=args.out_dir,
                                seed=args.seed, interval=args.stats_interval, duration=args.duration))
