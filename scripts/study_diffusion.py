#!/usr/bin/env python
"""What probability-steered diffusion buys, and where it does not (issue 14).

For every study (those of ``scripts/bench_peers.py``), the layered stream is coded with the
quality guard off from the volume diffused with each K of ``--kappas`` and from the undiffused
volume ("K = 0"), at every base CRF of ``--crfs``, through the real encoder and receiver; per
point: bytes of layer 0 (the preview: the whole volume viewable), bytes to ROI complete,
total bytes (layers 0 + 1), and the quality of what the receiver shows outside the ROI: SSIM
(L = 4095) of the whole volume and outside the ROI, and GMSD outside the ROI (Xue et al., 2014;
``shared.metrics.gmsd``) at L = 4095 (strong edges: bone, air) and in the soft-tissue window
W400/L40 (both images clipped to [-160, 240] HU, L = 400: organ boundaries). Outside the ROI
layers 0 and 0 + 1 show the same voxels, so these describe the preview as much as the final view.

From those curves:

* **Equal SSIM**: the bytes of the undiffused stream at the whole-volume SSIM of the diffused
  one, at each CRF of the diffused stream (log-bytes interpolated between the neighbouring
  CRFs of the undiffused curve): ``bytes ratio < 1`` means diffusion saves bytes at equal SSIM.
* **Previews at equal bytes**: GMSD outside the ROI of the undiffused stream at the layer-0
  bytes of the diffused one (interpolated the same way): lower GMSD is better.
* **The default as shipped** (guard on, CRF 18): with and without diffusion.
* **The paper's setting**: every lossless codec of the registry on the diffused and on the
  original volume (single-codec streams: the ROI bit-exact, the rest as diffused).

Examples:
    python scripts/study_diffusion.py                                   # every study
    python scripts/study_diffusion.py --studies abdomen --kappas 10 30 --crfs 18 24 30 36
    python scripts/study_diffusion.py --studies head-phantom --synthetic-shape 4,64,64 --crfs 18 30
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from bench_peers import STUDIES, fast_ssim, load_studies, table

from receiver.stream import StudyStream
from sender.diffusion import DiffusionSettings, diffuse
from sender.encoder import EncodeSettings, PreparedStudy, StudyEncoder
from sender.pipeline import prepare_study
from sender.roi.steering import SteeringSettings
from shared.atomic import write_json_atomic
from shared.codecs import codec_names, get_codec
from shared.metrics import gmsd

#: The soft-tissue window of abdominal CT (W400/L40): where organ boundaries are read.
SOFT_WINDOW = (-160.0, 240.0)


def receive(frames: list[bytes]) -> np.ndarray:
    """The receiver's volume after ``frames`` (the real receiver; no problem tolerated)."""
    receiver = StudyStream()
    receiver.feed(b"".join(frames))
    receiver.finish()
    if receiver.problems:
        raise RuntimeError(f"the receiver reported {receiver.problems}")
    return receiver.reassembler.volume


def measure(prepared: PreparedStudy, settings: EncodeSettings, original, roi) -> dict:
    """One layered stream: bytes and the quality of what the receiver shows."""
    encoder = StudyEncoder(prepared, settings)
    frames = list(encoder.frames())
    body = frames[1:-1]  # one frame per planned chunk, in plan order
    layer1 = [i for i, chunk in enumerate(encoder.plan) if chunk.layer == 1]
    roi_complete = len(frames[0]) + sum(len(f) for f in body[:layer1[-1] + 1]) if layer1 \
        else len(frames[0])
    shown = receive(frames)
    outside = ~roi
    clipped = np.clip(original, *SOFT_WINDOW), np.clip(shown, *SOFT_WINDOW)
    return {
        "preview_bytes": sum(len(f) for f, c in zip(body, encoder.plan) if c.layer == 0),
        "roi_complete_bytes": roi_complete,
        "bytes": sum(map(len, frames)),
        "roi_exact": bool(np.array_equal(shown[roi], original[roi])),
        "ssim": fast_ssim(original, shown),
        "ssim_outside": float(_fast_ssim_masked(original, shown, outside)),
        "gmsd_outside": gmsd(original, shown, 4095, outside),
        "gmsd_soft_outside": gmsd(*clipped, SOFT_WINDOW[1] - SOFT_WINDOW[0], outside),
    }


