"""``dlad-send``: load a CT, steer diffusion by the liver ROI, encode ROI-first, write or stream."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from sender.diffusion import DiffusionSettings
from sender.encoder import LAYERED, EncodeSettings, StudyEncoder
from sender.roi.steering import DEFAULT_Z_MARGIN_MM, SteeringSettings
from shared.atomic import atomic_path
from shared.codecs import codec_names, get_codec
from shared.volume import VolumeError

PHANTOM = "phantom"
EXAMPLES = """examples:
  # built-in synthetic abdominal phantom (its own liver mask), no data needed
  dlad-send phantom --out demo.dlad
  # no mask: the bundled liver U-Net finds the ROI
  dlad-send ../shared/data/abdomen_ct_dicom --out study.dlad
  # DICOM series with a liver mask (aligned through physical space), default layered mode
  dlad-send ../shared/data/abdomen_ct_dicom --roi-mask ../shared/data/abdomen_ct_liver.nii.gz \\
      --out study.dlad
  # multi-label TotalSegmentator mask (label 5 = liver), plus the exact layer
  dlad-send ct.nii.gz --roi-mask total.nii.gz --roi-label 5 --exact --out study.dlad
  # paper-style: one lossless codec on the diffused volume (ROI bit-exact)
  dlad-send ct.nii.gz --roi-mask liver.nii.gz --codec hevc-lossless --out study.dlad
  # stream to a receiver (dlad-receive --listen) over WebRTC, resuming after drops
  dlad-send ct.nii.gz --roi-mask liver.nii.gz --exact --to http://127.0.0.1:8700 \\
      --token-file token.txt

