"""The sending order of a study: ROI first, most-ROI blocks first, exact layer last.

Slices are cut into fixed blocks of ``group`` consecutive slices (one chunk per block and
layer). The plan sends, in this order:

1. blocks that hold ROI voxels, most ROI voxels first: layer 0 (base) then layer 1 (ROI
   residual) of each, so the liver becomes bit-exact as early as possible;
2. the other blocks' layer 0, from the ROI outwards (nearest block first);
3. layer 2 (outside-ROI residual) of every block, in the same block order as 1 and 2.

Any prefix of the plan decodes to a usable volume: every chunk needs at most its own block's
base, which always comes earlier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PlannedChunk:
    """One entry of the plan: which layer of which slices, at which position."""

    seq: int
    """Position in the sending order (also the chunk's id)."""
    layer: int
    """0 base, 1 ROI residual, 2 outside-ROI residual."""
    z0: int
    """First slice of the block."""
    z1: int
    """One past the last slice of the block."""

    def as_entry(self) -> tuple[int, int, int, int]:
        return (self.seq, self.layer, self.z0, self.z1)


def plan_chunks(roi: np.ndarray, group: int, layers: tuple[int, ...]) -> list[PlannedChunk]:
    """Sending order for a slice-major ``roi`` mask; ``layers`` names the layers to send."""
    if group < 1:
        raise ValueError(f"slices per chunk must be >= 1, got {group}")
    nz = roi.shape[0]
    blocks = [(z0, min(z0 + group, nz)) for z0 in range(0, nz, group)]
    roi_voxels = [int(roi[z0:z1].sum()) for z0, z1 in blocks]
    roi_slices = np.flatnonzero(roi.reshape(nz, -1).any(axis=1))
    with_roi = sorted((b for b, count in zip(blocks, roi_voxels) if count),
                      key=lambda b: (-roi_voxels[blocks.index(b)], b[0]))
    without_roi = [b for b, count in zip(blocks, roi_voxels) if not count]
    if roi_slices.size:
        # Outward from the ROI: distance from the block to the nearest ROI slice.
        without_roi.sort(key=lambda b: (int(np.min(np.abs(roi_slices - (b[0] + b[1] - 1) / 2))), b[0]))
    entries: list[tuple[int, int, int]] = []
    for z0, z1 in with_roi:
        entries.append((0, z0, z1))
        if 1 in layers:
            entries.append((1, z0, z1))
    entries.extend((0, z0, z1) for z0, z1 in without_roi)
    if 2 in layers:
        entries.extend((2, z0, z1) for z0, z1 in with_roi + without_roi
                       if int(roi[z0:z1].sum()) < roi[z0:z1].size)
    return [PlannedChunk(seq, layer, z0, z1) for seq, (layer, z0, z1) in enumerate(entries)]