def _fast_ssim_masked(original, shown, mask):
    from sender.quality import scipy_gaussian_valid
    from shared.metrics import ssim

    return ssim(original, shown, 4095, mask, blur=scipy_gaussian_valid, dtype=np.float32)


def interpolate(x: float, xs, ys, log_y: bool = False) -> float:
    """``y(x)`` on the piecewise-linear curve through ``(xs, ys)``; NaN outside it."""
    order = np.argsort(xs)
    xs, ys = np.asarray(xs, float)[order], np.asarray(ys, float)[order]
    if not xs[0] <= x <= xs[-1]:
        return float("nan")
    values = np.log(ys) if log_y else ys
    y = float(np.interp(x, xs, values))
    return float(np.exp(y)) if log_y else y


def study_one(study, args, log) -> dict:
    volume = study.volume
    original = volume.data
    log(f"{study.name}: {'x'.join(map(str, volume.shape))}, preparing")
    started = time.perf_counter()
    prepared = prepare_study(volume, study.provider, SteeringSettings(), DiffusionSettings(),
                             device="cpu", study_id=f"study-{study.name}")
    roi = prepared.roi
    sources = {0.0: original.copy()}  # K = 0: no diffusion
    probability = None
    for kappa in args.kappas:
        if kappa == DiffusionSettings().kappa:
            sources[kappa] = prepared.diffused
            continue
        if probability is None:
            from sender.roi.steering import steer

            steering = SteeringSettings().for_provider(study.provider)
            probability = steer(study.provider.probability(volume), volume.spacing,
                                steering).probability
        sources[kappa] = diffuse(original, probability, DiffusionSettings(kappa=kappa), "cpu")
    studies = {k: replace(prepared, diffused=d) for k, d in sources.items()}

    curves = {}
    for kappa, source in studies.items():
        curves[kappa] = []
        for crf in args.crfs:
            point = measure(source, EncodeSettings(crf=crf, min_ssim=None), original, roi)
            curves[kappa].append({"crf": crf, **point})
            log(f"  K {kappa:g} CRF {crf:g}: {point['bytes']} B, SSIM {point['ssim']:.5f}, "
                f"GMSD soft {point['gmsd_soft_outside']:.4f}")
    shipped = {kappa: measure(studies[kappa], EncodeSettings(), original, roi)
               for kappa in (0.0, DiffusionSettings().kappa) if kappa in studies}
    shipped_exact = {kappa: measure(studies[kappa], EncodeSettings(exact=True), original, roi)
                     for kappa in shipped}

    # Equal SSIM, and previews at equal bytes, against the undiffused curve.
    plain = curves[0.0]
    comparisons = []
    for kappa in args.kappas:
        for point in curves[kappa]:
            plain_bytes = interpolate(point["ssim"], [p["ssim"] for p in plain],
                                      [p["bytes"] for p in plain], log_y=True)
            plain_roi = interpolate(point["ssim"], [p["ssim"] for p in plain],
                                    [p["roi_complete_bytes"] for p in plain], log_y=True)
            at_bytes = np.log(point["preview_bytes"])
            xs = [np.log(p["preview_bytes"]) for p in plain]
            comparisons.append({
                "kappa": kappa, "crf": point["crf"], "ssim": point["ssim"],
                "bytes_ratio": point["bytes"] / plain_bytes,
                "roi_complete_ratio": point["roi_complete_bytes"] / plain_roi,
                "gmsd_outside": point["gmsd_outside"],
                "plain_gmsd_outside": interpolate(at_bytes, xs, [p["gmsd_outside"] for p in plain]),
                "gmsd_soft_outside": point["gmsd_soft_outside"],
                "plain_gmsd_soft_outside": interpolate(at_bytes, xs,
                                                       [p["gmsd_soft_outside"] for p in plain]),
                "ssim_outside": point["ssim_outside"],
                "plain_ssim_outside": interpolate(at_bytes, xs, [p["ssim_outside"] for p in plain]),
            })

    # The paper's setting: lossless codecs on the diffused volume against the original.
    lossless = {}
    if not args.skip_lossless:
        for name in codec_names():
            if not get_codec(name).lossless:
                continue
            sizes = {}
            for label, source in (("original", studies[0.0]),
                                  ("diffused", studies[DiffusionSettings().kappa])):
                frames = list(StudyEncoder(source, EncodeSettings(codec=name)).frames())
                assert np.array_equal(receive(frames)[roi], original[roi])
                sizes[label] = sum(map(len, frames))
            lossless[name] = sizes
            log(f"  lossless {name}: {sizes['original']} -> {sizes['diffused']} B")
    diffused = studies[DiffusionSettings().kappa].diffused
    log(f"  {time.perf_counter() - started:.0f} s")
    return {"study": study.name, "note": study.note, "shape": list(volume.shape),
            "raw_bytes": original.size * 2, "roi_fraction": float(roi.mean()),
            "curves": {str(k): v for k, v in curves.items()}, "comparisons": comparisons,
            "shipped": {str(k): v for k, v in shipped.items()},
            "shipped_exact": {str(k): v for k, v in shipped_exact.items()}, "lossless": lossless,
            "diffused_ssim": fast_ssim(original, diffused),
            "diffused_gmsd_soft_outside": gmsd(np.clip(original, *SOFT_WINDOW),
                                               np.clip(diffused, *SOFT_WINDOW),
                                               SOFT_WINDOW[1] - SOFT_WINDOW[0], ~roi)}


