"""``dlad-send``: load a CT, steer diffusion by the liver ROI, encode ROI-first, write or stream."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import sys
import time
from pathlib import Path

from sender.dicom import DicomOptions
from sender.diffusion import DiffusionSettings
from sender.encoder import LAYERED, ROI_LAYER_CHOICES, EncodeSettings, StudyEncoder
from sender.pipeline import PHANTOM, default_diffusion
from sender.roi.steering import DEFAULT_Z_MARGIN_MM, SteeringSettings
from sender.transport import StreamOptions
from shared.arguments import OneLineErrorParser
from shared.atomic import atomic_path
from shared.codecs import codec_names, get_codec
from shared.logs import configure
from shared.progress import progress
from shared.version import version_text
from shared.volume import VolumeError

EXAMPLES = """examples:
  # built-in synthetic abdominal phantom (its own liver mask), no data needed
  dlad-send phantom --out demo.dlad
  # no mask: the bundled liver U-Net finds the ROI
  dlad-send ../shared/data/abdomen_ct_dicom --out study.dlad
  # DICOM series with a liver mask (aligned through physical space), default layered mode
  dlad-send ../shared/data/abdomen_ct_dicom --roi-mask ../shared/data/abdomen_ct_liver.nii.gz \\
      --out study.dlad
  # a folder with several series: choose one (the error lists them with their UIDs)
  dlad-send dicom_folder/ --series-uid 1.2.840.113619.2.55.3.1234 --out study.dlad
  # multi-label TotalSegmentator mask (label 5 = liver), plus the exact layer
  dlad-send ct.nii.gz --roi-mask total.nii.gz --roi-label 5 --exact --out study.dlad
  # paper-style: one lossless codec on the diffused volume (ROI bit-exact; diffusion on)
  dlad-send ct.nii.gz --roi-mask liver.nii.gz --codec hevc-lossless --out study.dlad
  # layered with the paper's diffusion anyway (off by default in the layered modes)
  dlad-send ct.nii.gz --roi-mask liver.nii.gz --iterations 15 --out study.dlad
  # stream to a receiver (dlad-receive --listen) over WebRTC, resuming after drops
  dlad-send ct.nii.gz --roi-mask liver.nii.gz --exact --to http://127.0.0.1:8700 \\
      --token-file token.txt
  # to a receiver on another network: HTTPS (its certificate checked) and a TURN relay
  dlad-send ct.nii.gz --exact --to https://expert.example.org:8700 --token-file token.txt \\
      --ca-file hospital-ca.pem --ice-server turn:turn.example.org:3478 \\
      --ice-credentials turn.txt
  # live session: a DICOM node (AE title DLAD, port 11112) the scanner pushes each series to;
  # every complete series is streamed over one warm connection (docs/LIVE.md); only the CT
  # room's scanner (its address and calling AE title) may push
  dlad-send --dicom-listen 0.0.0.0:11112 --ae-title DLAD --to https://expert.example:8700 \\
      --ca-file hospital-ca.pem --token-file token.txt --deidentify \\
      --dicom-allow-hosts 10.20.0.15 --dicom-allow-ae CT_ROOM3
  # live session from a folder the scanner exports into (files taken once finished)
  dlad-send --watch /srv/ct-export --to http://127.0.0.1:8700 --token-file token.txt

