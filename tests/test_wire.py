"""The wire format: round trips, and rejection of everything malformed."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zstandard

from shared import wire
from shared.wire import DataChunk, FrameReader, StreamEnd, StreamHeader, WireError, parse_frame


def make_header(study_id="s1", shape=(3, 8, 8)) -> StreamHeader:
    roi = np.zeros(shape, bool)
    roi[1, 2:5, 2:6] = True
    return StreamHeader(study_id=study_id, shape=shape, affine=np.diag([-0.7, -0.7, 2.5, 1]),
                        spacing=(0.7, 0.7, 2.5), source_dtype="uint16", rescale=(1.0, -1024.0),
                        value_range=(-1024, 2000), sha256="ab" * 32, roi=roi,
                        layers={0: {"codec": "zstd", "lossless": True, "region": "all"}},
                        plan=[(0, 0, 0, 2), (1, 0, 2, 3)], provenance={"k": 1})


def make_chunk(**overrides) -> DataChunk:
    fields = dict(study_id="s1", seq=0, layer=0, z0=0, z1=2, codec="zstd", params={"a": 1},
                  payload=b"\x00\x01" * 50)
    fields.update(overrides)
    return DataChunk(**fields)


def test_header_round_trip():
    header = make_header()
    parsed = parse_frame(header.to_frame())
    assert isinstance(parsed, StreamHeader)
    np.testing.assert_array_equal(parsed.roi, header.roi)
    np.testing.assert_array_equal(parsed.affine, header.affine)
    assert parsed.plan == header.plan and parsed.layers == header.layers
    assert (parsed.source_dtype, parsed.rescale, parsed.value_range) == ("uint16", (1.0, -1024.0),
                                                                         (-1024, 2000))


def test_roi_stays_packed_and_unpacks_by_slices_off_byte_boundaries(rng):
    shape = (4, 5, 3)  # 15 voxels a slice, 60 in all: slices start inside bytes
    roi = rng.random(shape) < 0.4
    header = make_header(shape=shape)
    header.roi_bits = np.packbits(roi.ravel())
    parsed = parse_frame(header.to_frame())
    assert parsed.roi_bits.dtype == np.uint8 and parsed.roi_bits.size == 8
    assert parsed.roi_voxels == roi.sum()
    np.testing.assert_array_equal(parsed.roi, roi)
    for z0 in range(shape[0]):
        for z1 in range(z0 + 1, shape[0] + 1):
            np.testing.assert_array_equal(parsed.roi_slices(z0, z1), roi[z0:z1])


def test_roi_padding_bits_are_no_voxels():
    body = msgpack.unpackb(make_header(shape=(3, 3, 3)).to_frame()[wire.PREFIX_BYTES:])
    roi = np.zeros(27, bool)
    roi[[0, 26]] = True
    packed = bytearray(np.packbits(roi).tobytes())
    packed[3] |= 0x1F  # the 5 bits past the 27th voxel
    body["roi"] = {"encoding": "packbits-zstd", "voxels": 2,
                   "data": zstandard.ZstdCompressor().compress(bytes(packed))}
    parsed = parse_frame(wire.frame(wire.KIND_HEADER, body))
    np.testing.assert_array_equal(parsed.roi.ravel(), roi)
    assert parsed.roi_bits.tobytes() == np.packbits(roi).tobytes()
    body["roi"]["voxels"] = 3
    with pytest.raises(WireError, match="voxel count"):
        parse_frame(wire.frame(wire.KIND_HEADER, body))


def test_data_and_end_round_trip():
    chunk = make_chunk()
    assert parse_frame(chunk.to_frame()) == chunk
    end = StreamEnd("s1", 2, 1234)
    assert parse_frame(end.to_frame()) == end


def test_checksum_detects_any_flipped_byte():
    data = bytearray(make_chunk().to_frame())
    for position in (wire.PREFIX_BYTES + 3, len(data) - 1, 12):
        damaged = bytearray(data)
        damaged[position] ^= 0x40
        with pytest.raises(WireError, match="checksum"):
            parse_frame(bytes(damaged))


def test_unknown_versions_and_kinds_are_rejected():
    data = bytearray(make_chunk().to_frame())
    data[4] = 9
    with pytest.raises(WireError, match="wire version"):
        parse_frame(bytes(data))
    # A complete header but for its version:
    body = {**msgpack.unpackb(make_header().to_frame()[wire.PREFIX.size:], raw=False),
            "version": 99}
    with pytest.raises(WireError, match="format version 99"):
        parse_frame(wire.frame(wire.KIND_HEADER, body))
    assert isinstance(parse_frame(wire.frame(wire.KIND_HEADER, {**body, "version": 1})),
                      StreamHeader)  # the version alone made it fail
    with pytest.raises(WireError, match="kind"):
        parse_frame(wire.frame(7, {}))


def test_malformed_fields_are_rejected():
    with pytest.raises(WireError, match="layer"):
        parse_frame(make_chunk(layer=5).to_frame())
    with pytest.raises(WireError, match="slice range"):
        parse_frame(make_chunk(z0=4, z1=2).to_frame())
    with pytest.raises(WireError, match="wrong type"):
        parse_frame(wire.frame(wire.KIND_DATA, {**vars(make_chunk()), "payload": "text"}))
    with pytest.raises(WireError, match="missing"):
        parse_frame(wire.frame(wire.KIND_DATA, {"study_id": "s1"}))
    good = make_header()
    assert parse_frame(good.to_frame()).plan == good.plan
    bad = make_header()
    bad.plan = [(0, 0, 0, 9)]  # beyond the 3 slices: the plan alone differs
    with pytest.raises(WireError, match=r"invalid plan entry \[0, 0, 0, 9\]"):
        parse_frame(bad.to_frame())


def test_oversized_frames_are_refused_before_reading_them():
    prefix = wire.PREFIX.pack(wire.MAGIC, 1, wire.KIND_DATA, wire.MAX_BODY_BYTES + 1, bytes(16))
    reader = FrameReader()
    events = reader.feed(prefix + make_chunk().to_frame())
    assert events[0].error and "oversized" in events[0].error
    assert [type(e.chunk) for e in events if e.chunk] == [DataChunk]
    with pytest.raises(WireError, match="limit"):
        parse_frame(prefix)


def test_reader_handles_split_input_corruption_and_truncation():
    frames = [make_header().to_frame(), make_chunk().to_frame(),
              make_chunk(seq=1, z0=2, z1=3).to_frame(), StreamEnd("s1", 2, 10).to_frame()]
    stream = bytearray(b"".join(frames))
    stream[len(frames[0]) + 40] ^= 0xFF  # damage the first data chunk
    reader = FrameReader()
    events = []
    for start in range(0, len(stream) - 30, 7):  # odd-sized pieces, last 30 bytes cut off
        events += reader.feed(bytes(stream[start:start + 7]))
    events += reader.finish()
    chunks = [e.chunk for e in events if e.chunk is not None]
    errors = [e.error for e in events if e.error]
    assert [type(c).__name__ for c in chunks] == ["StreamHeader", "DataChunk"]
    assert chunks[1].seq == 1  # the damaged seq 0 was skipped, never returned
    assert any("checksum" in e for e in errors) and any("truncated" in e for e in errors)


def test_garbage_is_skipped_and_reported():
    reader = FrameReader()
    events = reader.feed(b"garbage!" * 10 + make_chunk().to_frame())
    assert events[0].error and events[-1].chunk == make_chunk()


def test_header_carries_dicom_attributes_and_refuses_malformed_ones():
    from shared.wire import MAX_DICOM_ATTRIBUTES, StreamHeader, WireError, parse_frame

    def header(dicom):
        return StreamHeader(study_id="s", shape=(1, 2, 2), affine=np.eye(4), spacing=(1, 1, 1),
                            source_dtype="int16", rescale=(1, 0), value_range=(0, 1),
                            sha256="0" * 64, roi=np.zeros((1, 2, 2), bool), dicom=dicom)

    attributes = {"SeriesInstanceUID": "1.2.3", "SeriesNumber": 4, "SliceThickness": 2.5,
                  "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}
    assert parse_frame(header(attributes).to_frame()).dicom == attributes
    assert parse_frame(header(None).to_frame()).dicom == {}
    for bad in ({"not a keyword": "x"}, {"PatientName": {"nested": 1}},
                {"PatientName": "x" * 20000}, {"SliceThickness": float("nan")},
                {f"Key{i}": i for i in range(MAX_DICOM_ATTRIBUTES + 1)}):
        with pytest.raises(WireError):
            header(bad)


def test_header_roi_digests_round_trip_and_refuse_malformed_ones():
    header = make_header()
    header.roi_digests = [(0, 2, b"\x01" * 32), (2, 3, b"\x02" * 32)]
    assert parse_frame(header.to_frame()).roi_digests == header.roi_digests
    assert parse_frame(make_header().to_frame()).roi_digests == []  # optional (older streams)
    for bad in ([[0, 2, b"\x01" * 31]], [[0, 4, b"\x01" * 32]], [[1, 1, b"\x01" * 32]],
                [[0, 2, b"\x01" * 32], [1, 3, b"\x02" * 32]], [[0, 2]], [["0", 2, b"\x01" * 32]],
                [[0, 1, b"\x01" * 32]] * 4, "digests"):
        body = msgpack.unpackb(make_header().to_frame()[wire.PREFIX_BYTES:], raw=False)
        body["roi_digests"] = bad
        with pytest.raises(WireError, match="roi_digests"):
            parse_frame(wire.frame(wire.KIND_HEADER, body))


def _with_layers(layers: dict) -> bytes:
    body = msgpack.unpackb(make_header().to_frame()[wire.PREFIX_BYTES:])
    body["layers"] = layers
    return wire.frame(wire.KIND_HEADER, body)


def test_layers_name_registered_codecs_and_tell_the_truth_about_losslessness():
    good = {"0": {"codec": "hevc", "codecs": ["hevc"], "lossless": False, "region": "all"},
            "1": {"codec": "jpegxl", "codecs": ["jpegxl", "jpegls"], "lossless": True,
                  "region": "roi"}}
    parsed = parse_frame(_with_layers(good))
    assert wire.layer_codecs(parsed.layers[1]) == ["jpegxl", "jpegls"]
    # A stream of an earlier build names one codec per layer.
    old = parse_frame(_with_layers({"0": {"codec": "zstd", "lossless": True, "region": "all"}}))
    assert wire.layer_codecs(old.layers[0]) == ["zstd"]
    bad = [
        {"0": {"codec": "png", "lossless": True, "region": "all"}},  # unknown codec
        {"0": {"codec": "hevc", "lossless": True, "region": "all"}},  # lossy called lossless
        {"0": {"codec": "zstd", "codecs": ["zstd", "hevc"], "lossless": True, "region": "all"}},
        {"0": {"codec": "zstd", "lossless": False, "region": "all"}},
        {"0": {"codec": "zstd", "codecs": ["jpegls"], "lossless": True, "region": "all"}},
        {"0": {"codec": "zstd", "codecs": ["zstd", "zstd"], "lossless": True, "region": "all"}},
        {"0": {"codec": "zstd", "codecs": ["zstd"] + ["jpegls"] * 8, "lossless": True,
               "region": "all"}},
        {"1": {"codec": "zstd", "lossless": True, "region": "all"}},  # layer 1 is the ROI
        {"3": {"codec": "zstd", "lossless": True, "region": "all"}},
        # A field that is not named by a string (the receiver sorts the fields for the stream
        # key: a bytes name beside str names made that raise, and the session hang)
        {"0": {"codec": "zstd", "lossless": True, "region": "all", b"x": 1}},
    ]
    for layers in bad:
        with pytest.raises(WireError):
            parse_frame(_with_layers(layers))


@pytest.mark.parametrize("field,value", [
    ("affine", [0.0] * 16),  # singular
    ("affine", [1.0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 1, 2, 3, 4]),  # not a last row 0 0 0 1
    ("spacing", [-1.0, 0.8, 2.0]),
    ("spacing", [0.0, 0.0, 0.0]),
])
def test_headers_with_impossible_geometry_are_refused(field, value):
    """A header whose geometry no volume can have is refused when parsed: the receiver would
    otherwise fail (a traceback in file mode, a session error loop live) when writing it."""
    body = wire._unpack_body(make_header().to_frame()[wire.PREFIX_BYTES:])
    body[field] = value
    with pytest.raises(WireError, match="affine must be invertible"):
        parse_frame(wire.frame(wire.KIND_HEADER, body))


def test_roi_masks_travel_as_row_runs_when_smaller_and_any_mask_round_trips(rng):
    # A liver-like mask: one run per row whose ends move a little from row to row.
    shape = (6, 40, 50)
    y = np.arange(40)[:, None]
    x = np.arange(50)[None, :]
    liver = np.stack([(x - 20) ** 2 / 300 + (y - 18 - z) ** 2 / 150 < 1 for z in range(6)])
    header = make_header(shape=shape)
    header.roi_bits = np.packbits(liver.ravel())
    body = msgpack.unpackb(header.to_frame()[wire.PREFIX_BYTES:], raw=False)
    assert body["roi"]["encoding"] == "row-runs-zstd"
    np.testing.assert_array_equal(parse_frame(header.to_frame()).roi, liver)
    for shape in ((3, 5, 7), (3, 1, 1), (9, 4, 3), (17, 3, 9)):
        for density in (0.0, 0.1, 0.5, 1.0):
            roi = rng.random(shape) < density
            header = make_header(shape=shape)
            header.roi_bits = np.packbits(roi.ravel())
            np.testing.assert_array_equal(parse_frame(header.to_frame()).roi, roi)


def test_a_mask_of_many_short_runs_travels_packed():
    """Row runs whose numbers take more than the packed mask are refused by every receiver (a
    bounded decoder), although zstd makes them smaller (32 bytes against 45 here): packed bits."""
    shape = (5, 37, 45)
    stripes = np.zeros(shape, bool)
    stripes[:, :, ::2] = True
    header = make_header(shape=shape)
    header.roi_bits = np.packbits(stripes.ravel())
    body = msgpack.unpackb(header.to_frame()[wire.PREFIX_BYTES:], raw=False)
    assert body["roi"]["encoding"] == "packbits-zstd"
    np.testing.assert_array_equal(parse_frame(header.to_frame()).roi, stripes)


def test_hostile_row_runs_are_refused():
    from shared.roimask import _varints, decode_runs

    def runs(values):
        return zstandard.ZstdCompressor().compress(_varints(values))

    shape = (1, 2, 8)
    # row 0: run [1, 4) as gaps 1, 3; row 1: as many switches, so differences 0 and +1 (zigzag 2)
    assert decode_runs(runs([2, 1, 3, 2, 0, 2]), shape).tolist() == [0b01110000, 0b01111000]
    for values in ([2, 1, 3], [3, 1, 1, 1, 0], [2, 5, 5, 0], [2, 0, 9, 0], [2, 3, 0, 0],
                   [0, 0, 0], [0], [12] + [1] * 12 + [0], [2, 1, 1, 0, 7]):
        with pytest.raises(ValueError):
            decode_runs(runs(values), shape)
    with pytest.raises(ValueError, match="larger"):
        decode_runs(zstandard.ZstdCompressor().compress(bytes(64 * 1024)), shape)
    with pytest.raises(ValueError, match="too many rows"):
        decode_runs(runs([0]), (1 << 11, 1 << 10, 1))