def report(results: list[dict]) -> str:
    out = []
    default_kappa = DiffusionSettings().kappa
    for r in results:
        out.append(f"### {r['study']}: {'x'.join(map(str, r['shape']))}, {r['note']} "
                   f"(ROI {100 * r['roi_fraction']:.1f} %)\n")
        rows = []
        for kappa, points in r["curves"].items():
            for p in points:
                rows.append([f"{float(kappa):g}", f"{p['crf']:g}", p["preview_bytes"],
                             p["roi_complete_bytes"], p["bytes"],
                             f"{r['raw_bytes'] / p['bytes']:.2f}", f"{p['ssim']:.5f}",
                             f"{p['ssim_outside']:.5f}", f"{p['gmsd_outside']:.4f}",
                             f"{p['gmsd_soft_outside']:.4f}"])
        out.append(table(["K (0: none)", "CRF", "layer 0 bytes", "bytes to ROI complete",
                          "total bytes", "CR", "SSIM", "SSIM outside ROI", "GMSD outside",
                          "GMSD outside, W400"], rows))
        out.append("\nAgainst no diffusion (interpolated on its curve; empty: outside it):\n")
        rows = []
        for c in r["comparisons"]:
            rows.append([f"{c['kappa']:g}", f"{c['crf']:g}", f"{c['ssim']:.5f}",
                         _ratio(c["bytes_ratio"]), _ratio(c["roi_complete_ratio"]),
                         f"{c['gmsd_outside']:.4f} / {_value(c['plain_gmsd_outside'])}",
                         f"{c['gmsd_soft_outside']:.4f} / {_value(c['plain_gmsd_soft_outside'])}",
                         f"{c['ssim_outside']:.5f} / {_value(c['plain_ssim_outside'], 5)}"])
        out.append(table(["K", "CRF", "SSIM", "bytes / no diffusion at equal SSIM",
                          "ROI-complete bytes / no diffusion at equal SSIM",
                          "GMSD outside: K / none at equal layer-0 bytes",
                          "GMSD W400 outside: K / none", "SSIM outside: K / none"], rows))
        shipped = r["shipped"]
        if shipped:
            out.append("\nThe layered modes as shipped (CRF 18, quality guard on):\n")
            rows = []
            for k, p in shipped.items():
                exact = r["shipped_exact"][k]
                rows.append([f"K = {float(k):g}" if float(k) else "none", p["bytes"],
                             p["roi_complete_bytes"], f"{r['raw_bytes'] / p['bytes']:.2f}",
                             f"{p['ssim']:.5f}", f"{p['gmsd_soft_outside']:.4f}",
                             exact["bytes"], f"{r['raw_bytes'] / exact['bytes']:.3f}"])
            out.append(table(["diffusion", "layered bytes", "bytes to ROI complete", "CR", "SSIM",
                              "GMSD outside, W400", "`--exact` bytes", "`--exact` CR"], rows))
        if r["lossless"]:
            out.append(f"\nThe paper's setting: single lossless codec, original vs diffused "
                       f"(K = {default_kappa:g}; the diffused volume's SSIM "
                       f"{r['diffused_ssim']:.5f}, GMSD W400 outside the ROI "
                       f"{r['diffused_gmsd_soft_outside']:.4f}):\n")
            out.append(table(["codec", "CR original", "CR diffused", "gain"],
                             [[name, f"{r['raw_bytes'] / s['original']:.3f}",
                               f"{r['raw_bytes'] / s['diffused']:.3f}",
                               f"{100 * (s['original'] / s['diffused'] - 1):+.1f} %"]
                              for name, s in sorted(r["lossless"].items(),
                                                    key=lambda item: item[1]["original"])]))
        out.append("")
    return "\n".join(out)


