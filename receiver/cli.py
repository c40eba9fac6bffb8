"""``dlad-receive``: rebuild a study from a ``.dlad`` file, or take studies over the network."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from receiver.limits import Limits, parse_networks, parse_size
from receiver.stream import StudyStream
from shared.arguments import OneLineErrorParser
from shared.atomic import set_umask, write_json_atomic
from shared.logs import configure, printable
from shared.nifti import write_nifti
from shared.version import version_text

EXAMPLES = """examples:
  dlad-receive --in study.dlad --out recon.nii.gz
  dlad-receive --in study.dlad --out recon.nii.gz --status status.json
  # network mode: take studies from dlad-send --to over WebRTC, one folder per study
  dlad-receive --listen 127.0.0.1:8700 --token-file token.txt --out-dir received/
  # reachable from other machines: HTTPS, a TURN server for senders behind NAT, limits
  dlad-receive --listen 0.0.0.0:8700 --tls-cert cert.pem --tls-key key.pem \\
      --token-file token.txt --out-dir received/ --ice-server turn:turn.example.org:3478 \\
      --ice-credentials turn.txt --memory-budget 4G --disk-quota 200G --max-sessions 4
  # with the live viewer (http://127.0.0.1:8700/viewer/), DICOM files and a PACS
  dlad-receive --listen 127.0.0.1:8700 --token-file token.txt --out-dir received/ \\
      --viewer --viewer-token-file viewer-token.txt \\
      --dicom-out dicom/ --pacs ORTHANC@pacs.local:4242 --pacs-calling-ae DLAD

exit status (file mode): 0 complete and proven (every ROI block verified against the sender's
digests, or the whole volume against its SHA-256), 1 failed or SHA-256 mismatch, 2 bad
arguments, 3 incomplete, damaged or unproven stream (a block whose ROI fails its digest check
is dropped: partial; a stream without ROI digests and without the exact layer proves nothing);
(network mode): 0 after SIGINT/SIGTERM, 1 cannot start
(see docs/OPERATIONS.md for every limit, TLS, TURN and running behind a reverse proxy)

network mode prints one JSON line on stdout once it listens (its log goes to stderr):
  {"event": "listening", "url": "http://127.0.0.1:8700", "pid": 4242, "out_dir": "received"}
