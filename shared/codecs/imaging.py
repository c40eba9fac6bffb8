"""Lossless image codecs of the field, through imagecodecs: JPEG XL, HTJ2K and JPEG-LS (CharLS).

Measured on the shared CTs (docs/BENCHMARKS.md, "Lossless codecs"): lossless JPEG XL (libjxl)
gives the best ratio of any coder available to dlad, HTJ2K (OpenJPH) the fastest decoding, and
CharLS the ratio of FFmpeg's JPEG-LS 1.3-1.5 x faster.

* ``jpegxl`` and ``htj2k`` code a block of slices as **few images**: consecutive slices laid
  out as a mosaic of ``columns`` slices per row (a divisor of the image's slices; a near-square
  mosaic lets libjxl learn one context model from many slices: 1-5 % smaller than slice by
  slice), each image at most :data:`MAX_IMAGE_PIXELS`, ``params["images"]`` = ``[[slices,
  columns, bytes], ...]``; after subtracting the block's minimum (``params["offset"]``), so
  that the images have only the bits the block needs (``bitspersample``).
* ``jpegls`` codes each slice as one JPEG-LS frame (T.87) of the int16 voxels plus 32768, the
  frames back to back (``params["sizes"]``): the same payload the earlier FFmpeg-based coder
  wrote, so streams of either build decode with the other. CharLS's SPIFF header (44 bytes a
  slice) is not sent.

Every decoder checks the codestream's header against the announced block before the library
sees it (:mod:`shared.codecs.headers`) and decodes into a buffer of the announced size, so a
payload cannot make the receiver allocate beyond its slice range.
"""

from __future__ import annotations

import math

import imagecodecs
import numpy as np

from shared.codecs.base import Codec, CodecError, check_block, from_unsigned, register, to_unsigned
from shared.codecs.headers import check_j2k, check_jpegls, check_jpegxl

#: Largest mosaic side in pixels: JPEG XL level 5 (the level every decoder supports) allows
#: 2^18; blocks that would exceed it are laid out with more rows (never more than that side).
MAX_MOSAIC_SIDE = 1 << 18
#: Pixels of one coded image at most (4 slices of 512 x 512). libjxl (effort 7) learns its
#: context model from a bounded sample of pixels: on the abdomen CT's residual layers, images of
#: 5 and 10 slices of 512 x 512 coded 3 % larger than images of 2 to 4 (docs/BENCHMARKS.md).
MAX_IMAGE_PIXELS = 1 << 20


def mosaic_columns(count: int, height: int, width: int) -> int:
    """Slices per mosaic row for a block of ``count`` slices: the divisor of ``count`` that
    makes the most square image (a divisor: no empty cells, so the image has exactly the
    block's voxels and decodes in the block's own memory).

    >>> mosaic_columns(4, 512, 512), mosaic_columns(30, 101, 122), mosaic_columns(3, 8, 512)
    (2, 5, 1)
    """
    target = math.sqrt(count * height / width)
    divisors = [c for c in range(1, count + 1) if count % c == 0 and c * width <= MAX_MOSAIC_SIDE]
    return min(divisors or [1], key=lambda c: (abs(math.log(c / target)), c))


def to_mosaic(block: np.ndarray, columns: int) -> np.ndarray:
    """Lay out ``block`` ``(n, ny, nx)`` as ``n / columns`` rows of ``columns`` slices."""
    count, height, width = block.shape
    rows = count // columns
    return block.reshape(rows, columns, height, width).transpose(0, 2, 1, 3).reshape(
        rows * height, columns * width)


def from_mosaic_in_place(image: np.ndarray, count: int, columns: int) -> None:
    """Reorder a decoded mosaic, in its own memory, into ``count`` consecutive slices.

    Mosaic row ``r`` occupies exactly the memory of slices ``r * columns`` to
    ``(r + 1) * columns - 1``: as image rows of ``columns`` slice rows each, ``(height,
    columns)`` slice rows to be transposed to ``(columns, height)``. The transposition follows
    the permutation's cycles, moving one slice row at a time, so it needs no buffer beyond one
    slice row (a receiver decodes a residual block with no second block beside it).
    """
    rows = count // columns
    height, width = image.shape[0] // rows, image.shape[1] // columns
    if columns == 1:
        return
    lines = height * columns
    for span in image.reshape(rows, lines, width):
        done = np.zeros(lines, bool)
        for start in range(lines):
            if done[start]:
                continue
            saved, target = span[start].copy(), start
            while True:
                done[target] = True
                # slice j, row y sits at y * columns + j and belongs at j * height + y
                source = (target % height) * columns + target // height
                if source == start:
                    span[target] = saved
                    break
                span[target] = span[source]
                target = source


