"""DICOM export (receiver/dicom_export.py) and PACS push (receiver/pacs.py).

* The shared abdomen CT streamed with its DICOM attributes: every written file reads back with
  pydicom, its geometry equals the stream's affine and the original DICOM files' (<= 1e-3 mm),
  its identifiers are the source's, its pixels the received volume's, and LossyImageCompression
  is "01" on the preview (with ratio and method) and "00" on the exact series; the ROI goes
  along as a DICOM Segmentation.
* A real Orthanc (Debian package ``orthanc``) that is *down* while the receiver pushes the
  preview, started later: the outbox delivers every instance of both versions, and Orthanc's
  copies (fetched over its REST API) hold the received voxels.
"""

from __future__ import annotations

import asyncio
import doctest
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="the [dicom] extra is not installed")
pytest.importorskip("highdicom", reason="the [dicom] extra is not installed")
pytest.importorskip("pynetdicom", reason="the [dicom] extra is not installed")

import receiver.dicom_export  # noqa: E402
import receiver.pacs  # noqa: E402
from receiver.dicom_export import (  # noqa: E402
    EXACT_VERSION,
    PREVIEW_VERSION,
    DicomExporter,
    SeriesSnapshot,
    affine_from_slices,
    read_manifest,
    received_bytes_per_slice,
    write_version,
)
from receiver.pacs import PacsPusher, parse_pacs  # noqa: E402
from receiver.service import ReceiverService, ServiceConfig  # noqa: E402
from receiver.slices import slice_states  # noqa: E402
from receiver.stream import StudyStream  # noqa: E402
from sender.transport import FileSource, stream_study  # noqa: E402
from shared.wire import FrameReader  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from orthanc import ORTHANC, Orthanc, free_port  # noqa: E402
from test_streaming import TOKEN, encode_phantom, quick, run  # noqa: E402

SOURCE_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName",
                   "StudyDescription", "SeriesDescription", "SeriesNumber", "StudyDate",
                   "StudyTime", "AccessionNumber", "Modality", "FrameOfReferenceUID",
                   "Manufacturer")


def test_doctests():
    for module in (receiver.dicom_export, receiver.pacs):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_pacs_address_is_checked():
    assert str(parse_pacs("PACS@[::1]:11112", "ME")) == "PACS@::1:11112"
    for bad in ("PACS@host", "@host:104", "PACS@:104", "A\\B@h:104", "X" * 17 + "@h:104",
                "P@h:0", "P@h:70000"):
        with pytest.raises(ValueError):
            parse_pacs(bad)


def source_attributes(folder: Path) -> tuple[dict, list]:
    """The header's ``dicom`` map as the sender fills it, and the source datasets by position."""
    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]
    first = datasets[0]
    attributes = {}
    for keyword in SOURCE_KEYWORDS:
        value = first.get(keyword)
        if value not in (None, ""):
            attributes[keyword] = int(value) if keyword == "SeriesNumber" else str(value)
    return attributes, datasets


def replay(path: Path, until=None) -> StudyStream:
    """The stream applied chunk by chunk, stopping when ``until(reassembler)`` holds."""
    stream = StudyStream()
    for event in FrameReader().feed(path.read_bytes()):
        stream.feed(event.chunk.to_frame())
        if until is not None and stream.reassembler is not None and until(stream.reassembler):
            break
    return stream


@pytest.fixture(scope="module")
def abdomen_stream(tmp_path_factory, abdomen_dicom, abdomen_liver):
    from sender.encoder import EncodeSettings
    from sender.pipeline import RoiChoice, build_encoder

    encoder = build_encoder(abdomen_dicom, RoiChoice(mask=abdomen_liver),
                            encode=EncodeSettings(exact=True))
    attributes, datasets = source_attributes(abdomen_dicom)
    if not encoder.header.dicom:
        encoder.header.dicom = attributes  # what the sender sends for a DICOM input
    path = tmp_path_factory.mktemp("dicom") / "abdomen.dlad"
    path.write_bytes(b"".join(encoder.frames()))
    return path, encoder.header, datasets


