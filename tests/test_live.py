"""Live sessions: a scanner pushing series to ``dlad-send --dicom-listen``, a watched folder.

Real parts on loopback: dcmtk's ``storescu``/``echoscu`` (pynetdicom's SCU where dcmtk is not
installed) push synthetic CT series in JPEG 2000, JPEG-LS and RLE to the sender's DICOM node;
the receiver runs in this process (and, in the last test, both peers as separate processes with
the shared abdomen series and the U-Net). Checked: every instance pushed is in the received
series, bit-exact with ``--exact``; the series of a study land side by side over one warm
connection; a series pushed twice is not sent twice; refusals answer with a status; a watched
folder never takes a file half-written; the spool survives a restart; ``--deidentify``.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from live_series import expected_hu, fill_uids, write_series

from models.phantoms import make_phantom
from receiver.service import ReceiverService, ServiceConfig
from receiver.store import HEADER_FILE, STATUS_FILE
from sender.encoder import EncodeSettings
from sender.live import LiveSender
from sender.pipeline import RoiChoice, SeriesPipeline
from sender.spool import Spool
from sender.transport import StreamOptions
from shared.nifti import read_nifti
from shared.receiver_process import ReceiverProcess
from shared.wire import FrameReader, RoiFrame
from tests.dcmtk import dcmtk_tool

TOKEN = "dlad-test-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]
J2K, JLS, RLE = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.5"
#: storescu's option proposing each transfer syntax (and the uncompressed ones).
STORESCU_PROPOSE = {J2K: "-xv", JLS: "-xt", RLE: "-xr"}
STORESCU = dcmtk_tool("storescu")
HAS_STORESCU = STORESCU is not None


def run(coroutine, timeout: float = 240.0):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


@pytest.fixture(scope="module")
def phantoms():
    shape, spacing = (10, 64, 80), (5.0, 5.2, 2.5)
    return [make_phantom(shape, spacing=spacing, seed=seed)[0] for seed in (11, 12)]


def quick() -> StreamOptions:
    return StreamOptions(quiet=True, backoff=0.2, stall_timeout=60.0, keepalive_interval=0.5)


def pipeline(spool: Spool, deidentifier=None) -> SeriesPipeline:
    # The body ROI: fast, and the U-Net is exercised by the process test on the real CT.
    return SeriesPipeline(RoiChoice(spec="body"),
                          encode=EncodeSettings(exact=True, group_slices=2, preset="fast"),
                          spool=spool, deidentifier=deidentifier)


class Receiver:
    def __init__(self, out_dir: Path):
        self.config = ServiceConfig(out_dir=out_dir, token=TOKEN, snapshot_interval=0.2)

    async def __aenter__(self) -> ReceiverService:
        self.service = ReceiverService(self.config)
        await self.service.start("127.0.0.1", 0)
        return self.service

    async def __aexit__(self, *exc) -> None:
        await self.service.stop()


async def push(port: int, files: list[Path], syntax: str = J2K) -> tuple[int, str]:
    """Push ``files`` with storescu (pynetdicom's SCU without dcmtk); (exit status, output)."""
    if HAS_STORESCU:
        process = await asyncio.create_subprocess_exec(
            STORESCU, STORESCU_PROPOSE[syntax], "-aec", "DLAD", "127.0.0.1", str(port),
            *map(str, files), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode, output.decode(errors="replace")
    statuses = await asyncio.to_thread(scu_store, port, files)
    return (0 if all(s == 0 for s in statuses) else 1), repr(statuses)


def scu_store(port: int, files: list[Path], sop_class: str | None = None,
              syntaxes: list[str] | None = None) -> list[int]:
    """pynetdicom C-STORE of ``files``: the status of each."""
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(path) for path in files]
    ae = AE(ae_title="TESTSCU")
    for ds in datasets:
        ae.add_requested_context(sop_class or ds.SOPClassUID,
                                 syntaxes or [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="DLAD")
    if not assoc.is_established:
        return [-1] * len(files)
    try:
        statuses = []
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else -1)
        return statuses
    finally:
        assoc.release()


def series_folders(out: Path) -> dict[str, Path]:
    """Received series folders by SeriesInstanceUID (from their headers)."""
    found = {}
    for header_file in sorted(out.glob(f"*/*/{HEADER_FILE}")):
        header = FrameReader().feed(header_file.read_bytes())[0].chunk
        found[header.dicom["SeriesInstanceUID"]] = header_file.parent
    return found


def check_received(folder: Path, volume, instances: int) -> dict:
    """The folder holds the series complete and bit-exact; returns its header's dicom map."""
    status = json.loads((folder / STATUS_FILE).read_text())
    assert status["state"] == "complete" and status["verified_sha256"] is True, status
    assert status["duplicates"] == 0
    snapshot = read_nifti(folder / status["snapshot"]["file"])
    assert snapshot.shape[0] == instances
    np.testing.assert_array_equal(snapshot.data, expected_hu(volume))
    np.testing.assert_allclose(snapshot.affine, volume.affine, atol=1e-4)
    header = FrameReader().feed((folder / HEADER_FILE).read_bytes())[0].chunk
    return header.dicom


# --- the DICOM node ------------------------------------------------------------------------------

def test_scanner_pushes_two_series_over_one_warm_connection(phantoms, tmp_path):
    first, second = phantoms
    study, series_a, files_a = write_series(tmp_path / "a", first, transfer_syntax=J2K,
                                            series_number=2)
    _, series_b, files_b = write_series(tmp_path / "b", second, study_uid=study,
                                        transfer_syntax=JLS, series_number=3,
                                        description="control scan")
    reports = []

    async def scenario():
        spool = Spool(tmp_path / "spool")
        async with Receiver(tmp_path / "out") as service:
            live = LiveSender(pipeline(spool), spool, service.url, TOKEN, quick(),
                              listen=("127.0.0.1", 0), series_timeout=0.5,
                              on_report=reports.append)
            await live.start()
            try:
                port = live.node.address[1]
                results = [await push(port, files_a, J2K)]
                assert await live.wait_idle(90)
                await asyncio.sleep(1.5)  # idle: keepalives hold the connection
                results.append(await push(port, files_b, JLS))
                assert await live.wait_idle(90)
                results.append(await push(port, files_a, J2K))  # the same series again
                assert await live.wait_idle(90)
                connections = live.link.connections
            finally:
                await live.stop()
            listing = service.store.list()
        return results, connections, listing

    results, connections, listing = run(scenario())
    assert all(code == 0 for code, _ in results), results
    assert [r.outcome for r in reports] == ["delivered", "delivered", "already delivered"]
    assert [r.instances for r in reports] == [10, 10, 10]
    assert connections == 1  # both series on one connection, kept open between them
    folders = series_folders(tmp_path / "out")
    assert set(folders) == {series_a, series_b}
    assert folders[series_a].parent == folders[series_b].parent  # the same study folder
    assert folders[series_a].parent.name == study
    dicom_a = check_received(folders[series_a], first, 10)
    dicom_b = check_received(folders[series_b], second, 10)
    assert dicom_a["StudyInstanceUID"] == dicom_b["StudyInstanceUID"] == study
    assert (dicom_a["SeriesNumber"], dicom_b["SeriesDescription"]) == (2, "control scan")
    assert dicom_a["PatientID"] == "PAT-0042" and dicom_a["Modality"] == "CT"
    assert dicom_a["PixelSpacing"] == [5.2, 5.0] and dicom_a["SpacingBetweenSlices"] == 2.5
    assert len(listing) == 2 and {entry["dicom"]["SeriesInstanceUID"] for entry in listing} == {
        series_a, series_b}


def test_refusals_echo_and_transfer_syntaxes(phantoms, tmp_path):
    import pydicom
    from pynetdicom import AE

    volume = phantoms[0]
    _, _, files = write_series(tmp_path / "rle", volume, transfer_syntax=RLE)
    # An MR image, a CT-class image whose modality says MR, a truncated image.
    _, _, (mr,) = write_series(tmp_path / "mr", make_phantom((1, 32, 32), (8.0, 8.0, 2.5), seed=3)[0])
    ds = pydicom.dcmread(mr)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.Modality = "MR"
    ds.save_as(mr)
    _, _, (not_ct,) = write_series(tmp_path / "notct", make_phantom((1, 32, 32), (8.0, 8.0, 2.5), seed=4)[0])
    ds = pydicom.dcmread(not_ct)
    ds.Modality = "MR"
    ds.save_as(not_ct)
    _, _, (cut,) = write_series(tmp_path / "cut", make_phantom((1, 32, 32), (8.0, 8.0, 2.5), seed=5)[0])
    ds = pydicom.dcmread(cut)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(cut)

    async def scenario():
        spool = Spool(tmp_path / "spool")
        async with Receiver(tmp_path / "out"):
            live = LiveSender(pipeline(spool), spool, "http://127.0.0.1:9", TOKEN, quick(),
                              listen=("127.0.0.1", 0), series_timeout=60)
            await live.start()
            try:
                port = live.node.address[1]
                ae = AE(ae_title="TESTSCU")
                ae.add_requested_context("1.2.840.10008.1.1")
                assoc = await asyncio.to_thread(ae.associate, "127.0.0.1", port, ae_title="DLAD")
                echo = assoc.send_c_echo()
                assoc.release()
                mr_status = await asyncio.to_thread(scu_store, port, [mr])
                other = await asyncio.to_thread(scu_store, port, [not_ct, cut])
                rle = await asyncio.to_thread(scu_store, port, files)
                open_series = live.collector.open_series()
                stored = live.node.statistics.stored
            finally:
                await live.stop()
        return echo, mr_status, other, rle, open_series, stored

    echo, mr_status, other, rle, open_series, stored = run(scenario())
    assert echo.Status == 0
    assert mr_status == [-1]  # no presentation context for MR: nothing sent
    assert other == [0xA900, 0xC000]  # not CT; pixel data that does not decode
    assert rle == [0] * 10 and open_series == 1 and stored == 10
    # The spool keeps the RLE instances exactly as received.
    spooled = sorted((tmp_path / "spool").glob("series/*/*/*.dcm"))
    assert len(spooled) == 10
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in spooled} == {RLE}


