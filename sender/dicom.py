"""DICOM series -> :class:`~shared.volume.Volume`: pydicom, with explicit refusals for bad series.

A CT series is a set of single-frame images, each with its own position. This reader groups the
instances by ``SeriesInstanceUID``, checks that they form one regular stack, sorts them along
the slice normal and decodes their pixel data with the decoders pydicom finds (pylibjpeg's
OpenJPEG and libjpeg, pylibjpeg-rle, pyjpegls (CharLS), or GDCM; pydicom itself for the
uncompressed and deflated transfer syntaxes), in a few threads (the decoders release the GIL).

Geometry (DICOM PS3.3 C.7.6.2): ``ImageOrientationPatient`` holds the row cosines ``r`` (the
direction in which the column index ``i`` grows) and the column cosines ``c`` (the direction of
the row index ``j``); ``PixelSpacing`` is ``[dy, dx]`` (between rows, between columns);
``ImagePositionPatient`` is the centre of the first voxel of each slice; all in the patient's LPS
frame (x to the left, y to the back, z to the head). Slices are sorted by the projection of
their position on the normal ``n = r x c``, and the slice axis of the affine is the step between
consecutive positions (``n * dz`` for a plain stack; sheared for a tilted gantry), so every
slice keeps the position the scanner gave it. NIfTI's RAS+ is LPS with x and y negated.

Enhanced (multi-frame) images are split into their frames, each placed by the position,
orientation, pixel spacing and rescale of its functional groups (per-frame, else shared), and
then checked and sorted like single-frame images (several files of frames may form a series).

Refusals (:class:`DicomSeriesError`, a one-line message naming the series, the files and what
is wrong; nothing is returned): no images; files that are not readable DICOM (unless
``skip_unreadable``); several series and no ``series_uid`` (the message lists each series
with its description, image count and UID); a pixel spacing that is not positive; images
that differ in orientation, pixel spacing, size, bits or sign; two images at one position;
missing slices (a gap of a whole number of spacings; ``allow_gaps`` fills them with the
volume's lowest value at their own positions and says so); slices off a regular grid (uneven
spacing: never resampled). Rescale slope and intercept may differ between slices only where the
HU values stay integral; the volume is then stored as int16 HU (slope 1, intercept 0), with a warning.

Example:
    >>> series = read_series("../shared/data/abdomen_ct_dicom")     # doctest: +SKIP
    >>> series.volume.shape, series.description                     # doctest: +SKIP
    ((20, 512, 512), 'CT Body 3.0')
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.geometry import LPS_TO_RAS
from shared.progress import progress
from shared.volume import HU_DTYPE, Volume, VolumeError, to_hu_int16

log = logging.getLogger("dlad.sender")

#: A slice may lie this far from the regular grid fitted through the first and last positions
#: (mm), or this fraction of the slice spacing if larger. Positions are decimal strings of at
#: most 16 characters (DS), rounded by the scanner to 1e-3 mm or better; a slice that is off by
#: more is a different stack, not rounding.
POSITION_TOLERANCE_MM = 0.01
POSITION_TOLERANCE_FRACTION = 0.01
#: Orientation cosines and pixel spacings are compared with this tolerance (DS rounding).
ORIENTATION_TOLERANCE = 1e-4
SPACING_TOLERANCE_MM = 1e-3
#: Decoding threads at most (each holds one decoded slice; more gain nothing on 2-4 cores).
MAX_DECODE_THREADS = 4
#: File names listed in a message at most ("... and N more" after them).
LISTED_FILES = 4
#: Attributes that describe a series for the stream header's ``dicom`` map (see :meth:`DicomSeries.attributes`).
SERIES_KEYWORDS = (
    "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "StudyID", "StudyDate",
    "StudyTime", "StudyDescription", "AccessionNumber", "SeriesNumber", "SeriesDescription",
    "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "Modality", "Manufacturer",
    "ManufacturerModelName", "BodyPartExamined", "PatientPosition", "SliceThickness", "KVP",
    "ConvolutionKernel", "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
)


class DicomSeriesError(VolumeError):
    """The DICOM input does not form one usable series; the message says why, in one line."""


@dataclass(frozen=True)
class DicomOptions:
    """The choices a user can make about a DICOM input (``dlad-send`` options)."""

    series_uid: str | None = None
    """SeriesInstanceUID to read when a folder holds several series (``--series-uid``)."""
    allow_gaps: bool = False
    """Fill missing slices at their own positions instead of refusing (``--allow-gaps``)."""
    skip_unreadable: bool = False
    """Leave out files that are not readable DICOM instead of refusing (``--skip-unreadable``)."""


@dataclass
class DicomSeries:
    """One decoded series: the volume, its instances in slice order, and its metadata."""

    volume: Volume
    """int16 HU voxels with the RAS+ affine of the original slice positions."""
    sources: list[str]
    """Name of each slice's source (file path or instance label), in slice order (``k``);
    ``""`` for a slice inserted by ``allow_gaps``."""
    metadata: object
    """The first instance's pydicom Dataset, without its pixel data."""
    series_uid: str
    """SeriesInstanceUID (``""`` when the instances carry none)."""
    positions: np.ndarray
    """Position of each slice along the slice normal, mm (LPS), in slice order."""
    inserted: list[int] = field(default_factory=list)
    """Slice indices filled in for missing images (``allow_gaps``); empty otherwise."""
    skipped: list[str] = field(default_factory=list)
    """Sources that were not used: non-image DICOM, other series, unreadable (when allowed)."""

    @property
    def description(self) -> str:
        return str(self.metadata.get("SeriesDescription", "") or "")

    def attributes(self, keywords: Iterable[str] = SERIES_KEYWORDS) -> dict:
        """Attributes of the series by keyword, as :class:`~shared.wire.StreamHeader` ``dicom``
        takes them (strings, numbers, lists of them); empty and absent ones are left out."""
        attributes = {}
        for keyword in keywords:
            value = self.metadata.get(keyword)
            if value is None or value == "":
                continue
            converted = _plain(value)
            if converted not in (None, "", []):
                attributes[keyword] = converted
        return attributes