def test_export_of_the_abdomen_matches_the_source(abdomen_stream, abdomen_volume, tmp_path):
    path, header, source = abdomen_stream
    out = tmp_path / "dicom"
    log_path = tmp_path / "chunks.dlad"
    log_path.write_bytes(b"".join(event.chunk.to_frame() for event in
                                  FrameReader().feed(path.read_bytes())
                                  if hasattr(event.chunk, "seq")))
    written = {}
    for version, until in ((PREVIEW_VERSION, lambda r: r.roi_complete and r.base_complete),
                           (EXACT_VERSION, None)):
        stream = replay(path, until)
        r = stream.reassembler
        snapshot = SeriesSnapshot(header=header, stream_key="abdomen-key", folder="abdomen",
                                  hu=r.volume.copy(), states=slice_states(r),
                                  received_bytes=received_bytes_per_slice(log_path, header))
        written[version] = (write_version(snapshot, version, out), snapshot)
    original = abdomen_volume.data
    roi = header.roi
    normal = np.cross(*np.array(source[0].ImageOrientationPatient, float).reshape(2, 3))
    by_position = {round(float(np.dot(ds.ImagePositionPatient, normal)), 3): ds for ds in source}
    series_uids = set()
    for version, (result, snapshot) in written.items():
        assert read_manifest(result.folder)["version"] == version
        files = [f for f in result.files if f.name.startswith("CT")]
        datasets = [pydicom.dcmread(f) for f in files]
        assert len(datasets) == header.shape[0]
        # Geometry: the affine back from the files, and slice by slice against the source.
        back = affine_from_slices(datasets[0].ImageOrientationPatient, datasets[0].PixelSpacing,
                                  datasets[0].ImagePositionPatient,
                                  datasets[-1].ImagePositionPatient, len(datasets))
        corners = np.array([[i, j, k, 1] for i in (0, header.shape[2] - 1)
                            for j in (0, header.shape[1] - 1) for k in (0, header.shape[0] - 1)]).T
        assert np.abs((back - header.affine) @ corners).max() <= 1e-3
        hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                       for ds in datasets])
        np.testing.assert_array_equal(hu, snapshot.hu)
        assert datasets[0].pixel_array.dtype == np.uint16  # the source's stored dtype
        for ds in datasets:
            twin = by_position[round(float(np.dot(ds.ImagePositionPatient, normal)), 3)]
            assert np.abs(np.subtract(ds.ImagePositionPatient, twin.ImagePositionPatient)).max() \
                <= 1e-3
            assert np.abs(np.subtract(ds.ImageOrientationPatient,
                                      twin.ImageOrientationPatient)).max() <= 1e-6
            assert np.abs(np.subtract(ds.PixelSpacing, twin.PixelSpacing)).max() <= 1e-6
            for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDescription",
                            "FrameOfReferenceUID", "AccessionNumber", "StudyDate", "Manufacturer"):
                if str(twin.get(keyword, "")):  # the shared scan is anonymised: some are empty
                    assert str(ds.get(keyword, "")) == str(twin.get(keyword, "")), keyword
            assert ds.SeriesInstanceUID != twin.SeriesInstanceUID
            assert ds.SOPInstanceUID != twin.SOPInstanceUID
            assert ds.SeriesDescription.startswith(str(twin.get("SeriesDescription", ""))[:20])
        # Pixels: the liver bit-exact in both, the whole volume in the exact series.
        assert np.array_equal(hu[roi], original[roi])
        lossy = [ds.LossyImageCompression for ds in datasets]
        if version == EXACT_VERSION:
            np.testing.assert_array_equal(hu, original)
            assert lossy == ["00"] * len(datasets)
            assert not any("LossyImageCompressionRatio" in ds for ds in datasets)
        else:
            assert not np.array_equal(hu, original)
            assert lossy == ["01"] * len(datasets)
            ratios = [float(ds.LossyImageCompressionRatio) for ds in datasets]
            assert all(r > 1 for r in ratios)
            assert {ds.LossyImageCompressionMethod for ds in datasets} == {"ISO_23008_2"}
        series_uids.add(datasets[0].SeriesInstanceUID)
        # The ROI as a Segmentation of this series.
        seg = pydicom.dcmread(result.folder / "SEG.dcm")
        assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
        assert int(seg.NumberOfFrames) == int(roi.any(axis=(1, 2)).sum())
        assert seg.SegmentSequence[0].SegmentLabel.startswith("Liver")
    assert len(series_uids) == 2
    # Written again: the same files (UIDs are stable), nothing added.
    again = write_version(written[EXACT_VERSION][1], EXACT_VERSION, out)
    assert sorted(p.name for p in again.folder.iterdir()) == sorted(
        p.name for p in written[EXACT_VERSION][0].folder.iterdir())
    assert pydicom.dcmread(again.files[0]).SOPInstanceUID == \
        pydicom.dcmread(written[EXACT_VERSION][0].files[0]).SOPInstanceUID


