"""DICOM export of a received series: a CT series (one file per slice) and a Segmentation of the ROI.

``dlad-receive --listen ... --dicom-out DIR`` writes, for each study stream, up to two
*versions* of the series, each a DICOM series of its own (docs/DICOM.md says why):

=============  ====================================================================================
``preview``    written once the liver is complete: every ROI voxel exact and every slice holding at
               least its preview. ``LossyImageCompression`` "01" (with ratio and method) on every
               slice that is not proven exact.
``exact``      written once the whole volume is proven bit-exact (SHA-256 of the voxels against the
               sender's): ``LossyImageCompression`` "00" on every slice.
=============  ====================================================================================

Layout: ``DIR/<study folder>/<version>/CT000001.dcm ...``, ``SEG.dcm`` (the ROI as a DICOM
Segmentation, highdicom) and ``series.json`` (the manifest, written last: the version is complete
when it exists). UIDs are derived from the stream key, the version and the slice, so a version
written again (a receiver restarted on its folders) replaces its files instead of adding copies.

Geometry. The stream's affine maps a voxel index ``(i, j, k)`` (column, row, slice) to RAS+ mm
(NIfTI); DICOM's patient coordinates are LPS+. The conversion flips the first two axes
(:func:`ras_to_lps`); then, for slice ``k``, ``ImagePositionPatient`` is the LPS position of voxel
``(0, 0, k)``, ``ImageOrientationPatient`` the unit LPS directions of increasing column ``i``
(along a row) and increasing row ``j`` (down a column), ``PixelSpacing`` ``[row spacing, column
spacing]`` = the lengths of the affine's ``j`` and ``i`` columns, ``SpacingBetweenSlices`` and
``SliceThickness`` the length of its ``k`` column. :func:`affine_from_slices` inverts this (the
tests compare both ways to 1e-3 mm).

Pixel values: the header's source dtype and rescale are kept (``stored = (HU - intercept) /
slope``, :meth:`shared.volume.Volume.stored_values`), so a DICOM source comes back with its own
stored values; a source whose stored dtype is not a 16-bit integer is written as signed 16-bit
HU (slope 1, intercept 0), which holds every voxel the stream carries.

pydicom and highdicom are an optional extra (``pip install ".[dicom]"``): :func:`require` says
so in one line when they are missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from receiver.slices import EXACT
from shared.atomic import atomic_path, write_json_atomic
from shared.geometry import LPS_TO_RAS
from shared.volume import Volume
from shared.wire import FrameReader, StreamHeader

log = logging.getLogger("dlad.receiver")

PREVIEW_VERSION, EXACT_VERSION = "preview", "exact"
VERSIONS = (PREVIEW_VERSION, EXACT_VERSION)
MANIFEST = "series.json"
SEG_FILE = "SEG.dcm"
#: Series descriptions are LO (64 characters); the suffix says what the version is.
DESCRIPTION_SUFFIX = {PREVIEW_VERSION: " [dlad preview: liver lossless]",
                      EXACT_VERSION: " [dlad exact]"}
#: Series numbers of the versions: the source's number plus these offsets (1 without a source
#: number), so that they sort after the source series in a PACS and are told apart at a glance.
SERIES_NUMBER_OFFSET = {PREVIEW_VERSION: 1000, EXACT_VERSION: 2000}
SEG_SERIES_NUMBER_OFFSET = 3000
#: DICOM's defined term for each lossy base codec (PS3.3 C.7.6.1.1.5.1): HEVC is ISO/IEC 23008-2.
LOSSY_METHOD = {"hevc": "ISO_23008_2"}
#: Attributes taken from the header's ``dicom`` map as they are (identifying, descriptive); the
#: geometry, pixel description, UIDs of series and instances are always computed here.
COPIED_ATTRIBUTES = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientAge", "PatientWeight", "PatientSize", "PatientIdentityRemoved",
    "DeidentificationMethod", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
    "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "SeriesDate", "SeriesTime",
    "AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime", "BodyPartExamined",
    "PatientPosition", "FrameOfReferenceUID", "PositionReferenceIndicator", "Manufacturer",
    "ManufacturerModelName", "InstitutionName", "StationName", "KVP", "ConvolutionKernel",
    "ContrastBolusAgent", "ProtocolName",
)
#: Window presets written with each slice (centre, width in HU): liver, abdomen (soft tissue).
WINDOWS = ((90.0, 150.0), (40.0, 400.0))
WINDOW_EXPLANATIONS = ("LIVER", "ABDOMEN")


class DicomExportError(RuntimeError):
    """The DICOM output cannot be written (missing extra, unwritable folder)."""


def require() -> None:
    """Raise :class:`DicomExportError` with the fix when pydicom or highdicom are missing."""
    missing = []
    for module in ("pydicom", "highdicom"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise DicomExportError(f"--dicom-out needs {' and '.join(missing)}: pip install "
                               "'dlad-stream[dicom]'")


# --- geometry --------------------------------------------------------------------------------

def ras_to_lps(affine: np.ndarray) -> np.ndarray:
    """The voxel-to-LPS affine of a voxel-to-RAS one (DICOM's patient axes: x to the patient's
    left, y to the back, z to the head; RAS has x to the right, y to the front).

    >>> ras = np.diag([0.7, 0.7, 5.0, 1.0]); ras[:3, 3] = [-180.0, -150.0, 40.0]
    >>> lps = ras_to_lps(ras)
    >>> lps[:3, 3].tolist(), lps[:3, 0].tolist(), lps[:3, 2].tolist()
    ([180.0, 150.0, 40.0], [-0.7, 0.0, 0.0], [0.0, 0.0, 5.0])
    >>> bool(np.allclose(lps_to_ras(lps), ras))
    True
    """
    return LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ras_to_lps` (the same flip: it is its own inverse)."""
    return LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)


