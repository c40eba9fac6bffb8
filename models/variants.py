"""Synthetic variants of a labelled CT, for held-out evaluation of the liver ROI.

Only two labelled scans exist here, so scans "unlike ours" are made from them: each function
takes a :class:`~shared.volume.Volume`, its liver mask (and maybe a lesion mask) and returns a
new case whose liver (and lesion) voxels are known exactly. The figures of
``scripts/eval_roi.py`` come from these, labelled with what was changed.

* :func:`contrast_phase`: plain (non-contrast), late or enhanced phase: the liver, its
  vessels and the other enhancing organs remapped in 3D (the same model as the training
  augmentation :func:`models.augment.contrast_phase`, so a model trained with it has seen
  this kind of change, though not this scan);
* :func:`kernel_noise`: a smooth or sharp reconstruction kernel and another noise level;
* :func:`field_of_view`: a circular field of view with a scanner's fill value outside;
* :func:`slab`: the top ("dome") or bottom ("tip") 1-3 slices of the liver only;
* :func:`pixel_size` and :func:`slice_thickness`: resampled in-plane or along the slices;
* :func:`paint_lesion`: a large spherical tumour centred near the capsule.

Every function is deterministic (seeded where random) and leaves its inputs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from shared.volume import Volume


@dataclass
class Case:
    """A CT with its known liver (and, when painted, lesion) voxels."""

    name: str
    volume: Volume
    liver: np.ndarray
    """bool, the volume's shape: liver voxels (a painted lesion's voxels are liver too)."""
    lesion: np.ndarray | None = None
    """bool, the volume's shape: painted lesion voxels, or None."""

    def with_volume(self, name: str, volume: Volume, liver=None, lesion=None) -> Case:
        return Case(name, volume, self.liver if liver is None else liver,
                    self.lesion if lesion is None else lesion)


def _volume(like: Volume, data: np.ndarray, affine=None, spacing=None, suffix: str = ""
            ) -> Volume:
    data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    return replace(like, data=np.ascontiguousarray(data),
                   affine=like.affine.copy() if affine is None else affine,
                   spacing=like.spacing if spacing is None else tuple(float(s) for s in spacing),
                   description=f"{like.description} {suffix}".strip(), extra=dict(like.extra))


def contrast_phase(case: Case, liver_hu: float, vessel_gain: float, organ_gain: float,
                   name: str) -> Case:
    """The scan in another contrast phase: the liver parenchyma at ``liver_hu``.

    With ``m`` the median HU of the liver and ``l`` the liver mask, as
    :func:`models.augment.contrast_phase`::

        v = clip((h - m - 15) / 25, 0, 1) l
        h' = h + l (liver_hu - m) + v (vessel_gain - 1) (h - m)
        h' = h' + w ((40 + organ_gain (h - 40)) - h),
        w = clip((h - 10) / 30, 0, 1) clip((500 - h) / 150, 0, 1) (1 - l)

    Plain CT: ``liver_hu`` 45-55, ``vessel_gain`` < 0, ``organ_gain`` about 0.25.
    """
    hu = case.volume.data.astype(np.float32)
    liver = case.liver.astype(np.float32)
    median = float(np.median(hu[case.liver]))
    vessels = np.clip((hu - median - 15) / 25, 0, 1) * liver
    out = hu + liver * (liver_hu - median) + vessels * (vessel_gain - 1) * (hu - median)
    organs = np.clip((hu - 10) / 30, 0, 1) * np.clip((500 - hu) / 150, 0, 1) * (1 - liver)
    out += organs * ((40 + organ_gain * (hu - 40)) - hu)
    return case.with_volume(name, _volume(case.volume, out, suffix=name))


