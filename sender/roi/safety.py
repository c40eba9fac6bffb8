"""Safety of an automatic ROI: how much liver it keeps, and when not to trust it.

Diffusion is lossy outside the ROI, so the one error that matters is liver tissue left
outside it. Two tools:

* :func:`roi_metrics` measures a probability map against a reference liver mask: the Dice
  coefficient of the thresholded prediction ``P = {p > 0.5}`` against the truth ``T``,
  ``Dice = 2 |P ∩ T| / (|P| + |T|)``, and the **liver recall in the final ROI**
  ``R = |ROI ∩ T| / |T|``, where ``ROI = steer(p).roi`` is the map after the sender's
  post-processing (the paper's per-slice disc dilation and ``p > 0.75 → 1``, Luu et al., plus
  the margin across slices and the filled holes; :mod:`sender.roi.steering`), i.e. the voxels
  that really reach the receiver bit-exact. The ROI's cost is its fraction of the volume,
  compared with that of the true liver dilated as in the paper, ``steer(T, paper()).roi``
  (in-plane disc only: a fixed reference, so that the margins' cost shows in the ratio).
* :func:`roi_problem` is what the sender runs without a reference: it flags a predicted
  liver that is empty, too small, or anatomically implausible for the scan it was found in
  (:mod:`sender.roi.plausibility`: position against the body outline and the lungs, bone
  around it, size, shape, the scan's own tissues), and :data:`FALLBACK_POLICY` says what to
  do then; :func:`check_roi_plausibility` gives the same finding with that advice.

A scan whose field of view holds no liver (head, neck, chest, pelvis) fails the check: the
sender cannot tell "no liver here" from "liver missed", so it takes the safe fallback.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from sender.roi.plausibility import (
    LIVER_THRESHOLD,
    MIN_LIVER_SECTION_CM2,
    MIN_LIVER_VOLUME_ML,
    find,
    problem,
)
from sender.roi.steering import (
    DEFAULT_UNCERTAIN_THRESHOLD,
    DEFAULT_Z_MARGIN_MM,
    SteeringMap,
    SteeringSettings,
    steer,
)
from shared.volume import Volume

#: What the sender does when :func:`check_roi_plausibility` warns (unless told otherwise):
FALLBACK_POLICY = "no-diffusion"
FALLBACK_DESCRIPTION = (
    "no diffusion: the whole volume is treated as ROI (probability 1 everywhere) and sent "
    "bit-exact, so no liver voxel can be lost; compression falls back to lossless coding")
FALLBACK_ADVICE = f"falling back to the safe policy: {FALLBACK_DESCRIPTION}"


def fallback_probability(volume: Volume) -> np.ndarray:
    """The probability map of :data:`FALLBACK_POLICY`: 1 everywhere (all voxels are ROI)."""
    return np.ones(volume.shape, dtype=np.float32)


def roi_problem(steering_map_or_probability, volume: Volume, anatomy=None) -> str | None:
    """What is implausible about the predicted liver, else ``None``.

    Args:
        steering_map_or_probability: the provider's probability map (preferred: the liver
            itself is checked against the scan's anatomy, :mod:`sender.roi.plausibility`) or
            the :class:`SteeringMap` made from it (then only the size of the dilated ROI is
            checked, a weaker test).
        volume: the CT the map belongs to.
        anatomy: the per-slice anatomy computed beforehand, ``{slice index:
            SliceAnatomy}`` (:func:`sender.roi.plausibility.find`; a live series' slices as
            they arrived): the same finding, sooner.
    """
    if isinstance(steering_map_or_probability, SteeringMap):
        roi = steering_map_or_probability.roi
        if roi.shape != volume.shape:
            raise ValueError(f"ROI shape {roi.shape} does not match the volume {volume.shape}")
        sx, sy, sz = volume.spacing
        voxels_per_slice = roi.reshape(roi.shape[0], -1).sum(axis=1)
        volume_ml = float(voxels_per_slice.sum()) * sx * sy * sz / 1000.0
        section_cm2 = float(voxels_per_slice.max()) * sx * sy / 100.0
        if volume_ml == 0.0:
            return "the ROI is empty"
        if volume_ml < MIN_LIVER_VOLUME_ML or section_cm2 < MIN_LIVER_SECTION_CM2:
            return (f"the ROI is implausibly small ({volume_ml:.1f} mL, largest axial section "
                    f"{section_cm2:.1f} cm²; a liver has at least {MIN_LIVER_VOLUME_ML:g} mL and "
                    f"{MIN_LIVER_SECTION_CM2:g} cm²)")
        return None
    probability = np.asarray(steering_map_or_probability)
    if probability.shape != volume.shape:
        raise ValueError(f"probability map shape {probability.shape} does not match the "
                         f"volume {volume.shape}")
    findings = find(probability, volume.data, volume.affine, volume.spacing, anatomy=anatomy)
    return problem(findings, thickness_mm=volume.shape[0] * float(volume.spacing[2]))


def check_roi_plausibility(steering_map_or_probability, volume: Volume) -> str | None:
    """A warning if the predicted liver is empty or implausibly small, else ``None``: the
    problem (:func:`roi_problem`, same arguments) and the fallback the sender applies."""
    problem = roi_problem(steering_map_or_probability, volume)
    return None if problem is None else f"{problem}; {FALLBACK_ADVICE}"


@dataclass(frozen=True)
class RoiMetrics:
    """How a probability map's ROI covers a reference liver (fractions in ``[0, 1]``)."""

    dice: float
    """Dice of ``p > 0.5`` against the liver."""
    recall: float
    """Fraction of liver voxels inside the final ROI (after dilation and thresholding)."""
    roi_fraction: float
    """Fraction of the volume in the final ROI."""
    truth_roi_fraction: float
    """Fraction of the volume in the ROI made from the true liver mask by the paper's
    post-processing (in-plane disc and threshold; no margin across slices, no hole filling)."""

    @property
    def roi_ratio(self) -> float:
        """``roi_fraction / truth_roi_fraction``: the ROI's cost relative to a perfect map."""
        return self.roi_fraction / self.truth_roi_fraction if self.truth_roi_fraction else np.inf

    def to_dict(self) -> dict:
        return {**asdict(self), "roi_ratio": self.roi_ratio}