@dataclass
class SliceGeometry:
    """The DICOM plane attributes of a volume given by its RAS+ affine and slice count."""

    orientation: list[float]
    """ImageOrientationPatient: row direction (increasing column) then column direction."""
    positions: np.ndarray
    """ImagePositionPatient of each slice, ``(nz, 3)`` LPS mm."""
    pixel_spacing: list[float]
    """PixelSpacing ``[between rows, between columns]`` mm."""
    slice_spacing: float
    """Distance between consecutive slice origins, mm."""

    @classmethod
    def from_affine(cls, affine: np.ndarray, nz: int) -> SliceGeometry:
        """Plane attributes of every slice.

        >>> ras = np.diag([-0.8, -0.8, 2.5, 1.0]); ras[:3, 3] = [200.0, 210.0, -90.0]
        >>> g = SliceGeometry.from_affine(ras, 3)
        >>> g.orientation, g.pixel_spacing, g.slice_spacing
        ([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0.8, 0.8], 2.5)
        >>> g.positions.tolist()
        [[-200.0, -210.0, -90.0], [-200.0, -210.0, -87.5], [-200.0, -210.0, -85.0]]
        """
        lps = ras_to_lps(affine)
        columns = lps[:3, :3]
        lengths = np.linalg.norm(columns, axis=0)
        row_direction, column_direction = columns[:, 0] / lengths[0], columns[:, 1] / lengths[1]
        k = np.arange(nz, dtype=np.float64)
        positions = lps[:3, 3][None, :] + k[:, None] * columns[:, 2][None, :]
        return cls(orientation=[_clean(v) for v in np.concatenate([row_direction,
                                                                    column_direction])],
                   positions=np.vectorize(_clean)(positions),
                   pixel_spacing=[_clean(lengths[1]), _clean(lengths[0])],
                   slice_spacing=_clean(lengths[2]))


def _clean(value: float) -> float:
    """Round float noise away (1e-12 mm) and turn -0.0 into 0.0, for tidy DS values."""
    value = round(float(value), 12)
    return value + 0.0


