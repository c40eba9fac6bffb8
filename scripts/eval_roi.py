#!/usr/bin/env python
"""Judge the sender's automatic liver ROI on scans it has not seen: decoded voxels, not masks.

For every case (a CT with known liver, and maybe lesion, voxels) and every model, the script
runs what the sender runs: the U-Net's probability map, the anatomical plausibility check with
its safe fallback (sender/roi/safety.py), the ROI post-processing (sender/roi/steering.py),
diffusion and the layered encoder (sender/pipeline.py, sender/encoder.py), then the receiver's
decoder (receiver/stream.py), and compares the decoded voxels with the original:

* ``liver exact``: the share of liver voxels that come back bit-exact (target >= 99.9 %);
* ``lesion exact``: the same for painted lesion voxels (target 100 %);
* ``all exact``: for scans without a liver, whether every voxel comes back bit-exact (the
  fallback; a scan that keeps diffusion is a **false liver**, target: none);
* ``ROI ratio``: the ROI's size over that of the true liver dilated as in the paper (in-plane
  15-pixel disc only; target <= 2), and the ROI's share of the volume;
* ``CR``: raw int16 bytes over stream bytes (layers 0+1, the default stream);
* ``time``: U-Net plus plausibility check, seconds, on this machine.

Cases, built from ../shared/data (models/variants.py): each labelled scan (the abdomen CT and
the torso CT) and its synthetic variants: contrast phases, kernels and noise, padding
outside a circular field of view, dome and tip slabs of 1 and 3 slices, 0.6 and 5 mm pixels,
1 and 5 mm slices, large tumours painted at the capsule, and two cases like the issue's
(plain dome slab at 0.8 mm pixels; an 8 cm hypodense tumour at the capsule); scans without a
liver: slices of the torso patient's pelvis and lower abdomen (slices 0-54 of
torso_ct_3mm.nii.gz: the liver's lowest tip is near slice 61, the labels start at 82) and
synthetic head, neck, chest and pelvis phantoms (models/body_phantoms.py, seeds that training
never draws) and a head CT from another generator (models.phantoms.make_head_phantom, never
used in training). Every row says whether the case is **held out** for that model: its patient was
not in the model's training data (read from the weights' sidecar JSON); phantoms are
"synthetic", and "generator seen" when the model trained on phantoms of that kind.

Probability maps are cached (``--cache``, default runs/evalcache, float16) by weights,
test-time flips and case, so post-processing studies (``--study``) and re-runs are fast.

Examples:
    python scripts/eval_roi.py                                   # bundled model, every case
    python scripts/eval_roi.py --model A=runs/a_dom/liver_unet.pt --model B=runs/b_dom/liver_unet.pt \\
        --held-out-only --json runs/eval_folds.json
    python scripts/eval_roi.py --model A2=runs/a_dom/liver_unet.pt+runs/a_dom_s1/liver_unet.pt \\
        --held-out-only --no-encode --study                      # ensemble, post-processing table
    python scripts/eval_roi.py --only "torso plain" --flips
    python scripts/eval_roi.py --scan ct.nii.gz liver.nii.gz --label 5   # your own labelled scan
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from models import variants as V
from models.body_phantoms import REGIONS, make_region_phantom
from models.phantoms import make_head_phantom
from models.unet import BUNDLED_ENSEMBLE
from receiver.stream import StudyStream
from sender.encoder import EncodeSettings, StudyEncoder
from sender.io import load_volume
from sender.pipeline import prepare_study, safety_check
from sender.roi.mask_file import MaskFileProvider
from sender.roi.plausibility import find, problem
from sender.roi.provider import ProbabilityProvider, StaticMaskProvider
from sender.roi.steering import DEFAULT_Z_MARGIN_MM, SteeringSettings, steer
from shared.progress import progress
from shared.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
#: The labelled scans and the patient each belongs to (torso_ct_sm is a part of torso_ct_3mm).
LABELLED = {"abdomen": ("abdomen_ct_dicom", "abdomen_ct_liver.nii.gz"),
            "torso": ("torso_ct_sm.nii.gz", "torso_ct_sm_liver.nii.gz")}
PATIENT_OF_FILE = {"abdomen_ct_dicom": "abdomen", "torso_ct_sm.nii.gz": "torso",
                   "torso_ct_3mm.nii.gz": "torso"}
#: Liver-free slices of torso_ct_3mm.nii.gz (0-based, end excluded): its liver's lowest tip is
#: visible from about slice 61 (its labels, those of torso_ct_sm, start at slice 82).
LIVER_FREE_TORSO = {"torso pelvis (slices 0-29)": (0, 30),
                    "torso lower abdomen (slices 25-54)": (25, 55)}
#: Seeds of the evaluation phantoms: training draws its phantom seeds from a generator, these
#: fixed ones are (with overwhelming probability) never among them.
PHANTOM_SEEDS = (900_001, 900_002)
TARGET_LIVER, TARGET_LESION, TARGET_RATIO = 0.999, 1.0, 2.0


@dataclass
class EvalCase:
    case: V.Case
    patient: str
    """The real patient the case comes from, or ``phantom:<region>``."""
    has_liver: bool


@dataclass
class Model:
    name: str
    weights: list[Path]
    patients: set[str]
    """Patients whose scans (or liver-free slices) were in the training data."""
    region_phantoms: bool
    """Trained on liver-free head/neck/chest/pelvis phantoms."""

    def held_out(self, case: EvalCase) -> str:
        if case.patient.startswith("unseen-generator:"):
            return "synthetic, unseen"
        if case.patient.startswith("phantom:"):
            return "synthetic, generator seen" if self.region_phantoms else "synthetic, unseen"
        return "training scan" if case.patient in self.patients else "held out"


def model_from_spec(spec: str) -> Model:
    """``NAME=WEIGHTS[+WEIGHTS...]`` (an ensemble joins files with +), or a bare path."""
    name, _, paths = spec.rpartition("=")
    weights = [Path(p) for p in paths.split("+")]
    for path in weights:
        if not path.is_file():
            raise SystemExit(f"--model {spec}: {path} not found")
    patients, region_phantoms = set(), False
    for path in weights:
        # A weights file's own sidecar (models/liver_unet_dom.json), else its run's (snapshots).
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            sidecar = path.with_name("liver_unet.json")
        if not sidecar.is_file():
            raise SystemExit(f"--model {spec}: no sidecar {sidecar} (needed to know the training "
                             "data, hence what is held out)")
        data = json.loads(sidecar.read_text())["training_data"]
        for scan in data["real_scans"]:
            patients.add(PATIENT_OF_FILE.get(scan["name"].split("[")[0], scan["name"]))
        for part in data.get("liver_free_slices", []):
            patients.add(PATIENT_OF_FILE.get(part["ct"], part["ct"]))
        region_phantoms |= bool(data.get("region_phantoms", 0))
    return Model(name or weights[0].parent.name, weights, patients, region_phantoms)


@dataclass
class CaseRecipe:
    """A case not built yet: its name, patient and how to make it (built when selected)."""

    name: str
    patient: str
    has_liver: bool
    build: object
    """Callable returning the :class:`models.variants.Case`."""

    def make(self) -> EvalCase:
        case = self.build()
        case.name = self.name
        return EvalCase(case, self.patient, self.has_liver)


def liver_variants(base) -> list[tuple[str, object]]:
    """``(suffix, build(case))`` of the labelled scan's synthetic variants (models/variants.py)."""
    def plain(c):
        return V.contrast_phase(c, 50.0, -0.3, 0.25, "plain")

    out = [("", lambda c: c),
           ("plain (liver 50 HU)", plain),
           ("late (liver 62 HU)", lambda c: V.contrast_phase(c, 62.0, 0.4, 0.6, "late")),
           ("portal (liver 110 HU)", lambda c: V.contrast_phase(c, 110.0, 1.0, 1.5, "portal")),
           ("sharp kernel + 30 HU noise", lambda c: V.kernel_noise(c, "sharp", 30.0, 1, "sharp")),
           ("smooth kernel + 10 HU noise",
            lambda c: V.kernel_noise(c, "smooth", 10.0, 2, "smooth"))]
    for fill in (-3024.0, -2048.0, -2000.0, 0.0):
        out.append((f"field of view, fill {fill:g}",
                    lambda c, fill=fill: V.field_of_view(c, fill, 0.95, "fov")))
    for where in ("dome", "tip"):
        for count in (1, 3):
            out.append((f"{where} {count} slice{'s' * (count > 1)}",
                        lambda c, where=where, count=count: V.slab(c, where, count, "slab")))
    out += [("0.6 mm pixels", lambda c: V.pixel_size(c, 0.6, "px")),
            ("5 mm pixels", lambda c: V.pixel_size(c, 5.0, "px")),
            ("1 mm slices", lambda c: V.slice_thickness(c, 1.0, "sl")),
            ("5 mm slices", lambda c: V.slice_thickness(c, 5.0, "sl")),
            ("5 cm tumour -70 HU at the capsule", lambda c: V.paint_lesion(c, 50.0, -70.0, 0, "t")),
            ("10 cm tumour -60 HU at the capsule",
             lambda c: V.paint_lesion(c, 100.0, -60.0, 1, "t")),
            ("7 cm tumour +60 HU at the capsule", lambda c: V.paint_lesion(c, 70.0, 60.0, 2, "t")),
            # Like the cases: a plain dome slab of 3 slices at 0.8 mm pixels, and an
            # 8 cm hypodense tumour at the capsule of an enhanced liver.
            ("plain dome 3 slices 0.8 mm pixels",
             lambda c: V.pixel_size(V.slab(plain(c), "dome", 3, "x"), 0.8, "x")),
            ("8 cm tumour -80 HU at the capsule",
             lambda c: V.paint_lesion(c, 80.0, -80.0, 3, "t"))]
    return out


