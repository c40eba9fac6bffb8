"""General-purpose lossless byte compressors on raw little-endian int16: zstd, bz2, lzma, zlib.

Decompression is bounded by the size the chunk announces (``n * ny * nx * 2`` bytes): a payload
that would expand past it is rejected, so a hostile chunk cannot exhaust memory.
"""

from __future__ import annotations

import bz2
import lzma
import zlib

import numpy as np
import zstandard

from shared.codecs.base import BLOCK_DTYPE, Codec, CodecError, check_block, register


class ByteCodec(Codec):
    """Base for codecs that compress the block's raw bytes."""

    def encode(self, block: np.ndarray) -> tuple[bytes, dict]:
        return self.compress(check_block(block).tobytes()), {}

    def decode_into(self, payload: bytes, params: dict, out: np.ndarray) -> np.ndarray:
        expected = out.size * BLOCK_DTYPE.itemsize
        raw = self.decompress(bytes(payload), expected)
        if len(raw) != expected:
            raise CodecError(f"{self.name}: payload holds {len(raw)} bytes, expected {expected}")
        np.copyto(out, np.frombuffer(raw, dtype=BLOCK_DTYPE).reshape(out.shape))
        return out

    def compress(self, raw: bytes) -> bytes:
        raise NotImplementedError

    def decompress(self, payload: bytes, limit: int) -> bytes:
        raise NotImplementedError


def _bounded(decompressor, payload: bytes, limit: int, name: str) -> bytes:
    """Run a stdlib incremental decompressor without producing more than ``limit + 1`` bytes."""
    try:
        raw = decompressor.decompress(payload, max_length=limit + 1)
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as error:
        raise CodecError(f"{name}: corrupt payload ({error})") from None
    if len(raw) > limit:
        raise CodecError(f"{name}: payload expands beyond the announced {limit} bytes")
    if not decompressor.eof:
        raise CodecError(f"{name}: truncated payload")
    return raw


@register
class ZstdCodec(ByteCodec):
    """Zstandard (Collet, RFC 8878)."""

    name = "zstd"

    def __init__(self, level: int = 19):
        if not 1 <= level <= 22:
            raise ValueError(f"zstd level must be in [1, 22], got {level}")
        self.level = level

    def compress(self, raw: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=self.level).compress(raw)

    def decompress(self, payload: bytes, limit: int) -> bytes:
        try:
            with zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=False) as reader:
                raw = reader.read(limit + 1)
        except zstandard.ZstdError as error:
            raise CodecError(f"zstd: corrupt payload ({error})") from None
        if len(raw) > limit:
            raise CodecError(f"zstd: payload expands beyond the announced {limit} bytes")
        return raw


@register
class Bz2Codec(ByteCodec):
    """bzip2 (Burrows–Wheeler), level 9."""

    name = "bz2"

    def compress(self, raw: bytes) -> bytes:
        return bz2.compress(raw, 9)

    def decompress(self, payload: bytes, limit: int) -> bytes:
        return _bounded(bz2.BZ2Decompressor(), payload, limit, self.name)


@register
class LzmaCodec(ByteCodec):
    """LZMA2 (xz container), preset 9."""

    name = "lzma"

    def compress(self, raw: bytes) -> bytes:
        return lzma.compress(raw, preset=9)

    def decompress(self, payload: bytes, limit: int) -> bytes:
        return _bounded(lzma.LZMADecompressor(), payload, limit, self.name)


@register
class ZlibCodec(ByteCodec):
    """DEFLATE (zlib container), level 9: what gzip -9 does."""

    name = "zlib"

    def compress(self, raw: bytes) -> bytes:
        return zlib.compress(raw, 9)

    def decompress(self, payload: bytes, limit: int) -> bytes:
        return _bounded(zlib.decompressobj(), payload, limit, self.name)
