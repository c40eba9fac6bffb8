"""The ROI frame: a stream that starts before its ROI is known (a live sender's previews while
the U-Net finishes), then brings mask, digests and the plan of layers 1/2 in a frame of its own.

Round trips (wire, encoder -> stream -> exact volume, file, store reload), one test per refusal
of the header's pending form and of the ROI frame, the receiver's bounds before the ROI, and a
tampered frame that is never reported ROI-exact.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future
from dataclasses import replace

import msgpack
import numpy as np
import pytest

from receiver.limits import Limits, check_header
from receiver.reassembly import HAS_BASE, ChunkRejected, Reassembler
from receiver.store import LOG_FILE, StudyStore
from receiver.stream import StudyStream
from sender.encoder import EncodeSettings, RoiFailed, StudyEncoder, can_defer_roi
from shared.wire import (
    KIND_HEADER,
    KIND_ROI,
    PREFIX,
    DataChunk,
    FrameReader,
    RoiFrame,
    StreamEnd,
    StreamHeader,
    WireError,
    frame,
    parse_frame,
)

SETTINGS = EncodeSettings(exact=True, group_slices=2, preset="fast")


@pytest.fixture(scope="module")
def prepared():
    """A small phantom with its liver as the ROI, prepared as a sender would."""
    from models.phantoms import make_phantom
    from sender.pipeline import prepare_study
    from sender.roi.provider import StaticMaskProvider

    volume, liver = make_phantom((8, 32, 40), spacing=(10.0, 10.0, 4.0), seed=9)
    liver[:2] = False  # blocks without ROI voxels, and blocks with some
    return prepare_study(volume, StaticMaskProvider(liver), study_id="pending")


def pending(prepared, done: bool = True) -> tuple[StudyEncoder, Future]:
    """A StudyEncoder whose ROI is pending: the study without its ROI, and its future."""
    future: Future = Future()
    study = replace(prepared, roi=None, diffused=None,
                    provenance={k: v for k, v in prepared.provenance.items() if k != "roi"})
    encoder = StudyEncoder(study, SETTINGS, roi=future)
    if done:
        future.set_result(prepared)
    return encoder, future


@pytest.fixture(scope="module")
def stream(prepared):
    """The frames of a pending stream: header, two previews before the ROI, the ROI frame,
    the rest, end; and the frames by kind."""
    encoder, future = pending(prepared, done=False)
    frames = [encoder.header.to_frame()]
    chunks = encoder.chunks()
    for _ in range(2):
        frames.append(next(chunks).to_frame())
    future.set_result(prepared)
    frames += [chunk.to_frame() for chunk in chunks]
    frames.append(StreamEnd(encoder.header.study_id, sum(
        parse_frame(f).__class__ is DataChunk for f in frames), sum(map(len, frames))).to_frame())
    events = FrameReader().feed(b"".join(frames))
    kinds = [type(event.chunk).__name__ for event in events]
    return frames, kinds, encoder


def body(data: bytes) -> dict:
    return msgpack.unpackb(data[PREFIX.size:], raw=False)


def roi_body(stream) -> tuple[StreamHeader, dict]:
    frames, kinds, _ = stream
    return parse_frame(frames[0]), body(frames[kinds.index("RoiFrame")])


def attach(header: StreamHeader, fields: dict) -> StreamHeader:
    return header.with_roi(parse_frame(frame(KIND_ROI, fields)))


# --- the wire -----------------------------------------------------------------------------------

def test_the_header_announces_the_roi_as_pending(stream, prepared):
    frames, kinds, encoder = stream
    header = parse_frame(frames[0])
    assert header.roi_pending and not header.roi_known and header.roi_voxels is None
    assert "roi" not in body(frames[0]) and "roi_digests" not in body(frames[0])
    assert {layer for _, layer, _, _ in header.plan} == {0} and sorted(header.layers) == [0, 1, 2]
    assert "roi" not in header.provenance
    with pytest.raises(WireError, match="not known yet"):
        header.roi_slices(0, 1)
    # The previews before the ROI frame, then the ROI frame, then the rest.
    assert kinds[:4] == ["StreamHeader", "DataChunk", "DataChunk", "RoiFrame"]
    assert kinds.count("RoiFrame") == 1 and kinds[-1] == "StreamEnd"


def test_the_roi_frame_completes_the_header_as_the_header_would_carry_it(stream, prepared):
    frames, kinds, encoder = stream
    full = parse_frame(frames[0]).with_roi(parse_frame(frames[kinds.index("RoiFrame")]))
    inline = StudyEncoder(prepared, SETTINGS).header
    assert full.roi_known and np.array_equal(full.roi, prepared.roi)
    assert full.roi_voxels == inline.roi_voxels == int(prepared.roi.sum())
    assert sorted(full.roi_digests) == sorted(inline.roi_digests)
    assert sorted((layer, z0, z1) for _, layer, z0, z1 in full.plan) == sorted(
        (layer, z0, z1) for _, layer, z0, z1 in inline.plan)
    assert full.provenance["roi"] == prepared.provenance["roi"]
    with pytest.raises(ValueError, match="sent as it was"):
        full.to_frame()


def test_a_pending_stream_rebuilds_the_exact_volume_and_previews_come_first(stream, prepared):
    frames, kinds, _ = stream
    receiver = StudyStream()
    receiver.feed(b"".join(frames[:3]))  # header and two previews
    status = receiver.status()
    assert status["roi_known"] is False and status["slices_with_base"] == 4
    assert status["roi_complete"] is False and status["roi_exact_slices"] == 0
    assert status["state"] == "partial" and status["exact_layer_slices"] == 0
    assert receiver.reassembler.progress().roi_fraction == 0.0
    applied = receiver.feed(b"".join(frames[3:]))
    assert isinstance(applied[0], RoiFrame)
    status = receiver.status()
    assert status["roi_known"] and status["roi_complete"] and status["verified_sha256"] is True
    assert status["state"] == "complete" and not status["problems"]
    assert np.array_equal(receiver.reassembler.volume, prepared.volume.data)


def test_file_mode_keeps_the_roi_in_the_header(prepared):
    """Only a sender whose bases do not depend on the ROI may defer it."""
    assert can_defer_roi(SETTINGS, 0)
    assert not can_defer_roi(SETTINGS, 15)  # diffusion, steered by the ROI
    assert not can_defer_roi(EncodeSettings(), 0)  # guarded bases: their SSIM is the ROI's
    assert not can_defer_roi(EncodeSettings(codec="zstd", exact=True), 0)
    with pytest.raises(ValueError, match="pending ROI needs"):
        StudyEncoder(replace(prepared, roi=None, diffused=None), EncodeSettings(), roi=Future())
    header = StudyEncoder(prepared, SETTINGS).header
    assert not header.roi_pending and header.roi_known


def test_a_failed_roi_ends_the_stream_with_its_reason(prepared):
    encoder, future = pending(prepared, done=False)
    chunks = encoder.chunks()
    next(chunks)
    future.set_exception(ValueError("the U-Net ran out of memory"))
    with pytest.raises(RoiFailed, match="out of memory"):
        list(chunks)


# --- refusals: the header's pending form ---------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (lambda b: b.update(roi_pending=1), "roi_pending must be true"),
    (lambda b: b.update(roi={"encoding": "packbits-zstd", "data": b"", "voxels": 0}),
     "no roi and no roi_digests"),
    (lambda b: b.update(roi_digests=[]), "no roi and no roi_digests"),
    (lambda b: b["plan"].append([99, 1, 0, 2]), "layer 0 only"),
    (lambda b: b.update(plan=b["plan"][1:]), "cover every slice once"),
    (lambda b: b["layers"].pop("1"), "needs a stream with the ROI layer"),
], ids=["not-a-bool", "with-a-mask", "with-digests", "layer-1-planned", "slices-uncovered",
        "no-roi-layer"])
def test_a_malformed_pending_header_is_refused(stream, change, message):
    fields = body(stream[0][0])
    change(fields)
    with pytest.raises(WireError, match=message):
        parse_frame(frame(KIND_HEADER, fields))


# --- refusals: the ROI frame --------------------------------------------------------------------

def _blocks_with_roi(fields):
    return sorted({(z0, z1) for _, layer, z0, z1 in fields["plan"] if layer == 1})


def _shrunk_mask(fields, header):
    """A valid mask that is not the one the plan and digests were made for."""
    full = header.with_roi(parse_frame(frame(KIND_ROI, fields)))
    mask = full.roi.copy()
    z0, z1 = _blocks_with_roi(fields)[0]
    mask[z0:z1] = False  # a block with ROI voxels in the plan has none in the mask
    return RoiFrame.make(header, mask, [], []).roi


ROI_REFUSALS = {
    "other-sha256": (lambda f, h: f.update(sha256="0" * 64), "differ from the header"),
    "other-study": (lambda f, h: f.update(study_id="another"), "differ from the header"),
    "mask-of-another-size": (
        lambda f, h: f.update(roi=RoiFrame.make(replace_shape(h), np.ones((2, 3, 4), bool), [],
                                                []).roi), "mask"),
    "voxel-count": (lambda f, h: f["roi"].update(voxels=f["roi"]["voxels"] + 1),
                    "voxel count mismatch"),
    "digest-missing": (lambda f, h: f.update(roi_digests=f["roi_digests"][1:]),
                       "one digest per block"),
    "digest-of-a-block-without-roi": (
        lambda f, h: f["roi_digests"].append([0, 2, b"\0" * 32]), "one digest per block"),
    "digest-not-32-bytes": (lambda f, h: f["roi_digests"][0].__setitem__(2, b"x"),
                            "malformed roi_digests"),
    "digests-overlap": (lambda f, h: f["roi_digests"].append(list(f["roi_digests"][0])),
                        "overlaps"),
    "entry-on-no-header-block": (lambda f, h: f["plan"].append([90, 2, 0, 3]), "not a new chunk"),
    "seq-of-a-base": (lambda f, h: f["plan"].__setitem__(0, [0, *f["plan"][0][1:]]),
                      "not a new chunk"),
    "seq-twice": (lambda f, h: f["plan"].__setitem__(1, [f["plan"][0][0], *f["plan"][1][1:]]),
                  "not a new chunk"),
    "layer-0-entry": (lambda f, h: f["plan"].append([90, 0, 0, 2]), "malformed plan entry"),
    "layer-1-missing": (lambda f, h: f.update(plan=[e for e in f["plan"] if e[1] != 1][:]
                                               + [e for e in f["plan"] if e[1] == 1][1:]),
                        "layer 1 must plan exactly"),
    "layer-2-missing": (lambda f, h: f.update(plan=[e for e in f["plan"] if e[1] != 2]),
                        "layer 2 must plan exactly"),
    "mask-other-than-the-plan": (lambda f, h: f.update(roi=_shrunk_mask(f, h)),
                                 "must plan exactly"),
    "provenance-replaces-the-headers": (lambda f, h: f["provenance"].update(input="x"),
                                        "may not replace"),
    "malformed-sha256": (lambda f, h: f.update(sha256="abc"), "64 hex"),
    "no-plan": (lambda f, h: f.pop("plan"), "missing field 'plan'"),
}


def replace_shape(header: StreamHeader) -> StreamHeader:
    return StreamHeader(header.study_id, (2, 3, 4), header.affine, header.spacing,
                        header.source_dtype, header.rescale, header.value_range, header.sha256,
                        layers=header.layers, plan=[], roi_pending=True)


@pytest.mark.parametrize("name", sorted(ROI_REFUSALS))
def test_a_roi_frame_that_does_not_fit_its_header_is_refused(stream, name):
    header, fields = roi_body(stream)
    change, message = ROI_REFUSALS[name]
    change(fields, header)
    with pytest.raises(WireError, match=message):
        attach(header, fields)


def test_a_roi_frame_for_a_header_that_carries_the_roi_is_refused(stream, prepared):
    _, fields = roi_body(stream)
    inline = StudyEncoder(prepared, SETTINGS).header
    with pytest.raises(WireError, match="carries its ROI already"):
        inline.with_roi(parse_frame(frame(KIND_ROI, fields)))
    receiver = StudyStream()
    receiver.feed(inline.to_frame() + frame(KIND_ROI, fields))
    assert "whose header carries the ROI" in receiver.status()["problems"][0]


def test_layer_1_and_2_chunks_before_the_roi_frame_are_refused(stream):
    frames, kinds, _ = stream
    after = [f for f, k in zip(frames, kinds) if k == "DataChunk" and parse_frame(f).layer]
    receiver = StudyStream()
    receiver.feed(frames[0] + b"".join(after))
    status = receiver.status()
    assert status["chunks_applied"] == 0 and status["problem_count"] == len(after)
    assert all("before the ROI frame" in p for p in status["problems"])
    reassembler = Reassembler(parse_frame(frames[0]))
    with pytest.raises(ChunkRejected, match="before the ROI frame"):
        reassembler.apply(parse_frame(after[0]))


def test_a_second_different_roi_frame_is_not_parsed_and_the_same_one_is_a_duplicate(stream):
    frames, kinds, _ = stream
    at = kinds.index("RoiFrame")
    receiver = StudyStream()
    receiver.feed(b"".join(frames[:at + 1]))
    receiver.feed(frames[at])  # a resumed sender sends it again in every pass
    assert receiver.duplicates == 1 and not receiver.status()["problems"]
    other = body(frames[at])
    other["provenance"] = {"roi": {"provider": "another"}}
    receiver.feed(frame(KIND_ROI, other))
    assert "differs from the first (not parsed)" in receiver.status()["problems"][0]
    receiver.feed(b"".join(frames[at + 1:]))
    assert receiver.status()["verified_sha256"] is True


def test_a_roi_frame_before_the_header_is_skipped(stream):
    frames, kinds, _ = stream
    receiver = StudyStream()
    receiver.feed(frames[kinds.index("RoiFrame")])
    assert "ROI frame before any header" in receiver.status()["problems"][0]


def test_a_roi_frame_changed_in_transit_is_never_used(stream):
    frames, kinds, _ = stream
    at = kinds.index("RoiFrame")
    damaged = bytearray(frames[at])
    damaged[-5] ^= 0x40
    receiver = StudyStream()
    receiver.feed(b"".join(frames[:at]) + bytes(damaged) + b"".join(frames[at + 1:]))
    status = receiver.status()
    assert status["roi_known"] is False and status["roi_complete"] is False
    assert status["chunks_applied"] == status["chunks_planned"] == 4  # the previews
    assert any("checksum mismatch" in p for p in status["problems"])


def test_a_forged_roi_frame_is_never_reported_roi_exact(stream, prepared):
    """A frame with a good checksum whose mask is another than the digests' (a hostile or
    broken sender): the blocks fail their digest check and are dropped; nothing is called
    ROI-exact."""
    frames, kinds, _ = stream
    at = kinds.index("RoiFrame")
    fields = body(frames[at])
    header = parse_frame(frames[0])
    mask = header.with_roi(parse_frame(frames[at])).roi.copy()
    z0, z1, _ = fields["roi_digests"][0]
    zs, ys, xs = np.nonzero(mask[z0:z1])
    assert len(zs) > 1
    mask[z0 + zs[0], ys[0], xs[0]] = False  # one voxel less: the same blocks, another ROI
    forged = RoiFrame.make(header, mask, [tuple(d) for d in fields["roi_digests"]],
                           [tuple(e) for e in fields["plan"]],
                           fields["provenance"]).to_frame()
    receiver = StudyStream()
    receiver.feed(b"".join(frames[:at]) + forged + b"".join(frames[at + 1:]))
    status = receiver.status()
    assert status["roi_known"] and status["roi_mismatches"] > 0
    assert status["roi_complete"] is False and status["verified_sha256"] is not True


# --- the receiver: bounds, file, store ------------------------------------------------------------

def test_the_receiver_budgets_for_every_chunk_the_roi_frame_may_add(stream, prepared):
    frames, kinds, _ = stream
    header = parse_frame(frames[0])
    inline = StudyEncoder(prepared, SETTINGS).header
    bound = header.planned_bound()
    assert len(bound) == 3 * len(header.plan) >= len(inline.plan)
    cost, inline_cost = check_header(header, Limits(), 1 << 20), check_header(inline, Limits(),
                                                                              1 << 20)
    assert cost.stream >= inline_cost.stream
    with pytest.raises(ValueError, match="plan has"):
        check_header(header, Limits(max_plan_entries=len(header.plan) + 1), 1 << 20)
    # The reader waits for a ROI frame as large as the mask may code, no larger.
    receiver = StudyStream()
    receiver.feed(frames[0])
    oversized = PREFIX.pack(b"DLAD", 1, KIND_ROI, 64 << 20, b"\0" * 16)
    receiver.feed(oversized)
    assert "oversized frame" in receiver.status()["problems"][0]


def test_dlad_receive_in_reads_a_pending_stream(stream, prepared, tmp_path):
    from receiver.cli import main as receive_main

    frames, _, _ = stream
    path = tmp_path / "live.dlad"
    path.write_bytes(b"".join(frames))
    status_path = tmp_path / "status.json"
    code = receive_main(["--in", str(path), "--out", str(tmp_path / "v.nii"), "--status",
                         str(status_path), "--quiet"])
    status = json.loads(status_path.read_text())
    assert code == 0 and status["verified_sha256"] is True and status["roi_known"]


def test_a_pending_file_replays_with_its_roi_frame_in_place(stream, tmp_path):
    from sender.transport import FileSource

    frames, kinds, _ = stream
    path = tmp_path / "live.dlad"
    path.write_bytes(b"".join(frames))
    source = FileSource(path)
    sent = list(source.frames_except(set()))
    assert [seq is None for seq, _ in sent].index(True) == 2  # after the two previews
    assert b"".join(f for _, f in sent) == b"".join(frames[1:-1])
    resumed = [seq for seq, _ in source.frames_except(set(source.order[:3]))]
    assert resumed[0] is None and resumed[1:] == source.order[3:]
    path.write_bytes(b"".join(f for f, k in zip(frames, kinds) if k != "RoiFrame"))
    with pytest.raises(ValueError, match="no ROI frame follows"):
        FileSource(path)


def test_the_store_logs_the_roi_frame_and_reloads_it(stream, prepared, tmp_path):
    frames, kinds, _ = stream
    at = kinds.index("RoiFrame")
    header = parse_frame(frames[0])
    store = StudyStore(tmp_path / "out")
    record, existed = store.open(header, frames[0])
    assert not existed
    for data in (b"".join(frames[1:at]), b"".join(frames[at:at + 3])):
        record.append(record.stream.feed(data))
    assert record.check_milestones().count("roi_known") == 1
    assert record.status()["roi_known"] and "roi_known" in record.status()["times"]
    applied = set(record.reassembler.applied)
    record.close()
    store.close()
    # The log replays as a stream: header.dlad + chunks.dlad.
    log_events = FrameReader().feed((record.folder / LOG_FILE).read_bytes())
    assert [type(e.chunk).__name__ for e in log_events].count("RoiFrame") == 1
    again = StudyStore(tmp_path / "out")
    reloaded, existed = again.open(header, frames[0])
    assert existed and reloaded.reassembler.roi_known
    assert reloaded.reassembler.applied == applied
    assert reloaded.header.roi_known and reloaded.header.roi_voxels == int(prepared.roi.sum())
    # The resumed sender's pass: the ROI frame again (a duplicate), then what is missing.
    reloaded.append(reloaded.stream.feed(frames[at] + b"".join(frames[at + 3:])))
    assert reloaded.status()["verified_sha256"] is True and not reloaded.status()["problems"]
    reloaded.close()
    again.close()


def test_slice_states_and_dicom_segmentation_wait_for_the_roi(stream):
    from receiver.dicom_export import SeriesSnapshot, build_segmentation
    from receiver.slices import EXACT, LIVER_EXACT, PREVIEW, roi_voxels_per_slice, slice_states

    frames, kinds, _ = stream
    receiver = StudyStream()
    receiver.feed(b"".join(frames[:3]))
    r = receiver.reassembler
    assert not roi_voxels_per_slice(r).any()
    states = slice_states(r)
    assert set(states[(r.slice_layers() & HAS_BASE) > 0]) == {PREVIEW}
    snapshot = SeriesSnapshot(header=r.header, stream_key="k", folder="f",
                              hu=r.volume.copy(), states=states)
    assert build_segmentation(snapshot, "preview", []) is None
    assert LIVER_EXACT not in set(states)
    receiver.feed(b"".join(frames[3:]))
    assert np.array_equal(roi_voxels_per_slice(r) > 0, r.header.roi.any(axis=(1, 2)))
    assert set(slice_states(r)) == {EXACT}


def test_a_data_chunk_of_a_pending_stream_names_only_planned_codecs(stream):
    """Previews are the header's layer-0 codec, as in any stream."""
    frames, kinds, _ = stream
    header = parse_frame(frames[0])
    for data, kind in zip(frames, kinds):
        if kind == "DataChunk":
            chunk = parse_frame(data)
            assert isinstance(chunk, DataChunk)
            assert chunk.codec in header.layers[chunk.layer]["codecs"]