def labelled_recipes(scans) -> list[CaseRecipe]:
    recipes = []
    for patient, ct, mask, label in scans:
        cache = {}

        def base(ct=ct, mask=mask, label=label, patient=patient, cache=cache):
            if "case" not in cache:
                volume = load_volume(ct)
                liver = MaskFileProvider(mask, label=label).probability(volume) > 0.5
                cache["case"] = V.Case(patient, volume, liver)
            return cache["case"]

        for suffix, build in liver_variants(base):
            recipes.append(CaseRecipe(f"{patient} {suffix}".strip(), patient, True,
                                      lambda build=build, base=base: build(base())))
    return recipes


def negative_recipes() -> list[CaseRecipe]:
    cache = {}

    def torso():
        if "torso" not in cache:
            volume = load_volume(SHARED_DATA / "torso_ct_3mm.nii.gz")
            cache["torso"] = V.Case("torso_ct_3mm", volume, np.zeros(volume.shape, dtype=bool))
        return cache["torso"]

    recipes = [CaseRecipe(name, "torso", False,
                          lambda start=start, stop=stop: V.slices(torso(), start, stop, "crop"))
               for name, (start, stop) in LIVER_FREE_TORSO.items()]
    start, stop = LIVER_FREE_TORSO["torso pelvis (slices 0-29)"]
    recipes.append(CaseRecipe(
        "torso pelvis (slices 0-29), fill -3024", "torso", False,
        lambda: V.field_of_view(V.slices(torso(), start, stop, "crop"), -3024.0, 0.95, "fov")))
    shapes = {"head": (30, 512, 512), "neck": (24, 384, 384), "thorax": (24, 512, 512),
              "pelvis": (24, 512, 512)}

    def phantom(region, seed, shape=None, spacing=None):
        volume, liver = make_region_phantom(region, shape=shape or shapes[region], seed=seed,
                                            spacing=spacing)
        return V.Case(region, volume, liver)

    for region in REGIONS:
        for seed in PHANTOM_SEEDS:
            recipes.append(CaseRecipe(f"{region} phantom {seed}", f"phantom:{region}", False,
                                      lambda r=region, s=seed: phantom(r, s)))
        fill = -3024.0 if region == "head" else 0.0
        recipes.append(CaseRecipe(
            f"{region} phantom {PHANTOM_SEEDS[-1]}, fill {fill:g}", f"phantom:{region}", False,
            lambda r=region, f=fill: V.field_of_view(phantom(r, PHANTOM_SEEDS[-1]), f, 0.95,
                                                     "fov")))
    recipes.append(CaseRecipe(
        "head phantom 51 slices (like the issue's)", "phantom:head", False,
        lambda: phantom("head", 900_003, (51, 512, 512), (0.45, 0.45, 3.0))))

    def other_head():
        # Another team member's head generator (models.phantoms, for the codec benchmarks):
        # a head no training run has seen the like of, with its skull, diploe and falx.
        volume, _ = make_head_phantom((24, 512, 512), spacing=(0.45, 0.45, 5.0), seed=7)
        return V.Case("head", volume, np.zeros(volume.shape, dtype=bool))

    recipes.append(CaseRecipe("head CT (models.phantoms.make_head_phantom)",
                              "unseen-generator:head", False, other_head))
    return recipes


