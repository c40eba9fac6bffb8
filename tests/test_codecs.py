"""Every codec round-trips int16 blocks (extremes included); decoders are bounded and strict."""

from __future__ import annotations

import bz2
import zlib

import numpy as np
import pytest
import zstandard

from shared.codecs import CodecError, codec_names, get_codec
from shared.codecs.video import best_12bit_offset

LOSSLESS = [n for n in codec_names() if get_codec(n).lossless]


def extreme_block(rng, shape=(3, 33, 27)):
    block = rng.integers(-1024, 3072, size=shape).astype(np.int16)
    block[0, 0, 0], block[0, 0, 1], block[1, 5, 5] = -32768, 32767, -32767
    block[2, 10:12, 3:9] = 32000  # a patch far outside any 12-bit window
    return block


def test_all_codecs_are_registered():
    assert set(codec_names()) >= {"zstd", "bz2", "lzma", "zlib", "jpegls", "ffv1",
                                  "hevc-lossless", "hevc", "jpegxl", "htj2k"}


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_round_trip_with_int16_extremes(name, rng):
    codec = get_codec(name)
    for block in (extreme_block(rng), rng.integers(-32768, 32768, (2, 16, 19)).astype(np.int16),
                  np.full((1, 8, 8), -32768, np.int16), np.full((2, 9, 7), 32767, np.int16)):
        payload, params = codec.encode(block)
        decoded = codec.decode(payload, block.shape, params)
        assert decoded.dtype == np.int16
        np.testing.assert_array_equal(decoded, block)


@pytest.mark.parametrize("name", codec_names())
def test_decode_into_fills_a_slab_of_a_larger_array_and_nothing_else(name, rng):
    codec = get_codec(name)
    block = extreme_block(rng, shape=(3, 20, 24))
    payload, params = codec.encode(block)
    volume = np.full((5, 20, 24), 7, np.int16)
    codec.decode_into(payload, params, volume[1:4])
    np.testing.assert_array_equal(volume[1:4], codec.decode(payload, block.shape, params))
    assert (volume[0] == 7).all() and (volume[4] == 7).all()
    if codec.lossless:
        np.testing.assert_array_equal(volume[1:4], block)


def test_hevc_lossless_uses_exceptions_outside_12_bits(rng):
    block = extreme_block(rng)
    _, params = get_codec("hevc-lossless").encode(block)
    assert params["exception_count"] == 3 + 12
    assert best_12bit_offset(block) <= -1024


@pytest.mark.parametrize("name", ["hevc", "hevc-lossless"])
def test_hevc_payloads_carry_no_x265_version_text(name, rng):
    # x265 writes its version and every option as an SEI message (about 2.3 kB) into each
    # chunk unless told not to: 6-15 % of a small study's bases.
    payload, _ = get_codec(name).encode(rng.integers(-100, 100, (2, 32, 32)).astype(np.int16))
    assert b"x265" not in payload


def test_lossy_hevc_error_is_bounded_and_rate_selectable(rng):
    smooth = (np.add.outer(np.arange(64), np.arange(64)) * 8 - 500).astype(np.int16)
    block = np.stack([smooth + rng.integers(-5, 6, smooth.shape).astype(np.int16)
                      for _ in range(3)])
    coarse, fine = get_codec("hevc", crf=30), get_codec("hevc", qp=4)
    payload_c, params_c = coarse.encode(block)
    payload_f, params_f = fine.encode(block)
    assert len(payload_f) > len(payload_c)
    error = np.abs(fine.decode(payload_f, block.shape, params_f).astype(int) - block)
    assert error.mean() < 3
    with pytest.raises(ValueError, match="either a CRF or a QP"):
        get_codec("hevc", crf=10, qp=10)


@pytest.mark.parametrize("name", LOSSLESS)
def test_corrupt_or_truncated_payload_is_an_error_not_garbage(name, rng):
    codec = get_codec(name)
    block = rng.integers(-1000, 1000, (2, 24, 24)).astype(np.int16)
    payload, params = codec.encode(block)
    with pytest.raises(CodecError):
        codec.decode(payload[: len(payload) // 2], block.shape, params)
    with pytest.raises(CodecError):
        codec.decode(payload, (3, 24, 24), params)  # more slices than the payload holds


@pytest.mark.parametrize("name,compress", [
    ("zstd", lambda raw: zstandard.ZstdCompressor().compress(raw)),
    ("zlib", lambda raw: zlib.compress(raw, 9)),
    ("bz2", lambda raw: bz2.compress(raw, 9))])
def test_decompression_bombs_are_refused(name, compress):
    bomb = compress(bytes(64 * 1024 * 1024))  # 64 MiB of zeros in a few KB
    with pytest.raises(CodecError, match="beyond|holds"):
        get_codec(name).decode(bomb, (1, 16, 16), {})


def test_video_decoder_refuses_extra_frames(rng):
    codec = get_codec("jpegls")
    block = rng.integers(-1000, 1000, (3, 16, 16)).astype(np.int16)
    payload, params = codec.encode(block)
    with pytest.raises(CodecError):
        codec.decode(payload, (2, 16, 16), params)
    with pytest.raises(CodecError, match="sizes"):
        codec.decode(payload, block.shape, {"sizes": [len(payload) + 1]})


def test_unknown_codec_and_bad_input():
    with pytest.raises(CodecError, match="unknown codec"):
        get_codec("png")
    with pytest.raises(CodecError, match="int16"):
        get_codec("zstd").encode(np.zeros((2, 2), np.int16))


@pytest.mark.parametrize("name", ["hevc", "hevc-lossless"])
def test_hevc_codes_widths_on_which_x265_corrupts_its_heap(name, rng):
    # x265 aborted the process on blocks of 3+ frames 33 to 48 pixels wide: they are padded.
    for width in (33, 40, 48, 49):
        block = rng.integers(-200, 200, (4, 40, width)).astype(np.int16)
        codec = get_codec(name)
        payload, params = codec.encode(block)
        decoded = codec.decode(payload, block.shape, params)
        assert decoded.shape == block.shape
        if codec.lossless:
            np.testing.assert_array_equal(decoded, block)