def kernel_noise(case: Case, kernel: str, noise_hu: float, seed: int, name: str) -> Case:
    """Another reconstruction kernel (``"smooth"``: Gaussian, sigma 1 mm; ``"sharp"``:
    unsharp mask, amount 1, sigma 1 mm) and added CT-textured noise of ``noise_hu``."""
    if kernel not in ("smooth", "sharp"):
        raise ValueError(f"kernel must be 'smooth' or 'sharp', got {kernel!r}")
    sx, sy, _ = case.volume.spacing
    sigma = (0.0, 1.0 / sy, 1.0 / sx)
    hu = case.volume.data.astype(np.float32)
    blurred = ndimage.gaussian_filter(hu, sigma)
    hu = blurred if kernel == "smooth" else hu + (hu - blurred)
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=hu.shape).astype(np.float32)
    noise -= ndimage.gaussian_filter(noise, (0.0, 2.0 / sy, 2.0 / sx))
    noise = ndimage.gaussian_filter(noise, (0.0, 0.4 / sy, 0.4 / sx))
    hu += noise / max(float(noise.std()), 1e-6) * noise_hu
    return case.with_volume(name, _volume(case.volume, hu, suffix=name))


def field_of_view(case: Case, fill_hu: float, radius_fraction: float, name: str) -> Case:
    """Voxels outside a centred circle of ``radius_fraction`` x half the smaller side set to
    ``fill_hu`` (the liver voxels there are lost from the scan: they leave the mask)."""
    nz, ny, nx = case.volume.shape
    rows = np.arange(ny)[:, None] - (ny - 1) / 2
    cols = np.arange(nx)[None, :] - (nx - 1) / 2
    outside = rows ** 2 + cols ** 2 > (radius_fraction * min(ny, nx) / 2) ** 2
    data = np.where(outside[None], fill_hu, case.volume.data)
    keep = ~outside[None]
    lesion = None if case.lesion is None else case.lesion & keep
    return Case(name, _volume(case.volume, data, suffix=name), case.liver & keep, lesion)


def _sub_volume(volume: Volume, start: int, stop: int, suffix: str) -> Volume:
    affine = volume.affine.copy()
    affine[:3, 3] += affine[:3, 2] * start
    return _volume(volume, volume.data[start:stop], affine=affine, suffix=suffix)


def superior_axis_sign(volume: Volume) -> int:
    """+1 when slice index grows toward the patient's head (superior), else -1."""
    return 1 if volume.affine[2, 2] > 0 else -1


def slab(case: Case, where: str, slices: int, name: str) -> Case:
    """The ``slices`` most superior (``where="dome"``) or inferior (``"tip"``) slices that hold
    liver: a thin scan that shows only the top or the bottom of the liver."""
    if where not in ("dome", "tip") or slices < 1:
        raise ValueError(f"where must be 'dome' or 'tip' and slices >= 1, got {where}, {slices}")
    with_liver = np.flatnonzero(case.liver.any(axis=(1, 2)))
    superior_last = superior_axis_sign(case.volume) > 0
    take_high = (where == "dome") == superior_last
    start = with_liver[-slices] if take_high else with_liver[0]
    start = int(min(start, case.volume.shape[0] - slices))
    stop = start + slices
    lesion = None if case.lesion is None else case.lesion[start:stop]
    return Case(name, _sub_volume(case.volume, start, stop, name), case.liver[start:stop], lesion)


def slices(case: Case, start: int, stop: int, name: str) -> Case:
    """Slices ``start..stop-1`` of the case (a crop along the body)."""
    lesion = None if case.lesion is None else case.lesion[start:stop]
    return Case(name, _sub_volume(case.volume, start, stop, name), case.liver[start:stop], lesion)


def _scaled_affine(volume: Volume, factors) -> np.ndarray:
    """Affine of a grid whose voxels are ``factors`` (x, y, z) times larger, same extent."""
    affine = volume.affine.copy()
    for axis, factor in enumerate(factors):
        # The first new voxel's centre sits half a new voxel inside the old extent.
        affine[:3, 3] += affine[:3, axis] * (factor - 1) / 2
        affine[:3, axis] *= factor
    return affine


