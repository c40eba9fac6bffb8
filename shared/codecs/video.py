"""Image and video codecs from FFmpeg, through PyAV: FFV1 and HEVC (x265).

Each slice of a block is one frame. The payload is the encoder's packets back to back; their
sizes travel in the chunk parameters, so the decoder feeds whole packets and never depends on a
bitstream parser. Decoding stops with an error as soon as a payload yields more frames than the
chunk announces, or frames of the wrong size.

HEVC works on 12-bit grey (``gray12le``), the deepest grey format x265 takes. An int16 block is
moved into 12 bits by subtracting an ``offset``, chosen as the start of the 4096-wide window
that holds the most voxels. In the lossless codec the voxels outside the window are sent as
exceptions (flat index + value, zstd-compressed), so every int16 value survives; the lossy codec
clips them (the layered codec's residual layers restore them).
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import zstandard

from shared.codecs.base import BLOCK_DTYPE, Codec, CodecError, check_block, from_unsigned, register, to_unsigned

av.logging.set_level(av.logging.ERROR)

TWELVE_BIT_LEVELS = 4096
#: x265 refuses pictures smaller than this on either side; smaller slices are edge-padded.
MIN_HEVC_SIDE = 16
#: Frame widths on which the x265 of PyAV's wheels (4.x, 12-bit) corrupts its heap and aborts
#: the process when a block has 3 frames or more (measured: every width from 33 to 48, any
#: preset, thread layout or rate; 32 and 49 are fine): such slices are edge-padded to
#: :data:`SAFE_HEVC_WIDTH`.
UNSAFE_HEVC_WIDTHS = range(33, 49)
SAFE_HEVC_WIDTH = 64


def encode_frames(encoder: str, pix_fmt: str, frames: np.ndarray, options: dict
                  ) -> tuple[bytes, dict]:
    """Encode uint16 frames ``(n, ny, nx)``; return ``(payload, {"sizes", "extradata"})``."""
    context = av.CodecContext.create(encoder, "w")
    context.width = frames.shape[2]
    context.height = frames.shape[1]
    context.pix_fmt = pix_fmt
    context.time_base = Fraction(1, 25)
    context.options = dict(options)
    packets = []
    for index, plane in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(plane), format=pix_fmt)
        frame.pts = index
        packets.extend(bytes(packet) for packet in context.encode(frame))
    packets.extend(bytes(packet) for packet in context.encode(None))
    params = {"sizes": [len(p) for p in packets]}
    if context.extradata:
        params["extradata"] = bytes(context.extradata)
    return b"".join(packets), params


def decode_frames(decoder: str, payload: bytes, shape, params: dict,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Decode the packets of ``payload`` into exactly ``shape[0]`` frames of ``shape[1:]``.

    The frames go into ``out`` (uint16 of ``shape``) or a new array, which is returned. Each
    frame is copied there as soon as it is decoded, so the decoder reuses its frame buffers and
    no other block-sized array is made.
    """
    count, height, width = (int(n) for n in shape)
    sizes = params.get("sizes")
    if (not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes)
            or sum(sizes) != len(payload) or len(sizes) > count):
        raise CodecError(f"{decoder}: packet sizes do not match the payload")
    context = av.CodecContext.create(decoder, "r")
    context.width, context.height = width, height
    # One thread: the default starts one per core for every chunk, each with its own slice
    # context (and malloc arena), and costs more CPU (HEVC, 4 slices of 512 x 512 on 2 cores:
    # 10-14 ms instead of 8 ms), while the receiver's goodput is bound by its CPU.
    context.thread_count = 1
    extradata = params.get("extradata")
    if extradata:
        context.extradata = bytes(extradata)
    planes = np.empty((count, height, width), np.uint16) if out is None else out
    decoded = 0

    def collect(frames):
        nonlocal decoded
        for frame in frames:
            if decoded == count:
                raise CodecError(f"{decoder}: payload holds more than the {count} announced frames")
            if (frame.height, frame.width) != (height, width):
                raise CodecError(f"{decoder}: frame of {frame.width}x{frame.height}, "
                                 f"expected {width}x{height}")
            try:
                plane = frame.to_ndarray()  # for grey formats a view of the frame's buffer
            except ValueError:  # a pixel format numpy cannot take
                plane = None
            if plane is None or plane.shape != (height, width):
                raise CodecError(f"{decoder}: frames in pixel format {frame.format.name}, "
                                 "expected one grey plane")
            planes[decoded] = plane
            decoded += 1

    position = 0
    try:
        for size in sizes:
            collect(context.decode(av.Packet(payload[position:position + size])))
            position += size
        collect(context.decode(None))
    except av.error.FFmpegError as error:
        raise CodecError(f"{decoder}: corrupt payload ({error})") from None
    if decoded != count:
        raise CodecError(f"{decoder}: payload decoded to {decoded} frames, expected {count}")
    return planes


