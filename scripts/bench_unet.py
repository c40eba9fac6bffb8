#!/usr/bin/env python
"""Time the U-Net liver provider and its plausibility check: CPU and (when present) CUDA.

The volume is the 20-slice 512x512 abdomen CT of ``../shared/data`` (or ``--ct``), repeated
along z to ``--slices`` slices when more are asked for (the GPU target is 90 slices). Each
timing is the median of ``--repeats`` runs after one warm-up run; it covers the provider's
``probability()`` call (preprocessing, network, resampling back), not loading the file, and
then the sender's anatomical plausibility check of that map (sender/roi/safety.py:
``roi_problem``, CPU); "U-Net + checks" is their sum (target: 20 slices in 10 s on CPU). On
CUDA the clock stops after a synchronisation, and the CPU and CUDA maps are compared (largest
per-voxel difference; the provider promises agreement within ``CPU_CUDA_TOLERANCE``).

Examples:
    python scripts/bench_unet.py                          # CPU, 20 slices
    python scripts/bench_unet.py --device cuda --slices 90
    python scripts/bench_unet.py --device cpu cuda --slices 20 90 --threads 16
    python scripts/bench_unet.py --flips --weights a.pt b.pt     # flips, two-model ensemble
    python scripts/bench_unet.py --gil --repeats 7        # a live worker's slice beside Python

``--gil`` times what a live sender's U-Net worker does per arriving slice instead
(:class:`sender.pipeline.SliceProbabilities`: one slice through the networks on one torch
thread, in a thread of its own), with the networks eager or traced
(:func:`models.inference.gil_free`), with and without a busy Python thread beside it (the
event loop, the WebRTC stack and the DICOM node of a live sender want the GIL too), at
Python's default GIL switch interval (5 ms) and the live sender's
(:data:`sender.live.LIVE_GIL_SWITCH_INTERVAL_S`); the cases interleaved, medians of
``--repeats``; it also reports how far the busy thread got per second (what the others pay).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sender.io import load_volume
from sender.roi.safety import roi_problem
from sender.roi.unet import CPU_CUDA_TOLERANCE, UNetProvider
from shared.volume import Volume

DEFAULT_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "abdomen_ct_dicom"


def with_slices(volume: Volume, count: int) -> Volume:
    """``volume`` cut or repeated along z to ``count`` slices (same in-plane geometry)."""
    repeats = -(-count // volume.shape[0])
    data = np.concatenate([volume.data] * repeats)[:count]
    return Volume(data=data, affine=volume.affine, spacing=volume.spacing)


def time_provider(provider: UNetProvider, volume: Volume, repeats: int
                  ) -> tuple[float, np.ndarray]:
    def run():
        result = provider.probability(volume)
        if provider.device.type == "cuda":
            torch.cuda.synchronize(provider.device)
        return result

    probability = run()  # warm-up: kernels, allocator, caches
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds), probability


def time_gil(source: Volume, repeats: int, weights=None) -> None:
    """The ``--gil`` table (see the module docstring)."""
    import threading

    import models.inference as inference
    from sender.live import LIVE_GIL_SWITCH_INTERVAL_S

    provider = UNetProvider(weights=weights, device="cpu")
    section = source.data[source.shape[0] // 2][None]
    spacing = source.spacing
    default_interval = sys.getswitchinterval()
    intervals = (default_interval, LIVE_GIL_SWITCH_INTERVAL_S)
    cases = [(networks, busy, interval) for networks in ("eager", "traced")
             for busy in (False, True) for interval in intervals
             if busy or interval == default_interval]
    seconds: dict = {case: [] for case in cases}
    spins: dict = {case: [] for case in cases if case[1]}

    def one_slice(networks: str) -> float:
        original = inference.gil_free
        if networks == "eager":
            inference.gil_free = lambda member: member
        try:
            began = time.perf_counter()
            inference.predict_probability(provider.models, section, source.affine, spacing,
                                          workers=1)
            return time.perf_counter() - began
        finally:
            inference.gil_free = original

    def run(case) -> None:
        networks, busy, interval = case
        stop = threading.Event()
        counted = [0]

        def spin() -> None:  # pure Python, never waits: the worst case of a busy event loop
            count = 0
            while not stop.is_set():
                count += 1
            counted[0] = count

        result: list[float] = []

        def worker() -> None:  # a thread of its own, on one torch thread, as a live worker
            torch.set_num_threads(1)
            one_slice(networks)  # warm-up (and the trace, made once)
            result.append(one_slice(networks))

        sys.setswitchinterval(interval)
        spinner = threading.Thread(target=spin) if busy else None
        began = time.perf_counter()
        if spinner is not None:
            spinner.start()
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        stop.set()
        if spinner is not None:
            spinner.join()
            spins[case].append(counted[0] / (time.perf_counter() - began) / 1e6)
        sys.setswitchinterval(default_interval)
        seconds[case].append(result[0])

    for _ in range(repeats):  # interleaved: every case once per round
        for case in cases:
            run(case)
    print(f"one {section.shape[1]}x{section.shape[2]} slice through {len(provider.models)} "
          f"network(s), medians of {repeats} interleaved runs")
    header = f"{'networks':<9} {'busy thread':<12} {'GIL switch':>10} {'s / slice':>10} " \
             f"{'busy thread Mloops/s':>21}"
    print(header)
    print("-" * len(header))
    for case in cases:
        networks, busy, interval = case
        spin = f"{statistics.median(spins[case]):>21.1f}" if busy else f"{'':>21}"
        print(f"{networks:<9} {'yes' if busy else 'no':<12} {interval * 1e3:>8.1f}ms "
              f"{statistics.median(seconds[case]):>10.3f} {spin}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", type=Path, default=DEFAULT_CT,
                        help="CT to run on (default: the shared abdomen DICOM series)")
    parser.add_argument("--device", nargs="+", default=["cpu"],
                        help="devices to time, e.g. cpu cuda (default cpu)")
    parser.add_argument("--slices", type=int, nargs="+", default=[20],
                        help="volume lengths to time (default 20)")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per batch (8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (3)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (2)")
    parser.add_argument("--weights", type=Path, nargs="+", default=None,
                        help="weights file(s), several for an ensemble (default: bundled)")
    parser.add_argument("--flips", action="store_true", help="test-time left-right flips")
    parser.add_argument("--gil", action="store_true",
                        help="time a live worker's slice beside a busy Python thread instead "
                             "(eager vs traced networks, GIL switch intervals)")
    args = parser.parse_args(argv)
    if min(args.slices) < 1 or args.repeats < 1 or args.threads < 1 or args.batch_size < 1:
        parser.error("--slices, --repeats, --threads and --batch-size must be positive")
    if "cuda" in args.device and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if not args.ct.exists():
        parser.error(f"--ct {args.ct} not found")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    source = load_volume(args.ct)
    if args.gil:
        time_gil(source, args.repeats, args.weights)
        return 0
    print(f"CT {args.ct.name}: {source.shape[1]}x{source.shape[2]} px, spacing "
          f"{source.spacing[0]:.3f} mm; torch {torch.__version__}, {args.threads} CPU threads, "
          f"batch {args.batch_size}")
    header = (f"{'device':<8} {'slices':>6} {'U-Net s':>8} {'slices/s':>9} {'checks s':>9} "
              f"{'U-Net + checks s':>17}  note")
    print(header)
    print("-" * len(header))
    for slices in args.slices:
        volume = with_slices(source, slices)
        maps = {}
        for device in args.device:
            provider = UNetProvider(weights=args.weights, device=device,
                                    batch_size=args.batch_size, flips=args.flips)
            seconds, maps[device] = time_provider(provider, volume, args.repeats)
            checks = []
            for _ in range(args.repeats):
                began = time.perf_counter()
                finding = roi_problem(maps[device], volume)
                checks.append(time.perf_counter() - began)
            check = statistics.median(checks)
            name = torch.cuda.get_device_name(provider.device) if device.startswith("cuda") \
                else "CPU"
            verdict = "liver plausible" if finding is None else "fallback"
            print(f"{device:<8} {slices:>6} {seconds:>8.3f} {slices / seconds:>9.1f} "
                  f"{check:>9.3f} {seconds + check:>17.3f}  {name}, {verdict}")
        if "cpu" in maps and len(maps) > 1:
            for device, probability in maps.items():
                if device != "cpu":
                    difference = float(np.abs(probability - maps["cpu"]).max())
                    verdict = "ok" if difference <= CPU_CUDA_TOLERANCE else "ABOVE TOLERANCE"
                    print(f"  max |p_cpu - p_{device}| = {difference:.2e} "
                          f"(tolerance {CPU_CUDA_TOLERANCE:g}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