class CachedProvider(ProbabilityProvider):
    """The U-Net's map of one case, computed once (cached), with the U-Net's margins."""

    name = "unet"

    def __init__(self, probability: np.ndarray, unet_class, description: dict):
        self.map = probability
        self.z_margin_mm = unet_class.z_margin_mm
        self.uncertain_threshold = unet_class.uncertain_threshold
        self.description = description

    def probability(self, volume: Volume) -> np.ndarray:
        return self.map

    def describe(self) -> dict:
        return self.description


def case_key(case: V.Case) -> str:
    digest = hashlib.sha256(case.volume.data.tobytes())
    digest.update(np.asarray(case.volume.affine, dtype=np.float64).tobytes())
    return digest.hexdigest()[:16]


def weights_key(model: Model, flips: bool) -> str:
    digest = hashlib.sha256()
    for path in model.weights:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12] + ("-flips" if flips else "")


def probability_map(model: Model, case: V.Case, flips: bool, cache: Path, provider_cache: dict
                    ) -> tuple[np.ndarray, float]:
    """The model's map of the case (float32) and the U-Net's seconds (from the first run)."""
    folder = cache / weights_key(model, flips)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case_key(case)}.npy"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        return np.load(path).astype(np.float32), json.loads(meta.read_text())["seconds"]
    from sender.roi.unet import UNetProvider

    key = (tuple(model.weights), flips)
    if key not in provider_cache:
        provider_cache[key] = UNetProvider(weights=model.weights, device="cpu", flips=flips)
    began = time.perf_counter()
    probability = provider_cache[key].probability(case.volume)
    seconds = time.perf_counter() - began
    temporary = path.with_name(f".{path.name}")
    with temporary.open("wb") as handle:
        np.save(handle, probability.astype(np.float16))
    temporary.replace(path)
    meta.write_text(json.dumps({"case": case.name, "seconds": seconds}))
    return probability.astype(np.float16).astype(np.float32), seconds


