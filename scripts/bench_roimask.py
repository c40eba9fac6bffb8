"""What the ROI mask's row-runs coding costs: the row-by-row coder of before against the
vectorised one (issue 15), and the zstd level of the row runs.

Masks: the sender's ROI of each study of ../shared/data that has a liver mask (the mask file
through the default steering: disc dilation, margin across slices, holes filled), and a
synthetic 300 x 512 x 512 series in three variants (an ellipsoid of about 19 % of the voxels
whose edges wobble by a voxel, whose row ends jitter by a voxel, whose edge voxels are noisy:
from liver-like to many short runs), each given slice by slice from its packed bits as the sender does. Both coders
encode and decode every mask ``--runs`` times, interleaved (before, now, before, now ...);
medians are reported, the bytes checked equal and the decoded bits checked against
``np.packbits`` of the mask.

Then the zstd level of the varint stream: for each level, the bytes and the seconds of the
compression (medians over ``--runs``), and what the mask costs on the live path over the
slowest link profile (wifi-2m, 2 Mbit/s): those seconds plus the bytes' transfer time.

    python scripts/bench_roimask.py --runs 5                 # results as Markdown tables
    python scripts/bench_roimask.py --runs 3 --no-studies    # the synthetic series only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from shared import roimask  # noqa: E402
from tests import roimask_oracle  # noqa: E402

STUDIES = {
    "abdomen ROI 20x512x512": ("abdomen_ct_dicom", "abdomen_ct_liver.nii.gz"),
    "torso_sm ROI 30x101x122": ("torso_ct_sm.nii.gz", "torso_ct_sm_liver.nii.gz"),
}
#: zstd levels compared: the fast end, the packed bits' level (9), and up to the one in use.
LEVELS = (3, 6, 9, 12, 15, 17, 19)
#: The slowest link profile (wifi-2m), bits per second.
SLOW_LINK = 2e6


def study_roi(ct: str, mask: str) -> np.ndarray:
    """The ROI the sender sends for the CT ``ct`` with the liver mask file ``mask``."""
    from sender.io import load_volume
    from sender.roi.mask_file import MaskFileProvider
    from sender.roi.steering import SteeringSettings, steer

    volume = load_volume(DATA / ct)
    provider = MaskFileProvider(DATA / mask)
    settings = SteeringSettings().for_provider(provider)
    return steer(provider.probability(volume), volume.spacing, settings,
                 need_probability=False).roi


def synthetic_roi(noise: str, shape=(300, 512, 512), seed: int = 15):
    """Packed bits and shape of an ellipsoid of about 19 % of ``shape`` whose edges jitter, by
    noise of sd 0.01 on the squared radius (about a voxel's step at the edge): each row end
    wobbling smoothly (``noise="smooth"``: the noise averaged over 8 rows, as a liver's edge
    moves), each row end independently (``"rows"``), or every voxel near the edge (``"voxels"``:
    runs break up)."""
    nz, ny, nx = shape
    rng = np.random.default_rng(seed)
    y = ((np.arange(ny)[:, None] - 0.47 * ny) / (0.30 * ny)) ** 2
    x = ((np.arange(nx)[None, :] - 0.49 * nx) / (0.36 * nx)) ** 2
    right = (np.arange(nx) >= 0.49 * nx).astype(int)
    window = np.ones(8) / np.sqrt(8)  # a moving sum that keeps the sd
    packed = []
    for z in range(nz):
        radius = x + y + ((z - 0.5 * nz) / (0.42 * nz)) ** 2
        if noise == "voxels":
            jitter = rng.normal(0.0, 0.01, (ny, nx))
        elif noise == "rows":
            jitter = rng.normal(0.0, 0.01, (ny, 2))[:, right]
        else:
            ends = rng.normal(0.0, 0.01, (ny + 7, 2))
            jitter = np.stack([np.convolve(ends[:, side], window, "valid")
                               for side in (0, 1)], axis=1)[:, right]
        packed.append(radius + jitter < 1.0)
    return np.packbits(np.stack(packed).ravel()), shape


def slices_of(packed: np.ndarray, shape):
    """``mask_slices(z)`` from packed bits, as :func:`shared.wire.roi_field` gives it."""
    plane = shape[1] * shape[2]

    def mask_slice(z: int) -> np.ndarray:
        start = z * plane
        bits = np.unpackbits(packed[start // 8:(start + plane + 7) // 8])
        return bits[start % 8:start % 8 + plane].view(bool).reshape(shape[1:])
    return mask_slice


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def compare(name: str, packed: np.ndarray, shape, runs: int) -> str:
    """One table row: bytes, then encode and decode seconds before and now (medians)."""
    mask_slices = slices_of(packed, shape)
    seconds = {key: [] for key in ("old encode", "new encode", "old decode", "new decode")}
    for _ in range(runs):
        spent, before = timed(roimask_oracle.encode_runs, mask_slices, shape)
        seconds["old encode"].append(spent)
        spent, now = timed(roimask.encode_runs, mask_slices, shape)
        seconds["new encode"].append(spent)
        assert now == before, f"{name}: the bytes differ"
        spent, bits = timed(roimask_oracle.decode_runs, now, shape)
        seconds["old decode"].append(spent)
        assert np.array_equal(bits, packed), f"{name}: the row-by-row decoder differs"
        spent, bits = timed(roimask.decode_runs, now, shape)
        seconds["new decode"].append(spent)
        assert np.array_equal(bits, packed), f"{name}: the decoder differs"
    med = {key: statistics.median(values) for key, values in seconds.items()}
    fraction = np.unpackbits(packed).sum() / np.prod(shape)
    packbits_bytes = len(zstandard.ZstdCompressor(level=9).compress(packed.tobytes()))
    return (f"| {name} | {100 * fraction:.1f} % | {len(now)} | {packbits_bytes} | "
            f"{med['old encode']:.3f} | {med['new encode']:.3f} | "
            f"{med['old encode'] / med['new encode']:.1f}x | {med['old decode']:.3f} | "
            f"{med['new decode']:.3f} | {med['old decode'] / med['new decode']:.1f}x |")


def levels(name: str, packed: np.ndarray, shape, runs: int) -> list[str]:
    """Table rows: for each zstd level, bytes, compression seconds, and those seconds plus the
    bytes' time on the slow link; the encoder's seconds besides zstd in the first column."""
    varints = zstandard.ZstdDecompressor().decompress(
        roimask.encode_runs(slices_of(packed, shape), shape))
    rows = []
    for level in LEVELS:
        compressor = zstandard.ZstdCompressor(level=level)
        spent = [timed(compressor.compress, varints)[0] for _ in range(runs)]
        size = len(compressor.compress(varints))
        seconds = statistics.median(spent)
        rows.append(f"| {name} | {len(varints)} | {level} | {size} | {seconds:.4f} | "
                    f"{seconds + 8 * size / SLOW_LINK:.4f} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per coder and mask (default 5)")
    parser.add_argument("--no-studies", action="store_true",
                        help="the synthetic series only (no ../shared/data needed)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    masks = {}
    if not args.no_studies:
        for name, (ct, mask) in STUDIES.items():
            roi = study_roi(ct, mask)
            masks[name] = np.packbits(roi.ravel()), roi.shape
    for noise, what in (("smooth", "edges wobble"), ("rows", "row ends jitter"),
                        ("voxels", "edge voxels noisy")):
        masks[f"synthetic 300x512x512, {what}"] = synthetic_roi(noise)
    print(f"load before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", file=sys.stderr)
    print("| mask | ROI | row runs (bytes) | packed bits, zstd 9 (bytes) | encode before (s) | "
          "encode now (s) | | decode before (s) | decode now (s) | |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (packed, shape) in masks.items():
        print(compare(name, packed, shape, args.runs), flush=True)
    print()
    print("| mask | varints (bytes) | zstd level | row runs (bytes) | zstd (s) | "
          "zstd + transfer at 2 Mbit/s (s) |")
    print("|---|---|---|---|---|---|")
    for name, (packed, shape) in masks.items():
        print("\n".join(levels(name, packed, shape, args.runs)), flush=True)
    print(f"load after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
