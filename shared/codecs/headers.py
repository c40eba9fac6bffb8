"""Strict header checks of the image codestreams the receiver decodes through imagecodecs.

A decoder library sizes its buffers from the codestream's own header, not from what the chunk
announces. Before any payload reaches libjxl, OpenJPH or CharLS, its header is parsed here and
must describe exactly the image the chunk's slice range announces: one grey channel, integer
samples of at most 16 bits, the announced width and height, and nothing that makes a decoder
allocate more (animation, previews, extra channels, cropped or extra frames, oversized tiles).
Only the forms dlad's own encoders produce pass; anything else is a :class:`CodecError` before
decoding starts, so a hostile payload cannot make the receiver allocate beyond its slice range.

References: ISO/IEC 18181-1 (JPEG XL codestream: SizeHeader, ImageMetadata, FrameHeader);
ITU-T T.800 / ISO/IEC 15444-1 and -15 (JPEG 2000 and HTJ2K codestream, SIZ marker segment);
ITU-T T.87 / ISO/IEC 14495-1 (JPEG-LS, SOF55 and LSE marker segments).
"""

from __future__ import annotations

import struct

from shared.codecs.base import CodecError

#: Deepest integer samples any dlad codec writes (int16 voxels as uint16).
MAX_SAMPLE_BITS = 16


# --- JPEG XL ----------------------------------------------------------------------------------

class _Bits:
    """LSB-first bit reader over a byte string (the JPEG XL bit order)."""

    def __init__(self, data: bytes):
        self.value = int.from_bytes(data, "little")
        self.size = 8 * len(data)
        self.position = 0

    def read(self, count: int) -> int:
        if self.position + count > self.size:
            raise CodecError("jpegxl: header truncated")
        bits = (self.value >> self.position) & ((1 << count) - 1)
        self.position += count
        return bits

    def flag(self) -> bool:
        return bool(self.read(1))

    def u32(self, *distribution: tuple[int, int]) -> int:
        """U32(d0, d1, d2, d3): a 2-bit selector, then ``offset + read(bits)`` of that choice."""
        offset, bits = distribution[self.read(2)]
        return offset + (self.read(bits) if bits else 0)

    def u64(self) -> int:
        selector = self.read(2)
        if selector == 0:
            return 0
        if selector == 1:
            return 1 + self.read(4)
        if selector == 2:
            return 17 + self.read(8)
        value, shift = self.read(12), 12
        while self.flag():
            if shift == 60:
                return value | self.read(4) << shift
            value |= self.read(8) << shift
            shift += 8
        return value

    def enum(self) -> int:
        return self.u32((0, 0), (1, 0), (2, 4), (18, 6))


#: Width over height of SizeHeader's ``ratio`` codes 1-7 (0: the width is coded).
_ASPECT = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}
_JXL_SIZE = ((1, 9), (1, 13), (1, 18), (1, 30))
_COLOUR_SPACE_GREY = 1
_FRAME_REGULAR = 0


def _jxl_size(bits: _Bits) -> tuple[int, int]:
    """SizeHeader -> (height, width)."""
    small = bits.flag()
    height = 8 * (bits.read(5) + 1) if small else bits.u32(*_JXL_SIZE)
    ratio = bits.read(3)
    if ratio:
        numerator, denominator = _ASPECT[ratio]
        width = height * numerator // denominator
    else:
        width = 8 * (bits.read(5) + 1) if small else bits.u32(*_JXL_SIZE)
    return height, width


#: Boxes of the JPEG XL container (ISO/IEC 18181-2) libjxl writes around a codestream that
#: needs level 10 (16-bit samples): signature, file type, level, the codestream.
_JXL_BOXES = {b"JXL ", b"ftyp", b"jxll", b"jxlc"}


def _jxl_codestream(payload: bytes) -> bytes:
    """The codestream of a bare codestream or of a container with exactly one ``jxlc`` box."""
    if payload[:2] == b"\xff\x0a":
        return payload
    if payload[:12] != b"\x00\x00\x00\x0cJXL \x0d\x0a\x87\x0a":
        raise CodecError("jpegxl: not a JPEG XL codestream")
    position, codestream = 0, None
    while position < len(payload):
        if position + 8 > len(payload):
            raise CodecError("jpegxl: truncated container box")
        size, kind = int.from_bytes(payload[position:position + 4], "big"), payload[position + 4:position + 8]
        header = 8
        if size == 1:
            if position + 16 > len(payload):
                raise CodecError("jpegxl: truncated container box")
            size, header = int.from_bytes(payload[position + 8:position + 16], "big"), 16
        elif size == 0:
            size = len(payload) - position
        if kind not in _JXL_BOXES or size < header or position + size > len(payload):
            raise CodecError(f"jpegxl: container box {kind!r} is not accepted")
        if kind == b"jxlc":
            if codestream is not None:
                raise CodecError("jpegxl: more than one codestream box")
            codestream = payload[position + header:position + size]
        position += size
    if codestream is None or codestream[:2] != b"\xff\x0a":
        raise CodecError("jpegxl: container without a codestream")
    return codestream