def test_spool_is_sent_after_a_restart_and_deidentify(phantoms, tmp_path):
    from sender.dicom_attributes import Deidentifier

    volume = phantoms[1]
    study, series, files = write_series(tmp_path / "s", volume, transfer_syntax=J2K)
    spool_dir = tmp_path / "spool"

    async def first_run():
        # The receiver is down: instances are acknowledged, kept, and wait.
        spool = Spool(spool_dir)
        live = LiveSender(pipeline(spool), spool, "http://127.0.0.1:9", TOKEN,
                          StreamOptions(quiet=True, retries=0, backoff=0.1, connect_timeout=2),
                          listen=("127.0.0.1", 0), series_count=10)
        await live.start()
        try:
            code, output = await push(live.node.address[1], files, J2K)
            await asyncio.sleep(0.5)
        finally:
            await live.stop()
        return code, output

    async def second_run():
        spool = Spool(spool_dir)
        key = Deidentifier.from_key_file(spool.key_file(), create=True)
        async with Receiver(tmp_path / "out") as service:
            live = LiveSender(pipeline(spool, key), spool, service.url, TOKEN, quick(),
                              watch=tmp_path / "empty", series_timeout=0.5)
            await live.start()
            try:
                assert await live.wait_idle(90)
                reports = list(live.session.reports)
            finally:
                await live.stop()
        return reports, key

    code, output = run(first_run())
    assert code == 0, output
    assert len(Spool(spool_dir).pending()) == 1
    reports, key = run(second_run())
    assert [r.outcome for r in reports] == ["delivered"]
    assert Spool(spool_dir).pending() == []
    folders = series_folders(tmp_path / "out")
    assert list(folders) == [key.uid(series)]
    dicom = check_received(folders[key.uid(series)], volume, 10)
    assert dicom["StudyInstanceUID"] == key.uid(study) != study
    assert dicom["PatientID"].startswith("DLAD-") and dicom["PatientName"].startswith("ANON^")
    assert "PatientBirthDate" not in dicom and "InstitutionName" not in dicom
    assert dicom["AccessionNumber"] != "ACC123" and dicom["SeriesNumber"] == 1
    text = (folders[key.uid(series)] / HEADER_FILE).read_bytes()
    for secret in (b"DOE^JANE", b"PAT-0042", b"ACC123", study.encode(), b"General Hospital"):
        assert secret not in text