def truth_roi_fraction(case: V.Case) -> float:
    paper = SteeringSettings(z_margin_mm=0.0, fill_holes=False, uncertain_threshold=0.0)
    return float(steer(case.liver.astype(np.float32), case.volume.spacing, paper).roi.mean())


def decode(frames) -> tuple[Volume, list[str]]:
    """The receiver's reassembled volume and the problems it reported (chunks it could not
    decode: their voxels keep what the earlier layers gave)."""
    stream = StudyStream()
    for frame in frames:
        stream.feed(frame)
    stream.finish()
    if stream.reassembler is None:
        raise RuntimeError(f"nothing decoded: {stream.problems}")
    return stream.reassembler.to_volume(), [str(p) for p in stream.problems]


def encode_decode(prepared) -> tuple[np.ndarray, int, list[str]]:
    """The decoded voxels of the default stream (layers 0+1), its size in bytes and the
    receiver's problems."""
    frames = list(StudyEncoder(prepared, EncodeSettings()).frames())
    volume, problems = decode(frames)
    return volume.data, int(sum(len(f) for f in frames)), problems


def evaluate(case: EvalCase, probability: np.ndarray, unet_seconds: float, model: Model,
             settings: SteeringSettings, encode: bool, reference_cr: bool = False) -> dict:
    """One row: the sender's decision, the ROI, and (with ``encode``) the decoded voxels."""
    from sender.roi.unet import UNetProvider

    volume = case.case.volume
    began = time.perf_counter()
    finding = problem(find(probability, volume.data, volume.affine, volume.spacing),
                      volume.shape[0] * float(volume.spacing[2]))
    check_seconds = time.perf_counter() - began
    row = {"case": case.case.name, "model": model.name, "held_out": model.held_out(case),
           "has_liver": case.has_liver, "shape": list(volume.shape),
           "spacing_mm": [round(float(s), 3) for s in volume.spacing],
           "fallback": finding is not None, "finding": finding,
           "unet_s": round(unet_seconds, 2), "check_s": round(check_seconds, 2)}
    provider = CachedProvider(probability, UNetProvider, {"provider": "unet",
                                                          "model": model.name})
    effective = settings.for_provider(provider)
    used = np.ones(volume.shape, np.float32) if finding is not None else probability
    roi = steer(used, volume.spacing, effective).roi
    row["roi_fraction"] = float(roi.mean())
    if case.has_liver and case.case.liver.any():
        row["truth_roi_fraction"] = truth_roi_fraction(case.case)
        row["roi_ratio"] = row["roi_fraction"] / row["truth_roi_fraction"]
        row["liver_in_roi"] = float(roi[case.case.liver].mean())
        if case.case.lesion is not None:
            row["lesion_in_roi"] = float(roi[case.case.lesion].mean())
    if not encode:
        return row
    began = time.perf_counter()
    prepared = prepare_study(volume, provider, settings, device="cpu",
                             roi_check=safety_check(allow_small_roi=False))
    if not np.array_equal(prepared.roi, roi):
        raise RuntimeError(f"{case.case.name}: the sender's ROI differs from the evaluated one")
    decoded, row["stream_bytes"], row["decode_problems"] = encode_decode(prepared)
    exact = decoded == volume.data
    row["encode_s"] = round(time.perf_counter() - began, 1)
    row["cr"] = volume.data.nbytes / row["stream_bytes"]
    if reference_cr and case.has_liver and case.case.liver.any():
        # The same chain with the true liver as the ROI (the paper's post-processing): what a
        # perfect segmentation would give, so the difference is the cost of the safety margins.
        truth = prepare_study(volume, StaticMaskProvider(case.case.liver, "true liver"),
                              SteeringSettings(z_margin_mm=0.0, uncertain_threshold=0.0),
                              device="cpu")
        row["cr_true_liver"] = volume.data.nbytes / encode_decode(truth)[1]
    row["all_exact"] = bool(exact.all())
    if case.has_liver and case.case.liver.any():
        row["liver_exact"] = float(exact[case.case.liver].mean())
        if case.case.lesion is not None:
            row["lesion_exact"] = float(exact[case.case.lesion].mean())
    return row