def _plain(value):
    """A pydicom value as a str/int/float or a list of them."""
    from pydicom.multival import MultiValue

    if isinstance(value, (MultiValue, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if np.isfinite(value) else None
    return str(value)


def _pydicom():
    try:
        import pydicom  # noqa: PLC0415 - only DICOM inputs need it
    except ImportError:
        raise DicomSeriesError("reading DICOM needs pydicom: pip install 'dlad-stream[sender]'") \
            from None
    return pydicom


def _names(names: Sequence[str], limit: int = LISTED_FILES) -> str:
    shown = ", ".join(Path(n).name or n for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class _Instance:
    """One image: where it came from, its header, and how to get its pixel data."""

    name: str
    dataset: object
    """pydicom Dataset (pixel data deferred for files, present for in-memory datasets)."""
    owned: bool = True
    """Read from a file by this module: its encoded pixel data may be dropped once decoded."""
    frame: int | None = None
    """Frame index within a multi-frame dataset (None: a single-frame image)."""
    overrides: dict = field(default_factory=dict)
    """Attributes of this frame from the functional groups, by keyword (multi-frame)."""
    position: np.ndarray | None = None
    z: float = 0.0
    stored: np.ndarray | None = None
    """Its pixel data already decoded (stored values), when the caller had it."""

    def attr(self, keyword, default=None):
        value = self.overrides.get(keyword)
        if value is None:
            value = self.dataset.get(keyword, default)
        return default if value is None or value == "" else value


#: Functional group sequence of each per-frame attribute of an enhanced (multi-frame) image.
_FUNCTIONAL_GROUPS = {
    "ImagePositionPatient": "PlanePositionSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
}


def _frames_of(name: str, dataset, owned: bool) -> list[_Instance]:
    """One instance per frame: a single-frame image as it is, an enhanced (multi-frame) image
    split into its frames, each with the geometry and rescale of its functional groups
    (per-frame first, then shared; PS3.3 C.7.6.16)."""
    count = int(dataset.get("NumberOfFrames", 1) or 1)
    if count <= 1:
        return [_Instance(name, dataset, owned=owned)]
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    shared = dataset.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    if per_frame is None or len(per_frame) != count:
        raise DicomSeriesError(f"{Path(name).name}: a multi-frame image of {count} frames "
                               "without one per-frame functional group per frame: the frames' "
                               "positions are unknown")
    sop = str(dataset.get("SOPInstanceUID", "") or "") or Path(name).name
    frames = []
    for index, group in enumerate(per_frame):
        overrides = {"NumberOfFrames": 1, "SOPInstanceUID": f"{sop}#{index + 1}"}
        for keyword, sequence in _FUNCTIONAL_GROUPS.items():
            for source in (group, shared):
                items = source.get(sequence) if source is not None else None
                if items and keyword in items[0]:
                    overrides[keyword] = items[0][keyword].value
                    break
        # The frames share one dataset: it keeps its pixel data until all are decoded.
        frames.append(_Instance(f"{name} frame {index + 1}", dataset, owned=False, frame=index,
                                overrides=overrides))
    return frames


# --- reading ---------------------------------------------------------------------------------

def read_series(source, series_uid: str | None = None, allow_gaps: bool = False,
                skip_unreadable: bool = False, threads: int | None = None) -> DicomSeries:
    """Read one DICOM series from a folder (not recursive) or a list of files.

    Args:
        source: a folder path, or an iterable of file paths.
        series_uid: SeriesInstanceUID to take when the files hold several series (``""``
            selects the instances without one).
        allow_gaps: fill missing slices (a gap of a whole number of spacings) instead of
            refusing the series.
        skip_unreadable: skip files that are not readable DICOM (with a warning) instead of
            refusing the series.
        threads: decoding threads (default: up to :data:`MAX_DECODE_THREADS`).

    Raises:
        DicomSeriesError: the files do not form one usable series (see the module docstring).
    """
    pydicom = _pydicom()
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise DicomSeriesError(f"{folder}: not a folder of DICOM files")
        paths = sorted(p for p in folder.iterdir() if p.is_file())
        where = str(folder)
    else:
        paths = [Path(p) for p in source]
        where = f"{len(paths)} files"
    if not paths:
        raise DicomSeriesError(f"{where}: no DICOM series found (no files)")
    instances, not_dicom, not_image = [], [], []
    # Progress shows when the sender's log shows INFO (dlad-send without --quiet).
    for path in progress(paths, desc=f"reading {where}", unit="file", logger=log):
        try:
            # Pixel data (and other long values) are read when decoded, not now: the header
            # pass over a large series stays fast and small. pydicom reads a truncated file
            # with a warning (and without the elements it lost): a warning means damaged.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dataset = pydicom.dcmread(path, defer_size=4096)
            # pydicom's warnings about the data are UserWarnings; others raised meanwhile (a
            # ResourceWarning from the garbage collector, a DeprecationWarning) are not the file's.
            caught = [warning for warning in caught if issubclass(warning.category, UserWarning)]
        except pydicom.errors.InvalidDicomError:
            dataset, caught = _read_without_preamble(pydicom, path), []
            if dataset is None:
                not_dicom.append(str(path))
                continue
        except Exception as error:  # truncated or garbled files raise many types
            not_dicom.append(str(path))
            log.debug("%s: %s", path, error)
            continue
        if caught:
            not_dicom.append(str(path))
            log.debug("%s: %s", path, caught[0].message)
        elif "PixelData" not in dataset:
            # An image whose pixel data are gone (a truncated file) is damaged, not "no image".
            (not_image if _is_non_image(dataset) else not_dicom).append(str(path))
        else:
            instances.extend(_frames_of(str(path), dataset, owned=True))
    if not_dicom and not skip_unreadable:
        raise DicomSeriesError(
            f"{where}: {len(not_dicom)} file(s) are not readable DICOM ({_names(not_dicom)}); "
            "remove them, or give --skip-unreadable to leave them out")
    skipped = not_dicom + not_image
    if not_dicom:
        log.warning("%s: skipped %d unreadable file(s): %s", where, len(not_dicom),
                    _names(not_dicom))
    if not_image:
        log.warning("%s: skipped %d DICOM file(s) without an image: %s", where, len(not_image),
                    _names(not_image))
    if not instances:
        raise DicomSeriesError(f"{where}: no DICOM images found")
    return _build(instances, where, series_uid, allow_gaps, threads, skipped)


def _is_non_image(dataset) -> bool:
    """Whether ``dataset``'s SOP class is one without pixel data (a DICOMDIR, a report, a
    presentation state, a private class), as opposed to an image class that lost its pixels."""
    from pydicom.uid import UID

    sop_class = str(dataset.get("SOPClassUID", "") or "") or str(
        getattr(dataset, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
    if not sop_class:
        return False
    return "Image Storage" not in UID(sop_class).name


def _read_without_preamble(pydicom, path: Path):
    """A DICOM file without the 128-byte preamble (old ACR-NEMA style), or None."""
    try:
        dataset = pydicom.dcmread(path, defer_size=4096, force=True)
        if "PixelData" in dataset and "Rows" in dataset:
            return dataset
    except Exception:  # not DICOM at all
        pass
    return None


def series_from_datasets(datasets: Iterable, series_uid: str | None = None,
                         allow_gaps: bool = False, names: Sequence[str] | None = None,
                         threads: int | None = None,
                         decoded: Sequence[np.ndarray | None] | None = None) -> DicomSeries:
    """The series formed by in-memory pydicom Datasets (e.g. received by a C-STORE SCP).

    Same checks and result as :func:`read_series`; ``names`` labels the datasets in messages
    (default: their SOPInstanceUID, else their index). ``decoded`` gives, per dataset, its pixel
    data already decoded (the stored values, ``Rows x Columns``; None where not): a live sender
    decodes each image as it arrives, and the series is then assembled without decoding again.
    """
    datasets = list(datasets)
    if not datasets:
        raise DicomSeriesError("no DICOM datasets given")
    instances = []
    skipped = []
    for index, dataset in enumerate(datasets):
        name = names[index] if names is not None else (
            str(dataset.get("SOPInstanceUID", "") or "") or f"dataset #{index}")
        if "PixelData" not in dataset:
            skipped.append(name)
            continue
        frames = _frames_of(name, dataset, owned=False)
        if decoded is not None and decoded[index] is not None and len(frames) == 1 \
                and frames[0].frame is None:
            frames[0].stored = decoded[index]
        instances.extend(frames)
    if skipped:
        log.warning("skipped %d DICOM dataset(s) without an image: %s", len(skipped),
                    _names(skipped))
    if not instances:
        raise DicomSeriesError("no DICOM images among the datasets given")
    return _build(instances, f"{len(datasets)} datasets", series_uid, allow_gaps, threads, skipped)


# --- checks ----------------------------------------------------------------------------------

def _series_label(uid: str, instances: list[_Instance]) -> str:
    description = str(instances[0].attr("SeriesDescription", "") or "")
    number = instances[0].attr("SeriesNumber", None)
    parts = [f"UID {uid}" if uid else "no SeriesInstanceUID"]
    if number is not None:
        parts.append(f"number {number}")
    return f"series {description!r} ({', '.join(parts)})" if description else \
        f"series ({', '.join(parts)})"


def _choose_series(instances: list[_Instance], where: str, series_uid: str | None
                   ) -> tuple[str, list[_Instance], list[str]]:
    groups: dict[str, list[_Instance]] = {}
    for instance in instances:
        groups.setdefault(str(instance.attr("SeriesInstanceUID", "") or ""), []).append(instance)
    if series_uid is not None:
        if series_uid not in groups:
            raise DicomSeriesError(
                f"{where}: no series with UID {series_uid!r}; found: " + "; ".join(
                    f"{uid or '(none)'} {str(g[0].attr('SeriesDescription', '') or '')!r} "
                    f"({len(g)} images)" for uid, g in groups.items()))
        others = [i.name for uid, g in groups.items() if uid != series_uid for i in g]
        return series_uid, groups[series_uid], others
    if len(groups) > 1:
        listing = "; ".join(
            f"{uid or chr(39) * 2} {str(g[0].attr('SeriesDescription', '') or '')!r} "
            f"({len(g)} images)" for uid, g in sorted(groups.items(), key=lambda kv: -len(kv[1])))
        raise DicomSeriesError(f"{where} holds {len(groups)} series; choose one with "
                               f"--series-uid UID: {listing}")
    uid, chosen = next(iter(groups.items()))
    return uid, chosen, []


def _same(instances: list[_Instance], label: str, what: str, value_of, tolerance=None) -> None:
    """Refuse the series if ``value_of(instance)`` is not the same for every instance."""
    reference = value_of(instances[0])
    for instance in instances[1:]:
        value = value_of(instance)
        if tolerance is None:
            equal = value == reference
        else:
            equal = (value is not None and reference is not None and len(value) == len(reference)
                     and np.allclose(value, reference, rtol=0, atol=tolerance))
        if not equal:
            raise DicomSeriesError(
                f"{label}: mixed {what}: {Path(instances[0].name).name} has {_show(reference)}, "
                f"{Path(instance.name).name} has {_show(value)}; a volume needs one {what}")


def _show(value) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ", ".join(f"{float(v):g}" if isinstance(v, (int, float, np.floating))
                               else str(v) for v in value) + "]"
    return str(value)


def _floats(instance: _Instance, keyword: str, count: int):
    value = instance.attr(keyword)
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return values if len(values) == count and all(np.isfinite(values)) else None


def _check_uniform(instances: list[_Instance], label: str) -> None:
    for keyword, count in (("ImageOrientationPatient", 6), ("ImagePositionPatient", 3),
                           ("PixelSpacing", 2)):
        lacking = [i.name for i in instances if _floats(i, keyword, count) is None]
        if lacking:
            raise DicomSeriesError(f"{label}: {len(lacking)} image(s) lack a valid {keyword} "
                                   f"({_names(lacking)}); their geometry is unknown")
    flat = [i.name for i in instances if min(_floats(i, "PixelSpacing", 2)) <= 0]
    if flat:
        raise DicomSeriesError(f"{label}: {len(flat)} image(s) have a PixelSpacing that is not "
                               f"positive ({_names(flat)}); their geometry is unknown")
    _same(instances, label, "image orientation",
          lambda i: _floats(i, "ImageOrientationPatient", 6), ORIENTATION_TOLERANCE)
    _same(instances, label, "pixel spacing", lambda i: _floats(i, "PixelSpacing", 2),
          SPACING_TOLERANCE_MM)
    _same(instances, label, "image size (rows x columns)",
          lambda i: (int(i.attr("Rows", 0)), int(i.attr("Columns", 0))))
    _same(instances, label, "pixel format (bits allocated, bits stored, pixel representation, "
          "samples per pixel)",
          lambda i: (int(i.attr("BitsAllocated", 0)), int(i.attr("BitsStored", 0) or 0),
                     int(i.attr("PixelRepresentation", 0)), int(i.attr("SamplesPerPixel", 1))))
    _same(instances, label, "frame of reference",
          lambda i: str(i.attr("FrameOfReferenceUID", "") or ""))
    first = instances[0]
    if int(first.attr("SamplesPerPixel", 1)) != 1 or not str(
            first.attr("PhotometricInterpretation", "MONOCHROME2")).startswith("MONOCHROME"):
        raise DicomSeriesError(f"{label}: not a greyscale image series (photometric "
                               f"interpretation {first.attr('PhotometricInterpretation')})")
    if int(first.attr("BitsAllocated", 0)) not in (8, 16, 32):
        raise DicomSeriesError(f"{label}: {first.attr('BitsAllocated')} bits allocated per "
                               "pixel is not supported (8, 16 or 32)")
    luts = [i.name for i in instances if "ModalityLUTSequence" in i.dataset]
    if luts:
        raise DicomSeriesError(f"{label}: a Modality LUT Sequence is not supported "
                               f"({_names(luts)}); only rescale slope/intercept")


def _orientation(instance: _Instance) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cosines = np.array(_floats(instance, "ImageOrientationPatient", 6))
    row, column = cosines[:3], cosines[3:]
    normal = np.cross(row, column)
    if not (abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(column) - 1) < 1e-3
            and abs(row @ column) < 1e-3):
        raise DicomSeriesError(f"{Path(instance.name).name}: ImageOrientationPatient "
                               f"{_show(cosines)} is not two orthogonal unit vectors")
    return row / np.linalg.norm(row), column / np.linalg.norm(column), normal / np.linalg.norm(normal)


def _place(instances: list[_Instance], label: str, allow_gaps: bool
           ) -> tuple[list[_Instance | None], np.ndarray, np.ndarray, np.ndarray]:
    """Sort along the normal and check the grid: slots (None = missing), origin, step, z."""
    _, _, normal = _orientation(instances[0])
    for instance in instances:
        instance.position = np.array(_floats(instance, "ImagePositionPatient", 3))
        instance.z = float(instance.position @ normal)
    instances.sort(key=lambda i: i.z)
    z = np.array([i.z for i in instances])
    if len(instances) < 2:
        raise DicomSeriesError(f"{label}: {len(instances)} image; a volume needs at least 2 "
                               "slices")
    steps = np.diff(z)
    duplicates = np.flatnonzero(steps < POSITION_TOLERANCE_MM)
    if duplicates.size:
        first = duplicates[0]
        raise DicomSeriesError(
            f"{label}: {duplicates.size} pair(s) of images share a position, e.g. "
            f"{Path(instances[first].name).name} and "
            f"{Path(instances[first + 1].name).name} at z = {z[first]:.3f} mm; remove the "
            "duplicates or choose one stack")
    # The nominal spacing is the median step: a gap or a foreign slice is the exception.
    spacing = float(np.median(steps))
    tolerance = max(POSITION_TOLERANCE_MM, POSITION_TOLERANCE_FRACTION * spacing)
    # Index of every slice on the grid of that spacing: whole numbers, else uneven.
    index = (z - z[0]) / spacing
    slots = np.rint(index).astype(np.int64)
    off = np.abs(index - slots) * spacing
    if (off > tolerance).any():
        bad = int(np.argmax(off > tolerance))
        raise DicomSeriesError(
            f"{label}: uneven slice spacing: {Path(instances[bad - 1].name).name} at z = "
            f"{z[bad - 1]:.3f} mm, {Path(instances[bad].name).name} at z = {z[bad]:.3f} mm "
            f"({steps[bad - 1]:.3f} mm apart where the spacing is {spacing:.3f} mm); dlad-stream "
            "never resamples: send regularly spaced slices")
    gaps = np.flatnonzero(np.diff(slots) > 1)
    if gaps.size and not allow_gaps:
        first = int(gaps[0])
        missing = int(slots[-1] + 1 - len(instances))
        raise DicomSeriesError(
            f"{label}: {missing} slice(s) missing in {gaps.size} gap(s), first between "
            f"{Path(instances[first].name).name} (z = {z[first]:.3f} mm) and "
            f"{Path(instances[first + 1].name).name} (z = {z[first + 1]:.3f} mm), "
            f"{steps[first]:.3f} mm apart where the spacing is {spacing:.3f} mm; supply the "
            "missing files, or give --allow-gaps to fill them at their own positions")
    placed: list[_Instance | None] = [None] * int(slots[-1] + 1)
    for instance, slot in zip(instances, slots):
        placed[int(slot)] = instance
    # The slice axis: the step between consecutive slots (a tilted gantry shears it away from
    # the normal) and the line's origin, both as medians so that one shifted slice cannot bend
    # them; then every slice must lie on that line: it keeps the position the scanner gave it.
    positions = np.array([i.position for i in instances])
    step = np.median(np.diff(positions, axis=0) / np.diff(slots)[:, None], axis=0)
    origin = np.median(positions - slots[:, None] * step, axis=0)
    errors = np.linalg.norm(origin + slots[:, None] * step - positions, axis=1)
    if (errors > tolerance).any():
        worst = int(np.argmax(errors))
        raise DicomSeriesError(
            f"{label}: {Path(instances[worst].name).name} lies {errors[worst]:.3f} mm off the "
            "line of the other slices (its position is shifted within the slice plane): a "
            "foreign or shifted slice?")
    grid_z = z[0] + np.arange(len(placed)) * spacing
    return placed, origin, step, grid_z


def _rescale(instances: list[_Instance]) -> list[tuple[float, float]]:
    return [(float(i.attr("RescaleSlope", 1.0)), float(i.attr("RescaleIntercept", 0.0)))
            for i in instances]


# --- building the volume ---------------------------------------------------------------------

def _build(instances: list[_Instance], where: str, series_uid: str | None, allow_gaps: bool,
           threads: int | None, skipped: list[str]) -> DicomSeries:
    uid, chosen, others = _choose_series(instances, where, series_uid)
    if others:
        log.info("%s: left out %d image(s) of other series", where, len(others))
    label = f"{where}: {_series_label(uid, chosen)}"
    chosen = _deduplicate(chosen, label)
    _check_uniform(chosen, label)
    placed, origin, step, grid_z = _place(chosen, label, allow_gaps)
    present = [i for i in placed if i is not None]
    rescales = _rescale(present)
    for slope, intercept in rescales:
        if not (np.isfinite(slope) and slope != 0 and np.isfinite(intercept)):
            raise DicomSeriesError(f"{label}: invalid rescale slope/intercept {slope}/{intercept}")
    first = present[0]
    rows, columns = int(first.attr("Rows")), int(first.attr("Columns"))
    bits = int(first.attr("BitsAllocated"))
    signed = int(first.attr("PixelRepresentation", 0)) == 1
    stored_dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    uniform = len(set(rescales)) == 1
    data = np.empty((len(placed), rows, columns), dtype=HU_DTYPE)
    _decode_all(placed, data, label, threads)
    inserted = [k for k, instance in enumerate(placed) if instance is None]
    if inserted:
        fill = int(min(data[k].min() for k, i in enumerate(placed) if i is not None))
        for k in inserted:
            data[k] = fill
        log.warning("%s: %d missing slice(s) filled with %d HU at their own positions "
                    "(slice indices %s of %d; z = %s mm); the other slices keep theirs",
                    label, len(inserted), fill, _show(inserted[:20]), len(placed),
                    ", ".join(f"{grid_z[k]:.2f}" for k in inserted[:20]))
    if uniform:
        slope, intercept = rescales[0]
        source_dtype = stored_dtype.name
    else:
        log.warning("%s: rescale slope/intercept differ between slices (%s); the volume is kept "
                    "as int16 HU (slope 1, intercept 0)", label,
                    ", ".join(f"{s:g}/{b:g}" for s, b in sorted(set(rescales))[:4]))
        slope, intercept, source_dtype = 1.0, 0.0, "int16"
    row, column, _ = _orientation(first)
    dy, dx = _floats(first, "PixelSpacing", 2)
    affine = affine_from_dicom(row, column, (dy, dx), origin, step)
    volume = Volume(data=data, affine=affine, spacing=(dx, dy, float(np.linalg.norm(step))),
                    source_dtype=source_dtype, rescale_slope=slope, rescale_intercept=intercept,
                    description=f"{Path(where).name} (DICOM)")
    volume.extra.update({"modality": str(first.attr("Modality", "") or ""),
                         "study_uid": str(first.attr("StudyInstanceUID", "") or ""),
                         "series_uid": uid})
    if inserted:
        volume.extra["inserted_slices"] = inserted
    metadata = _without_pixels(first.dataset)
    return DicomSeries(volume=volume, sources=[i.name if i is not None else "" for i in placed],
                       metadata=metadata, series_uid=uid, positions=grid_z,
                       inserted=inserted, skipped=skipped + others)


def _without_pixels(dataset):
    """A new Dataset with ``dataset``'s elements (and file meta) but no pixel data."""
    from pydicom.dataset import Dataset

    pixel_keywords = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
    metadata = Dataset()
    for element in dataset:
        if element.keyword not in pixel_keywords:
            metadata.add(element)
    if hasattr(dataset, "file_meta"):
        metadata.file_meta = dataset.file_meta
    return metadata


def _deduplicate(instances: list[_Instance], label: str) -> list[_Instance]:
    """Drop exact copies of an instance (same SOPInstanceUID, same pixel bytes), with a warning."""
    seen: dict[str, _Instance] = {}
    kept, copies = [], []
    for instance in instances:
        uid = str(instance.attr("SOPInstanceUID", "") or "")
        if uid and uid in seen:
            if _pixel_bytes(seen[uid]) == _pixel_bytes(instance):
                copies.append(instance.name)
                continue
            raise DicomSeriesError(f"{label}: {Path(seen[uid].name).name} and "
                                   f"{Path(instance.name).name} share SOPInstanceUID {uid} but "
                                   "differ in pixel data")
        if uid:
            seen[uid] = instance
        kept.append(instance)
    if copies:
        log.warning("%s: %d file(s) are copies of another instance and were used once: %s",
                    label, len(copies), _names(copies))
    return kept


def _pixel_bytes(instance: _Instance) -> bytes:
    try:
        return bytes(instance.dataset.PixelData)
    except Exception:  # unreadable now: they are not the same
        return instance.name.encode()


def _decode_all(placed: list, data: np.ndarray, label: str, threads: int | None) -> None:
    """Decode every placed image into ``data[k]`` as int16 HU (threads: the decoders release
    the GIL)."""
    from pydicom.pixels import pixel_array

    rows, columns = data.shape[1:]

    def decode(k: int) -> None:
        instance = placed[k]
        if instance is None:
            return
        dataset = instance.dataset
        try:
            stored = instance.stored if instance.stored is not None else \
                pixel_array(dataset, index=instance.frame)
        except Exception as error:  # decoder missing, corrupt or truncated pixel data
            syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
            name = getattr(syntax, "name", str(syntax)) if syntax else "unknown transfer syntax"
            message = str(error).strip().splitlines()[0] if str(error).strip() else \
                type(error).__name__
            raise DicomSeriesError(f"{label}: cannot decode the pixel data of "
                                   f"{Path(instance.name).name} ({name}): {message}") from None
        finally:
            # The decoded slice is all that is kept: drop the (possibly large) encoded bytes
            # of a file we read (a caller's in-memory dataset is left as it was).
            if instance.owned and "PixelData" in dataset:
                del dataset.PixelData
        if stored.shape != (rows, columns):
            raise DicomSeriesError(f"{label}: {Path(instance.name).name} decodes to "
                                   f"{stored.shape}, not {rows} x {columns}")
        slope = float(instance.attr("RescaleSlope", 1.0))
        intercept = float(instance.attr("RescaleIntercept", 0.0))
        what = f"{label}: {Path(instance.name).name}"
        if slope == 1.0 and intercept.is_integer():
            hu = stored.astype(np.int32) + int(intercept)
        else:
            hu = stored.astype(np.float64) * slope + intercept
        try:
            data[k] = to_hu_int16(hu, what)
        except VolumeError as error:
            raise DicomSeriesError(str(error)) from None

    for instance in placed:
        if instance is not None and instance.frame is not None:
            instance.dataset.PixelData  # noqa: B018 - read a deferred value once, not per thread
    count = threads or min(MAX_DECODE_THREADS, os.cpu_count() or 1)
    with progress(total=len(placed), desc="decoding", unit="slice", logger=log) as bar:
        if count <= 1:
            for k in range(len(placed)):
                decode(k)
                bar.update()
            return
        with ThreadPoolExecutor(max_workers=count, thread_name_prefix="dlad-dicom") as pool:
            for future in [pool.submit(decode, k) for k in range(len(placed))]:
                future.result()
                bar.update()


def affine_from_dicom(row_cosines, column_cosines, pixel_spacing, position, slice_step
                      ) -> np.ndarray:
    """RAS+ affine of voxel ``(i, j, k)`` from DICOM's LPS geometry.

    ``i`` runs along the row cosines with the column spacing ``dx = PixelSpacing[1]``, ``j``
    along the column cosines with the row spacing ``dy = PixelSpacing[0]``, ``k`` by
    ``slice_step`` (mm, LPS) from ``position`` (the first slice's ImagePositionPatient, LPS).
    RAS+ = diag(-1, -1, 1) @ LPS.

    >>> a = affine_from_dicom([1, 0, 0], [0, 1, 0], (0.8, 0.5), [-250.0, -120.0, -800.0],
    ...                       [0, 0, 2.5])
    >>> (a + 0.0).tolist()   # + 0.0: no negative zeros in the printout
    [[-0.5, 0.0, 0.0, 250.0], [0.0, -0.8, 0.0, 120.0], [0.0, 0.0, 2.5, -800.0], [0.0, 0.0, 0.0, 1.0]]

    A voxel goes to RAS+ through it: the first voxel of the first slice is the LPS position
    with x and y negated; voxel (2, 1, 1) is 2 columns, 1 row and 1 slice further:

    >>> (a @ [2, 1, 1, 1])[:3].tolist()   # i = 2, j = 1, k = 1
    [249.0, 119.2, -797.5]
    """
    dy, dx = (float(v) for v in pixel_spacing)
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(row_cosines, float) * dx
    lps[:3, 1] = np.asarray(column_cosines, float) * dy
    lps[:3, 2] = np.asarray(slice_step, float)
    lps[:3, 3] = np.asarray(position, float)
    return LPS_TO_RAS @ lps
