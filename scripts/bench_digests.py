"""What the ROI digests cost: stream bytes, sender time, receiver time (issue 11).

For each volume of ../shared/data with a liver mask, the study is prepared once (ROI, diffusion),
then encoded and received ``--runs`` times with the digests and as many times without them,
interleaved (A B A B ...), and the medians compared:

* bytes: the ``roi_digests`` field of the header against the whole stream;
* sender: ``StudyEncoder`` construction + every frame (the digests are computed in the
  constructor) with and without :meth:`StudyEncoder._roi_digests`, and the seconds of that
  method alone (the cost, measured directly: a difference of two noisy totals says less);
* receiver: ``StudyStream`` on the whole stream, with the header's digests (every block checked)
  and with them removed (nothing checked, the pre-issue-11 receiver), and the seconds spent in
  the checks (``Reassembler._verify_roi``) alone.

    python scripts/bench_digests.py --runs 5            # results as a Markdown table
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from receiver.reassembly import Reassembler  # noqa: E402
from receiver.stream import StudyStream  # noqa: E402
from sender.encoder import EncodeSettings, StudyEncoder  # noqa: E402
from sender.io import load_volume  # noqa: E402
from sender.pipeline import prepare_study  # noqa: E402
from sender.roi.mask_file import MaskFileProvider  # noqa: E402
from shared.wire import parse_frame  # noqa: E402

VOLUMES = {
    "abdomen 20x512x512": ("abdomen_ct_dicom", "abdomen_ct_liver.nii.gz"),
    "torso_sm 30x101x122": ("torso_ct_sm.nii.gz", "torso_ct_sm_liver.nii.gz"),
}


def encode(prepared, settings, digests: bool) -> tuple[float, list[bytes]]:
    started = time.perf_counter()
    if digests:
        encoder = StudyEncoder(prepared, settings)
    else:
        original = StudyEncoder._roi_digests
        StudyEncoder._roi_digests = lambda self: []
        try:
            encoder = StudyEncoder(prepared, settings)
        finally:
            StudyEncoder._roi_digests = original
    frames = list(encoder.frames())
    return time.perf_counter() - started, frames


def receive(frames: list[bytes]) -> tuple[float, float]:
    """Seconds to receive the whole stream, and of those, seconds in the ROI digest checks."""
    spent = [0.0]
    original = Reassembler._verify_roi

    def timed_verify(self, z0, z1):
        started = time.perf_counter()
        original(self, z0, z1)
        spent[0] += time.perf_counter() - started

    Reassembler._verify_roi = timed_verify
    try:
        started = time.perf_counter()
        stream = StudyStream()
        for data in frames:
            stream.feed(data)
        stream.finish()
        seconds = time.perf_counter() - started
    finally:
        Reassembler._verify_roi = original
    assert stream.reassembler.complete and not stream.problems
    return seconds, spent[0]


def digest_seconds(prepared, settings) -> float:
    """Seconds the sender spends computing the digests (the constructor's _roi_digests)."""
    encoder = StudyEncoder(prepared, settings)
    started = time.perf_counter()
    encoder._roi_digests()
    return time.perf_counter() - started


def without_digests(frames: list[bytes]) -> list[bytes]:
    header = parse_frame(frames[0])
    header.roi_digests = []
    return [header.to_frame()] + frames[1:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per variant (default 5)")
    args = parser.parse_args(argv)
    rows = []
    for name, (ct, mask) in VOLUMES.items():
        volume = load_volume(DATA / ct)
        prepared = prepare_study(volume, MaskFileProvider(DATA / mask))
        for label, settings in (("layered", EncodeSettings()),
                                ("layered --exact", EncodeSettings(exact=True))):
            send = {True: [], False: []}
            recv = {True: [], False: []}
            checks, digesting = [], []
            frames = None
            for _ in range(args.runs):
                for digests in (True, False):
                    seconds, made = encode(prepared, settings, digests)
                    send[digests].append(seconds)
                    if digests:
                        frames = made
                digesting.append(digest_seconds(prepared, settings))
            bare = without_digests(frames)
            for _ in range(args.runs):
                seconds, checking = receive(frames)
                recv[True].append(seconds)
                checks.append(checking)
                recv[False].append(receive(bare)[0])
            header = parse_frame(frames[0])
            digest_bytes = len(frames[0]) - len(bare[0])
            total = sum(map(len, frames))
            med = {key: statistics.median(v) for key, v in (("send1", send[True]),
                                                             ("send0", send[False]),
                                                             ("recv1", recv[True]),
                                                             ("recv0", recv[False]))}
            digest_s, check_s = statistics.median(digesting), statistics.median(checks)
            rows.append(
                f"| {name} | {label} | {len(header.roi_digests)} | {digest_bytes} | {total} | "
                f"{100 * digest_bytes / total:.3f} % | {med['send0']:.3f} | {med['send1']:.3f} | "
                f"{1000 * digest_s:.1f} ({100 * digest_s / med['send0']:.2f} %) | "
                f"{med['recv0']:.3f} | {med['recv1']:.3f} | "
                f"{1000 * check_s:.1f} ({100 * check_s / med['recv0']:.2f} %) |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("| volume | mode | digests | digest bytes | stream bytes | share of the stream | "
          "sender s (without) | sender s (with) | sender: digests ms (share) | "
          "receiver s (without) | receiver s (with) | receiver: checks ms (share) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nload average {os.getloadavg()[0]:.2f}, medians of {args.runs} interleaved runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
