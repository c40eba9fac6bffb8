"""Geometry helpers shared by sender and receiver: physical-space alignment of voxel grids.

Conventions: arrays are slice-major ``data[k, j, i]``; affines map ``(i, j, k, 1)`` to RAS+ mm
(NIfTI). ITK's LPS world is converted at load time, so every affine here is RAS+.
"""

from __future__ import annotations

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def itk_geometry_to_affine(direction: np.ndarray, spacing, origin) -> np.ndarray:
    """RAS+ affine from ITK's LPS direction cosines, spacing and origin."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=np.float64) @ np.diag(np.asarray(spacing, float))
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return LPS_TO_RAS @ affine


def resample_nearest(values: np.ndarray, source_affine: np.ndarray, target_shape,
                     target_affine: np.ndarray, fill=0) -> np.ndarray:
    """Sample ``values`` (slice-major) at the centres of the target grid, nearest neighbour.

    The target voxel ``(i, j, k)`` goes to world space through ``target_affine`` and back to a
    source index through the inverse of ``source_affine``; target voxels that fall outside the
    source grid get ``fill``. Two grids that differ by a flip or an axis permutation map
    exactly, voxel for voxel. Works one target slice at a time to bound memory.
    """
    values = np.asarray(values)
    nz, ny, nx = (int(n) for n in target_shape)
    index_map = np.linalg.inv(np.asarray(source_affine, float)) @ np.asarray(target_affine, float)
    out = np.full((nz, ny, nx), fill, dtype=values.dtype)
    sz, sy, sx = values.shape
    jj, ii = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64),
                         indexing="ij")
    for k in range(nz):
        coords = [index_map[r, 0] * ii + index_map[r, 1] * jj + index_map[r, 2] * k + index_map[r, 3]
                  for r in range(3)]
        # Round half away from zero is irrelevant here: aligned grids land on integers up to
        # float error, which np.rint absorbs.
        si, sj, sk = (np.rint(c).astype(np.int64) for c in coords)
        inside = (si >= 0) & (si < sx) & (sj >= 0) & (sj < sy) & (sk >= 0) & (sk < sz)
        out[k][inside] = values[sk[inside], sj[inside], si[inside]]
    return out