def roi_metrics(probability: np.ndarray, liver: np.ndarray, spacing,
                settings: SteeringSettings = SteeringSettings(
                    z_margin_mm=DEFAULT_Z_MARGIN_MM,
                    uncertain_threshold=DEFAULT_UNCERTAIN_THRESHOLD)) -> RoiMetrics:
    """Dice, liver recall in the final ROI and ROI fractions of ``probability`` vs ``liver``.

    ``settings`` default to the sender's steering of the U-Net's map (its margin across slices
    and its uncertainty margin).

    The ROI is ``steer(probability, spacing, settings)``; the reference ROI is
    ``steer(liver, spacing, settings.paper())``, the true liver with the paper's in-plane
    dilation only, whatever the margins of ``settings``.
    """
    probability = np.asarray(probability, dtype=np.float32)
    liver = np.asarray(liver, dtype=bool)
    if probability.shape != liver.shape:
        raise ValueError(f"probability {probability.shape} and liver mask {liver.shape} differ "
                         "in shape")
    if not liver.any():
        raise ValueError("the reference liver mask is empty: recall is undefined")
    predicted = probability > LIVER_THRESHOLD
    dice = 2.0 * float((predicted & liver).sum()) / float(predicted.sum() + liver.sum())
    roi = steer(probability, spacing, settings).roi
    truth_roi = steer(liver.astype(np.float32), spacing, settings.paper()).roi
    return RoiMetrics(dice=dice, recall=float((roi & liver).sum()) / float(liver.sum()),
                      roi_fraction=float(roi.mean()), truth_roi_fraction=float(truth_roi.mean()))
