"""ROI probability from a segmentation file (binary mask or multi-label map).

The mask is aligned to the CT through physical space (both affines), never by array index:
TotalSegmentator writes LAS NIfTI while a DICOM series loads as LPS, so their arrays are flipped
relative to each other although they cover the same voxels.

A mask says nothing about the CT voxels outside its own field of view: there the liver may well
be, unlabelled. A mask whose field of view leaves CT tissue uncovered (slices, or an in-plane
part, of voxels above :data:`TISSUE_HU`: the ROI cannot lie in air) is refused, unless
``allow_partial`` (``--allow-partial-mask``): then every uncovered tissue voxel is treated as
ROI (sent bit-exact, never diffused) and a warning says how many, on which slices.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sender.io import load_volume
from sender.roi.provider import ProbabilityProvider
from shared.geometry import resample_nearest
from shared.volume import Volume, VolumeError

log = logging.getLogger("dlad.sender")


#: Voxels below this HU are air (outside the body, or lung): no liver there, whether a mask
#: covers them or not (lung parenchyma is about -850 HU, fat -100, liver 40-150).
TISSUE_HU = -500


class MaskFileProvider(ProbabilityProvider):
    """Probability 1 inside the mask (or inside ``label``), 0 elsewhere.

    Example:
        >>> provider = MaskFileProvider("liver.nii.gz")              # doctest: +SKIP
        >>> provider = MaskFileProvider("total_seg.nii.gz", label=5)  # doctest: +SKIP
    """

    name = "mask"

    def __init__(self, path, label: int | None = None, allow_partial: bool = False):
        self.path = Path(path)
        if label is not None and (not isinstance(label, (int, np.integer)) or label < 1):
            raise ValueError(f"--roi-label must be a positive integer, got {label!r}")
        self.label = label
        self.allow_partial = allow_partial
        self.uncovered_voxels = 0

    def probability(self, volume: Volume) -> np.ndarray:
        mask_volume = load_volume(self.path)
        selected = mask_volume.data == self.label if self.label is not None else mask_volume.data > 0
        if not selected.any():
            what = f"label {self.label}" if self.label is not None else "any non-zero voxel"
            raise VolumeError(f"ROI mask {self.path.name} has no voxel with {what}")
        aligned = resample_nearest(selected.astype(np.uint8), mask_volume.affine, volume.shape,
                                   volume.affine)
        if not aligned.any():
            raise VolumeError(f"ROI mask {self.path.name} does not overlap the CT in physical space "
                              "(check that both files belong to the same scan)")
        probability = aligned.astype(np.float32)
        covered = resample_nearest(np.ones(mask_volume.shape, np.uint8), mask_volume.affine,
                                   volume.shape, volume.affine).astype(bool)
        uncovered = ~covered & (volume.data > TISSUE_HU)
        if uncovered.any():
            self._partial(uncovered, covered, volume)
            probability[uncovered] = 1.0
        return probability

    def _partial(self, uncovered: np.ndarray, covered: np.ndarray, volume: Volume) -> None:
        """Refuse a mask that leaves CT tissue uncovered, or say how it is handled."""
        nz = volume.shape[0]
        some = np.flatnonzero(covered.any(axis=(1, 2)))
        outside = np.flatnonzero(uncovered.any(axis=(1, 2)))
        if some.size:
            span = f"covers slices {some[0]}-{some[-1]} of the CT's 0-{nz - 1}"
        else:
            span = "covers none of the CT's slices"
        what = (f"ROI mask {self.path.name} {span}: {int(uncovered.sum())} tissue voxels on "
                f"{outside.size} slice(s) ({_ranges(outside)}) lie outside its field of view")
        if not self.allow_partial:
            raise VolumeError(f"{what}; give a mask of the whole scan, or --allow-partial-mask to "
                              "send the uncovered part bit-exact")
        self.uncovered_voxels = int(uncovered.sum())
        log.warning("%s: sent bit-exact as ROI (--allow-partial-mask)", what)

    def describe(self) -> dict:
        facts = {"provider": self.name, "file": self.path.name, "label": self.label}
        if self.uncovered_voxels:
            facts["uncovered_voxels_sent_exact"] = self.uncovered_voxels
        return facts


def _ranges(indices: np.ndarray) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts, start = [], None
    for position, value in enumerate(indices):
        if start is None:
            start = value
        if position + 1 == len(indices) or indices[position + 1] != value + 1:
            parts.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)
