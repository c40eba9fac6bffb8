#!/usr/bin/env python
"""Benchmark of streaming over emulated links: dlad-send -> dlad-link -> dlad-receive, per profile.

For each link profile (docs/LINK.md) the shared abdomen CT (20 x 512 x 512 DICOM, liver mask,
layered with the exact layer) goes from a sender process through the link to a receiver
process, a fresh receiver and out-dir per run. The link (signaling proxy and relays of
``shared.link``, the code behind ``dlad-link``) runs in this process. Cases:

* ``replay``: the study encoded once beforehand (``dlad-send --out --exact``) and replayed
  (``dlad-send study.dlad --to``): the link and the transport without the encoder's time;
* ``paced``: the replay with ``--max-rate`` at ``PACE`` x the link rate (payload), which fills
  the link without building a queue (profiles without random loss);
* ``live``: ``dlad-send DICOM --roi-mask MASK --exact --to``: load, ROI, diffusion and encoding
  in the sender process while it streams.

Every time is in seconds since the sender process was started (the wall clock of this process
when it spawned it, compared with the receiver's status.json wall times). Measured per run:

* milestones at the receiver: first slice whose ROI is bit-exact, ROI complete, base complete
  (every slice viewable), exact volume complete (SHA-256 verified);
* ``link start``: the session's first datagram on the link (ICE), i.e. the first delivery
  minus the one-way delay; what comes before is the sender's start-up (Python imports,
  reading the input, in live mode loading and encoding the first chunk);
* payload = the stream's bytes (header and chunks as the receiver logged them, plus the end
  frame); bytes on the wire = UDP payload bytes the relays delivered, uplink and downlink
  (SCTP, DTLS, ICE and retransmissions included; IP/UDP headers not);
* data phase = the receiver's own measure of the pass, from sending its inventory to applying
  the end frame; goodput = payload of the pass / data phase, also as a fraction of the rate;
* physical-limit ratio = (payload x 8 / link rate) / (exact complete - link start): how close
  the whole session, handshakes included, comes to the link's physical limit;
* plain DICOM transfer = the DICOM files' bytes x 8 / link rate + one-way delay: an ideal lower
  bound for sending the original series as it is (no handshake, no slow start, no loss).

The completeness curves (fraction of ROI voxels bit-exact, of voxels with a base, of voxels
bit-exact, over time) come from the receiver's append-only chunk log, whose size this process
polls every 10 ms while the study arrives; they go to a PNG (matplotlib, ``pip install
'dlad-stream[bench]'``).

CPU seconds per run: the sender process (all of it, start-up included), the receiver process
(from the sender's start to the final status) and this process (the link, mostly).

Usage::

    python scripts/bench_link.py [--profiles wifi-2m,4g-12m,cable-20m,lan-100m] [--loss-runs 3]
        [--paced wifi-2m,cable-20m] [--live wifi-2m] [--stream study.dlad]
        [--json results.json] [--plot docs/img/link_completeness.png] [--markdown results.md] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from receiver.reassembly import Reassembler  # noqa: E402
from shared.link import PROFILES, LinkParams, run_behind_link  # noqa: E402
from shared.link.demo import Child, DemoError, milestone_seconds, sender_command, write_token_file  # noqa: E402
from shared.receiver_process import ReceiverProcess, ReceiverStartError  # noqa: E402
from shared.wire import FrameReader  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
#: SCTP and DTLS add about 65 bytes to every packet of at most 1160 payload bytes, and a 16 KiB
#: message ends with a short packet: the wire carries about 6.4 % more than the payload. Paced
#: at 0.94 x the link rate, the payload fills the link without building a queue.
PACE = 0.94
#: Profiles paced by default: those without random loss, where a queue is what loses packets.
PACED_PROFILES = ("wifi-2m", "cable-20m")
POLL_S = 0.010
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SENDER_TIMEOUT_S = 300.0
MILESTONES = ("first_roi_slice", "roi_complete", "base_complete", "exact_complete")


class BenchError(RuntimeError):
    """A run went wrong; the message says which and why."""


@dataclass
class Case:
    profile: str
    mode: str
    send_args: list[str]
    seed: int
    run: int = 1
    runs: int = 1

    @property
    def params(self) -> LinkParams:
        return PROFILES[self.profile]


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Watcher:
    """Samples, every POLL_S, the size of the receiver's chunk log (chunks.dlad) and the sender's CPU time."""

    out_dir: Path
    origin_monotonic: float
    sender_pid: int | None = None
    samples: list[tuple[float, int]] = field(default_factory=list)
    sender_cpu: float = 0.0
    "The sender's CPU seconds at the last sample before it exited (short of at most POLL_S of CPU)."

    async def run(self) -> None:
        log = None
        size = 0
        while True:
            if log is None:
                log = next(iter(self.out_dir.glob("*/chunks.dlad")), None)
            if log is not None:
                current = log.stat().st_size
                if current != size:
                    size = current
                    self.samples.append((time.monotonic() - self.origin_monotonic, size))
            if self.sender_pid is not None:
                self.sender_cpu = cpu_seconds(self.sender_pid) or self.sender_cpu
            await asyncio.sleep(POLL_S)


def completeness(folder: Path, samples: list[tuple[float, int]]) -> list[tuple[float, float, float, float]]:
    """(seconds, ROI fraction exact, fraction with a base, fraction exact) after each applied chunk.

    A chunk counts from the first sample at which the log held all of it. The fractions are the
    receiver's own (:meth:`Reassembler.progress`): the logged chunks are applied again, in the
    order the receiver applied and logged them.
    """
    header = FrameReader().feed((folder / "header.dlad").read_bytes())[0].chunk
    state = Reassembler(header)
    points = [(0.0, 0.0, 0.0, 0.0)]
    for event in FrameReader().feed((folder / "chunks.dlad").read_bytes()):
        end = event.offset + event.size
        seconds = next((t for t, size in samples if size >= end), None)
        if seconds is None:
            raise BenchError(f"{folder}: the chunk log outgrew the last sample of its size")
        state.apply(event.chunk)
        progress = state.progress()
        # The exact layer's curve: slices with every layer applied (proven at the end, by the
        # volume's SHA-256; exact_fraction counts only what is proven).
        layers_done = (progress.exact_layer_slices or 0) / progress.slices
        points.append((seconds, progress.roi_fraction, progress.base_fraction, layers_done))
    return points


async def run_case(case: Case, token_file: Path, work: Path) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"{case.profile}-{case.mode}-{case.run}-", dir=work))
    out_dir = folder / "out"
    receiver = await asyncio.to_thread(ReceiverProcess.start, out_dir, token_file, folder / "receiver.log")
    proxy = sender = watcher_task = None
    try:
        url, proxy = await run_behind_link(receiver.url, case.params, seed=case.seed)
        origin, origin_monotonic = time.time(), time.monotonic()
        receiver_cpu, link_cpu = cpu_seconds(receiver.pid), time.process_time()
        watcher = Watcher(out_dir, origin_monotonic)
        watcher_task = asyncio.create_task(watcher.run())
        sender = await Child.start(sender_command(case.send_args, url, token_file), folder / "sender.log")
        watcher.sender_pid = sender.process.pid
        try:
            returncode = await asyncio.wait_for(sender.process.wait(), SENDER_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise BenchError(f"{case.profile} {case.mode}: dlad-send still running after "
                             f"{SENDER_TIMEOUT_S:g} s") from None
        sender_wall = time.monotonic() - origin_monotonic
        if returncode != 0:
            raise BenchError(f"{case.profile} {case.mode}: dlad-send exited {returncode}: {sender.log_tail(5)}")
        status = await final_status(out_dir)
        await asyncio.sleep(3 * POLL_S)  # a last sample of the log
        # On a loaded machine the watcher may not have run since the last chunk was logged:
        # sample once more, no later than the final status (the log is complete by then).
        log = next(iter(out_dir.glob("*/chunks.dlad")), None)
        if log is not None and (not watcher.samples or watcher.samples[-1][1] < log.stat().st_size):
            watcher.samples.append((time.monotonic() - origin_monotonic, log.stat().st_size))
        receiver_now = cpu_seconds(receiver.pid)
        if receiver_now is None:
            raise BenchError(f"{case.profile} {case.mode}: the receiver exited: {receiver.log_tail(5)}")
        cpu = {"sender": watcher.sender_cpu, "receiver": receiver_now - receiver_cpu,
               "link": time.process_time() - link_cpu}
    finally:
        if watcher_task is not None:
            watcher_task.cancel()
        if sender is not None:
            await sender.stop()
        if proxy is not None:
            await proxy.stop()
        await asyncio.to_thread(receiver.stop, 10.0)
    study = out_dir / status["folder"]
    return measure(case, status, study, watcher.samples, proxy, origin, origin_monotonic, sender_wall, cpu)


async def final_status(out_dir: Path) -> dict:
    """status.json once the receiver has written it for the completed pass (it follows its 'done')."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for path in out_dir.glob("*/status.json"):
            status = json.loads(path.read_text())
            if status.get("state") == "complete" and status["transfer"]["last_pass"]:
                return status
        await asyncio.sleep(0.05)
    raise BenchError(f"no complete status.json in {out_dir} 10 s after dlad-send ended")


