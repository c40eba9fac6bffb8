"""A box in patient space as ROI, for a region known in advance (say, a planned needle path).

The box is given as ``x0,x1,y0,y1,z0,z1`` in millimetres of the RAS+ world of the volume's
affine (NIfTI convention: x grows toward the patient's Right, y toward Anterior, z toward
Superior; a DICOM LPS position ``(x, y, z)`` is ``(-x, -y, z)`` here). A voxel belongs to the
ROI (probability 1) when its centre ``A (i, j, k, 1)^T`` lies in
``[x0, x1] x [y0, y1] x [z0, z1]`` (bounds included); every other voxel gets 0.
"""

from __future__ import annotations

import math

import numpy as np

from sender.roi.provider import ProbabilityProvider
from shared.volume import Volume, VolumeError


class BoxProvider(ProbabilityProvider):
    """Probability 1 for voxels whose centres lie in an axis-aligned RAS+ box (mm).

    Args:
        bounds: ``(x0, x1, y0, y1, z0, z1)`` with ``x0 < x1``, ``y0 < y1``, ``z0 < z1``.

    Example:
        >>> provider = BoxProvider.from_spec("-50,50,-20.5,80,0,100")
        >>> provider.bounds
        (-50.0, 50.0, -20.5, 80.0, 0.0, 100.0)
    """

    name = "box"

    def __init__(self, bounds):
        values = tuple(float(v) for v in bounds)
        if len(values) != 6:
            raise ValueError(f"a box needs 6 bounds x0,x1,y0,y1,z0,z1 (mm), got {len(values)}")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"box bounds must be finite numbers, got {values}")
        for axis, low, high in zip("xyz", values[0::2], values[1::2], strict=True):
            if not low < high:
                raise ValueError(f"box bounds need {axis}0 < {axis}1, got {axis}0={low:g} "
                                 f"{axis}1={high:g}")
        self.bounds = values

    @classmethod
    def from_spec(cls, spec: str) -> BoxProvider:
        """Parse ``"x0,x1,y0,y1,z0,z1"`` (mm, RAS+), as given to ``--roi box:...``."""
        if not isinstance(spec, str):
            raise ValueError(f"a box spec is a string 'x0,x1,y0,y1,z0,z1', got {spec!r}")
        parts = [part.strip() for part in spec.split(",")]
        if len(parts) != 6:
            raise ValueError(f"box spec {spec!r} has {len(parts)} values; expected 6 "
                             "comma-separated numbers x0,x1,y0,y1,z0,z1 in RAS+ mm")
        try:
            values = [float(part) for part in parts]
        except ValueError:
            raise ValueError(f"box spec {spec!r}: every value must be a number (mm), e.g. "
                             "'-120,40,-80,90,-300,-150'") from None
        return cls(values)

    def probability(self, volume: Volume) -> np.ndarray:
        nz, ny, nx = volume.shape
        x0, x1, y0, y1, z0, z1 = self.bounds
        affine = volume.affine
        jj, ii = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64),
                             indexing="ij")
        inside = np.empty(volume.shape, dtype=bool)
        for k in range(nz):  # one slice at a time bounds the memory
            world = [affine[r, 0] * ii + affine[r, 1] * jj + affine[r, 2] * k + affine[r, 3]
                     for r in range(3)]
            inside[k] = ((world[0] >= x0) & (world[0] <= x1) & (world[1] >= y0)
                         & (world[1] <= y1) & (world[2] >= z0) & (world[2] <= z1))
        if not inside.any():
            raise VolumeError(f"the ROI box {self.spec} (RAS+ mm) contains no voxel centre of "
                              "the CT; check the coordinates against the scan's extent")
        return inside.astype(np.float32)

    @property
    def spec(self) -> str:
        return ",".join(f"{v:g}" for v in self.bounds)

    def describe(self) -> dict:
        return {"provider": self.name, "box_ras_mm": list(self.bounds)}
