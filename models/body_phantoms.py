"""Synthetic CT phantoms of body regions that hold no liver: head, neck, thorax and pelvis.

They serve two purposes: liver-free training examples (the network must learn that brain,
heart, thyroid, bladder and muscle are not liver, whatever their HU) and test scans for the
sender's anatomical plausibility check, which must send such scans without diffusion.

Built like :func:`models.phantoms.make_phantom`: analytic shapes in patient millimetres
(``X`` toward the patient's left, ``Y`` toward posterior, origin on the body axis) seen through
one smooth random deformation, a random craniocaudal range ``t`` in ``[0, 1]`` of the region
(0 = its lower end), tissue HU drawn per phantom within physiological ranges for plain and
contrast-enhanced CT, then a slight blur and Gaussian noise. Liver-like HU are there on purpose:
grey matter 34-42 HU, thyroid 80-220 HU, myocardium and muscle 40-60 HU, uterus or prostate
35-55 HU. The returned liver mask is all false by construction.

Example:
    >>> volume, liver = make_region_phantom("head", shape=(4, 64, 64), seed=1)
    >>> volume.shape, bool(liver.any())
    ((4, 64, 64), False)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from models.phantoms import ellipse, smooth_field
from shared.volume import Volume

#: The regions :func:`make_region_phantom` can build.
REGIONS = ("head", "neck", "thorax", "pelvis")
#: Usual voxel sizes of each region's clinical CT (in-plane, slice) in mm: head CT is
#: reconstructed at a small field of view.
TYPICAL_SPACING = {"head": (0.5, 5.0), "neck": (0.6, 3.0), "thorax": (0.8, 3.0),
                   "pelvis": (0.8, 3.0)}


def _grid(shape, spacing, rng: np.random.Generator, warp_mm: float):
    """Patient millimetres ``(x, y)`` of every voxel, shifted and smoothly deformed."""
    nz, ny, nx = shape
    sx, sy, _ = spacing
    y = (np.arange(ny)[None, :, None] - (ny - 1) / 2) * sy + rng.uniform(-10, 10)
    x = (np.arange(nx)[None, None, :] - (nx - 1) / 2) * sx + rng.uniform(-10, 10)
    x = x + smooth_field(rng, shape, 24, warp_mm)
    y = y + smooth_field(rng, shape, 24, warp_mm)
    return x, y


def _levels(nz: int, rng: np.random.Generator) -> np.ndarray:
    """Level ``t`` in ``[0, 1]`` of every slice (slice ``k`` superior to ``k - 1``): a random
    sub-range of the region, at least a fifth of it."""
    low = rng.uniform(0.0, 0.8)
    high = rng.uniform(low + 0.2, 1.0)
    return np.linspace(low, high, nz)[:, None, None]


def _bone(hu, region, cortex_hu: float, marrow_hu: float, inner) -> None:
    """Paint a bone: marrow inside ``inner``, cortex in the rest of ``region``."""
    hu[region] = cortex_hu
    hu[region & inner] = marrow_hu


def _finish(hu: np.ndarray, rng: np.random.Generator, spacing, region: str, seed: int
            ) -> tuple[Volume, np.ndarray]:
    sx, sy, sz = spacing
    nz, ny, nx = hu.shape
    pixel = min(sx, sy)
    hu = ndimage.gaussian_filter(hu, sigma=(0, rng.uniform(0.3, 1.0) / sy * pixel,
                                            rng.uniform(0.3, 1.0) / sx * pixel))
    hu += rng.normal(0.0, rng.uniform(4, 30), hu.shape)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    affine = np.array([[-sx, 0, 0, (nx - 1) / 2 * sx], [0, -sy, 0, (ny - 1) / 2 * sy],
                       [0, 0, sz, 0.0], [0, 0, 0, 1.0]])
    volume = Volume(data=hu, affine=affine, spacing=(sx, sy, sz),
                    description=f"synthetic {region} phantom (seed {seed})")
    return volume, np.zeros(hu.shape, dtype=bool)


def _head(x, y, t, rng, contrast: bool) -> np.ndarray:
    hu = np.full(np.broadcast_shapes(x.shape, t.shape), -1000.0)
    ax, ay = rng.uniform(66, 80), rng.uniform(84, 100)
    profile = np.sqrt(np.clip(1 - ((t - 0.35) / 0.75) ** 2, 0.05, 1))  # widest a third up
    scalp, skull = rng.uniform(3, 7), rng.uniform(5, 9)
    head = ellipse(x, y, 0, 0, ax * profile, ay * profile)
    bone = ellipse(x, y, 0, 0, ax * profile - scalp, ay * profile - scalp)
    brain = ellipse(x, y, 0, 0, ax * profile - scalp - skull, ay * profile - scalp - skull)
    hu[head] = rng.uniform(20, 50)
    diploe = ellipse(x, y, 0, 0, ax * profile - scalp - skull / 3,
                     ay * profile - scalp - skull / 3) & ~ellipse(
        x, y, 0, 0, ax * profile - scalp - 2 * skull / 3, ay * profile - scalp - 2 * skull / 3)
    _bone(hu, bone & ~brain, rng.uniform(1200, 1900), rng.uniform(450, 900), diploe)
    grey, white = rng.uniform(34, 42), rng.uniform(24, 32)
    cortex = brain & ~ellipse(x, y, 0, 0, ax * profile - scalp - skull - rng.uniform(3, 6),
                              ay * profile - scalp - skull - rng.uniform(3, 6))
    hu[brain] = white
    hu[cortex] = grey
    gyri = smooth_field(rng, hu.shape, 6, 1.0) > 0.3
    hu[brain & gyri] = grey
    ventricle_level = (t > 0.3) & (t < 0.75)
    for side in (-1, 1):
        ventricle = ellipse(x, y, side * rng.uniform(5, 12), rng.uniform(-12, 8),
                            rng.uniform(3, 8), rng.uniform(14, 30), side * 0.2)
        hu[ventricle & brain & ventricle_level] = rng.uniform(0, 12)
    hu[(np.abs(x) < 1.2) & brain & (y < 0.8 * ay * profile)] = rng.uniform(45, 80)  # falx
    if contrast:  # dural sinus and cortical vessels
        hu[ellipse(x, y, 0, ay * profile - scalp - skull - 5, 5, 4) & brain] = rng.uniform(150, 300)
    base = t < 0.25  # skull base: orbits, sinuses, petrous bones, posterior fossa
    for side in (-1, 1):
        orbit = ellipse(x, y, side * 32, -(ay * profile - 24), 18, 17) & base
        hu[orbit] = rng.uniform(-100, -60)
        hu[ellipse(x, y, side * 32, -(ay * profile - 22), 11, 11) & base] = rng.uniform(5, 20)
        petrous = ellipse(x, y, side * 35, 20, 28, 8, side * 0.7) & base & brain
        hu[petrous] = rng.uniform(1300, 2000)
        hu[ellipse(x, y, side * 52, 25, 8, 8) & base & brain] = -900  # mastoid air
    hu[ellipse(x, y, 0, -(ay * profile - 30), 14, 16) & base] = -1000  # sinuses
    return hu


def _neck(x, y, t, rng, contrast: bool) -> np.ndarray:
    hu = np.full(np.broadcast_shapes(x.shape, t.shape), -1000.0)
    shoulders = np.clip((0.25 - t) / 0.25, 0, 1)  # the thoracic inlet widens into shoulders
    ax = rng.uniform(55, 75) + shoulders * rng.uniform(60, 110)
    ay = rng.uniform(48, 62) + shoulders * 20
    body = ellipse(x, y, 0, 0, ax, ay)
    fat = rng.uniform(3, 15)
    hu[body] = rng.uniform(-110, -80)
    hu[ellipse(x, y, 0, 0, ax - fat, ay - fat)] = rng.uniform(-90, -60)  # deep fat
    muscle_hu = rng.uniform(40, 60)
    for side in (-1, 1):
        hu[ellipse(x, y, side * 30, -8, 10, 20, side * 0.5) & body] = muscle_hu  # SCM
        hu[ellipse(x, y, side * 22, ay * 0.45, 20, 18) & body] = muscle_hu  # paraspinal
    vertebra = ellipse(x, y, 0, 8, 10, 8)
    _bone(hu, vertebra, rng.uniform(500, 900), rng.uniform(180, 350),
          ellipse(x, y, 0, 8, 8, 6))
    hu[ellipse(x, y, 0, 22, 13, 9) & ~ellipse(x, y, 0, 22, 7, 6)] = rng.uniform(400, 800)
    hu[ellipse(x, y, 0, 22, 7, 6)] = rng.uniform(25, 40)  # cord
    trachea = ellipse(x, y, 0, -20, rng.uniform(7, 11), rng.uniform(7, 10))
    hu[ellipse(x, y, 0, -20, 12, 11)] = rng.uniform(60, 120)  # cartilage rings
    hu[trachea] = -1000
    hu[ellipse(x, y, 0, -5, 5, 4)] = rng.uniform(30, 45)  # oesophagus
    thyroid_level = (t > 0.2) & (t < 0.65)
    thyroid_hu = rng.uniform(140, 220) if contrast else rng.uniform(80, 130)
    vessel_hu = rng.uniform(150, 350) if contrast else rng.uniform(35, 50)
    for side in (-1, 1):
        hu[ellipse(x, y, side * 17, -15, 8, 14, side * 0.3) & thyroid_level] = thyroid_hu
        hu[ellipse(x, y, side * 25, -4, 3.5, 3.5)] = vessel_hu  # carotid
        hu[ellipse(x, y, side * 33, -6, 6, 5)] = vessel_hu * rng.uniform(0.6, 1.0)  # jugular
        clavicle = ellipse(x, y, side * (40 + 30 * shoulders), -ay * 0.55, 35, 6, -side * 0.3)
        _bone(hu, clavicle & (shoulders > 0.3), rng.uniform(600, 1000), 250,
              ellipse(x, y, side * (40 + 30 * shoulders), -ay * 0.55, 30, 3, -side * 0.3))
        apex = ellipse(x, y, side * 35, 10, 18 * shoulders + 1e-3, 15 * shoulders + 1e-3)
        hu[apex & (shoulders > 0.4)] = rng.uniform(-880, -780)  # lung apex
        humerus = ellipse(x, y, side * (ax - 25), 0, 22, 22) & (shoulders > 0.6)
        _bone(hu, humerus, rng.uniform(600, 1000), rng.uniform(150, 300),
              ellipse(x, y, side * (ax - 25), 0, 18, 18))
    mandible = ellipse(x, y, 0, -ay * 0.6, 45, 35) & ~ellipse(x, y, 0, -ay * 0.6 + 8, 38, 30)
    hu[mandible & (y < -ay * 0.4) & (t > 0.8)] = rng.uniform(900, 1500)
    hu[ellipse(x, y, 0, -8, 12, 6) & (t > 0.7)] = -1000  # pharynx
    return hu


def _thorax(x, y, t, rng, contrast: bool) -> np.ndarray:
    hu = np.full(np.broadcast_shapes(x.shape, t.shape), -1000.0)
    ax, ay = rng.uniform(140, 185), rng.uniform(95, 130)
    body = ellipse(x, y, 0, 0, ax, ay)
    fat, wall = rng.uniform(6, 35), rng.uniform(8, 14)
    hu[body] = rng.uniform(-115, -80)
    outer = ellipse(x, y, 0, 0, ax - fat, ay - fat)
    inner = ellipse(x, y, 0, 0, ax - fat - wall, ay - fat - wall)
    hu[outer & ~inner] = rng.uniform(40, 60)
    ix, iy = ax - fat - wall, ay - fat - wall
    hu[inner] = rng.uniform(-100, -70)  # mediastinal fat
    for angle in np.linspace(-np.pi, np.pi, rng.integers(14, 22), endpoint=False):
        rib = ellipse(x, y, (ix + wall / 2) * np.cos(angle), (iy + wall / 2) * np.sin(angle), 7, 5)
        _bone(hu, rib & body, rng.uniform(500, 900), rng.uniform(150, 300),
              ellipse(x, y, (ix + wall / 2) * np.cos(angle), (iy + wall / 2) * np.sin(angle), 4, 3))
    hu[ellipse(x, y, 0, -iy - wall / 2, 14, 6)] = rng.uniform(300, 600)  # sternum
    spine_y = iy - 25
    _bone(hu, ellipse(x, y, 0, spine_y, 19, 16), rng.uniform(500, 900), rng.uniform(150, 300),
          ellipse(x, y, 0, spine_y, 15, 12))
    lung_hu = rng.uniform(-880, -760)
    lung_texture = smooth_field(rng, hu.shape, 4, 25.0)
    lungs = np.zeros(hu.shape, dtype=bool)
    for side in (-1, 1):
        lungs |= ellipse(x, y, side * 0.5 * ix, 0.08 * iy, 0.46 * ix, 0.85 * iy)
    lungs &= inner & ~ellipse(x, y, 0, spine_y, 30, 24)
    heart_size = np.clip((0.65 - t) / 0.4, 0, 1)  # the heart fills the lower thorax
    heart = ellipse(x, y, 0.15 * ix, -0.2 * iy, rng.uniform(50, 70) * heart_size + 1e-3,
                    rng.uniform(40, 55) * heart_size + 1e-3, 0.5) & inner
    mediastinum = ellipse(x, y, 0, -0.1 * iy, 28 + 10 * (1 - heart_size), 0.9 * iy) & inner
    lungs &= ~heart & ~mediastinum
    hu[lungs] = lung_hu + lung_texture[lungs]
    vessel_hu = rng.uniform(150, 350) if contrast else rng.uniform(35, 50)
    hu[heart] = rng.uniform(40, 55)  # myocardium
    chambers = ellipse(x, y, 0.15 * ix, -0.2 * iy, rng.uniform(30, 45) * heart_size + 1e-3,
                       rng.uniform(22, 35) * heart_size + 1e-3, 0.5) & heart
    hu[chambers] = vessel_hu
    hu[ellipse(x, y, 18, spine_y - 30, 13, 13)] = vessel_hu  # descending aorta
    hu[ellipse(x, y, -5, -0.35 * iy, 16, 16) & (t > 0.3)] = vessel_hu  # ascending aorta
    hu[ellipse(x, y, -25, -0.2 * iy, 9, 9) & (t > 0.4)] = vessel_hu * 0.8  # vena cava
    hu[ellipse(x, y, 0, 0.1 * iy, 9, 8) & (t > 0.55)] = -1000  # trachea
    hu[ellipse(x, y, 5, spine_y - 28, 6, 5)] = rng.uniform(30, 45)  # oesophagus
    for _ in range(rng.integers(20, 60)):  # pulmonary vessels
        cx, cy = rng.uniform(-0.9, 0.9) * ix, rng.uniform(-0.8, 0.9) * iy
        hu[ellipse(x, y, cx, cy, rng.uniform(1.5, 4), rng.uniform(1.5, 4)) & lungs] = \
            vessel_hu * rng.uniform(0.3, 1.0)
    if rng.uniform() < 0.4:  # breasts
        for side in (-1, 1):
            breast = ellipse(x, y, side * 0.45 * ax, -ay + 10, rng.uniform(45, 70),
                             rng.uniform(30, 55)) & ~body
            hu[breast] = rng.uniform(-110, -80)
            hu[breast & ellipse(x, y, side * 0.45 * ax, -ay, 30, 20)] = rng.uniform(0, 40)
    return hu


def _pelvis(x, y, t, rng, contrast: bool) -> np.ndarray:
    hu = np.full(np.broadcast_shapes(x.shape, t.shape), -1000.0)
    ax, ay = rng.uniform(150, 195), rng.uniform(100, 130)
    body = ellipse(x, y, 0, 0, ax, ay)
    fat = rng.uniform(10, 45)
    hu[body] = rng.uniform(-115, -80)
    inner = ellipse(x, y, 0, 0, ax - fat, ay - fat)
    ix, iy = ax - fat, ay - fat
    hu[inner] = rng.uniform(-100, -60)
    muscle_hu = rng.uniform(40, 60)
    vessel_hu = rng.uniform(150, 300) if contrast else rng.uniform(35, 50)
    for side in (-1, 1):
        hu[ellipse(x, y, side * 0.55 * ix, 0.45 * iy, 0.35 * ix, 0.4 * iy, side * 0.4)
           & inner] = muscle_hu  # gluteal muscles
        hu[ellipse(x, y, side * 0.32 * ix, -0.05 * iy, 20, 18) & (t > 0.4)] = muscle_hu  # psoas
        wing = (ellipse(x, y, side * 0.5 * ix, 0.1 * iy, 0.35 * ix, 0.45 * iy, side * 0.6)
                & ~ellipse(x, y, side * 0.5 * ix, 0.1 * iy, 0.35 * ix - 9, 0.45 * iy - 9,
                           side * 0.6)) & (t > 0.45) & (x * side > 0.25 * ix)
        _bone(hu, wing, rng.uniform(600, 1100), rng.uniform(150, 300), np.zeros_like(wing))
        head = ellipse(x, y, side * 0.5 * ix, 0, rng.uniform(21, 26), rng.uniform(21, 26))
        _bone(hu, head & (t < 0.45), rng.uniform(700, 1200), rng.uniform(150, 350),
              ellipse(x, y, side * 0.5 * ix, 0, 17, 17))
        hu[ellipse(x, y, side * 0.22 * ix, -0.1 * iy, 5, 5)] = vessel_hu  # iliac vessels
        pubis = ellipse(x, y, side * 0.15 * ix, -0.75 * iy, 0.2 * ix, 9, side * 0.3) & (t < 0.2)
        _bone(hu, pubis, rng.uniform(600, 1000), rng.uniform(150, 300), np.zeros_like(pubis))
    _bone(hu, ellipse(x, y, 0, 0.6 * iy, 45, 22) & (t > 0.3), rng.uniform(500, 900),
          rng.uniform(150, 300), ellipse(x, y, 0, 0.6 * iy, 40, 17))  # sacrum
    bladder = ellipse(x, y, 0, -0.4 * iy, rng.uniform(30, 60) * np.clip(1.2 - t, 0, 1) + 1e-3,
                      rng.uniform(25, 45) * np.clip(1.2 - t, 0, 1) + 1e-3) & inner
    hu[bladder] = rng.uniform(300, 900) if rng.uniform() < 0.2 else rng.uniform(0, 20)
    hu[ellipse(x, y, 0, 0.05 * iy, 25, 18) & (t < 0.6) & ~bladder] = rng.uniform(35, 55)
    rectum = ellipse(x, y, 0, 0.35 * iy, 17, 15) & (t < 0.7)
    hu[rectum] = rng.uniform(20, 60)
    hu[rectum & ellipse(x, y, 0, 0.3 * iy, 9, 7)] = -1000
    for _ in range(rng.integers(6, 16)):  # bowel loops, above the bladder
        loop = ellipse(x, y, rng.uniform(-0.6, 0.6) * ix, rng.uniform(-0.7, 0.1) * iy,
                       rng.uniform(8, 18), rng.uniform(8, 18)) & inner & (t > 0.5)
        hu[loop] = rng.choice([-1000.0, rng.uniform(0, 40), rng.uniform(150, 450)])
    return hu


_BUILDERS = {"head": _head, "neck": _neck, "thorax": _thorax, "pelvis": _pelvis}


def make_region_phantom(region: str, shape=(16, 192, 192), spacing=None, seed: int = 0
                        ) -> tuple[Volume, np.ndarray]:
    """One synthetic liver-free slab of ``region`` and its (empty) liver mask.

    Args:
        region: one of :data:`REGIONS`.
        shape: ``(nz, ny, nx)`` voxels.
        spacing: ``(sx, sy, sz)`` in mm; default: the region's :data:`TYPICAL_SPACING`
            scaled so that ``shape`` spans the region's field of view.
        seed: everything random derives from it.

    Returns:
        ``(volume, liver)``: int16 HU on an LPS-oriented grid (``data[k, j, i]``, ``i`` toward
        the patient's left, ``j`` toward posterior, ``k`` toward superior) and an all-false
        mask.

    Raises:
        ValueError: unknown region or non-positive shape or spacing.
    """
    if region not in _BUILDERS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    nz, ny, nx = (int(n) for n in shape)
    if spacing is None:
        pixel, slice_mm = TYPICAL_SPACING[region]
        field_mm = {"head": 230.0, "neck": 250.0}.get(region, 400.0)
        pixel = max(pixel, field_mm / max(ny, nx))
        spacing = (pixel, pixel, slice_mm)
    sx, sy, sz = (float(s) for s in spacing)
    if min(nz, ny, nx) < 1 or min(sx, sy, sz) <= 0:
        raise ValueError(f"shape and spacing must be positive, got {shape}, {spacing}")
    rng = np.random.default_rng([seed, REGIONS.index(region)])
    x, y = _grid((nz, ny, nx), (sx, sy, sz), rng, warp_mm=5.0)
    t = _levels(nz, rng)
    hu = _BUILDERS[region](x, y, t, rng, contrast=bool(rng.uniform() < 0.5))
    return _finish(hu, rng, (sx, sy, sz), region, seed)
