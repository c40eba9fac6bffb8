"""From a probability map to the diffusion-steering map and the bit-exact ROI (Luu et al.).

The paper dilates the CNN's liver probability map slice by slice with a 30x30x1 disc, then sets
``p := 1`` wherever ``p > 0.75``. The ROI is every voxel with ``p == 1``: diffusion leaves it
untouched (its coefficient ``(1 - p) exp(-|grad I|/K)`` is 0) and the layered codec sends it
bit-exact. Elsewhere ``p`` stays soft, so diffusion fades in smoothly around the ROI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import maximum_filter1d


@dataclass(frozen=True)
class SteeringSettings:
    """How a probability map becomes the ROI."""

    dilation_radius_px: float = 15.0
    """In-plane disc radius in pixels (the paper's 30x30x1 disc); ignored if a mm radius is set."""
    dilation_radius_mm: float | None = None
    """In-plane disc radius in millimetres (an ellipse in pixels when spacing is anisotropic)."""
    threshold: float = 0.75
    """After dilation, probabilities above this become exactly 1 (part of the ROI)."""

    def __post_init__(self):
        if not 0.0 <= self.dilation_radius_px <= 512:
            raise ValueError(f"dilation radius must be in [0, 512] px, got {self.dilation_radius_px}")
        if self.dilation_radius_mm is not None and not 0.0 <= self.dilation_radius_mm <= 500:
            raise ValueError(f"dilation radius must be in [0, 500] mm, got {self.dilation_radius_mm}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")

    def radii_px(self, spacing) -> tuple[float, float]:
        """Disc radii ``(rx, ry)`` in pixels for in-plane ``spacing = (sx, sy, ...)``."""
        if self.dilation_radius_mm is None:
            return self.dilation_radius_px, self.dilation_radius_px
        return self.dilation_radius_mm / spacing[0], self.dilation_radius_mm / spacing[1]


@dataclass
class SteeringMap:
    """The post-processed probability map and the ROI it defines."""

    probability: np.ndarray
    """float32, shape of the volume: dilated, thresholded probability (1.0 inside the ROI)."""
    roi: np.ndarray
    """bool, shape of the volume: ``probability == 1``; sent bit-exact."""

    @property
    def roi_fraction(self) -> float:
        return float(self.roi.mean())


def disc_dilate(values: np.ndarray, radius_x: float, radius_y: float) -> np.ndarray:
    """Grey-level dilation of every slice of ``values`` (slice-major) by an elliptical disc.

    The disc is a union of horizontal segments, one per row offset ``dy``, of half-width
    ``floor(rx * sqrt(1 - (dy/ry)^2))``; each segment is a 1D running maximum (van Herk), so the
    cost grows with the radius, not with its square.
    """
    ry = int(np.floor(radius_y))
    if ry < 1 and radius_x < 1:
        return values.copy()
    half_widths = {}
    for dy in range(-ry, ry + 1):
        ratio = 1.0 - (dy / radius_y) ** 2 if radius_y > 0 else 1.0
        half_widths[dy] = int(np.floor(radius_x * np.sqrt(max(ratio, 0.0)) + 1e-9))
    row_max = {w: maximum_filter1d(values, size=2 * w + 1, axis=2, mode="constant", cval=-np.inf)
               if w > 0 else values for w in set(half_widths.values())}
    out = np.array(values, copy=True)
    ny = values.shape[1]
    for dy, w in half_widths.items():
        shifted = row_max[w]
        # out[:, y] = max(out[:, y], shifted[:, y + dy]) for the rows that exist.
        if dy >= 0:
            np.maximum(out[:, : ny - dy], shifted[:, dy:], out=out[:, : ny - dy])
        else:
            np.maximum(out[:, -dy:], shifted[:, : ny + dy], out=out[:, -dy:])
    return out


def steer(probability: np.ndarray, spacing, settings: SteeringSettings = SteeringSettings()
          ) -> SteeringMap:
    """Dilate per slice, set ``p := 1`` where ``p > threshold``, and return the ROI."""
    p = np.clip(np.asarray(probability, dtype=np.float32), 0.0, 1.0)
    rx, ry = settings.radii_px(spacing)
    p = disc_dilate(p, rx, ry)
    p[p > settings.threshold] = 1.0
    return SteeringMap(probability=p, roi=p == 1.0)
