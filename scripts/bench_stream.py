#!/usr/bin/env python
"""Benchmark of the live WebRTC transport: sender and receiver as separate processes on loopback.

Scenarios (each with a fresh receiver process and out-dir):

* ``live``: ``dlad-send DICOM --roi-mask MASK --exact --to URL`` - load, ROI, diffusion and
  pipelined encoding in the sender process while it streams. Times from the sender's start
  to "ROI complete" and to "complete" at the receiver (the receiver's status.json wall times
  minus the moment the sender process was started).
* ``replay``: the same study pre-encoded (``--out``) and replayed (``dlad-send FILE.dlad
  --to``): transport goodput without the encoder in the way.
* ``paced``: the replay capped at 20 Mbit/s (``--max-rate 20``): receiver CPU at that rate.
* ``large`` (only when asked): a synthetic 96 x 512 x 512 phantom (50 MB of voxels), encoded
  beforehand and replayed, to show how the receiver's memory scales with the volume.

Goodput = stream bytes of the pass / (receiver's ``done`` - inventory sent), measured by the
receiver (status.json ``transfer.last_pass``). Receiver CPU = utime+stime of its process over
the run; "cores" divides it by the pass duration. Memory = the receiver's VmHWM (peak RSS),
absolute and above its idle RSS before the study (interpreter + aiortc + numpy + codecs).

Usage::

    python scripts/bench_stream.py [--runs 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.receiver_process import ReceiverProcess  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_mem(pid: int) -> dict:
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, amount = line.split(":")
                values[name] = int(amount.split()[0]) * 1024
    return values


def start_receiver(folder: Path, token_file: Path, *options: str
                   ) -> tuple[ReceiverProcess, dict, float]:
    """A receiver process for one run, settled: (it, its idle memory, its CPU seconds so far)."""
    receiver = ReceiverProcess.start(folder / "out", token_file, folder / "receiver.log",
                                     *options, timeout=120, cwd=ROOT)
    time.sleep(1.0)  # let it settle before the idle baseline
    return receiver, proc_mem(receiver.pid), proc_cpu(receiver.pid)


def iso_epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def run_once(name: str, sender_args: list[str], token_file: Path, work: Path) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    receiver, idle, cpu0 = start_receiver(folder, token_file)
    try:
        command = [sys.executable, "-m", "sender.cli", *sender_args, "--to", receiver.url,
                   "--token-file", str(token_file), "--quiet"]
        started = time.time()
        sender = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        peak = 0
        while sender.poll() is None:
            peak = max(peak, proc_mem(receiver.pid)["VmHWM"])
            time.sleep(0.05)
        out, err = sender.communicate()
        ended = time.time()
        time.sleep(0.5)  # the receiver's last snapshot
        cpu = proc_cpu(receiver.pid) - cpu0
        memory = proc_mem(receiver.pid)
        if sender.returncode != 0:
            raise RuntimeError(f"{name}: dlad-send exited {sender.returncode}: {err[-2000:]}")
        (status_file,) = receiver.out_dir.glob("*/status.json")
        status = json.loads(status_file.read_text())
    finally:
        receiver.stop()
    times = status["times"]
    last_pass = status["transfer"]["last_pass"]
    volume_bytes = 2 * status["shape"][0] * status["shape"][1] * status["shape"][2]
    peak = max(peak, memory["VmHWM"])
    return {
        "scenario": name,
        "command": " ".join(["dlad-send", *sender_args, "--to", "URL", "--token-file", "T"]),
        "verified": status["verified_sha256"],
        "complete": status["state"] == "complete",
        "stream_bytes": last_pass["bytes"],
        "pass_s": last_pass["seconds"],
        "goodput_mbit_s": last_pass["mbit_s"],
        "sender_wall_s": round(ended - started, 2),
        "to_roi_complete_s": round(iso_epoch(times["roi_complete"]) - started, 2),
        "to_complete_s": round(iso_epoch(times["complete"]) - started, 2),
        "receiver_cpu_s": round(cpu, 2),
        "receiver_cores": round(cpu / max(last_pass["seconds"], 1e-3), 2),
        "receiver_idle_rss_mb": round(idle["VmRSS"] / 1e6, 1),
        "receiver_peak_rss_mb": round(peak / 1e6, 1),
        "receiver_increase_mb": round((peak - idle["VmRSS"]) / 1e6, 1),
        "volume_mb": round(volume_bytes / 1e6, 1),
        "target_3x_volume_mb": round(3 * volume_bytes / 1e6, 1),
    }


def encode_large_phantom(path: Path) -> None:
    from models.phantoms import make_phantom
    from sender.encoder import EncodeSettings, StudyEncoder
    from sender.pipeline import prepare_study
    from sender.roi.provider import StaticMaskProvider

    # 410 mm in plane, 192 mm of slab; seed 10's slab shows the liver on 90 of the 96 slices.
    volume, liver = make_phantom((96, 512, 512), spacing=(0.8, 0.8, 2.0), seed=10)
    prepared = prepare_study(volume, StaticMaskProvider(liver, "phantom liver"))
    with open(path, "wb") as out:
        for data in StudyEncoder(prepared, EncodeSettings(exact=True)).frames():
            out.write(data)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dicom", type=Path, default=DATA / "abdomen_ct_dicom",
                        help="DICOM series folder (default: the shared abdomen)")
    parser.add_argument("--mask", type=Path, default=DATA / "abdomen_ct_liver.nii.gz",
                        help="liver mask of --dicom (default: the shared abdomen's)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each scenario")
    parser.add_argument("--scenarios", default="live,replay,paced",
                        help="comma-separated scenarios (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    for path in (args.dicom, args.mask):
        if not path.exists():
            parser.error(f"{path} not found")
    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    token_file = work / "token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    study = ["--roi-mask", str(args.mask), "--exact"]
    encoded = work / "study.dlad"
    subprocess.run([sys.executable, "-m", "sender.cli", str(args.dicom), *study, "--out",
                    str(encoded), "--quiet"], cwd=ROOT, check=True)
    scenarios = {"live": [str(args.dicom), *study], "replay": [str(encoded)],
                 "paced": [str(encoded), "--max-rate", "20"]}
    if "large" in args.scenarios:
        large = work / "large.dlad"
        encode_large_phantom(large)
        scenarios["large"] = [str(large)]
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
          file=sys.stderr)
    results = []
    for name in args.scenarios.split(","):
        for _ in range(args.runs):
            result = run_once(name, scenarios[name], token_file, work)
            result["load_avg"] = round(os.getloadavg()[0], 2)
            results.append(result)
            print(json.dumps(result), file=sys.stderr)
    columns = ["scenario", "goodput_mbit_s", "pass_s", "to_roi_complete_s", "to_complete_s",
               "receiver_cpu_s", "receiver_cores", "receiver_idle_rss_mb",
               "receiver_peak_rss_mb", "receiver_increase_mb", "load_avg"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name in args.scenarios.split(","):
        rows = [r for r in results if r["scenario"] == name]
        for row in rows:
            print("| " + " | ".join(str(row[c]) for c in columns) + " |")
        medians = {c: statistics.median(r[c] for r in rows) for c in columns[1:]}
        print(f"| **{name} median** | " + " | ".join(f"{medians[c]:g}" for c in columns[1:])
              + " |")
    first = results[0]
    print(f"\nvolume {first['volume_mb']} MB (3x = {first['target_3x_volume_mb']} MB), "
          f"stream {first['stream_bytes']} bytes; all verified: "
          f"{all(r['verified'] for r in results)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
