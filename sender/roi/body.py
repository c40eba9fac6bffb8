"""The whole body as ROI: an intensity-threshold body mask, as in MedROI.

MedROI (codec-agnostic ROI-centric compression of medical images) keeps everything inside
the patient and drops the air around it. The mask is

1. ``h > threshold`` (default -500 HU: any tissue, not air or the scanner's air gaps);
2. the largest 3D connected component (6-connectivity), which keeps the trunk and drops the
   table, blankets, cables and noise specks; limbs that do not touch the trunk in the field of
   view are dropped too;
3. holes filled slice by slice, so the lungs and bowel gas inside the body are kept.

The probability is 1 inside the mask and 0 outside. Use it when the whole body must stay
bit-exact and only the surrounding air may be diffused.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from sender.roi.provider import ProbabilityProvider
from shared.volume import Volume


class BodyProvider(ProbabilityProvider):
    """Probability 1 inside the patient's body, 0 in the air around it.

    Args:
        threshold_hu: voxels above this are tissue (default -500 HU).

    Example:
        >>> provider = BodyProvider()
        >>> hu = np.full((2, 8, 8), -1000, dtype=np.int16); hu[:, 2:6, 2:6] = 40
        >>> vol = Volume(data=hu, affine=np.eye(4), spacing=(1, 1, 1))
        >>> int(provider.probability(vol).sum())
        32
    """

    name = "body"

    def __init__(self, threshold_hu: float = -500.0):
        if not np.isfinite(threshold_hu) or not -1024 <= threshold_hu <= 3071:
            raise ValueError(f"body threshold must be a HU value in [-1024, 3071], "
                             f"got {threshold_hu!r}")
        self.threshold_hu = float(threshold_hu)

    def probability(self, volume: Volume) -> np.ndarray:
        tissue = volume.data > self.threshold_hu
        labels, count = ndimage.label(tissue)
        if count == 0:
            return np.zeros(volume.shape, dtype=np.float32)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        sizes[0] = 0
        body = labels == int(np.argmax(sizes))
        for k in range(body.shape[0]):
            body[k] = ndimage.binary_fill_holes(body[k])
        return body.astype(np.float32)

    def describe(self) -> dict:
        return {"provider": self.name, "threshold_hu": self.threshold_hu}
