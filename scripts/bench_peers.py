#!/usr/bin/env python
"""dlad-stream against the field's codecs, side by side in one run (issue 14).

For every study (the scans of ``../shared/data`` and synthetic scans unlike them):

* **Lossless.** dlad's streams, built by the real encoder (``EncodeSettings``,
  ``StudyEncoder``) and decoded by the real receiver (``StudyStream``): every lossless codec of
  the registry as a single-codec stream of the original (the best is "dlad best single"), the
  ``--exact`` stream and the layered default (each with the diffusion ``dlad-send`` gives its
  mode, :func:`sender.pipeline.default_diffusion`); against JPEG XL (effort 3 and 7), JPEG 2000,
  HTJ2K, CharLS JPEG-LS and zstd through imagecodecs, slice by slice on the stored values, as
  a DICOM file stores CT: unsigned, ``stored = HU - intercept`` (the series' own intercept for
  DICOM, -1024 otherwise, lower when the scan has lower values) with the stored bit depth
  declared where the codec takes it (JPEG XL, JPEG 2000; CharLS and OpenJPH through
  imagecodecs declare 16 bits). Compression ratio = raw int16 bytes / bytes: every byte of a
  dlad stream (header with the plan and packed ROI included), the codestreams of the peers
  (no DICOM or container overhead). Every result is checked bit-exact.
* **Time.** Encode and decode of each case, wall and CPU seconds (process CPU time, all
  threads; imagecodecs runs single-threaded), medians of ``--repeats`` runs interleaved: each
  repetition runs every case once, in turn. "Receiver decode" of a dlad stream is
  ``StudyStream.feed`` + ``finish`` on the whole stream (parsing, decoding, reassembly, SHA-256).
* **Layered against a peer's layered scheme at equal SSIM.** dlad's layered default (layers
  0 + 1: the ROI bit-exact, the rest lossy) against "JPEG XL lossy + lossless JPEG XL ROI
  residual": JPEG XL (effort 7) at the largest distance whose reconstruction, with the ROI made
  exact, reaches dlad's whole-volume SSIM (L = 4095), found by bisection; the ROI residual
  (original - lossy inside the ROI, 0 outside, offset to unsigned per slice) coded losslessly
  by JPEG XL effort 7. Bytes to ROI complete: dlad's stream up to its last ROI chunk; the
  peer's lossy slices that hold ROI voxels plus their residuals.

SSIM: ``shared.metrics.ssim`` (11x11 Gaussian, per slice, L = 4095) with SciPy's filter in
float32 (within 1e-4 of the float64 reference), for both sides alike.

Examples:
    python scripts/bench_peers.py                                   # every study, 3 repeats
    python scripts/bench_peers.py --studies abdomen --repeats 5 --json peers.json
    python scripts/bench_peers.py --studies head-phantom low-dose-phantom --synthetic-shape 8,128,128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from receiver.stream import StudyStream
from sender.encoder import LAYERED, EncodeSettings, PreparedStudy, StudyEncoder
from sender.pipeline import default_diffusion, prepare_study
from sender.quality import scipy_gaussian_valid
from sender.roi.provider import ProbabilityProvider, StaticMaskProvider
from sender.roi.steering import SteeringSettings
from shared.atomic import write_json_atomic
from shared.codecs import codec_names, get_codec
from shared.metrics import ssim
from shared.volume import Volume
from shared.wire import parse_frame

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STUDIES = ("abdomen", "torso_ct_sm", "torso_ct_3mm", "head-phantom", "low-dose-phantom")
#: Slices of torso_ct_3mm that are torso_ct_sm (the data README): its labels go there by index.
TORSO_SM_IN_3MM = slice(82, 112)
#: Quantum noise of the low-dose phantom (HU): about 3x a routine abdominal scan's.
LOW_DOSE_NOISE_HU = 60.0
#: JPEG XL distance range of the equal-SSIM search (libjxl accepts 0.01-25).
JXL_DISTANCES = (0.01, 25.0)
SSIM_RANGE = 4095.0


def table(headers, rows) -> str:
    """A GitHub-markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fast_ssim(reference: np.ndarray, test: np.ndarray) -> float:
    return ssim(reference, test, SSIM_RANGE, blur=scipy_gaussian_valid, dtype=np.float32)