"""
READ_BYTES = 1 << 20
#: Files 0600 and folders 0700 by default: received studies are patient data.
DEFAULT_UMASK = 0o077


def _octal(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal umask: {text!r} (e.g. 077)") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"a umask is between 000 and 777, got {text!r}")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _networks(text: str) -> tuple:
    try:
        return parse_networks(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    defaults = Limits()
    parser = OneLineErrorParser(
        prog="dlad-receive", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Decode a dlad-stream study and write the reassembled volume as NIfTI. "
                    "A truncated or damaged stream still yields the slices that arrived; what "
                    "is missing or was rejected is reported.",
        epilog=EXAMPLES)
    parser.add_argument("--in", dest="input", type=Path,
                        help="the .dlad stream file written by dlad-send --out")
    parser.add_argument("--out", type=Path,
                        help="output NIfTI (.nii or .nii.gz)")
    parser.add_argument("--status", type=Path,
                        help="also write the reassembly status as JSON to this file")
    parser.add_argument("--umask", type=_octal, default=DEFAULT_UMASK, metavar="OCTAL",
                        help="permissions of what is written (default 077: files 0600, "
                             "folders 0700; 027 lets the group read)")
    network = parser.add_argument_group(
        "network mode (instead of --in/--out; see docs/STREAMING.md)")
    network.add_argument("--listen", metavar="HOST:PORT",
                         help="serve WebRTC signaling (POST /studies) on this address")
    network.add_argument("--token-file", type=Path,
                         help="file holding the bearer token senders must present "
                              "(at least 128 bits: openssl rand -hex 32)")
    network.add_argument("--out-dir", type=Path,
                         help="folder that receives one sub-folder per study")
    network.add_argument("--snapshot-interval", type=float, default=2.0, metavar="SECONDS",
                         help="least seconds between two snapshots of a study (NIfTI + "
                              "status.json; milestones always write one; default %(default)s)")
    network.add_argument("--snapshot-format", choices=("nii", "nii.gz"), default="nii",
                         help="snapshot file volume.nii (default: fast) or volume.nii.gz")
    security = parser.add_argument_group("network mode: security (docs/OPERATIONS.md)")
    security.add_argument("--tls-cert", type=Path, metavar="PEM",
                          help="serve HTTPS with this certificate chain (with --tls-key)")
    security.add_argument("--tls-key", type=Path, metavar="PEM",
                          help="private key of --tls-cert")
    security.add_argument("--allow-plain-http", action="store_true",
                          help="serve plain HTTP on an address other than loopback (the token "
                               "travels in clear: only on a network you trust)")
    security.add_argument("--allow-weak-token", action="store_true",
                          help="accept a token of fewer than 128 bits")
    security.add_argument("--allow-peers", type=_networks, metavar="CIDR[,CIDR]",
                          help="send ICE checks only to addresses in these networks (the "
                               "senders', and the TURN server's when senders relay)")
    security.add_argument("--ice-server", action="append", metavar="URL",
                          help="STUN or TURN server (stun:HOST[:PORT], turn:HOST[:PORT]"
                               "[?transport=tcp], turns:HOST[:PORT]); repeatable")
    security.add_argument("--ice-credentials", type=Path, metavar="FILE",
                          help="file holding USERNAME:PASSWORD for the TURN servers")
    security.add_argument("--ice-address", action="append", metavar="ADDR",
                          help="local address to offer as an ICE host candidate (repeatable; "
                               "'*': every interface). Default: 127.0.0.1 alone when "
                               "listening on loopback, every interface otherwise; give '*' "
                               "behind a reverse proxy that forwards to 127.0.0.1")
    limits = parser.add_argument_group("network mode: limits (sizes take K, M, G suffixes)")
    limits.add_argument("--max-sessions", type=int, default=defaults.max_sessions,
                        help="concurrent connections at most (default %(default)s)")
    limits.add_argument("--max-voxels", type=int, default=defaults.max_voxels,
                        help="largest study in voxels (default %(default)s)")
    limits.add_argument("--max-plan-entries", type=int, default=defaults.max_plan_entries,
                        help="most chunks a study may plan (default %(default)s)")
    limits.add_argument("--max-stream-bytes", type=_size, default=defaults.max_stream_bytes,
                        metavar="SIZE", help="largest stream a study may imply (default 4G)")
    limits.add_argument("--memory-budget", type=_size, default=defaults.memory_budget,
                        metavar="SIZE", help="memory for studies and sessions (default 2G)")
    limits.add_argument("--disk-quota", type=_size, metavar="SIZE",
                        help="bytes the out-dir may hold in all (default: no quota)")
    limits.add_argument("--disk-reserve", type=_size, default=defaults.disk_reserve,
                        metavar="SIZE", help="free space kept on the out-dir's disk "
                                             "(default 512M)")
    limits.add_argument("--max-bad-frames", type=int, default=defaults.max_bad_frames,
                        help="bad frames a session may send before it is closed "
                             "(default %(default)s)")
    limits.add_argument("--progress-timeout", type=float, default=defaults.progress_timeout,
                        metavar="SECONDS", help="close a session that brings no new chunk "
                                                "for this long (default %(default)s)")
    limits.add_argument("--header-timeout", type=float, default=defaults.header_timeout,
                        metavar="SECONDS", help="HTTP request heads (and idle keep-alive "
                                                "connections) time out after this "
                                                "(default %(default)s)")
    limits.add_argument("--max-connections", type=int, metavar="N",
                        help="open HTTP connections at most (default: from the open-file "
                             "limit, at most 1024)")
    limits.add_argument("--max-ice-candidates", type=int,
                        default=defaults.max_ice_candidates,
                        help="ICE candidates an offer may list (default %(default)s)")
    expert = parser.add_argument_group(
        "the expert's side (network mode; see docs/VIEWER.md and docs/DICOM.md)")
    expert.add_argument("--viewer", action="store_true",
                        help="serve the live web viewer at /viewer/ on the --listen address")
    expert.add_argument("--viewer-token-file", type=Path,
                        help="file holding the token the viewer's login asks for (not the "
                             "senders' token)")
    expert.add_argument("--dicom-out", type=Path, metavar="DIR",
                        help="write each study as a DICOM CT series (+ ROI segmentation) here: "
                             "a preview once the liver is complete, the exact series once "
                             "verified (needs the [dicom] extra)")
    expert.add_argument("--pacs", metavar="AE@HOST:PORT",
                        help="C-STORE every DICOM series written by --dicom-out to this PACS "
                             "(persistent outbox, retried until stored)")
    expert.add_argument("--pacs-calling-ae", default="DLAD", metavar="TITLE",
                        help="our AE title towards the PACS (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    parser.add_argument("--version", action="version", version=version_text("dlad-receive"))
    return parser


def build_extensions(args, parser) -> list:
    """The receiver service's extensions chosen on the command line (viewer, DICOM, PACS).

    Exits with a one-line error when an option is inconsistent or a needed extra is missing.
    """
    extensions = []
    if args.viewer_token_file is not None and not args.viewer:
        parser.error("--viewer-token-file belongs to --viewer")
    if args.pacs is not None and args.dicom_out is None:
        parser.error("--pacs needs --dicom-out DIR (the files it sends and its outbox live there)")
    if args.viewer:
        from receiver.viewer import LiveViewer, ViewerConfig
        from shared.webrtc.signaling import TokenError, read_token_file

        if args.viewer_token_file is None:
            parser.error("--viewer needs --viewer-token-file (a token of its own)")
        try:
            token = read_token_file(args.viewer_token_file, allow_weak=args.allow_weak_token)
            sender_token = read_token_file(args.token_file, allow_weak=args.allow_weak_token)
        except TokenError as error:
            parser.exit(1, f"dlad-receive: error: {error}\n")
        if token == sender_token:
            parser.exit(1, "dlad-receive: error: the viewer token must differ from the senders' "
                           "token\n")
        try:
            extensions.append(LiveViewer(ViewerConfig(token=token)))
        except ValueError as error:
            parser.exit(1, f"dlad-receive: error: {error}\n")
    if args.dicom_out is not None:
        from receiver.dicom_export import DicomExporter, DicomExportError
        from receiver.pacs import PacsError, PacsPusher, parse_pacs
        from receiver.pacs import require as require_pacs

        try:
            pusher = None
            if args.pacs is not None:
                require_pacs()
                pusher = PacsPusher(parse_pacs(args.pacs, args.pacs_calling_ae), args.dicom_out)
            extensions.append(DicomExporter(args.dicom_out, pusher))
        except (DicomExportError, PacsError, OSError) as error:
            parser.exit(1, f"dlad-receive: error: {error}\n")
    return extensions


def receive_file(source: Path, stream: StudyStream) -> None:
    with open(source, "rb") as handle:
        while data := handle.read(READ_BYTES):
            stream.feed(data)
    stream.finish()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = set_umask(args.umask)
    try:
        return _run(args, parser)
    finally:
        set_umask(previous)  # main() may be called in-process (tests): leave it as it was


def _run(args, parser) -> int:
    if args.listen is not None:
        if args.input is not None or args.out is not None or args.status is not None:
            parser.error("--listen does not combine with --in/--out/--status")
        if args.token_file is None or args.out_dir is None:
            parser.error("--listen needs --token-file and --out-dir")
        return run_listen(args, parser, build_extensions(args, parser))
    if args.input is None or args.out is None:
        parser.error("give --in FILE --out FILE, or --listen HOST:PORT --token-file FILE "
                     "--out-dir DIR")
    if args.token_file is not None or args.out_dir is not None:
        parser.error("--token-file and --out-dir belong to --listen")
    if args.viewer or args.dicom_out is not None or args.pacs is not None:
        parser.error("--viewer, --dicom-out and --pacs belong to --listen")
    configure("dlad-receive: ", logging.ERROR if args.quiet else logging.WARNING, times=False)
    if not str(args.out).lower().endswith((".nii", ".nii.gz")):
        print("dlad-receive: error: --out must end in .nii or .nii.gz", file=sys.stderr)
        return 2
    if not args.input.is_file():
        print(f"dlad-receive: error: input not found: {args.input}", file=sys.stderr)
        return 2
    stream = StudyStream()
    receive_file(args.input, stream)
    status = stream.status()
    if stream.reassembler is None:
        print(f"dlad-receive: error: {args.input} holds no valid dlad-stream header; nothing "
              f"written ({stream.problem_count} problems)", file=sys.stderr)
        return 1
    reassembler = stream.reassembler
    try:
        write_nifti(reassembler.to_volume(), args.out)
        if args.status:
            write_json_atomic(args.status, status)
    except OSError as error:
        print(f"dlad-receive: error: cannot write the output: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(summary(status, args.out))
    if reassembler.verified is False:
        print("dlad-receive: error: the exact volume does not match the sender's SHA-256",
              file=sys.stderr)
        return 1
    proven = status["roi_complete"] or reassembler.verified is True
    return 0 if status["state"] == "complete" and not stream.problem_count and proven else 3


def limits_from_args(args, parser) -> Limits:
    try:
        return Limits(max_sessions=args.max_sessions, max_voxels=args.max_voxels,
                      max_plan_entries=args.max_plan_entries,
                      max_stream_bytes=args.max_stream_bytes, memory_budget=args.memory_budget,
                      disk_quota=args.disk_quota, disk_reserve=args.disk_reserve,
                      max_bad_frames=args.max_bad_frames,
                      progress_timeout=args.progress_timeout,
                      header_timeout=args.header_timeout, body_timeout=args.header_timeout,
                      max_connections=args.max_connections,
                      max_ice_candidates=args.max_ice_candidates, allow_peers=args.allow_peers)
    except ValueError as error:
        parser.error(str(error))


def run_listen(args, parser, listeners=()) -> int:
    """``dlad-receive --listen``: the network mode."""
    from receiver.http import PlainHttpRefused
    from receiver.limits import raise_open_file_limit
    from receiver.service import ServiceConfig, parse_listen, serve
    from receiver.store import StoreError
    from shared.receiver_process import format_ready_line
    from shared.tls import server_tls_context
    from shared.webrtc.ice import IceConfigError, ice_servers
    from shared.webrtc.signaling import TokenError, read_token_file

    configure("dlad-receive: ", logging.ERROR if args.quiet else logging.INFO)
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)
    try:
        host, port = parse_listen(args.listen)
    except ValueError as error:
        parser.error(str(error))
    if args.snapshot_interval < 0:
        parser.error("--snapshot-interval must be >= 0")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    limits = limits_from_args(args, parser)

    def fail(message: str) -> int:
        print(f"dlad-receive: error: {message}", file=sys.stderr)
        return 1

    try:
        token = read_token_file(args.token_file, allow_weak=args.allow_weak_token)
        servers = ice_servers(args.ice_server, args.ice_credentials)
        tls = server_tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    except (TokenError, IceConfigError, ValueError) as error:
        return fail(str(error))
    raise_open_file_limit()
    config = ServiceConfig(out_dir=args.out_dir, token=token, limits=limits,
                           snapshot_interval=args.snapshot_interval,
                           snapshot_format=args.snapshot_format, tls=tls,
                           allow_plain_http=args.allow_plain_http, ice_servers=servers,
                           ice_addresses=tuple(args.ice_address) if args.ice_address else None)

    def announce(service) -> None:
        # The one line on stdout (the log goes to stderr): shared/receiver_process.py reads it.
        print(format_ready_line(service.url, os.getpid(), config.out_dir), flush=True)

    try:
        asyncio.run(serve(config, host, port, ready=announce, listeners=listeners))
    except (StoreError, PlainHttpRefused) as error:
        return fail(str(error))
    except OSError as error:
        return fail(f"cannot listen on {args.listen}: {error}")
    return 0


def summary(status: dict, out: Path) -> str:
    lines = [f"wrote {out}: study {printable(status['study_id'])}, {status['chunks_applied']}/"
             f"{status['chunks_planned']} chunks, {status['bytes_received']} bytes"]
    nz = status["shape"][0]
    if status.get("roi_known") is False:
        roi = ("ROI not received (the header announced it as pending and its ROI frame did "
               "not come): previews only, nothing of the ROI exact")
    elif status["roi_digest_blocks"] or status["roi_complete"]:
        roi = (f"ROI exact (verified against the sender's digests): "
               f"{'yes' if status['roi_complete'] else 'no'} "
               f"({status['roi_exact_slices']}/{nz} slices)")
    else:
        roi = "ROI exact: not verifiable (the stream carries no ROI digests)"
    if status["roi_mismatches"]:
        roi += f"; {status['roi_mismatches']} ROI digest MISMATCH(ES): those chunks were dropped"
    lines.append(f"  base: {status['slices_with_base']}/{nz} slices; {roi}")
    if status["exact_expected"]:
        verified = {True: "whole volume SHA-256 verified", False: "whole volume SHA-256 MISMATCH",
                    None: "not complete, not verified"}
        lines.append(f"  exact layer: {status['exact_layer_slices']}/{nz} slices applied "
                     f"({verified[status['verified_sha256']]})")
    if status.get("source_inserted_slices"):
        inserted = status["source_inserted_slices"]
        lines.append(f"  note: {len(inserted)} slice(s) were missing from the source series and "
                     f"filled by the sender (--allow-gaps): {', '.join(map(str, inserted[:20]))}")
    if status["missing_chunks"]:
        missing = status["missing_chunks"]
        shown = ", ".join(f"#{s} layer {layer} slices {z0}-{z1 - 1}"
                          for s, layer, z0, z1 in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        lines.append(f"  MISSING {len(missing)} chunks: {shown}{more}")
    if status["problem_count"]:
        lines.append(f"  {status['problem_count']} problems (rejected or damaged data):")
        lines.extend(f"    {printable(p)}" for p in status["problems"][:10])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
