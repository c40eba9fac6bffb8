"""Training augmentations of the liver U-Net: one ``(HU, liver)`` slice pair at a time.

Every function takes its randomness from the ``numpy.random.Generator`` it is given and from
nothing else, so a batch is a pure function of ``(seed, step)`` (a resumed run draws what an
uninterrupted one would). HU are float tensors of shape ``(H, W)``; the liver target is a
fraction in ``[0, 1]`` of the same shape.

* :func:`geometric`: crop, rotation, zoom, optional flip, elastic deformation (image and
  target alike);
* :func:`appearance`: contrast uptake of soft tissue, brightness/contrast, resolution loss,
  noise;
* :func:`add_lesions`: synthetic focal lesions painted into the liver (the target keeps them
  as liver: a lesion belongs to the ROI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.phantoms import insert_lesion
from models.preprocessing import resize

#: HU given to pixels that a crop or rotation brings in from outside the scan.
AIR_HU = -1024.0
#: Semi-axes of synthetic lesions in network pixels (2 mm: 6-40 mm) and lesions per slice.
LESION_RADIUS_PX = (3.0, 20.0)
LESION_COUNT = (1, 3)


@dataclass(frozen=True)
class GeometrySettings:
    """Ranges of the geometric augmentation (:func:`geometric`)."""

    rotation_deg: float = 15.0
    """Largest rotation, degrees either way."""
    scale: float = 0.2
    """Largest zoom change, log-symmetric (0.2: x0.83 to x1.2)."""
    elastic_px: float = 8.0
    """Elastic displacement amplitude in pixels (0: none)."""
    flip_prob: float = 0.0
    """Probability of a left-right flip."""

    def __post_init__(self):
        if min(self.rotation_deg, self.scale, self.elastic_px) < 0:
            raise ValueError("rotation, scale and elastic amplitude must be >= 0, got "
                             f"{self.rotation_deg}, {self.scale}, {self.elastic_px}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {self.flip_prob}")


def crop_centre(hu: torch.Tensor, liver: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    """``(x, y)`` pixel to centre a crop on: a liver pixel (70 %), else a body pixel.

    ``liver`` is the stored uint8 target (liver fraction x 255).
    """
    candidates = liver > 127 if rng.uniform() < 0.7 else hu > -500
    if not candidates.any():
        candidates = hu > -500
    if not candidates.any():
        return np.array([(hu.shape[1] - 1) / 2, (hu.shape[0] - 1) / 2])
    rows, cols = torch.nonzero(candidates, as_tuple=True)
    pick = int(rng.integers(len(rows)))
    return np.array([float(cols[pick]), float(rows[pick])])


def geometric(hu: torch.Tensor, liver: torch.Tensor, size: int, settings: GeometrySettings,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented ``(HU, liver fraction)`` pair of ``size x size`` pixels from a slice.

    Args:
        hu: stored slice, ``(H, W)`` HU (any dtype).
        liver: stored target, ``(H, W)`` uint8 liver fraction x 255.
        size: side of the output crop in pixels.
        settings: the ranges drawn from.
        rng: the only source of randomness.

    Output pixel ``o`` samples the stored slice at ``c + A (o - o_c) + d(o)`` (bilinear), with
    ``A = R(theta) diag(z_x, z_y) diag(f, 1)``: rotation ``theta``, zoom ``z`` and an optional
    left-right flip ``f = -1``; ``c`` is the crop centre (jittered) and ``d`` a smooth elastic
    displacement (Ronneberger et al. 2015): random vectors in ``[-1, 1]^2`` times
    ``elastic_px`` on a 5 x 5 grid over the crop, interpolated bicubically.
    """
    stored_liver = liver
    hu = hu.float()
    liver = liver.float() / 255.0
    height, width = hu.shape
    centre = crop_centre(hu, stored_liver, rng) + rng.uniform(-0.25, 0.25, 2) * size
    theta = math.radians(rng.uniform(-settings.rotation_deg, settings.rotation_deg))
    zoom = math.exp(rng.uniform(-math.log1p(settings.scale), math.log1p(settings.scale)))
    zoom_x, zoom_y = zoom * rng.uniform(0.95, 1.05), zoom * rng.uniform(0.95, 1.05)
    flip = -1.0 if rng.uniform() < settings.flip_prob else 1.0
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    matrix = rotation @ np.diag([zoom_x * flip, zoom_y])
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    out_y, out_x = torch.meshgrid(offsets, offsets, indexing="ij")
    source_x = centre[0] + matrix[0, 0] * out_x + matrix[0, 1] * out_y
    source_y = centre[1] + matrix[1, 0] * out_x + matrix[1, 1] * out_y
    if settings.elastic_px > 0:
        control = torch.from_numpy(rng.uniform(-1.0, 1.0, (1, 2, 5, 5)))
        displacement = F.interpolate(control, size=(size, size), mode="bicubic",
                                     align_corners=True)[0] * settings.elastic_px
        source_x, source_y = source_x + displacement[0], source_y + displacement[1]
    # grid_sample's normalised coordinates for align_corners=False.
    grid = torch.stack([(2 * source_x + 1) / width - 1, (2 * source_y + 1) / height - 1], dim=-1)
    stacked = torch.stack([hu - AIR_HU, liver])[None]
    sampled = F.grid_sample(stacked, grid[None].float(), mode="bilinear", padding_mode="zeros",
                            align_corners=False)[0]
    return sampled[0] + AIR_HU, sampled[1]


def appearance(hu: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Contrast, brightness, resolution and noise changes of one ``(H, W)`` HU crop.

    * contrast-agent uptake: ``h += d w(h)`` with ``w = clip((h + 30) / 80, 0, 1)``, so soft
      tissue and vessels shift by ``d`` in [-50, 60] HU while fat and air stay;
    * global: ``h = (h - 40) a + 40 + b``, ``a`` in [0.85, 1.2], ``b`` in [-20, 20] HU;
    * resolution loss (30 %): shrink by [0.4, 0.9] and enlarge back (thick or smooth scans);
    * noise (50 %): Gaussian, standard deviation up to 25 HU.
    """
    uptake = rng.uniform(-50, 60) * ((hu + 30) / 80).clamp(0, 1)
    hu = hu + uptake
    hu = (hu - 40) * rng.uniform(0.85, 1.2) + 40 + rng.uniform(-20, 20)
    if rng.uniform() < 0.3:
        factor = rng.uniform(0.4, 0.9)
        small = (max(8, round(hu.shape[0] * factor)), max(8, round(hu.shape[1] * factor)))
        hu = resize(resize(hu[None, None], small), hu.shape)[0, 0]
    if rng.uniform() < 0.5:
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        hu = hu + torch.randn(hu.shape, generator=generator) * rng.uniform(0, 25)
    return hu


def add_lesions(hu: torch.Tensor, liver: torch.Tensor, rng: np.random.Generator
                ) -> torch.Tensor:
    """1-3 synthetic lesions (:func:`models.phantoms.insert_lesion`) in the liver of a crop."""
    if not bool((liver > 0.5).any()):
        return hu
    painted = hu.numpy().copy()
    for _ in range(int(rng.integers(LESION_COUNT[0], LESION_COUNT[1] + 1))):
        insert_lesion(painted, liver.numpy(), rng, radius_px=LESION_RADIUS_PX)
    return torch.from_numpy(painted)
