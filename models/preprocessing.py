"""What happens to a CT volume before and after the U-Net, shared by training and inference.

1. **Canonical orientation.** Scanners and file formats store axial slices in different array
   orientations (a DICOM series loads with rows running anterior to posterior, a NIfTI from
   another tool may run posterior to anterior and right to left). The network sees every
   volume in one orientation, the radiological display convention: array axes
   ``(z, y, x)`` = (inferior to Superior, anterior to Posterior, right to Left), i.e. the
   volume's axes are permuted and flipped, never interpolated, until its affine's direction
   cosines are closest to ``LPS``. :func:`to_canonical` and :func:`from_canonical` are exact
   inverses.
2. **Intensity window.** HU are clipped to ``[low, high]`` and mapped linearly to
   ``[-1, 1]``: ``x = 2 (clip(h, low, high) - low) / (high - low) - 1``.
3. **In-plane resampling** of every slice to the network's pixel size ``s`` (bilinear,
   antialiased when shrinking), to ``round(n * s_native / s)`` pixels per axis; slices are
   never mixed, so slice spacing does not matter. Probabilities go back to the native grid
   the same way (bilinear, ``align_corners=False``: both grids span the same field of view).
4. **Padding** to a multiple of ``2 ** (levels - 1)`` with the window's low value (air).

Before all of this, :func:`suppress_padding` turns the constant fill value that many scanners
write outside their circular field of view (``PixelPaddingValue``: -3024, -2048, -2000, or
values that decode to 0 HU or more) into air, so that a fill of 0 HU does not look like a ring
of water around the patient.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

#: HU written for the padding that :func:`suppress_padding` finds: air.
AIR_HU = -1024
#: Fill values at or below this need no suppression: the window maps them to air anyway, and
#: so does the body outline's -500 HU threshold.
PADDING_SUPPRESSION_ABOVE_HU = -500
#: A border-connected region of one exact value counts as padding only when it covers at least
#: this share of the slice border (measured tissue and air are never noise-free over that much;
#: a field-of-view circle inscribed in the image leaves nearly all of the border outside).
PADDING_BORDER_SHARE = 0.25

#: Target axis codes of the index axes ``(i, j, k)``: i toward patient Left, j toward
#: Posterior, k toward Superior (the radiological display convention, DICOM's usual LPS).
CANONICAL_AXCODES = ("L", "P", "S")


def _orientation_transform(affine: np.ndarray, inverse: bool = False) -> np.ndarray:
    current = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    target = nib.orientations.axcodes2ornt(CANONICAL_AXCODES)
    if inverse:
        return nib.orientations.ornt_transform(target, current)
    return nib.orientations.ornt_transform(current, target)


def _apply_to_slice_major(values: np.ndarray, transform: np.ndarray) -> np.ndarray:
    # nibabel works on (i, j, k) arrays; ours are slice-major (k, j, i).
    ijk = np.asarray(values).transpose(2, 1, 0)
    return nib.orientations.apply_orientation(ijk, transform).transpose(2, 1, 0)


def to_canonical(values: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """View of slice-major ``values`` (grid of ``affine``) in canonical orientation."""
    return _apply_to_slice_major(values, _orientation_transform(affine))


def from_canonical(values: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_canonical`: back to the array orientation of ``affine``'s grid."""
    return _apply_to_slice_major(values, _orientation_transform(affine, inverse=True))


def canonical_spacing(spacing, affine: np.ndarray) -> tuple[float, float, float]:
    """``(sx, sy, sz)`` of the canonical array's axes (a permutation of ``spacing``)."""
    axes = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))[:, 0]
    permuted = [0.0, 0.0, 0.0]
    for index_axis, world_axis in enumerate(axes.astype(int)):
        permuted[world_axis] = float(spacing[index_axis])
    return tuple(permuted)


def window(hu: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clip HU to ``[low, high]`` and map them linearly to ``[-1, 1]``."""
    return (hu.clamp(low, high) - low) * (2.0 / (high - low)) - 1.0


def network_size(shape_yx, spacing_xy, spacing_mm: float) -> tuple[int, int]:
    """In-plane size ``(ny, nx)`` of a slice resampled to ``spacing_mm`` pixels."""
    ny, nx = shape_yx
    sx, sy = spacing_xy
    return max(1, round(ny * sy / spacing_mm)), max(1, round(nx * sx / spacing_mm))


def resize(slices: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)`` to ``size``; antialiased when shrinking."""
    size = tuple(int(n) for n in size)
    if tuple(slices.shape[-2:]) == size:
        return slices
    shrinking = size[0] < slices.shape[-2] or size[1] < slices.shape[-1]
    return F.interpolate(slices, size=size, mode="bilinear", align_corners=False,
                         antialias=shrinking)


def pad_to_multiple(slices: torch.Tensor, multiple: int, value: float
                    ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``(N, C, H, W)`` at the bottom/right to multiples of ``multiple``.

    Returns the padded tensor and the original ``(H, W)`` to crop back to.
    """
    height, width = slices.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        slices = F.pad(slices, (0, pad_w, 0, pad_h), value=value)
    return slices, (height, width)


def padding_value(section: np.ndarray) -> int | None:
    """The fill value of a slice's border, or ``None``: the value of at least
    :data:`PADDING_BORDER_SHARE` of the border pixels when all four corners hold it."""
    corners = {int(section[0, 0]), int(section[0, -1]), int(section[-1, 0]), int(section[-1, -1])}
    if len(corners) != 1:
        return None
    value = corners.pop()
    border = np.concatenate([section[0], section[-1], section[1:-1, 0], section[1:-1, -1]])
    return value if np.mean(border == value) >= PADDING_BORDER_SHARE else None


def suppress_padding(hu: np.ndarray, above: float = PADDING_SUPPRESSION_ABOVE_HU) -> np.ndarray:
    """``hu`` (2D or slice-major 3D) with the padding outside the field of view set to air.

    Per slice: when the four corners and a quarter of the border hold one exact value
    ``v > above`` (:func:`padding_value`), the pixels of value ``v`` connected to the border
    (4-connectivity) are padding and become :data:`AIR_HU`. Measured tissue and air are noisy,
    so they never form such a region; a slice without padding is returned unchanged (the input
    itself when no slice has any).

    >>> section = np.zeros((6, 6), np.int16); section[2:4, 2:4] = 40
    >>> suppress_padding(section)[0, 0], suppress_padding(section)[2, 2]
    (np.int16(-1024), np.int16(40))
    """
    from scipy.ndimage import label

    hu = np.asarray(hu)
    sections = hu[None] if hu.ndim == 2 else hu
    out = None
    for k, section in enumerate(sections):
        value = padding_value(section)
        if value is None or value <= above:
            continue
        regions, _ = label(section == value)
        edge = np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0],
                                         regions[:, -1]]))
        padding = np.isin(regions, edge[edge > 0])
        if out is None:
            out = np.array(sections, copy=True)
        out[k][padding] = AIR_HU
    if out is None:
        return hu
    return out[0] if hu.ndim == 2 else out
