"""``dlad-receive``: rebuild a study from a ``.dlad`` file (network mode: ``--listen``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from receiver.stream import StudyStream
from shared.atomic import write_json_atomic
from shared.nifti import write_nifti

EXAMPLES = """examples:
  dlad-receive --in study.dlad --out recon.nii.gz
  dlad-receive --in study.dlad --out recon.nii.gz --status status.json
  # network mode: take studies from dlad-send --to over WebRTC, one folder per study
  dlad-receive --listen 127.0.0.1:8700 --token-file token.txt --out-dir received/

exit status (file mode): 0 complete, 1 failed or SHA-256 mismatch, 2 bad arguments,
3 incomplete or damaged stream (a block whose ROI fails its digest check is dropped: partial);
(network mode): 0 after SIGINT/SIGTERM, 1 cannot start

network mode prints one JSON line on stdout once it listens (its log goes to stderr):
  {"event": "listening", "url": "http://127.0.0.1:8700", "pid": 4242, "out_dir": "received"}
"""
READ_BYTES = 1 << 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    network = parser.add_argument_group(
        "network mode (instead of --in/--out; see docs/STREAMING.md)")
    network.add_argument("--listen", metavar="HOST:PORT",
                         help="serve WebRTC signaling (POST /studies) on this address")
    network.add_argument("--token-file", type=Path,
                         help="file holding the bearer token senders must present")
    network.add_argument("--out-dir", type=Path,
                         help="folder that receives one sub-folder per study")
    network.add_argument("--snapshot-interval", type=float, default=2.0, metavar="SECONDS",
                         help="least seconds between two snapshots of a study (NIfTI + "
                              "status.json; milestones always write one; default %(default)s)")
    network.add_argument("--snapshot-format", choices=("nii", "nii.gz"), default="nii",
                         help="snapshot file volume.nii (default: fast) or volume.nii.gz")
    network.add_argument("--max-sessions", type=int, default=8,
                         help="concurrent connections at most (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    return parser


def receive_file(source: Path, stream: StudyStream) -> None:
    with open(source, "rb") as handle:
        while data := handle.read(READ_BYTES):
            stream.feed(data)
    stream.finish()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.listen is not None:
        if args.input is not None or args.out is not None or args.status is not None:
            parser.error("--listen does not combine with --in/--out/--status")
        if args.token_file is None or args.out_dir is None:
            parser.error("--listen needs --token-file and --out-dir")
        from receiver.service import run_listen
        return run_listen(args, parser)
    if args.input is None or args.out is None:
        parser.error("give --in FILE --out FILE, or --listen HOST:PORT --token-file FILE "
                     "--out-dir DIR")
    if args.token_file is not None or args.out_dir is not None:
        parser.error("--token-file and --out-dir belong to --listen")
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING,
                        format="dlad-receive: %(message)s")
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
              "written", file=sys.stderr)
        return 1
    reassembler = stream.reassembler
    write_nifti(reassembler.to_volume(), args.out)
    if args.status:
        write_json_atomic(args.status, status)
    if not args.quiet:
        print(summary(status, args.out))
    if reassembler.verified is False:
        print("dlad-receive: error: the exact volume does not match the sender's SHA-256",
              file=sys.stderr)
        return 1
    return 0 if status["state"] == "complete" and not stream.problems else 3


def summary(status: dict, out: Path) -> str:
    lines = [f"wrote {out}: study {status['study_id']}, {status['chunks_applied']}/"
             f"{status['chunks_planned']} chunks, {status['bytes_received']} bytes"]
    nz = status["shape"][0]
    if status["roi_digest_blocks"] or status["roi_complete"]:
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
    if status["problems"]:
        lines.append(f"  {len(status['problems'])} problems (rejected or damaged data):")
        lines.extend(f"    {p}" for p in status["problems"][:10])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