def affine_from_slices(orientation, pixel_spacing, first_position, last_position, nz: int
                       ) -> np.ndarray:
    """The RAS+ affine of a DICOM series from its first and last slices (inverse of
    :class:`SliceGeometry`).

    >>> ras = np.array([[0.6, 0.1, 0.0, -100.0], [-0.1, 0.6, 0.3, 20.0],
    ...                 [0.0, 0.0, 3.0, 55.0], [0.0, 0.0, 0.0, 1.0]])
    >>> g = SliceGeometry.from_affine(ras, 10)
    >>> back = affine_from_slices(g.orientation, g.pixel_spacing, g.positions[0],
    ...                           g.positions[-1], 10)
    >>> bool(np.allclose(back, ras, atol=1e-9))
    True
    """
    orientation = np.asarray(orientation, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in pixel_spacing)
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * column_spacing
    lps[:3, 1] = orientation[3:] * row_spacing
    first = np.asarray(first_position, dtype=np.float64)
    step = (np.asarray(last_position, dtype=np.float64) - first) / max(nz - 1, 1)
    if nz == 1:
        normal = np.cross(orientation[:3], orientation[3:])
        step = normal * 1.0
    lps[:3, 2] = step
    lps[:3, 3] = first
    return lps_to_ras(lps)


# --- what a version holds ----------------------------------------------------------------------

@dataclass
class SeriesSnapshot:
    """A copy of what a study holds at one moment, taken in the study's worker thread."""

    header: StreamHeader
    """The stream's header."""
    stream_key: str
    """The receiver's key of the stream (seeds the UIDs)."""
    folder: str
    """The study's folder name under the receiver's out-dir (relative, may hold a '/')."""
    hu: np.ndarray
    """HU voxels, int16 ``(nz, ny, nx)`` (a copy)."""
    states: np.ndarray
    """Per-slice state (:mod:`receiver.slices`)."""
    received_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Payload bytes of the lossy base and the ROI residual per slice (for the ratio)."""


def received_bytes_per_slice(log_path: Path, header: StreamHeader, layers=(0, 1)) -> np.ndarray:
    """Payload bytes per slice of the chunks of ``layers`` in a receiver's chunk log.

    A chunk's payload is shared evenly by the slices it covers.
    """
    per_slice = np.zeros(header.shape[0], dtype=np.float64)
    reader = FrameReader()
    with open(log_path, "rb") as handle:
        while data := handle.read(1 << 20):
            for event in reader.feed(data):
                chunk = event.chunk
                if chunk is None or getattr(chunk, "layer", None) not in layers:
                    continue
                per_slice[chunk.z0:chunk.z1] += len(chunk.payload) / (chunk.z1 - chunk.z0)
    return per_slice


def _uid(*parts: str) -> str:
    """A UID derived from ``parts``: stable across rewrites, unique by construction.

    PS3.5 B.2: ``2.25.`` and the decimal value of a UUID, here a name-based one (the first 16
    bytes of a SHA-256 of the parts, version bits set as for a UUID version 5).

    >>> _uid("stream-key", "exact", "ct", "0") == _uid("stream-key", "exact", "ct", "0")
    True
    >>> _uid("a").startswith("2.25."), len(_uid("a")) <= 64
    (True, True)
    """
    digest = hashlib.sha256("\x00".join(("dlad-stream", *parts)).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=5).int}"


def _version_of_software() -> str:
    try:
        return metadata.version("dlad-stream")
    except metadata.PackageNotFoundError:
        return "0"


@dataclass
class WrittenSeries:
    """What :func:`write_version` wrote."""

    folder: Path
    """The version's folder."""
    files: list[Path]
    """CT files in slice order, then the SEG file."""
    manifest: dict
    """The content of ``series.json``."""