@register
class Ffv1Codec(Codec):
    """FFV1 (RFC 9043) version 1, range coder with large contexts, 16-bit grey, intra only."""

    name = "ffv1"

    def encode(self, block: np.ndarray) -> tuple[bytes, dict]:
        options = {"level": "1", "coder": "1", "context": "1", "g": "1"}
        return encode_frames("ffv1", "gray16le", to_unsigned(check_block(block)), options)

    def decode_into(self, payload: bytes, params: dict, out: np.ndarray) -> np.ndarray:
        from_unsigned(decode_frames("ffv1", payload, out.shape, params, out.view(np.uint16)))
        return out


def best_12bit_offset(block: np.ndarray) -> int:
    """Start of the 4096-value window holding the most voxels (ties: the lowest start)."""
    counts = np.bincount((block.astype(np.int32) + 32768).ravel(), minlength=65536)
    cumulative = np.concatenate([[0], np.cumsum(counts)])
    window = cumulative[TWELVE_BIT_LEVELS:] - cumulative[:-TWELVE_BIT_LEVELS]
    return int(np.argmax(window)) - 32768


def _x265_options(params: str, preset: str) -> dict:
    # A fixed thread layout (4 worker threads, one frame at a time) makes the bitstream
    # identical on every machine: a resumed or restarted sender reproduces exactly the base the
    # receiver already holds, which its residuals are computed against. info=0: no SEI message
    # with x265's version and options in every chunk (2.3 kB each, 6-15 % of a study's bases).
    return {"x265-params": f"{params}:frame-threads=1:pools=4:info=0:log-level=error", "preset": preset}


def _padded_shape(shape) -> tuple[int, int, int]:
    """The frame size a block of ``shape`` is coded at (its slices edge-padded to it)."""
    width = SAFE_HEVC_WIDTH if shape[2] in UNSAFE_HEVC_WIDTHS else max(shape[2], MIN_HEVC_SIDE)
    return (shape[0], max(shape[1], MIN_HEVC_SIDE), width)


class _Hevc12Bit(Codec):
    """Shared 12-bit window mapping of the HEVC codecs (and padding of tiny slices)."""

    def _to_12bit(self, block: np.ndarray) -> tuple[np.ndarray, int]:
        offset = best_12bit_offset(block)
        shifted = np.clip(block.astype(np.int32) - offset, 0, TWELVE_BIT_LEVELS - 1)
        _, height, width = _padded_shape(block.shape)
        pad = ((0, 0), (0, height - block.shape[1]), (0, width - block.shape[2]))
        return np.pad(shifted, pad, mode="edge").astype(np.uint16), offset

    def _decode_12bit(self, payload: bytes, params: dict, out: np.ndarray) -> None:
        offset = params.get("offset")
        if not isinstance(offset, int) or not -32768 <= offset <= 32767:
            raise CodecError(f"{self.name}: missing or invalid 12-bit offset")
        padded = _padded_shape(out.shape)
        if padded == tuple(out.shape):
            planes = decode_frames("hevc", payload, padded, params, out.view(np.uint16))
        else:  # slices under MIN_HEVC_SIDE (or of unsafe widths) were edge-padded: crop
            planes = decode_frames("hevc", payload, padded, params)[:, :out.shape[1], :out.shape[2]]
        if offset + TWELVE_BIT_LEVELS - 1 <= 32767:
            # No int16 overflow possible: int16 arithmetic in place, no int32 copies.
            np.add(planes.view(BLOCK_DTYPE), np.int16(offset), out=out)
        else:
            np.copyto(out, np.clip(planes.astype(np.int32) + offset, -32768, 32767),
                      casting="unsafe")


