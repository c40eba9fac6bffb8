"""The interface every liver-probability provider implements.

A provider looks at a CT volume and returns, for every voxel, the probability that it belongs to
the region that must reach the receiver bit-exact (the liver). The paper's post-processing
(:mod:`sender.roi.steering`) then dilates and thresholds that map; providers never do.
"""

from __future__ import annotations

import abc

import numpy as np

from shared.volume import Volume


class ProbabilityProvider(abc.ABC):
    """Maps a CT volume to a per-voxel ROI probability in ``[0, 1]``."""

    #: Short name shown in logs and stored in the stream header (``mask``, ``unet``, ``body``...).
    name: str = "provider"

    #: Margin across slices (mm) the sender adds to this provider's ROI unless told otherwise
    #: (:class:`sender.roi.steering.SteeringSettings`): none for a mask drawn or checked by
    #: someone, a safety margin for a prediction that can miss a few slices (the U-Net).
    z_margin_mm: float = 0.0

    #: Uncertainty margin the sender applies to this provider's map unless told otherwise
    #: (:class:`sender.roi.steering.SteeringSettings`): none for a mask, a threshold for a
    #: prediction whose uncertain fringe should join the ROI (the U-Net).
    uncertain_threshold: float = 0.0

    @abc.abstractmethod
    def probability(self, volume: Volume) -> np.ndarray:
        """Return float32 probabilities of shape ``volume.shape`` (slice-major)."""

    def describe(self) -> dict:
        """Facts about the provider worth recording in the stream header (JSON-able)."""
        return {"provider": self.name}


class StaticMaskProvider(ProbabilityProvider):
    """A mask already aligned with the volume (the built-in phantom's own liver, say)."""

    name = "static-mask"

    def __init__(self, mask: np.ndarray, label: str = "given mask"):
        self.mask = np.asarray(mask, dtype=bool)
        self.label = label

    def probability(self, volume: Volume) -> np.ndarray:
        if self.mask.shape != volume.shape:
            raise ValueError(f"mask shape {self.mask.shape} != volume shape {volume.shape}")
        return self.mask.astype(np.float32)

    def describe(self) -> dict:
        return {"provider": self.name, "source": self.label}
