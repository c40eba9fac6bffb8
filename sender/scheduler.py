"""The sending order of a study: a whole-volume preview, then the ROI, then the exact layer.

Slices are cut into blocks of consecutive slices (one chunk per block and layer; see
:func:`auto_group` for their size). A block is a *ROI block* when it holds ROI voxels, a *plain
block* otherwise. The plan (the header's, in this order):

1. the base (layer 0) of every ROI block, most ROI voxels first: they are needed for the ROI
   anyway, and they make those slices viewable;
2. the base of every plain block, from the ROI outwards (nearest block first): with 1, the whole
   volume is viewable;
3. the ROI residual (layer 1) of every ROI block, in the order of 1: the liver becomes
   bit-exact;
4. layer 2 (outside-ROI voxels, ``--exact``) of every block that has any, ROI blocks first, in
   the order of 1 and 2.

The encoder sends the bases of step 2 before step 3 only as far as they delay the ROI by at most
:data:`PREVIEW_SHARE` of its bytes (measured, see :meth:`sender.encoder.StudyEncoder.frames`);
the others follow step 3. ``dlad-send --out`` writes that order and the transport sends it, live
and replayed (:mod:`sender.transport`). Any prefix of what is sent decodes to a usable volume: a chunk needs
at most its own block's base, which always comes earlier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Voxels a block aims at (sixteen 512 x 512 slices). HEVC predicts between the slices of a
#: block: on the abdomen CT, bases of 10-slice blocks take 48 kB where 4-slice blocks took 62 kB
#: (the whole volume viewable sooner, the liver complete 2.8 % sooner); smaller slices are
#: grouped in more slices per block, so that each chunk's fixed costs (frame, codec headers,
#: context models) are shared by enough voxels (30 slices of 101 x 122 in one block code 2-4 %
#: smaller than in 4-slice blocks). docs/BENCHMARKS.md has the figures.
TARGET_BLOCK_VOXELS = 1 << 22
#: Fewest slices per block, and most: blocks of more slices would make the ROI-first order coarse
#: (the liver spans a few dozen slices) and the first chunk of a live transfer slow to encode.
MIN_GROUP, MAX_GROUP = 4, 32
#: Largest share of the ROI's bytes that bases of plain blocks may take before the ROI residuals
#: (issue 16: a whole-volume view first where it delays "ROI complete" by under 10 %; 8 % leaves
#: room for the estimate of the ROI's bytes).
PREVIEW_SHARE = 0.08


@dataclass(frozen=True)
class PlannedChunk:
    """One entry of the plan: which layer of which slices, at which position."""

    seq: int
    """Position in the header's plan (also the chunk's id)."""
    layer: int
    """0 base, 1 ROI residual, 2 outside-ROI voxels."""
    z0: int
    """First slice of the block."""
    z1: int
    """One past the last slice of the block."""

    def as_entry(self) -> tuple[int, int, int, int]:
        return (self.seq, self.layer, self.z0, self.z1)


def auto_group(shape: tuple[int, int, int]) -> int:
    """Slices per block for a volume of ``shape``: about :data:`TARGET_BLOCK_VOXELS` voxels,
    :data:`MIN_GROUP` to :data:`MAX_GROUP` slices, the volume cut into blocks of nearly equal
    size.

    >>> auto_group((20, 512, 512)), auto_group((30, 101, 122)), auto_group((112, 101, 122))
    (10, 30, 28)
    >>> auto_group((300, 512, 512)), auto_group((40, 1024, 1024))
    (16, 4)
    """
    nz, ny, nx = shape
    group = min(MAX_GROUP, max(MIN_GROUP, round(TARGET_BLOCK_VOXELS / (ny * nx))))
    blocks = math.ceil(nz / group)
    return max(1, math.ceil(nz / blocks))


def plan_chunks(roi: np.ndarray, group: int, layers: tuple[int, ...]) -> list[PlannedChunk]:
    """The plan for a slice-major ``roi`` mask; ``layers`` names the layers to send."""
    if group < 1:
        raise ValueError(f"slices per chunk must be >= 1, got {group}")
    nz = roi.shape[0]
    blocks = [(z0, min(z0 + group, nz)) for z0 in range(0, nz, group)]
    roi_voxels = {block: int(roi[block[0]:block[1]].sum()) for block in blocks}
    roi_slices = np.flatnonzero(roi.reshape(nz, -1).any(axis=1))
    with_roi = sorted((b for b in blocks if roi_voxels[b]), key=lambda b: (-roi_voxels[b], b[0]))
    plain = [b for b in blocks if not roi_voxels[b]]
    if roi_slices.size:
        # Outward from the ROI: distance from the block to the nearest ROI slice.
        plain.sort(key=lambda b: (int(np.min(np.abs(roi_slices - (b[0] + b[1] - 1) / 2))), b[0]))
    entries = [(0, z0, z1) for z0, z1 in with_roi + plain]
    if 1 in layers:
        entries += [(1, z0, z1) for z0, z1 in with_roi]
    if 2 in layers:
        entries += [(2, z0, z1) for z0, z1 in with_roi + plain
                    if roi_voxels[(z0, z1)] < roi[z0:z1].size]
    return [PlannedChunk(seq, layer, z0, z1) for seq, (layer, z0, z1) in enumerate(entries)]