# --------------------------------------------------------------------------- studies


@dataclass
class Study:
    """One benchmark scan and where its ROI comes from."""

    name: str
    volume: Volume
    provider: ProbabilityProvider
    note: str


def load_studies(names, synthetic_shape) -> list[Study]:
    """The studies of ``names`` (see :data:`STUDIES`)."""
    from models.phantoms import make_head_phantom, make_phantom
    from sender.io import load_volume
    from sender.roi.mask_file import MaskFileProvider

    def data(name):
        path = DATA / name
        if not path.exists():
            raise SystemExit(f"bench_peers: {path} not found (the shared data folder)")
        return path

    nz, ny, nx = synthetic_shape
    studies = []
    for name in names:
        if name == "abdomen":
            volume = load_volume(data("abdomen_ct_dicom"))
            studies.append(Study(name, volume, MaskFileProvider(data("abdomen_ct_liver.nii.gz")),
                                 "DICOM, liver mask aligned through the affines"))
        elif name == "torso_ct_sm":
            volume = load_volume(data("torso_ct_sm.nii.gz"))
            studies.append(Study(name, volume, MaskFileProvider(data("torso_ct_sm_liver.nii.gz")),
                                 "NIfTI int16, liver mask"))
        elif name == "torso_ct_3mm":
            volume = load_volume(data("torso_ct_3mm.nii.gz"))
            small = MaskFileProvider(data("torso_ct_sm_liver.nii.gz")).probability(
                load_volume(data("torso_ct_sm.nii.gz")))
            mask = np.zeros(volume.shape, bool)
            mask[TORSO_SM_IN_3MM] = small > 0.5
            studies.append(Study(name, volume, StaticMaskProvider(mask, "torso_ct_sm liver by index"),
                                 "NIfTI int32, liver of torso_ct_sm on slices 82-111 by index"))
        elif name == "head-phantom":
            volume, target = make_head_phantom((nz, ny, nx), spacing=(230 / nx, 230 / ny, 5.0),
                                               seed=7)
            studies.append(Study(name, volume, StaticMaskProvider(target, "lesion + 10 mm"),
                                 "synthetic head CT (skull, low noise), target lesion ROI"))
        elif name == "low-dose-phantom":
            volume, liver = make_phantom((nz, ny, nx), spacing=(400 / nx, 400 / ny, 2.5), seed=11,
                                         noise_hu=LOW_DOSE_NOISE_HU)
            studies.append(Study(name, volume, StaticMaskProvider(liver, "phantom liver"),
                                 f"synthetic abdomen, {LOW_DOSE_NOISE_HU:g} HU noise (low dose)"))
        else:
            raise ValueError(f"unknown study {name!r}")
    return studies


