"""Live streaming over WebRTC on loopback: dlad-send --to -> dlad-receive --listen.

The main end-to-end test runs sender and receiver as separate processes on the shared
abdomen CT; a second one kills the sending process mid-stream and runs it again. The others
run the receiver service and the sender in this process on small synthetic studies: resume
after a cut connection, a receiver restarted on its folder, authentication and bad requests,
two studies at once, hostile study ids and garbage on the data channel.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import nibabel as nib
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from receiver.limits import Limits
from receiver.service import ReceiverService, ServiceConfig
from receiver.store import HEADER_FILE, LOG_FILE, STATUS_FILE, StudyStore, folder_name
from receiver.stream import StudyStream
from sender.transport import FileSource, Refused, StreamOptions, TransportError, stream_study
from shared.nifti import read_nifti
from shared.receiver_process import ReceiverProcess
from shared.webrtc.ice import ice_hosts
from shared.webrtc.protocol import CHANNEL_LABEL, encode_control, split_message
from shared.wire import KIND_DATA, MAGIC, PREFIX, WIRE_VERSION, DataChunk, FrameReader, StreamEnd, StreamHeader, frame

TOKEN = "dlad-test-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]


def run(coroutine, timeout: float = 180.0):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


@pytest.fixture()
def token_file(tmp_path) -> Path:
    path = tmp_path / "token.txt"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


# --- synthetic studies -------------------------------------------------------------------------

def encode_phantom(path: Path, seed: int, exact: bool = True, study_id: str | None = None):
    """Encode a small phantom into ``path``; return (volume, header)."""
    from models.phantoms import make_phantom
    from sender.encoder import EncodeSettings, StudyEncoder
    from sender.pipeline import prepare_study
    from sender.roi.provider import StaticMaskProvider

    volume, liver = make_phantom((12, 64, 80), spacing=(5.0, 5.2, 2.5), seed=seed)
    prepared = prepare_study(volume, StaticMaskProvider(liver, "phantom liver"),
                             study_id=study_id)
    encoder = StudyEncoder(prepared, EncodeSettings(exact=exact, group_slices=2, preset="fast"))
    path.write_bytes(b"".join(encoder.frames()))
    return volume, encoder.header


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom-streams")
    made = {}
    for name, seed, exact in (("a", 5, True), ("b", 6, True), ("a_layered", 5, False)):
        path = folder / f"{name}.dlad"
        volume, header = encode_phantom(path, seed, exact)
        made[name] = (path, volume, header)
    return made


def retitle(source: Path, target: Path, study_id: str) -> None:
    """Rewrite every frame of a stream for another study id (a hostile one, say)."""
    out = bytearray()
    for event in FrameReader().feed(source.read_bytes()):
        chunk = event.chunk
        chunk.study_id = study_id
        out += chunk.to_frame()
    target.write_bytes(bytes(out))


# --- receiver in this process ------------------------------------------------------------------

class Receiver:
    def __init__(self, out_dir: Path, limits: dict | None = None, **config):
        self.config = ServiceConfig(out_dir=out_dir, token=TOKEN,
                                    limits=Limits(**{"disk_reserve": 0, **(limits or {})}),
                                    **{"snapshot_interval": 0.2, **config})
        self.service: ReceiverService | None = None

    async def __aenter__(self) -> ReceiverService:
        self.service = ReceiverService(self.config)
        await self.service.start("127.0.0.1", 0)
        return self.service

    async def __aexit__(self, *exc) -> None:
        await self.service.stop()


def quick(**overrides) -> StreamOptions:
    return StreamOptions(**{"quiet": True, "backoff": 0.2, "connect_timeout": 30.0,
                            "stall_timeout": 60.0, **overrides})


def log_seqs(folder: Path) -> list[int]:
    events = FrameReader().feed((folder / LOG_FILE).read_bytes())
    assert all(event.error is None for event in events)
    return [event.chunk.seq for event in events]


def study_folders(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_complete(folder: Path, volume, header: StreamHeader, duplicates: int = 0) -> dict:
    """The folder holds the whole study, bit-exact, every chunk once, with the source geometry."""
    status = json.loads((folder / STATUS_FILE).read_text())
    assert status["state"] == "complete", status
    assert status["duplicates"] == duplicates
    assert status["verified_sha256"] is (True if 2 in header.layers else None)
    seqs = log_seqs(folder)
    assert sorted(seqs) == sorted(entry[0] for entry in header.plan)  # each chunk exactly once
    snapshot = read_nifti(folder / status["snapshot"]["file"])
    roi = header.roi
    np.testing.assert_array_equal(snapshot.data[roi], volume.data[roi])
    if 2 in header.layers:
        np.testing.assert_array_equal(snapshot.data, volume.data)
    np.testing.assert_allclose(snapshot.affine, volume.affine, atol=1e-5)
    assert snapshot.shape == volume.shape
    return status


# --- in-process tests --------------------------------------------------------------------------

def test_stream_phantom_in_process(studies, tmp_path):
    path, volume, header = studies["a"]

    async def scenario():
        async with Receiver(tmp_path / "out") as service:
            result = await stream_study(FileSource(path), service.url, TOKEN, quick())
            again = await stream_study(FileSource(path), service.url, TOKEN, quick())
            return result, again

    result, again = run(scenario())
    assert result.complete and result.verified and result.attempts == 1
    assert result.chunks_sent == len(header.plan) and result.chunks_skipped == 0
    assert {"roi_complete", "complete"} <= set(result.milestones)
    assert result.milestones["roi_complete"] <= result.milestones["complete"]
    # Run again: the receiver has everything, nothing is sent twice.
    assert again.complete and again.chunks_sent == 0 and again.chunks_skipped == len(header.plan)
    (folder,) = study_folders(tmp_path / "out")
    assert folder.name == header.study_id
    status = check_complete(folder, volume, header)
    assert status["transfer"]["sessions"] == 2
    assert (folder / HEADER_FILE).read_bytes() == FileSource(path).header_frame


def test_roi_only_stream_is_roi_exact(studies, tmp_path):
    path, volume, header = studies["a_layered"]

    async def scenario():
        async with Receiver(tmp_path / "out") as service:
            return await stream_study(FileSource(path), service.url, TOKEN, quick())

    result = run(scenario())
    assert result.complete and result.verified is None
    (folder,) = study_folders(tmp_path / "out")
    check_complete(folder, volume, header)


def test_cut_connection_resumes_without_duplicates(studies, tmp_path):
    path, volume, header = studies["a"]

    async def scenario():
        async with Receiver(tmp_path / "out") as service:
            return await stream_study(FileSource(path), service.url, TOKEN,
                                      quick(drop_after_chunks=5))

    result = run(scenario())
    assert result.complete and result.verified and result.attempts == 2
    (folder,) = study_folders(tmp_path / "out")
    status = check_complete(folder, volume, header)
    assert status["transfer"]["sessions"] == 2
    # The second connection sent only what the receiver lacked (frames in flight when the
    # connection was cut may be sent again; the receiver applied each chunk once).
    assert result.chunks_sent < 2 * len(header.plan)


def test_receiver_restart_keeps_what_it_had(studies, tmp_path):
    path, volume, header = studies["a"]
    out = tmp_path / "out"

    async def first():
        async with Receiver(out) as service:
            with pytest.raises(TransportError):
                await stream_study(FileSource(path), service.url, TOKEN,
                                   quick(drop_after_chunks=6, retries=0))

    async def second():
        async with Receiver(out) as service:
            return await stream_study(FileSource(path), service.url, TOKEN, quick())

    run(first())
    (folder,) = study_folders(out)
    kept = json.loads((folder / STATUS_FILE).read_text())["chunks_applied"]
    assert 0 < kept < len(header.plan)
    # A crash may leave half a frame at the end of the log: the restart cuts it off.
    with open(folder / LOG_FILE, "ab") as log:
        log.write(FileSource(path).frame(header.plan[-1][0])[:1000])
    result = run(second())
    assert result.complete and result.verified
    assert result.chunks_skipped >= kept
    assert result.chunks_sent == len(header.plan) - result.chunks_skipped
    check_complete(folder, volume, header)


def test_two_studies_at_once(studies, tmp_path):
    (path_a, volume_a, header_a), (path_b, volume_b, header_b) = studies["a"], studies["b"]
    assert header_a.study_id != header_b.study_id

    async def scenario():
        async with Receiver(tmp_path / "out") as service:
            return await asyncio.gather(
                stream_study(FileSource(path_a), service.url, TOKEN, quick()),
                stream_study(FileSource(path_b), service.url, TOKEN, quick()))

    results = run(scenario())
    assert all(r.complete and r.verified and r.attempts == 1 for r in results)
    folders = {f.name: f for f in study_folders(tmp_path / "out")}
    assert set(folders) == {header_a.study_id, header_b.study_id}
    check_complete(folders[header_a.study_id], volume_a, header_a)
    check_complete(folders[header_b.study_id], volume_b, header_b)


def test_hostile_study_ids_stay_inside_out_dir(studies, tmp_path):
    path, volume, header = studies["a"]
    hostile = {"../../etc/passwd": tmp_path / "hostile1.dlad",
               ".hidden/../..": tmp_path / "hostile2.dlad",
               "..": tmp_path / "hostile3.dlad"}
    for study_id, target in hostile.items():
        retitle(path, target, study_id)
    out = tmp_path / "sandbox" / "out"

    async def scenario():
        async with Receiver(out) as service:
            return [await stream_study(FileSource(p), service.url, TOKEN, quick())
                    for p in hostile.values()]

    results = run(scenario())
    assert all(r.complete and r.verified for r in results)
    names = [f.name for f in study_folders(out)]
    assert len(names) == 3 and all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", n) for n in names)
    assert sorted(names) == sorted(folder_name(i) for i in hostile)
    # Nothing was written beside the out-dir.
    assert sorted(p.name for p in (tmp_path / "sandbox").iterdir()) == ["out"]


def test_other_stream_with_same_id_gets_its_own_folder(studies, tmp_path):
    (path, volume, header), (layered, _, layered_header) = studies["a"], studies["a_layered"]
    assert layered_header.study_id == header.study_id  # same voxels, other settings

    async def scenario():
        async with Receiver(tmp_path / "out") as service:
            first = await stream_study(FileSource(path), service.url, TOKEN, quick())
            second = await stream_study(FileSource(layered), service.url, TOKEN, quick())
            return first, second

    first, second = run(scenario())
    assert first.complete and second.complete
    assert first.folder == header.study_id and second.folder == header.study_id + ".2"
    check_complete(tmp_path / "out" / first.folder, volume, header)
    check_complete(tmp_path / "out" / second.folder, volume, layered_header)


async def post_offer(url: str, body: bytes, headers: dict) -> tuple[int, dict, str]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/studies", data=body, headers=headers) as response:
            return response.status, dict(response.headers), await response.text()


async def real_offer() -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel(CHANNEL_LABEL)
    with ice_hosts(("127.0.0.1",)):
        await pc.setLocalDescription(await pc.createOffer())
    await pc.close()
    return pc.localDescription.sdp


def test_signaling_refuses_bad_requests_and_leaves_no_state(studies, tmp_path):
    path, _, _ = studies["a"]
    out = tmp_path / "out"

    async def scenario():
        async with Receiver(out, limits={"max_sessions": 1}) as service:
            offer = (await real_offer()).encode()
            sdp = {"Content-Type": "application/sdp"}
            auth = {"Authorization": f"Bearer {TOKEN}", **sdp}
            codes = {
                "no token": (await post_offer(service.url, offer, sdp))[0],
                "wrong token": (await post_offer(service.url, offer, {
                    **sdp, "Authorization": "Bearer " + TOKEN[:-1] + "x"}))[0],
                "basic auth": (await post_offer(service.url, offer, {
                    **sdp, "Authorization": "Basic " + TOKEN}))[0],
                "json body": (await post_offer(service.url, offer, {
                    **auth, "Content-Type": "application/json"}))[0],
                "garbage sdp": (await post_offer(service.url, b"v=0\r\nnonsense", auth))[0],
                "not sdp": (await post_offer(service.url, b"\xff\xfe\x00", auth))[0],
                "no channel": (await post_offer(service.url, b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n"
                                                b"s=-\r\nt=0 0\r\n", auth))[0],
                "huge": (await post_offer(service.url, b"v=0\r\n" + b"a=x\r\n" * 20000,
                                          auth))[0],
            }
            status, headers, _ = await post_offer(service.url, offer, {
                "Authorization": "Bearer nope", **sdp})
            assert headers.get("WWW-Authenticate", "").startswith("Bearer")
            left = (len(service.sessions), len(service.studies))
            async with aiohttp.ClientSession() as http:
                async with http.get(service.url + "/studies") as response:
                    codes["list without token"] = response.status
                async with http.get(service.url + "/studies",
                                    headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                    codes["list"] = response.status
                    listing = await response.json()
                async with http.delete(service.url + "/studies/sessions/nothing",
                                       headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                    codes["delete unknown"] = response.status
                async with http.delete(service.url + "/studies/sessions/nothing") as response:
                    codes["delete without token"] = response.status
            # A good offer is answered; a second one is over max_sessions=1.
            status, headers, answer = await post_offer(service.url, offer, auth)
            codes["good"] = status
            assert answer.startswith("v=0") and headers["Location"].startswith("/studies/sessions/")
            codes["over the limit"] = (await post_offer(service.url, offer, auth))[0]
            async with aiohttp.ClientSession() as http:
                async with http.delete(service.url + headers["Location"],
                                       headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                    codes["delete"] = response.status
            await asyncio.sleep(0.1)
            after_delete = len(service.sessions)
            with pytest.raises(Refused, match="401"):
                await stream_study(FileSource(path), service.url, "wrong-" + TOKEN, quick())
            return codes, left, listing, after_delete

    codes, left, listing, after_delete = run(scenario())
    assert codes == {"no token": 401, "wrong token": 401, "basic auth": 401, "json body": 415,
                     "garbage sdp": 400, "not sdp": 400, "no channel": 400, "huge": 413,
                     "list without token": 401, "list": 200, "delete unknown": 404,
                     "delete without token": 401, "good": 201, "over the limit": 503,
                     "delete": 204}
    assert left == (0, 0) and after_delete == 0
    assert listing == {"studies": [], "sessions": []}
    assert study_folders(out) == []


class RawClient:
    """A hand-driven sender: sends whatever the test wants on the dlad channel."""

    def __init__(self):
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel(CHANNEL_LABEL)
        self.messages: asyncio.Queue = asyncio.Queue()
        self.closed = asyncio.Event()
        self.channel.on("message", lambda m: self.messages.put_nowait(json.loads(m)))
        self.channel.on("close", self.closed.set)

    async def connect(self, url: str) -> None:
        opened = asyncio.Event()
        self.channel.on("open", opened.set)
        with ice_hosts(("127.0.0.1",)):
            await self.pc.setLocalDescription(await self.pc.createOffer())
        status, _, answer = await post_offer(url, self.pc.localDescription.sdp.encode(), {
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/sdp"})
        assert status == 201
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await asyncio.wait_for(opened.wait(), 30)

    def send(self, data: bytes) -> None:
        for piece in split_message(data):
            self.channel.send(piece)

    async def expect(self, kind: str, timeout: float = 30) -> dict:
        while True:
            message = await asyncio.wait_for(self.messages.get(), timeout)
            if message["type"] == kind:
                return message

    async def close(self) -> None:
        await self.pc.close()


def test_garbage_on_the_data_channel_never_crashes_the_receiver(studies, tmp_path):
    path, volume, header = studies["a"]
    source = FileSource(path)
    other_study = studies["b"][2].study_id
    seqs = [entry[0] for entry in header.plan]
    good = source.frame(seqs[0])
    assert len(seqs) > 11

    def chunk_frame(template=seqs[0], **changes) -> bytes:
        chunk = FrameReader().feed(source.frame(template))[0].chunk
        fields = {name: getattr(chunk, name) for name in
                  ("study_id", "seq", "layer", "z0", "z1", "codec", "params", "payload")}
        return DataChunk(**{**fields, **changes}).to_frame()

    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x40
    bad_version = bytearray(good)
    bad_version[4] = 9
    hostile = [
        os.urandom(5000),                                            # noise
        PREFIX.pack(MAGIC, WIRE_VERSION, KIND_DATA, 1 << 30, bytes(16)),  # oversized frame
        frame(KIND_DATA, {"study_id": header.study_id}),             # fields missing
        MAGIC + bytes([WIRE_VERSION, KIND_DATA]) + b"\x00\x00\x00\x05" + bytes(16) + b"\xc1" * 5,
        bytes(flipped),                                              # bad checksum
        bytes(bad_version),                                          # unknown wire version
        chunk_frame(study_id=other_study),                           # another study's chunk
        chunk_frame(seq=10_000),                                     # not in the plan
        chunk_frame(z0=40, z1=44),                                   # out-of-range slices
        chunk_frame(seqs[-1], payload=b"\x00" * 100),                # undecodable payload
        StreamEnd(header.study_id, 0, 0).to_frame()[:-3],           # truncated
    ]

    async def scenario():
        async with Receiver(tmp_path / "out") as service:
            # 1. Protocol violations close the session, nothing else.
            rude = RawClient()
            await rude.connect(service.url)
            rude.channel.send(b"binary before hello")
            error = await rude.expect("error")
            await asyncio.wait_for(rude.closed.wait(), 30)
            await rude.close()
            rude = RawClient()
            await rude.connect(service.url)
            rude.channel.send("{not json")
            error2 = await rude.expect("error")
            await rude.close()
            rude = RawClient()
            await rude.connect(service.url)
            rude.channel.send(encode_control("hello", protocol=99))
            error3 = await rude.expect("error")
            await rude.close()
            rude = RawClient()
            await rude.connect(service.url)
            rude.channel.send(encode_control("hello", protocol=1))
            rude.send(os.urandom(3000))
            error4 = await rude.expect("error")
            await rude.close()
            # 2. Garbage between good frames: rejected and logged, the good frames applied.
            client = RawClient()
            await client.connect(service.url)
            client.channel.send(encode_control("hello", protocol=1))
            client.send(source.header_frame)
            inventory = await client.expect("inventory")
            stream = bytearray()
            for seq in seqs:
                stream += hostile[seq % len(hostile)] + source.frame(seq)
            stream += b"".join(hostile)
            stream += StreamEnd(header.study_id, len(seqs), len(stream)).to_frame()
            client.send(bytes(stream))
            done = await client.expect("done", 60)
            await client.close()
            # 3. The receiver still serves a normal sender.
            other_path = studies["b"][0]
            result = await stream_study(FileSource(other_path), service.url, TOKEN, quick())
            return error, (error2, error3, error4), inventory, done, result

    error, errors, inventory, done, result = run(scenario())
    assert "before the hello" in error["reason"]
    assert "JSON" in errors[0]["reason"] and "protocol" in errors[1]["reason"]
    assert "header" in errors[2]["reason"]
    assert inventory["have"] == []
    # The undecodable copy of the last chunk was rejected before the good one came; its second
    # copy, after the good one, is a duplicate, ignored.
    assert done["complete"] and done["verified"] and done["duplicates"] == 1
    assert done["problems"] >= len(hostile)
    assert result.complete and result.verified
    folder = tmp_path / "out" / header.study_id
    status = check_complete(folder, volume, header, duplicates=1)
    problems = "\n".join(status["problems"])
    print(problems)
    for expected in ("checksum", "oversized", "not in the plan", "wire version", "study",
                     f"chunk {seqs[-1]}:", "differ from the plan"):
        assert expected in problems, expected


def test_store_refuses_a_second_receiver_on_the_same_folder(tmp_path):
    first = StudyStore(tmp_path)
    try:
        from receiver.store import StoreError
        with pytest.raises(StoreError, match="in use"):
            StudyStore(tmp_path)
    finally:
        first.close()
    StudyStore(tmp_path).close()


# --- separate processes ------------------------------------------------------------------------

def start_receiver_process(tmp_path: Path, token_file: Path, *options: str) -> ReceiverProcess:
    """``dlad-receive --listen 127.0.0.1:0`` in a child process, out-dir ``tmp_path/out``."""
    return ReceiverProcess.start(tmp_path / "out", token_file, tmp_path / "receiver.log", *options,
                                 cwd=ROOT)


def send_command(token_file: Path, url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "sender.cli", *args, "--to", url, "--token-file",
            str(token_file)]


def test_live_stream_real_ct_separate_processes(tmp_path, token_file, abdomen_dicom,
                                                abdomen_liver, abdomen_volume):
    receiver = start_receiver_process(tmp_path, token_file, "--snapshot-interval", "0.5")
    try:
        sent = subprocess.run(send_command(token_file, receiver.url, str(abdomen_dicom),
                                           "--roi-mask", str(abdomen_liver), "--exact"),
                              cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert sent.returncode == 0, sent.stderr[-3000:]
        assert "SHA-256 verified by the receiver" in sent.stdout
        assert "receiver: ROI complete" in sent.stderr
    finally:
        stopped = receiver.stop()
    assert stopped == 0  # SIGINT: a clean stop
    log = receiver.log_path.read_text()
    assert "ROI complete" in log and "SHA-256 of the exact volume verified" in log
    (folder,) = study_folders(receiver.out_dir)
    header = FrameReader().feed((folder / HEADER_FILE).read_bytes())[0].chunk
    status = check_complete(folder, abdomen_volume, header)
    assert status["stream_key"] and status["sha256"] == header.sha256
    # Snapshot geometry: the DICOM's stored dtype, affine and spacing.
    image = nib.load(str(folder / status["snapshot"]["file"]))
    assert image.get_data_dtype() == np.uint16
    np.testing.assert_allclose(image.affine, abdomen_volume.affine, atol=1e-5)
    np.testing.assert_allclose(image.header.get_zooms(), abdomen_volume.spacing, atol=1e-5)
    # ROI first: the ROI was bit-exact while the exact layer was still on its way.
    times = status["times"]
    assert times["roi_complete"] < times["exact_complete"]
    stream = StudyStream()
    stream.accept_header(header)
    original = abdomen_volume.data
    for event in FrameReader().feed((folder / LOG_FILE).read_bytes()):
        stream.feed(event.chunk.to_frame())
        if stream.reassembler.roi_complete:
            break
    assert not stream.reassembler.exact_complete
    np.testing.assert_array_equal(stream.reassembler.volume[header.roi], original[header.roi])
    assert not np.array_equal(stream.reassembler.volume, original)
    # The receiver's slice report: every slice has all three layers and its ROI verified
    # against the sender's digest (1 + 2 + 4 + 8); the higher bits say which layers came as
    # original voxels rather than residuals (16 ROI, 32 the rest: the encoder's choice by size).
    assert [layers & 15 for layers in status["slice_layers"]] == [15] * original.shape[0]
    assert all(layers < 64 for layers in status["slice_layers"])
    assert status["roi_verified_slices"] == original.shape[0] and status["roi_mismatches"] == 0


def test_sender_killed_mid_stream_then_run_again(tmp_path, token_file):
    receiver = start_receiver_process(tmp_path, token_file, "--snapshot-interval", "0.1")
    args = ("phantom", "--exact")
    try:
        first = subprocess.Popen(send_command(token_file, receiver.url, *args, "--quiet",
                                              "--max-rate", "3"),
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        applied, deadline = 0, time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None:
            for status_file in receiver.out_dir.glob(f"*/{STATUS_FILE}"):
                try:
                    applied = json.loads(status_file.read_text())["chunks_applied"]
                except (ValueError, KeyError, OSError):
                    pass
            if applied >= 3:
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first sender ended before it could be killed"
        first.kill()  # no goodbye: the receiver learns of it only when the sender is back
        first.wait(30)
        first.stderr.close()
        again = subprocess.run(send_command(token_file, receiver.url, *args), cwd=ROOT,
                               capture_output=True, text=True, timeout=400)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "receiver already has" in again.stderr
    finally:
        stopped = receiver.stop()
    assert stopped == 0  # SIGINT: a clean stop
    log = receiver.log_path.read_text()
    assert "takes over" in log or "closed" in log
    (folder,) = study_folders(receiver.out_dir)
    status = json.loads((folder / STATUS_FILE).read_text())
    assert status["state"] == "complete" and status["verified_sha256"] is True
    assert status["duplicates"] == 0 and status["transfer"]["sessions"] == 2
    seqs = log_seqs(folder)
    assert len(seqs) == len(set(seqs)) == status["chunks_planned"]
    resumed = int(re.search(r"receiver already has (\d+)/", again.stderr).group(1))
    assert resumed >= 3


def test_receiver_refuses_a_study_larger_than_it_takes(studies, tmp_path):
    path, _, _ = studies["a"]

    async def scenario():
        async with Receiver(tmp_path / "out", limits={"max_voxels": 1000}) as service:
            with pytest.raises(Refused, match="voxels"):
                await stream_study(FileSource(path), service.url, TOKEN, quick())
            return len(service.studies)

    assert run(scenario()) == 0
    assert study_folders(tmp_path / "out") == []