def write_version(snapshot: SeriesSnapshot, version: str, out_dir: Path) -> WrittenSeries:
    """Write one version of the series (CT slices, SEG, manifest) under ``out_dir``.

    Every file is written under a temporary name and renamed; the manifest goes last.

    Raises:
        DicomExportError: pydicom/highdicom missing, or the folder cannot be written.
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    require()
    started = time.perf_counter()
    folder = Path(out_dir) / snapshot.folder / version
    try:
        datasets = build_ct_datasets(snapshot, version)
        files = []
        for dataset in datasets:
            path = folder / f"CT{int(dataset.InstanceNumber):06d}.dcm"
            _save(dataset, path)
            files.append(path)
        seg = build_segmentation(snapshot, version, datasets)
        if seg is not None:
            _save(seg, folder / SEG_FILE)
            files.append(folder / SEG_FILE)
    except OSError as error:
        raise DicomExportError(f"cannot write the DICOM series to {folder}: {error}") from None
    first = datasets[0]
    manifest = {
        "version": version, "stream_key": snapshot.stream_key,
        "study_id": snapshot.header.study_id,
        "study_instance_uid": str(first.StudyInstanceUID),
        "series_instance_uid": str(first.SeriesInstanceUID),
        "seg_series_instance_uid": str(seg.SeriesInstanceUID) if seg is not None else None,
        "states": snapshot.states.tolist(),
        "lossy_slices": int(sum(ds.LossyImageCompression == "01" for ds in datasets)),
        "files": [p.name for p in files],
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(folder / MANIFEST, manifest)
    log.info("study %s: DICOM %s series written to %s (%d slices + SEG, %.1f s)",
             snapshot.header.study_id, version, folder, len(datasets),
             time.perf_counter() - started)
    return WrittenSeries(folder=folder, files=files, manifest=manifest)


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a version folder, or None when the version is not (completely) there."""
    try:
        value = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _save(dataset, path: Path) -> None:
    with atomic_path(path, ".dcm") as temporary:
        dataset.save_as(temporary, enforce_file_format=True)


def _source_value(dicom: dict, keyword: str):
    value = dicom.get(keyword)
    return value if value not in (None, "", []) else None


def _pixel_encoding(header: StreamHeader) -> tuple[str, float, float]:
    """(stored dtype, slope, intercept) of the written pixels."""
    if header.source_dtype in ("int16", "uint16"):
        return header.source_dtype, float(header.rescale[0]), float(header.rescale[1])
    return "int16", 1.0, 0.0