def _offset_image(block: np.ndarray) -> tuple[np.ndarray, int, int]:
    """``block - min`` as uint16 (every int16 span fits), the offset and the bits it needs."""
    low, high = int(block.min()), int(block.max())
    shifted = block.view(np.uint16) - np.uint16(low & 0xFFFF)
    return shifted, low, max(1, (high - low).bit_length())


def _mosaic_params(params: dict, out: np.ndarray, payload_bytes: int, name: str
                   ) -> tuple[list[tuple[int, int, int]], int]:
    """Validated ``(images, offset)`` of a mosaic codec's chunk: the images cover the block's
    slices exactly, each with a column count that divides its slices, and the payload exactly."""
    images, offset = params.get("images"), params.get("offset")

    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if (not isinstance(images, list) or not 1 <= len(images) <= out.shape[0]
            or not all(isinstance(entry, list) and len(entry) == 3 and all(map(whole, entry))
                       and entry[0] > 0 and entry[1] > 0 and entry[0] % entry[1] == 0
                       and entry[2] > 0 for entry in images)
            or sum(entry[0] for entry in images) != out.shape[0]
            or sum(entry[2] for entry in images) != payload_bytes):
        raise CodecError(f"{name}: image layout does not match the block and payload")
    if not whole(offset) or not -32768 <= offset <= 32767:
        raise CodecError(f"{name}: invalid offset")
    return [tuple(entry) for entry in images], offset


