"""Synthetic DICOM CT series written with pydicom, for the reader's tests (never real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def ct_slices(count: int = 6, rows: int = 40, columns: int = 36, seed: int = 0) -> np.ndarray:
    """Stored values (uint16, 12 bits) of ``count`` slices: noise plus a slice-dependent ramp."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 4096, size=(count, rows, columns), dtype=np.uint16)
    values[:, 0, 0] = np.arange(count, dtype=np.uint16) * 7  # tells the slices apart
    return values


def make_dataset(stored: np.ndarray, position, *, orientation=(1, 0, 0, 0, 1, 0),
                 pixel_spacing=(0.8, 0.7), series_uid="1.2.826.0.1.3680043.2.1125.1",
                 description="Synthetic CT", number=1, instance=1, slope=1.0, intercept=-1024.0,
                 signed=False, frame_uid="1.2.826.0.1.3680043.2.1125.9", sop_uid=None):
    """One CT image dataset (explicit VR little endian, uncompressed) with the given geometry."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.2.1125.5"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.SeriesDescription = description
    ds.SeriesNumber = number
    ds.InstanceNumber = instance
    ds.PatientID = "SYNTHETIC"
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.SliceThickness = "2"
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(stored, dtype="<i2" if signed else "<u2").tobytes()
    return ds


def write_series(folder: Path, stored: np.ndarray, *, first=(-100.0, -80.0, -300.0),
                 step=(0.0, 0.0, 2.0), names=None, syntax=None, **fields) -> list[Path]:
    """Write ``stored`` slice k at ``first + k * step`` into ``folder``; return the paths.

    ``syntax`` compresses each file with that transfer syntax (pydicom's encoders); files are
    named in reverse slice order, so the reader must sort by position, not by name.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, values in enumerate(stored):
        ds = make_dataset(values, np.asarray(first) + k * np.asarray(step), instance=k + 1,
                          **fields)
        name = names[k] if names else f"IM{len(stored) - k:04d}.dcm"
        path = folder / name
        save(ds, path, syntax)
        paths.append(path)
    return paths


def save(ds, path: Path, syntax=None) -> None:
    """Write ``ds`` (made by :func:`make_dataset`) with transfer syntax ``syntax``."""
    from pydicom import uid
    from pydicom.encaps import encapsulate

    little_endian = True
    if syntax in (uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax == uid.ExplicitVRBigEndian:
        # pydicom writes OW pixel data as given: give it the big-endian bytes.
        dtype = ">i2" if ds.PixelRepresentation else ">u2"
        native = np.frombuffer(ds.PixelData, dtype=dtype.replace(">", "<"))
        ds.PixelData = native.astype(dtype).tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
        little_endian = False
    elif syntax == uid.JPEGLosslessSV1:
        import imagecodecs  # pydicom has no encoder for it; imagecodecs' liblj92 has

        frame = imagecodecs.ljpeg_encode(ds.pixel_array)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax is not None:
        ds.compress(syntax, encoding_plugin="")
    ds.save_as(path, enforce_file_format=True, little_endian=little_endian,
               implicit_vr=syntax == uid.ImplicitVRLittleEndian)


def make_enhanced(stored: np.ndarray, first=(-100.0, -80.0, -300.0), step=(0.0, 0.0, 2.0),
                  order=None, intercepts=None):
    """One Enhanced CT dataset holding ``stored``'s slices as frames, in ``order`` (default:
    slice order), with per-frame positions (and rescale intercepts) and shared orientation and
    pixel spacing, as the functional groups of PS3.3 C.7.6.16 hold them."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    order = list(range(len(stored))) if order is None else list(order)
    ds = make_dataset(stored[order[0]], first)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                    "RescaleSlope", "RescaleIntercept"):
        delattr(ds, keyword)
    ds.NumberOfFrames = len(order)
    shared = Dataset()
    orientation, measures, transform = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [0.8, 0.7], 2
    transform.RescaleSlope, transform.RescaleIntercept = 1, -1024
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    if intercepts is None:
        shared.PixelValueTransformationSequence = Sequence([transform])
    groups = []
    for k in order:
        group, position = Dataset(), Dataset()
        position.ImagePositionPatient = [float(v) for v in np.asarray(first) + k * np.asarray(step)]
        group.PlanePositionSequence = Sequence([position])
        if intercepts is not None:
            own = Dataset()
            own.RescaleSlope, own.RescaleIntercept = 1, intercepts[k]
            group.PixelValueTransformationSequence = Sequence([own])
        groups.append(group)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds.PixelData = np.ascontiguousarray(stored[order], dtype="<u2").tobytes()
    return ds