exit status: 0 ok, 1 failed (bad input, nothing written; refused by the receiver; the sender
extra missing), 2 bad arguments, 3 (--to) not delivered completely: run it again to resume
"""

log = logging.getLogger("dlad.sender")

#: The module each distribution of pyproject's ``sender`` extra provides, those that encoding
#: imports (a receiver-only install has none of them; it can still replay a recorded .dlad).
#: The extra's live-session packages (pynetdicom, inotify_simple) serve --dicom-listen/--watch.
SENDER_EXTRA_MODULES = {"torch": "torch", "itk-io": "itk", "scipy": "scipy", "pydicom": "pydicom",
                        "pylibjpeg": "pylibjpeg", "pylibjpeg-openjpeg": "openjpeg",
                        "pylibjpeg-libjpeg": "libjpeg", "pylibjpeg-rle": "rle",
                        "pyjpegls": "jpeg_ls"}


class MissingExtra(RuntimeError):
    """Encoding needs the sender extra, and this installation lacks part of it."""


def check_sender_extra() -> None:
    """Raise :class:`MissingExtra` (one line: what to install) if a module is missing."""
    missing = [module for module in SENDER_EXTRA_MODULES.values()
               if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtra(f"encoding a study needs the sender extra (missing here: "
                           f"{', '.join(missing)}): pip install torch==2.13.0 "
                           "'dlad-stream[sender]' (a recorded .dlad replays without it)")


def codec_list(known: list[str]):
    """argparse type: comma-separated codec names, each one of ``known``."""
    def parse(text: str) -> list[str]:
        names = [name for name in text.split(",") if name]
        unknown = [name for name in names if name not in known]
        if not names or unknown or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(
                f"expected distinct codecs from {', '.join(known)}, got {text!r}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    lossless = [n for n in codec_names() if get_codec(n).lossless]
    parser = OneLineErrorParser(
        prog="dlad-send", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compress a CT volume for teleintervention: the liver ROI arrives "
                    "bit-exact first, the rest follows (lossy base, optional exact layer).",
        epilog=EXAMPLES)
    parser.add_argument("input", nargs="?",
                        help="NIfTI file, DICOM series folder, NRRD/MHA file, or "
                             f"'{PHANTOM}' for the built-in synthetic phantom (none with "
                             "--dicom-listen or --watch)")
    where = parser.add_argument_group("output")
    target = where.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path,
                        help="write the stream to this .dlad file")
    target.add_argument("--to", metavar="URL",
                        help="stream to a dlad-receive --listen at http://HOST:PORT over WebRTC "
                             "(INPUT may also be a .dlad file written by --out)")
    where.add_argument("--token-file", type=Path,
                       help="with --to: file holding the receiver's bearer token")
    where.add_argument("--retries", type=int, default=StreamOptions.retries,
                       help="with --to: reconnections after a lost connection, each resuming "
                            "where the receiver is (default %(default)s)")
    where.add_argument("--max-rate", type=float, metavar="MBIT_S",
                       help="with --to: cap the sending rate (Mbit/s)")
    where.add_argument("--ca-file", type=Path, metavar="PEM",
                       help="with --to https://: certificate authorities that may sign the "
                            "receiver's certificate (default: the system's store)")
    where.add_argument("--allow-plain-http", action="store_true",
                       help="with --to http:// to another machine: send the token in clear "
                            "(only on a network you trust)")
    where.add_argument("--ice-server", action="append", metavar="URL",
                       help="with --to: STUN or TURN server (stun:HOST[:PORT], "
                            "turn:HOST[:PORT][?transport=tcp], turns:HOST[:PORT]); repeatable")
    where.add_argument("--ice-credentials", type=Path, metavar="FILE",
                       help="with --to: file holding USERNAME:PASSWORD for the TURN servers")
    where.add_argument("--drop-after", type=int, metavar="N", help=argparse.SUPPRESS)
    where.add_argument("--study-id", help="study id in the stream (default: input name + hash)")
    dicom = parser.add_argument_group("DICOM input (a folder of one series)")
    dicom.add_argument("--series-uid", metavar="UID",
                       help="read this SeriesInstanceUID when the folder holds several series "
                            "('' for the images without one); without it such a folder is "
                            "refused with the list of its series")
    dicom.add_argument("--allow-gaps", action="store_true",
                       help="fill missing slices (a gap of whole slice spacings) with the "
                            "volume's lowest value at their own positions instead of refusing "
                            "the series; the other slices keep their positions (never resampled)")
    dicom.add_argument("--skip-unreadable", action="store_true",
                       help="leave out files of the folder that are not readable DICOM (named "
                            "in a warning) instead of refusing the series")
    live = parser.add_argument_group(
        "live session: series from the scanner, streamed as they complete (with --to)")
    live.add_argument("--dicom-listen", metavar="HOST:PORT",
                      help="run a DICOM node (C-STORE SCP for CT images, C-ECHO) on this "
                           "address; the scanner or PACS pushes series to it")
    live.add_argument("--dicom-allow-hosts", metavar="CIDR[,CIDR]",
                      help="hosts that may push to the DICOM node (addresses or networks; "
                           "default: any); others are closed before any DICOM is read")
    live.add_argument("--dicom-allow-ae", metavar="AE[,AE]",
                      help="calling AE titles accepted by the DICOM node (default: any); "
                           "others are rejected in the association")
    live.add_argument("--dicom-tls-cert", type=Path, metavar="PEM",
                      help="serve DICOM over TLS (TLS 1.2+) with this certificate chain "
                           "(with --dicom-tls-key)")
    live.add_argument("--dicom-tls-key", type=Path, metavar="PEM",
                      help="private key of --dicom-tls-cert")
    live.add_argument("--dicom-tls-ca", type=Path, metavar="PEM",
                      help="with --dicom-tls-cert: accept only peers with a certificate this CA "
                           "signed (mutual TLS)")
    live.add_argument("--ae-title", default="DLAD",
                      help="AE title of the DICOM node (default %(default)s)")
    live.add_argument("--watch", type=Path, metavar="DIR",
                      help="take the DICOM files that appear in this folder (and its "
                           "sub-folders), once their writer has finished them")
    live.add_argument("--watch-settle", type=float, default=2.0, metavar="SECONDS",
                      help="with --watch, where inotify cannot tell that a file is closed: "
                           "seconds its size must stay unchanged (default %(default)s)")
    live.add_argument("--series-timeout", type=float, default=5.0, metavar="SECONDS",
                      help="a series is complete when none of its instances arrived for this "
                           "long (default %(default)s)")
    live.add_argument("--series-count", type=int, metavar="N",
                      help="... or as soon as it holds N instances")
    live.add_argument("--spool", type=Path, default=Path("dlad-spool"), metavar="DIR",
                      help="where received instances are kept until the receiver confirmed "
                           "their series (default ./%(default)s)")
    live.add_argument("--deidentify", action="store_true",
                      help="replace identifying DICOM attributes in the stream by stable "
                           "pseudonyms (keyed hash; docs/LIVE.md says which); also for a DICOM "
                           "folder INPUT")
    live.add_argument("--deidentify-key", type=Path, metavar="FILE",
                      help="site secret of --deidentify (default: SPOOL/deidentify.key, made "
                           "at first use)")
    live.add_argument("--session-log", type=Path, metavar="FILE",
                      help="append one JSON line per series (outcome, timings, bytes)")
    roi = parser.add_argument_group("region of interest (sent bit-exact)")
    roi.add_argument("--roi", metavar="unet|body|box:x0,x1,y0,y1,z0,z1",
                     help="automatic ROI when no --roi-mask is given: 'unet' (default: the "
                          "bundled liver U-Net), 'body' (everything inside the body), or "
                          "'box:...' (a RAS+ box in mm)")
    roi.add_argument("--roi-mask", type=Path,
                     help="segmentation file (NIfTI/NRRD/MHA) aligned to the CT in physical space")
    roi.add_argument("--roi-label", type=int,
                     help="use voxels with this label of --roi-mask (default: any non-zero)")
    roi.add_argument("--allow-partial-mask", action="store_true",
                     help="accept a --roi-mask whose field of view leaves part of the CT's "
                          "tissue uncovered (refused otherwise): the uncovered part is sent "
                          "bit-exact, with a warning")
    steering = SteeringSettings()
    roi.add_argument("--dilation-px", type=float, default=steering.dilation_radius_px,
                     help="per-slice disc dilation radius in pixels (default %(default)g: the "
                          "paper's 30x30x1 disc)")
    roi.add_argument("--dilation-mm", type=float,
                     help="dilation radius in mm instead of pixels")
    roi.add_argument("--threshold", type=float, default=steering.threshold,
                     help="after dilation p := 1 where p > threshold (default %(default)g)")
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
    diffusion.add_argument("--iterations", type=int, default=None,
                           help="explicit steps; 0 = off (default: off in the layered modes, "
                                f"where it saves no bytes at equal quality; {defaults.iterations} "
                                "with one lossless --codec, the paper's setting, where it pays; "
                                "docs/BENCHMARKS.md)")
    diffusion.add_argument("--diffusion", choices=("2d", "3d"), default=defaults.mode,
                           help="per-slice 2D as in the paper, or 3D")
    diffusion.add_argument("--device", choices=("cpu", "cuda"),
                           help="torch device (default: cuda when available)")
    coding = parser.add_argument_group("coding")
    encode_defaults = EncodeSettings()
    coding.add_argument("--codec", default=encode_defaults.codec, choices=[LAYERED] + lossless,
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
    coding.add_argument("--residual-codec", type=codec_list(lossless), metavar="CODEC[,CODEC...]",
                        help="lossless codecs of the residual layers; each chunk is sent with the "
                             "one that codes it smallest (default "
                             f"{','.join(encode_defaults.residual_codecs)}; in a live session "
                             f"{','.join(LIVE_RESIDUAL_CODECS)}, see docs/LIVE.md; htj2k decodes "
                             f"fastest; known: {', '.join(lossless)})")
    coding.add_argument("--group-slices", type=int, default=encode_defaults.group_slices,
                        help="slices per chunk (default: about 2^22 voxels a chunk, 4 to 32 "
                             "slices)")
    coding.add_argument("--preview-crf", type=float, default=encode_defaults.preview_crf,
                        help="with --exact: x265 CRF of the bases, which "
                             "are only previews there (default %(default)g)")
    coding.add_argument("--roi-layer", choices=ROI_LAYER_CHOICES, default=encode_defaults.roi_layer,
                        help="the ROI layer: a residual against the base, the ROI's original "
                             "voxels (no base needed before it), or whichever codes smaller on "
                             "the block with the most ROI voxels (default %(default)s)")
    coding.add_argument("--min-ssim", type=float, default=encode_defaults.min_ssim,
                        help="quality guard: re-code base blocks whose SSIM (L=4095) after the "
                             "ROI layer is below this (default %(default)s; 0 = off; not with "
                             "--exact, where the base is a stage on the way to the exact volume)")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    parser.add_argument("--version", action="version", version=version_text("dlad-send"))
    # What a recorded stream fixed when it was encoded: a replay (INPUT.dlad --to) refuses them.
    parser.encoding_options = frozenset(
        {action.dest for group in (dicom, roi, diffusion, coding)
         for action in group._group_actions}
        | {"study_id"})
    return parser


#: Residual codecs of a live session unless --residual-codec says otherwise: trying JPEG XL
#: as well (the file default) costs the sender 6x the encoding CPU (0.31 against 0.052 s per
#: 512 x 512 slice with --exact) for 3.6 % fewer bytes (4.6 % before ROI complete), i.e. 0.09 s
#: of a 2 Mbit/s link against seconds of a 2-core sender's time per series (docs/LIVE.md).
LIVE_RESIDUAL_CODECS = ("jpegls",)


def settings_from_args(args, live: bool = False):
    """The steering, diffusion and encoding settings the options ask for (``live``: the
    defaults of a live session)."""
    steering = SteeringSettings(dilation_radius_px=args.dilation_px,
                                dilation_radius_mm=args.dilation_mm, threshold=args.threshold,
                                z_margin_mm=args.z_margin_mm)
    encode = EncodeSettings(codec=args.codec, exact=args.exact,
                            crf=None if args.qp is not None else args.crf, qp=args.qp,
                            preset=args.preset,
                            residual_codecs=tuple(args.residual_codec) if args.residual_codec
                            else LIVE_RESIDUAL_CODECS if live
                            else EncodeSettings().residual_codecs,
                            group_slices=args.group_slices, preview_crf=args.preview_crf,
                            roi_layer=args.roi_layer,
                            min_ssim=args.min_ssim or None)
    iterations = default_diffusion(encode).iterations if args.iterations is None \
        else args.iterations
    diffusion = DiffusionSettings(kappa=args.kappa, iterations=iterations, mode=args.diffusion)
    return steering, diffusion, encode


def check_encoding_args(args):
    """What the options ask of the encoder, checked before any input is read:
    ``(roi, steering, diffusion, encode)``.

    Raises:
        VolumeError: the input or the ``--roi-mask`` file does not exist.
        MissingExtra: the sender extra is not installed.
        ValueError: an option value makes no sense (a bad ``box:`` spec, ``--device cuda``
            on a machine without CUDA, a threshold out of range...).
    """
    if str(args.input) != PHANTOM and not Path(args.input).exists():
        raise VolumeError(f"input not found: {args.input}")
    check_sender_extra()
    from sender.pipeline import RoiChoice

    roi = RoiChoice(spec=args.roi, mask=args.roi_mask, label=args.roi_label,
                    allow_small=args.allow_small_roi, allow_partial_mask=args.allow_partial_mask)
    steering, diffusion, encode = settings_from_args(args)
    if args.device is not None:
        from models.device import resolve_device

        resolve_device(args.device)
    return roi, steering, diffusion, encode


def encoder_from_args(args) -> StudyEncoder:
    """Load, segment, diffuse as the options say: a ready StudyEncoder."""
    from sender.pipeline import build_encoder

    roi, steering, diffusion, encode = check_encoding_args(args)
    dicom = DicomOptions(series_uid=args.series_uid, allow_gaps=args.allow_gaps,
                         skip_unreadable=args.skip_unreadable)
    return build_encoder(args.input, roi, steering, diffusion, encode, device=args.device,
                         study_id=args.study_id, dicom=dicom, deidentifier=deidentifier_from_args(args))


def deidentifier_from_args(args):
    """The --deidentify key's Deidentifier (None without --deidentify)."""
    from sender.dicom_attributes import Deidentifier

    if args.deidentify_key is not None and not args.deidentify:
        raise ValueError("--deidentify-key belongs to --deidentify")
    if not args.deidentify:
        return None
    return Deidentifier.from_key_file(args.deidentify_key or args.spool / "deidentify.key",
                                      create=args.deidentify_key is None)


