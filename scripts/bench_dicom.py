"""DICOM series decoding: sender/dicom.py (pydicom + OpenJPEG/libjpeg/CharLS) against ITK's GDCM
series reader (the sender's DICOM path before issue 11), interleaved, medians.

Each run reads the whole series (headers, sort, decode, HU) and reports wall and CPU seconds
per slice; both readers must give the same voxels. "Warm" runs are in this process (libraries
imported once); "cold" runs are a fresh Python process per read, as ``dlad-send`` pays it
(imports, ITK's lazy module loading, then the read).

    python scripts/bench_dicom.py --runs 5                   # the shared abdomen series
    python scripts/bench_dicom.py --series DIR --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sender.dicom import read_series  # noqa: E402
from shared.geometry import itk_geometry_to_affine  # noqa: E402


def read_with_itk(folder: Path) -> np.ndarray:
    """ITK's GDCM series reader, as sender/io.py used it."""
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.SetDirectory(str(folder))
    files = max((list(names.GetFileNames(uid)) for uid in names.GetSeriesUIDs()), key=len)
    reader = itk.ImageSeriesReader[itk.Image[itk.F, 3]].New(
        ImageIO=itk.GDCMImageIO.New(), FileNames=files, ForceOrthogonalDirection=False)
    reader.Update()
    image = reader.GetOutput()
    itk_geometry_to_affine(np.array(image.GetDirection()), tuple(image.GetSpacing()),
                           tuple(image.GetOrigin()))
    return np.array(itk.array_view_from_image(image)).astype(np.int16)


def timed(function) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=Path,
                        default=ROOT.parent / "shared" / "data" / "abdomen_ct_dicom",
                        help="DICOM series folder (default: the shared abdomen)")
    parser.add_argument("--runs", type=int, default=5, help="interleaved runs per reader (median)")
    args = parser.parse_args(argv)
    import itk  # noqa: F401 - imported once, outside the timings

    readers = {
        "ITK (GDCM series reader)": lambda: read_with_itk(args.series),
        "sender/dicom.py, 1 thread": lambda: read_series(args.series, threads=1).volume.data,
        "sender/dicom.py, 2 threads": lambda: read_series(args.series, threads=2).volume.data,
    }
    results = {name: ([], []) for name in readers}
    reference = None
    for _ in range(args.runs):
        for name, read in readers.items():
            wall, cpu, data = timed(read)
            results[name][0].append(wall)
            results[name][1].append(cpu)
            if reference is None:
                reference = data
            assert np.array_equal(data, reference), name
    cold = {name: [] for name in ("itk", "pydicom")}
    for _ in range(args.runs):
        for name in cold:
            code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                    + ("from scripts.bench_dicom import read_with_itk as r; "
                       if name == "itk" else
                       "from sender.dicom import read_series as q; r = lambda f: q(f).volume; ")
                    + f"r({str(args.series)!r})")
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
            cold[name].append(time.perf_counter() - started)
    slices = reference.shape[0]
    itk_wall = statistics.median(results["ITK (GDCM series reader)"][0])
    print(f"{args.series.name}: {slices} slices of {reference.shape[1]} x {reference.shape[2]}, "
          f"medians of {args.runs} interleaved runs, load {os.getloadavg()[0]:.2f}")
    print("| reader | wall s/slice | CPU s/slice | speed-up (wall) |")
    print("|---|---|---|---|")
    for name, (walls, cpus) in results.items():
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        print(f"| {name} | {wall / slices:.4f} | {cpu / slices:.4f} | {itk_wall / wall:.1f}x |")
    itk_cold, pydicom_cold = (statistics.median(cold[name]) for name in ("itk", "pydicom"))
    print(f"\ncold (a fresh process per read, wall): ITK {itk_cold:.2f} s "
          f"({itk_cold / slices:.3f} s/slice), sender/dicom.py {pydicom_cold:.2f} s "
          f"({pydicom_cold / slices:.3f} s/slice): {itk_cold / pydicom_cold:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
