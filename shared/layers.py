"""Layer arithmetic shared by the encoder and the receiver.

Layer 0 is a base (lossy HEVC of the diffused volume, or a lossless coding of it). Layers 1 and
2 are residuals ``original - base`` restricted to the ROI (layer 1) or to the rest (layer 2).
Residuals wrap modulo 2^16, so every int16 pair has a representable difference and
``base + residual`` restores the original bit for bit. A residual is only valid on the exact
base it was computed against: chunks carry a digest of that base block, and the receiver refuses
a residual whose base differs (after a resume with a different encoder build, say).
"""

from __future__ import annotations

import hashlib

import numpy as np


def clip_base(base: np.ndarray, value_range: tuple[int, int]) -> np.ndarray:
    """Clip decoded lossy base voxels (int16) to the original's HU range, in place, and return
    them (both sides do this to a block they just decoded; in place: no copy of the block)."""
    return np.clip(base, value_range[0], value_range[1], out=base)


def residual(original: np.ndarray, base: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``original - base`` (wrapping int16) inside ``region``, 0 elsewhere."""
    difference = (original.view(np.uint16) - base.view(np.uint16)).view(np.int16)
    return np.where(region, difference, np.int16(0))


def apply_residual(target: np.ndarray, residual_block: np.ndarray, region: np.ndarray) -> None:
    """``target[region] += residual[region]`` with int16 wrap-around, in place.

    The sum is formed in ``residual_block``, which is overwritten: a decoded residual is used
    once, and this spares a temporary the size of the block.
    """
    summed = residual_block.view(np.uint16)
    np.add(summed, target.view(np.uint16), out=summed)
    np.copyto(target, residual_block, where=region)


def block_digest(block: np.ndarray) -> bytes:
    """BLAKE2b-128 of a base block: ties a residual to the base it was computed against."""
    # Hash the block's buffer directly (no bytes copy of the block).
    return hashlib.blake2b(np.ascontiguousarray(block, dtype="<i2"), digest_size=16).digest()