def image_slices(count: int, height: int, width: int) -> list[int]:
    """Slices of each image a block of ``count`` slices is coded as: as few images as keep each
    within :data:`MAX_IMAGE_PIXELS`, of nearly equal slice counts.

    >>> image_slices(4, 512, 512), image_slices(10, 512, 512), image_slices(30, 101, 122)
    ([4], [4, 3, 3], [30])
    """
    per_image = max(1, MAX_IMAGE_PIXELS // (height * width))
    images = -(-count // per_image)
    return [count // images + (index < count % images) for index in range(images)]


class _MosaicCodec(Codec):
    """A block as offset mosaic images of an imagecodecs coder (``params["images"]``: ``[slices,
    columns, bytes]`` of each image, in slice order)."""

    def encode(self, block: np.ndarray) -> tuple[bytes, dict]:
        block = check_block(block)
        shifted, offset, bits = _offset_image(block)
        payloads, images, start = [], [], 0
        for count in image_slices(*block.shape):
            columns = mosaic_columns(count, *block.shape[1:])
            payloads.append(self.compress(to_mosaic(shifted[start:start + count], columns), bits))
            images.append([count, columns, len(payloads[-1])])
            start += count
        return b"".join(payloads), {"offset": offset, "images": images}

    def decode_into(self, payload: bytes, params: dict, out: np.ndarray) -> np.ndarray:
        images, offset = _mosaic_params(params, out, len(payload), self.name)
        _, height, width = out.shape
        payload = bytes(payload)
        start = position = 0
        for count, columns, size in images:
            data = payload[position:position + size]
            rows = count // columns
            self.check(data, rows * height, columns * width)
            # The mosaic has its slices' voxels: decoded in their memory, then reordered.
            image = out[start:start + count].view(np.uint16).reshape(rows * height, columns * width)
            self.decompress(data, image)
            from_mosaic_in_place(image, count, columns)
            start, position = start + count, position + size
        planes = out.view(np.uint16)
        np.add(planes, np.uint16(offset & 0xFFFF), out=planes)  # wraps modulo 2^16: int16 again
        return out

    def compress(self, image: np.ndarray, bits: int) -> bytes:
        raise NotImplementedError

    def check(self, payload: bytes, height: int, width: int) -> None:
        raise NotImplementedError

    def decompress(self, payload: bytes, image: np.ndarray) -> None:
        raise NotImplementedError

    def _call(self, function, payload: bytes, image: np.ndarray, **options) -> None:
        try:
            decoded = function(payload, out=image, **options)
        except Exception as error:  # imagecodecs' JpegxlError, Htj2kError..., and ValueError
            raise CodecError(f"{self.name}: corrupt payload ({error})") from None
        if decoded is not image:
            raise CodecError(f"{self.name}: payload does not decode into the announced block")


@register
class JpegXlCodec(_MosaicCodec):
    """Lossless JPEG XL (ISO/IEC 18181, libjxl modular mode).

    Args:
        effort: libjxl effort 1-9 (7, its default, is 10 x slower to encode than 3 and 1-3 %
            smaller on CT; decoding speed hardly depends on it).
    """

    name = "jpegxl"

    def __init__(self, effort: int = 7):
        if not 1 <= effort <= 9:
            raise ValueError(f"JPEG XL effort must be in [1, 9], got {effort}")
        self.effort = effort

    def compress(self, image: np.ndarray, bits: int) -> bytes:
        # One thread: the sender runs several encoders side by side; lossless output does not
        # depend on it.
        # libjxl refuses 16-bit input declared with 8 or fewer bits (JXL_ENC_ERR_GENERIC); the
        # declared depth does not change the lossless coding, so at least 9 are declared.
        return bytes(imagecodecs.jpegxl_encode(image, lossless=True, effort=self.effort,
                                               bitspersample=max(9, bits), usecontainer=False,
                                               numthreads=1))

    def check(self, payload: bytes, height: int, width: int) -> None:
        check_jpegxl(payload, height, width)

    def decompress(self, payload: bytes, image: np.ndarray) -> None:
        self._call(imagecodecs.jpegxl_decode, payload, image, numthreads=1)


@register
class Htj2kCodec(_MosaicCodec):
    """Lossless High-Throughput JPEG 2000 (ISO/IEC 15444-15, OpenJPH), reversible 5/3 wavelet:
    the fastest decoding of the lossless coders (4-20 x JPEG XL), at 8-13 % more bytes."""

    name = "htj2k"

    def compress(self, image: np.ndarray, bits: int) -> bytes:
        return bytes(imagecodecs.htj2k_encode(image, reversible=True))

    def check(self, payload: bytes, height: int, width: int) -> None:
        check_j2k(payload, height, width, self.name)

    def decompress(self, payload: bytes, image: np.ndarray) -> None:
        self._call(imagecodecs.htj2k_decode, payload, image)


_SPIFF_END = b"\xff\xe8\x00\x08\x00\x00\x00\x01"


def _strip_spiff(frame: bytes) -> bytes:
    """CharLS's frame without its SPIFF header (APP8 header, directory, end-of-directory entry
    that carries the frame's own SOI): the plain JPEG-LS frame FFmpeg writes too."""
    if frame[2:4] == b"\xff\xe8" and frame[6:12] == b"SPIFF\x00":
        end = frame.find(_SPIFF_END)
        if end > 0:
            return frame[end + len(_SPIFF_END):]
    return frame


@register
class JpegLsCodec(Codec):
    """JPEG-LS (ITU-T T.87, LOCO-I; CharLS), lossless, 16-bit grey after a +32768 shift."""

    name = "jpegls"

    def encode(self, block: np.ndarray) -> tuple[bytes, dict]:
        frames = [_strip_spiff(bytes(imagecodecs.jpegls_encode(np.ascontiguousarray(plane))))
                  for plane in to_unsigned(check_block(block))]
        return b"".join(frames), {"sizes": [len(frame) for frame in frames]}

    def decode_into(self, payload: bytes, params: dict, out: np.ndarray) -> np.ndarray:
        count, height, width = out.shape
        sizes = params.get("sizes")
        if (not isinstance(sizes, list) or len(sizes) != count
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)
                or sum(sizes) != len(payload)):
            raise CodecError("jpegls: frame sizes do not match the payload")
        planes, position = out.view(np.uint16), 0
        payload = bytes(payload)
        for index, size in enumerate(sizes):
            frame = payload[position:position + size]
            position += size
            check_jpegls(frame, height, width)
            try:
                decoded = imagecodecs.jpegls_decode(frame, out=planes[index])
            except Exception as error:  # imagecodecs.JpeglsError and ValueError
                raise CodecError(f"jpegls: corrupt payload ({error})") from None
            if decoded is not planes[index] and not np.shares_memory(decoded, planes[index]):
                raise CodecError("jpegls: frame does not decode into the announced slice")
        from_unsigned(planes)
        return out