def test_export_without_source_dicom_generates_stable_uids(tmp_path):
    path = tmp_path / "p.dlad"
    volume, header = encode_phantom(path, seed=9, exact=False)
    stream = replay(path)
    r = stream.reassembler
    snapshot = SeriesSnapshot(header=header, stream_key="k", folder="p", hu=r.volume.copy(),
                              states=slice_states(r))
    first = write_version(snapshot, PREVIEW_VERSION, tmp_path / "a")
    second = write_version(snapshot, PREVIEW_VERSION, tmp_path / "b")
    a, b = (pydicom.dcmread(w.files[0]) for w in (first, second))
    assert a.StudyInstanceUID == b.StudyInstanceUID and a.SOPInstanceUID == b.SOPInstanceUID
    assert a.StudyInstanceUID.startswith("2.25.") and a.PatientID == ""
    assert a.PixelRepresentation == 1 and a.LossyImageCompression == "01"
    # With the source's identifiers in the stream, they are used as they are.
    header.dicom = {"StudyInstanceUID": "1.2.3.4", "PatientID": "P-7", "PatientName": "Doe^J",
                    "SeriesDescription": "Abdomen arterial", "SeriesNumber": 4,
                    "AccessionNumber": "A12", "FrameOfReferenceUID": "1.2.3.5"}
    third = pydicom.dcmread(write_version(snapshot, PREVIEW_VERSION, tmp_path / "c").files[0])
    assert (third.StudyInstanceUID, third.PatientID, str(third.PatientName),
            third.AccessionNumber, third.FrameOfReferenceUID) == (
        "1.2.3.4", "P-7", "Doe^J", "A12", "1.2.3.5")
    assert third.SeriesDescription == "Abdomen arterial [dlad preview: liver lossless]"
    assert int(third.SeriesNumber) == 1004


@pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (Debian package "
                                            "'orthanc'; .ci/run installs it)")
def test_push_to_a_pacs_that_is_down_first_loses_nothing(tmp_path):
    path = tmp_path / "study.dlad"
    volume, header = encode_phantom(path, seed=12, exact=True)
    nz = header.shape[0]
    port = free_port()
    dicom_out = tmp_path / "dicom"
    pusher = PacsPusher(parse_pacs(f"ORTHANC@127.0.0.1:{port}", "DLADTEST"), dicom_out,
                        delays=(0.5, 1.0, 2.0))
    exporter = DicomExporter(dicom_out, pusher)

    async def scenario():
        service = ReceiverService(ServiceConfig(out_dir=tmp_path / "out", token=TOKEN,
                                                snapshot_interval=0.5))
        service.add_listener(exporter)
        await service.start("127.0.0.1", 0)
        try:
            # Paced so that the exact layer comes well after the liver is complete.
            result = await stream_study(FileSource(path), service.url, TOKEN,
                                        quick(max_rate=1.5e5))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                jobs = pusher.outbox.jobs()
                if len(jobs) == 2 and jobs[0].attempts > 1:
                    break
                await asyncio.sleep(0.2)
            jobs = pusher.outbox.jobs()
            failed = [(job.folder.name, job.attempts, job.last_error) for job in jobs]
            loop = asyncio.get_running_loop()
            orthanc = await loop.run_in_executor(None, Orthanc(port).__enter__)
            try:
                deadline = time.monotonic() + 60
                while pusher.outbox.jobs() and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                left = len(pusher.outbox.jobs())
                stored = await loop.run_in_executor(None, fetch_all, orthanc)
            finally:
                await loop.run_in_executor(None, orthanc.__exit__)
        finally:
            await service.stop()
        return result, failed, left, stored

    result, failed, left, stored = run(scenario(), timeout=240)
    assert result.complete and result.verified
    print("while the PACS was down:", failed)
    assert sorted(name for name, _, _ in failed) == [EXACT_VERSION, PREVIEW_VERSION]
    # Jobs go in order: the preview was tried (and failed), the exact series waits behind it.
    assert failed[0][0] == PREVIEW_VERSION and failed[0][1] >= 2 and "association" in failed[0][2]
    assert left == 0
    # Every instance of both versions is in the PACS: nz CT slices and one SEG each.
    by_series = {}
    for ds in stored:
        by_series.setdefault((ds.Modality, ds.SeriesDescription), []).append(ds)
    assert sorted(len(v) for v in by_series.values()) == [1, 1, nz, nz], list(by_series)
    roi = header.roi
    for (modality, description), datasets in by_series.items():
        if modality != "CT":
            continue
        datasets.sort(key=lambda ds: int(ds.InstanceNumber))
        hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                       for ds in datasets])
        np.testing.assert_array_equal(hu[roi], volume.data[roi])  # the liver bit-exact
        if description.endswith("[dlad exact]"):
            np.testing.assert_array_equal(hu, volume.data)         # the whole volume
            assert {ds.LossyImageCompression for ds in datasets} == {"00"}
        else:
            assert "preview" in description
            assert {ds.LossyImageCompression for ds in datasets} == {"01"}


def fetch_all(orthanc: Orthanc) -> list:
    """Every instance Orthanc holds, as pydicom datasets (its REST API, file by file)."""
    from io import BytesIO

    return [pydicom.dcmread(BytesIO(orthanc.get_bytes(f"/instances/{identifier}/file")))
            for identifier in orthanc.get("/instances")]
