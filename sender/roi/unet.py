"""Liver probability from the bundled 2D U-Net (models/unet.py), on CUDA when present.

The network sees every axial slice windowed to ``[-200, 300]`` HU and resampled in-plane to
2 mm, in the radiological orientation (the volume's axes are permuted and flipped through its
affine, never interpolated); its probabilities are resampled back to the native grid
(:mod:`models.inference`). Slices are processed in batches of ``batch_size``.

Determinism: the same input gives the same map on the same device (evaluation-mode batch
normalisation, no dropout, no sampling). CPU and CUDA agree to within
:data:`CPU_CUDA_TOLERANCE` per voxel (float32 on both; CUDA may use TF32 convolutions).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from models.device import resolve_device
from models.inference import predict_probability
from models.unet import BUNDLED_WEIGHTS, load_weights
from sender.roi.provider import ProbabilityProvider
from sender.roi.steering import DEFAULT_Z_MARGIN_MM
from shared.volume import Volume

#: Largest per-voxel probability difference expected between CPU and CUDA inference.
CPU_CUDA_TOLERANCE = 1e-2


class UNetProvider(ProbabilityProvider):
    """Per-voxel liver probability predicted slice by slice by a 2D U-Net.

    Args:
        weights: a weights file written by ``scripts/train_liver_unet.py``; ``None`` for the
            weights bundled with the sender (``models/liver_unet.pt``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` picks CUDA when available.
        batch_size: slices per forward pass; memory grows linearly with it.

    Example:
        >>> provider = UNetProvider()                           # doctest: +SKIP
        >>> probability = provider.probability(volume)          # doctest: +SKIP
        >>> probability.shape == volume.shape                   # doctest: +SKIP
        True
    """

    name = "unet"
    #: The prediction can miss a few slices of the liver (a tip, a lesion at the edge):
    #: docs/UNET.md measures the margin.
    z_margin_mm = DEFAULT_Z_MARGIN_MM

    def __init__(self, weights=None, device: str | None = None, batch_size: int = 8):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.weights = BUNDLED_WEIGHTS if weights is None else Path(weights)
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.model = load_weights(self.weights, self.device)

    def probability(self, volume: Volume) -> np.ndarray:
        return predict_probability(self.model, volume.data, volume.affine, volume.spacing,
                                   batch_size=self.batch_size, progress=True)

    def describe(self) -> dict:
        digest = hashlib.sha256(self.weights.read_bytes()).hexdigest()
        return {"provider": self.name, "weights": self.weights.name,
                "weights_sha256": digest[:16], "device": self.device.type,
                "spacing_mm": self.model.config.spacing_mm,
                "window_hu": list(self.model.config.window)}