def measure(case: Case, status: dict, study: Path, samples, proxy, origin: float, origin_monotonic: float,
            sender_wall: float, cpu: dict[str, float]) -> dict:
    params = case.params
    stats = proxy.stats
    milestones = milestone_seconds(status, origin)
    deliveries = [t for t in (stats.uplink.first_forward_at, stats.downlink.first_forward_at) if t is not None]
    link_start = min(deliveries) - params.delay - origin_monotonic
    last_pass = status["transfer"]["last_pass"]
    payload = (study / "header.dlad").stat().st_size + last_pass["bytes"]
    ideal = payload * 8 / params.rate
    session = milestones["exact_complete"] - link_start
    curve = completeness(study, samples)
    return {
        "profile": case.profile, "mode": case.mode, "run": case.run, "runs": case.runs, "seed": case.seed,
        "link": params.describe(), "rate_bit_s": params.rate, "delay_s": params.delay, "loss": params.loss,
        "sender": " ".join(["dlad-send", *case.send_args, "--to", "URL", "--token-file", "T", "--quiet"]),
        "complete": status["state"] == "complete", "verified": status["verified_sha256"],
        "sessions": status["transfer"]["sessions"],
        **{f"to_{name}_s": round(milestones[name], 3) for name in MILESTONES},
        # The receiver opens the study's record when the header (the stream's first bytes)
        # arrives: "after the first byte" of the stream (issue 16's whole-volume target).
        "to_header_s": round(datetime.fromisoformat(status["times"]["created"]).timestamp() - origin, 3),
        "link_start_s": round(link_start, 3),
        "sender_exit_s": round(sender_wall, 3),
        "payload_bytes": payload,
        "wire_up_bytes": stats.uplink.bytes_forwarded, "wire_down_bytes": stats.downlink.bytes_forwarded,
        "wire_up_packets": stats.uplink.packets_forwarded, "wire_up_entered_bytes": stats.uplink.bytes_in,
        "up_lost": stats.uplink.packets_lost, "up_queue_dropped": stats.uplink.packets_queue_dropped,
        "down_lost": stats.downlink.packets_lost, "down_queue_dropped": stats.downlink.packets_queue_dropped,
        "up_mean_delay_ms": round(stats.uplink.mean_delay * 1e3, 1),
        "wire_overhead": round(stats.uplink.bytes_forwarded / payload - 1, 4),
        "data_phase_s": last_pass["seconds"],
        "goodput_mbit_s": last_pass["mbit_s"],
        "goodput_over_rate": round(last_pass["mbit_s"] * 1e6 / params.rate, 3),
        "ideal_s": round(ideal, 3),
        "session_s": round(session, 3),
        "physical_limit_ratio": round(ideal / session, 3),
        **{f"cpu_{name}_s": round(seconds, 2) for name, seconds in cpu.items()},
        "load_avg": round(os.getloadavg()[0], 2),
        "curve": [[round(value, 4) for value in point] for point in curve],
    }


