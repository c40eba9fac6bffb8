"""The one in-memory volume type that every path of dlad-stream uses.

A :class:`Volume` holds integer Hounsfield units in slice-major order
``(nz, ny, nx)`` together with the geometry needed to put every voxel back where
it was: the NIfTI-style 4x4 ``affine`` that maps a voxel index ``(i, j, k)``
(``i`` along x, ``j`` along y, ``k`` along z, i.e. ``data[k, j, i]``) to RAS+
millimetres, the voxel ``spacing`` in mm as ``(sx, sy, sz)``, the dtype the
voxels had on disk and the rescale slope/intercept that turned stored values
into HU.

This module imports neither torch nor itk: the receiver uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: dtypes a source file may store voxels in; floats only when every value is integral.
SUPPORTED_SOURCE_DTYPES = (
    "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float32", "float64",
)
HU_DTYPE = np.dtype("<i2")
HU_MIN, HU_MAX = -32768, 32767
#: Largest rescale intercept (in magnitude) a written volume may have: NIfTI's ``scl_inter`` is a
#: float32, exact for every integer up to 2^24 (CT intercepts are -1024, -8192, -32768...).
MAX_INTERCEPT = 1 << 24


class VolumeError(ValueError):
    """A volume, or the file it came from, cannot be used as it is."""


@dataclass
class Volume:
    """Integer HU voxels with their geometry and on-disk representation."""

    data: np.ndarray
    """HU voxels, int16, C-contiguous, shape ``(nz, ny, nx)``; ``data[k, j, i]``."""
    affine: np.ndarray
    """4x4 float64 matrix mapping voxel index ``(i, j, k, 1)`` to RAS+ mm."""
    spacing: tuple[float, float, float]
    """Voxel size in mm along ``(i, j, k)`` = ``(x, y, z)``."""
    source_dtype: str = "int16"
    """numpy dtype name of the stored voxels in the source file."""
    rescale_slope: float = 1.0
    """HU = stored * slope + intercept (DICOM RescaleSlope, NIfTI scl_slope)."""
    rescale_intercept: float = 0.0
    """HU = stored * slope + intercept (DICOM RescaleIntercept, NIfTI scl_inter)."""
    description: str = ""
    """Free text about where the volume came from (file name, series description)."""
    extra: dict = field(default_factory=dict)
    """Small provenance facts (modality, study uid); never needed to decode."""

    def __post_init__(self) -> None:
        data = np.asarray(self.data)
        if data.ndim != 3:
            raise VolumeError(f"a volume needs 3 dimensions, got shape {data.shape}")
        if min(data.shape) < 1:
            raise VolumeError(f"a volume cannot have an empty axis, got shape {data.shape}")
        if data.dtype != HU_DTYPE:
            data = to_hu_int16(data, "voxel data")
        self.data = np.ascontiguousarray(data)
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise VolumeError(f"the affine must be a finite 4x4 matrix, got {affine.shape}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise VolumeError("the affine is singular (zero voxel size or collinear axes)")
        self.affine = affine
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise VolumeError(f"spacing must be three positive numbers, got {self.spacing}")
        self.spacing = spacing
        if self.source_dtype not in SUPPORTED_SOURCE_DTYPES:
            raise VolumeError(f"unsupported source dtype {self.source_dtype!r}")
        if not (np.isfinite(self.rescale_slope) and self.rescale_slope != 0
                and np.isfinite(self.rescale_intercept)):
            raise VolumeError(
                f"invalid rescale slope/intercept {self.rescale_slope}/{self.rescale_intercept}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(nz, ny, nx)``."""
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def nbytes_int16(self) -> int:
        """Size of the voxels as raw int16, the denominator-free side of the compression ratio."""
        return int(self.data.size) * 2

    def stored_values(self, hu: np.ndarray | None = None) -> np.ndarray:
        """HU voxels converted back to the source file's stored dtype (slice-major), exactly.

        Raises:
            VolumeError: a voxel that the stored dtype and rescale cannot hold exactly (out of
                the dtype's range, or between two values of the rescale's lattice): nothing is
                ever clipped or rounded on the way out.
        """
        hu = self.data if hu is None else hu
        dtype = np.dtype(self.source_dtype)
        if self.rescale_slope == 1.0 and float(self.rescale_intercept).is_integer():
            # The usual case (slope 1, integral intercept): integer arithmetic, no float64 copy.
            stored = hu.astype(np.int32) - int(self.rescale_intercept)
            exact = True
        else:
            stored = np.rint((hu.astype(np.float64) - self.rescale_intercept) / self.rescale_slope)
            exact = np.array_equal(stored * self.rescale_slope + self.rescale_intercept, hu)
        if dtype.kind in "iu" and stored.size:
            info = np.iinfo(dtype)
            exact = exact and info.min <= stored.min() and stored.max() <= info.max
        converted = stored.astype(dtype, copy=False)
        if dtype.kind == "f":
            exact = exact and np.array_equal(converted.astype(np.float64) * self.rescale_slope
                                             + self.rescale_intercept, hu)
        if not exact:
            raise VolumeError(
                f"HU values in [{hu.min()}, {hu.max()}] cannot be stored exactly as "
                f"{self.source_dtype} with slope {self.rescale_slope:g} and intercept "
                f"{self.rescale_intercept:g}")
        return converted


