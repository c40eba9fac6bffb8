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

Augmentations that imitate scans unlike the two labelled ones (the "domain" augmentations,
each with its own probability in :class:`DomainSettings`):

* :func:`contrast_phase`: the liver, its vessels and the other organs remapped to another
  contrast phase (non-contrast and late livers at 38-65 HU, portal and arterial up to 140 HU);
* :func:`reconstruction_kernel`: a smooth or sharp reconstruction kernel and the noise texture
  of another scanner (filtered noise, 5-50 HU);
* :func:`field_of_view`: a circular field of view with a scanner's fill value outside
  (:data:`PADDING_VALUES_HU`), which the preprocessing must turn into air;
* :func:`capsule_lesion`: one large (5-10 cm) hypo- or hyperdense tumour centred within 10 mm
  of the liver's edge, so that it reaches the capsule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.phantoms import insert_lesion
from models.preprocessing import resize, suppress_padding

#: HU given to pixels that a crop or rotation brings in from outside the scan.
AIR_HU = -1024.0
#: Semi-axes of synthetic lesions in network pixels (2 mm: 6-40 mm) and lesions per slice.
LESION_RADIUS_PX = (3.0, 20.0)
LESION_COUNT = (1, 3)
#: Fill values scanners write outside their circular field of view (DICOM PixelPaddingValue
#: after rescaling: -3024 and -2048 are common, -2000 on some, 0 HU where the fill is stored
#: as 1024 with intercept -1024) and plain air.
PADDING_VALUES_HU = (-3024.0, -2048.0, -2000.0, -1024.0, 0.0)
#: Liver parenchyma HU of the phases :func:`contrast_phase` draws: plain CT and the late
#: (equilibrium) phase 38-65 HU (steatosis lower still is left to the global shifts), portal
#: venous and late arterial 65-140 HU.
PLAIN_LIVER_HU = (38.0, 65.0)
ENHANCED_LIVER_HU = (65.0, 140.0)
#: Large tumours: semi-axes 25-50 mm (5-10 cm across), centred at most 10 mm inside the liver.
CAPSULE_LESION_RADIUS_MM = (25.0, 50.0)
CAPSULE_DEPTH_MM = 10.0


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