def encode_study(dicom: Path, mask: Path, path: Path) -> None:
    print(f"encoding {dicom.name} once (--exact) into {path} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "sender.cli", str(dicom), "--roi-mask", str(mask), "--exact",
                    "--out", str(path), "--quiet"], cwd=ROOT, check=True)


def plan_cases(args, stream: Path) -> list[Case]:
    live = [str(args.dicom), "--roi-mask", str(args.mask), "--exact"]
    cases = []
    for profile in args.profiles:
        runs = args.loss_runs if PROFILES[profile].loss else args.runs
        cases += [Case(profile, "replay", [str(stream)], seed=run, run=run, runs=runs) for run in range(1, runs + 1)]
        if profile in args.paced:
            rate = f"{PACE * PROFILES[profile].rate / 1e6:g}"
            cases += [Case(profile, "paced", [str(stream), "--max-rate", rate], seed=run, run=run, runs=runs)
                      for run in range(1, runs + 1)]
        if profile in args.live:
            cases.append(Case(profile, "live", live, seed=1))
    return cases


def dicom_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# --- reporting -------------------------------------------------------------------------------

def markdown(results: list[dict], dicom_size: int) -> str:
    def plain(row):
        return dicom_size * 8 / row["rate_bit_s"] + row["delay_s"]

    lines = ["| profile | case | header arrived | first ROI slice | ROI complete | base complete | exact complete "
             "| whole volume viewable after the header | link start | ROI complete from link start "
             "| plain DICOM (ideal) | ROI complete / plain (from link start) | verified |",
             "|" + "---|" * 13]
    for row in results:
        roi_from_link = row["to_roi_complete_s"] - row["link_start_s"]
        lines.append(
            f"| {row['profile']} | {label(row)} | {row['to_header_s']:.2f} | {row['to_first_roi_slice_s']:.2f} "
            f"| {row['to_roi_complete_s']:.2f} | {row['to_base_complete_s']:.2f} | {row['to_exact_complete_s']:.2f} "
            f"| {row['to_base_complete_s'] - row['to_header_s']:.2f} | {row['link_start_s']:.2f} "
            f"| {roi_from_link:.2f} | {plain(row):.2f} | {row['to_roi_complete_s'] / plain(row):.2f} "
            f"({roi_from_link / plain(row):.2f}) | {'yes' if row['verified'] else 'NO'} |")
    lines += ["", "| profile | case | payload MB | wire up / down MB | overhead | up lost / queue-dropped "
              "| up mean delay ms | data phase s | goodput Mbit/s | goodput / rate | ideal s | session s "
              "| physical-limit ratio | CPU s sender / receiver / link | load |", "|" + "---|" * 15]
    for row in results:
        lines.append(
            f"| {row['profile']} | {label(row)} | {row['payload_bytes'] / 1e6:.3f} "
            f"| {row['wire_up_bytes'] / 1e6:.3f} / {row['wire_down_bytes'] / 1e6:.3f} "
            f"| {100 * row['wire_overhead']:.1f} % | {row['up_lost']} / {row['up_queue_dropped']} "
            f"| {row['up_mean_delay_ms']:.0f} | {row['data_phase_s']:.2f} | {row['goodput_mbit_s']:.2f} "
            f"| {row['goodput_over_rate']:.3f} | {row['ideal_s']:.2f} | {row['session_s']:.2f} "
            f"| {row['physical_limit_ratio']:.3f} "
            f"| {row['cpu_sender_s']:.1f} / {row['cpu_receiver_s']:.1f} / {row['cpu_link_s']:.1f} "
            f"| {row['load_avg']:.1f} |")
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in results:
        groups.setdefault((row["profile"], row["mode"]), []).append(row)
    if any(len(rows) > 1 for rows in groups.values()):
        lines += ["", "Medians over the runs of each case:", "",
                  "| profile | case | runs | ROI complete | ROI complete from link start | exact complete "
                  "| goodput / rate | physical-limit ratio |", "|" + "---|" * 8]
        for (profile, mode), rows in groups.items():
            def median(key, rows=rows):
                return statistics.median(key(row) for row in rows)
            lines.append(
                f"| {profile} | {mode} | {len(rows)} | {median(lambda r: r['to_roi_complete_s']):.2f} "
                f"| {median(lambda r: r['to_roi_complete_s'] - r['link_start_s']):.2f} "
                f"| {median(lambda r: r['to_exact_complete_s']):.2f} | {median(lambda r: r['goodput_over_rate']):.3f} "
                f"| {median(lambda r: r['physical_limit_ratio']):.3f} |")
    return "\n".join(lines)


