"""Synthetic abdominal CT phantoms with an exact liver mask, to supplement scarce labelled scans.

Each phantom is a slab of an idealised supine abdomen built from analytic shapes in patient
millimetres (``X`` toward the patient's left, ``Y`` toward posterior, ``Z`` toward superior,
origin on the body axis), all seen through one smooth random deformation ``(X, Y) + d(X, Y, Z)``
so that no two organs are perfect ellipses. The slab covers a random craniocaudal range of an
anatomical axis ``u`` (mm below the liver dome), so it shows the lung bases and heart above
the liver, the spleen, stomach and kidneys beside it, and bowel below it. The spleen and the
heart have liver-like HU on purpose: they are what a liver detector must learn to reject.

Tissue HU are drawn per phantom within physiological ranges for plain and contrast-enhanced
(portal venous) CT; the liver carries texture, vessels and sometimes hypodense lesions
(both inside its mask: a lesion belongs to the liver ROI), and below its widest part the left
lobe's tip often shows as a separate island far anterior, among bowel loops. Gaussian noise
and a slight blur finish the image. The liver mask is exact by construction.

:func:`insert_lesion` paints a synthetic focal lesion (hypo- or hyperdense, irregular, with a
soft edge) into the liver of any image, phantom or real, leaving the liver mask unchanged: the
training script uses it as an augmentation (``--lesion-prob``) and the tests use it to check
that the ROI covers lesions.

These phantoms are crude compared to real anatomy; ``docs/UNET.md`` reports whether adding
them to training helps on held-out real scans. The same generator makes the sender's built-in
demo study (``dlad-send phantom``) and the tests' synthetic CTs: the anatomy is sized in
millimetres (a body about 220-400 mm wide), so a grid shows the whole abdomen only when
``shape x spacing`` spans about 400 mm in plane. It needs NumPy and SciPy, not torch.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from shared.volume import Volume


def smooth_field(rng: np.random.Generator, shape, coarse: int, amplitude: float) -> np.ndarray:
    """Random field, smooth over ``shape / coarse`` voxels, with values in about ``±amplitude``."""
    coarse_shape = tuple(max(2, n // coarse) for n in shape)
    field = rng.uniform(-1.0, 1.0, coarse_shape)
    zoom = [n / c for n, c in zip(shape, coarse_shape, strict=True)]
    return amplitude * ndimage.zoom(field, zoom, order=1, mode="nearest")[
        tuple(slice(0, n) for n in shape)]


def ellipse(x, y, cx, cy, ax, ay, angle: float = 0.0) -> np.ndarray:
    """Boolean disc ``((x'-cx)/ax)^2 + ((y'-cy)/ay)^2 <= 1`` in axes rotated by ``angle``."""
    cos, sin = np.cos(angle), np.sin(angle)
    dx, dy = x - cx, y - cy
    return ((cos * dx + sin * dy) / ax) ** 2 + ((-sin * dx + cos * dy) / ay) ** 2 <= 1.0


def present(u: np.ndarray, top: float, bottom: float) -> np.ndarray:
    """Per-slice profile in ``[0, 1]``: 0 outside ``[top, bottom]`` mm, a smooth bump inside."""
    t = np.clip((u - top) / (bottom - top), 0.0, 1.0)
    return np.sqrt(np.sin(np.pi * t))


def make_phantom(shape=(24, 192, 192), spacing=(2.0, 2.0, 4.0), seed: int = 0,
                 noise_hu: float | None = None) -> tuple[Volume, np.ndarray]:
    """One synthetic abdominal slab and its liver mask.

    Args:
        shape: ``(nz, ny, nx)`` voxels.
        spacing: ``(sx, sy, sz)`` in mm.
        seed: everything random derives from it; the same seed gives the same phantom.
        noise_hu: standard deviation of the Gaussian quantum noise in HU; ``None`` draws it
            in [5, 25] HU from ``seed``. Giving it leaves the anatomy of ``seed`` unchanged.

    Returns:
        ``(volume, liver)``: int16 HU in a LPS-oriented grid (``data[k, j, i]``, ``i`` toward
        the patient's left, ``j`` toward posterior, ``k`` toward superior) and a bool mask of
        the same shape.
    """
    nz, ny, nx = (int(n) for n in shape)
    sx, sy, sz = (float(s) for s in spacing)
    if min(nz, ny, nx) < 1 or min(sx, sy, sz) <= 0:
        raise ValueError(f"shape and spacing must be positive, got {shape}, {spacing}")
    if noise_hu is not None and not noise_hu >= 0:
        raise ValueError(f"noise_hu must be >= 0, got {noise_hu}")
    rng = np.random.default_rng(seed)
    size = rng.uniform(0.8, 1.15)
    half_width, half_depth = size * rng.uniform(135, 175), size * rng.uniform(95, 130)
    # Anatomical axis u: mm below the liver dome, increasing inferiorly; slice k is superior.
    u_top = rng.uniform(-40, 110)
    u = u_top + (nz - 1 - np.arange(nz)) * sz
    liver_length = size * rng.uniform(140, 200)

    y = (np.arange(ny)[None, :, None] - (ny - 1) / 2) * sy + rng.uniform(-15, 15)
    x = (np.arange(nx)[None, None, :] - (nx - 1) / 2) * sx + rng.uniform(-15, 15)
    grid = (nz, ny, nx)
    x = x + smooth_field(rng, grid, 24, 9.0)
    y = y + smooth_field(rng, grid, 24, 9.0)
    u3 = u[:, None, None]

    contrast = rng.uniform(0, 1) < 0.6
    liver_hu = rng.uniform(85, 135) if contrast else rng.uniform(40, 70)
    vessel_hu = liver_hu + (rng.uniform(30, 80) if contrast else rng.uniform(-25, -8))
    artery_hu = rng.uniform(130, 260) if contrast else rng.uniform(30, 50)
    hu = np.full(grid, -1000.0)

    # Body wall: skin-fat, muscle, then the visceral fat that fills the rest.
    body = ellipse(x, y, 0, 0, half_width, half_depth)
    hu[body] = rng.uniform(-115, -80)
    fat = rng.uniform(6, 35) * size
    wall = rng.uniform(7, 14)
    muscle_outer = ellipse(x, y, 0, 0, half_width - fat, half_depth - fat)
    inner = ellipse(x, y, 0, 0, half_width - fat - wall, half_depth - fat - wall)
    hu[muscle_outer & ~inner] = rng.uniform(40, 60)
    hu[inner] = rng.uniform(-100, -60)
    inner_x, inner_y = half_width - fat - wall, half_depth - fat - wall

    # Lung bases: posterior crescents at the dome, filling the chest 60 mm above it.
    lung_level = np.clip((60 - u3) / 120, 0, 1)
    lungs = inner & (lung_level > 0) & (y > inner_y * (1 - 2 * lung_level)) & (np.abs(x) > 25)
    hu[lungs] = rng.uniform(-900, -780)
    heart = ellipse(x, y, 25, -0.35 * inner_y, 70 * np.sqrt(np.clip(-u3 / 50 + 0.4, 0, 1)) + 1e-3,
                     55 * np.sqrt(np.clip(-u3 / 50 + 0.4, 0, 1)) + 1e-3)
    hu[heart & inner] = artery_hu if contrast else rng.uniform(35, 55)

    # Spine with posterior elements and paraspinal muscles, the aorta in front of it.
    spine_y = inner_y - 25
    vertebra = ellipse(x, y, 0, spine_y, 20 * size, 17 * size)
    hu[vertebra] = rng.uniform(180, 280)
    hu[vertebra & ~ellipse(x, y, 0, spine_y, 16 * size, 13 * size)] = rng.uniform(450, 800)
    process = ellipse(x, y, 0, spine_y + 30, 7, 20 * size) & muscle_outer
    hu[process] = rng.uniform(400, 700)
    paraspinal = np.zeros(grid, dtype=bool)
    for side in (-1, 1):
        paraspinal |= ellipse(x, y, side * 35 * size, spine_y + 15, 22 * size, 25 * size)
    paraspinal &= muscle_outer & ~vertebra & ~process
    hu[paraspinal] = rng.uniform(40, 60)
    aorta = ellipse(x, y, 18, spine_y - 32, 11, 11)
    hu[aorta] = artery_hu

    # Ribs on the wall from the dome down to below the liver's upper half.
    ribs = np.zeros(grid, dtype=bool)
    for angle in np.linspace(-np.pi, np.pi, rng.integers(12, 20), endpoint=False):
        rx = (half_width - fat - wall / 2) * np.cos(angle)
        ry = (half_depth - fat - wall / 2) * np.sin(angle)
        ribs |= ellipse(x, y, rx, ry, 6, 5) & (u3 < 130) & (np.abs(angle - np.pi / 2) > 0.5)
    hu[ribs] = rng.uniform(350, 800)

    # The liver: right part of the abdomen, left lobe reaching across in its upper part.
    profile = present(u3, rng.uniform(-8, 8), liver_length)
    upper = np.clip(1.0 - u3 / 90, 0.0, 1.0)
    cut = (-0.1 + 0.45 * upper + rng.uniform(-0.1, 0.1)) * inner_x + 0.35 * y
    cut = cut + smooth_field(rng, grid, 16, 12.0)
    liver_extent = ellipse(x, y, -0.25 * inner_x * (1 - profile), 0.1 * inner_y * (1 - upper),
                            inner_x * (0.2 + 0.8 * profile), inner_y * (0.2 + 0.8 * profile))
    liver = inner & liver_extent & (x < cut) & (profile > 0.05)
    if rng.uniform() < 0.6:  # the left lobe's lower tip: a separate island, far anterior
        tip = present(u3, rng.uniform(0.3, 0.5) * liver_length,
                       rng.uniform(0.75, 0.95) * liver_length)
        liver |= inner & ellipse(x, y, rng.uniform(-0.15, 0.15) * inner_x, -0.65 * inner_y,
                                  rng.uniform(15, 35) * tip + 1e-3,
                                  rng.uniform(10, 22) * tip + 1e-3, rng.uniform(-0.5, 0.5))
    liver &= ~(vertebra | process | paraspinal | aorta | ribs)
    hu[liver] = liver_hu
    for _ in range(rng.integers(3, 9)):  # intrahepatic vessels: random straight tubes
        start = np.array([rng.uniform(-0.8, 0.0) * inner_x, rng.uniform(-0.6, 0.6) * inner_y])
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction)
        distance = np.abs((x - start[0]) * direction[1] - (y - start[1]) * direction[0])
        hu[liver & (distance < rng.uniform(2, 6))] = vessel_hu
    if rng.uniform() < 0.3:  # a hypodense lesion, part of the liver ROI
        cx, cy = rng.uniform(-0.7, -0.2) * inner_x, rng.uniform(-0.5, 0.5) * inner_y
        lesion = liver & ellipse(x, y, cx, cy, rng.uniform(8, 25), rng.uniform(8, 25))
        hu[lesion] = liver_hu - rng.uniform(25, 60)

    hu[ellipse(x, y, -22, spine_y - 30, 13, 10) & ~liver & inner] = vessel_hu  # vena cava
    if rng.uniform() < 0.5:  # gallbladder: bile against the liver's lower surface
        bladder = present(u3, 0.4 * liver_length, 0.8 * liver_length)
        hu[ellipse(x, y, -0.2 * inner_x, -0.25 * inner_y, 20 * bladder + 1e-3,
                    14 * bladder + 1e-3) & inner & ~liver] = rng.uniform(0, 25)
    # Spleen (liver-like HU) and stomach on the left, kidneys at the back, bowel below.
    spleen = ellipse(x, y, 0.62 * inner_x, 0.35 * inner_y,
                      45 * present(u3, 15, 140) + 1e-3, 28 * present(u3, 15, 140) + 1e-3, 0.6)
    hu[spleen & inner & ~liver] = liver_hu + rng.uniform(-15, 20)
    stomach_size = present(u3, 5, 120) * rng.uniform(35, 60)
    stomach = ellipse(x, y, 0.35 * inner_x, -0.3 * inner_y, stomach_size + 1e-3,
                       0.8 * stomach_size + 1e-3) & ~liver & inner
    hu[stomach] = rng.uniform(0, 40)
    hu[stomach & (y < -0.3 * inner_y - 0.3 * stomach_size)] = -1000.0  # gas, anterior (supine)
    kidney_size = present(u3, 80, 200)
    kidney_hu = rng.uniform(140, 220) if contrast else rng.uniform(25, 40)
    for side in (-1, 1):
        kidney = ellipse(x, y, side * 65 * size, spine_y - 5, 30 * kidney_size + 1e-3,
                          22 * kidney_size + 1e-3, side * 0.5) & ~liver
        hu[kidney] = kidney_hu
    bowel_level = np.clip((u3 - 100) / 60, 0, 1)
    for _ in range(rng.integers(6, 20)):
        bx, by = rng.uniform(-0.7, 0.7) * inner_x, rng.uniform(-0.8, 0.3) * inner_y
        loop = ellipse(x, y, bx, by, rng.uniform(8, 18) * bowel_level + 1e-3,
                        rng.uniform(8, 18) * bowel_level + 1e-3) & inner & ~liver & ~vertebra
        hu[loop] = rng.choice([-1000.0, rng.uniform(0, 40), rng.uniform(60, 120)])

    hu[liver] += smooth_field(rng, grid, 3, rng.uniform(3, 10))[liver]
    hu = ndimage.gaussian_filter(hu, sigma=(0, rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)))
    drawn_noise_hu = rng.uniform(5, 25)  # drawn even when given: same noise pattern, rescaled
    hu += rng.normal(0.0, drawn_noise_hu if noise_hu is None else noise_hu, grid)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    affine = np.array([[-sx, 0, 0, (nx - 1) / 2 * sx], [0, -sy, 0, (ny - 1) / 2 * sy],
                       [0, 0, sz, -u_top - (nz - 1) * sz], [0, 0, 0, 1.0]])
    volume = Volume(data=hu, affine=affine, spacing=(sx, sy, sz),
                    description=f"synthetic abdominal phantom (seed {seed})")
    return volume, np.ascontiguousarray(liver)


#: HU offsets of synthetic lesions relative to the surrounding liver: hypodense (cysts,
#: metastases, ablation zones) or hyperdense (arterially enhancing tumours, haemorrhage).
LESION_HYPO_HU = (-110.0, -20.0)
LESION_HYPER_HU = (20.0, 90.0)


def insert_lesion(hu: np.ndarray, liver: np.ndarray, rng: np.random.Generator,
                  radius_px: tuple[float, float] = (3.0, 20.0), hyper_prob: float = 0.3,
                  spacing=None, centres: np.ndarray | None = None) -> np.ndarray:
    """Paint one synthetic lesion into the liver of ``hu``; return the lesion's weight map.

    The lesion is an irregular ellipse (2D) or ellipsoid (3D) centred on a random liver voxel
    (so it may reach the liver's edge): with ``rho`` the normalised elliptical radius,
    perturbed by a smooth random field of +-20 %, its weight is
    ``w = clip((1 - rho) / e, 0, 1) * l`` (a soft edge of relative width ``e`` in [0.1, 0.4],
    ``l``: the liver fraction of the voxel, so nothing outside the liver changes), and
    ``hu += w (delta + n)``: ``delta`` drawn from :data:`LESION_HYPO_HU` or, with
    ``hyper_prob``, from :data:`LESION_HYPER_HU`; ``n`` a smooth texture of +-15 % of
    ``|delta|``. The liver mask is left as it is: a lesion is part of the liver ROI.

    Args:
        hu: float array (2D or 3D), modified in place.
        liver: liver fraction or mask of the same shape (values in ``[0, 1]``).
        rng: the random generator (the only source of randomness).
        radius_px: range of the semi-axes in voxels of the in-plane grid.
        hyper_prob: probability of a hyperdense lesion.
        spacing: for 3D, ``(sx, sy, sz)`` in mm (the semi-axis along the slices is scaled by
            ``sx / sz``); ignored in 2D.
        centres: boolean mask of the voxels the centre may be drawn from (say, liver voxels
            near the capsule); default: every voxel with ``liver > 0.5``.

    Returns:
        the weight map ``w`` (zeros where the liver is empty).
    """
    hu = np.asarray(hu)
    liver = np.asarray(liver, dtype=np.float64)
    if hu.shape != liver.shape or hu.ndim not in (2, 3):
        raise ValueError(f"hu {hu.shape} and liver {liver.shape} must be the same 2D or 3D shape")
    if not np.issubdtype(hu.dtype, np.floating):
        raise ValueError(f"hu must be a float array (modified in place), got {hu.dtype}")
    low, high = (float(r) for r in radius_px)
    if not 0 < low <= high:
        raise ValueError(f"radius_px must be 0 < low <= high, got {radius_px}")
    if not 0.0 <= hyper_prob <= 1.0:
        raise ValueError(f"hyper_prob must be in [0, 1], got {hyper_prob}")
    allowed = liver > 0.5
    if centres is not None:
        if np.shape(centres) != hu.shape:
            raise ValueError(f"centres {np.shape(centres)} must have the shape of hu {hu.shape}")
        allowed &= np.asarray(centres, dtype=bool)
    inside = np.argwhere(allowed)
    if len(inside) == 0:
        return np.zeros(hu.shape)
    centre = inside[rng.integers(len(inside))]
    axes = rng.uniform(low, high, 2)
    angle = rng.uniform(0, np.pi)
    cos, sin = np.cos(angle), np.sin(angle)
    grid = np.indices(hu.shape, dtype=np.float64)
    dy, dx = grid[-2] - centre[-2], grid[-1] - centre[-1]
    rho2 = ((cos * dx + sin * dy) / axes[0]) ** 2 + ((-sin * dx + cos * dy) / axes[1]) ** 2
    if hu.ndim == 3:
        sx, _, sz = (1.0, 1.0, 1.0) if spacing is None else (float(v) for v in spacing)
        axis_z = rng.uniform(low, high) * sx / sz
        rho2 = rho2 + ((grid[0] - centre[0]) / max(axis_z, 0.5)) ** 2
    rho = np.sqrt(rho2) * (1.0 + smooth_field(rng, hu.shape, 6, 0.2))
    edge = rng.uniform(0.1, 0.4)
    weight = np.clip((1.0 - rho) / edge, 0.0, 1.0) * np.clip(liver, 0.0, 1.0)
    delta = rng.uniform(*(LESION_HYPER_HU if rng.uniform() < hyper_prob else LESION_HYPO_HU))
    texture = smooth_field(rng, hu.shape, 3, 0.15 * abs(delta))
    hu += (weight * (delta + texture)).astype(hu.dtype)
    return weight


def make_head_phantom(shape=(24, 256, 256), spacing=(0.9, 0.9, 5.0), seed: int = 0,
                      noise_hu: float = 4.0) -> tuple[Volume, np.ndarray]:
    """A synthetic head CT slab and a target mask: a scan unlike the abdominal ones.

    Head CT differs from abdominal CT in what a codec sees: a thick skull (cortical bone up to
    about 1900 HU around a 500-900 HU diploe) next to brain tissue whose grey/white contrast is
    only about 10 HU, thin CSF spaces, a lot of air, and low noise (about 3-5 HU, thin slices
    of a dose-intensive protocol). The head is an ellipsoid (about 150 x 185 x 200 mm, seen
    through a smooth random deformation) with scalp and subcutaneous fat, the skull's two
    tables and diploe, a CSF rim, a cortical grey-matter ribbon with deep grey nuclei, white
    matter, lateral ventricles and the falx. The target is an enhancing lesion with a
    hypodense edema in one hemisphere; its mask (the lesion plus a 10 mm margin) plays the ROI.

    Args:
        shape: ``(nz, ny, nx)`` voxels.
        spacing: ``(sx, sy, sz)`` in mm.
        seed: everything random derives from it.
        noise_hu: standard deviation of the Gaussian quantum noise in HU.

    Returns:
        ``(volume, target)``: int16 HU on the same LPS grid convention as :func:`make_phantom`,
        and a bool mask of the same shape.
    """
    nz, ny, nx = (int(n) for n in shape)
    sx, sy, sz = (float(s) for s in spacing)
    if min(nz, ny, nx) < 1 or min(sx, sy, sz) <= 0:
        raise ValueError(f"shape and spacing must be positive, got {shape}, {spacing}")
    if not noise_hu >= 0:
        raise ValueError(f"noise_hu must be >= 0, got {noise_hu}")
    rng = np.random.default_rng(seed)
    grid = (nz, ny, nx)
    semi_x, semi_y, semi_z = rng.uniform(70, 80), rng.uniform(88, 98), rng.uniform(95, 110)
    # z: mm above the head's centre; the slab ends below the vertex (at most 0.85 semi_z up).
    span = (nz - 1) * sz
    z_bottom = min(rng.uniform(-50, -20), 0.85 * semi_z - span)
    z = (z_bottom + np.arange(nz) * sz)[:, None, None]
    y = (np.arange(ny)[None, :, None] - (ny - 1) / 2) * sy + smooth_field(rng, grid, 24, 4.0)
    x = (np.arange(nx)[None, None, :] - (nx - 1) / 2) * sx + smooth_field(rng, grid, 24, 4.0)
    level = np.sqrt(np.clip(1.0 - (z / semi_z) ** 2, 0.0, 1.0))  # the ellipsoid's section

    def shell(inset_mm):
        """Inside the head's outline shrunk by ``inset_mm``."""
        return ellipse(x, y, 0, 0, np.maximum(semi_x * level - inset_mm, 1e-3),
                        np.maximum(semi_y * level - inset_mm, 1e-3))

    hu = np.full(grid, -1000.0)
    scalp, fat = rng.uniform(2, 4), rng.uniform(1, 3)
    outer_table, diploe, inner_table = rng.uniform(1.5, 2.5), rng.uniform(2, 5), rng.uniform(1, 2)
    csf = rng.uniform(1, 2.5)
    insets = np.cumsum([scalp, fat, outer_table, diploe, inner_table, csf])
    hu[shell(0)] = rng.uniform(30, 50)                     # scalp
    hu[shell(insets[0])] = rng.uniform(-110, -70)          # subcutaneous fat
    hu[shell(insets[1])] = rng.uniform(1600, 1900)         # outer table
    hu[shell(insets[2])] = rng.uniform(500, 900)           # diploe
    hu[shell(insets[3])] = rng.uniform(1600, 1900)         # inner table
    hu[shell(insets[4])] = rng.uniform(4, 12)              # CSF
    brain = shell(insets[5])
    grey, white = rng.uniform(35, 42), rng.uniform(24, 30)
    hu[brain] = white
    # Cortical ribbon (3 mm, folded by a smooth field) and deep grey nuclei.
    folds = smooth_field(rng, grid, 6, 2.5)
    hu[brain & ~ellipse(x, y, 0, 0, np.maximum(semi_x * level - insets[5] - 3 - folds, 1e-3),
                         np.maximum(semi_y * level - insets[5] - 3 - folds, 1e-3))] = grey
    for side in (-1, 1):
        hu[brain & ellipse(x, y, side * 18, 5, 9 * level + 1e-3, 14 * level + 1e-3)] = grey
    # Lateral ventricles, the falx between the hemispheres.
    ventricle_size = np.clip(1.0 - np.abs(z - 15) / 40, 0, 1)
    for side in (-1, 1):
        hu[brain & ellipse(x, y, side * 8, -5, 5 * ventricle_size + 1e-3,
                            25 * ventricle_size + 1e-3, side * 0.15)] = rng.uniform(2, 10)
    hu[brain & (np.abs(x) < 0.8) & (np.abs(y) > 30 * ventricle_size + 5)] = rng.uniform(55, 80)
    # The target: an enhancing lesion with an edema ring, in one hemisphere.
    side = rng.choice([-1, 1])
    cx, cy = side * rng.uniform(25, 40) * level.max(), rng.uniform(-35, 35)
    cz = z_bottom + rng.uniform(0.35, 0.65) * (nz - 1) * sz
    radius = rng.uniform(8, 16)
    distance = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
    hu[brain & (distance < 1.8 * radius)] = white - rng.uniform(8, 14)    # edema
    hu[brain & (distance < radius)] = grey + rng.uniform(15, 40)           # enhancing
    target = brain & (distance < 1.8 * radius + 10.0)
    hu = ndimage.gaussian_filter(hu, sigma=(0, rng.uniform(0.4, 0.8), rng.uniform(0.4, 0.8)))
    hu += rng.normal(0.0, noise_hu, grid)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    affine = np.array([[-sx, 0, 0, (nx - 1) / 2 * sx], [0, -sy, 0, (ny - 1) / 2 * sy],
                       [0, 0, sz, z_bottom], [0, 0, 0, 1.0]])
    volume = Volume(data=hu, affine=affine, spacing=(sx, sy, sz),
                    description=f"synthetic head phantom (seed {seed})")
    return volume, np.ascontiguousarray(target)