# --- the watch folder ----------------------------------------------------------------------------

def test_watch_folder_takes_files_once_finished(phantoms, tmp_path):
    volume = phantoms[0]
    _, series, files = write_series(tmp_path / "made", volume, transfer_syntax=J2K)
    watched = tmp_path / "export"
    watched.mkdir()

    async def scenario():
        spool = Spool(tmp_path / "spool")
        async with Receiver(tmp_path / "out") as service:
            live = LiveSender(pipeline(spool), spool, service.url, TOKEN, quick(),
                              watch=watched, settle=1.0, series_timeout=1.5)
            await live.start()
            try:
                (watched / "notes.txt").write_text("not DICOM")
                # One file written slowly, in two halves with a pause: never taken half-done.
                slow = files[0].read_bytes()
                target = watched / "sub" / files[0].name
                target.parent.mkdir()
                with open(target, "wb") as out:
                    out.write(slow[: len(slow) // 2])
                    out.flush()
                    await asyncio.sleep(0.6)
                    out.write(slow[len(slow) // 2:])
                for path in files[1:]:
                    await asyncio.to_thread(shutil.copy, path, watched / path.name)
                assert await live.wait_reports(1, 90)
                watcher = live.watcher
                return list(live.session.reports), watcher.taken, watcher.refused
            finally:
                await live.stop()

    reports, taken, refused = run(scenario())
    assert [r.outcome for r in reports] == ["delivered"] and reports[0].instances == 10
    assert taken == 10 and refused == 1  # notes.txt, reported once
    check_received(series_folders(tmp_path / "out")[series], volume, 10)


# --- separate processes, the real CT -------------------------------------------------------------

@pytest.mark.slow
def test_dicom_listen_process_with_the_real_ct(tmp_path, abdomen_dicom, abdomen_volume):
    """``dlad-receive --listen`` and ``dlad-send --dicom-listen`` as processes; the shared
    abdomen series (JPEG 2000, U-Net ROI) pushed by storescu, then a control scan (the same
    images under new UIDs) into the same session."""
    token = tmp_path / "token.txt"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    study, first = fill_uids(abdomen_dicom, tmp_path / "planning")
    _, second = fill_uids(abdomen_dicom, tmp_path / "control", study_uid=study)
    receiver = ReceiverProcess.start(tmp_path / "out", token, tmp_path / "receiver.log", cwd=ROOT)
    sender_log = open(tmp_path / "sender.log", "w")
    sender = None
    try:
        url = receiver.url
        sender = subprocess.Popen(
            [sys.executable, "-m", "sender.cli", "--dicom-listen", "127.0.0.1:0", "--to", url,
             "--token-file", str(token), "--spool", str(tmp_path / "spool"), "--exact",
             "--series-timeout", "1", "--session-log", str(tmp_path / "session.jsonl")],
            cwd=ROOT, stdout=sender_log, stderr=subprocess.STDOUT)
        port = int(wait_for(tmp_path / "sender.log", r"listening on 127\.0\.0\.1:(\d+)", sender,
                            timeout=120))
        for folder in (tmp_path / "planning", tmp_path / "control"):
            code, output = asyncio.run(push(port, sorted(folder.iterdir()), J2K))
            assert code == 0, output
            wait_lines(tmp_path / "session.jsonl", 1 if folder.name == "planning" else 2, sender)
    finally:
        stop_sender(sender)
        receiver.stop()
        sender_log.close()
    lines = [json.loads(line) for line in (tmp_path / "session.jsonl").read_text().splitlines()]
    assert [line["outcome"] for line in lines] == ["delivered", "delivered"], lines
    folders = series_folders(tmp_path / "out")
    assert set(folders) == {first, second}
    for uid in (first, second):
        status = json.loads((folders[uid] / STATUS_FILE).read_text())
        assert status["state"] == "complete" and status["verified_sha256"] is True
        # The live default starts the stream before the ROI: header with the ROI pending,
        # previews, then the ROI frame with the U-Net's provenance and plausibility decision.
        header = FrameReader().feed((folders[uid] / HEADER_FILE).read_bytes())[0].chunk
        assert header.roi_pending and "roi_known" in status["times"]
        roi = [e.chunk for e in FrameReader().feed((folders[uid] / "chunks.dlad").read_bytes())
               if isinstance(e.chunk, RoiFrame)]
        assert len(roi) == 1 and roi[0].provenance["roi"]["provider"] == "unet"
        assert roi[0].provenance["roi"]["check"]["plausible"] is True
        snapshot = read_nifti(folders[uid] / status["snapshot"]["file"])
        np.testing.assert_array_equal(snapshot.data, abdomen_volume.data)
        np.testing.assert_allclose(snapshot.affine, abdomen_volume.affine, atol=1e-4)
    log = (tmp_path / "sender.log").read_text()
    assert "live pipeline ready (unet ROI)" in log


def wait_for(log: Path, pattern: str, process, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text())
        if found:
            return found.group(1)
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in {log}: {log.read_text()[-3000:]}")


def stop_sender(sender: subprocess.Popen | None) -> None:
    """Stop a live ``dlad-send`` as an operator would (Ctrl-C), killed if it hangs."""
    if sender is not None and sender.poll() is None:
        sender.send_signal(signal.SIGINT)
        try:
            sender.wait(30)
        except subprocess.TimeoutExpired:
            sender.kill()


def wait_lines(path: Path, count: int, process, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        assert process.poll() is None
        time.sleep(0.2)
    raise AssertionError(f"{path}: fewer than {count} series reported in {timeout} s")


def test_connection_lost_between_series_is_reopened(phantoms, tmp_path):
    """The receiver restarts while the sender waits for the next series: the warm link notices
    (keepalives), connects again, and the next series goes through."""
    import socket

    first, second = phantoms
    study, series_a, files_a = write_series(tmp_path / "a", first, transfer_syntax=J2K)
    _, series_b, files_b = write_series(tmp_path / "b", second, study_uid=study,
                                        transfer_syntax=J2K, series_number=2)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def scenario():
        spool = Spool(tmp_path / "spool")
        config = ServiceConfig(out_dir=tmp_path / "out", token=TOKEN, snapshot_interval=0.2)
        service = ReceiverService(config)
        await service.start("127.0.0.1", port)
        options = StreamOptions(quiet=True, backoff=0.2, stall_timeout=3.0,
                                keepalive_interval=0.3)
        live = LiveSender(pipeline(spool), spool, service.url, TOKEN, options,
                          listen=("127.0.0.1", 0), series_timeout=0.5)
        await live.start()
        try:
            node = live.node.address[1]
            assert (await push(node, files_a, J2K))[0] == 0
            assert await live.wait_reports(1, 90)
            await service.stop()  # the receiver goes away while the sender is idle
            await asyncio.sleep(1.0)
            service = ReceiverService(config)
            await service.start("127.0.0.1", port)
            deadline = time.monotonic() + 30
            while live.link.connections < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)  # the link reconnects by itself, before any series
            reconnected = live.link.connections
            assert (await push(node, files_b, J2K))[0] == 0
            assert await live.wait_reports(2, 90)
            return [r.outcome for r in live.session.reports], reconnected
        finally:
            await live.stop()
            await service.stop()

    outcomes, reconnected = run(scenario())
    assert outcomes == ["delivered", "delivered"] and reconnected >= 2
    folders = series_folders(tmp_path / "out")
    check_received(folders[series_a], first, 10)
    check_received(folders[series_b], second, 10)


def test_a_dicom_folder_input_carries_its_attributes(phantoms, tmp_path):
    """``dlad-send FOLDER``: the header's dicom map (the viewer's DICOM export reads it), and
    with --deidentify the pseudonyms a live session would give the same series."""
    from sender.dicom_attributes import Deidentifier
    from sender.pipeline import build_encoder
    from shared.wire import StreamHeader, parse_frame

    folder = tmp_path / "DOE_JANE_CT"
    study, series, _ = write_series(folder, phantoms[0], transfer_syntax=JLS, series_number=4)
    plain = build_encoder(folder, RoiChoice(spec="body")).header
    key = Deidentifier(b"site-secret-0123456789")
    hidden = build_encoder(folder, RoiChoice(spec="body"), deidentifier=key).header
    assert plain.dicom["StudyInstanceUID"] == study and plain.dicom["SeriesNumber"] == 4
    assert plain.dicom["PatientName"] == "DOE^JANE" and plain.dicom["Modality"] == "CT"
    assert hidden.dicom["SeriesInstanceUID"] == key.uid(series)
    assert hidden.dicom["PatientID"] != "PAT-0042" and "PatientBirthDate" not in hidden.dicom
    assert "DOE" in plain.provenance["input"] and "DOE" not in hidden.provenance["input"]
    assert "DOE" not in hidden.study_id
    again = parse_frame(hidden.to_frame())
    assert isinstance(again, StreamHeader) and again.dicom == hidden.dicom


def test_arrival_workers_one_per_core_on_cpu_one_on_cuda():
    from sender.pipeline import arrival_workers

    assert [arrival_workers("cpu", n) for n in (0, 1, 2, 16)] == [1, 1, 2, 16]
    assert arrival_workers("cuda", 16) == arrival_workers("cuda:1", 2) == 1


@pytest.mark.parametrize("uncertain, wait", [(None, True), (0.0, True), (None, False)],
                         ids=["default margins", "no uncertainty", "complete at once"])
def test_slices_done_as_they_arrive_give_the_whole_series_roi(phantoms, tmp_path, uncertain,
                                                              wait):
    """The U-Net (the bundled ensemble), the anatomy the plausibility check measures and,
    without an uncertainty margin, the in-plane dilation run on each slice as it arrives; the
    series' ROI and steering map are then exactly those of the whole-volume path, also when
    the series completes while the worker still holds slices of it (``wait`` False: the rest
    is computed beside the worker's batch in hand)."""
    import pydicom

    from sender.pipeline import prepare_study
    from sender.roi.steering import SteeringSettings
    from sender.roi.unet import UNetProvider
    from sender.series import Arrival, CompleteSeries

    steering = SteeringSettings(uncertain_threshold=uncertain)
    volume = phantoms[1]
    study, series_uid, files = write_series(tmp_path / "s", volume, transfer_syntax=J2K)
    spool = Spool(tmp_path / "spool")
    live = SeriesPipeline(RoiChoice(), steering=steering,
                          encode=EncodeSettings(group_slices=2, preset="fast"), spool=spool)
    try:
        arrivals = []
        for path in reversed(files):  # in any order
            dataset = pydicom.dcmread(path)
            dataset.pixel_array  # noqa: B018 - decoded on arrival, as the node does
            arrival = Arrival(study, series_uid, str(dataset.SOPInstanceUID), path, dataset)
            arrivals.append(arrival)
            live.observe(arrival)
        deadline = time.monotonic() + 60
        while wait and time.monotonic() < deadline and len(
                live.slices._done.get(series_uid, {})) < len(files):
            time.sleep(0.05)
        encoder, dicom_series, timings = live(CompleteSeries(study, series_uid, arrivals,
                                                             "count"))
    finally:
        live.close()
    if wait:
        assert timings["unet_slices_ready"] == len(files)
        assert timings["anatomy_slices_ready"] > 0  # the phantom's liver slices
    whole = prepare_study(dicom_series.volume, UNetProvider(), steering, study_id="whole")
    np.testing.assert_array_equal(encoder.study.roi, whole.roi)
    np.testing.assert_array_equal(encoder.study.diffused.full(), whole.diffused.full())


def test_live_session_to_an_https_receiver_checks_its_certificate(phantoms, tmp_path):
    """The connection options of a one-off ``--to`` hold in a live session: against an HTTPS
    receiver (``--tls-cert``), a sender without the receiver's CA exits 1 at start with the
    reason, before its DICOM node takes any image; with ``--ca-file`` the series pushed arrives
    bit-exact."""
    from attack_helpers import make_certificate

    cert, key = make_certificate(tmp_path / "tls")
    token = tmp_path / "token.txt"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    _, series_uid, files = write_series(tmp_path / "a", phantoms[0], transfer_syntax=J2K)
    receiver = ReceiverProcess.start(tmp_path / "out", token, tmp_path / "receiver.log",
                                     "--tls-cert", str(cert), "--tls-key", str(key), cwd=ROOT)
    command = [sys.executable, "-m", "sender.cli", "--dicom-listen", "127.0.0.1:0",
               "--to", receiver.url, "--token-file", str(token), "--spool",
               str(tmp_path / "spool"), "--exact", "--roi", "body", "--series-count", "10",
               "--session-log", str(tmp_path / "session.jsonl")]
    sender_log = open(tmp_path / "sender.log", "w")
    sender = None
    try:
        assert receiver.url.startswith("https://")
        refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
        sender = subprocess.Popen(command + ["--ca-file", str(cert)], cwd=ROOT,
                                  stdout=sender_log, stderr=subprocess.STDOUT)
        port = int(wait_for(tmp_path / "sender.log", r"listening on 127\.0\.0\.1:(\d+)", sender,
                            timeout=120))
        code, output = asyncio.run(push(port, files, J2K))
        assert code == 0, output
        wait_lines(tmp_path / "session.jsonl", 1, sender)
    finally:
        stop_sender(sender)
        receiver.stop()
        sender_log.close()
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert re.search(r"dlad-send: error: .*certificate of https://127\.0\.0\.1:\d+\S* is not "
                     r"trusted .*--ca-file", refused.stderr), refused.stderr[-3000:]
    assert "listening on" not in refused.stderr  # the node never opened: no image taken
    assert sender.returncode == 0, (tmp_path / "sender.log").read_text()[-3000:]
    (line,) = [json.loads(text) for text in (tmp_path / "session.jsonl").read_text().splitlines()]
    assert line["outcome"] == "delivered", line
    check_received(series_folders(tmp_path / "out")[series_uid], phantoms[0], 10)


def test_node_takes_only_the_hosts_and_calling_ae_titles_allowed(tmp_path):
    """``--dicom-allow-ae``: an association from another calling AE title is rejected (the
    scanner sees the rejection, the log says why); ``--dicom-allow-hosts``: a connection from a
    host outside the networks is closed before any DICOM; the allowed peer is served."""
    from pynetdicom import AE

    from sender.dicom_node import DicomNode, parse_hosts
    from sender.series import SeriesCollector

    def echo(port: int, calling: str) -> tuple[bool, bool]:
        """(established, rejected) of an association for a C-ECHO from ``calling``."""
        ae = AE(ae_title=calling)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="DLAD")
        established, rejected = assoc.is_established, assoc.is_rejected
        if established:
            assert assoc.send_c_echo().Status == 0
            assoc.release()
        return established, rejected

    spool = Spool(tmp_path / "spool")
    outcomes = {}
    for label, hosts, titles in (("by AE", None, ["CT01", "CT02"]),
                                 ("by host", parse_hosts("10.0.0.0/8,192.168.7.7"), None),
                                 ("loopback", parse_hosts("127.0.0.1"), ["CT01"])):
        node = DicomNode("127.0.0.1", 0, "DLAD", spool, SeriesCollector(60.0), allow_hosts=hosts,
                         allow_calling_ae=titles)
        port = node.start()[1]
        try:
            outcomes[label] = (echo(port, "CT01"), echo(port, "INTRUDER"),
                               node.statistics.hosts_refused)
        finally:
            node.stop()
    assert outcomes["by AE"] == ((True, False), (False, True), 0)
    assert outcomes["by host"] == ((False, False), (False, False), 2)  # closed, no DICOM
    assert outcomes["loopback"] == ((True, False), (False, True), 0)
    with pytest.raises(ValueError, match="--dicom-allow-hosts: 'not-a-host'"):
        parse_hosts("10.0.0.0/8,not-a-host")


@pytest.mark.parametrize("options, message", [
    (["--dicom-allow-hosts", "10.0.0.0/8,nowhere"], "--dicom-allow-hosts: 'nowhere'"),
    (["--dicom-allow-ae", "CT01,THIS-TITLE-IS-TOO-LONG"], "--dicom-allow-ae: an AE title"),
    (["--ae-title", "A\\B"], "--ae-title: an AE title"),
    (["--dicom-tls-cert", "cert.pem"], "--dicom-tls-cert and --dicom-tls-key go together"),
    (["--dicom-tls-ca", "ca.pem"], "--dicom-tls-ca belongs to --dicom-tls-cert"),
])
def test_bad_node_access_options_are_one_line_errors(options, message, tmp_path, capsys):
    from sender.cli import main

    with pytest.raises(SystemExit) as exit_status:
        main(["--dicom-listen", "127.0.0.1:0", "--to", "http://127.0.0.1:9", "--token-file",
              str(tmp_path / "missing.txt"), *options])
    assert exit_status.value.code == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_status:
        main(["--watch", str(tmp_path), "--to", "http://127.0.0.1:9", "--token-file",
              str(tmp_path / "missing.txt"), "--dicom-allow-ae", "CT01"])
    assert exit_status.value.code == 2
    assert "belong to --dicom-listen" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_STORESCU, reason="dcmtk's storescu (apt-get install dcmtk; .ci/run "
                                              "does) for a TLS client")
def test_node_over_tls_with_client_certificates(phantoms, tmp_path):
    """``--dicom-tls-cert/--dicom-tls-key/--dicom-tls-ca``: storescu over TLS with a client
    certificate the CA signed stores its images, while another peer holds a TCP connection open
    without ever starting the handshake (the node's accept loop does not wait for it); plain
    TCP and anonymous TLS (no client certificate) are refused."""
    import socket

    from attack_helpers import make_certificate

    from sender.dicom_node import DicomNode
    from sender.series import SeriesCollector
    from shared.tls import server_tls_context

    server_cert, server_key = make_certificate(tmp_path / "server", name="dlad-node")
    client_cert, client_key = make_certificate(tmp_path / "client", name="ct-room-3")
    _, _, files = write_series(tmp_path / "s", phantoms[0], transfer_syntax=J2K)

    def storescu(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run([STORESCU, "-xv", "-aec", "DLAD", *options, "127.0.0.1",
                               str(port), *map(str, files[:3])], capture_output=True, text=True,
                              timeout=60)

    node = DicomNode("127.0.0.1", 0, "DLAD", Spool(tmp_path / "spool"), SeriesCollector(60.0),
                     tls=server_tls_context(server_cert, server_key, client_ca=client_cert))
    port = node.start()[1]
    silent = socket.create_connection(("127.0.0.1", port))  # never says a word
    try:
        good = storescu("+tls", str(client_key), str(client_cert), "+cf", str(server_cert))
        stored_after_good = node.statistics.stored
        plain = storescu()
        anonymous = storescu("+tla", "+cf", str(server_cert))
        stored_after_bad = node.statistics.stored
    finally:
        silent.close()
        node.stop()
    assert good.returncode == 0, good.stdout + good.stderr
    assert stored_after_good == 3
    assert plain.returncode != 0 and anonymous.returncode != 0
    assert stored_after_bad == 3
    assert node.statistics.tls_failed >= 2
