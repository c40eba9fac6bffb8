"""Layered coding and reassembly on small synthetic volumes: exactness, order, prefixes, rejects."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from receiver.reassembly import HAS_BASE, ChunkRejected, Reassembler
from receiver.stream import StudyStream
from sender.encoder import EncodeSettings, PreparedStudy, StudyEncoder
from sender.scheduler import plan_chunks
from shared.volume import Volume
from shared.wire import DataChunk, parse_frame


def prepared_study(rng, shape=(6, 20, 24), extremes=True) -> PreparedStudy:
    data = rng.normal(40, 30, shape).round().astype(np.int16)
    data[:, :4] = -1024
    if extremes:
        data[1, 0, 0], data[4, 3, 5], data[2, 10, 10] = -32768, 32767, 30000
    roi = np.zeros(shape, bool)
    roi[1:4, 5:15, 6:18] = True
    if extremes:
        roi[2, 10, 10] = True
    diffused = np.where(roi, data, (data // 4) * 4).astype(np.int16)  # a stand-in "diffusion"
    volume = Volume(data=data, affine=np.diag([-0.8, -0.8, 2.0, 1.0]), spacing=(0.8, 0.8, 2.0))
    return PreparedStudy(volume=volume, roi=roi, diffused=diffused, study_id="unit")


def decode(frames) -> StudyStream:
    stream = StudyStream()
    for frame in frames:
        stream.feed(frame)
    stream.finish()
    return stream


@pytest.mark.parametrize("settings", [
    EncodeSettings(exact=True, group_slices=2),
    EncodeSettings(exact=True, group_slices=4, qp=40),
    EncodeSettings(codec="zstd", exact=True, group_slices=3),
    EncodeSettings(codec="hevc-lossless", exact=True, group_slices=1)])
def test_roi_exact_after_layers_0_1_and_all_exact_after_layer_2(rng, settings):
    study = prepared_study(rng)
    encoder = StudyEncoder(study, settings)
    frames = list(encoder.frames())
    original = study.volume.data
    layer_of = {seq: layer for seq, layer, _, _ in encoder.header.plan}
    first_exact_chunk = 1 + min(s for s, layer in layer_of.items() if layer == 2)
    partial = decode(frames[:first_exact_chunk])
    assert partial.reassembler.roi_complete and partial.reassembler.base_complete
    np.testing.assert_array_equal(partial.reassembler.volume[study.roi], original[study.roi])
    complete = decode(frames)
    assert complete.reassembler.verified is True and not complete.problems
    np.testing.assert_array_equal(complete.reassembler.volume, original)


def test_every_prefix_decodes_and_roi_comes_first(rng):
    study = prepared_study(rng, shape=(9, 20, 20))
    frames = list(StudyEncoder(study, EncodeSettings(group_slices=1, exact=True)).frames())
    layers = [parse_frame(frame).layer for frame in frames[1:-1]]
    roi_done = 1 + max(i for i, layer in enumerate(layers) if layer == 1)  # chunks up to the ROI's last
    assert all(layer < 2 for layer in layers[:roi_done])  # the exact layer comes after the ROI
    for cut in range(1, len(frames) + 1):
        stream = decode(frames[:cut])
        assert stream.reassembler is not None and not stream.problems
        if cut - 1 >= roi_done:
            assert stream.reassembler.roi_complete


def test_plan_orders_bases_roi_first_then_outwards_then_roi_then_layer_2():
    roi = np.zeros((10, 4, 4), bool)
    roi[5, :2] = True  # 8 voxels
    roi[6] = True  # 16 voxels
    plan = [(c.layer, c.z0) for c in plan_chunks(roi, 1, (0, 1, 2))]
    assert plan[:10] == [(0, 6), (0, 5), (0, 4), (0, 7), (0, 3), (0, 8), (0, 2), (0, 9), (0, 1),
                         (0, 0)]
    assert plan[10:12] == [(1, 6), (1, 5)]
    assert all(layer == 2 for layer, _ in plan[12:]) and (2, 6) not in plan  # slice 6 all ROI


def base_and_residual(chunks):
    """The first base sent and the ROI residual of its block."""
    base = next(c for c in chunks if c.layer == 0)
    return base, next(c for c in chunks if c.layer == 1 and (c.z0, c.z1) == (base.z0, base.z1))


def _sent(frames):
    return [parse_frame(frame) for frame in list(frames)[1:-1]]


def test_the_whole_volume_is_viewable_before_the_roi_when_that_costs_the_roi_little(rng):
    study = prepared_study(rng, shape=(12, 64, 64), extremes=False)
    study.volume.data[:4] = study.diffused[:4] = -1000  # air: previews cost next to nothing
    study.volume.data[8:] = study.diffused[8:] = 40
    study.roi[:] = False
    study.roi[4:8] = True
    study.diffused = np.where(study.roi, study.volume.data, study.diffused)
    # --exact: the plain blocks' bases are cheap previews and all go before the ROI residual.
    chunks = _sent(StudyEncoder(study, EncodeSettings(exact=True, group_slices=2)).frames())
    first_roi = next(i for i, c in enumerate(chunks) if c.layer == 1)
    assert {c.layer for c in chunks[:first_roi]} == {0} and first_roi == 6
    previews = [c for c in chunks if c.layer == 0 and not study.roi[c.z0:c.z1].any()]
    assert previews and all(c.params["quality"]["preview"] for c in previews)
    # They leave before the ROI layer is chosen (its lossless codings would keep a live
    # transfer's whole-volume view waiting), in the same order.
    encoder = StudyEncoder(study, EncodeSettings(exact=True, group_slices=2))
    live = encoder.chunks()
    early = [next(live) for _ in range(6)]
    assert encoder._roi_reference is None and [c.seq for c in early] == [c.seq for c in chunks[:6]]
    assert [c.seq for c in early + list(live)] == [c.seq for c in chunks]
    # Lossless bases of plain blocks would cost the ROI more than PREVIEW_SHARE: after it.
    chunks = _sent(StudyEncoder(study, EncodeSettings(codec="zstd", group_slices=2)).frames())
    roi_blocks = {(c.z0, c.z1) for c in chunks if study.roi[c.z0:c.z1].any()}
    assert {(c.z0, c.z1) for c in chunks[:len(roi_blocks)]} == roi_blocks == {(4, 6), (6, 8)}
    noisy = prepared_study(rng, shape=(12, 64, 64), extremes=False)
    noisy.roi[:] = False
    noisy.roi[4:8, 20:40, 20:40] = True
    noisy.diffused = np.where(noisy.roi, noisy.volume.data, noisy.diffused)
    chunks = _sent(StudyEncoder(noisy, EncodeSettings(codec="zstd", group_slices=2)).frames())
    assert [(c.z0, c.z1) for c in chunks[:2]] in ([(4, 6), (6, 8)], [(6, 8), (4, 6)])
    assert len(chunks) == 6  # and the other four after them


def test_the_transport_sends_in_the_encoders_order_live_and_replayed(rng, tmp_path):
    from sender.transport import EncoderSource, FileSource

    # Noisy slices around a small flat ROI: their bases would cost the ROI more than
    # PREVIEW_SHARE, so they follow it, unlike in the plan (every base first).
    study = prepared_study(rng, shape=(12, 64, 64), extremes=False)
    study.volume.data[:] = rng.normal(40, 60, study.volume.shape).round().astype(np.int16)
    study.roi[:] = False
    study.roi[4:8, 24:40, 24:40] = True
    study.volume.data[study.roi] = 40
    study.diffused = study.volume.data.copy()
    settings = EncodeSettings(group_slices=2)
    frames = list(StudyEncoder(study, settings).frames())
    sent = [chunk.seq for chunk in _sent(frames)]
    plan = [entry[0] for entry in parse_frame(frames[0]).plan]
    assert sorted(sent) == plan and sent != plan
    path = tmp_path / "study.dlad"
    path.write_bytes(b"".join(frames))
    assert FileSource(path).order == sent
    source = EncoderSource(StudyEncoder(study, settings))
    source.encode_ahead()
    try:
        live = list(source.frames(plan))
        assert [seq for seq, _ in live] == sent
        assert [frame for _, frame in live] == frames[1:-1]
        # A resumed transfer: what the receiver has is left out, the order kept.
        rest = [seq for seq, _ in source.frames([seq for seq in plan if seq not in sent[:2]])]
        assert rest == sent[2:]
    finally:
        source.close()


def test_exact_plain_blocks_send_original_voxels_and_any_order_rebuilds_the_volume(rng):
    study = prepared_study(rng, shape=(12, 24, 24))
    study.roi[8:] = False
    study.diffused = np.where(study.roi, study.volume.data, study.diffused)
    frames = list(StudyEncoder(study, EncodeSettings(exact=True, group_slices=4)).frames())
    chunks = _sent(frames)
    plain = [c for c in chunks if c.layer == 2 and not study.roi[c.z0:c.z1].any()]
    assert plain and {c.params.get("reference", "base") for c in plain} <= {"base", "none"}
    # Any arrival order: the exact layer of a plain block before its preview, residuals first.
    for order in (chunks[::-1], sorted(chunks, key=lambda c: -c.layer)):
        reassembler = Reassembler(parse_frame(frames[0]))
        for chunk in order:
            reassembler.apply(chunk)
        assert reassembler.verified is True
        np.testing.assert_array_equal(reassembler.volume, study.volume.data)
    bad = DataChunk(**{**vars(plain[0]), "params": {**plain[0].params, "reference": "other"}})
    with pytest.raises(ChunkRejected, match="reference"):
        Reassembler(parse_frame(frames[0])).apply(bad)


def test_an_expensive_base_makes_the_roi_layer_original_voxels_that_need_no_base(rng):
    # Noise of 60 HU: the quality guard makes the bases cost more than the small ROI itself.
    study = prepared_study(rng, shape=(8, 64, 64), extremes=False)
    study.volume.data[:] = rng.normal(40, 60, study.volume.shape).round().astype(np.int16)
    study.roi[:] = False
    study.roi[2:6, 24:40, 24:40] = True
    study.diffused = study.volume.data.copy()
    frames = list(StudyEncoder(study, EncodeSettings(group_slices=4)).frames())
    header, chunks = parse_frame(frames[0]), _sent(frames)
    roi_chunks = [c for c in chunks if c.layer == 1]
    assert roi_chunks and all(c.params["reference"] == "none" for c in roi_chunks)
    reassembler = Reassembler(header)
    for chunk in roi_chunks:  # the ROI is complete and proven before any base arrives
        reassembler.apply(chunk)
    assert reassembler.roi_complete and not reassembler.progress().slices_with_base
    np.testing.assert_array_equal(reassembler.volume[study.roi], study.volume.data[study.roi])
    for chunk in chunks:  # then the bases: around the ROI, which they leave as it is
        reassembler.apply(chunk)
    assert reassembler.roi_complete and reassembler.base_complete and reassembler.complete
    np.testing.assert_array_equal(reassembler.volume[study.roi], study.volume.data[study.roi])
    stream = decode(frames)
    assert stream.reassembler.roi_complete and not stream.problems
    # With --exact every base is a cheap preview, the ROI original voxels here too (smaller
    # than residuals against a preview), and the whole volume verifies.
    exact = list(StudyEncoder(study, EncodeSettings(group_slices=4, exact=True)).frames())
    sent = _sent(exact)
    assert all(c.params["quality"]["preview"] for c in sent if c.layer == 0)
    assert all(c.params["reference"] == "none" for c in sent if c.layer == 1)
    assert decode(exact).reassembler.verified is True
    # Asked for, the ROI layer is residuals all the same (and verifies).
    residuals = list(StudyEncoder(study, EncodeSettings(group_slices=4, exact=True,
                                                        roi_layer="residual")).frames())
    assert all(c.params.get("reference", "base") == "base" for c in _sent(residuals)
               if c.layer == 1)
    assert decode(residuals).reassembler.verified is True
    with pytest.raises(ValueError, match="ROI layer"):
        EncodeSettings(roi_layer="both")


def test_reassembler_rejects_mismatching_chunks_and_ignores_duplicates(rng):
    study = prepared_study(rng)
    encoder = StudyEncoder(study, EncodeSettings(exact=True, group_slices=2, roi_layer="residual"))
    frames = list(encoder.frames())
    header = parse_frame(frames[0])
    chunks = [parse_frame(f) for f in frames[1:-1]]
    reassembler = Reassembler(header)
    base, residual = base_and_residual(chunks)
    assert reassembler.apply(residual) == []  # before its base: held, not applied yet
    assert reassembler.holds(residual.seq) and not reassembler.applied
    assert reassembler.progress().chunks_applied == 0
    assert reassembler.apply(base) == [base, residual]  # the base brings the held residual
    assert {base.seq, residual.seq} <= reassembler.applied
    assert reassembler.apply(base) == []  # duplicate: ignored, never applied twice
    other_residual = next(c for c in chunks if c.layer > 0 and c.seq != residual.seq)
    bad = [DataChunk(**{**vars(base), "study_id": "other"}),
           DataChunk(**{**vars(base), "seq": 999}),
           DataChunk(**{**vars(base), "z1": base.z1 + 1}),
           DataChunk(**{**vars(base), "codec": "zstd"}),
           DataChunk(**{**vars(other_residual), "payload": other_residual.payload[:-7]})]
    for chunk in bad:
        with pytest.raises(ChunkRejected):
            reassembler.apply(chunk)
    wrong_base = DataChunk(**{**vars(other_residual), "params": {**other_residual.params,
                                                                 "base_digest": bytes(16)}})
    fresh = Reassembler(header)
    fresh.apply(next(c for c in chunks if c.layer == 0 and (c.z0, c.z1) ==
                     (wrong_base.z0, wrong_base.z1)))
    with pytest.raises(ChunkRejected, match="different base"):
        fresh.apply(wrong_base)


def test_a_base_that_fails_to_decode_leaves_its_slices_as_they_were(rng):
    # Bases are decoded straight into the volume: a payload that fails part-way (after some
    # of its frames were written) must leave no trace, and the real base must apply after it.
    study = prepared_study(rng)
    frames = list(StudyEncoder(study, EncodeSettings(exact=True, group_slices=2, roi_layer="residual")).frames())
    header = parse_frame(frames[0])
    chunks = [parse_frame(frame) for frame in frames[1:-1]]
    base = chunks[0]
    assert base.layer == 0 and len(base.params["sizes"]) == 2
    short = base.params["sizes"][0]  # the first frame's packet only: one frame of two
    header.plan.append((99, 0, base.z0, base.z1))  # a second base for the same slices
    reassembler = Reassembler(header)
    empty = reassembler.volume.copy()
    cut = DataChunk(**{**vars(base), "payload": base.payload[:short],
                       "params": {**base.params, "sizes": [short]}})
    with pytest.raises(ChunkRejected, match="1 frames, expected 2"):
        reassembler.apply(cut)
    np.testing.assert_array_equal(reassembler.volume, empty)
    assert not reassembler.applied
    for chunk in chunks:
        reassembler.apply(chunk)
    assert reassembler.verified is True
    with pytest.raises(ChunkRejected, match="already have a base"):
        reassembler.apply(DataChunk(**{**vars(base), "seq": 99}))
    np.testing.assert_array_equal(reassembler.volume, study.volume.data)


def test_encoder_refuses_a_diffused_volume_that_touches_the_roi(rng):
    study = prepared_study(rng)
    study.diffused[study.roi] += 1
    with pytest.raises(ValueError, match="inside the ROI"):
        StudyEncoder(study)


def test_tiny_slices_survive_hevc(rng):
    study = prepared_study(rng, shape=(3, 9, 5), extremes=False)
    study.roi[:] = False
    study.roi[1, 2:5, 1:3] = True
    study.diffused = np.where(study.roi, study.volume.data, study.diffused)
    stream = decode(StudyEncoder(study, EncodeSettings(exact=True)).frames())
    np.testing.assert_array_equal(stream.reassembler.volume, study.volume.data)


def test_feed_returns_and_status_counts_only_applied_chunks(rng):
    """A residual that arrives before its base is held: neither returned by feed nor counted
    as applied until the base comes (the cause of a flaky fuzz test)."""
    study = prepared_study(rng)
    frames = list(StudyEncoder(study, EncodeSettings(exact=True, group_slices=2, roi_layer="residual")).frames())
    base, residual = base_and_residual([parse_frame(frame) for frame in frames[1:-1]])
    base_frame, residual_frame = base.to_frame(), residual.to_frame()
    stream = StudyStream()
    assert stream.feed(frames[0] + residual_frame) == []
    status = stream.status()
    assert status["chunks_applied"] == 0 and status["duplicates"] == 0
    assert [(c.seq, c.layer) for c in stream.feed(base_frame)] == [(base.seq, 0), (residual.seq, 1)]
    assert stream.status()["chunks_applied"] == 2
    assert stream.feed(residual_frame + base_frame) == []
    status = stream.status()
    assert status["chunks_applied"] == 2 and status["duplicates"] == 2 and not stream.problems


def test_progress_counts_slices_and_roi_voxels(rng):
    study = prepared_study(rng)  # ROI: slices 1-3 (10 x 12 voxels each) and one more voxel
    encoder = StudyEncoder(study, EncodeSettings(exact=True, group_slices=2, roi_layer="residual"))
    frames = list(encoder.frames())
    reassembler = Reassembler(parse_frame(frames[0]))
    start = reassembler.progress()
    roi_voxels = int(study.roi.sum())
    assert (start.chunks_planned, start.chunks_applied, start.slices) == (len(frames) - 2, 0, 6)
    assert (start.slices_with_base, start.roi_exact_slices, start.exact_slices) == (0, 0, 0)
    assert (start.roi_voxels, start.roi_voxels_exact, start.roi_fraction) == (roi_voxels, 0, 0.0)
    seen = []
    for frame in frames[1:-1]:
        chunk = parse_frame(frame)
        reassembler.apply(chunk)
        progress = reassembler.progress()
        layers = reassembler.slice_layers()
        assert progress.slices_with_base == np.count_nonzero(layers & HAS_BASE)
        exact_roi = reassembler.roi_exact_slices
        assert progress.roi_voxels_exact == study.roi[exact_roi].sum()
        assert progress.base_fraction == progress.slices_with_base / 6
        seen.append((chunk.layer, progress.roi_fraction, progress.exact_fraction))
    # ROI first: the ROI is complete before the first chunk of the exact layer is applied.
    first_exact = next(i for i, (layer, _, _) in enumerate(seen) if layer == 2)
    assert seen[first_exact - 1][1] == 1.0 and seen[first_exact - 1][2] < 1.0
    assert seen[-1][1:] == (1.0, 1.0)
    assert reassembler.progress().chunks_applied == len(frames) - 2
    layers = reassembler.slice_layers()
    assert not layers.flags.writeable and (layers & HAS_BASE).all()
    # Without an exact layer, exact_slices is None and nothing counts as exact.
    layered = Reassembler(parse_frame(next(iter(StudyEncoder(study, EncodeSettings()).frames()))))
    assert layered.progress().exact_slices is None and layered.progress().exact_fraction == 0.0


def test_a_payload_the_receiver_refuses_is_never_sent():
    """A residual block met in eval_roi (two near-identical interpolated slices of the torso CT
    at 1 mm): libjxl codes it losslessly but starts with a frame the receiver's strict header
    check refuses, which left two slices of ROI inexact. The sender checks every candidate
    payload as the receiver decodes it and sends another codec's."""
    from pathlib import Path

    from sender.encoder import smallest
    from shared.codecs import CodecError, get_codec

    mosaic = np.load(Path(__file__).with_name("data") / "jpegxl_patches_residual.npz")["mosaic"]
    block = mosaic.reshape(2, 101, 122).astype(np.int16)
    jpegxl, jpegls = get_codec("jpegxl"), get_codec("jpegls")
    payload, params = jpegxl.encode(block)
    try:
        refused = not np.array_equal(jpegxl.decode(payload, block.shape, params), block)
    except CodecError:
        refused = True
    codec, payload, params = smallest([jpegxl, jpegls], block)
    assert np.array_equal(codec.decode(payload, block.shape, params), block)
    if refused:  # this libjxl and header check: the JPEG-LS payload goes instead
        assert codec is jpegls


