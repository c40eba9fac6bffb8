"""Synthetic CT series as DICOM files, for the live-session tests (scanner push, watch folder).

The phantom of :mod:`models.phantoms` written as single-frame CT Image Storage files,
one per slice, in a chosen transfer syntax (JPEG 2000 and JPEG-LS lossless included), with fresh
UIDs. Also a copy of the shared abdomen series with its empty UIDs filled in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_series(folder: Path, volume, study_uid: str | None = None, series_number: int = 1,
                 transfer_syntax: str = "1.2.840.10008.1.2.1", patient_id: str = "PAT-0042",
                 description: str = "Abdomen 2.5 mm") -> tuple[str, str, list[Path]]:
    """Write ``volume`` (a :class:`shared.volume.Volume` with an axial RAS+ affine) as a series.

    Returns ``(study_uid, series_uid, files)``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    nz, ny, nx = volume.shape
    sx, sy, sz = volume.spacing
    # RAS+ affine -> LPS direction cosines of rows and columns, position of each slice.
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    row, column = lps[:3, 0] / sx, lps[:3, 1] / sy
    files = []
    for k in range(nz):
        position = (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]
        ds = Dataset()
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JANE", patient_id, "19600101"
        ds.PatientSex = "F"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20261130", "101500", "4711"
        ds.AccessionNumber = "ACC123"
        ds.StudyDescription = "CT-guided liver ablation"
        ds.SeriesNumber, ds.SeriesDescription = series_number, description
        ds.AcquisitionDate, ds.AcquisitionTime = "20261130", f"1016{series_number:02d}"
        ds.InstitutionName = "General Hospital"
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row, *column)]
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.PixelSpacing = [sy, sx]
        ds.SliceThickness = sz
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        stored = (volume.data[k].astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
        ds.PixelData = stored.tobytes()
        if transfer_syntax != "1.2.840.10008.1.2.1":
            ds.compress(UID(transfer_syntax), stored)
        path = folder / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study_uid, series_uid, files


def expected_hu(volume) -> np.ndarray:
    """The HU the series written by :func:`write_series` holds (12-bit stored, intercept -1024)."""
    return ((volume.data.astype(np.int32) + 1024).clip(0, 4095) - 1024).astype(np.int16)


def fill_uids(source: Path, target: Path, study_uid: str | None = None) -> tuple[str, str]:
    """Copy the DICOM files of ``source`` with CT SOP class and fresh study/series/SOP UIDs (the
    shared abdomen series has them empty); the pixel data stays as it is (JPEG 2000)."""
    import pydicom
    from pydicom.uid import generate_uid

    target.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        if not ds.get("FrameOfReferenceUID"):
            ds.FrameOfReferenceUID = frame_uid
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(target / path.name, enforce_file_format=True)
    return study_uid, series_uid