# --- over the network: resume after a cut, a restarted sender, the viewer -------------------------

def _network():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import test_streaming

    return test_streaming


def test_a_live_stream_with_its_roi_pending_resumes_after_a_cut(prepared, tmp_path):
    """The connection is cut after the previews and the ROI frame: the next connection sends
    the ROI frame again (taken as the known one) and only what the receiver lacks."""
    from sender.transport import EncoderSource, stream_study

    net = _network()
    encoder, future = pending(prepared, done=False)
    roi_ready = threading.Timer(0.5, future.set_result, (prepared,))  # the U-Net, meanwhile
    roi_ready.start()

    async def scenario():
        async with net.Receiver(tmp_path / "out") as service:
            return await stream_study(EncoderSource(encoder), service.url, net.TOKEN,
                                      net.quick(drop_after_chunks=5))

    result = net.run(scenario())
    roi_ready.join()
    assert result.complete and result.verified and result.attempts == 2
    assert result.chunks_planned == len(encoder.plan)
    (folder,) = net.study_folders(tmp_path / "out")
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "complete" and status["verified_sha256"] is True
    assert status["roi_known"] and not [p for p in status["problems"] if "ROI" in p]
    assert "roi_known" in status["times"]  # (told once: the ack may go with the connection)
    kinds = [type(e.chunk).__name__ for e in FrameReader().feed((folder / LOG_FILE).read_bytes())]
    assert kinds.count("RoiFrame") == 1 and kinds.count("DataChunk") == len(encoder.plan)


