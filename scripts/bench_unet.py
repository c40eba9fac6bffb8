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