def percent(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return "100" if value == 1.0 else f"{100 * value:.{digits}f}"


def print_rows(rows: list[dict]) -> None:
    header = (f"{'model':<8} {'case':<48} {'held out':<26} {'decision':<9} {'liver ex %':>10} "
              f"{'lesion ex %':>11} {'all exact':>9} {'ROI ratio':>9} {'ROI %':>6} {'CR':>6} "
              f"{'U-Net+check s':>13}")
    print(header)
    print("-" * len(header))
    for row in rows:
        liver = row.get("liver_exact", row.get("liver_in_roi"))
        lesion = row.get("lesion_exact", row.get("lesion_in_roi"))
        ratio = row.get("roi_ratio")
        print(f"{row['model']:<8} {row['case'][:48]:<48} {row['held_out']:<26} "
              f"{'fallback' if row['fallback'] else 'ROI':<9} {percent(liver):>10} "
              f"{percent(lesion, 2):>11} {str(row.get('all_exact', '-')):>9} "
              f"{'-' if ratio is None else f'{ratio:.2f}':>9} {100 * row['roi_fraction']:>6.1f} "
              f"{row.get('cr', float('nan')):>6.2f} "
              f"{row['unet_s'] + row['check_s']:>13.2f}"
              + (f"  (true-liver ROI: CR {row['cr_true_liver']:.2f})"
                 if "cr_true_liver" in row else "")
              + (f"  RECEIVER PROBLEMS: {'; '.join(row['decode_problems'])}"
                 if row.get("decode_problems") else ""))


def summarise(rows: list[dict]) -> list[str]:
    """Per model and held-out label: the worst figures against the targets."""
    lines = []
    groups = {}
    for row in rows:
        groups.setdefault((row["model"], row["held_out"]), []).append(row)
    for (model, held), group in sorted(groups.items()):
        livers = [r for r in group if r["has_liver"]]
        negatives = [r for r in group if not r["has_liver"]]
        parts = []
        if livers:
            key = "liver_exact" if "liver_exact" in livers[0] else "liver_in_roi"
            worst = min(livers, key=lambda r: r[key])
            meets = sum(r[key] >= TARGET_LIVER for r in livers)
            parts.append(f"liver {'exact' if key == 'liver_exact' else 'in ROI'} >= 99.9 % in "
                         f"{meets}/{len(livers)} (worst {percent(worst[key])} %: {worst['case']})")
            lesions = [r for r in livers if "lesion_in_roi" in r]
            if lesions:
                lkey = "lesion_exact" if "lesion_exact" in lesions[0] else "lesion_in_roi"
                worst = min(lesions, key=lambda r: r[lkey])
                parts.append(f"lesions 100 % in {sum(r[lkey] >= TARGET_LESION for r in lesions)}"
                             f"/{len(lesions)} (worst {percent(worst[lkey], 2)} %)")
            kept = [r for r in livers if not r["fallback"]]
            if kept:
                worst = max(kept, key=lambda r: r["roi_ratio"])
                parts.append(f"ROI ratio <= 2 in {sum(r['roi_ratio'] <= TARGET_RATIO for r in kept)}"
                             f"/{len(kept)} kept (worst {worst['roi_ratio']:.2f}); fallbacks "
                             f"{len(livers) - len(kept)}")
        if negatives:
            false = [r["case"] for r in negatives if not r["fallback"]]
            parts.append(f"false livers {len(false)}/{len(negatives)}"
                         + (f" ({', '.join(false)})" if false else ""))
        troubled = [r["case"] for r in group if r.get("decode_problems")]
        if troubled:
            parts.append(f"the receiver reported undecodable chunks in {len(troubled)} "
                         f"({', '.join(troubled)})")
        lines.append(f"{model} [{held}]: " + "; ".join(parts))
    return lines


def disc_at_least(radius_mm: float, settings: SteeringSettings):
    """``settings`` with an in-plane disc of at least ``radius_mm`` (never less than its
    pixels): a margin in mm where the default is in pixels, for a study row."""
    def for_spacing(spacing) -> SteeringSettings:
        pixels = settings.dilation_radius_px * max(float(spacing[0]), float(spacing[1]))
        return replace(settings, dilation_radius_mm=max(pixels, radius_mm))
    return for_spacing


#: Post-processing variants of --study: the paper, the sender's margins, uncertainty margins,
#: and the fixes tried for the liver's lower tip (docs/UNET.md): the margin across slices it
#: had before (15 mm) and between, a lower uncertainty margin, an in-plane disc of at least
#: 15 mm. A value is the settings, or a function of the case's spacing that gives them.
BEFORE = SteeringSettings(z_margin_mm=15.0, uncertain_threshold=0.03)
STUDY = {
    "paper": SteeringSettings(z_margin_mm=0.0, fill_holes=False, uncertain_threshold=0.0),
    f"{DEFAULT_Z_MARGIN_MM:g} mm + holes": SteeringSettings(z_margin_mm=DEFAULT_Z_MARGIN_MM,
                                                          uncertain_threshold=0.0),
    "+ u 0.1": SteeringSettings(z_margin_mm=DEFAULT_Z_MARGIN_MM, uncertain_threshold=0.1),
    "+ u 0.03": SteeringSettings(z_margin_mm=DEFAULT_Z_MARGIN_MM, uncertain_threshold=0.03),
    "+ u 0.01": SteeringSettings(z_margin_mm=DEFAULT_Z_MARGIN_MM, uncertain_threshold=0.01),
    "u 0.03, 15 mm (before)": BEFORE,
    "u 0.03, 18 mm": replace(BEFORE, z_margin_mm=18.0),
    "u 0.03, 21 mm": replace(BEFORE, z_margin_mm=21.0),
    "u 0.02, 15 mm": replace(BEFORE, uncertain_threshold=0.02),
    "u 0.03, 15 mm, disc >= 15 mm": disc_at_least(15.0, BEFORE),
}


def study_case(case: EvalCase, probability: np.ndarray, model: Model, fallback: bool
               ) -> list[dict]:
    """For each post-processing of :data:`STUDY`: the liver and lesion cover and the ROI
    ratio of one liver case (the whole volume where the check falls back)."""
    if not case.has_liver:
        return []
    volume, truth = case.case.volume, truth_roi_fraction(case.case)
    out = []
    for label, settings in STUDY.items():
        if callable(settings):
            settings = settings(volume.spacing)
        roi = steer(probability, volume.spacing, settings, need_probability=False).roi
        # The map's own cover ("without fallback": what the network and the post-processing
        # achieve), and what is sent (the whole volume where the check falls back).
        own = float(roi[case.case.liver].mean())
        entry = {"model": model.name, "held_out": model.held_out(case), "case": case.case.name,
                 "setting": label, "fallback": fallback, "liver_own": own,
                 "liver": 1.0 if fallback else own, "ratio": float(roi.mean()) / truth}
        if case.case.lesion is not None:
            own = float(roi[case.case.lesion].mean())
            entry["lesion_own"], entry["lesion"] = own, 1.0 if fallback else own
        out.append(entry)
    return out


def print_study(entries: list[dict]) -> None:
    """Per model, held-out label and post-processing: the worst cover and the ROI cost."""
    print("\n| model | cases | post-processing | liver >= 99.9 % | worst liver | worst liver "
          "without fallback | lesions 100 % | worst lesion (without fallback) | worst ROI ratio "
          "(kept) | median ROI ratio (kept) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    groups = {}
    for entry in entries:
        groups.setdefault((entry["model"], entry["held_out"], entry["setting"]), []).append(entry)
    order = {label: index for index, label in enumerate(STUDY)}
    for (name, held, label), group in sorted(groups.items(),
                                             key=lambda item: (item[0][0], item[0][1],
                                                               order[item[0][2]])):
        covers = [e["liver"] for e in group]
        lesions = [e["lesion"] for e in group if "lesion" in e]
        kept = [e["ratio"] for e in group if not e["fallback"]]
        worst = min(group, key=lambda e: e["liver"])
        worst_own = min(group, key=lambda e: e["liver_own"])
        own_lesions = [e["lesion_own"] for e in group if "lesion_own" in e]
        print(f"| {name} | {held} ({len(group)}, {len(group) - len(kept)} fallbacks) | {label} | "
              f"{sum(v >= TARGET_LIVER for v in covers)}/{len(covers)} | "
              f"{percent(min(covers))} % ({worst['case']}) | "
              f"{percent(worst_own['liver_own'])} % ({worst_own['case']}) | "
              f"{sum(v >= 1.0 for v in lesions)}/{len(lesions)} | "
              f"{percent(min(lesions), 2) if lesions else '-'} % "
              f"({percent(min(own_lesions), 2) if own_lesions else '-'} %) | "
              f"{max(kept) if kept else float('nan'):.2f} | "
              f"{float(np.median(kept)) if kept else float('nan'):.2f} |", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", metavar="NAME=WEIGHTS[+WEIGHTS]",
                        help="a model to judge (repeatable; + joins an ensemble); its sidecar "
                             "liver_unet.json says what it trained on. Default: the bundled one")
    parser.add_argument("--flips", action="store_true", help="test-time left-right flips")
    parser.add_argument("--scan", nargs=2, action="append", metavar=("CT", "MASK"),
                        help="another labelled scan (and its variants); repeatable")
    parser.add_argument("--label", type=int, default=None,
                        help="liver label of the --scan masks (TotalSegmentator: 5)")
    parser.add_argument("--only", default=None, help="only cases whose name contains this")
    parser.add_argument("--held-out-only", action="store_true",
                        help="skip the cases of each model's training patients")
    parser.add_argument("--no-encode", action="store_true",
                        help="ROI figures only: skip the encoder and decoder (faster)")
    parser.add_argument("--reference-cr", action="store_true",
                        help="also encode each liver case with its true liver as the ROI (the "
                             "CR a perfect segmentation would give)")
    parser.add_argument("--study", action="store_true",
                        help="also print the post-processing table (uncertainty margins)")
    parser.add_argument("--z-margin-mm", type=float, default=None,
                        help="override the U-Net's margin across slices (mm)")
    parser.add_argument("--uncertain-threshold", type=float, default=None,
                        help="override the U-Net's uncertainty margin (0: off)")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "evalcache",
                        help="probability map cache (default runs/evalcache)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.label is not None and args.label < 1:
        parser.error(f"--label must be a positive integer, got {args.label}")
    missing = [name for pair in LABELLED.values() for name in pair
               if not (SHARED_DATA / name).exists()]
    if missing:
        parser.error(f"{SHARED_DATA} lacks {missing}")
    try:
        args.steering = SteeringSettings(z_margin_mm=args.z_margin_mm,
                                         uncertain_threshold=args.uncertain_threshold)
    except ValueError as error:
        parser.error(str(error))
    specs = args.model or ["bundled=" + "+".join(str(path) for path in BUNDLED_ENSEMBLE)]
    args.models = [model_from_spec(spec) for spec in specs]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    scans = [(patient, SHARED_DATA / ct, SHARED_DATA / mask, None)
             for patient, (ct, mask) in LABELLED.items()]
    scans += [(Path(ct).name, Path(ct), Path(mask), args.label) for ct, mask in args.scan or []]
    recipes = labelled_recipes(scans) + negative_recipes()
    if args.only:
        recipes = [r for r in recipes if args.only in r.name]
    if not recipes:
        raise SystemExit(f"no case name contains {args.only!r}")
    rows, studied, providers = [], [], {}
    for recipe in progress(recipes, desc="cases", unit="case"):
        models = [m for m in args.models
                  if not (args.held_out_only and m.patients and recipe.patient in m.patients)]
        if not models:
            continue
        case = recipe.make()
        for model in models:
            probability, seconds = probability_map(model, case.case, args.flips, args.cache,
                                                   providers)
            rows.append(evaluate(case, probability, seconds, model, args.steering,
                                 encode=not args.no_encode, reference_cr=args.reference_cr))
            if args.study:
                studied += study_case(case, probability, model, rows[-1]["fallback"])
    described = [f"{m.name} = {[str(w) for w in m.weights]} (trained on {sorted(m.patients)})"
                 for m in args.models]
    print("models: " + ", ".join(described) + ("; test-time flips" if args.flips else ""))
    print_rows(rows)
    print()
    for line in summarise(rows):
        print(line)
    print(f"targets: liver exact >= {100 * TARGET_LIVER:g} %, lesion exact 100 %, ROI <= "
          f"{TARGET_RATIO:g} x the dilated true liver, no false liver")
    if args.study:
        print_study(studied)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"models": [{"name": m.name,
                                                     "weights": [str(w) for w in m.weights],
                                                     "trained_on": sorted(m.patients)}
                                                    for m in args.models],
                                         "flips": args.flips, "rows": rows, "study": studied},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
