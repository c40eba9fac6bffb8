"""Loading CT volumes: NIfTI through nibabel; DICOM series through pydicom (:mod:`sender.dicom`);
NRRD and MetaImage through ITK.

Every loader returns a :class:`shared.volume.Volume` of int16 HU with a RAS+ affine. ITK and
pydicom are imported lazily, so a NIfTI input pays for neither.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sender.dicom import DicomOptions
from shared.geometry import itk_geometry_to_affine
from shared.nifti import is_nifti_path, read_nifti
from shared.volume import Volume, VolumeError, to_hu_int16

log = logging.getLogger("dlad.sender")

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def load_volume(path, dicom: DicomOptions = DicomOptions()) -> Volume:
    """Load ``path`` (NIfTI file, DICOM series folder, NRRD or MHA/MHD) as a Volume.

    ``dicom`` holds the choices for a DICOM folder (series, gaps, unreadable files).
    Raises :class:`VolumeError` with a one-line reason for anything unusable
    (:class:`~sender.dicom.DicomSeriesError` for a DICOM folder that is not one usable series).
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"input not found: {path}")
    if path.is_dir():  # the series reader shows its own progress
        return _read_dicom_series(path, dicom)
    log.info("reading %s", path)  # said at once: a large file takes seconds
    if is_nifti_path(path):
        return read_nifti(path)
    if path.name.lower().endswith(ITK_SUFFIXES):
        return _read_with_itk(path)
    raise VolumeError(
        f"unsupported input {path.name}: give a NIfTI file (.nii/.nii.gz), a DICOM series "
        "folder, an NRRD (.nrrd/.nhdr) or a MetaImage (.mha/.mhd)")


def _itk():
    try:
        import itk  # noqa: PLC0415 - heavy import, only for NRRD/MHA
    except ImportError:
        raise VolumeError("reading NRRD/MHA needs ITK: pip install 'dlad-stream[sender]'") \
            from None
    return itk


def _volume_from_itk_image(image, description: str, source_dtype: str,
                           slope: float = 1.0, intercept: float = 0.0) -> Volume:
    itk = _itk()
    if image.GetImageDimension() != 3:
        raise VolumeError(f"{description}: expected a 3D image, got {image.GetImageDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{description}: expected a scalar (grey) image, got "
                          f"{image.GetNumberOfComponentsPerPixel()} components per pixel")
    values = np.array(itk.array_view_from_image(image))  # (z, y, x) already slice-major
    affine = itk_geometry_to_affine(np.array(image.GetDirection()), tuple(image.GetSpacing()),
                                    tuple(image.GetOrigin()))
    return Volume(data=to_hu_int16(values, description), affine=affine,
                  spacing=tuple(float(s) for s in image.GetSpacing()),
                  source_dtype=source_dtype, rescale_slope=slope, rescale_intercept=intercept,
                  description=description)


def _read_with_itk(path: Path) -> Volume:
    itk = _itk()
    try:
        image = itk.imread(str(path))
    except Exception as error:
        raise VolumeError(f"cannot read {path}: {str(error).strip().splitlines()[-1]}") from None
    dtype = np.dtype(itk.array_view_from_image(image).dtype).name
    return _volume_from_itk_image(image, path.name, dtype)


def _read_dicom_series(folder: Path, options: DicomOptions) -> Volume:
    from sender.dicom import read_series
    from sender.dicom_attributes import stream_attributes

    series = read_series(folder, series_uid=options.series_uid, allow_gaps=options.allow_gaps,
                         skip_unreadable=options.skip_unreadable)
    # The attributes the stream header carries (identity, descriptions, geometry), for the
    # receiver's viewer and DICOM export.
    series.volume.extra["dicom"] = stream_attributes(series)
    return series.volume
