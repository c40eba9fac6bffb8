#!/usr/bin/env python
"""ROI post-processing studies of docs/UNET.md: margins across slices, seed ensembles, lesions.

Three steps, all on the two shared scans (fold A validates on the torso CT, fold B on the
abdomen CT):

* ``maps RUN...``: cache the probability maps of ``runs/RUN/liver_unet.pt`` on both scans
  (``--cache``, default ``runs/probmaps``; about 20 MB per map), with the true livers.
* ``margins MODEL...``: from the cached maps, a markdown table of Dice and liver recall / ROI
  ratio (``sender.roi.safety.roi_metrics``, as ``scripts/eval_roi.py``) for each
  post-processing: the paper's (in-plane disc only), + holes filled, + 6 / 10 / 15 mm margin
  across slices. ``MODEL`` is ``RUN:FOLD`` (``a_el_ph2:A``) or several runs joined by ``+``,
  whose maps are averaged (``a_el_ph2+a_el_ph2_s1:A``, the ensembling idea).
* ``lesions SCAN RUN...``: paint 18 spherical lesions into ``SCAN`` (``torso`` or
  ``abdomen``; deep, >= 25 mm below the liver surface, or at the edge, 3-8 mm; radius 10, 20,
  30 mm; -70, -40, +60 HU; the lesion stays liver), run each model and report the lesion
  voxels inside the ROI with the paper's steering and with the U-Net's default (15 mm margin,
  holes filled).

Examples::

    python scripts/study_roi.py maps a_el_ph2 a_el_ph2_s1 b_el_ph2 b_el_ph2_s1
    python scripts/study_roi.py margins a_el_ph2:A a_el_ph2_s1:A a_el_ph2+a_el_ph2_s1:A b_el_ph2:B
    python scripts/study_roi.py lesions abdomen b_el_ph2 final
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sender.io import load_volume  # noqa: E402
from sender.roi.mask_file import MaskFileProvider  # noqa: E402
from sender.roi.safety import roi_metrics  # noqa: E402
from sender.roi.steering import DEFAULT_Z_MARGIN_MM, SteeringSettings, steer  # noqa: E402
from shared.volume import Volume  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SCANS = {"torso": ("torso_ct_sm.nii.gz", "torso_ct_sm_liver.nii.gz"),
         "abdomen": ("abdomen_ct_dicom", "abdomen_ct_liver.nii.gz")}
VALIDATION_SCAN = {"A": "torso", "B": "abdomen"}
PAPER = SteeringSettings(z_margin_mm=0.0, fill_holes=False)
VARIANTS = {"paper": PAPER, "+ holes filled": SteeringSettings(z_margin_mm=0.0),
            "+ 6 mm": SteeringSettings(z_margin_mm=6.0),
            "+ 10 mm": SteeringSettings(z_margin_mm=10.0),
            f"+ {DEFAULT_Z_MARGIN_MM:g} mm (default)":
                SteeringSettings(z_margin_mm=DEFAULT_Z_MARGIN_MM)}


def load_scan(name: str) -> tuple[Volume, np.ndarray]:
    ct, mask = SCANS[name]
    volume = load_volume(str(DATA / ct))
    return volume, MaskFileProvider(DATA / mask).probability(volume) > 0.5


def provider_of(run: str):
    from sender.roi.unet import UNetProvider
    weights = ROOT / "runs" / run / "liver_unet.pt"
    if run == "bundled":
        weights = None
    elif not weights.exists():
        raise SystemExit(f"error: {weights} not found")
    return UNetProvider(weights=weights, device="cpu")


def cache_maps(runs: list[str], cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    for scan in SCANS:
        volume, liver = load_scan(scan)
        np.save(cache / f"{scan}_liver.npy", liver)
        np.save(cache / f"{scan}_spacing.npy", np.array(volume.spacing))
        for run in runs:
            probability = provider_of(run).probability(volume)
            np.save(cache / f"{scan}_{run}.npy", probability.astype(np.float32))
            print(f"{scan}: map of {run} cached", flush=True)


def margins_table(models: list[str], cache: Path) -> None:
    print("| model | fold | Dice | " + " | ".join(VARIANTS) + " |")
    print("|---|---|---|" + "---|" * len(VARIANTS))
    for model in models:
        runs, _, fold = model.partition(":")
        if fold not in VALIDATION_SCAN:
            raise SystemExit(f"error: {model!r}: give the fold as RUN:A or RUN:B")
        scan = VALIDATION_SCAN[fold]
        try:
            liver = np.load(cache / f"{scan}_liver.npy")
            spacing = tuple(np.load(cache / f"{scan}_spacing.npy"))
            probability = np.mean([np.load(cache / f"{scan}_{run}.npy")
                                   for run in runs.split("+")], axis=0)
        except FileNotFoundError as error:
            raise SystemExit(f"error: {error.filename} missing: run the maps step first") from None
        cells = []
        for settings in VARIANTS.values():
            metrics = roi_metrics(probability, liver, spacing, settings)
            recall = "100" if metrics.recall >= 0.99995 else f"{100 * metrics.recall:.2f}"
            cells.append(f"{recall} % / {metrics.roi_ratio:.2f}")
        dice = roi_metrics(probability, liver, spacing, PAPER).dice
        print(f"| {runs} | {fold} | {dice:.3f} | " + " | ".join(cells) + " |", flush=True)


def painted_lesions(volume: Volume, liver: np.ndarray, seed: int = 0):
    """(where, radius mm, HU change, lesion mask) of the 18 lesions."""
    from scipy.ndimage import distance_transform_edt

    sx, sy, sz = volume.spacing
    depth = distance_transform_edt(liver, sampling=(sz, sy, sx))
    rng = np.random.default_rng(seed)
    cases = []
    for where, low, high in (("deep", 25.0, np.inf), ("edge", 3.0, 8.0)):
        candidates = np.argwhere((depth >= low) & (depth <= high))
        for radius in (10, 20, 30):
            for delta in (-70, -40, 60):
                centre = candidates[rng.integers(len(candidates))]
                axes = [((np.arange(n) - c) * s) ** 2
                        for n, c, s in zip(liver.shape, centre, (sz, sy, sx), strict=True)]
                ball = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
                cases.append((where, radius, delta, liver & (ball <= radius ** 2)))
    return cases


def lesion_study(scan: str, runs: list[str]) -> None:
    volume, liver = load_scan(scan)
    cases = painted_lesions(volume, liver)
    steerings = {"paper": PAPER, "default": SteeringSettings(z_margin_mm=DEFAULT_Z_MARGIN_MM)}
    for run in runs:
        provider = provider_of(run)
        covered = {name: [0, 0, 0] for name in steerings}  # voxels in ROI, voxels, full cover
        missed = []
        for where, radius, delta, lesion in cases:
            data = np.clip(volume.data.astype(np.int32) + np.where(lesion, delta, 0), -1024, 3071)
            probability = provider.probability(Volume(data=data.astype(np.int16),
                                                      affine=volume.affine,
                                                      spacing=volume.spacing))
            for name, settings in steerings.items():
                inside = int((steer(probability, volume.spacing, settings).roi & lesion).sum())
                total = int(lesion.sum())
                covered[name][0] += inside
                covered[name][1] += total
                covered[name][2] += inside == total
                if name == "default" and inside < total:
                    missed.append(f"{where} r{radius} {delta:+d}: {100 * inside / total:.1f} %")
        summary = "; ".join(f"{name}: lesion voxels in ROI {100 * a / b:.2f} %, lesions fully "
                            f"covered {c}/{len(cases)}" for name, (a, b, c) in covered.items())
        print(f"{scan} {run}: {summary}" + (f"; missed: {', '.join(missed)}" if missed else ""),
              flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "probmaps",
                        help="folder of the cached maps (default runs/probmaps)")
    steps = parser.add_subparsers(dest="step", required=True)
    steps.add_parser("maps", help="cache probability maps").add_argument(
        "runs", nargs="+", help="runs/RUN names, or 'bundled'")
    steps.add_parser("margins", help="recall / ratio table").add_argument(
        "models", nargs="+", help="runs/RUN names, or 'bundled'")
    lesions = steps.add_parser("lesions", help="lesion cover of the ROI")
    lesions.add_argument("scan", choices=sorted(SCANS), help="shared scan to paint lesions in")
    lesions.add_argument("runs", nargs="+", help="runs/RUN names, or 'bundled'")
    args = parser.parse_args(argv)
    missing = [name for pair in SCANS.values() for name in pair if not (DATA / name).exists()]
    if missing:
        parser.error(f"{DATA} lacks {missing}")
    if args.step == "maps":
        cache_maps(args.runs, args.cache)
    elif args.step == "margins":
        margins_table(args.models, args.cache)
    else:
        lesion_study(args.scan, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
