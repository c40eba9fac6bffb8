#!/usr/bin/env python
"""Diffusion speed: dlad-stream's torch scheme against the plain NumPy scheme, interleaved.

Times :func:`sender.diffusion.diffuse` (float32, torch) on the CPU with each thread count of
``--threads`` against :func:`tests.diffusion_oracle.diffuse_numpy` (float64, four fluxes per
voxel, single-threaded: the textbook scheme and the accuracy oracle), on the shared abdomen CT
steered by its liver mask, cut or repeated along z to each length of ``--slices``. Fair by
construction: every repetition runs every implementation once, in turn (so a change of machine
load hits all of them alike), after one untimed warm-up each; the figure is the median of
``--repeats`` runs, and the speed-up is the ratio of medians. ``--baseline FILE`` adds another
implementation of ``diffuse`` (e.g. an earlier version of ``sender/diffusion.py``) to the same
rotation. With CUDA present, the study is also diffused on the GPU at ``--cuda-slices`` slices
(median of 5 after a warm-up, clock stopped after synchronising, copies included) and compared
with the CPU result.

Also reported: voxels that differ from the NumPy oracle after rounding (the stated tolerance:
at most 1 HU on fewer than 0.1 % of the voxels) and that the ROI is untouched.

Examples:
    python scripts/bench_diffusion.py                            # 20 and 60 slices, 1 and 2 threads
    python scripts/bench_diffusion.py --slices 20 --threads 1 --repeats 5
    python scripts/bench_diffusion.py --baseline <(git show bc7279d:sender/diffusion.py)
    python scripts/bench_diffusion.py --synthetic 8,64,64        # no data needed (smoke test)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sender.diffusion import DiffusionSettings, diffuse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for the tests' NumPy oracle, the baseline of the timings
from tests.diffusion_oracle import diffuse_numpy  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def table(headers, rows) -> str:
    """A GitHub-markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def load_study(args) -> tuple[np.ndarray, np.ndarray, str]:
    """(int16 CT, steering probability, description) of the benchmark's study."""
    from sender.roi.steering import SteeringSettings, steer

    if args.synthetic:
        from models.phantoms import make_phantom

        nz, ny, nx = args.synthetic
        # A whole abdomen (about 400 mm across) in the asked grid.
        volume, mask = make_phantom(args.synthetic, spacing=(400 / nx, 400 / ny, 2.5), seed=1)
        from sender.roi.provider import StaticMaskProvider

        provider = StaticMaskProvider(mask, "the phantom's liver")
        name = f"synthetic phantom {'x'.join(map(str, args.synthetic))}"
    else:
        from sender.io import load_volume
        from sender.roi.mask_file import MaskFileProvider

        volume = load_volume(args.ct)
        provider = MaskFileProvider(args.mask, args.label)
        name = args.ct.name
    steering = steer(provider.probability(volume), volume.spacing,
                     SteeringSettings().for_provider(provider))
    return volume.data, steering.probability, name