def test_each_residual_chunk_uses_the_smallest_of_the_layers_codecs(rng):
    study = prepared_study(rng, shape=(8, 24, 20))
    settings = EncodeSettings(exact=True, group_slices=2, roi_layer="residual",
                              residual_codecs=("zstd", "jpegxl", "jpegls"))
    encoder = StudyEncoder(study, settings)
    frames = list(encoder.frames())
    header = parse_frame(frames[0])
    assert header.layers[1]["codecs"] == ["zstd", "jpegxl", "jpegls"] and header.layers[1]["lossless"]
    chunks = [parse_frame(frame) for frame in frames[1:-1]]
    used = set()
    for chunk in (c for c in chunks if c.layer > 0):
        used.add(chunk.codec)
        sizes = {}
        for name in settings.residual_codecs:  # re-code the chunk's residual with every codec
            block = StudyEncoder(study, EncodeSettings(exact=True, group_slices=2, roi_layer="residual",
                                                       residual_codecs=(name,)))
            same = block.encode_chunk(next(p for p in block.plan if p.seq == chunk.seq))
            sizes[name] = len(same.payload) + len(msgpack.packb(same.params))
        assert sizes[chunk.codec] == min(sizes.values())
    assert used  # and the stream decodes exactly whatever mix was chosen
    stream = decode(frames)
    assert stream.reassembler.verified is True and not stream.problems
    rejected = DataChunk(**{**vars(next(c for c in chunks if c.layer == 1)), "codec": "htj2k"})
    with pytest.raises(ChunkRejected, match="not one the header names"):
        Reassembler(header).apply(rejected)


