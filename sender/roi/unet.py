"""Liver probability from the bundled 2D U-Net (models/unet.py), on CUDA when present.

The network sees every axial slice windowed to ``[-200, 300]`` HU and resampled in-plane to
2 mm, in the radiological orientation (the volume's axes are permuted and flipped through its
affine, never interpolated); its probabilities are resampled back to the native grid
(:mod:`models.inference`). Slices are processed in batches of ``batch_size``.

Determinism: the same input gives the same map on the same device (evaluation-mode batch
normalisation, no dropout, no sampling); on CPU bit for bit whatever the batch size and the
number of threads (one slice per forward pass, one torch thread per worker:
:mod:`models.inference`). CPU and CUDA agree to within :data:`CPU_CUDA_TOLERANCE` per voxel
(float32 on both; CUDA may use TF32 convolutions).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from models.device import resolve_device
from models.inference import predict_probability
from models.unet import BUNDLED_ENSEMBLE, load_weights
from sender.roi.provider import ProbabilityProvider
from sender.roi.steering import DEFAULT_UNCERTAIN_THRESHOLD, DEFAULT_Z_MARGIN_MM
from shared.volume import Volume

#: Largest per-voxel probability difference expected between CPU and CUDA inference.
CPU_CUDA_TOLERANCE = 1e-2


class UNetProvider(ProbabilityProvider):
    """Per-voxel liver probability predicted slice by slice by a 2D U-Net.

    Args:
        weights: a weights file written by ``scripts/train_liver_unet.py``, or several (an
            ensemble: their probabilities are averaged); ``None`` for the ensemble bundled
            with the sender (``models/liver_unet.pt`` and ``models/liver_unet_dom.pt``,
            :data:`models.unet.BUNDLED_ENSEMBLE`).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` picks CUDA when available.
        batch_size: slices per forward pass on CUDA (memory grows linearly with it); on CPU,
            slices per worker's turn (each forward pass takes one).
        flips: test-time augmentation with left-right mirrored slices (twice the cost).

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
    #: Low but non-zero probabilities attached to the predicted liver join the ROI:
    #: docs/UNET.md measures the threshold.
    uncertain_threshold = DEFAULT_UNCERTAIN_THRESHOLD

    def __init__(self, weights=None, device: str | None = None, batch_size: int = 8,
                 flips: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if weights is None:
            weights = list(BUNDLED_ENSEMBLE)
        elif isinstance(weights, str | Path):
            weights = [weights]
        self.weights = [Path(path) for path in weights]
        if not self.weights:
            raise ValueError("weights: give at least one weights file")
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.flips = bool(flips)
        self.models = [load_weights(path, self.device) for path in self.weights]

    @property
    def model(self):
        """The (first) network."""
        return self.models[0]

    def probability(self, volume: Volume) -> np.ndarray:
        return predict_probability(self.models, volume.data, volume.affine, volume.spacing,
                                   batch_size=self.batch_size, flips=self.flips, progress=True)

    def describe(self) -> dict:
        digests = [hashlib.sha256(path.read_bytes()).hexdigest()[:16] for path in self.weights]
        description = {"provider": self.name, "weights": self.weights[0].name,
                       "weights_sha256": digests[0], "device": self.device.type,
                       "spacing_mm": self.model.config.spacing_mm,
                       "window_hu": list(self.model.config.window)}
        if len(self.weights) > 1:
            description["ensemble"] = [{"weights": path.name, "weights_sha256": digest}
                                       for path, digest in zip(self.weights, digests, strict=True)]
        if self.flips:
            description["test_time_flips"] = True
        return description
