"""The imagecodecs codecs (JPEG XL, HTJ2K, CharLS JPEG-LS): round trips, mosaic layout, old-stream
compatibility, and strict headers: a hostile payload never reaches the decoder library unless
it describes exactly the announced block."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.codecs import CodecError, get_codec, imaging
from shared.codecs.headers import check_j2k, check_jpegls, check_jpegxl
from shared.codecs.imaging import from_mosaic_in_place, image_slices, mosaic_columns, to_mosaic
from shared.codecs.video import decode_frames, encode_frames

IMAGE_CODECS = ("jpegxl", "htj2k", "jpegls")


@pytest.mark.parametrize("name", IMAGE_CODECS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 1, 1), (1, 1, 300), (1, 300, 1), (7, 13, 3),
                                   (3, 31, 257), (16, 9, 9)])
def test_odd_shapes_round_trip(name, shape, rng):
    codec = get_codec(name)
    for block in (rng.integers(-32768, 32768, shape).astype(np.int16),
                  rng.integers(-3, 3, shape).astype(np.int16),
                  np.full(shape, 32767, np.int16), np.full(shape, -32768, np.int16)):
        payload, params = codec.encode(block)
        np.testing.assert_array_equal(codec.decode(payload, shape, params), block)


def test_mosaic_layout_is_near_square_without_empty_cells_and_decodes_in_place(rng):
    assert mosaic_columns(4, 512, 512) == 2 and mosaic_columns(1, 512, 512) == 1
    assert mosaic_columns(30, 101, 122) == 5 and mosaic_columns(4, 8, 4096) == 1
    assert mosaic_columns(7, 512, 512) in (1, 7) and mosaic_columns(12, 100, 100) in (3, 4)
    block = rng.integers(0, 100, (6, 3, 4)).astype(np.int16)
    image = to_mosaic(block, 2)
    assert image.shape == (9, 8)
    np.testing.assert_array_equal(image[3:6, 4:8], block[3])
    decoded = image.copy().reshape(block.shape)  # the block's memory holding the mosaic
    from_mosaic_in_place(decoded.reshape(9, 8), 6, 2)
    np.testing.assert_array_equal(decoded, block)
    payload, params = get_codec("jpegxl").encode(block)
    assert params["images"] == [[6, mosaic_columns(6, 3, 4), len(payload)]]
    for images in ([[6, 4, len(payload)]], [[6, 9, len(payload)]], [[5, 1, len(payload)]],
                   [[6, 1, len(payload) - 1]], "6"):
        with pytest.raises(CodecError, match="layout"):
            get_codec("jpegxl").decode(payload, block.shape, {**params, "images": images})
    for images in ([[3, 1, 5], [3, 1, len(payload) - 5]], [[6, 3, len(payload)]]):
        with pytest.raises(CodecError):  # a layout that fits, but not the codestream's header
            get_codec("jpegxl").decode(payload, block.shape, {**params, "images": images})


def test_large_blocks_are_coded_as_several_images(rng):
    assert image_slices(4, 512, 512) == [4] and image_slices(10, 512, 512) == [4, 3, 3]
    assert image_slices(3, 1024, 2048) == [1, 1, 1] and image_slices(30, 101, 122) == [30]
    block = rng.integers(-2000, 2000, (5, 300, 1000)).astype(np.int16)
    for name in ("jpegxl", "htj2k"):
        payload, params = get_codec(name).encode(block)
        assert [entry[0] for entry in params["images"]] == [3, 2]
        np.testing.assert_array_equal(get_codec(name).decode(payload, block.shape, params), block)


def test_jpegxl_beats_slice_by_slice_coding_on_a_noisy_block(rng):
    # One image of the block learns one context model from all its voxels.
    block = (rng.normal(40, 20, (4, 64, 64)) + np.arange(64) * 3).astype(np.int16)
    together = len(get_codec("jpegxl").encode(block)[0])
    apart = sum(len(get_codec("jpegxl").encode(block[i:i + 1])[0]) for i in range(4))
    assert together < apart


def test_jpegls_streams_of_the_ffmpeg_coder_and_of_charls_decode_either_way(rng):
    """Streams written before the CharLS coder (FFmpeg's JPEG-LS, +32768 shift, frames back to
    back) decode with it, and FFmpeg decodes CharLS's frames: one payload format."""
    block = rng.integers(-32768, 32768, (3, 21, 17)).astype(np.int16)
    shifted = (block.view(np.uint16) ^ np.uint16(0x8000))
    old_payload, old_params = encode_frames("jpegls", "gray16le", shifted, {})
    codec = get_codec("jpegls")
    np.testing.assert_array_equal(codec.decode(old_payload, block.shape, old_params), block)
    payload, params = codec.encode(block)
    assert b"SPIFF" not in payload
    decoded = decode_frames("jpegls", payload, block.shape, params)
    np.testing.assert_array_equal(decoded, shifted)


# --- hostile payloads ---------------------------------------------------------------------------

