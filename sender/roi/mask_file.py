"""ROI probability from a segmentation file (binary mask or multi-label map).

The mask is aligned to the CT through physical space (both affines), never by array index:
TotalSegmentator writes LAS NIfTI while a DICOM series loads as LPS, so their arrays are flipped
relative to each other although they cover the same voxels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sender.io import load_volume
from sender.roi.provider import ProbabilityProvider
from shared.geometry import resample_nearest
from shared.volume import Volume, VolumeError


class MaskFileProvider(ProbabilityProvider):
    """Probability 1 inside the mask (or inside ``label``), 0 elsewhere.

    Example:
        >>> provider = MaskFileProvider("liver.nii.gz")              # doctest: +SKIP
        >>> provider = MaskFileProvider("total_seg.nii.gz", label=5)  # doctest: +SKIP
    """

    name = "mask"

    def __init__(self, path, label: int | None = None):
        self.path = Path(path)
        if label is not None and (not isinstance(label, (int, np.integer)) or label < 1):
            raise ValueError(f"--roi-label must be a positive integer, got {label!r}")
        self.label = label

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
        return aligned.astype(np.float32)

    def describe(self) -> dict:
        return {"provider": self.name, "file": self.path.name, "label": self.label}
