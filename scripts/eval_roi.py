#!/usr/bin/env python
"""Judge an ROI provider by the liver it keeps: Dice, liver recall in the final ROI, ROI size.

For every scan (a CT and its reference liver mask, aligned through physical space) the
provider's probability map ``p`` is turned into the final ROI exactly as the sender does
(per-slice 15-pixel disc dilation, the margin across slices (``--z-margin-mm``, default 15),
``p > 0.75 -> 1``, holes filled per slice, ROI = ``p == 1``; sender/roi/steering.py) and
compared with the mask ``T``:

* ``Dice``: ``2 |P ∩ T| / (|P| + |T|)`` with ``P = {p > 0.5}``;
* ``recall``: ``|ROI ∩ T| / |T|``, the fraction of liver voxels that reach the receiver
  bit-exact (the safety figure; target >= 99.5 %);
* ``ROI``: the ROI's fraction of the volume; ``truth ROI``: the same for the ROI made from
  ``T`` itself with the paper's in-plane dilation only (a fixed reference); ``ratio``: their
  quotient (target <= 1.6);
* ``plausibility``: the sender's check (sender/roi/safety.py) on ``p``.

Without ``--scan`` the two labelled scans of ``../shared/data`` are used.

Examples:
    python scripts/eval_roi.py                                    # bundled U-Net, shared scans
    python scripts/eval_roi.py --weights runs/fold_a/liver_unet.pt \\
        --scan ../shared/data/torso_ct_sm.nii.gz ../shared/data/torso_ct_sm_liver.nii.gz
    python scripts/eval_roi.py --provider body
    python scripts/eval_roi.py --z-margin-mm 0 --no-fill-holes       # the paper's ROI
    python scripts/eval_roi.py --provider box:-200,20,-250,-100,-800,-760
    python scripts/eval_roi.py --scan ct.nii.gz total_seg.nii.gz --label 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from sender.io import load_volume
from sender.roi.body import BodyProvider
from sender.roi.box import BoxProvider
from sender.roi.mask_file import MaskFileProvider
from sender.roi.safety import check_roi_plausibility, roi_metrics
from sender.roi.steering import DEFAULT_Z_MARGIN_MM, SteeringSettings
from shared.progress import progress

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_SCANS = [("abdomen_ct_dicom", "abdomen_ct_liver.nii.gz"),
                 ("torso_ct_sm.nii.gz", "torso_ct_sm_liver.nii.gz")]
TARGET_RECALL, TARGET_RATIO, TARGET_DICE = 0.995, 1.6, 0.90


def make_provider(spec: str, weights, device, batch_size: int):
    """``unet``, ``body`` or ``box:x0,x1,y0,y1,z0,z1``."""
    if spec == "unet":
        from sender.roi.unet import UNetProvider  # noqa: PLC0415 - torch only when needed
        return UNetProvider(weights=weights, device=device, batch_size=batch_size)
    if spec == "body":
        return BodyProvider()
    if spec.startswith("box:"):
        return BoxProvider.from_spec(spec[len("box:"):])
    raise SystemExit(f"--provider {spec!r}: expected unet, body or box:x0,x1,y0,y1,z0,z1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scan", nargs=2, action="append", metavar=("CT", "MASK"),
                        help="a CT (NIfTI, DICOM folder, NRRD, MHA) and its liver mask "
                             "(repeatable); default: the labelled scans in ../shared/data")
    parser.add_argument("--label", type=int, default=None,
                        help="mask value of the liver (TotalSegmentator: 5); default non-zero")
    parser.add_argument("--provider", default="unet",
                        help="unet (default), body, or box:x0,x1,y0,y1,z0,z1 (RAS+ mm)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="U-Net weights (default: the bundled models/liver_unet.pt)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA if present)")
    parser.add_argument("--batch-size", type=int, default=8, help="U-Net slices per batch (8)")
    parser.add_argument("--z-margin-mm", type=float, default=DEFAULT_Z_MARGIN_MM,
                        help="ROI margin across slices in mm (default %(default)g; 0: the paper)")
    parser.add_argument("--no-fill-holes", action="store_true",
                        help="do not fill the holes of each slice's ROI (the paper)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.label is not None and args.label < 1:
        parser.error(f"--label must be a positive integer, got {args.label}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.scan:
        missing = [name for pair in DEFAULT_SCANS for name in pair
                   if not (SHARED_DATA / name).exists()]
        if missing:
            parser.error(f"no --scan given and {SHARED_DATA} lacks {missing}")
        args.scan = [(str(SHARED_DATA / ct), str(SHARED_DATA / mask)) for ct, mask in DEFAULT_SCANS]
    try:
        args.steering = SteeringSettings(z_margin_mm=args.z_margin_mm,
                                         fill_holes=not args.no_fill_holes)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    provider = make_provider(args.provider, args.weights, args.device, args.batch_size)
    rows = []
    for ct, mask in progress(args.scan, desc="scans", unit="scan"):
        volume = load_volume(ct)
        liver = MaskFileProvider(mask, label=args.label).probability(volume) > 0.5
        began = time.perf_counter()
        probability = provider.probability(volume)
        seconds = time.perf_counter() - began
        metrics = roi_metrics(probability, liver, volume.spacing, args.steering)
        warning = check_roi_plausibility(probability, volume)
        rows.append({"scan": Path(ct).name, "shape": list(volume.shape), **metrics.to_dict(),
                     "seconds": seconds, "plausible": warning is None, "warning": warning})
    header = (f"{'scan':<28} {'Dice':>7} {'recall':>9} {'ROI':>7} {'truth ROI':>10} "
              f"{'ratio':>6} {'time s':>7}  plausible")
    print(f"provider: {json.dumps(provider.describe())}")
    print(f"steering: z margin {args.steering.z_margin_mm:g} mm, holes "
          f"{'filled' if args.steering.fill_holes else 'kept'}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['scan']:<28} {row['dice']:>7.4f} {100 * row['recall']:>8.3f}% "
              f"{100 * row['roi_fraction']:>6.2f}% {100 * row['truth_roi_fraction']:>9.2f}% "
              f"{row['roi_ratio']:>6.2f} {row['seconds']:>7.2f}  "
              f"{'yes' if row['plausible'] else 'NO: ' + row['warning']}")
    print(f"targets: recall >= {100 * TARGET_RECALL:g} %, ratio <= {TARGET_RATIO:g}, "
          f"Dice >= {TARGET_DICE:g}")
    if args.json:
        args.json.write_text(json.dumps({"provider": provider.describe(),
                                         "steering": asdict(args.steering), "scans": rows},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
