"""Fuzzing the chunk parser: random bytes, mutated frames and hostile chunk bodies.

Whatever arrives, ``parse_frame`` raises only :class:`WireError`, ``FrameReader`` and
``StudyStream`` never raise, every byte fed is accounted for, and a frame changed in transit is
never applied. The control-message parser of the network protocol is fuzzed the same way.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver.store import folder_name
from receiver.stream import StudyStream
from shared.webrtc.protocol import ProtocolError, parse_control
from shared.wire import (
    KIND_DATA,
    KIND_END,
    KIND_HEADER,
    MAGIC,
    PREFIX,
    DataChunk,
    FrameReader,
    WireError,
    frame,
    parse_frame,
)

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def study():
    """A tiny lossless study: header frame, data frames (by seq) and the original voxels."""
    from models.phantoms import make_phantom
    from sender.encoder import EncodeSettings, StudyEncoder
    from sender.pipeline import prepare_study
    from sender.roi.provider import StaticMaskProvider
    from shared.wire import FrameReader as Reader

    volume, liver = make_phantom((6, 32, 40), spacing=(10.0, 10.0, 4.0), seed=9)
    prepared = prepare_study(volume, StaticMaskProvider(liver))
    encoder = StudyEncoder(prepared, EncodeSettings(codec="zstd", exact=True, group_slices=2))
    frames = list(encoder.frames())
    events = Reader().feed(b"".join(frames))
    header = events[0].chunk
    data = {e.chunk.seq: frames[i] for i, e in enumerate(events) if isinstance(e.chunk, DataChunk)}
    return header, frames[0], data, volume


def feed_in_pieces(reader_or_stream, data: bytes, cuts: list[int]):
    out = []
    positions = sorted({min(c, len(data)) for c in cuts})
    start = 0
    for end in positions + [len(data)]:
        out.extend(reader_or_stream.feed(data[start:end]))
        start = end
    return out


@FUZZ
@given(st.binary(max_size=4096))
def test_parse_frame_raises_only_wire_errors(data):
    try:
        parse_frame(data)
    except WireError:
        pass


@FUZZ
@given(st.binary(max_size=4096), st.lists(st.integers(0, 4096), max_size=8))
def test_frame_reader_accounts_for_random_bytes(data, cuts):
    reader = FrameReader()
    events = feed_in_pieces(reader, data, cuts) + reader.finish()
    assert sum(event.size for event in events) == len(data)
    assert reader.pending == 0
    assert all(event.error is not None for event in events if event.chunk is None)


@FUZZ
@given(st.lists(st.sampled_from([MAGIC, MAGIC[:2], b"\x01", b"\x02", b"\xff" * 4,
                                 PREFIX.pack(MAGIC, 1, KIND_DATA, 3, bytes(16)),
                                 PREFIX.pack(MAGIC, 1, KIND_END, 1 << 31, bytes(16)),
                                 frame(KIND_END, {"study_id": "x", "chunks": 0, "bytes": 0})]),
                max_size=30),
       st.lists(st.integers(0, 2000), max_size=6))
def test_frame_reader_on_magic_soup(parts, cuts):
    """Near-frames: magics, prefixes with lying lengths, good frames in between."""
    data = b"".join(parts)
    reader = FrameReader()
    events = feed_in_pieces(reader, data, cuts) + reader.finish()
    assert sum(event.size for event in events) == len(data)


def damaged(data, original: bytes, ways: list[str], others: list[bytes] | tuple = ()) -> bytes:
    """``original`` damaged in one of ``ways``, drawn by Hypothesis: ``"flip"`` 1-4 bytes,
    ``"truncate"`` its tail, ``"insert"`` up to 64 bytes, ``"delete"`` up to 32, or
    ``"splice"`` the tail of one of ``others`` behind its prefix."""
    mutated = bytearray(original)
    how = data.draw(st.sampled_from(ways))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(mutated) - 1))
            mutated[at] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        del mutated[data.draw(st.integers(1, len(mutated) - 1)):]
    elif how == "insert":
        at = data.draw(st.integers(1, len(mutated) - 1))
        mutated[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    elif how == "delete":
        at = data.draw(st.integers(0, len(mutated) - 2))
        del mutated[at:at + data.draw(st.integers(1, 32))]
    else:  # another frame's tail behind this frame's prefix
        other = data.draw(st.sampled_from(others))
        mutated = bytearray(original[:PREFIX.size]) + other[PREFIX.size:]
    return bytes(mutated)


@FUZZ
@given(st.data())
def test_mutated_frames_are_never_applied(study, data):
    header, header_frame, frames, volume = study
    seq = data.draw(st.sampled_from(sorted(frames)))
    original = frames[seq]
    mutated = damaged(data, original, ["flip", "truncate", "insert", "delete", "splice"],
                      others=list(frames.values()))
    if mutated == original:
        return
    stream = StudyStream()
    applied = feed_in_pieces(stream, header_frame + mutated,
                             data.draw(st.lists(st.integers(0, len(mutated)), max_size=4)))
    applied += stream.finish()
    # A damaged frame is rejected (its checksum covers everything but the prefix, and the
    # prefix is checked too); at most an intact frame hidden inside another could be applied.
    for chunk in applied:
        assert chunk.to_frame() in frames.values()
    assert all(chunk.to_frame() != original or original in mutated for chunk in applied)
    status = stream.status()
    assert status["chunks_applied"] == len(applied)


chunk_values = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 40, 2 ** 40),
                         st.floats(allow_nan=True), st.text(max_size=20),
                         st.binary(max_size=200), st.lists(st.integers(), max_size=4),
                         st.dictionaries(st.text(max_size=8), st.integers(), max_size=3))


@FUZZ
@given(st.data())
def test_hostile_chunk_bodies_never_raise(study, data):
    """Well-formed frames (good checksum) whose fields are anything at all."""
    header, header_frame, frames, volume = study
    base = msgpack.unpackb(frames[data.draw(st.sampled_from(sorted(frames)))][PREFIX.size:],
                           raw=False)
    body = dict(base)
    for name in data.draw(st.lists(st.sampled_from(sorted(base)), max_size=4, unique=True)):
        if data.draw(st.booleans()):
            body[name] = data.draw(chunk_values)
        else:
            del body[name]
    for name in ("seq", "z0", "z1", "layer"):
        if data.draw(st.integers(0, 5)) == 0:
            body[name] = data.draw(st.integers(-5, 40))
    kind = data.draw(st.sampled_from([KIND_DATA, KIND_DATA, KIND_END, KIND_HEADER]))
    stream = StudyStream()
    stream.feed(header_frame)
    try:
        hostile = frame(kind, body)
    except (WireError, TypeError, ValueError, OverflowError):
        return
    applied = stream.feed(hostile) + stream.finish()
    for chunk in applied:  # only a chunk that is a real chunk of the study can apply
        assert (chunk.seq, chunk.layer, chunk.z0, chunk.z1) in {tuple(e) for e in header.plan}
    stream.status()


@FUZZ
@given(st.data())
def test_hostile_headers_never_raise(study, data):
    header, header_frame, frames, volume = study
    body = msgpack.unpackb(header_frame[PREFIX.size:], raw=False)
    for name in data.draw(st.lists(st.sampled_from(sorted(body)), max_size=3, unique=True)):
        body[name] = data.draw(chunk_values)
    try:
        hostile = frame(KIND_HEADER, body)
    except (WireError, TypeError, ValueError, OverflowError):
        return
    stream = StudyStream()
    stream.feed(hostile)
    stream.feed(b"".join(frames.values()))
    stream.finish()
    stream.status()
    if stream.reassembler is not None and stream.reassembler.exact_complete:
        # Whatever was accepted as a header, "verified" means the voxels match its SHA-256.
        assert stream.reassembler.verified == (
            stream.header.sha256 == header.sha256
            and np.array_equal(stream.reassembler.volume, volume.data))


@FUZZ
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300),
                 st.dictionaries(st.text(max_size=6), chunk_values, max_size=4).map(
                     lambda d: __import__("json").dumps(d, default=str))))
def test_control_parser_raises_only_protocol_errors(message):
    try:
        parsed = parse_control(message)
    except ProtocolError:
        return
    assert isinstance(parsed, dict) and isinstance(parsed["type"], str)


@FUZZ
@given(st.text(min_size=1, max_size=128))
def test_folder_names_are_safe(study_id):
    name = folder_name(study_id)
    assert name not in (".", "..") and "/" not in name and "\\" not in name and "\x00" not in name
    assert not name.startswith((".", "-")) and 0 < len(name) <= 73
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
    if name != study_id:  # a changed id carries a hash of the raw id: no meeting by sanitising
        assert name.rsplit("-", 1)[1] == __import__("hashlib").blake2b(
            study_id.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()


def test_folder_names_of_ids_that_sanitise_alike_differ():
    names = {folder_name(i) for i in ("a/b", "a_b", "a b", "a\\b", ".a_b", "a_b-0")}
    assert len(names) == 6 and "a_b" in names


# --- the ROI frame (a header that announced the ROI as pending) ----------------------------------

def _with_roi_frame(frames: list[bytes], at: int, roi_frame: bytes):
    """The receiver's status and reassembler after the stream ``frames`` with its ROI frame
    (``frames[at]``) replaced by ``roi_frame``."""
    stream = StudyStream()
    stream.feed(b"".join(frames[:at]) + roi_frame + b"".join(frames[at + 1:]))
    stream.finish()
    return stream.status(), stream.reassembler


@pytest.fixture(scope="module")
def pending_study():
    """A tiny live-style stream: a header with the ROI pending, one preview, the ROI frame, the
    rest; the frames, the ROI frame's index and the original voxels."""
    from concurrent.futures import Future
    from dataclasses import replace

    from models.phantoms import make_phantom
    from sender.encoder import EncodeSettings, StudyEncoder
    from sender.pipeline import prepare_study
    from sender.roi.provider import StaticMaskProvider

    volume, liver = make_phantom((6, 32, 40), spacing=(10.0, 10.0, 4.0), seed=9)
    prepared = prepare_study(volume, StaticMaskProvider(liver))
    future: Future = Future()
    study = replace(prepared, roi=None, diffused=None,
                    provenance={k: v for k, v in prepared.provenance.items() if k != "roi"})
    encoder = StudyEncoder(study, EncodeSettings(exact=True, group_slices=2, preset="fast"),
                           roi=future)
    chunks = encoder.chunks()
    frames = [encoder.header.to_frame(), next(chunks).to_frame()]
    future.set_result(prepared)
    frames += [chunk.to_frame() for chunk in chunks]
    return frames, 2, volume