def with_slices(array: np.ndarray, count: int) -> np.ndarray:
    """``array`` cut or repeated along z to ``count`` slices."""
    repeats = -(-count // array.shape[0])
    return np.ascontiguousarray(np.concatenate([array] * repeats)[:count])


def load_baseline(path: Path):
    """The ``diffuse`` function of another implementation file (read once: may be a pipe)."""
    source = path.read_text()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source)
    try:
        spec = importlib.util.spec_from_file_location("baseline_diffusion", handle.name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        os.unlink(handle.name)
    return module.diffuse


def interleaved(cases: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each case per repetition, every case once per repetition, in turn."""
    for run in cases.values():  # warm-up: allocator, thread pool, lazy imports
        run()
    seconds = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def with_threads(threads: int, function):
    def run():
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return function()
        finally:
            torch.set_num_threads(previous)
    return run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", type=Path, default=DATA / "abdomen_ct_dicom",
                        help="CT (default: the shared abdomen DICOM series)")
    parser.add_argument("--mask", type=Path, default=DATA / "abdomen_ct_liver.nii.gz",
                        help="liver mask aligned to the CT in physical space")
    parser.add_argument("--label", type=int, help="label of --mask (default: any non-zero)")
    parser.add_argument("--synthetic", type=lambda s: tuple(int(v) for v in s.split(",")),
                        help="use the synthetic phantom of this shape NZ,NY,NX instead of --ct")
    parser.add_argument("--slices", type=int, nargs="+", default=[20, 60],
                        help="volume lengths (default 20 60)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch CPU thread counts (default 1 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (3)")
    parser.add_argument("--baseline", type=Path,
                        help="another diffusion module to time in the same rotation")
    parser.add_argument("--cuda-slices", type=int, default=90,
                        help="study length on CUDA, when present (default 90; goal < 20 ms)")
    args = parser.parse_args(argv)
    if min(args.slices) < 1 or min(args.threads) < 1 or args.repeats < 1:
        parser.error("--slices, --threads and --repeats must be positive")
    if args.synthetic is not None and len(args.synthetic) != 3:
        parser.error("--synthetic takes NZ,NY,NX")
    if args.synthetic is None and not (args.ct.exists() and args.mask.exists()):
        parser.error(f"--ct {args.ct} or --mask {args.mask} not found (or use --synthetic)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    ct, probability, name = load_study(args)
    settings = DiffusionSettings()
    baseline = load_baseline(args.baseline) if args.baseline else None
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"## Diffusion speed (K = {settings.kappa:g} HU, {settings.iterations} iterations, "
          f"{settings.mode})\n")
    print(f"CT: {name}, {ct.shape[1]}x{ct.shape[2]} px per slice; torch {torch.__version__}; "
          f"{os.cpu_count()} CPUs; load average before: {' '.join(load)}; medians of "
          f"{args.repeats} interleaved runs\n")
    rows, accuracy = [], []
    for slices in args.slices:
        volume, weight = with_slices(ct, slices), with_slices(probability, slices)
        cases = {"numpy": lambda v=volume, w=weight: diffuse_numpy(v, w, settings.kappa,
                                                                   settings.iterations)}
        for threads in args.threads:
            cases[f"torch {threads}"] = with_threads(
                threads, lambda v=volume, w=weight: diffuse(v, w, settings, "cpu"))
            if baseline is not None:
                cases[f"baseline {threads}"] = with_threads(
                    threads, lambda v=volume, w=weight: baseline(v, w, settings, "cpu"))
        seconds = interleaved(cases, args.repeats)
        reference = statistics.median(seconds["numpy"])
        rows.append([slices, "NumPy explicit (float64, 4 fluxes)", 1, f"{reference:.3f}",
                     " / ".join(f"{s:.2f}" for s in seconds["numpy"]), "1.0"])
        for case, values in seconds.items():
            if case == "numpy":
                continue
            kind, threads = case.split(" ")
            label = ("dlad-stream torch (float32)" if kind == "torch"
                     else f"baseline {args.baseline.name} (float32)")
            median = statistics.median(values)
            rows.append([slices, label, threads, f"{median:.3f}",
                         " / ".join(f"{s:.2f}" for s in values), f"{reference / median:.1f}"])
        result = diffuse(volume, weight, settings, "cpu")
        oracle = cases["numpy"]()
        differing = result != oracle
        accuracy.append([slices, int(differing.sum()), f"{100 * differing.mean():.4f} %",
                         int(np.abs(result.astype(np.int32) - oracle).max()),
                         "yes" if np.array_equal(result[weight >= 1], volume[weight >= 1]) else "NO"])
    print(table(["slices", "implementation", "threads", "median s", "runs s", "speed-up"], rows))
    print("\nAgainst the NumPy oracle (after rounding):\n")
    print(table(["slices", "voxels differing", "share", "max abs. difference HU", "ROI untouched"],
                accuracy))
    if torch.cuda.is_available():
        volume = with_slices(ct, args.cuda_slices)
        weight = with_slices(probability, args.cuda_slices)

        def on_cuda():
            result = diffuse(volume, weight, settings, "cuda")
            torch.cuda.synchronize()
            return result

        gpu = on_cuda()
        seconds = []
        for _ in range(5):
            started = time.perf_counter()
            on_cuda()
            seconds.append(time.perf_counter() - started)
        cpu = diffuse(volume, weight, settings, "cpu")
        print(f"\nCUDA ({torch.cuda.get_device_name()}), {args.cuda_slices} slices: median "
              f"{1000 * statistics.median(seconds):.1f} ms (host copies included; goal < 20 ms); "
              f"max |CPU - CUDA| {int(np.abs(cpu.astype(np.int32) - gpu).max())} HU on "
              f"{int((cpu != gpu).sum())} voxels; ROI untouched: "
              f"{np.array_equal(gpu[weight >= 1], volume[weight >= 1])}")
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"\nload average after: {' '.join(load)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
