"""Liver probability of a whole CT volume with the 2D U-Net, slice batch by slice batch.

For each batch of axial slices (in canonical orientation, see :mod:`models.preprocessing`,
with the padding outside the field of view turned into air): window, resample in-plane to
the network's pixel size, pad, run the network, take the sigmoid
``p = 1 / (1 + exp(-logit))``, crop, resample back to the native in-plane grid
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
    suppress_padding,
    to_canonical,
    window,
)
from models.unet import LiverUNet
from shared.progress import progress as progress_display

log = logging.getLogger("dlad.models")


def _members(model) -> list[LiverUNet]:
    members = list(model) if isinstance(model, list | tuple) else [model]
    if not members:
        raise ValueError("no network given")
    config = members[0].config
    for member in members[1:]:
        if (member.config.spacing_mm, member.config.window) != (config.spacing_mm, config.window):
            raise ValueError("ensemble members must share the preprocessing (pixel size and "
                             f"HU window): {member.config} vs {config}")
    return members


@torch.inference_mode()
def predict_probability(model: LiverUNet | list[LiverUNet], hu: np.ndarray, affine: np.ndarray,
                        spacing, batch_size: int = 8, progress: bool = False,
                        flips: bool = False) -> np.ndarray:
    """Per-voxel liver probability of a slice-major HU volume.

    Args:
        model: network in evaluation mode, on the device to run on; or a list of such
            networks with the same preprocessing (an ensemble: their probabilities are
            averaged).
        hu: ``(nz, ny, nx)`` Hounsfield units.
        affine: 4x4 voxel-to-RAS+ matrix of ``hu``'s grid (gives the orientation).
        spacing: ``(sx, sy, sz)`` voxel size in mm.
        batch_size: slices per forward pass (memory vs. speed).
        progress: show the slice batches done (when this module's log shows INFO, as the
            command lines' do: a bar on a terminal, plain lines in a log).
        flips: test-time augmentation: also run every network on the slices mirrored left to
            right, mirror the result back and average it in (twice the cost).

    Returns:
        float32 probabilities of ``hu``'s shape, in ``[0, 1]``: the mean of
        ``sigmoid(network(x))`` over the members (and the mirrored inputs).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    members = _members(model)
    config = members[0].config
    device = next(members[0].parameters()).device
    canonical = suppress_padding(to_canonical(hu, affine))
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
        total, count = None, 0
        for mirrored in ((False, True) if flips else (False,)):
            # A mirrored slice is padded like any other (bottom and right), so the network sees
            # exactly what it would see of a mirrored scan.
            view = torch.flip(slices, dims=[-1]) if mirrored else slices
            padded, (height, width) = pad_to_multiple(view, config.size_multiple, -1.0)
            padded = padded.contiguous(memory_format=torch.channels_last)
            for member in members:
                p = torch.sigmoid(member(padded).float())[:, :, :height, :width]
                p = torch.flip(p, dims=[-1]) if mirrored else p
                total = p if total is None else total + p
                count += 1
        block_probability = total / count
        block_probability = resize(block_probability, native_size).clamp_(0.0, 1.0)
        probability[start:start + batch_size] = block_probability[:, 0].cpu().numpy()
    return np.ascontiguousarray(from_canonical(probability, affine))