def build_ct_datasets(snapshot: SeriesSnapshot, version: str) -> list:
    """One CT Image Storage dataset per slice, in slice order (not yet written)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

    header = snapshot.header
    nz, ny, nx = header.shape
    dicom = header.dicom or {}
    key = snapshot.stream_key
    geometry = SliceGeometry.from_affine(header.affine, nz)
    dtype, slope, intercept = _pixel_encoding(header)
    volume = Volume(data=snapshot.hu, affine=header.affine, spacing=header.spacing,
                    source_dtype=dtype, rescale_slope=slope, rescale_intercept=intercept)
    study_uid = _source_value(dicom, "StudyInstanceUID") or _uid(header.study_id, "study")
    frame_uid = _source_value(dicom, "FrameOfReferenceUID") or _uid(key, "frame-of-reference")
    series_uid = _uid(key, version, "series")
    source_number = _source_value(dicom, "SeriesNumber")
    series_number = (int(source_number) if isinstance(source_number, (int, float)) or (
        isinstance(source_number, str) and source_number.strip().isdigit()) else 1) \
        + SERIES_NUMBER_OFFSET[version]
    description = str(_source_value(dicom, "SeriesDescription") or "dlad-stream CT")
    suffix = DESCRIPTION_SUFFIX[version]
    description = description[:64 - len(suffix)] + suffix
    base_codec = str(header.layers.get(0, {}).get("codec", ""))
    method = LOSSY_METHOD.get(base_codec, "ISO_23008_2")
    normal = np.cross(geometry.orientation[:3], geometry.orientation[3:])
    created = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    lossy_note = ("outside the liver ROI the voxels are a lossy preview (anisotropic diffusion "
                  "+ HEVC); inside the ROI they equal the original")
    datasets = []
    for z in range(nz):
        ds = _new_dataset()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = _uid(key, version, "ct", str(z))
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        for keyword in COPIED_ATTRIBUTES:
            value = _source_value(dicom, keyword)
            if value is not None:
                _set(ds, keyword, value)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                        "ReferringPhysicianName", "KVP", "AcquisitionNumber",
                        "PositionReferenceIndicator"):
            if keyword not in ds:
                _set(ds, keyword, "")  # type 2: present, may be empty
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = z + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        if "ContentDate" not in ds:
            ds.ContentDate, ds.ContentTime = created
        ds.SoftwareVersions = f"dlad-stream {_version_of_software()}"
        ds.ImagePositionPatient = [_ds(v) for v in geometry.positions[z]]
        ds.ImageOrientationPatient = [_ds(v) for v in geometry.orientation]
        ds.PixelSpacing = [_ds(v) for v in geometry.pixel_spacing]
        ds.SliceThickness = _ds(geometry.slice_spacing)
        ds.SpacingBetweenSlices = _ds(geometry.slice_spacing)
        ds.SliceLocation = _ds(float(np.dot(geometry.positions[z], normal)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0 if dtype == "uint16" else 1
        ds.RescaleSlope = _ds(slope)
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleType = "HU"
        ds.WindowCenter = [_ds(c) for c, _ in WINDOWS]
        ds.WindowWidth = [_ds(w) for _, w in WINDOWS]
        ds.WindowCenterWidthExplanation = list(WINDOW_EXPLANATIONS)
        exact = int(snapshot.states[z]) == EXACT
        if exact:
            ds.LossyImageCompression = "00"
            ds.DerivationDescription = ("dlad-stream: received bit-exact (SHA-256 of the volume "
                                        "verified against the sender's)")
        else:
            ds.LossyImageCompression = "01"
            if len(snapshot.received_bytes) and snapshot.received_bytes[z] > 0:
                ratio = 2.0 * ny * nx / float(snapshot.received_bytes[z])
                ds.LossyImageCompressionRatio = _ds(round(ratio, 2))
            ds.LossyImageCompressionMethod = method
            ds.DerivationDescription = f"dlad-stream: {lossy_note}"
        ds.PixelData = np.ascontiguousarray(volume.stored_values(snapshot.hu[z])).astype(
            "<u2" if dtype == "uint16" else "<i2", copy=False).tobytes()
        datasets.append(ds)
    return datasets


def _new_dataset():
    from pydicom.dataset import Dataset

    return Dataset()


def _ds(value: float):
    """A DS value that fits the VR's 16 characters without losing more than it must."""
    from pydicom.valuerep import DSfloat

    return DSfloat(float(value), auto_format=True)


def _set(ds, keyword: str, value) -> None:
    """Set an attribute from the stream's map; a value its VR refuses is skipped, with a note."""
    try:
        setattr(ds, keyword, value)
    except (ValueError, TypeError, OverflowError) as error:
        log.warning("DICOM export: attribute %s from the stream skipped (%s)", keyword, error)