@dataclass(frozen=True)
class DomainSettings:
    """Probabilities (per slice) of the augmentations that imitate unseen scans."""

    phase_prob: float = 0.0
    """:func:`contrast_phase`: another contrast phase."""
    kernel_prob: float = 0.0
    """:func:`reconstruction_kernel`: another kernel and noise texture."""
    field_of_view_prob: float = 0.0
    """:func:`field_of_view`: a circular field of view with a fill value outside."""
    capsule_lesion_prob: float = 0.0
    """:func:`capsule_lesion`: a 5-10 cm tumour at the capsule."""

    def __post_init__(self):
        for name in ("phase_prob", "kernel_prob", "field_of_view_prob", "capsule_lesion_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    @property
    def active(self) -> bool:
        return any((self.phase_prob, self.kernel_prob, self.field_of_view_prob,
                    self.capsule_lesion_prob))


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


def gaussian_blur(hu: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of an ``(H, W)`` image (``sigma`` in pixels, edges reflected)."""
    if sigma <= 0:
        return hu
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    image = F.pad(hu[None, None].float(), (radius, radius, radius, radius), mode="reflect")
    image = F.conv2d(image, kernel.view(1, 1, 1, -1))
    return F.conv2d(image, kernel.view(1, 1, -1, 1))[0, 0]


def contrast_phase(hu: torch.Tensor, liver: torch.Tensor, rng: np.random.Generator
                   ) -> torch.Tensor:
    """The crop in another contrast phase.

    With ``m`` the median HU of the liver core (``liver > 0.9``; a crop with fewer than 20
    such pixels keeps its liver), a target parenchyma HU ``t`` (half of the draws plain or late:
    :data:`PLAIN_LIVER_HU`, the others :data:`ENHANCED_LIVER_HU`), a vessel gain ``f`` in
    [-0.5, 1.3] (negative: vessels darker than the parenchyma, as without contrast) and an
    organ gain ``g`` in [0.15, 1.3]::

        v = clip((h - m - 15) / 25, 0, 1) l                    (vessels inside the liver)
        h' = h + l (t - m) + v (f - 1) (h - m)                 (liver and its vessels)
        h' = h' + w ((40 + g (h - 40)) - h)                     (other organs)

    where ``w = clip((h - 10) / 30, 0, 1) clip((500 - h) / 150, 0, 1) (1 - l)`` selects
    enhancing soft tissue outside the liver (spleen, kidneys, vessels, bowel wall: ``g`` near
    0.2 collapses them to their plain 40-80 HU; fat, air and cortical bone are untouched).
    Lesions keep their offset from the parenchyma. The target is unchanged.
    """
    core = liver > 0.9
    plain = rng.uniform() < 0.5
    target = rng.uniform(*(PLAIN_LIVER_HU if plain else ENHANCED_LIVER_HU))
    vessel_gain, organ_gain = rng.uniform(-0.5, 1.3), rng.uniform(0.15, 1.3)
    hu = hu.float()
    out = hu.clone()
    if int(core.sum()) >= 20:
        median = float(hu[core].median())
        vessels = ((hu - median - 15) / 25).clamp(0, 1) * liver
        out = out + liver * (target - median) + vessels * (vessel_gain - 1) * (hu - median)
    organs = ((hu - 10) / 30).clamp(0, 1) * ((500 - hu) / 150).clamp(0, 1) * (1 - liver)
    return out + organs * ((40 + organ_gain * (hu - 40)) - hu)


def reconstruction_kernel(hu: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The crop as another scanner's kernel and noise would show it.

    Half of the draws smooth (Gaussian, ``sigma`` 0.5-1.5 px: soft-tissue kernels, thick
    reconstructions), half sharpen (unsharp mask ``h + a (h - G_s h)``, ``a`` in [0.3, 1.2],
    ``s`` in [0.6, 1.5] px: bone and lung kernels). Then noise with CT's texture: white noise
    ``n``, high-passed ``n - G_b n`` (``b`` in [1, 3] px: filtered back-projection removes low
    frequencies), low-passed by ``G_c`` (``c`` in [0, 0.8] px: the kernel's cut-off), scaled to a
    standard deviation of 5-50 HU.
    """
    hu = hu.float()
    if rng.uniform() < 0.5:
        hu = gaussian_blur(hu, rng.uniform(0.5, 1.5))
    else:
        amount, sigma = rng.uniform(0.3, 1.2), rng.uniform(0.6, 1.5)
        hu = hu + amount * (hu - gaussian_blur(hu, sigma))
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    noise = torch.randn(hu.shape, generator=generator)
    noise = gaussian_blur(noise - gaussian_blur(noise, rng.uniform(1.0, 3.0)),
                          rng.uniform(0.0, 0.8))
    noise = noise / noise.std().clamp_min(1e-6)
    return hu + noise * rng.uniform(5.0, 50.0)


def field_of_view(hu: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The crop seen through a circular field of view, a scanner's fill value outside.

    The circle's centre is within 10 % of the crop's centre and its radius 30-55 % of the
    crop's side, so it often cuts the body (as a field of view too small for the patient
    does) and leaves the four corners outside. The fill value is drawn from
    :data:`PADDING_VALUES_HU`. The caller applies the model's preprocessing
    (:func:`models.preprocessing.suppress_padding`), as inference does.
    """
    height, width = hu.shape
    side = min(height, width)
    centre_y = (height - 1) / 2 + rng.uniform(-0.1, 0.1) * side
    centre_x = (width - 1) / 2 + rng.uniform(-0.1, 0.1) * side
    radius = rng.uniform(0.3, 0.55) * side
    fill = float(rng.choice(PADDING_VALUES_HU))
    rows = torch.arange(height, dtype=torch.float32)[:, None] - centre_y
    cols = torch.arange(width, dtype=torch.float32)[None, :] - centre_x
    return torch.where(rows ** 2 + cols ** 2 > radius ** 2, torch.tensor(fill), hu.float())


def capsule_lesion(hu: torch.Tensor, liver: torch.Tensor, rng: np.random.Generator,
                   pixel_mm: float) -> torch.Tensor:
    """One large tumour (5-10 cm, :data:`CAPSULE_LESION_RADIUS_MM`) reaching the capsule.

    Its centre is a liver pixel at most :data:`CAPSULE_DEPTH_MM` from the liver's edge
    (Euclidean distance to the nearest non-liver pixel), so the tumour, larger than that
    depth, always reaches the capsule; shape, edge, texture and HU offset as
    :func:`models.phantoms.insert_lesion` (hypodense, or hyperdense 30 % of the time). The
    target is unchanged: a tumour belongs to the liver ROI. A crop without liver is returned
    as it is.
    """
    from scipy.ndimage import distance_transform_edt

    core = (liver > 0.5).numpy()
    if core.sum() < 50:
        return hu
    depth = distance_transform_edt(core) * pixel_mm
    painted = hu.float().numpy().copy()
    low, high = CAPSULE_LESION_RADIUS_MM
    insert_lesion(painted, liver.numpy(), rng, radius_px=(low / pixel_mm, high / pixel_mm),
                  centres=depth <= CAPSULE_DEPTH_MM)
    return torch.from_numpy(painted)


def remove_padding(hu: torch.Tensor) -> torch.Tensor:
    """:func:`models.preprocessing.suppress_padding` of an ``(H, W)`` tensor."""
    return torch.from_numpy(np.ascontiguousarray(suppress_padding(hu.numpy())))