def label(row: dict) -> str:
    return row["mode"] + (f" #{row['run']}" if row["runs"] > 1 else "")


def targets(results: list[dict], dicom_size: int) -> list[str]:
    lines = []
    for row in results:
        plain = dicom_size * 8 / row["rate_bit_s"] + row["delay_s"]
        if row["profile"] == "wifi-2m":
            viewable = row["to_base_complete_s"] - row["to_header_s"]
            lines.append(f"wifi-2m {label(row)}: whole volume viewable {viewable:.2f} s after the header "
                         f"(the stream's first bytes) arrived (issue 16 target <= 0.6 s): "
                         f"{'met' if viewable <= 0.6 else 'missed'}")
            roi, start = row["to_roi_complete_s"], row["link_start_s"]
            lines.append(f"wifi-2m {label(row)}: ROI complete {roi:.2f} s after the sender's start, "
                         f"{roi - start:.2f} s after the link start; plain DICOM / 3 = {plain / 3:.2f} s: "
                         f"{'met' if roi <= plain / 3 else 'missed'} from the sender's start, "
                         f"{'met' if roi - start <= plain / 3 else 'missed'} from the link start")
        if row["profile"] in ("wifi-2m", "cable-20m") and row["mode"] != "live":
            session, data = row["physical_limit_ratio"], row["goodput_over_rate"]
            lines.append(f"{row['profile']} {label(row)}: physical-limit ratio {session:.3f} over the session "
                         f"(handshakes included), {data:.3f} over the data phase: "
                         f"{'met' if session >= 0.85 else 'missed'}, {'met' if data >= 0.85 else 'missed'}")
    lossy = [row for row in results if row["loss"]]
    if lossy:
        good = sum(1 for row in lossy if row["complete"] and row["verified"])
        lines.append(f"lossy profile(s): {good}/{len(lossy)} runs complete and SHA-256 verified")
    return lines


