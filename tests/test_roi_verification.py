"""End-to-end ROI verification: nothing is called exact that is not, whatever a peer sends.

Tampered chunks here have valid checksums (re-framed after the change), as a faulty decoder, a
different codec build or an authenticated but hostile peer would produce them. After every
stream, every slice the receiver reports ROI-exact is compared with the original bit for bit,
and every tampering that changed ROI voxels must have been detected (reported, its block
dropped and not claimed). File mode: exit 3 with the reason. Live: the sender resends the
dropped chunks and the study ends verified; a chunk that stays wrong is resent a bounded number
of times and never claimed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from receiver import cli as receiver_cli
from receiver.stream import StudyStream
from sender.encoder import EncodeSettings, PreparedStudy, StudyEncoder
from sender.transport import FileSource, FrameSource, TransportError, stream_study
from shared.codecs import get_codec
from shared.layers import block_digest, clip_base, roi_digest
from shared.volume import Volume
from shared.wire import DataChunk, StreamHeader, WireError, parse_frame
from tests.test_streaming import TOKEN, Receiver, quick, retitle

RESIDUAL_TRIALS = 60
BASE_TRIALS = 20


def make_study(seed: int = 7, shape=(8, 64, 80)) -> PreparedStudy:
    rng = np.random.default_rng(seed)
    data = rng.normal(60, 40, shape).round().astype(np.int16)
    data[:, :3] = -1024
    roi = np.zeros(shape, bool)
    roi[1:7, 12:50, 16:64] = True
    diffused = np.where(roi, data, (data // 8) * 8).astype(np.int16)
    volume = Volume(data=data, affine=np.diag([-0.8, -0.8, 2.0, 1.0]), spacing=(0.8, 0.8, 2.0))
    return PreparedStudy(volume=volume, roi=roi, diffused=diffused, study_id="tamper")


@pytest.fixture(scope="module")
def layered():
    study = make_study()
    # Residuals against lossy bases: what a tampered base could spoil (ROI voxels need no base).
    encoder = StudyEncoder(study, EncodeSettings(exact=True, group_slices=2, preset="fast",
                                                 roi_layer="residual"))
    return study, list(encoder.frames())


@pytest.fixture(scope="module")
def lossless():
    study = make_study(seed=8)
    encoder = StudyEncoder(study, EncodeSettings(codec="zstd", exact=True, group_slices=2))
    return study, list(encoder.frames())


def flip_bits(block: np.ndarray, region: np.ndarray, rng) -> None:
    """Flip one random bit in 1-3 random voxels of ``region``, in place."""
    flat = block.reshape(-1)
    picks = rng.choice(np.flatnonzero(region.reshape(-1)), size=int(rng.integers(1, 4)),
                       replace=False)
    for pick in picks:
        flat[pick] ^= np.int16(1 << int(rng.integers(0, 15)))


def box_of(header: StreamHeader, chunk: DataChunk) -> tuple[slice, slice]:
    """The rows and columns a chunk covers (a ROI chunk: its ``box``)."""
    y0, y1, x0, x1 = chunk.params.get("box", [0, header.shape[1], 0, header.shape[2]])
    return slice(y0, y1), slice(x0, x1)


def block_of(header: StreamHeader, chunk: DataChunk) -> tuple:
    rows, columns = box_of(header, chunk)
    return (chunk.z1 - chunk.z0, rows.stop - rows.start, columns.stop - columns.start)


def tamper_residual(chunk: DataChunk, header: StreamHeader, rng) -> DataChunk:
    """The same residual chunk with a few bits flipped inside its region, re-encoded."""
    codec = get_codec(chunk.codec)
    block = codec.decode(chunk.payload, block_of(header, chunk), chunk.params)
    rows, columns = box_of(header, chunk)
    roi = header.roi_slices(chunk.z0, chunk.z1)[:, rows, columns]
    flip_bits(block, roi if chunk.layer == 1 else ~roi, rng)
    payload, params = codec.encode(block)
    return DataChunk(chunk.study_id, chunk.seq, chunk.layer, chunk.z0, chunk.z1, chunk.codec,
                     {**chunk.params, **params}, payload)


def tamper_base(chunk: DataChunk, header: StreamHeader, rng) -> tuple[DataChunk, np.ndarray]:
    """The same base chunk with ROI voxels changed and re-encoded; also its decoded block as
    the receiver will see it."""
    codec = get_codec(chunk.codec)
    shape = block_of(header, chunk)
    block = codec.decode(chunk.payload, shape, chunk.params)
    flip_bits(block, header.roi_slices(chunk.z0, chunk.z1), rng)
    if codec.lossless:
        payload, params = codec.encode(block)
    else:  # re-encode through the same lossy codec, at its best quality
        codec = get_codec(chunk.codec, crf=0, preset="fast")
        payload, params = codec.encode(block)
    decoded = codec.decode(payload, shape, params)
    if not codec.lossless:
        clip_base(decoded, header.value_range)
    return DataChunk(chunk.study_id, chunk.seq, 0, chunk.z0, chunk.z1, chunk.codec,
                     {**chunk.params, **params}, payload), decoded


def receive(frames) -> StudyStream:
    stream = StudyStream()
    for data in frames:
        stream.feed(data)
    stream.finish()
    return stream


def assert_claims_true(stream: StudyStream, original: np.ndarray) -> None:
    """Every slice reported ROI-exact is bit-exact in the ROI; an SHA-256 claim is true."""
    r = stream.reassembler
    roi = r.header.roi
    for z in np.flatnonzero(r.roi_exact_slices):
        np.testing.assert_array_equal(r.volume[z][roi[z]], original[z][roi[z]])
    if r.verified:
        np.testing.assert_array_equal(r.volume, original)
    if r.roi_complete:
        np.testing.assert_array_equal(r.volume[roi], original[roi])


def test_header_carries_a_digest_per_roi_block(layered):
    study, frames = layered
    header = parse_frame(frames[0])
    roi, original = study.roi, study.volume.data
    blocks = [(z0, z1) for z0, z1, _ in header.roi_digests]
    assert blocks == [(0, 2), (2, 4), (4, 6), (6, 8)]
    for z0, z1, digest in header.roi_digests:
        assert digest == roi_digest(original[z0:z1], roi[z0:z1], z0)
    clean = receive(frames)
    assert clean.reassembler.roi_complete and clean.reassembler.verified is True
    assert clean.status()["roi_verified_slices"] == 8 and clean.status()["roi_mismatches"] == 0


@pytest.mark.parametrize("fixture", ["layered", "lossless"])
def test_tampered_residuals_are_always_caught(request, fixture):
    study, frames = request.getfixturevalue(fixture)
    header = parse_frame(frames[0])
    original = study.volume.data
    layer = 1 if 1 in header.layers else 2
    targets = [i for i, data in enumerate(frames[1:-1], start=1)
               if parse_frame(data).layer == layer]
    rng = np.random.default_rng(11)
    detected = 0
    trials = RESIDUAL_TRIALS if fixture == "layered" else RESIDUAL_TRIALS // 3
    for _ in range(trials):
        index = int(rng.choice(targets))
        chunk = parse_frame(frames[index])
        bad = tamper_residual(chunk, header, rng)
        stream = receive(frames[:index] + [bad.to_frame()] + frames[index + 1:])
        assert_claims_true(stream, original)
        r = stream.reassembler
        if layer == 1:  # dropped, said, and no slice of the block with ROI voxels claimed
            assert not r.complete and chunk.seq in {seq for seq, *_ in r.missing()}
            assert stream.problems
            with_roi = study.roi[chunk.z0:chunk.z1].any(axis=(1, 2))
            assert not r.roi_exact_slices[chunk.z0:chunk.z1][with_roi].any()
            assert not r.roi_complete
        else:  # outside the ROI: the range check rejects it, or the volume's SHA-256 fails
            assert r.verified is False or chunk.seq in {seq for seq, *_ in r.missing()}
            assert not r.exact_complete and not r.exact_slices.any()
            assert r.roi_complete  # the ROI itself (lossless base) is proven and right
        detected += 1
    assert detected == trials


@pytest.mark.parametrize("fix_base_digest", [False, True])
def test_tampered_lossy_bases_are_dropped(layered, fix_base_digest):
    study, frames = layered
    header = parse_frame(frames[0])
    original, roi = study.volume.data, study.roi
    chunks = {i: parse_frame(data) for i, data in enumerate(frames[1:-1], start=1)}
    bases = [i for i, c in chunks.items() if c.layer == 0 and roi[c.z0:c.z1].any()]
    rng = np.random.default_rng(21 + fix_base_digest)
    for _ in range(BASE_TRIALS // 2):
        index = int(rng.choice(bases))
        base = chunks[index]
        bad, decoded = tamper_base(base, header, rng)
        changed = frames[:index] + [bad.to_frame()] + frames[index + 1:]
        if fix_base_digest:  # a consistent forgery: the residual names the forged base
            for i, chunk in chunks.items():
                if chunk.layer in (1, 2) and (chunk.z0, chunk.z1) == (base.z0, base.z1):
                    chunk = DataChunk(**{**vars(chunk), "params": {
                        **chunk.params, "base_digest": block_digest(decoded)}})
                    changed[i] = chunk.to_frame()
        stream = receive(changed)
        assert_claims_true(stream, original)
        r = stream.reassembler
        genuine = clip_base(get_codec(base.codec).decode(base.payload, decoded.shape,
                                                         base.params), header.value_range)
        region = roi[base.z0:base.z1]
        assert not np.array_equal(decoded[region], genuine[region])  # the forgery is effective
        assert stream.problems
        assert base.seq in {seq for seq, *_ in r.missing()}  # the base is dropped, not kept
        assert not (r.slice_layers()[base.z0:base.z1] & 1).any()
        assert not r.roi_exact_slices[base.z0:base.z1].any() and not r.roi_complete


def test_tampered_lossless_base_is_caught(lossless):
    study, frames = lossless
    header = parse_frame(frames[0])
    original, roi = study.volume.data, study.roi
    rng = np.random.default_rng(31)
    chunks = {i: parse_frame(data) for i, data in enumerate(frames[1:-1], start=1)}
    bases = [i for i, c in chunks.items() if c.layer == 0 and roi[c.z0:c.z1].any()]
    for _ in range(BASE_TRIALS):
        index = int(rng.choice(bases))
        bad, _ = tamper_base(chunks[index], header, rng)
        stream = receive(frames[:index] + [bad.to_frame()] + frames[index + 1:])
        assert_claims_true(stream, original)
        r = stream.reassembler
        assert chunks[index].seq in {seq for seq, *_ in r.missing()} and stream.problems
        assert not r.roi_exact_slices[bad.z0:bad.z1].any() and not r.roi_complete


def test_file_mode_exits_partial_with_the_reason(layered, tmp_path, capsys):
    study, frames = layered
    header = parse_frame(frames[0])
    index = next(i for i, d in enumerate(frames[1:-1], 1) if parse_frame(d).layer == 1)
    bad = tamper_residual(parse_frame(frames[index]), header, np.random.default_rng(3))
    path = tmp_path / "tampered.dlad"
    path.write_bytes(b"".join(frames[:index] + [bad.to_frame()] + frames[index + 1:]))
    code = receiver_cli.main(["--in", str(path), "--out", str(tmp_path / "out.nii"),
                              "--status", str(tmp_path / "status.json")])
    assert code == 3
    out = capsys.readouterr()
    assert "ROI exact (verified against the sender's digests): no" in out.out
    assert "MISMATCH" in out.out or "outside the header's range" in out.out
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["roi_complete"] is False and status["state"] == "partial"
    assert status["exact_slices"] == 0 and status["verified_sha256"] is None


def test_a_stream_without_digests_never_claims_the_roi(layered):
    study, frames = layered
    header = parse_frame(frames[0])
    header.roi_digests = []
    stream = receive([header.to_frame()] + frames[1:])
    r = stream.reassembler
    assert not r.roi_verified.any() and not r.roi_complete
    assert r.verified is True  # the whole volume is still proven by its SHA-256
    assert "not verifiable" in receiver_cli.summary(stream.status(), "x.nii")


def test_file_mode_exits_0_only_for_what_is_proven(tmp_path, capsys):
    """A complete stream whose ROI nothing proves (no ROI digests, no exact layer) is not a
    success: its residuals may be anything (here one is tampered) and nothing would tell."""
    study = make_study(seed=9)
    frames = list(StudyEncoder(study, EncodeSettings(group_slices=2, preset="fast")).frames())
    header = parse_frame(frames[0])
    header.roi_digests = []
    index = next(i for i, d in enumerate(frames[1:-1], 1) if parse_frame(d).layer == 1)
    chunk = parse_frame(frames[index])
    codec = get_codec(chunk.codec)
    block = codec.decode(chunk.payload, block_of(header, chunk), chunk.params)
    rows, columns = box_of(header, chunk)
    block[header.roi_slices(chunk.z0, chunk.z1)[:, rows, columns]] ^= 1  # every ROI voxel 1 HU off
    payload, params = codec.encode(block)
    bad = DataChunk(**{**vars(chunk), "params": {**chunk.params, **params}, "payload": payload})
    path = tmp_path / "unproven.dlad"
    path.write_bytes(b"".join([header.to_frame()] + frames[1:index] + [bad.to_frame()]
                              + frames[index + 1:]))
    code = receiver_cli.main(["--in", str(path), "--out", str(tmp_path / "out.nii"),
                              "--status", str(tmp_path / "status.json")])
    assert code == 3
    assert "not verifiable" in capsys.readouterr().out
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "complete" and status["roi_complete"] is False


@pytest.mark.parametrize("dtype,rescale,value_range", [
    ("uint8", (1.0, 0.0), (-1024, 3000)),
    ("uint16", (1.0, 0.0), (-1024, 3000)),
    ("int16", (2.0, 0.0), (-1024, 3000)),
    ("int16", (1.0, 0.5), (-1024, 3000)),
    # an intercept the NIfTI header (float32 scl_inter) cannot hold: every voxel 32 HU off
    ("int32", (1.0, 2147479648.0), (-1024, 3000)),
    ("int64", (1.0, 1e15), (-1024, 3000)),  # the writer's arithmetic overflowed (a traceback)
])
def test_headers_whose_output_cannot_hold_the_voxels_are_refused(layered, dtype, rescale,
                                                                  value_range):
    header = parse_frame(layered[1][0])
    header.source_dtype, header.rescale, header.value_range = dtype, rescale, value_range
    with pytest.raises(WireError, match="the output cannot hold the voxels"):
        parse_frame(header.to_frame())


def test_the_nifti_writer_never_clips_or_rounds(tmp_path):
    from shared.nifti import write_nifti
    from shared.volume import VolumeError

    data = np.array([[[-1023, 301]]], dtype=np.int16)  # odd: off the lattice of slope 2
    for dtype, slope, intercept in (("uint8", 1.0, 0.0), ("int16", 2.0, 0.0)):
        volume = Volume(data=data.copy(), affine=np.eye(4), spacing=(1, 1, 1),
                        source_dtype=dtype, rescale_slope=slope, rescale_intercept=intercept)
        with pytest.raises(VolumeError, match="cannot be stored exactly"):
            write_nifti(volume, tmp_path / "x.nii")
        assert not (tmp_path / "x.nii").exists()


def test_sender_stores_int16_hu_when_the_source_rescale_cannot_hold_lossy_voxels(caplog):
    study = make_study()
    study.volume.source_dtype, study.volume.rescale_slope = "int16", 2.0
    encoder = StudyEncoder(study, EncodeSettings(group_slices=2, preset="fast"))
    assert (encoder.header.source_dtype, encoder.header.rescale) == ("int16", (1.0, 0.0))
    assert "int16 HU" in caplog.text
    parse_frame(encoder.header.to_frame())  # the receiver accepts it


# --- live ----------------------------------------------------------------------------------------

class TamperingSource(FrameSource):
    """Frames of a .dlad file, with chosen chunks tampered the first ``times`` they are sent."""

    def __init__(self, path, tamper: dict, times: int = 1):
        self.inner = FileSource(path)
        self.header, self.header_frame = self.inner.header, self.inner.header_frame
        self.order = self.inner.order
        self.tamper = tamper
        self.left = dict.fromkeys(tamper, times)
        self.sent: dict[int, int] = {}

    def frame(self, seq: int) -> bytes:
        self.sent[seq] = self.sent.get(seq, 0) + 1
        if self.left.get(seq, 0) > 0:
            self.left[seq] -= 1
            return self.tamper[seq]
        return self.inner.frame(seq)


def run(coroutine, timeout: float = 240.0):
    import asyncio

    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def test_live_tampering_is_resent_and_ends_verified(layered, tmp_path):
    study, frames = layered
    original = study.volume.data
    rng = np.random.default_rng(41)
    trials = 6
    cases = []
    for trial in range(trials):
        path = tmp_path / f"trial{trial}.dlad"
        source = tmp_path / "source.dlad"
        source.write_bytes(b"".join(frames))
        retitle(source, path, f"live-tamper-{trial}")
        trial_frames = FileSource(path)
        header = trial_frames.header
        seqs = [seq for seq, layer, z0, z1 in header.plan
                if layer in (0, 1) and study.roi[z0:z1].any()]
        seq = int(rng.choice(seqs))
        chunk = parse_frame(trial_frames.frame(seq))
        bad = (tamper_residual(chunk, header, rng) if chunk.layer == 1
               else tamper_base(chunk, header, rng)[0])
        cases.append((TamperingSource(path, {seq: bad.to_frame()}), seq))

    async def scenario():
        async with Receiver(tmp_path / "out") as service:
            results = []
            for source, _ in cases:
                results.append(await stream_study(source, service.url, TOKEN, quick()))
            return results

    results = run(scenario())
    for (source, seq), result in zip(cases, results):
        assert result.complete and result.verified is True
        assert source.sent[seq] == 2  # sent, found wrong, resent
        folder = tmp_path / "out" / result.folder
        status = json.loads((folder / "status.json").read_text())
        assert status["roi_complete"] and status["problems"]
        from shared.nifti import read_nifti
        snapshot = read_nifti(folder / status["snapshot"]["file"])
        np.testing.assert_array_equal(snapshot.data, original)


def test_live_chunk_that_stays_wrong_is_never_claimed(layered, tmp_path):
    study, frames = layered
    source_path = tmp_path / "source.dlad"
    source_path.write_bytes(b"".join(frames))
    header = parse_frame(frames[0])
    index = next(i for i, d in enumerate(frames[1:-1], 1) if parse_frame(d).layer == 1)
    chunk = parse_frame(frames[index])
    bad = tamper_residual(chunk, header, np.random.default_rng(5))
    source = TamperingSource(source_path, {chunk.seq: bad.to_frame()}, times=1000)

    async def scenario():
        async with Receiver(tmp_path / "out") as service:
            with pytest.raises(TransportError, match="still lacks chunks after 3 passes"):
                await stream_study(source, service.url, TOKEN, quick())

    run(scenario())
    assert source.sent[chunk.seq] == 3  # bounded: once per pass
    folder = next(p for p in (tmp_path / "out").iterdir() if p.is_dir()
                  and not p.name.startswith("."))
    status = json.loads((folder / "status.json").read_text())
    assert status["roi_complete"] is False and len(status["problems"]) == 3  # one per pass
    layers = status["slice_layers"]
    assert all(layers[z] & 8 == 0 for z in range(chunk.z0, chunk.z1))


def test_residual_waiting_for_a_tampered_base(layered):
    """Residuals that arrive before their (tampered) base: both are dropped, never claimed."""
    study, frames = layered
    header = parse_frame(frames[0])
    chunks = [parse_frame(data) for data in frames[1:-1]]
    base = next(c for c in chunks if c.layer == 0 and study.roi[c.z0:c.z1].any())
    bad, _ = tamper_base(base, header, np.random.default_rng(9))
    same_block = [c for c in chunks if (c.z0, c.z1) == (base.z0, base.z1) and c.layer > 0]
    others = [c for c in chunks if (c.z0, c.z1) != (base.z0, base.z1)]
    order = [c.to_frame() for c in same_block] + [bad.to_frame()] + [c.to_frame() for c in others]
    stream = receive([frames[0]] + order + frames[-1:])
    assert_claims_true(stream, study.volume.data)
    r = stream.reassembler
    missing = {seq for seq, *_ in r.missing()}
    assert base.seq in missing and all(c.seq in missing for c in same_block)
    assert not (r.slice_layers()[base.z0:base.z1] & 1).any() and stream.problems


def plus_one_roi_residuals(header: StreamHeader, chunks: list) -> list[DataChunk]:
    """Add layer 1 to a lossless-base header and its plan, one residual per base that adds
    1 HU to every ROI voxel (computed against the base received: its base_digest matches)."""
    header.layers[1] = {"codec": "zstd", "codecs": ["zstd"], "lossless": True, "region": "roi"}
    seq = max(entry[0] for entry in header.plan) + 1
    codec, added = get_codec("zstd"), []
    for chunk in chunks:
        if chunk.layer != 0:
            continue
        base = codec.decode(chunk.payload, block_of(header, chunk), chunk.params)
        plus_one = np.where(header.roi_slices(chunk.z0, chunk.z1), 1, 0).astype(np.int16)
        payload, params = codec.encode(plus_one)
        header.plan.append((seq, 1, chunk.z0, chunk.z1))
        added.append(DataChunk(chunk.study_id, seq, 1, chunk.z0, chunk.z1, "zstd",
                               {**params, "base_digest": block_digest(base)}, payload))
        seq += 1
    return added


def test_a_residual_over_a_verified_lossless_base_is_checked_again(lossless):
    """A lossless base proves its ROI (and, with the rest, the volume) by itself; an ROI
    residual added to the plan and applied afterwards changes those voxels: the claims made
    before it must be checked again, never kept."""
    study, frames = lossless
    header = parse_frame(frames[0])
    added = plus_one_roi_residuals(header, [parse_frame(data) for data in frames[1:-1]])
    stream = receive([header.to_frame()] + frames[1:-1] + [c.to_frame() for c in added])
    assert_claims_true(stream, study.volume.data)
    r = stream.reassembler
    assert not r.roi_complete and r.verified is not True and r.roi_mismatches > 0


def test_the_exact_state_of_viewer_and_dicom_export_follows_later_changes():
    """receiver.slices.volume_verified proves a lossless-base study (no diffusion, no exact
    layer) by its SHA-256; a chunk applied after that check makes it stale, not still true."""
    from receiver.slices import EXACT, slice_states, volume_verified

    plain = make_study(seed=8)
    study = PreparedStudy(volume=plain.volume, roi=plain.roi, diffused=plain.volume.data.copy(),
                          study_id="undiffused")
    frames = list(StudyEncoder(study, EncodeSettings(codec="zstd", group_slices=2)).frames())
    header = parse_frame(frames[0])
    header.roi_digests = []  # nothing but the SHA-256 could tell
    added = plus_one_roi_residuals(header, [parse_frame(data) for data in frames[1:-1]])
    stream = StudyStream()
    stream.feed(header.to_frame() + b"".join(frames[1:-1]))
    r = stream.reassembler
    assert volume_verified(r) and (slice_states(r) == EXACT).all()  # the bases: all exact
    stream.feed(b"".join(chunk.to_frame() for chunk in added))
    assert not np.array_equal(r.volume, study.volume.data)
    assert not volume_verified(r) and not (slice_states(r) == EXACT).any()