def _ratio(value: float) -> str:
    return "" if not np.isfinite(value) else f"{value:.3f}"


def _value(value: float, digits: int = 4) -> str:
    return "" if not np.isfinite(value) else f"{value:.{digits}f}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", nargs="+", choices=STUDIES, default=list(STUDIES),
                        help="studies to measure (default: all)")
    parser.add_argument("--synthetic-shape", default="24,256,256",
                        type=lambda s: tuple(int(v) for v in s.split(",")),
                        help="NZ,NY,NX of the synthetic studies (default 24,256,256)")
    parser.add_argument("--kappas", type=float, nargs="+", default=[DiffusionSettings().kappa],
                        help="diffusion K values (HU) to compare with none (default: the default)")
    parser.add_argument("--crfs", type=float, nargs="+", default=[12, 18, 24, 30, 36],
                        help="base CRFs of the curves (default 12 18 24 30 36)")
    parser.add_argument("--skip-lossless", action="store_true",
                        help="skip the paper's setting (lossless codecs on the diffused volume)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if any(not k > 0 for k in args.kappas):
        parser.error("--kappas must be positive (K = 0, no diffusion, is always included)")
    if any(not 0 <= c <= 51 for c in args.crfs) or len(args.crfs) < 2:
        parser.error("--crfs takes at least two values in [0, 51]")
    if len(args.synthetic_shape) != 3 or min(args.synthetic_shape[1:]) < 64:
        parser.error("--synthetic-shape takes NZ,NY,NX with NY, NX >= 64")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.crfs = sorted(args.crfs)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) \
        if Path("/proc/loadavg").exists() else "n/a"
    results = [study_one(study, args, log)
               for study in load_studies(args.studies, args.synthetic_shape)]
    print(f"## What diffusion buys\n\nload average before: {load}; quality guard off for the "
          f"curves; SSIM L = 4095; GMSD at L = 4095 and in W400/L40\n")
    print(report(results))
    if args.json:
        write_json_atomic(args.json, {"studies": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