def check_jpegxl(payload: bytes, height: int, width: int) -> None:
    """Accept only a JPEG XL codestream (bare, or in a container of its signature, file type,
    level and one codestream box) holding one grey, integer, lossless (modular)
    frame of ``height x width`` with at most 16 bits per sample.

    Raises:
        CodecError: anything else (other boxes, other size, colour or extra channels, float
            samples, animation, preview, cropped, blended, upsampled or several frames).
    """
    codestream = _jxl_codestream(payload)
    bits = _Bits(codestream[2:2 + 512])  # the headers of a grey image fit in far fewer bytes
    if _jxl_size(bits) != (height, width):
        raise CodecError(f"jpegxl: codestream is not of the announced {width}x{height}")
    # ImageMetadata: a grey integer image is never "all default" (that means 8-bit sRGB RGB).
    if bits.flag():
        raise CodecError("jpegxl: not a grey image")
    if bits.flag():
        raise CodecError("jpegxl: orientation, preview or animation fields are not accepted")
    if bits.flag():
        raise CodecError("jpegxl: floating-point samples are not accepted")
    depth = bits.u32((8, 0), (10, 0), (12, 0), (1, 6))
    if depth > MAX_SAMPLE_BITS:
        raise CodecError(f"jpegxl: {depth}-bit samples (at most {MAX_SAMPLE_BITS})")
    bits.flag()  # modular_16bit_buffers
    if bits.u32((0, 0), (1, 0), (2, 4), (1, 12)):
        raise CodecError("jpegxl: extra channels are not accepted")
    if bits.flag():
        raise CodecError("jpegxl: XYB (lossy) colour is not accepted")
    if bits.flag():  # colour encoding all_default: sRGB, three channels
        raise CodecError("jpegxl: not a grey image")
    if bits.flag():
        raise CodecError("jpegxl: ICC profiles are not accepted")
    if bits.enum() != _COLOUR_SPACE_GREY:
        raise CodecError("jpegxl: not a grey image")
    if bits.enum() == 2:  # custom white point: two chromaticity coordinates
        bits.u32((0, 19), (524288, 19), (1048576, 20), (2097152, 21))
        bits.u32((0, 19), (524288, 19), (1048576, 20), (2097152, 21))
    if bits.flag():
        bits.read(24)  # gamma
    else:
        bits.enum()  # transfer function
    bits.enum()  # rendering intent
    if bits.u64():
        raise CodecError("jpegxl: metadata extensions are not accepted")
    if not bits.flag():
        raise CodecError("jpegxl: custom transform data is not accepted")
    bits.read(-bits.position % 8)  # zero padding to the byte boundary before the first frame
    # FrameHeader of the first frame.
    if bits.flag():
        raise CodecError("jpegxl: not a lossless (modular) frame")
    if bits.read(2) != _FRAME_REGULAR:
        raise CodecError("jpegxl: the first frame is not a regular frame")
    if not bits.flag():
        raise CodecError("jpegxl: not a lossless (modular) frame")
    if bits.u64():
        raise CodecError("jpegxl: frame features (noise, patches, splines, LF frames) are not "
                         "accepted")
    if bits.flag():
        raise CodecError("jpegxl: YCbCr frames are not accepted")
    if bits.read(2):
        raise CodecError("jpegxl: upsampled frames are not accepted")
    bits.read(2)  # group_size_shift
    if bits.read(2):
        raise CodecError("jpegxl: multi-pass frames are not accepted")
    if bits.flag():
        raise CodecError("jpegxl: cropped frames are not accepted")
    if bits.read(2):
        raise CodecError("jpegxl: blended frames are not accepted")
    if not bits.flag():
        raise CodecError("jpegxl: more than one frame")


# --- JPEG 2000 / HTJ2K -------------------------------------------------------------------------

_SIZ = struct.Struct(">HHHIIIIIIIIH")


