"""Training of the liver U-Net (:mod:`models.unet`) from CT scans with liver masks.

This module is the whole training procedure; ``scripts/train_liver_unet.py`` is its command
line. :mod:`models` never imports the sender, so the two things training needs from it are
injected through :class:`TrainingHooks`: reading CT and mask files (``sender.io.load_volume``)
and scoring a probability map the way the sender will use it (the ROI post-processing of
``sender.roi.steering`` and ``sender.roi.safety.roi_metrics``).

Inputs, any mix of:

* ``--train CT MASK`` / ``--val CT MASK`` pairs: CT as a NIfTI file, a DICOM series folder,
  NRRD or MHA; the mask in any of those, aligned to the CT through physical space (the two
  may be stored in different array orientations).
* ``--dataset DIR`` folders in a known layout, detected automatically:
  MSD (``imagesTr/*.nii.gz`` + ``labelsTr/*.nii.gz``), LiTS (``volume-N.nii`` +
  ``segmentation-N.nii``, in any sub-folder), TotalSegmentator (``<subject>/ct.nii.gz`` with
  ``<subject>/segmentations/liver.nii.gz``, or a multi-label ``<subject>/seg.nii.gz`` /
  ``segmentations.nii.gz``: pass ``--label 5``).
* ``--negative CT START STOP``: slices ``START..STOP-1`` of a scan known to hold no liver
  (say, the pelvis below a labelled liver), trained as background.
* ``--phantoms N`` synthetic abdominal phantoms (models/phantoms.py), training only.

Masks: ``--label L`` takes the voxels equal to ``L`` as liver; without it, every non-zero
voxel (so LiTS/MSD tumours, label 2, count as liver, as they must for a lossless ROI).

Validation is patient-level: the ``--val`` pairs, or else a seeded ``--val-fraction`` of the
patients (one patient per scan, or per subject folder / case number in a dataset). Each
validation reports the Dice of ``p > 0.5``, the liver recall in the final ROI after the
sender's default post-processing (the paper's dilation and thresholding, the margin across
slices, holes filled), and the ROI fraction, as computed by the injected
:attr:`TrainingHooks.score_roi`.

Training samples a batch of axial slices (already in canonical orientation and at the
network's pixel size) and augments each one: a random crop (128-192 px, i.e. 26-38 cm, so
most crops do not show the whole body) centred on the liver or anywhere in the body, rotation,
scaling, elastic deformation, optional left-right flips, a contrast-enhancement shift of soft
tissue, global brightness/contrast, resolution loss and Gaussian noise; with ``--lesion-prob``,
synthetic focal lesions painted into the liver (models/phantoms.py: insert_lesion; hypo- or
hyperdense, 6-40 mm semi-axes, anywhere in the liver up to its edge) whose pixels stay liver in
the target, so the network learns that a lesion belongs to the liver ROI. The loss is binary
cross-entropy with a positive-class weight (recall over precision) plus a soft Dice term
(Milletari et al. 2016, "V-Net", 3DV):
``L = BCE_w + 1 - (2 Σ p t + 1) / (Σ p + Σ t + 1)``. AdamW with a cosine learning-rate
schedule after a linear warm-up. On CUDA the forward pass runs under float16 autocast with a
gradient scaler. With ``--average-from F`` the shipped weights are the mean of the weights after
every step from ``F x steps`` on (SWA, Izmailov et al. 2018; dense, as SWAD, Cha et al. 2021),
with batch-norm statistics re-estimated on 50 further training batches; the last weights are
kept beside them (``last_unet.pt``).

Every random draw of step ``s`` comes from generators seeded with ``(seed, s)``, so a run
resumed from its checkpoint continues exactly as if it had not stopped.

Outputs in ``--out``: ``checkpoint.pt`` (resumable, ``--resume``), ``liver_unet.pt``
(half-precision weights for the sender), ``liver_unet.json`` (sidecar: data, preprocessing,
validation, the command that retrains it) and ``history.json``.

Examples:
    # fold A: train on the abdomen CT, validate on the torso CT
    python scripts/train_liver_unet.py --out runs/fold_a \\
        --train ../shared/data/abdomen_ct_dicom ../shared/data/abdomen_ct_liver.nii.gz \\
        --val ../shared/data/torso_ct_sm.nii.gz ../shared/data/torso_ct_sm_liver.nii.gz

    # a LiTS download plus 100 phantoms, 20 % of the patients held out, on a GPU
    python scripts/train_liver_unet.py --out runs/lits --dataset ~/data/LiTS \\
        --phantoms 100 --steps 20000 --batch-size 32 --device cuda

    # TotalSegmentator's multi-label masks: the liver is label 5
    python scripts/train_liver_unet.py --out runs/ts --dataset ~/data/Totalsegmentator --label 5

    # continue an interrupted run: the same command plus --resume
    python scripts/train_liver_unet.py --out runs/fold_a --resume \
        --train ../shared/data/abdomen_ct_dicom ../shared/data/abdomen_ct_liver.nii.gz \
        --val ../shared/data/torso_ct_sm.nii.gz ../shared/data/torso_ct_sm_liver.nii.gz
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.augment import (
    DomainSettings,
    GeometrySettings,
    add_lesions,
    appearance,
    capsule_lesion,
    contrast_phase,
    field_of_view,
    geometric,
    reconstruction_kernel,
    remove_padding,
)
from models.body_phantoms import REGIONS, make_region_phantom
from models.device import resolve_device
from models.inference import predict_probability
from models.phantoms import make_phantom
from models.preprocessing import (
    canonical_spacing,
    network_size,
    resize,
    suppress_padding,
    to_canonical,
    window,
)
from models.unet import LiverUNet, UNetConfig, save_weights
from shared.geometry import resample_nearest
from shared.progress import progress
from shared.volume import Volume

CHECKPOINT_FORMAT = "dlad-liver-unet-checkpoint/1"
#: Options that must not change when a run is resumed.
FROZEN_OPTIONS = ("widths", "spacing_mm", "window", "seed", "batch_size", "lr", "steps",
                  "warmup_steps", "positive_weight", "crop_sizes", "rotation_deg", "scale",
                  "elastic_px", "flip_prob", "phantoms", "phantom_fraction", "label",
                  "lesion_prob", "average_from", "phase_prob", "kernel_prob", "fov_prob",
                  "capsule_lesion_prob", "region_phantoms")
#: Values of options added later, for checkpoints written before they existed.
OPTION_DEFAULTS = {"lesion_prob": 0.0, "average_from": None, "phase_prob": 0.0,
                   "kernel_prob": 0.0, "fov_prob": 0.0, "capsule_lesion_prob": 0.0,
                   "region_phantoms": 0}
#: Extra seed components of the lesion and domain-augmentation generators (their own
#: streams: runs without lesions or domain augmentations draw exactly what they drew before
#: those options existed).
LESION_STREAM = 7_000_003
DOMAIN_STREAM = 7_000_019
#: Extra seed component of the liver-free region phantoms.
REGION_PHANTOM_STREAM = 1_000_033
#: Batches drawn (past the last step) to re-estimate batch-norm statistics of averaged weights.
BN_BATCHES = 50
#: Mask values above this (multi-label map without --label) make us ask for --label.
MULTILABEL_HINT = 3
#: The command line that :func:`main` documents in the sidecar's retrain line.
SCRIPT = "scripts/train_liver_unet.py"

#: Reads a CT or mask file (NIfTI, DICOM folder, NRRD, MHA) into a :class:`Volume`.
VolumeReader = Callable[[Path], Volume]
#: Scores a probability map against a liver mask on a grid of the given spacing; returns at
#: least ``dice``, ``recall``, ``roi_fraction`` and ``roi_ratio``.
RoiScorer = Callable[[np.ndarray, np.ndarray, tuple], dict]


@dataclass(frozen=True)
class TrainingHooks:
    """What training takes from the sender side, injected by the caller."""

    read_volume: VolumeReader
    """File reader (the sender's ``sender.io.load_volume``)."""
    score_roi: RoiScorer
    """Validation figures of a probability map, after the sender's ROI post-processing."""


@dataclass
class Case:
    """One labelled scan, with the patient it belongs to (splits never separate a patient)."""

    ct: Path
    mask: Path
    patient: str


@dataclass
class TrainingScan:
    """A scan ready for sampling: canonical orientation, network pixel size."""

    name: str
    hu: torch.Tensor
    """int16 ``(nz, H, W)``."""
    liver: torch.Tensor
    """uint8 ``(nz, H, W)``, soft liver fraction x 255 (resampling blurs the edge)."""
    synthetic: bool


@dataclass
class ValidationScan:
    """A scan kept at native resolution, evaluated exactly as the sender would."""

    name: str
    volume: Volume
    liver: np.ndarray


# ----------------------------------------------------------------------------- data discovery

def discover_dataset(root: Path) -> list[Case]:
    """Cases of a dataset folder in the MSD, LiTS or TotalSegmentator layout."""
    if not root.is_dir():
        raise SystemExit(f"--dataset {root}: not a folder")
    nifti = ("*.nii", "*.nii.gz")
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        cases = []
        for pattern in nifti:
            for image in sorted((root / "imagesTr").glob(pattern)):
                label = root / "labelsTr" / image.name
                if image.name.startswith("._") or not label.is_file():
                    continue
                cases.append(Case(image, label, f"{root.name}/{image.name.split('.')[0]}"))
        return _nonempty(cases, root, "MSD")
    volumes = {}
    for pattern in ("volume-*.nii", "volume-*.nii.gz"):
        for path in root.rglob(pattern):
            volumes[re.match(r"volume-(\d+)", path.name).group(1)] = path
    if volumes:
        cases = []
        for number, volume in sorted(volumes.items(), key=lambda item: int(item[0])):
            masks = [p for p in volume.parent.parent.rglob(f"segmentation-{number}.nii*")]
            if masks:
                cases.append(Case(volume, masks[0], f"{root.name}/{number}"))
        return _nonempty(cases, root, "LiTS")
    cases = []
    for subject in sorted(p for p in root.iterdir() if p.is_dir()):
        ct = next((subject / n for n in ("ct.nii.gz", "ct.nii") if (subject / n).is_file()), None)
        masks = [subject / "segmentations" / "liver.nii.gz", subject / "seg.nii.gz",
                 subject / "segmentations.nii.gz"]
        mask = next((m for m in masks if m.is_file()), None)
        if ct and mask:
            cases.append(Case(ct, mask, f"{root.name}/{subject.name}"))
    return _nonempty(cases, root, "TotalSegmentator")


def _nonempty(cases: list[Case], root: Path, layout: str) -> list[Case]:
    if not cases:
        raise SystemExit(f"--dataset {root}: looks like the {layout} layout but no CT has a "
                         "matching mask")
    return cases


def split_cases(args) -> tuple[list[Case], list[Case]]:
    """Training and validation cases; validation never shares a patient with training."""
    train = [Case(Path(ct), Path(mask), Path(ct).name) for ct, mask in args.train or []]
    for root in args.dataset or []:
        train += discover_dataset(Path(root).expanduser())
    val = [Case(Path(ct), Path(mask), Path(ct).name) for ct, mask in args.val or []]
    if not val and args.val_fraction > 0:
        patients = sorted({case.patient for case in train})
        if len(patients) >= 2:
            order = np.random.default_rng(args.seed).permutation(len(patients))
            count = max(1, round(args.val_fraction * len(patients)))
            held_out = {patients[i] for i in order[:count]}
            val = [case for case in train if case.patient in held_out]
            train = [case for case in train if case.patient not in held_out]
            tqdm.write(f"holding out {count} of {len(patients)} patients for validation "
                       f"(--val-fraction {args.val_fraction:g}; 0 trains on all): "
                       f"{', '.join(sorted(held_out))}")
    shared = {c.patient for c in train} & {c.patient for c in val}
    if shared:
        raise SystemExit(f"patients in both training and validation: {sorted(shared)}")
    for case in train + val:
        for path in (case.ct, case.mask):
            if not path.exists():
                raise SystemExit(f"not found: {path}")
    return train, val


# ----------------------------------------------------------------------------- loading

def load_liver(case: Case, volume: Volume, label: int | None, read_volume: VolumeReader
               ) -> np.ndarray:
    """The case's liver mask on ``volume``'s grid (aligned through physical space)."""
    mask_volume = read_volume(case.mask)
    values = mask_volume.data
    if label is None and int(values.max()) > MULTILABEL_HINT:
        raise SystemExit(f"{case.mask} holds labels up to {int(values.max())}: a multi-label map "
                         "needs --label (TotalSegmentator: --label 5)")
    selected = values == label if label is not None else values > 0
    liver = resample_nearest(selected.astype(np.uint8), mask_volume.affine, volume.shape,
                             volume.affine).astype(bool)
    if not liver.any():
        raise SystemExit(f"{case.mask}: no liver voxel on the CT's grid (label {label}; do CT "
                         "and mask belong together?)")
    return liver


def to_training_scan(name: str, volume: Volume, liver: np.ndarray, config: UNetConfig,
                     synthetic: bool = False) -> TrainingScan:
    """Canonical orientation and network pixel size, stored compactly."""
    hu = suppress_padding(to_canonical(volume.data, volume.affine))
    mask = to_canonical(liver, volume.affine)
    sx, sy, _ = canonical_spacing(volume.spacing, volume.affine)
    size = network_size(hu.shape[1:], (sx, sy), config.spacing_mm)
    hu = resize(torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[:, None], size)
    mask = resize(torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[:, None], size)
    return TrainingScan(name, hu[:, 0].round().clamp(-32768, 32767).to(torch.int16),
                        (mask[:, 0].clamp(0, 1) * 255).round().to(torch.uint8), synthetic)


def scan_name(case: Case) -> str:
    return case.ct.name if case.patient == case.ct.name else f"{case.patient}:{case.ct.name}"


def load_training_scans(cases: list[Case], label: int | None, config: UNetConfig,
                        read_volume: VolumeReader) -> list[TrainingScan]:
    scans = []
    for case in progress(cases, desc="loading training scans", unit="scan"):
        volume = read_volume(case.ct)
        liver = load_liver(case, volume, label, read_volume)
        scans.append(to_training_scan(scan_name(case), volume, liver, config))
    return scans


def load_validation_scans(cases: list[Case], label: int | None, read_volume: VolumeReader
                          ) -> list[ValidationScan]:
    scans = []
    for case in progress(cases, desc="loading validation scans", unit="scan"):
        volume = read_volume(case.ct)
        scans.append(ValidationScan(scan_name(case), volume,
                                    load_liver(case, volume, label, read_volume)))
    return scans


def load_negative_scans(specs, config: UNetConfig, read_volume: VolumeReader
                        ) -> list[TrainingScan]:
    """Slice ranges known to hold no liver (``[start, stop)``), labelled background throughout."""
    scans = []
    for ct, start, stop in progress(specs, desc="loading liver-free slices", unit="scan"):
        volume = read_volume(ct)
        if stop > volume.shape[0]:
            raise SystemExit(f"--negative {ct} {start} {stop}: the scan has only "
                             f"{volume.shape[0]} slices")
        affine = volume.affine.copy()
        affine[:3, 3] += affine[:3, 2] * start
        part = Volume(data=volume.data[start:stop], affine=affine, spacing=volume.spacing)
        scans.append(to_training_scan(f"{Path(ct).name}[{start}:{stop}] (no liver)", part,
                                      np.zeros(part.shape, dtype=bool), config))
    return scans


def make_region_phantom_scans(count: int, seed: int, config: UNetConfig) -> list[TrainingScan]:
    """Liver-free phantoms of the head, neck, thorax and pelvis (:mod:`models.body_phantoms`),
    in turn, at the network's pixel size; they join the phantom pool of :func:`sample_slices`."""
    scans = []
    for index in progress(range(count), desc="synthesising liver-free phantoms", unit="phantom"):
        rng = np.random.default_rng([seed, REGION_PHANTOM_STREAM, index])
        region = REGIONS[index % len(REGIONS)]
        side = int(rng.integers(112, 240)) if region in ("head", "neck") else \
            int(rng.integers(176, 240))
        shape = (int(rng.integers(6, 13)), side, side)
        volume, liver = make_region_phantom(
            region, shape=shape, seed=int(rng.integers(2**31)),
            spacing=(config.spacing_mm, config.spacing_mm, float(rng.uniform(2.0, 5.0))))
        scans.append(to_training_scan(f"{region}-phantom-{index}", volume, liver, config,
                                      synthetic=True))
    return scans


def make_phantom_scans(count: int, seed: int, config: UNetConfig) -> list[TrainingScan]:
    scans = []
    for index in progress(range(count), desc="synthesising phantoms", unit="phantom"):
        rng = np.random.default_rng([seed, 1_000_003, index])
        side = int(rng.integers(176, 240))
        shape = (int(rng.integers(12, 25)), side, side + int(rng.integers(-16, 17)))
        volume, liver = make_phantom(shape=shape, seed=int(rng.integers(2**31)),
                                     spacing=(config.spacing_mm, config.spacing_mm,
                                              float(rng.uniform(2.0, 5.0))))
        scans.append(to_training_scan(f"phantom-{index}", volume, liver, config, synthetic=True))
    return scans



# ----------------------------------------------------------------------------- batches

def sample_slices(scans: list[TrainingScan], count: int, phantom_fraction: float,
                  rng: np.random.Generator) -> list[tuple[TrainingScan, int]]:
    """``count`` (scan, slice) draws: real scans equally likely, phantoms ``phantom_fraction``."""
    real = [s for s in scans if not s.synthetic]
    synthetic = [s for s in scans if s.synthetic]
    draws = []
    for _ in range(count):
        pool = synthetic if synthetic and (not real or rng.uniform() < phantom_fraction) else real
        scan = pool[rng.integers(len(pool))]
        draws.append((scan, int(rng.integers(scan.hu.shape[0]))))
    return draws




def domain_settings(args) -> DomainSettings:
    """The domain augmentation probabilities of the command-line options."""
    return DomainSettings(phase_prob=args.phase_prob, kernel_prob=args.kernel_prob,
                          field_of_view_prob=args.fov_prob,
                          capsule_lesion_prob=args.capsule_lesion_prob)


def augment_domain_before(hu: torch.Tensor, liver: torch.Tensor, domain: DomainSettings,
                          rng: np.random.Generator, pixel_mm: float) -> torch.Tensor:
    """The anatomy-level domain augmentations: a capsule tumour, then a contrast phase.

    One draw per augmentation decides, so the draws of one slice do not depend on another's.
    """
    if rng.uniform() < domain.capsule_lesion_prob:
        hu = capsule_lesion(hu, liver, rng, pixel_mm)
    if rng.uniform() < domain.phase_prob:
        hu = contrast_phase(hu, liver, rng)
    return hu


def augment_domain_after(hu: torch.Tensor, domain: DomainSettings, rng: np.random.Generator
                         ) -> torch.Tensor:
    """The acquisition-level domain augmentations: kernel and noise, then the field of view
    (whose fill the model's preprocessing turns into air, as at inference)."""
    if rng.uniform() < domain.kernel_prob:
        hu = reconstruction_kernel(hu, rng)
    if rng.uniform() < domain.field_of_view_prob:
        hu = remove_padding(field_of_view(hu, rng))
    return hu


def geometry_settings(args) -> GeometrySettings:
    """The geometric augmentation ranges of the command-line options."""
    return GeometrySettings(rotation_deg=args.rotation_deg, scale=args.scale,
                            elastic_px=args.elastic_px, flip_prob=args.flip_prob)


def make_batch(scans: list[TrainingScan], args, config: UNetConfig, step: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented batch of ``step``: ``(N, 1, S, S)`` windowed slices and liver targets."""
    rng = np.random.default_rng([args.seed, step])
    lesion_rng = np.random.default_rng([args.seed, step, LESION_STREAM])
    size = int(rng.choice(args.crop_sizes))
    geometry = geometry_settings(args)
    domain = domain_settings(args)
    domain_rng = np.random.default_rng([args.seed, step, DOMAIN_STREAM])
    images, targets = [], []
    for scan, index in sample_slices(scans, args.batch_size, args.phantom_fraction, rng):
        hu, liver = geometric(scan.hu[index], scan.liver[index], size, geometry, rng)
        if args.lesion_prob > 0 and lesion_rng.uniform() < args.lesion_prob:
            hu = add_lesions(hu, liver, lesion_rng)
        if domain.active:
            hu = augment_domain_before(hu, liver, domain, domain_rng, config.spacing_mm)
        hu = appearance(hu, rng)
        if domain.active:
            hu = augment_domain_after(hu, domain, domain_rng)
        images.append(window(hu, *config.window))
        targets.append(liver)
    return torch.stack(images)[:, None], torch.stack(targets)[:, None]




# ----------------------------------------------------------------------------- training

def loss_function(logits: torch.Tensor, target: torch.Tensor, positive_weight: float
                  ) -> torch.Tensor:
    """Weighted BCE plus soft Dice (see the module docstring)."""
    weight = torch.tensor(positive_weight, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=weight)
    probability = torch.sigmoid(logits.float())
    dice = (2 * (probability * target).sum() + 1) / (probability.sum() + target.sum() + 1)
    return bce + 1 - dice


def learning_rate(step: int, args) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 2 % of ``lr``."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def evaluate(model: LiverUNet, scans: list[ValidationScan], batch_size: int,
             score_roi: RoiScorer) -> list[dict]:
    """Dice, recall in the final ROI and ROI fractions (``score_roi``) of every validation scan."""
    model.eval()
    results = []
    for scan in scans:
        volume = scan.volume
        probability = predict_probability(model, volume.data, volume.affine, volume.spacing,
                                          batch_size=batch_size)
        results.append({"scan": scan.name,
                        **score_roi(probability, scan.liver, tuple(volume.spacing))})
    model.train()
    return results


def format_results(step: int, results: list[dict]) -> str:
    return "; ".join(f"step {step} {r['scan']}: Dice {r['dice']:.4f} recall {r['recall']:.5f} "
                     f"ROI {r['roi_fraction']:.3f} ({r['roi_ratio']:.2f}x truth)" for r in results)


def update_average(model: LiverUNet, average: list[torch.Tensor] | None, count: int
                   ) -> tuple[list[torch.Tensor], int]:
    """Add the current weights to their running mean over ``count`` earlier steps.

    Weight averaging along the trajectory (Izmailov et al. 2018, "Averaging weights leads to
    wider optima and better generalization", UAI), densely at every step as in SWAD (Cha et al.
    2021, NeurIPS), which finds flatter minima that transfer better to unseen domains.
    """
    weights = [p.detach() for p in model.parameters()]
    if average is None:
        return [w.clone() for w in weights], 1
    for mean, weight in zip(average, weights):
        mean.add_(weight - mean, alpha=1.0 / (count + 1))
    return average, count + 1


def averaged_model(model: LiverUNet, average: list[torch.Tensor], scans: list[TrainingScan],
                   args, config: UNetConfig, device: torch.device) -> LiverUNet:
    """A copy of ``model`` with the averaged weights and batch-norm statistics re-estimated.

    Averaged weights need their own batch-norm statistics: they come from ``BN_BATCHES``
    training batches drawn past the last step (deterministic, like every other draw).
    """
    averaged = copy.deepcopy(model)
    with torch.no_grad():
        for parameter, mean in zip(averaged.parameters(), average):
            parameter.copy_(mean)
    batches = (make_batch(scans, args, config, args.steps + i)[0].to(device)
               .contiguous(memory_format=torch.channels_last) for i in range(BN_BATCHES))
    torch.optim.swa_utils.update_bn(batches, averaged)
    return averaged


def save_checkpoint(path: Path, model, optimizer, scaler, step: int, args, history: list,
                    wall_time: float, average: list[torch.Tensor] | None, averaged_steps: int):
    payload = {"format": CHECKPOINT_FORMAT, "step": step, "wall_time_s": wall_time,
               "model": model.state_dict(), "average": average,
               "averaged_steps": averaged_steps,
               "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
               "options": {k: _jsonable(getattr(args, k)) for k in FROZEN_OPTIONS},
               "history": history}
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(payload, temporary)
    temporary.replace(path)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def describe_scan(scan) -> dict:
    if isinstance(scan, ValidationScan):
        return {"name": scan.name, "shape": list(scan.volume.shape),
                "spacing_mm": list(scan.volume.spacing)}
    return {"name": scan.name, "slices": int(scan.hu.shape[0])}


def quote_run(run: Path) -> dict:
    """The data, validation figures and command of an earlier run, from its sidecar."""
    sidecar = json.loads((run / "liver_unet.json").read_text())
    return {"run": run.name, "trained_on": sidecar["training_data"],
            "validation": sidecar["validation"], "retrain": sidecar["retrain"]}


def write_outputs(out: Path, model: LiverUNet, args, train_scans, val_scans, results, history,
                  wall_time: float, device: torch.device, command: list[str]) -> None:
    """``liver_unet.pt`` (half-precision weights) and its ``liver_unet.json`` sidecar."""
    real = [s for s in train_scans if not s.synthetic]
    metadata = {
        "trained_on": [describe_scan(s) for s in real],
        "phantoms": args.phantoms,
        "validation": results,
        "steps": args.steps,
    }
    weights = save_weights(model, out / "liver_unet.pt", metadata)
    config = model.config
    low, high = config.window
    sidecar = {
        "weights_file": weights.name,
        "sha256": sha256(weights),
        "bytes": weights.stat().st_size,
        "model": (f"2D U-Net (Ronneberger et al. 2015; Christ et al. 2017), "
                  f"{len(config.widths)} levels, widths {list(config.widths)}, 3x3 convolutions "
                  f"+ batch norm + ReLU, 2x2 max-pool / transposed convolution, "
                  f"{sum(p.numel() for p in model.parameters())} parameters, stored float16"),
        "config": config.to_dict(),
        "preprocessing": (
            "axes permuted/flipped to canonical LPS (rows anterior->posterior, columns "
            f"right->left); HU clipped to [{low:g}, {high:g}] and mapped to [-1, 1]; every slice "
            f"resampled in-plane to {config.spacing_mm:g} mm (bilinear, antialiased when "
            f"shrinking); padded to a multiple of {config.size_multiple}; sigmoid probabilities "
            "resampled back to the native grid (bilinear)"),
        "training_data": {
            "real_scans": [describe_scan(s) for s in real],
            "liver_free_slices": [{"ct": Path(ct).name, "slices": [start, stop]}
                                  for ct, start, stop in args.negative],
            "phantoms": args.phantoms,
            "region_phantoms": args.region_phantoms,
            "phantom_fraction_of_batches":
                args.phantom_fraction if args.phantoms or args.region_phantoms else 0.0,
            "label": args.label,
        },
        "training": {
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "warmup_steps": args.warmup_steps, "positive_weight": args.positive_weight,
            "crop_sizes_px": list(args.crop_sizes), "rotation_deg": args.rotation_deg,
            "scale": args.scale, "elastic_px": args.elastic_px, "flip_prob": args.flip_prob,
            "lesion_prob": args.lesion_prob, "average_from": args.average_from,
            "phase_prob": args.phase_prob, "kernel_prob": args.kernel_prob,
            "fov_prob": args.fov_prob, "capsule_lesion_prob": args.capsule_lesion_prob,
            "seed": args.seed,
            "device": str(device), "wall_time_s": round(wall_time, 1),
            "torch": torch.__version__,
        },
        "validation": {"scans": [describe_scan(s) for s in val_scans], "results": results},
        "final_training_loss": history[-1]["loss"] if history else None,
        "retrain": shlex.join(["python", SCRIPT, *command]),
    }
    if args.cross_validation_from:
        sidecar["cross_validation"] = [quote_run(Path(run)) for run in args.cross_validation_from]
    (out / "liver_unet.json").write_text(json.dumps(sidecar, indent=2) + "\n")




def parse_args(argv=None, description: str | None = None):
    """The training options of ``argv`` (checked; exits with a usage message if wrong).

    ``description``: the command line's help text (its first paragraph is the summary).
    """
    text = description or __doc__
    parser = argparse.ArgumentParser(
        prog=SCRIPT, description=text.split("\n\n")[0],
        epilog="\n\n".join(text.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train", nargs=2, action="append", metavar=("CT", "MASK"),
                      help="a training scan and its liver mask (repeatable)")
    data.add_argument("--val", nargs=2, action="append", metavar=("CT", "MASK"),
                      help="a validation scan and its liver mask (repeatable); replaces "
                           "--val-fraction")
    data.add_argument("--dataset", action="append", metavar="DIR",
                      help="a dataset folder in MSD, LiTS or TotalSegmentator layout (repeatable)")
    data.add_argument("--negative", nargs=3, action="append", metavar=("CT", "START", "STOP"),
                      help="slices START..STOP-1 of CT hold no liver (e.g. the pelvis): trained "
                           "as background (repeatable); never from a validation patient")
    data.add_argument("--label", type=int, default=None,
                      help="mask value of the liver (TotalSegmentator multi-label: 5); default: "
                           "any non-zero voxel")
    data.add_argument("--val-fraction", type=float, default=0.2,
                      help="fraction of patients held out when no --val is given (default 0.2, "
                           "at least one patient when there are two or more; 0 trains on all)")
    data.add_argument("--phantoms", type=int, default=0,
                      help="synthetic phantoms added to training (default 0)")
    data.add_argument("--phantom-fraction", type=float, default=0.3,
                      help="share of sampled slices that come from phantoms (default 0.3)")
    data.add_argument("--region-phantoms", type=int, default=0,
                      help="liver-free phantoms of the head, neck, thorax and pelvis, in turn, "
                           "added to the phantom pool (default 0)")
    model = parser.add_argument_group("model")
    model.add_argument("--widths", type=int, nargs="+", default=list(UNetConfig.widths),
                       help="channels per level, one number per level (default 12 24 48 96 192)")
    model.add_argument("--spacing-mm", type=float, default=UNetConfig.spacing_mm,
                       help="in-plane pixel size the network sees (default 2.0)")
    model.add_argument("--window", type=float, nargs=2, default=list(UNetConfig.window),
                       metavar=("LOW", "HIGH"), help="HU window (default -200 300)")
    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--steps", type=int, default=1200, help="optimiser steps (1200)")
    optimisation.add_argument("--batch-size", type=int, default=8, help="slices per step (8)")
    optimisation.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (2e-3)")
    optimisation.add_argument("--warmup-steps", type=int, default=100,
                              help="linear warm-up steps (100)")
    optimisation.add_argument("--positive-weight", type=float, default=2.0,
                              help="BCE weight of liver pixels; > 1 favours recall (2.0)")
    optimisation.add_argument("--crop-sizes", type=int, nargs="+", default=[128, 160, 192],
                              help="crop side lengths in pixels, one drawn per batch; multiples "
                                   "of 16 (default 128 160 192)")
    optimisation.add_argument("--rotation-deg", type=float, default=15.0,
                              help="maximum rotation (15 degrees)")
    optimisation.add_argument("--scale", type=float, default=0.2,
                              help="maximum zoom change, log-symmetric (0.2: x0.83 to x1.2)")
    optimisation.add_argument("--elastic-px", type=float, default=8.0,
                              help="elastic displacement amplitude in pixels (8; 0 disables)")
    optimisation.add_argument("--flip-prob", type=float, default=0.0,
                              help="probability of a left-right flip (default 0: the liver is on "
                                   "the patient's right, and the canonical orientation keeps it "
                                   "there; mirroring teaches confusion with the spleen)")
    optimisation.add_argument("--lesion-prob", type=float, default=0.0,
                              help="probability that a slice gets 1-3 synthetic liver lesions "
                                   "(label stays liver; default 0)")
    optimisation.add_argument("--phase-prob", type=float, default=0.0,
                              help="probability that a slice is remapped to another contrast "
                                   "phase (liver 38-140 HU; default 0)")
    optimisation.add_argument("--kernel-prob", type=float, default=0.0,
                              help="probability of another reconstruction kernel and noise "
                                   "texture (default 0)")
    optimisation.add_argument("--fov-prob", type=float, default=0.0,
                              help="probability of a circular field of view with a scanner's "
                                   "fill value outside (default 0)")
    optimisation.add_argument("--capsule-lesion-prob", type=float, default=0.0,
                              help="probability of a 5-10 cm tumour at the liver's capsule "
                                   "(label stays liver; default 0)")
    optimisation.add_argument("--average-from", type=float, default=None, metavar="FRACTION",
                              help="ship the mean of the weights of every step from this "
                                   "fraction of the run on (SWA/SWAD), with batch-norm "
                                   "statistics re-estimated; the last weights are kept as "
                                   "last_unet.pt (default: off, ship the last weights)")
    optimisation.add_argument("--seed", type=int, default=0, help="random seed (0)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, required=True, help="output folder")
    run.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    run.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1")
    run.add_argument("--threads", type=int, default=2, help="CPU threads for torch (2)")
    run.add_argument("--val-every", type=int, default=500,
                     help="validate every N steps and at the end (500)")
    run.add_argument("--checkpoint-every", type=int, default=100,
                     help="write the resumable checkpoint every N steps (100)")
    run.add_argument("--snapshot-every", type=int, default=None, metavar="N",
                     help="also keep the weights of every N-th step as snapshot_STEP.pt (for "
                          "snapshot ensembles; default: none)")
    run.add_argument("--cross-validation-from", nargs="+", metavar="RUN_DIR",
                     help="earlier runs (e.g. the folds) whose validation figures the sidecar "
                          "should quote")
    args = parser.parse_args(argv)
    if not (args.train or args.dataset or args.phantoms):
        parser.error("give training data: --train CT MASK, --dataset DIR or --phantoms N")
    positive = {"steps": args.steps, "batch-size": args.batch_size, "threads": args.threads,
                "val-every": args.val_every, "checkpoint-every": args.checkpoint_every}
    for name, value in positive.items():
        if value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    if args.phantoms < 0 or not 0 <= args.phantom_fraction <= 1:
        parser.error("--phantoms must be >= 0 and --phantom-fraction in [0, 1]")
    if not 0 <= args.val_fraction < 1 or not 0 <= args.flip_prob <= 1:
        parser.error("--val-fraction must be in [0, 1) and --flip-prob in [0, 1]")
    for name in ("lesion_prob", "phase_prob", "kernel_prob", "fov_prob", "capsule_lesion_prob"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1], got "
                         f"{getattr(args, name)}")
    if args.region_phantoms < 0:
        parser.error(f"--region-phantoms must be >= 0, got {args.region_phantoms}")
    if args.snapshot_every is not None and args.snapshot_every < 1:
        parser.error(f"--snapshot-every must be at least 1, got {args.snapshot_every}")
    if args.average_from is not None and not 0 <= args.average_from < 1:
        parser.error(f"--average-from must be in [0, 1), got {args.average_from}")
    if args.lr <= 0 or args.positive_weight <= 0:
        parser.error("--lr and --positive-weight must be > 0")
    if min(args.scale, args.rotation_deg, args.elastic_px) < 0:
        parser.error("--scale, --rotation-deg and --elastic-px must be >= 0")
    multiple = 2 ** (len(args.widths) - 1)
    if any(size < multiple or size % multiple for size in args.crop_sizes):
        parser.error(f"--crop-sizes must be positive multiples of {multiple}, got "
                     f"{args.crop_sizes}")
    if args.label is not None and args.label < 1:
        parser.error(f"--label must be a positive integer, got {args.label}")
    negatives = []
    for ct, start, stop in args.negative or []:
        if not (start.isdigit() and stop.isdigit() and int(start) < int(stop)):
            parser.error(f"--negative {ct} {start} {stop}: START and STOP must be slice indices "
                         "with START < STOP")
        if any(Path(ct) == Path(val_ct) for val_ct, _ in args.val or []):
            parser.error(f"--negative {ct}: that scan is a validation scan")
        negatives.append((ct, int(start), int(stop)))
    args.negative = negatives
    for run in args.cross_validation_from or []:
        if not (Path(run) / "liver_unet.json").is_file():
            parser.error(f"--cross-validation-from {run}: no liver_unet.json there")
    args.widths, args.window = tuple(args.widths), tuple(args.window)
    args.crop_sizes = tuple(args.crop_sizes)
    return args


def main(argv=None, *, hooks: TrainingHooks, description: str | None = None) -> int:
    """Train as the command line ``argv`` says; returns the exit status.

    Args:
        argv: options (default ``sys.argv[1:]``), see :func:`parse_args`.
        hooks: file reading and validation scoring from the sender side.
        description: help text of the calling command line.
    """
    args = parse_args(argv, description)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    out: Path = args.out
    checkpoint_path = out / "checkpoint.pt"
    checkpoint = None
    if args.resume:
        if not checkpoint_path.is_file():
            raise SystemExit(f"--resume: no checkpoint at {checkpoint_path}")
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise SystemExit(f"{checkpoint_path} is not a {CHECKPOINT_FORMAT} checkpoint")
        made_with = {k: checkpoint["options"].get(k, OPTION_DEFAULTS.get(k))
                     for k in FROZEN_OPTIONS}
        changed = [k for k in FROZEN_OPTIONS if _jsonable(getattr(args, k)) != made_with[k]]
        if changed:
            raise SystemExit(f"--resume with changed options {changed}; the checkpoint was made "
                             f"with {[made_with[k] for k in changed]}")
    elif checkpoint_path.exists():
        raise SystemExit(f"{checkpoint_path} exists: pass --resume to continue, or choose "
                         "another --out")
    out.mkdir(parents=True, exist_ok=True)

    config = UNetConfig(widths=args.widths, spacing_mm=args.spacing_mm, window=args.window)
    train_cases, val_cases = split_cases(args)
    train_scans = load_training_scans(train_cases, args.label, config, hooks.read_volume)
    train_scans += load_negative_scans(args.negative or [], config, hooks.read_volume)
    if args.phantoms:
        train_scans += make_phantom_scans(args.phantoms, args.seed, config)
    if args.region_phantoms:
        train_scans += make_region_phantom_scans(args.region_phantoms, args.seed, config)
    val_scans = load_validation_scans(val_cases, args.label, hooks.read_volume)
    if not val_scans:
        tqdm.write("no validation scans: the figures in the sidecar will be empty")

    torch.manual_seed(args.seed)  # the initial weights
    model = LiverUNet(config).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    history, start, earlier_time = [], 0, 0.0
    average_start = None if args.average_from is None else round(args.average_from * args.steps)
    average, averaged_steps = None, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        history, start = list(checkpoint["history"]), int(checkpoint["step"])
        earlier_time = float(checkpoint["wall_time_s"])
        if checkpoint.get("average") is not None:
            average = [mean.to(device) for mean in checkpoint["average"]]
            averaged_steps = int(checkpoint["averaged_steps"])
        tqdm.write(f"resuming at step {start} of {args.steps}")

    model.train()
    began = time.monotonic()
    running = None
    bar = progress(range(start, args.steps), initial=start, total=args.steps, desc="training",
                   unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        images, targets = make_batch(train_scans, args, config, step)
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        targets = targets.to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = model(images)
        loss = loss_function(logits, targets, args.positive_weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if average_start is not None and step >= average_start:
            average, averaged_steps = update_average(model, average, averaged_steps)
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{learning_rate(step, args):.2e}")
        entry = {"step": step + 1, "loss": round(running, 5)}
        if val_scans and ((step + 1) % args.val_every == 0 or step + 1 == args.steps):
            entry["validation"] = evaluate(model, val_scans, args.batch_size, hooks.score_roi)
            tqdm.write(format_results(step + 1, entry["validation"]))
        if (step + 1) % 10 == 0 or "validation" in entry:
            history.append(entry)
        if args.snapshot_every and (step + 1) % args.snapshot_every == 0:
            save_weights(model, out / f"snapshot_{step + 1}.pt", {"steps": step + 1})
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            save_checkpoint(checkpoint_path, model, optimizer, scaler, step + 1, args, history,
                            earlier_time + time.monotonic() - began, average, averaged_steps)
    bar.close()

    results = next((e["validation"] for e in reversed(history) if "validation" in e), [])
    if average is not None:
        # The last weights stay beside the averaged ones, for a paired comparison.
        save_weights(model, out / "last_unet.pt", {"steps": args.steps, "averaged": False})
        model = averaged_model(model, average, train_scans, args, config, device)
        if val_scans:
            results = evaluate(model, val_scans, args.batch_size, hooks.score_roi)
            tqdm.write(f"averaged weights (last {averaged_steps} steps): "
                       + format_results(args.steps, results))
        history.append({**history[-1], "averaged_steps": averaged_steps, "validation": results})
    wall_time = earlier_time + time.monotonic() - began
    command = list(sys.argv[1:] if argv is None else argv)
    write_outputs(out, model, args, train_scans, val_scans, results, history, wall_time, device,
                  command)
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    tqdm.write(f"wrote {out / 'liver_unet.pt'} and {out / 'liver_unet.json'}")
    return 0