def representation_problem(source_dtype: str, slope: float, intercept: float,
                           value_range: tuple[int, int]) -> str | None:
    """Why ``source_dtype`` with ``HU = stored * slope + intercept`` cannot hold every integer HU
    of ``value_range`` exactly; None when it can.

    Lossy voxels take any integer in the volume's HU range, so the stored representation must
    hold all of them: slope 1, an integral intercept of at most :data:`MAX_INTERCEPT` in
    magnitude (NIfTI keeps ``scl_inter`` as float32), and the range within the dtype's.

    >>> representation_problem("uint16", 1.0, -1024.0, (-1024, 3000)) is None
    True
    >>> print(representation_problem("uint8", 1.0, 0.0, (-1024, 3000)))
    uint8 with intercept 0 holds HU 0..255, not the volume's -1024..3000
    >>> print(representation_problem("int32", 1.0, 2147479648.0, (-1024, 3000)))
    rescale intercept 2147479648 is beyond 16777216 in magnitude: NIfTI stores it as float32
    """
    if source_dtype not in SUPPORTED_SOURCE_DTYPES:
        return f"unsupported stored dtype {source_dtype!r}"
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        return f"invalid rescale slope/intercept {slope}/{intercept}"
    if slope != 1.0 or not float(intercept).is_integer():
        return (f"rescale slope {slope:g} / intercept {intercept:g} cannot hold every integer HU "
                "(needs slope 1 and an integral intercept)")
    if abs(intercept) > MAX_INTERCEPT:
        return (f"rescale intercept {intercept:.0f} is beyond {MAX_INTERCEPT} in magnitude: NIfTI "
                "stores it as float32")
    low, high = int(value_range[0]), int(value_range[1])
    if low > high:
        return f"empty value range {low}..{high}"
    dtype = np.dtype(source_dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lowest, highest = int(info.min + intercept), int(info.max + intercept)
    else:  # floats hold every integer up to 2^(mantissa bits + 1) exactly
        limit = 2 ** (np.finfo(dtype).nmant + 1)
        lowest, highest = int(-limit + intercept), int(limit + intercept)
    if low < lowest or high > highest:
        return (f"{source_dtype} with intercept {intercept:g} holds HU {lowest}..{highest}, not "
                f"the volume's {low}..{high}")
    return None


def to_hu_int16(values: np.ndarray, what: str) -> np.ndarray:
    """Cast integral values to int16 HU, refusing anything that would change a voxel.

    Float arrays are accepted only if every value is integral (LiTS stores HU as
    float32); integer arrays only if every value fits in int16.
    """
    values = np.asarray(values)
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)):
            raise VolumeError(f"{what} contains NaN or infinite values")
        if not np.array_equal(values, np.round(values)):
            raise VolumeError(
                f"{what} holds non-integral floating-point values; dlad-stream transmits "
                "integer HU only (round the volume first if that is intended)")
    elif values.dtype.kind not in "iub":
        raise VolumeError(f"{what} has unsupported dtype {values.dtype}")
    if values.size:
        lo, hi = values.min(), values.max()
        if lo < HU_MIN or hi > HU_MAX:
            raise VolumeError(
                f"{what} ranges over [{lo}, {hi}], outside int16 [{HU_MIN}, {HU_MAX}]")
    return values.astype(HU_DTYPE)


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each index axis: the norms of the affine's columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