def _refuse_library_calls(monkeypatch):
    """Make every imagecodecs decoder fail the test if called: the header check must refuse
    before any library allocates."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the decoder library was called on a payload the header check "
                             "should have refused")
    for name in ("jpegxl_decode", "htj2k_decode", "jpegls_decode"):
        monkeypatch.setattr(imagecodecs, name, forbidden)


def _jxl(image, **options):
    return bytes(imagecodecs.jpegxl_encode(image, lossless=True, usecontainer=False, **options))


def test_jpegxl_header_check_refuses_everything_but_the_announced_grey_image(rng, monkeypatch):
    grey = rng.integers(0, 4000, (24, 16)).astype(np.uint16)
    check_jpegxl(_jxl(grey, bitspersample=12), 24, 16)
    check_jpegxl(_jxl(grey), 24, 16)  # 16 bits: in a container (level 10)
    hostile = {
        "larger image": _jxl(np.zeros((2400, 1600), np.uint16), bitspersample=12),
        "colour": _jxl(np.stack([grey] * 3, -1), bitspersample=12),
        "alpha": bytes(imagecodecs.jpegxl_encode(np.stack([grey] * 2, -1), lossless=True,
                                                 photometric="gray")),
        "animation": bytes(imagecodecs.jpegxl_encode(np.stack([grey, grey]), lossless=True,
                                                     photometric="gray")),
        "float": bytes(imagecodecs.jpegxl_encode(grey.astype(np.float32) / 4000, lossless=True)),
        "lossy": bytes(imagecodecs.jpegxl_encode(grey, distance=2.0, usecontainer=False)),
        "extra box": _jxl(grey) + b"\x00\x00\x00\x0cExif\x00\x00\x00\x00",
        "not jpeg xl": b"\x89PNG\r\n\x1a\n" + bytes(64),
        "empty": b"",
    }
    _refuse_library_calls(monkeypatch)
    codec = get_codec("jpegxl")
    for what, payload in hostile.items():
        with pytest.raises(CodecError):
            check_jpegxl(payload, 24, 16)
        with pytest.raises(CodecError):  # the codec refuses it before the library sees it
            codec.decode(payload, (1, 24, 16),
                         {"offset": 0, "images": [[1, 1, max(1, len(payload))]]})
        assert what


def test_j2k_header_check_refuses_other_images_tiles_and_truncation(rng, monkeypatch):
    grey = rng.integers(0, 4000, (40, 48)).astype(np.uint16)
    good = bytes(imagecodecs.htj2k_encode(grey, reversible=True))
    check_j2k(good, 40, 48, "htj2k")
    hostile = [
        bytes(imagecodecs.htj2k_encode(np.zeros((4000, 4800), np.uint16), reversible=True)),
        bytes(imagecodecs.htj2k_encode(np.stack([grey] * 3, -1), reversible=True)),
        bytes(imagecodecs.htj2k_encode(grey, reversible=True, tile=(16, 16))),
        good[:-40], good[:len(good) // 2] + b"\xff\xd9", good[:60], b"\xff\x4f", b"",
    ]
    _refuse_library_calls(monkeypatch)
    for payload in hostile:
        with pytest.raises(CodecError):
            get_codec("htj2k").decode(payload, (1, 40, 48),
                                      {"offset": 0, "images": [[1, 1, max(1, len(payload))]]})


def test_jpegls_header_check_refuses_other_frames_and_oversize_segments(rng, monkeypatch):
    grey = rng.integers(0, 4000, (12, 10)).astype(np.uint16)
    frame = imaging._strip_spiff(bytes(imagecodecs.jpegls_encode(grey)))
    check_jpegls(frame, 12, 10)
    sos = frame.index(b"\xff\xda")
    oversize = frame[:sos] + b"\xff\xf8\x00\x0b\x04\x04" + (60000).to_bytes(4, "big") + frame[sos:]
    hostile = [bytes(imagecodecs.jpegls_encode(np.zeros((1200, 1000), np.uint16))),
               bytes(imagecodecs.jpegls_encode(np.stack([grey] * 3, -1))), oversize,
               frame[:sos], b"\xff\xd8\xff\xda", b""]
    _refuse_library_calls(monkeypatch)
    for payload in hostile:
        with pytest.raises(CodecError):
            get_codec("jpegls").decode(payload, (1, 12, 10), {"sizes": [max(1, len(payload))]})


FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_SHAPE = (3, 20, 18)


@pytest.fixture(scope="module")
def valid_payloads():
    rng = np.random.default_rng(5)
    block = rng.integers(-1500, 2500, _SHAPE).astype(np.int16)
    return {name: get_codec(name).encode(block) for name in IMAGE_CODECS}


@FUZZ
@given(st.data())
def test_mutated_payloads_raise_codec_errors_or_decode_to_the_announced_block(valid_payloads,
                                                                               data):
    name = data.draw(st.sampled_from(IMAGE_CODECS))
    payload, params = valid_payloads[name]
    mutated = bytearray(payload)
    how = data.draw(st.sampled_from(["flip", "truncate", "insert", "header"]))
    if how in ("flip", "header"):
        limit = min(len(mutated), 64) if how == "header" else len(mutated)
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, limit - 1))
            mutated[at] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        del mutated[data.draw(st.integers(0, len(mutated) - 1)):]
    else:
        at = data.draw(st.integers(0, len(mutated)))
        mutated[at:at] = data.draw(st.binary(min_size=1, max_size=32))
    if name == "jpegls":
        params = {"sizes": data.draw(st.one_of(st.just(params["sizes"]),
                                               st.lists(st.integers(-2, 3000), max_size=4)))}
    try:
        block = get_codec(name).decode(bytes(mutated), _SHAPE, params)
    except CodecError:
        return
    assert block.shape == _SHAPE and block.dtype == np.int16