def test_a_sender_restarted_resumes_chunks_it_plans_only_after_its_roi(prepared, tmp_path):
    """A new sender process (a new encoder, its ROI pending again) finds the receiver with
    chunks after the ROI frame: the inventory names seqs it does not plan yet; it skips them
    once its ROI frame has planned them."""
    from sender.transport import EncoderSource, TransportError, stream_study

    net = _network()
    out = tmp_path / "out"
    first, _ = pending(prepared)

    async def cut():
        async with net.Receiver(out) as service:
            with pytest.raises(TransportError):
                await stream_study(EncoderSource(first), service.url, net.TOKEN,
                                   net.quick(drop_after_chunks=7, retries=0))

    net.run(cut())
    (folder,) = net.study_folders(out)
    kept = json.loads((folder / "status.json").read_text())
    assert kept["roi_known"] and kept["chunks_applied"] > 4  # past the previews
    again, _ = pending(prepared)

    async def resume():
        async with net.Receiver(out) as service:
            return await stream_study(EncoderSource(again), service.url, net.TOKEN, net.quick())

    result = net.run(resume())
    assert result.complete and result.verified
    assert result.chunks_sent == len(again.plan) - kept["chunks_applied"]
    status = json.loads((folder / "status.json").read_text())
    assert status["duplicates"] == 1  # the ROI frame, sent again and known by its checksum


