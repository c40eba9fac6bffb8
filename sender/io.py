"""Loading CT volumes: NIfTI through nibabel; DICOM series, NRRD and MetaImage through ITK.

Every loader returns a :class:`shared.volume.Volume` of int16 HU with a RAS+ affine. ITK is
imported lazily, so NIfTI inputs never pay for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.geometry import itk_geometry_to_affine
from shared.nifti import is_nifti_path, read_nifti
from shared.volume import Volume, VolumeError, to_hu_int16

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
#: DICOM tags read for provenance: (BitsAllocated, PixelRepresentation, slope, intercept).
_TAG_BITS, _TAG_SIGNED = "0028|0100", "0028|0103"
_TAG_SLOPE, _TAG_INTERCEPT = "0028|1053", "0028|1052"


def load_volume(path) -> Volume:
    """Load ``path`` (NIfTI file, DICOM series folder, NRRD or MHA/MHD) as a Volume.

    Raises :class:`VolumeError` with a one-line reason for anything unusable.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"input not found: {path}")
    if path.is_dir():
        return _read_dicom_series(path)
    if is_nifti_path(path):
        return read_nifti(path)
    if path.name.lower().endswith(ITK_SUFFIXES):
        return _read_with_itk(path)
    raise VolumeError(
        f"unsupported input {path.name}: give a NIfTI file (.nii/.nii.gz), a DICOM series "
        "folder, an NRRD (.nrrd/.nhdr) or a MetaImage (.mha/.mhd)")


def _itk():
    try:
        import itk  # noqa: PLC0415 - heavy import, only for DICOM/NRRD/MHA
    except ImportError:
        raise VolumeError("reading DICOM/NRRD/MHA needs ITK: pip install 'dlad-stream[sender]'") \
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


def _read_dicom_series(folder: Path) -> Volume:
    itk = _itk()
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.SetDirectory(str(folder))
    series = list(names.GetSeriesUIDs())
    if not series:
        raise VolumeError(f"{folder}: no DICOM series found in this folder")
    # Several series in one folder (scout + axial, say): take the one with the most slices.
    files = max((list(names.GetFileNames(uid)) for uid in series), key=len)
    if len(files) < 2:
        raise VolumeError(f"{folder}: the DICOM series has {len(files)} slice; need at least 2")
    dicom_io = itk.GDCMImageIO.New()
    reader = itk.ImageSeriesReader[itk.Image[itk.F, 3]].New(ImageIO=dicom_io, FileNames=files,
                                                              ForceOrthogonalDirection=False)
    try:
        reader.Update()
    except Exception as error:
        raise VolumeError(f"cannot read DICOM series in {folder}: "
                          f"{str(error).strip().splitlines()[-1]}") from None
    meta = dicom_io.GetMetaDataDictionary()

    def tag(key, default):
        return meta[key].strip() if meta.HasKey(key) else default

    bits = int(tag(_TAG_BITS, "16") or 16)
    signed = tag(_TAG_SIGNED, "0") == "1"
    source_dtype = np.dtype(f"{'i' if signed else 'u'}{max(1, bits // 8)}").name
    slope = float(tag(_TAG_SLOPE, "1") or 1)
    intercept = float(tag(_TAG_INTERCEPT, "0") or 0)
    volume = _volume_from_itk_image(reader.GetOutput(), f"{folder.name} (DICOM)",
                                    source_dtype, slope, intercept)
    volume.extra["modality"] = tag("0008|0060", "")
    volume.extra["study_uid"] = tag("0020|000d", "")
    volume.extra["series_uid"] = tag("0020|000e", "")
    return volume