exit status: 0 ok, 1 failed (bad input, nothing written; refused by the receiver),
2 bad arguments, 3 (--to) not delivered completely: run it again to resume
"""

log = logging.getLogger("dlad.sender")


def build_parser() -> argparse.ArgumentParser:
    lossless = [n for n in codec_names() if get_codec(n).lossless]
    parser = argparse.ArgumentParser(
        prog="dlad-send", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compress a CT volume for teleintervention: the liver ROI arrives "
                    "bit-exact first, the rest follows (lossy base, optional exact layer).",
        epilog=EXAMPLES)
    parser.add_argument("input", help="NIfTI file, DICOM series folder, NRRD/MHA file, or "
                                      f"'{PHANTOM}' for the built-in synthetic phantom")
    where = parser.add_argument_group("output")
    target = where.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path,
                        help="write the stream to this .dlad file")
    target.add_argument("--to", metavar="URL",
                        help="stream to a dlad-receive --listen at http://HOST:PORT over WebRTC "
                             "(INPUT may also be a .dlad file written by --out)")
    where.add_argument("--token-file", type=Path,
                       help="with --to: file holding the receiver's bearer token")
    where.add_argument("--retries", type=int, default=5,
                       help="with --to: reconnections after a lost connection, each resuming "
                            "where the receiver is (default %(default)s)")
    where.add_argument("--max-rate", type=float, metavar="MBIT_S",
                       help="with --to: cap the sending rate (Mbit/s)")
    where.add_argument("--drop-after", type=int, metavar="N", help=argparse.SUPPRESS)
    where.add_argument("--study-id", help="study id in the stream (default: input name + hash)")
    roi = parser.add_argument_group("region of interest (sent bit-exact)")
    roi.add_argument("--roi", metavar="unet|body|box:x0,x1,y0,y1,z0,z1",
                     help="automatic ROI when no --roi-mask is given: 'unet' (default: the "
                          "bundled liver U-Net), 'body' (everything inside the body), or "
                          "'box:...' (a RAS+ box in mm)")
    roi.add_argument("--roi-mask", type=Path,
                     help="segmentation file (NIfTI/NRRD/MHA) aligned to the CT in physical space")
    roi.add_argument("--roi-label", type=int,
                     help="use voxels with this label of --roi-mask (default: any non-zero)")
    roi.add_argument("--dilation-px", type=float, default=15.0,
                     help="per-slice disc dilation radius in pixels (default 15: the paper's "
                          "30x30x1 disc)")
    roi.add_argument("--dilation-mm", type=float,
                     help="dilation radius in mm instead of pixels")
    roi.add_argument("--threshold", type=float, default=0.75,
                     help="after dilation p := 1 where p > threshold (default 0.75)")
    roi.add_argument("--z-margin-mm", type=float, default=None,
                     help="safety margin across slices: each slice's ROI also takes that of "
                          f"the slices within this many mm (default: {DEFAULT_Z_MARGIN_MM:g} "
                          "for the U-Net's ROI, 0 for --roi-mask, body and box; 0 = in-plane "
                          "only, as the paper)")
    roi.add_argument("--allow-small-roi", action="store_true",
                     help="keep a U-Net liver that looks empty or implausibly small instead of "
                          "the safe fallback (no diffusion, whole volume bit-exact)")
    diffusion = parser.add_argument_group("probability-steered diffusion")
    defaults = DiffusionSettings()
    diffusion.add_argument("--kappa", type=float, default=defaults.kappa,
                           help=f"edge threshold K in HU (default {defaults.kappa:g})")
    diffusion.add_argument("--iterations", type=int, default=defaults.iterations,
                           help=f"explicit steps (default {defaults.iterations}; 0 = off)")
    diffusion.add_argument("--diffusion", choices=("2d", "3d"), default=defaults.mode,
                           help="per-slice 2D as in the paper, or 3D")
    diffusion.add_argument("--device", choices=("cpu", "cuda"),
                           help="torch device (default: cuda when available)")
    coding = parser.add_argument_group("coding")
    encode_defaults = EncodeSettings()
    coding.add_argument("--codec", default=LAYERED, choices=[LAYERED] + lossless,
                        help="'layered' (lossy HEVC base + lossless ROI residual; default) or "
                             "one lossless codec applied to the diffused volume")
    coding.add_argument("--exact", action="store_true",
                        help="add the exact layer: the whole volume arrives bit-exact")
    rate = coding.add_mutually_exclusive_group()
    rate.add_argument("--crf", type=float, default=encode_defaults.crf,
                      help=f"x265 CRF of the lossy base (default {encode_defaults.crf:g})")
    rate.add_argument("--qp", type=int, help="x265 fixed QP of the lossy base instead of CRF")
    coding.add_argument("--preset", default=encode_defaults.preset,
                        help="x265 preset (default %(default)s)")
    coding.add_argument("--residual-codec", default=encode_defaults.residual_codec,
                        choices=lossless, help="codec of the residual layers (default %(default)s)")
    coding.add_argument("--group-slices", type=int, default=encode_defaults.group_slices,
                        help="slices per chunk (default %(default)s)")
    coding.add_argument("--min-ssim", type=float, default=encode_defaults.min_ssim,
                        help="quality guard: re-code base blocks whose SSIM (L=4095) after the "
                             "ROI layer is below this (default %(default)s; 0 = off)")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    return parser


def make_provider(args, phantom_mask=None):
    """The ROI provider the arguments ask for."""
    from sender.roi.mask_file import MaskFileProvider
    from sender.roi.provider import StaticMaskProvider

    if args.roi_mask is not None:
        if args.roi is not None:
            raise ValueError("give either --roi-mask or --roi, not both")
        return MaskFileProvider(args.roi_mask, args.roi_label)
    if args.roi_label is not None:
        raise ValueError("--roi-label needs --roi-mask")
    if args.roi is None and phantom_mask is not None:
        return StaticMaskProvider(phantom_mask, "synthetic phantom liver")
    spec = args.roi or "unet"
    if spec == "unet":
        from sender.roi.unet import UNetProvider
        return UNetProvider(device=args.device)
    if spec == "body":
        from sender.roi.body import BodyProvider
        return BodyProvider()
    if spec.startswith("box:"):
        from sender.roi.box import BoxProvider
        return BoxProvider.from_spec(spec.removeprefix("box:"))
    raise ValueError(f"--roi must be 'unet', 'body' or 'box:x0,x1,y0,y1,z0,z1', got {spec!r}")


def safety_check(allow_small_roi: bool):
    """The U-Net's plausibility check: warn, and fall back to the safe policy unless allowed."""
    from sender.roi.safety import FALLBACK_ADVICE, fallback_probability, roi_problem

    def check(probability, volume):
        problem = roi_problem(probability, volume)
        if problem is None:
            return probability
        if allow_small_roi:
            log.warning("%s -- kept because of --allow-small-roi", problem)
            return probability
        log.warning("%s; %s", problem, FALLBACK_ADVICE)
        return fallback_probability(volume)

    return check


