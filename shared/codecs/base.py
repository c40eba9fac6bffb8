"""The codec interface and registry.

A codec turns a block of slices (int16, shape ``(n, ny, nx)``) into one payload and back. The
parameters a decoder needs (offsets, frame sizes, exceptions) travel in the chunk next to the
payload as a small dict of msgpack-able values; encoder-only settings (quality, preset) do not.
Decoders are bounded: they never produce more voxels than the chunk's slice range announces.
"""

from __future__ import annotations

import abc

import numpy as np

BLOCK_DTYPE = np.dtype("<i2")


class CodecError(ValueError):
    """A payload cannot be decoded into the block it claims to be."""


class Codec(abc.ABC):
    """Encodes and decodes blocks of int16 slices."""

    #: Registry name written into every chunk.
    name: str = ""
    #: True when decode(encode(x)) == x for every int16 block.
    lossless: bool = True

    @abc.abstractmethod
    def encode(self, block: np.ndarray) -> tuple[bytes, dict]:
        """Compress ``block`` (int16, ``(n, ny, nx)``); return ``(payload, decode_params)``."""

    def decode(self, payload: bytes, shape: tuple[int, int, int], params: dict) -> np.ndarray:
        """Rebuild the int16 block of ``shape`` from ``payload`` and ``params``."""
        return self.decode_into(payload, params, np.empty(shape, BLOCK_DTYPE))

    @abc.abstractmethod
    def decode_into(self, payload: bytes, params: dict, out: np.ndarray) -> np.ndarray:
        """Decode the block into ``out`` (int16, C-contiguous, of the announced shape) and return
        it. The receiver decodes a base straight into the volume this way, without a block-sized
        buffer. When decoding fails (CodecError) ``out`` may be partly written."""


_REGISTRY: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` available by ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def codec_names() -> list[str]:
    return sorted(_REGISTRY)


def get_codec(name: str, **options) -> Codec:
    """A codec instance by registry name; ``options`` are encoder settings (quality, level)."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}; known: {', '.join(codec_names())}") from None
    return cls(**options)


def check_block(block: np.ndarray) -> np.ndarray:
    """Validate an encoder input: a 3D int16 array (made C-contiguous)."""
    block = np.asarray(block)
    if block.ndim != 3 or block.dtype != BLOCK_DTYPE:
        raise CodecError(f"codecs take int16 blocks (n, ny, nx), got {block.dtype} {block.shape}")
    return np.ascontiguousarray(block)


def to_unsigned(block: np.ndarray) -> np.ndarray:
    """int16 -> uint16 by adding 32768: a bijection, so 16-bit lossless coders see every value."""
    return (block.view(np.uint16) ^ np.uint16(0x8000))


def from_unsigned(block: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_unsigned`, in place: ``block`` (uint16, a decoder's own output)
    becomes the int16 result, so decoding holds one block, not two."""
    np.bitwise_xor(block, np.uint16(0x8000), out=block)
    return block.view(BLOCK_DTYPE)
