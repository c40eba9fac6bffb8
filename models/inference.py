"""Liver probability of a whole CT volume with the 2D U-Net, slice batch by slice batch.

For each batch of axial slices (in canonical orientation, see :mod:`models.preprocessing`):
window, resample in-plane to the network's pixel size, pad, run the network, take the
sigmoid ``p = 1 / (1 + exp(-logit))``, crop, resample back to the native in-plane grid
(bilinear, a convex combination, so ``p`` stays in ``[0, 1]``) and undo the orientation.
Inference runs in float32 on CPU and CUDA alike (no autocast), so both give the same map up
to floating-point summation order (and TF32 convolutions on recent GPUs).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from models.preprocessing import (
    canonical_spacing,
    from_canonical,
    network_size,
    pad_to_multiple,
    resize,
    to_canonical,
    window,
)
from models.unet import LiverUNet
from shared.progress import progress as progress_display

log = logging.getLogger("dlad.models")


@torch.inference_mode()
def predict_probability(model: LiverUNet, hu: np.ndarray, affine: np.ndarray, spacing,
                        batch_size: int = 8, progress: bool = False) -> np.ndarray:
    """Per-voxel liver probability of a slice-major HU volume.

    Args:
        model: network in evaluation mode, on the device to run on.
        hu: ``(nz, ny, nx)`` Hounsfield units.
        affine: 4x4 voxel-to-RAS+ matrix of ``hu``'s grid (gives the orientation).
        spacing: ``(sx, sy, sz)`` voxel size in mm.
        batch_size: slices per forward pass (memory vs. speed).
        progress: show the slice batches done (when this module's log shows INFO, as the
            command lines' do: a bar on a terminal, plain lines in a log).

    Returns:
        float32 probabilities of ``hu``'s shape, in ``[0, 1]``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    config = model.config
    device = next(model.parameters()).device
    canonical = to_canonical(hu, affine)
    sx, sy, _ = canonical_spacing(spacing, affine)
    native_size = canonical.shape[1:]
    size = network_size(native_size, (sx, sy), config.spacing_mm)
    low, high = config.window
    probability = np.empty(canonical.shape, dtype=np.float32)
    starts = range(0, canonical.shape[0], batch_size)
    for start in progress_display(starts, desc="liver U-Net", unit="batch", disable=not progress,
                                  logger=log):
        block = np.ascontiguousarray(canonical[start:start + batch_size], dtype=np.float32)
        slices = torch.from_numpy(block)[:, None].to(device)
        slices = resize(window(slices, low, high), size)
        slices, (height, width) = pad_to_multiple(slices, config.size_multiple, -1.0)
        logits = model(slices.contiguous(memory_format=torch.channels_last))
        block_probability = torch.sigmoid(logits[:, :, :height, :width].float())
        block_probability = resize(block_probability, native_size).clamp_(0.0, 1.0)
        probability[start:start + batch_size] = block_probability[:, 0].cpu().numpy()
    return np.ascontiguousarray(from_canonical(probability, affine))