@dataclass(frozen=True)
class StoredValues:
    """The volume as a DICOM file stores it: ``HU = stored + intercept``."""

    stored: np.ndarray
    """uint16, slice-major."""
    intercept: int
    bits: int
    """Bits stored: the bit length of the largest stored value (at least 8)."""

    @classmethod
    def of(cls, volume: Volume) -> StoredValues:
        hu = volume.data.astype(np.int32)
        if volume.rescale_slope == 1 and volume.source_dtype.startswith("uint"):
            intercept = int(volume.rescale_intercept)  # the series' own (DICOM)
        else:
            intercept = -1024
        intercept = min(intercept, int(hu.min()))
        stored = hu - intercept
        if stored.max() > 65535:
            raise ValueError(f"{volume.description}: values span more than 16 bits")
        return cls(stored.astype(np.uint16), intercept, max(8, int(stored.max()).bit_length()))

    def to_hu(self, stored: np.ndarray) -> np.ndarray:
        return (stored.astype(np.int32) + self.intercept).astype(np.int16)


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One way of coding a study: encode() -> payload, decode(payload) -> int16 HU volume."""

    name: str
    encode: Callable[[], object]
    decode: Callable[[object], np.ndarray]
    size: Callable[[object], int]
    lossless: bool = True
    seconds: dict = field(default_factory=lambda: {"encode wall": [], "encode cpu": [],
                                                   "decode wall": [], "decode cpu": []})
    payload: object = None
    decoded: np.ndarray | None = None

    def median(self, key: str) -> float:
        return statistics.median(self.seconds[key])


def clocked(function, *args):
    """``(result, wall s, CPU s)``: CPU time of the whole process (all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def jpegxl_encode(image: np.ndarray, bits: int, **options) -> bytes:
    """JPEG XL of a uint16 image of ``bits``-bit values (declared as such). libjxl refuses
    16-bit samples declared as 8-bit ones, so those go as uint8."""
    import imagecodecs as ic

    if bits <= 8:
        return bytes(ic.jpegxl_encode(image.astype(np.uint8), numthreads=1, **options))
    return bytes(ic.jpegxl_encode(image, bitspersample=bits, numthreads=1, **options))


def peer_codecs(bits: int) -> dict[str, tuple[Callable, Callable]]:
    """Name -> (encode one uint16 slice, decode it) of each peer, through imagecodecs."""
    import imagecodecs as ic

    return {
        "JPEG XL effort 7": (lambda s: jpegxl_encode(s, bits, lossless=True, effort=7),
                             lambda b: ic.jpegxl_decode(b, numthreads=1)),
        "JPEG XL effort 3": (lambda s: jpegxl_encode(s, bits, lossless=True, effort=3),
                             lambda b: ic.jpegxl_decode(b, numthreads=1)),
        "JPEG 2000": (lambda s: ic.jpeg2k_encode(s, level=0, codecformat="J2K",
                                                 bitspersample=bits, numthreads=1),
                      lambda b: ic.jpeg2k_decode(b, numthreads=1)),
        "HTJ2K": (lambda s: ic.htj2k_encode(s, reversible=True), ic.htj2k_decode),
        "CharLS JPEG-LS": (ic.jpegls_encode, ic.jpegls_decode),
        "zstd 19": (lambda s: ic.zstd_encode(s.tobytes(), level=19),
                    lambda b: np.frombuffer(ic.zstd_decode(b), np.uint16)),
    }


def peer_case(name: str, codec, values: StoredValues) -> Case:
    encode_slice, decode_slice = codec
    shape = values.stored.shape

    def decode(payloads):
        stored = np.empty(shape, np.uint16)
        for k, payload in enumerate(payloads):
            stored[k] = np.asarray(decode_slice(payload)).reshape(shape[1:])
        return values.to_hu(stored)

    return Case(name, lambda: [bytes(encode_slice(s)) for s in values.stored], decode,
                lambda payloads: sum(len(p) for p in payloads))


def dlad_case(name: str, prepared: PreparedStudy, settings: EncodeSettings) -> Case:
    def encode():
        encoder = StudyEncoder(prepared, settings)
        return encoder.plan, list(encoder.frames())

    def decode(payload):
        receiver = StudyStream()
        receiver.feed(b"".join(payload[1]))
        receiver.finish()
        if receiver.problems:
            raise RuntimeError(f"{name}: the receiver reported {receiver.problems}")
        return receiver.reassembler.volume

    return Case(name, encode, decode, lambda payload: sum(map(len, payload[1])),
                lossless=settings.exact or settings.codec != LAYERED)


def bytes_to_roi_complete(frames) -> int:
    """Bytes of a layered stream up to its last ROI-residual chunk as sent (header included;
    just the header when the study has no ROI). The frames' own order: the sender may send a
    chunk elsewhere than the plan says."""
    layers = [parse_frame(frame).layer for frame in frames[1:-1]]
    last = max((i for i, layer in enumerate(layers) if layer == 1), default=-1)
    return sum(len(frame) for frame in frames[:last + 2])


def run_interleaved(cases: list[Case], repeats: int, log) -> None:
    for repeat in range(repeats):
        for case in cases:
            payload, wall, cpu = clocked(case.encode)
            case.seconds["encode wall"].append(wall)
            case.seconds["encode cpu"].append(cpu)
            decoded, wall, cpu = clocked(case.decode, payload)
            case.seconds["decode wall"].append(wall)
            case.seconds["decode cpu"].append(cpu)
            if repeat == 0:
                case.payload, case.decoded = payload, decoded
        log(f"  repetition {repeat + 1}/{repeats} done")


# --------------------------------------------------------------------------- equal SSIM


def jxl_lossy_with_roi_residual(values: StoredValues, original: np.ndarray, roi: np.ndarray,
                                target_ssim: float, log):
    """The peer's layered scheme at the largest JPEG XL distance reaching ``target_ssim``."""
    import imagecodecs as ic

    def lossy(distance):
        payloads = [jpegxl_encode(s, values.bits, distance=distance, effort=7)
                    for s in values.stored]
        stored = np.stack([np.asarray(ic.jpegxl_decode(p, numthreads=1)).reshape(s.shape)
                           for p, s in zip(payloads, values.stored)])
        view = np.where(roi, original, values.to_hu(stored))
        return payloads, stored, fast_ssim(original, view)

    low, high = np.log(JXL_DISTANCES[0]), np.log(JXL_DISTANCES[1])
    best = None
    result = lossy(np.exp(high))
    if result[2] >= target_ssim:
        best = (np.exp(high), *result)
    else:
        for _ in range(12):  # the distance to within 0.2 % of the crossing
            middle = (low + high) / 2
            result = lossy(np.exp(middle))
            if result[2] >= target_ssim:
                low, best = middle, (np.exp(middle), *result)
            else:
                high = middle
        if best is None:
            best = (np.exp(low), *lossy(np.exp(low)))
    distance, payloads, stored, quality = best
    log(f"  JPEG XL lossy: distance {distance:.3f}, SSIM {quality:.5f} (target {target_ssim:.5f})")
    residual_bytes = []
    for k in range(len(payloads)):
        if not roi[k].any():
            residual_bytes.append(0)
            continue
        residual = np.where(roi[k], values.stored[k].astype(np.int32) - stored[k], 0)
        offset = int(residual.min())
        shifted = (residual - offset).astype(np.uint16)
        bits = max(1, int(shifted.max()).bit_length())
        coded = jpegxl_encode(shifted, bits, lossless=True, effort=7)
        check = np.asarray(ic.jpegxl_decode(coded, numthreads=1)).reshape(shifted.shape)
        assert np.array_equal(check, shifted), "JPEG XL residual is not lossless"
        residual_bytes.append(len(coded) + 4)  # + the offset and bit depth
    lossy_bytes = [len(p) for p in payloads]
    with_roi = roi.reshape(roi.shape[0], -1).any(axis=1)
    return {"distance": distance, "ssim": quality, "lossy_bytes": sum(lossy_bytes),
            "residual_bytes": sum(residual_bytes),
            "total_bytes": sum(lossy_bytes) + sum(residual_bytes),
            "roi_complete_bytes": int(sum(b for b, r in zip(lossy_bytes, with_roi) if r)
                                      + sum(residual_bytes))}


# --------------------------------------------------------------------------- per study


def bench_study(study: Study, args, log) -> dict:
    volume = study.volume
    original = volume.data
    raw = original.size * 2
    log(f"{study.name}: {'x'.join(map(str, volume.shape))} voxels, preparing (ROI, diffusion)")
    streams = {"dlad --exact": EncodeSettings(exact=True),
               "dlad layered default": EncodeSettings()}
    prepared = {}  # each stream gets the diffusion of its mode, as dlad-send does
    for settings in streams.values():
        diffusion = default_diffusion(settings)
        if diffusion not in prepared:
            prepared[diffusion] = prepare_study(volume, study.provider, SteeringSettings(),
                                                diffusion, device="cpu",
                                                study_id=f"bench-{study.name}")
    first = next(iter(prepared.values()))
    roi = first.roi
    undiffused = PreparedStudy(volume, roi, original.copy(), f"bench-{study.name}-original",
                               sha256=first.sha256)
    values = StoredValues.of(volume)
    assert np.array_equal(values.to_hu(values.stored), original)

    # Every lossless codec of the registry as a single-codec stream of the original.
    singles = {}
    for name in codec_names():
        if not get_codec(name).lossless or (args.dlad_codecs and name not in args.dlad_codecs):
            continue
        case = dlad_case(name, undiffused, EncodeSettings(codec=name))
        payload, wall, cpu = clocked(case.encode)
        decoded, _, _ = clocked(case.decode, payload)
        singles[name] = {"bytes": case.size(payload), "encode_wall": wall, "encode_cpu": cpu,
                         "exact": bool(np.array_equal(decoded, original))}
        log(f"  dlad {name}: CR {raw / singles[name]['bytes']:.3f} ({wall:.1f} s)")
    best_single = min((n for n in singles if singles[n]["exact"]),
                      key=lambda n: singles[n]["bytes"])

    cases = [dlad_case(f"dlad best single ({best_single})", undiffused,
                       EncodeSettings(codec=best_single)),
             *[dlad_case(name, prepared[default_diffusion(settings)], settings)
               for name, settings in streams.items()]]
    cases += [peer_case(name, codec, values) for name, codec in peer_codecs(values.bits).items()]
    run_interleaved(cases, args.repeats, log)

    rows = {}
    for case in cases:
        exact = bool(np.array_equal(case.decoded, original))
        if case.lossless and not exact:
            raise RuntimeError(f"{study.name}: {case.name} is not bit-exact")
        size = case.size(case.payload)
        rows[case.name] = {"bytes": size, "cr": raw / size, "exact": exact,
                           **{key.replace(" ", "_"): case.median(key) for key in case.seconds}}
    layered = next(c for c in cases if c.name == "dlad layered default")
    layered_row = rows[layered.name]
    layered_row["roi_exact"] = bool(np.array_equal(layered.decoded[roi], original[roi]))
    layered_row["ssim"] = fast_ssim(original, layered.decoded)
    layered_row["roi_complete_bytes"] = bytes_to_roi_complete(layered.payload[1])
    exact_case = next(c for c in cases if c.name == "dlad --exact")
    rows["dlad --exact"]["roi_complete_bytes"] = bytes_to_roi_complete(exact_case.payload[1])

    peer = jxl_lossy_with_roi_residual(values, original, roi, layered_row["ssim"], log)
    peers = [name for name in peer_codecs(values.bits)]
    best_peer = max(peers, key=lambda n: rows[n]["cr"])
    return {
        "study": study.name, "note": study.note, "shape": list(volume.shape),
        "raw_bytes": raw, "roi_fraction": float(roi.mean()), "intercept": values.intercept,
        "bits_stored": values.bits, "singles": singles, "best_single": best_single,
        "rows": rows, "peer_layered": peer, "best_peer": best_peer,
        "targets": {
            "best_single_vs_jxl7": rows["dlad best single (" + best_single + ")"]["cr"]
            / rows["JPEG XL effort 7"]["cr"],
            "exact_vs_best_peer": rows["dlad --exact"]["cr"] / rows[best_peer]["cr"],
            "layered_roi_complete_vs_peer": layered_row["roi_complete_bytes"]
            / peer["roi_complete_bytes"] if peer["roi_complete_bytes"] else float("nan"),
            "layered_total_vs_peer": layered_row["bytes"] / peer["total_bytes"],
            "exact_decode_vs_htj2k": rows["dlad --exact"]["decode_wall"]
            / rows["HTJ2K"]["decode_wall"],
        },
    }


# --------------------------------------------------------------------------- report


def report(results: list[dict], args) -> str:
    out = []
    for r in results:
        out.append(f"### {r['study']}: {'x'.join(map(str, r['shape']))}, {r['note']}\n")
        out.append(f"ROI {100 * r['roi_fraction']:.1f} % of voxels; stored as unsigned "
                   f"{r['bits_stored']} bits, intercept {r['intercept']}; {r['raw_bytes']} raw "
                   f"int16 bytes. Medians of {args.repeats} interleaved runs.\n")
        rows = []
        for name, row in r["rows"].items():
            rows.append([name, f"{row['cr']:.3f}", row["bytes"],
                         "yes" if row["exact"] else ("ROI" if row.get("roi_exact") else "no"),
                         f"{row['encode_wall']:.3f}", f"{row['encode_cpu']:.3f}",
                         f"{row['decode_wall']:.3f}", f"{row['decode_cpu']:.3f}"])
        out.append(table(["coder", "CR", "bytes", "exact", "encode wall s", "encode CPU s",
                          "decode wall s", "decode CPU s"], rows))
        singles = ", ".join(f"{name} {r['raw_bytes'] / s['bytes']:.3f}"
                            for name, s in sorted(r["singles"].items(),
                                                  key=lambda item: item[1]["bytes"]))
        out.append(f"\ndlad single-codec streams of the original (CR): {singles}\n")
        layered, peer = r["rows"]["dlad layered default"], r["peer_layered"]
        out.append(table(
            ["layered (ROI exact, rest lossy)", "SSIM", "bytes to ROI complete", "total bytes",
             "CR"],
            [["dlad layered default", f"{layered['ssim']:.5f}", layered["roi_complete_bytes"],
              layered["bytes"], f"{r['raw_bytes'] / layered['bytes']:.2f}"],
             [f"JPEG XL lossy (distance {peer['distance']:.3f}) + JPEG XL lossless ROI residual",
              f"{peer['ssim']:.5f}", peer["roi_complete_bytes"], peer["total_bytes"],
              f"{r['raw_bytes'] / peer['total_bytes']:.2f}"]]))
        out.append("")
    out.append("### Summary: lossless CR\n")
    peers = ["JPEG XL effort 7", "JPEG XL effort 3", "JPEG 2000", "HTJ2K", "CharLS JPEG-LS",
             "zstd 19"]
    rows = []
    for r in results:
        best = r["best_single"]
        rows.append([r["study"], f"{r['rows'][f'dlad best single ({best})']['cr']:.3f} ({best})",
                     f"{r['rows']['dlad --exact']['cr']:.3f}",
                     *[f"{r['rows'][p]['cr']:.3f}" for p in peers]])
    out.append(table(["study", "dlad best single", "dlad `--exact`", *peers], rows))
    out.append("\n### Summary: targets\n")
    rows = []
    for r in results:
        t = r["targets"]
        rows.append([r["study"], f"{t['best_single_vs_jxl7']:.3f}",
                     f"{t['exact_vs_best_peer']:.3f} ({r['best_peer']})",
                     f"{t['layered_roi_complete_vs_peer']:.3f}", f"{t['layered_total_vs_peer']:.3f}",
                     f"{t['exact_decode_vs_htj2k']:.2f}"])
    out.append(table(["study", "best dlad / JXL e7 (>= 1.00)", "`--exact` / best peer (>= 0.97)",
                      "layered ROI-complete bytes / peer (<= 0.85)", "layered total / peer",
                      "`--exact` decode / HTJ2K decode (<= 1.5)"], rows))
    return "\n".join(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", nargs="+", choices=STUDIES, default=list(STUDIES),
                        help="studies to run (default: all)")
    parser.add_argument("--synthetic-shape", default="24,256,256",
                        type=lambda s: tuple(int(v) for v in s.split(",")),
                        help="NZ,NY,NX of the synthetic studies (default 24,256,256)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per case (3)")
    parser.add_argument("--dlad-codecs", nargs="+", metavar="NAME",
                        help="dlad lossless codecs to try as single-codec streams (default: all "
                             "lossless codecs of the registry)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if len(args.synthetic_shape) != 3 or min(args.synthetic_shape) < 1 \
            or min(args.synthetic_shape[1:]) < 32:
        parser.error("--synthetic-shape takes NZ,NY,NX with NY, NX >= 32")
    lossless = [n for n in codec_names() if get_codec(n).lossless]
    unknown = set(args.dlad_codecs or ()) - set(lossless)
    if unknown:
        parser.error(f"--dlad-codecs: not lossless dlad codecs: {', '.join(sorted(unknown))} "
                     f"(known: {', '.join(lossless)})")
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        parser.error("the peers run through imagecodecs: pip install imagecodecs")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    import imagecodecs

    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) \
        if Path("/proc/loadavg").exists() else "n/a"
    started = time.perf_counter()
    results = [bench_study(study, args, log)
               for study in load_studies(args.studies, args.synthetic_shape)]
    end_load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) \
        if Path("/proc/loadavg").exists() else "n/a"
    print(f"## dlad-stream against peers\n\nimagecodecs {imagecodecs.__version__} "
          f"({imagecodecs.jpegxl_version()}, {imagecodecs.jpeg2k_version()}, "
          f"{imagecodecs.htj2k_version()}, {imagecodecs.jpegls_version()}); load average "
          f"{load} before, {end_load} after; {time.perf_counter() - started:.0f} s\n")
    print(report(results, args))
    if args.json:
        write_json_atomic(args.json, {"repeats": args.repeats, "load_before": load,
                                      "load_after": end_load, "studies": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