def test_roi_chunks_cover_the_bounding_box_of_their_roi_and_bad_boxes_are_refused(rng):
    study = prepared_study(rng, shape=(6, 40, 48), extremes=False)
    frames = list(StudyEncoder(study, EncodeSettings(group_slices=3, exact=True)).frames())
    header, chunks = parse_frame(frames[0]), _sent(frames)
    for chunk in (c for c in chunks if c.layer == 1):
        y0, y1, x0, x1 = chunk.params["box"]
        roi = study.roi[chunk.z0:chunk.z1]
        assert roi[:, y0:y1, x0:x1].sum() == roi.sum()  # all of the block's ROI, and no more:
        assert roi[:, y0].any() and roi[:, y1 - 1].any() and roi[:, :, x0].any()
    assert "box" not in {key for c in chunks if c.layer != 1 for key in c.params}
    roi_chunk = next(c for c in chunks if c.layer == 1)
    rest_chunk = next(c for c in chunks if c.layer == 2)
    for chunk, box in ((roi_chunk, [0, 41, 0, 48]), (roi_chunk, [5, 5, 0, 48]),
                       (roi_chunk, [0, 40, -1, 48]), (roi_chunk, "all"), (roi_chunk, [0, 40, 0]),
                       (rest_chunk, [0, 40, 0, 48])):
        bad = DataChunk(**{**vars(chunk), "params": {**chunk.params, "box": box}})
        with pytest.raises(ChunkRejected, match="box"):
            Reassembler(header).apply(bad)
    assert decode(frames).reassembler.verified is True