def settings_from_args(args):
    steering = SteeringSettings(dilation_radius_px=args.dilation_px,
                                dilation_radius_mm=args.dilation_mm, threshold=args.threshold,
                                z_margin_mm=args.z_margin_mm)
    diffusion = DiffusionSettings(kappa=args.kappa, iterations=args.iterations,
                                  mode=args.diffusion)
    encode = EncodeSettings(codec=args.codec, exact=args.exact,
                            crf=None if args.qp is not None else args.crf, qp=args.qp,
                            preset=args.preset, residual_codec=args.residual_codec,
                            group_slices=args.group_slices, min_ssim=args.min_ssim or None)
    return steering, diffusion, encode


def build_encoder(args) -> StudyEncoder:
    """Load, segment, diffuse: everything up to a ready StudyEncoder."""
    from sender.io import load_volume
    from sender.pipeline import prepare_study
    from sender.synthetic_phantom import make_phantom

    steering, diffusion, encode = settings_from_args(args)
    started = time.perf_counter()
    phantom_mask = None
    if args.input == PHANTOM:
        volume, phantom_mask = make_phantom()
    else:
        volume = load_volume(args.input)
    log.info("loaded %s: %s voxels, spacing %s mm, %s in %.1f s", volume.description,
             "x".join(map(str, volume.shape)), tuple(round(s, 3) for s in volume.spacing),
             volume.source_dtype, time.perf_counter() - started)
    provider = make_provider(args, phantom_mask)
    automatic = provider.name == "unet"
    prepared = prepare_study(volume, provider, steering, diffusion, device=args.device,
                             study_id=args.study_id,
                             roi_check=safety_check(args.allow_small_roi) if automatic else None)
    return StudyEncoder(prepared, encode)


def write_stream(encoder: StudyEncoder, path: Path, quiet: bool) -> int:
    """Encode into ``path`` atomically; return the bytes written."""
    written = 0
    with atomic_path(path) as temporary, open(temporary, "wb") as out, tqdm(
            total=len(encoder.plan) + 2, unit="chunk", desc="encoding", disable=quiet,
            file=sys.stderr) as progress:
        for data in encoder.frames():
            out.write(data)
            written += len(data)
            progress.update()
    return written


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO,
                        format="dlad-send: %(message)s")
    if args.to is not None:
        from sender.transport import main_to
        return main_to(args, parser)
    if args.token_file is not None or args.drop_after is not None:
        parser.error("--token-file belongs to --to")
    try:
        encoder = build_encoder(args)
    except (VolumeError, ValueError, OSError) as error:
        print(f"dlad-send: error: {error}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    written = write_stream(encoder, args.out, args.quiet)
    raw = encoder.study.volume.nbytes_int16
    if not args.quiet:
        print(f"wrote {args.out}: {written} bytes, CR {raw / written:.2f} "
              f"(raw int16 {raw} bytes), ROI {100 * encoder.study.roi.mean():.1f} % of voxels, "
              f"{len(encoder.plan)} chunks in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
