"""The receiver's memory: the ROI mask stays bit-packed and applying a chunk costs about one block.

Measured with tracemalloc, which sees every numpy buffer (not the codec libraries' own
allocations), so the bounds are exact counts of the block-sized copies a step makes, not timings
or RSS. Before these bounds the receiver held the ROI unpacked (a byte per voxel) and made two
to three extra copies of every decoded block; the streaming benchmark's peak memory
(docs/STREAMING.md) is what they protect.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from receiver.reassembly import Reassembler
from sender.encoder import EncodeSettings, PreparedStudy, StudyEncoder
from shared.volume import Volume
from shared.wire import DataChunk, StreamHeader, parse_frame

SHAPE = (8, 192, 224)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(7)
    data = rng.normal(40, 30, SHAPE).round().astype(np.int16)
    data[:, :20] = -1024
    roi = np.zeros(SHAPE, bool)
    roi[1:7, 40:150, 50:170] = True
    diffused = np.where(roi, data, (data // 4) * 4).astype(np.int16)
    volume = Volume(data=data, affine=np.diag([-0.8, -0.8, 2.0, 1.0]), spacing=(0.8, 0.8, 2.0))
    study = PreparedStudy(volume=volume, roi=roi, diffused=diffused, study_id="memory")
    encoder = StudyEncoder(study, EncodeSettings(exact=True, group_slices=4))
    return list(encoder.frames())


def traced_peak(function):
    """``(result, bytes allocated at the peak of function() beyond what was allocated before)``."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = function()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak - before


def test_parsed_header_keeps_the_roi_packed():
    shape = (16, 512, 512)
    roi = np.zeros(shape, bool)
    roi[2:13, 100:400, 150:380] = True
    header = StreamHeader(study_id="memory", shape=shape, affine=np.eye(4), spacing=(1, 1, 1),
                          source_dtype="int16", rescale=(1.0, 0.0), value_range=(-1024, 2000),
                          sha256="ab" * 32, roi=roi,
                          layers={0: {"codec": "zstd", "lossless": True, "region": "all"}},
                          plan=[(0, 0, 0, 16)])
    frame = header.to_frame()
    parsed, peak = traced_peak(lambda: parse_frame(frame))
    assert parsed.roi_bits.nbytes == roi.size // 8
    # The packed mask and the decompressor's buffers; the unpacked mask alone is roi.size.
    assert peak < roi.size // 2
    np.testing.assert_array_equal(parsed.roi, roi)
    np.testing.assert_array_equal(parsed.roi_slices(3, 6), roi[3:6])


def test_applying_a_chunk_costs_about_one_decoded_block(frames):
    header = parse_frame(frames[0])
    chunks = [parse_frame(frame) for frame in frames[1:-1]]
    assert {chunk.layer for chunk in chunks} == {0, 1, 2}
    reassembler = Reassembler(header)
    assert reassembler.volume.shape == header.shape  # made lazily, once: not a chunk's cost
    for chunk in chunks:
        assert isinstance(chunk, DataChunk)
        block_bytes = 2 * (chunk.z1 - chunk.z0) * SHAPE[1] * SHAPE[2]
        applied, peak = traced_peak(lambda chunk=chunk: reassembler.apply(chunk))
        assert applied == [chunk]  # in plan order: every chunk applies when it comes
        # A residual's decoded block, a slice of the ROI mask and small change (a base is
        # decoded straight into the volume: next to nothing).
        assert peak < 1.5 * block_bytes, (chunk.seq, chunk.layer, chunk.codec, peak, block_bytes)
    assert reassembler.verified is True
