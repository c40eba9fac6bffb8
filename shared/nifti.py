"""Reading and writing NIfTI volumes (nibabel), with atomic writes.

Used by the sender to load ``.nii``/``.nii.gz`` inputs and by the receiver to write what it
reassembled. The written file keeps the source's affine, stored dtype and scl_slope/scl_inter,
so its voxel values (after scaling) equal the input's.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np

from shared.atomic import atomic_path
from shared.volume import Volume, VolumeError, spacing_from_affine, to_hu_int16

NIFTI_SUFFIXES = (".nii", ".nii.gz")
VOXEL_OFFSET = 352


def is_nifti_path(path) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)


def read_nifti(path) -> Volume:
    """Load a 3D NIfTI file as a :class:`Volume` of integer HU."""
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises many types for broken files
        raise VolumeError(f"cannot read NIfTI {path}: {error}") from None
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got shape {image.shape}")
    raw = np.asarray(image.dataobj.get_unscaled()).reshape(shape)
    slope = image.dataobj.slope
    inter = image.dataobj.inter
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    hu = raw if (slope, inter) == (1.0, 0.0) else raw.astype(np.float64) * slope + inter
    data = to_hu_int16(hu, f"{path}").transpose(2, 1, 0)
    affine = image.affine
    return Volume(
        data=np.ascontiguousarray(data), affine=affine,
        spacing=tuple(float(z) for z in image.header.get_zooms()[:3]) or spacing_from_affine(affine),
        source_dtype=raw.dtype.name, rescale_slope=slope, rescale_intercept=inter,
        description=Path(str(path)).name,
    )


def nifti_header(volume: Volume) -> nib.Nifti1Header:
    """The NIfTI-1 header of ``volume``: stored dtype, scl_slope/scl_inter, zooms, q/sform.

    The calls are in the order nibabel makes them when it saves an image, so the file equals
    ``nib.save(nib.Nifti1Image(stored, affine), ...)`` byte for byte (a test checks it).
    """
    nz, ny, nx = volume.shape
    affine = volume.affine
    header = nib.Nifti1Header()
    header.set_data_shape((nx, ny, nz))
    header.set_data_dtype(np.dtype(volume.source_dtype))
    header.set_xyzt_units("mm", "sec")
    header.set_sform(affine, code=2)
    header.set_zooms(volume.spacing)
    header.set_slope_inter(volume.rescale_slope, volume.rescale_intercept)
    header.set_qform(affine, code=1)
    if not np.allclose(header.get_qform(), affine, rtol=0, atol=1e-4):
        # A sheared affine (a tilted gantry's slices) has no quaternion form: nibabel would
        # store an approximation as the qform. Code 0 marks it unusable, so that every reader
        # takes the exact sform instead of silently moving voxels.
        header.set_qform(affine, code=0)
    header.set_sform(affine, code=1)
    header["vox_offset"] = VOXEL_OFFSET
    return header


def write_nifti(volume: Volume, path, hu: np.ndarray | None = None, compresslevel: int = 6
                ) -> Path:
    """Write ``hu`` (default ``volume.data``) as NIfTI with the volume's geometry, atomically.

    Slices are converted to the stored dtype and written one at a time (the slice-major array is
    already in NIfTI's x-fastest order), so memory stays at one slice beyond the volume. The file
    is written under a temporary name in the destination folder and renamed: a reader never
    sees a half-written file.
    """
    path = Path(path)
    hu = volume.data if hu is None else hu
    header = nifti_header(volume)
    little_endian = np.dtype(volume.source_dtype).newbyteorder("<")
    compressed = str(path).lower().endswith(".gz")
    with atomic_path(path, ".nii.gz" if compressed else ".nii") as temporary, \
            open(temporary, "wb") as raw:
        out = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0) \
            if compressed else raw
        prefix = io.BytesIO()
        header.write_to(prefix)  # 348 bytes of header + the 4-byte "no extension" flag
        out.write(prefix.getvalue().ljust(VOXEL_OFFSET, b"\x00"))
        for z in range(hu.shape[0]):
            out.write(volume.stored_values(hu[z]).astype(little_endian, copy=False).tobytes())
        if compressed:
            out.close()
    return path