def checked_encoding_args(args, parser) -> int | None:
    """:func:`check_encoding_args` for the command line: an exit status on failure (1 for
    what is missing, 2 for a bad value, one line each), None when all is well."""
    try:
        check_encoding_args(args)
    except (MissingExtra, VolumeError) as error:
        print(f"dlad-send: error: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        parser.error(str(error))
    return None


def explicit_options(parser: argparse.ArgumentParser, argv: list[str],
                     args: argparse.Namespace) -> set[str]:
    """The destinations of the options ``argv`` gives, whatever their values (a default
    given explicitly counts): parsed again over a namespace pre-filled with a marker, which
    argparse leaves wherever an option is absent."""
    class Unset(list):  # a list: an 'append' option copies it before appending
        pass

    marker = Unset()
    probe = argparse.Namespace(**{dest: marker for dest in vars(args)})
    parser.parse_args(argv, namespace=probe)
    return {dest for dest, value in vars(probe).items() if value is not marker}


def write_stream(encoder: StudyEncoder, path: Path, quiet: bool) -> int:
    """Encode into ``path`` atomically; return the bytes written."""
    written = 0
    with atomic_path(path) as temporary, open(temporary, "wb") as out, progress(
            total=len(encoder.plan) + 2, unit="frame", desc="encoding", disable=quiet,
            file=sys.stderr, logger=log) as bar:
        for data in encoder.frames():
            out.write(data)
            written += len(data)
            bar.update()
    return written


def check_connection_options(parser: argparse.ArgumentParser, args) -> None:
    """The options of a connection to a receiver (``--to`` and the live modes), checked before
    anything is loaded; a bad one is a usage error (exit 2)."""
    from sender.transport import check_url

    if args.retries < 0:
        parser.error("--retries must be >= 0")
    if args.max_rate is not None and args.max_rate <= 0:
        parser.error("--max-rate must be > 0")
    try:
        check_url(args.to, args.allow_plain_http)
    except ValueError as error:
        parser.error(str(error))


def main_to(args, parser, argv: list[str]) -> int:
    """``dlad-send INPUT --to URL``: the network mode."""
    from sender.transport import (
        EncoderSource,
        FileSource,
        Refused,
        TransportError,
        process_started,
        stream_study,
    )
    from shared.webrtc.ice import IceConfigError, ice_servers
    from shared.webrtc.signaling import TokenError, read_token_file

    started = process_started()
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)
    if args.token_file is None:
        parser.error("--to needs --token-file")
    check_connection_options(parser, args)
    replay = str(args.input).lower().endswith(".dlad")
    if replay:
        fixed = sorted(explicit_options(parser, argv, args) & parser.encoding_options)
        if fixed:
            options = ", ".join("--" + dest.replace("_", "-") for dest in fixed)
            parser.error(f"{args.input} is a recorded stream, replayed as it was encoded: "
                         f"{options} cannot apply (encode the original input to change them)")
    else:
        status = checked_encoding_args(args, parser)
        if status is not None:
            return status
    try:
        token = read_token_file(args.token_file, role="sender")
        servers = ice_servers(args.ice_server, args.ice_credentials)
    except (TokenError, IceConfigError) as error:
        print(f"dlad-send: error: {error}", file=sys.stderr)
        return 1
    try:
        if replay:
            source = FileSource(Path(args.input))
            log.info("replaying %s: study %s, %d chunks", args.input, source.study_id,
                     len(source.order))
        else:
            source = EncoderSource(encoder_from_args(args))
    except (VolumeError, ValueError, OSError) as error:
        print(f"dlad-send: error: {error}", file=sys.stderr)
        return 1
    options = StreamOptions(retries=args.retries, quiet=args.quiet,
                            drop_after_chunks=args.drop_after,
                            max_rate=args.max_rate * 1e6 if args.max_rate else None,
                            ca_file=str(args.ca_file) if args.ca_file else None,
                            allow_plain_http=args.allow_plain_http, ice_servers=servers)
    try:
        result = asyncio.run(stream_study(source, args.to, token, options, started))
    except Refused as error:
        print(f"dlad-send: error: {error}", file=sys.stderr)
        return 1
    except (TransportError, ValueError) as error:
        print(f"dlad-send: error: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("dlad-send: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if not args.quiet:
        m = result.milestones
        roi = f"{m['roi_complete']:.2f} s" if "roi_complete" in m else "before this run"
        verified = {True: ", SHA-256 verified by the receiver",
                    False: ", SHA-256 MISMATCH at the receiver", None: ""}[result.verified]
        print(f"sent study {source.study_id} to {args.to} (folder {result.folder}): "
              f"{result.chunks_sent} chunks, {result.bytes_sent} bytes in "
              f"{result.attempts} connection(s), {result.chunks_skipped} already there"
              + (f", {result.chunks_resumed} there on reconnecting" if result.attempts > 1
                 else "") + "; "
              f"transfer {result.transfer_s:.2f} s ({result.goodput_mbit_s:.1f} Mbit/s); "
              f"ROI complete {roi}, complete at {time.monotonic() - started:.2f} s since start"
              f"{verified}")
    if result.verified is False:
        return 1
    return 0 if result.complete else 3


def parse_host_port(value: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{option} must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def main_live(args, parser) -> int:
    """``dlad-send --dicom-listen/--watch --to URL``: the live session."""
    from sender.live import LIVE_GIL_SWITCH_INTERVAL_S, LiveSender
    from sender.pipeline import RoiChoice, SeriesPipeline
    from sender.spool import Spool, SpoolError
    from sender.transport import Refused, StreamOptions
    from shared.webrtc.ice import IceConfigError, ice_servers
    from shared.webrtc.signaling import TokenError, read_token_file

    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    if args.input is not None:
        parser.error("--dicom-listen and --watch take no INPUT")
    if args.to is None or args.token_file is None:
        parser.error("--dicom-listen and --watch need --to URL and --token-file")
    if args.series_count is not None and args.series_count < 1:
        parser.error("--series-count must be >= 1")
    if not args.series_timeout > 0 or not args.watch_settle > 0:
        parser.error("--series-timeout and --watch-settle must be > 0")
    check_connection_options(parser, args)
    listen = allow_hosts = allow_calling_ae = tls = None
    tls_options = (args.dicom_tls_cert, args.dicom_tls_key, args.dicom_tls_ca)
    if args.dicom_listen is not None:
        from sender.dicom_node import check_ae_title, parse_ae_titles, parse_hosts

        try:
            listen = parse_host_port(args.dicom_listen, "--dicom-listen")
            check_ae_title(args.ae_title)
            if args.dicom_allow_hosts is not None:
                allow_hosts = parse_hosts(args.dicom_allow_hosts)
            if args.dicom_allow_ae is not None:
                allow_calling_ae = parse_ae_titles(args.dicom_allow_ae)
        except ValueError as error:
            parser.error(str(error))
        if (args.dicom_tls_cert is None) != (args.dicom_tls_key is None):
            parser.error("--dicom-tls-cert and --dicom-tls-key go together")
        if args.dicom_tls_ca is not None and args.dicom_tls_cert is None:
            parser.error("--dicom-tls-ca belongs to --dicom-tls-cert")
    elif (args.dicom_allow_hosts is not None or args.dicom_allow_ae is not None
          or any(option is not None for option in tls_options)):
        parser.error("--dicom-allow-hosts, --dicom-allow-ae and --dicom-tls-* belong to "
                     "--dicom-listen")
    if args.dicom_tls_cert is not None:
        from shared.tls import server_tls_context

        try:
            tls = server_tls_context(*tls_options, options=("--dicom-tls-cert", "--dicom-tls-key",
                                                            "--dicom-tls-ca"))
        except ValueError as error:
            print(f"dlad-send: error: {error}", file=sys.stderr)
            return 1
    try:
        token = read_token_file(args.token_file, role="sender")
        servers = ice_servers(args.ice_server, args.ice_credentials)
        spool = Spool(args.spool)
        deidentifier = deidentifier_from_args(args)
        steering, diffusion, encode = settings_from_args(args, live=True)
        roi = RoiChoice(spec=args.roi, mask=args.roi_mask, label=args.roi_label,
                        allow_small=args.allow_small_roi)
        pipeline = SeriesPipeline(roi, steering, diffusion, encode, device=args.device,
                                  deidentifier=deidentifier, spool=spool)
    except (TokenError, IceConfigError, SpoolError, VolumeError, ValueError, OSError) as error:
        print(f"dlad-send: error: {error}", file=sys.stderr)
        return 1
    options = StreamOptions(retries=args.retries, quiet=True,
                            max_rate=args.max_rate * 1e6 if args.max_rate else None,
                            ca_file=str(args.ca_file) if args.ca_file else None,
                            allow_plain_http=args.allow_plain_http, ice_servers=servers)
    try:
        sender = LiveSender(pipeline, spool, args.to, token, options, listen=listen,
                            ae_title=args.ae_title, watch=args.watch, settle=args.watch_settle,
                            series_timeout=args.series_timeout, series_count=args.series_count,
                            session_log=args.session_log, allow_hosts=allow_hosts,
                            allow_calling_ae=allow_calling_ae, dicom_tls=tls)
    except ValueError as error:
        print(f"dlad-send: error: {error}", file=sys.stderr)
        return 1

    async def run() -> None:
        import signal

        # The U-Net workers must not wait for the GIL behind the event loop (see the constant).
        sys.setswitchinterval(LIVE_GIL_SWITCH_INTERVAL_S)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        try:
            await sender.start()
        except BaseException:
            await sender.stop()
            raise
        log.info("live session ready: series go to %s", args.to)
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            await sender.stop()

    try:
        asyncio.run(run())
    except (Refused, OSError) as error:
        print(f"dlad-send: error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    configure("dlad-send: ", logging.ERROR if args.quiet else logging.INFO, times=False)
    if args.dicom_listen is not None or args.watch is not None:
        return main_live(args, parser)
    if args.input is None:
        parser.error("give an INPUT (or --dicom-listen / --watch for a live session)")
    for option in ("series_count", "session_log", "dicom_allow_hosts", "dicom_allow_ae",
                   "dicom_tls_cert", "dicom_tls_key", "dicom_tls_ca"):
        if getattr(args, option) is not None:
            parser.error(f"--{option.replace('_', '-')} belongs to --dicom-listen / --watch")
    if args.to is not None:
        return main_to(args, parser, argv)
    if args.token_file is not None or args.drop_after is not None:
        parser.error("--token-file belongs to --to")
    status = checked_encoding_args(args, parser)
    if status is not None:
        return status
    try:
        encoder = encoder_from_args(args)
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