def pixel_size(case: Case, pixel_mm: float, name: str) -> Case:
    """In-plane resampling to ``pixel_mm`` pixels over the same field of view (HU linear,
    masks by the nearest source voxel)."""
    sx, sy, sz = case.volume.spacing
    nz, ny, nx = case.volume.shape
    new_ny, new_nx = max(1, round(ny * sy / pixel_mm)), max(1, round(nx * sx / pixel_mm))
    zoom = (1.0, new_ny / ny, new_nx / nx)
    hu = ndimage.zoom(case.volume.data.astype(np.float32), zoom, order=1, mode="nearest",
                      grid_mode=True)
    liver = ndimage.zoom(case.liver.astype(np.uint8), zoom, order=0, mode="nearest",
                         grid_mode=True) > 0
    lesion = None if case.lesion is None else ndimage.zoom(
        case.lesion.astype(np.uint8), zoom, order=0, mode="nearest", grid_mode=True) > 0
    factors = (nx / new_nx, ny / new_ny, 1.0)
    volume = _volume(case.volume, hu, affine=_scaled_affine(case.volume, factors),
                     spacing=(sx * factors[0], sy * factors[1], sz), suffix=name)
    return Case(name, volume, liver, lesion)


def slice_thickness(case: Case, slice_mm: float, name: str) -> Case:
    """Resampling along the slices to ``slice_mm``: thicker slices average their source
    slices (partial volume), thinner ones interpolate linearly; a voxel is liver (lesion) when
    at least half of it is."""
    sz = case.volume.spacing[2]
    nz = case.volume.shape[0]
    new_nz = max(1, round(nz * sz / slice_mm))
    zoom = (new_nz / nz, 1.0, 1.0)
    order = 1
    data = case.volume.data.astype(np.float32)
    if new_nz < nz:  # average, as a thick reconstruction integrates over the slice
        data = ndimage.uniform_filter1d(data, size=max(1, round(slice_mm / sz)), axis=0,
                                        mode="nearest")
    hu = ndimage.zoom(data, zoom, order=order, mode="nearest", grid_mode=True)

    def mask(values):
        smooth = values.astype(np.float32)
        if new_nz < nz:
            smooth = ndimage.uniform_filter1d(smooth, size=max(1, round(slice_mm / sz)), axis=0,
                                              mode="nearest")
        return ndimage.zoom(smooth, zoom, order=1, mode="nearest", grid_mode=True) >= 0.5

    factors = (1.0, 1.0, nz / new_nz)
    volume = _volume(case.volume, hu, affine=_scaled_affine(case.volume, factors),
                     spacing=(case.volume.spacing[0], case.volume.spacing[1], sz * factors[2]),
                     suffix=name)
    lesion = None if case.lesion is None else mask(case.lesion)
    liver = mask(case.liver)
    if lesion is not None:
        liver |= lesion
    return Case(name, volume, liver, lesion)


def paint_lesion(case: Case, diameter_mm: float, delta_hu: float, seed: int, name: str,
                 depth_mm: tuple[float, float] = (3.0, 10.0)) -> Case:
    """A spherical tumour of ``diameter_mm`` centred ``depth_mm`` below the liver's surface
    (so a large one reaches the capsule), its liver voxels shifted by ``delta_hu`` with a
    1-voxel soft edge; the tumour stays liver (it must be in the ROI) and is returned as the
    case's lesion."""
    sx, sy, sz = case.volume.spacing
    depth = ndimage.distance_transform_edt(case.liver, sampling=(sz, sy, sx))
    candidates = np.argwhere((depth >= depth_mm[0]) & (depth <= depth_mm[1]))
    if len(candidates) == 0:
        raise ValueError(f"{case.name}: no liver voxel {depth_mm} mm below the surface")
    centre = candidates[np.random.default_rng(seed).integers(len(candidates))]
    axes = [((np.arange(n) - c) * s) ** 2 for n, c, s in
            zip(case.liver.shape, centre, (sz, sy, sx), strict=True)]
    distance = np.sqrt(axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :])
    radius = diameter_mm / 2
    weight = np.clip((radius - distance) / max(sx, sy) + 0.5, 0, 1) * case.liver
    lesion = case.liver & (distance <= radius)
    data = case.volume.data.astype(np.float32) + weight * delta_hu
    volume = _volume(case.volume, data, suffix=name)
    previous = case.lesion if case.lesion is not None else np.zeros_like(lesion)
    return Case(name, volume, case.liver, previous | lesion)
