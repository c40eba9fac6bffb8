#!/usr/bin/env python
"""Time the steps between a live series' completion and its ROI (U-Net excluded).

On a synthetic series (the phantom generator, ``--slices`` x 512 x 512 at 0.8 x 0.8 x 1 mm,
as ``scripts/bench_session.py``'s large series) with the phantom's own liver, softened, as
the probability map (0 to 1 over a few millimetres at the edge, so that the uncertainty
margin has something to join):

* ``plausibility``: the anatomical check over the whole series
  (``sender.roi.safety.roi_problem``), as the sender ran it before issue 15's incremental
  check;
* ``plausibility_at_completion``: the same check with the per-slice anatomy measured
  beforehand (``sender.roi.plausibility.anatomy_of_slice`` on each slice with predicted liver,
  what a live sender does as the slices arrive; that part's own cost is ``anatomy_per_slice``,
  spent during the push);
* ``roi``: the ROI of a live session (``steer(..., need_probability=False)``, the U-Net's
  margins);
* ``roi_map``: the ROI with the steering map that diffusion needs.

Wall seconds (``time.perf_counter``), median of ``--repeats`` interleaved runs; one process,
numpy/scipy single-threaded parts and torch's row maxima on one thread.

Example::

    nice -n 10 python scripts/bench_roi_steps.py --slices 300 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python scripts/bench_roi_steps.py "
                                            "--slices 300 --repeats 3")
    parser.add_argument("--slices", type=int, default=300,
                        help="slices of the synthetic series (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per step, median reported (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.slices < 1 or args.repeats < 1:
        parser.error("--slices and --repeats must be positive")

    from scipy.ndimage import gaussian_filter

    from models.phantoms import make_phantom
    from sender.roi import plausibility
    from sender.roi.safety import roi_problem
    from sender.roi.steering import (
        DEFAULT_UNCERTAIN_THRESHOLD,
        DEFAULT_Z_MARGIN_MM,
        SteeringSettings,
        steer,
    )

    print(f"making the {args.slices}-slice series...", flush=True)
    volume, liver = make_phantom((args.slices, 512, 512), (0.8, 0.8, 1.0), seed=7,
                                 noise_hu=12.0)
    probability = gaussian_filter(liver.astype(np.float32), (0, 3, 3))
    settings = SteeringSettings(z_margin_mm=DEFAULT_Z_MARGIN_MM,
                                uncertain_threshold=DEFAULT_UNCERTAIN_THRESHOLD)
    incremental = hasattr(plausibility, "anatomy_of_slice")
    anatomy = {}
    per_slice = None
    if incremental:
        started = time.perf_counter()
        for k in range(volume.shape[0]):
            if (probability[k] > plausibility.LIVER_THRESHOLD).any():
                anatomy[k] = plausibility.anatomy_of_slice(volume.data[k], volume.affine,
                                                           volume.spacing)
        per_slice = (time.perf_counter() - started) / max(1, len(anatomy))
    steps = {
        "plausibility": lambda: roi_problem(probability, volume),
        "roi": lambda: steer(probability, volume.spacing, settings, need_probability=False),
        "roi_map": lambda: steer(probability, volume.spacing, settings),
    }
    if incremental:
        steps["plausibility_at_completion"] = lambda: roi_problem(probability, volume,
                                                                  anatomy=anatomy)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():  # interleaved
            started = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - started)
    result = {name: round(statistics.median(values), 3) for name, values in samples.items()}
    result.update(slices=args.slices, liver_slices=int((probability > 0.5).any(axis=(1, 2)).sum()),
                  anatomy_per_slice=round(per_slice, 4) if per_slice is not None else None)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