@register
class HevcLosslessCodec(_Hevc12Bit):
    """HEVC lossless (x265 ``lossless=1``) on 12-bit grey, with int16 exceptions outside 12 bits."""

    name = "hevc-lossless"

    def __init__(self, preset: str = "medium"):
        self.preset = preset

    def encode(self, block: np.ndarray) -> tuple[bytes, dict]:
        block = check_block(block)
        planes, offset = self._to_12bit(block)
        payload, params = encode_frames("libx265", "gray12le", planes,
                                        _x265_options("lossless=1", self.preset))
        params["offset"] = offset
        outside = np.flatnonzero((block < offset) | (block > offset + TWELVE_BIT_LEVELS - 1))
        if outside.size:
            table = np.concatenate([outside.astype("<u4").view("<u2").reshape(-1, 2).ravel(),
                                    block.ravel()[outside].view("<u2")])
            params["exceptions"] = zstandard.ZstdCompressor(level=19).compress(table.tobytes())
            params["exception_count"] = int(outside.size)
        return payload, params

    def decode_into(self, payload: bytes, params: dict, out: np.ndarray) -> np.ndarray:
        self._decode_12bit(payload, params, out)
        count = params.get("exception_count", 0)
        if count:
            total = out.size
            if not isinstance(count, int) or not 0 < count <= total:
                raise CodecError(f"{self.name}: invalid exception count")
            expected = count * 6
            try:
                with zstandard.ZstdDecompressor().stream_reader(bytes(params["exceptions"])) as r:
                    table = r.read(expected + 1)
            except (KeyError, TypeError, zstandard.ZstdError):
                raise CodecError(f"{self.name}: corrupt exception table") from None
            if len(table) != expected:
                raise CodecError(f"{self.name}: exception table has the wrong size")
            words = np.frombuffer(table, dtype="<u2")
            indices = words[: 2 * count].copy().view("<u4").astype(np.int64)
            if indices.max() >= total:
                raise CodecError(f"{self.name}: exception index out of range")
            out.reshape(-1)[indices] = words[2 * count:].view(BLOCK_DTYPE)
        return out


@register
class HevcLossyCodec(_Hevc12Bit):
    """Lossy HEVC (x265) on 12-bit grey, at a constant rate factor or a fixed QP."""

    name = "hevc"
    lossless = False

    def __init__(self, crf: float | None = None, qp: int | None = None, preset: str = "medium",
                 keyint: int | None = None):
        if crf is None and qp is None:
            crf = 12.0
        if crf is not None and qp is not None:
            raise ValueError("give either a CRF or a QP for lossy HEVC, not both")
        if crf is not None and not 0 <= crf <= 51:
            raise ValueError(f"HEVC CRF must be in [0, 51], got {crf}")
        if qp is not None and not 0 <= qp <= 51:
            raise ValueError(f"HEVC QP must be in [0, 51], got {qp}")
        self.crf, self.qp, self.preset, self.keyint = crf, qp, preset, keyint

    def encode(self, block: np.ndarray) -> tuple[bytes, dict]:
        planes, offset = self._to_12bit(check_block(block))
        rate = f"crf={self.crf}" if self.crf is not None else f"qp={self.qp}"
        if self.keyint:
            rate += f":keyint={self.keyint}"
        payload, params = encode_frames("libx265", "gray12le", planes,
                                        _x265_options(rate, self.preset))
        params["offset"] = offset
        return payload, params

    def decode_into(self, payload: bytes, params: dict, out: np.ndarray) -> np.ndarray:
        self._decode_12bit(payload, params, out)
        return out
