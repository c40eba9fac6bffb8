#!/usr/bin/env python
"""The choices behind dlad's ``--exact`` stream, measured (issue 14): size against decoding speed.

For every study of ``scripts/bench_peers.py`` (the shared scans and synthetic ones), the
``--exact`` stream is built by the real encoder and decoded by the real receiver with:

* the shipped settings (blocks of about 2^22 voxels; every base a preview at CRF 30; the ROI
  and the rest as original voxels or residuals, whichever the first block of the kind codes
  smaller; JPEG XL or JPEG-LS, the smaller per chunk);
* one change at a time: 4-slice blocks (the earlier fixed size), the previews at CRF 18 / 36,
  the ROI layer as residuals against the previews (``roi_layer="residual"``), lossless layers
  in JPEG-LS only, or in HTJ2K only (the fastest decoder);
* a lossless HTJ2K stream of the diffused volume with its exact layer (``--codec htj2k
  --exact``): no lossy base at all.

Against the best lossless peer of bench_peers (JPEG XL effort 3 or 7, slice by slice on the
stored values) and HTJ2K's decoding of the same volume. Reported: compression ratio (raw int16
bytes / every stream byte), its ratio to the best peer, bytes to ROI complete (the stream as
sent, up to its last ROI residual), and the receiver's decoding (``StudyStream`` on the whole
stream: parsing, decoding, reassembly, ROI digests, SHA-256) in CPU and wall seconds, medians of
``--repeats`` runs interleaved with the HTJ2K decode. Every stream is checked bit-exact.

Examples:
    python scripts/study_exact.py                                   # every study, 3 repeats
    python scripts/study_exact.py --studies abdomen torso_ct_sm --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peers  # noqa: E402  (the studies and peers of the side-by-side benchmark)

from receiver.stream import StudyStream  # noqa: E402
from sender.encoder import EncodeSettings, StudyEncoder  # noqa: E402
from sender.pipeline import prepare_study  # noqa: E402

SHIPPED = EncodeSettings(exact=True)
VARIANTS = {
    "shipped": SHIPPED,
    "4-slice blocks": replace(SHIPPED, group_slices=4),
    "previews at CRF 18": replace(SHIPPED, preview_crf=18.0),
    "previews at CRF 36": replace(SHIPPED, preview_crf=36.0),
    "ROI layer as residuals": replace(SHIPPED, roi_layer="residual"),
    "residuals JPEG-LS only": replace(SHIPPED, residual_codecs=("jpegls",)),
    "residuals HTJ2K only": replace(SHIPPED, residual_codecs=("htj2k",)),
    "lossless HTJ2K stream": EncodeSettings(codec="htj2k", exact=True),
}


def clocked(function, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def receive(frames: list[bytes]) -> np.ndarray:
    stream = StudyStream()
    stream.feed(b"".join(frames))
    stream.finish()
    if stream.problems or stream.reassembler.verified is not True:
        raise RuntimeError(f"the receiver did not verify the stream: {stream.problems}")
    return stream.reassembler.volume


def bytes_to_roi_complete(frames: list[bytes], roi: np.ndarray) -> int:
    """Stream bytes up to the last chunk the ROI needs as sent: its last ROI residual, or in a
    lossless stream the last base of a block with ROI voxels."""
    from shared.wire import parse_frame

    chunks = [parse_frame(frame) for frame in frames[1:-1]]
    needed = [i for i, c in enumerate(chunks)
              if c.layer == 1 or (c.layer == 0 and not any(d.layer == 1 for d in chunks)
                                  and roi[c.z0:c.z1].any())]
    return sum(len(frame) for frame in frames[:max(needed, default=-1) + 2])


def study_rows(study, repeats: int, log) -> tuple[list[list], dict]:
    import imagecodecs

    prepared = prepare_study(study.volume, study.provider)
    original = study.volume.data
    values = bench_peers.StoredValues.of(study.volume)
    peers = bench_peers.peer_codecs(max(9, values.bits))
    best_peer = min(sum(len(peers[name][0](s)) for s in values.stored)
                    for name in ("JPEG XL effort 7", "JPEG XL effort 3"))
    htj2k = [bytes(imagecodecs.htj2k_encode(s, reversible=True)) for s in values.stored]
    streams = {}
    for name, settings in VARIANTS.items():
        log(f"  encoding: {name}")
        streams[name] = list(StudyEncoder(prepared, settings).frames())
    seconds = {name: ([], []) for name in [*VARIANTS, "HTJ2K peer"]}
    for repeat in range(repeats):
        for name, frames in streams.items():
            decoded, wall, cpu = clocked(receive, frames)
            if repeat == 0 and not np.array_equal(decoded, original):
                raise RuntimeError(f"{study.name} {name}: not bit-exact")
            seconds[name][0].append(cpu)
            seconds[name][1].append(wall)
        _, wall, cpu = clocked(lambda: [imagecodecs.htj2k_decode(p) for p in htj2k])
        seconds["HTJ2K peer"][0].append(cpu)
        seconds["HTJ2K peer"][1].append(wall)
        log(f"  repetition {repeat + 1}/{repeats} done")
    peer_cpu = statistics.median(seconds["HTJ2K peer"][0])
    peer_wall = statistics.median(seconds["HTJ2K peer"][1])
    rows = []
    for name, frames in streams.items():
        size = sum(map(len, frames))
        cpu, wall = (statistics.median(values) for values in seconds[name])
        rows.append([name, f"{original.nbytes / size:.3f}", size, f"{best_peer / size:.3f}",
                     bytes_to_roi_complete(frames, prepared.roi), f"{cpu:.3f}", f"{wall:.3f}",
                     f"{cpu / peer_cpu:.1f}", f"{wall / peer_wall:.1f}"])
    htj2k_size = sum(map(len, htj2k))
    rows.append(["HTJ2K peer (slice by slice)", f"{original.nbytes / htj2k_size:.3f}", htj2k_size,
                 f"{best_peer / htj2k_size:.3f}", "-", f"{peer_cpu:.3f}", f"{peer_wall:.3f}",
                 "1.0", "1.0"])
    return rows, {"best_peer_bytes": best_peer}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("Examples:")[1])
    parser.add_argument("--studies", nargs="+", choices=bench_peers.STUDIES,
                        default=list(bench_peers.STUDIES), help="studies to measure (default: all)")
    parser.add_argument("--synthetic-shape", default="24,256,256",
                        help="nz,ny,nx of the synthetic studies (default 24,256,256)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved decodes (3)")
    args = parser.parse_args(argv)
    shape = tuple(int(n) for n in args.synthetic_shape.split(","))

    def log(message):
        print(message, file=sys.stderr, flush=True)

    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"## The --exact stream: variants (load average {load} at the start)\n")
    headers = ["stream", "CR", "bytes", "/ best peer", "bytes to ROI complete",
               "decode CPU s", "decode wall s", "CPU / HTJ2K", "wall / HTJ2K"]
    for study in bench_peers.load_studies(args.studies, shape):
        log(f"{study.name}: {'x'.join(map(str, study.volume.shape))}")
        rows, facts = study_rows(study, args.repeats, log)
        print(f"### {study.name} ({'x'.join(map(str, study.volume.shape))}; best lossless peer "
              f"{facts['best_peer_bytes']} bytes)\n")
        print(bench_peers.table(headers, rows) + "\n")
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"load average {load} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