def check_j2k(payload: bytes, height: int, width: int, name: str) -> None:
    """Accept only a raw JPEG 2000 codestream (SOC, then SIZ) of one unsigned grey component of
    ``height x width``, at most 16 bits, in a single tile.

    Raises:
        CodecError: anything else.
    """
    if payload[:2] != b"\xff\x4f" or len(payload) < 4 + _SIZ.size + 3:
        raise CodecError(f"{name}: not a JPEG 2000 codestream")
    (marker, length, _capabilities, x_size, y_size, x_origin, y_origin, tile_width, tile_height,
     tile_x, tile_y, components) = _SIZ.unpack_from(payload, 2)
    if marker != 0xFF51 or length != 38 + 3 * components:
        raise CodecError(f"{name}: malformed SIZ marker segment")
    if (y_size - y_origin, x_size - x_origin) != (height, width) or x_size <= x_origin:
        raise CodecError(f"{name}: codestream is not of the announced {width}x{height}")
    if components != 1:
        raise CodecError(f"{name}: {components} components, expected one grey component")
    depth, x_step, y_step = payload[2 + _SIZ.size:2 + _SIZ.size + 3]
    if depth & 0x80 or (depth & 0x7F) + 1 > MAX_SAMPLE_BITS or (x_step, y_step) != (1, 1):
        raise CodecError(f"{name}: not an unsigned component of at most {MAX_SAMPLE_BITS} bits")
    if tile_x > x_origin or tile_y > y_origin or tile_x + tile_width < x_size \
            or tile_y + tile_height < y_size:
        raise CodecError(f"{name}: more than one tile")
    # The decoders accept a truncated codestream and fill in what is missing: refuse one whose
    # single tile-part (SOT's Psot, its length up to the EOC marker) is not all there.
    position = 2
    while True:
        if position + 4 > len(payload) or payload[position] != 0xFF:
            raise CodecError(f"{name}: malformed main header")
        marker = payload[position + 1]
        length = int.from_bytes(payload[position + 2:position + 4], "big")
        if marker == 0x90:  # SOT
            break
        if length < 2:
            raise CodecError(f"{name}: malformed main header")
        position += 2 + length
    tile_part = int.from_bytes(payload[position + 6:position + 10], "big")
    if payload[-2:] != b"\xff\xd9" or tile_part != len(payload) - 2 - position:
        raise CodecError(f"{name}: truncated codestream")


# --- JPEG-LS ------------------------------------------------------------------------------------

_SOF55, _LSE, _SOS, _SOI = 0xF7, 0xF8, 0xDA, 0xD8


def check_jpegls(payload: bytes, height: int, width: int) -> None:
    """Accept only a JPEG-LS frame of one component of ``height x width``, at most 16 bits,
    whose dimensions no LSE segment overrides.

    Raises:
        CodecError: anything else.
    """
    if payload[:2] != b"\xff\xd8":
        raise CodecError("jpegls: not a JPEG-LS frame")
    position, frame = 2, None
    while True:
        if position + 4 > len(payload) or payload[position] != 0xFF:
            raise CodecError("jpegls: malformed marker segments")
        marker = payload[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == _SOS:
            break
        length = int.from_bytes(payload[position + 2:position + 4], "big")
        segment = payload[position + 4:position + 2 + length]
        if length < 2 or len(segment) != length - 2:
            raise CodecError("jpegls: malformed marker segments")
        if marker == _SOF55:
            if frame is not None or len(segment) != 9:
                raise CodecError("jpegls: not a single one-component frame")
            precision, rows, columns, components = struct.unpack(">BHHB", segment[:6])
            frame = (precision, rows, columns, components)
        elif marker == _LSE and segment[:1] == b"\x04":
            raise CodecError("jpegls: oversize-dimension segments are not accepted")
        elif not (0xE0 <= marker <= 0xEF or marker in (_LSE, 0xDD, 0xFE)):  # APPn, LSE, DRI, COM
            raise CodecError(f"jpegls: unexpected marker 0xFF{marker:02X}")
        position += 2 + length
    if frame is None:
        raise CodecError("jpegls: no frame header before the scan")
    precision, rows, columns, components = frame
    if components != 1 or not 2 <= precision <= MAX_SAMPLE_BITS:
        raise CodecError("jpegls: not one component of at most 16 bits")
    if (rows, columns) != (height, width):
        raise CodecError(f"jpegls: frame is not of the announced {width}x{height}")
