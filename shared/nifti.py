"""Reading and writing NIfTI volumes (nibabel), with atomic writes.

Used by the sender to load ``.nii``/``.nii.gz`` inputs and by the receiver to write what it
reassembled. The written file keeps the source's affine, stored dtype and scl_slope/scl_inter,
so its voxel values (after scaling) equal the input's.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from shared.volume import Volume, VolumeError, spacing_from_affine, to_hu_int16

NIFTI_SUFFIXES = (".nii", ".nii.gz")


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


def write_nifti(volume: Volume, path, hu: np.ndarray | None = None) -> Path:
    """Write ``hu`` (default ``volume.data``) as NIfTI with the volume's geometry, atomically.

    The file is written under a temporary name in the destination folder and renamed, so a
    reader never sees a half-written file.
    """
    path = Path(path)
    hu = volume.data if hu is None else hu
    stored = volume.stored_values(hu).transpose(2, 1, 0)
    image = nib.Nifti1Image(stored, volume.affine)
    header = image.header
    header.set_data_dtype(stored.dtype)
    header.set_xyzt_units("mm", "sec")
    header.set_zooms(volume.spacing)
    if (volume.rescale_slope, volume.rescale_intercept) != (1.0, 0.0):
        header.set_slope_inter(volume.rescale_slope, volume.rescale_intercept)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        nib.save(image, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