def test_the_viewer_shows_previews_and_no_outline_until_the_roi_frame(stream, tmp_path):
    import aiohttp

    from receiver.service import ReceiverService, ServiceConfig
    from receiver.viewer import LiveViewer, ViewerConfig
    from sender.transport import FileSource, TransportError, stream_study

    net = _network()
    frames, kinds, _ = stream
    path = tmp_path / "live.dlad"
    path.write_bytes(b"".join(frames))
    viewer_token = "viewer-token-0123456789abcdef"

    async def look(http, url, study):
        async with http.get(url + "/viewer/api/study", params={"study": study}) as r:
            info = await r.json()
        async with http.get(url + "/viewer/api/roi", params={"study": study}) as r:
            outline = await r.read()
        return info, outline

    async def scenario():
        service = ReceiverService(ServiceConfig(out_dir=tmp_path / "out", token=net.TOKEN))
        service.add_listener(LiveViewer(ViewerConfig(token=viewer_token)))
        await service.start("127.0.0.1", 0)
        try:
            with pytest.raises(TransportError):  # cut after the two previews
                await stream_study(FileSource(path), service.url, net.TOKEN,
                                   net.quick(drop_after_chunks=2, retries=0))
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(cookie_jar=jar) as http:
                await http.post(service.url + "/viewer/login", json={"token": viewer_token})
                before = await look(http, service.url, "pending")
                await stream_study(FileSource(path), service.url, net.TOKEN, net.quick())
                after = await look(http, service.url, "pending")
            return before, after
        finally:
            await service.stop()

    (info, outline), (info_after, outline_after) = net.run(scenario())
    assert info["roi_known"] is False and info["roi_voxels"] is None
    assert not any(info["roi_slices"]) and outline == b""
    assert info_after["roi_known"] is True and any(info_after["roi_slices"])
    assert np.unpackbits(np.frombuffer(outline_after, np.uint8)).any()


def test_dlad_receive_in_says_when_the_roi_never_came(stream, tmp_path, capsys):
    from receiver.cli import main as receive_main

    frames, kinds, _ = stream
    path = tmp_path / "cut.dlad"
    path.write_bytes(b"".join(frames[:kinds.index("RoiFrame")]))
    code = receive_main(["--in", str(path), "--out", str(tmp_path / "v.nii")])
    assert code == 3 and "ROI not received" in capsys.readouterr().out