@FUZZ
@given(st.data())
def test_mutated_roi_frames_are_never_used(pending_study, data):
    frames, at, volume = pending_study
    original = frames[at]
    mutated = damaged(data, original, ["flip", "truncate", "insert"])
    if mutated == original:
        return
    status, r = _with_roi_frame(frames, at, mutated)
    if r.roi_known:  # only the frame as sent, hidden intact in the bytes, can be taken
        assert r.header.roi_frame.to_frame() == original and original in bytes(mutated)
    else:
        assert status["roi_complete"] is False and status["chunks_applied"] <= 3
        assert all(r.plan[seq][0] == 0 for seq in r.applied)


roi_values = st.one_of(chunk_values, st.lists(st.lists(st.integers(-3, 8), max_size=4),
                                              max_size=6))


@FUZZ
@given(st.data())
def test_hostile_roi_frame_bodies_never_raise(pending_study, data):
    """Well-formed ROI frames (good checksum) whose fields are anything at all: the stream never
    raises, and whatever it accepts, "verified" still means the voxels match the SHA-256."""
    from shared.wire import KIND_ROI

    frames, at, volume = pending_study
    body = msgpack.unpackb(frames[at][PREFIX.size:], raw=False)
    for name in data.draw(st.lists(st.sampled_from(sorted(body)), max_size=3, unique=True)):
        if data.draw(st.booleans()):
            body[name] = data.draw(roi_values)
        else:
            del body[name]
    try:
        hostile = frame(KIND_ROI, body)
    except (WireError, TypeError, ValueError, OverflowError):
        return
    status, r = _with_roi_frame(frames, at, hostile)
    if not r.roi_known:
        assert status["roi_complete"] is False and r.progress().roi_fraction == 0.0
    if r.verified:
        assert np.array_equal(r.volume, volume.data)