def build_segmentation(snapshot: SeriesSnapshot, version: str, datasets: list):
    """The ROI as a binary DICOM Segmentation referencing ``datasets`` (None if the ROI is empty
    or not known yet)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    header = snapshot.header
    if not header.roi_known:
        return None  # announced as pending, its frame not received: no ROI to describe yet
    mask = header.roi
    if not mask.any():
        return None
    roi = header.provenance.get("roi", {}) if isinstance(header.provenance, dict) else {}
    provider = str(roi.get("provider") or roi.get("name") or "dlad-stream ROI")[:64]
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Liver ROI (lossless)",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Liver,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=provider, version=_version_of_software(),
            family=codes.cid7162.ArtificialIntelligence),
    )
    source_number = int(datasets[0].SeriesNumber) - SERIES_NUMBER_OFFSET[version]
    key = snapshot.stream_key
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=np.ascontiguousarray(mask, dtype=np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=_uid(key, version, "seg-series"),
        series_number=source_number + SEG_SERIES_NUMBER_OFFSET,
        sop_instance_uid=_uid(key, version, "seg"),
        instance_number=1,
        manufacturer="dlad-stream",
        manufacturer_model_name="dlad-receive",
        software_versions=_version_of_software(),
        device_serial_number="0",
        series_description=(f"Lossless ROI of {datasets[0].SeriesDescription}")[:64],
        content_description="voxels bit-exact in the preview",
        content_label="LOSSLESS_ROI",
        omit_empty_frames=True,
    )
    del mask
    return seg



class DicomExporter:
    """Writes the DICOM versions of every study as they become due, and queues them for the PACS.

    A receiver service extension (:meth:`receiver.service.ReceiverService.add_listener`). Due:
    ``preview`` when the liver is complete (ROI exact and every slice has its base) and the
    whole volume is not proven exact yet; ``exact`` when it is (:func:`receiver.slices.volume_verified`).
    A version whose manifest is already on disk for this stream is not written again; one that
    failed is tried again at the next update after :data:`RETRY_AFTER_S`.
    """

    RETRY_AFTER_S = 60.0

    def __init__(self, out_dir: Path, pacs=None):
        require()
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.pacs = pacs
        self.service = None
        self._executor = None
        self._done: set[tuple[str, str]] = set()
        self._failed: dict[tuple[str, str], float] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task] = {}

    def attach(self, service) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.service = service
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlad-dicom")
        if self.pacs is not None:
            self.pacs.start()

    def study_updated(self, runtime, update) -> None:
        from receiver.slices import volume_verified

        if getattr(update, "unloaded", False):
            return  # leaving memory: nothing new to write (it was written when it was due)
        r = runtime.record.reassembler
        exact = volume_verified(r)
        due = [EXACT_VERSION] if exact else (
            [PREVIEW_VERSION] if r.roi_complete and r.base_complete else [])
        folder = self._relative(runtime.record.folder)
        for version in due:
            key = (folder, version)
            if key in self._done or key in self._tasks:
                continue
            if time.monotonic() - self._failed.get(key, -1e9) < self.RETRY_AFTER_S:
                continue
            manifest = read_manifest(self.out_dir / folder / version)
            if manifest and manifest.get("stream_key") == runtime.record.key:
                self._done.add(key)
                continue
            # The copy is queued on the study's worker now (a study with queued work is never
            # unloaded), then written in the export's own thread.
            captured = runtime.call(lambda: self._capture(runtime, folder))
            task = asyncio.get_running_loop().create_task(
                self._export(runtime, captured, folder, version))
            self._tasks[key] = task

    def _relative(self, folder: Path) -> str:
        try:
            return str(folder.relative_to(self.service.store.out_dir))
        except ValueError:
            return folder.name

    async def _export(self, runtime, captured, folder: str, version: str) -> None:
        key = (folder, version)
        loop = asyncio.get_running_loop()
        try:
            snapshot = await captured
            written = await loop.run_in_executor(self._executor, write_version, snapshot,
                                                 version, self.out_dir)
            self._done.add(key)
            if self.pacs is not None:
                self.pacs.queue(written.folder, written.files)
        except Exception as error:  # the reception goes on; the export is tried again later
            self._failed[key] = time.monotonic()
            log.error("study %s: DICOM %s export failed: %s", runtime.name, version, error,
                      exc_info=not isinstance(error, DicomExportError))
        finally:
            self._tasks.pop(key, None)

    @staticmethod
    def _capture(runtime, folder: str) -> SeriesSnapshot:
        """Runs in the study's worker thread: nothing changes the volume meanwhile."""
        from receiver.slices import slice_states
        from receiver.store import LOG_FILE

        record = runtime.record
        r = record.reassembler
        return SeriesSnapshot(header=record.header, stream_key=record.key, folder=folder,
                              hu=r.volume.copy(), states=slice_states(r),
                              received_bytes=received_bytes_per_slice(record.folder / LOG_FILE,
                                                                      record.header))

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=120)
        if self.pacs is not None:
            await self.pacs.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
