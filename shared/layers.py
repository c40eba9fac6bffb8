"""Layer arithmetic shared by the encoder and the receiver.

Layer 0 is a base (lossy HEVC of the diffused volume, or a lossless coding of it). Layers 1 and
2 are residuals ``original - base`` restricted to the ROI (layer 1) or to the rest (layer 2).
Residuals wrap modulo 2^16, so every int16 pair has a representable difference and
``base + residual`` restores the original bit for bit. A residual is only valid on the exact
base it was computed against: chunks carry a digest of that base block, and the receiver refuses
a residual whose base differs (after a resume with a different encoder build, say).

What the receiver claims is proven against digests of the *original* voxels: the header carries
:func:`roi_digest` of every block's ROI voxels (checked after layers 0+1, or after a lossless
layer 0) and the SHA-256 of the whole volume (checked after the exact layer).
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

#: Domain prefix of :func:`roi_digest` (version 1 of its canonical byte order).
ROI_DIGEST_PREFIX = b"dlad-roi-sha256-v1"


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


def roi_digest(voxels: np.ndarray, roi, z0: int) -> bytes:
    """SHA-256 of the ROI voxels of the block of slices ``[z0, z0 + len(voxels))``.

    Canonical bytes: :data:`ROI_DIGEST_PREFIX`, then ``z0`` and ``z1`` as little-endian uint32
    (the digest is bound to its slice range), then for each slice of the block in order, its
    ROI voxels as int16 little-endian in C order (row by row, column by column). ``roi`` is the
    block's bool mask, or a function ``roi(z)`` returning the mask of slice ``z`` (the receiver
    unpacks its bit-packed mask one slice at a time). Equal digests mean equal ROI voxels, so
    the receiver reports a block's ROI exact only when its decoded voxels hash to the sender's
    digest of the original.

    >>> block = np.array([[[1, 2], [3, 4]]], dtype=np.int16)
    >>> mask = np.array([[[True, False], [False, True]]])
    >>> roi_digest(block, mask, z0=5).hex()[:16]
    '3076b0220553340c'

    The same bytes by hand: prefix, z0 = 5 and z1 = 6, the ROI voxels 1 and 4:

    >>> payload = ROI_DIGEST_PREFIX + struct.pack("<II", 5, 6) + np.array([1, 4], "<i2").tobytes()
    >>> hashlib.sha256(payload).hexdigest()[:16]
    '3076b0220553340c'
    """
    digest = hashlib.sha256(ROI_DIGEST_PREFIX)
    digest.update(struct.pack("<II", z0, z0 + len(voxels)))
    for index in range(len(voxels)):
        mask = roi(z0 + index) if callable(roi) else roi[index]
        digest.update(np.ascontiguousarray(voxels[index][mask], dtype="<i2"))
    return digest.digest()