def plot(results: list[dict], dicom_size: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], list[dict]] = {}
    for row in results:
        panels.setdefault((row["profile"], row["mode"]), []).append(row)
    columns = 3
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    colours = {"ROI bit-exact": "tab:red", "base (viewable)": "tab:blue", "exact": "tab:green"}
    for axis, ((profile, mode), runs) in zip(axes.flat, panels.items()):
        for index, row in enumerate(runs):
            curve = np.array(row["curve"])
            end = max(row["to_exact_complete_s"], row["sender_exit_s"])
            times = np.append(curve[:, 0], end)
            for column, (name, colour) in enumerate(colours.items(), start=1):
                values = np.append(curve[:, column], curve[-1, column])
                axis.step(times, values, where="post", color=colour, alpha=1.0 if index == 0 else 0.35,
                          label=name if index == 0 else None)
        first = runs[0]
        start = first["link_start_s"]
        plain = dicom_size * 8 / first["rate_bit_s"] + first["delay_s"]
        axis.axvline(start, color="grey", linestyle=":", label="link start")
        axis.axvline(start + first["ideal_s"], color="black", linestyle="--", label="link start + payload / rate")
        axis.axvline(start + plain / 3, color="tab:red", linestyle=":", label="link start + plain DICOM / 3")
        axis.axvline(start + plain, color="tab:purple", linestyle="-.", label="link start + plain DICOM (ideal)")
        title = f"{profile} ({first['link']}), {mode}" + (f", {len(runs)} runs" if len(runs) > 1 else "")
        axis.set_title(title, fontsize=8)
        axis.set_xlabel("seconds since the sender started", fontsize=8)
        axis.set_ylabel("fraction of voxels", fontsize=8)
        axis.set_ylim(-0.02, 1.02)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=7, fontsize=8)
    figure.suptitle("Abdomen CT (20 x 512 x 512, --exact) through dlad-link: volume completeness over time",
                    fontsize=10)
    figure.tight_layout(rect=(0, 0.05, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


# --- main ------------------------------------------------------------------------------------

def names(text: str) -> list[str]:
    chosen = [name for name in text.split(",") if name]
    unknown = [name for name in chosen if name not in PROFILES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown profile {unknown[0]!r} (known: {', '.join(PROFILES)})")
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python scripts/bench_link.py --json link.json --plot docs/img/link_completeness.png\n"
               "  python scripts/bench_link.py --profiles wifi-2m --paced '' --live ''   # one quick run")
    parser.add_argument("--dicom", type=Path, default=DATA / "abdomen_ct_dicom",
                        help="the DICOM series (default: the shared abdomen CT)")
    parser.add_argument("--mask", type=Path, default=DATA / "abdomen_ct_liver.nii.gz",
                        help="its liver mask (default: the shared one)")
    parser.add_argument("--stream", type=Path, help="a .dlad of the study already encoded with --exact "
                                                    "(default: encode it first)")
    parser.add_argument("--profiles", type=names, default=list(PROFILES), help="comma-separated (default: all)")
    parser.add_argument("--paced", type=names, default=list(PACED_PROFILES),
                        help=f"profiles also run paced at {PACE} x the link rate, '' for none "
                             f"(default: {','.join(PACED_PROFILES)})")
    parser.add_argument("--live", type=names, default=["wifi-2m"],
                        help="profiles also run live, encoding while streaming, '' for none (default: wifi-2m)")
    parser.add_argument("--runs", type=int, default=1,
                        help="runs of replay and paced per profile without loss (default 1)")
    parser.add_argument("--loss-runs", type=int, default=3, help="runs of replay per lossy profile (default 3)")
    parser.add_argument("--json", type=Path, help="write every result (curves included) here")
    parser.add_argument("--plot", type=Path, help="write the completeness plot (PNG) here")
    parser.add_argument("--markdown", type=Path, help="write the tables and target lines here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (the runs' out-dirs and logs; about 12 MB a run)")
    args = parser.parse_args(argv)
    for path in (args.dicom, args.mask):
        if not path.exists():
            parser.error(f"{path} not found")
    work = Path(tempfile.mkdtemp(prefix="bench-link-"))
    token_file = write_token_file(work / "token")
    stream = args.stream or work / "study.dlad"
    if args.stream is None:
        encode_study(args.dicom, args.mask, stream)
    print(f"work folder {work}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
          file=sys.stderr, flush=True)
    results = []
    for case in plan_cases(args, stream):
        print(f"{case.profile} {case.mode} run {case.run} ...", file=sys.stderr, flush=True)
        try:
            result = asyncio.run(run_case(case, token_file, work))
        except (BenchError, DemoError, ReceiverStartError) as error:
            print(f"bench_link: error: {error} (logs in {work})", file=sys.stderr)
            return 1
        results.append(result)
        print(json.dumps({key: value for key, value in result.items() if key != "curve"}), file=sys.stderr, flush=True)
    size = dicom_bytes(args.dicom)
    report = markdown(results, size) + "\n\n" + "\n".join(f"- {line}" for line in targets(results, size))
    report += (f"\n\nplain DICOM: {size} bytes in {sum(1 for p in args.dicom.rglob('*') if p.is_file())} files; "
               f"stream {results[0]['payload_bytes']} bytes")
    lossy = [row["session_s"] for row in results if row["loss"]]
    if lossy:
        report += f"; lossy sessions median {statistics.median(lossy):.2f} s"
    print(report)
    if args.markdown:
        args.markdown.write_text(report + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, size, args.plot)
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
