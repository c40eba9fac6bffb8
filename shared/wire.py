"""The dlad-stream wire format: checksummed, msgpack-framed, self-describing chunks.

The same bytes go to a ``.dlad`` file or over a network channel. A stream is a sequence of
frames; the first is a header, then data chunks, then an end marker. A header may announce the
ROI as *pending* (``roi_pending``): then an ROI frame follows the first previews and brings
what the ROI decides (see "Pending ROI" below).

Frame layout (all integers big-endian)::

    offset  size  field
    0       4     magic b"DLAD"
    4       1     wire version (1)
    5       1     kind: 1 = header, 2 = data chunk, 3 = end of stream, 4 = ROI frame
    6       4     body length n (at most MAX_BODY_BYTES)
    10      16    checksum: BLAKE2b-128 of the body
    26      n     body: a msgpack map (fields below)

The checksum covers every field of the chunk, payload included; a frame whose checksum does not
match is reported and skipped, never used. After a bad frame a reader resynchronises on the next
magic whose frame verifies.

Header body (kind 1):

=================  ===========================================================================
``format``         ``"dlad-stream"``
``version``        format version of the body (1); unknown versions are rejected
``study_id``       sender-chosen id of the study (at most 128 characters)
``created``        ISO-8601 UTC time the stream was made
``shape``          ``[nz, ny, nx]``: slices, rows, columns (slice-major voxel order)
``affine``         16 floats, row-major 4x4 mapping voxel ``(i, j, k, 1)`` to RAS+ mm; its last
                   row is ``0 0 0 1`` and its 3x3 part is invertible (else the header is refused)
``spacing``        ``[sx, sy, sz]`` voxel size in mm, each > 0
``source_dtype``   dtype of the voxels in the source file (``"int16"``, ``"uint16"``...)
``rescale``        ``[slope, intercept]``: HU = stored * slope + intercept
``value_range``    ``[min, max]`` HU of the original; lossy voxels are clipped to it. A header
                   whose ``source_dtype`` and ``rescale`` cannot store every integer HU of this
                   range exactly (slope 1, integral intercept of at most 2^24 in magnitude:
                   NIfTI's float32 ``scl_inter``, range within the dtype's) is refused: the
                   receiver's output never clips or rounds
``sha256``         hex SHA-256 of the original voxels as int16 little-endian, slice-major;
                   the receiver reports the exact layer verified only when its volume hashes
                   to it
``roi_digests``    list of ``[z0, z1, digest]``, one per block of slices ``[z0, z1)`` that holds
                   ROI voxels (the plan's blocks of the layer that makes the ROI exact); digest
                   = 32 bytes of :func:`shared.layers.roi_digest` of the *original* voxels:
                   SHA-256 over ``b"dlad-roi-sha256-v1"``, ``z0`` and ``z1`` as little-endian
                   uint32, then the ROI voxels of each slice as int16 little-endian in C order.
                   The receiver reports a block's ROI exact (verified) only after its decoded
                   voxels hash to this; a mismatch drops the block's chunks (re-requested live).
                   Blocks are disjoint; at most one per slice. Optional for parsing (streams
                   before it): without it no ROI is ever reported exact
``roi``            ``{"encoding", "data": bytes, "voxels": int}``: the ROI mask and its voxel
                   count as a check; encoding ``"packbits-zstd"`` (the slice-major mask
                   bit-packed, zstd) or ``"row-runs-zstd"`` (each row's switch columns, coded
                   against the row above: :mod:`shared.roimask`; streams before 2026-12 use
                   packed bits only); the sender writes the smaller
``layers``         map ``"0"|"1"|"2"`` -> ``{"codec", "codecs", "lossless", "region"}``:
                   ``codecs`` the registry names of every codec the layer's chunks may use
                   (1 to :data:`MAX_LAYER_CODECS`; the sender picks one per chunk, the smallest
                   it measured), ``codec`` the first of them (streams before 2026-12 carry only
                   ``codec``, which then is the layer's one codec); ``lossless`` true exactly
                   when every one of them is lossless (checked against the codec registry: a
                   header that calls a lossy codec lossless is rejected); ``region`` ``"all"``
                   (layer 0), ``"roi"`` (1) or ``"outside-roi"`` (2)
``roi_pending``    optional, ``true``: the ROI is not in the header but follows in the
                   stream's ROI frame (kind 4, below). The header then has no ``roi`` and no
                   ``roi_digests``, its ``layers`` name every layer the stream will carry (the
                   ROI layer 1 among them), its ``plan`` holds layer 0 alone, blocks that cover
                   every slice once, and its ``provenance`` nothing of the ROI. Absent (streams
                   before 2026-12, and every stream whose bases depend on the ROI): the ROI is
                   in the header
``plan``           list of ``[seq, layer, z0, z1]``: every data chunk the stream will carry
                   (``z1`` exclusive), in the sender's intended order (sender/scheduler.py);
                   chunks may arrive in any order: the sender sends a block without ROI voxels
                   after the ROI when its base would delay the ROI, and a resumed transfer
                   sends only what is missing
``provenance``     free map: ROI provider, diffusion settings, input description;
                   ``inserted_slices``: slice indices the sender filled in for images missing
                   from a DICOM series (``dlad-send --allow-gaps``), reported by the receiver
``dicom``          optional map of DICOM attributes of the source series, keyed by DICOM keyword
                   (``StudyInstanceUID``, ``SeriesInstanceUID``, ``PatientID``,
                   ``SeriesDescription``...); values are strings, numbers or lists of them. Empty
                   or absent when the input was not DICOM. At most :data:`MAX_DICOM_ATTRIBUTES`
                   entries of at most :data:`MAX_DICOM_VALUE` characters (see
                   :func:`check_dicom_attributes`).
=================  ===========================================================================

Data chunk body (kind 2): ``study_id``; ``seq`` (index into the plan); ``layer`` (0 base,
1 ROI residual, 2 the voxels outside the ROI); ``z0``, ``z1`` (slice range, ``z1`` exclusive);
``codec`` (registry name, one of the header's ``layers[layer].codecs``; the receiver refuses any
other); ``params`` (the codec's decode parameters; a residual's also hold ``base_digest``,
BLAKE2b-128 of the decoded base block it was computed against, and a layer-1 or layer-2 chunk
may hold ``reference``: ``"base"``, the default, a residual added to the block's base, or
``"none"``, the original voxels themselves, which replace the block's voxels of the layer's
region (the ROI, or the rest) whatever its base, and need none:
what a sender sends where the base is only a preview); a layer-1 chunk may hold ``box``,
``[y0, y1, x0, x1]``: it covers only those rows and columns of its slices (the bounding box of
the block's ROI), decoded as a block of that size; ``payload`` (bytes). A checksum
proves a frame arrived as sent, not that its voxels are right: what the receiver reports exact
is proven by the header's ``roi_digests`` and ``sha256``.

End body (kind 3): ``study_id``; ``chunks`` (data chunks sent); ``bytes`` (total stream bytes
before this frame).

Pending ROI. A live sender starts a stream as soon as a series is assembled, before the U-Net,
the plausibility check and the ROI steps are done, where no base depends on the ROI (layered
``--exact`` mode, whose bases are previews of the original voxels, without diffusion): header
with ``roi_pending``, then layer-0 chunks (the previews, viewable at once), then the ROI frame,
then the chunks of layers 1 and 2 in the usual ROI-first order. A receiver refuses a layer-1 or
layer-2 chunk that comes before the ROI frame (it cannot place it; the sender sends it again
after the frame), reports no ROI voxel exact and the study not complete before it, and takes at
most one ROI frame: the same frame again (a resumed sender sends it in every pass) is known by
its checksum and ignored, another one is refused unparsed. ``dlad-send --out`` keeps the ROI in
the header (the file is written at once, when the ROI is known).

ROI frame body (kind 4), checked against the header as strictly as the header's own fields
(:meth:`StreamHeader.with_roi`):

=================  ===========================================================================
``study_id``       the header's
``sha256``         the header's (binds the frame to its stream)
``roi``            the mask, as the header's ``roi``: decoded to the header's ``shape``, its
                   voxel count checked
``roi_digests``    as the header's ``roi_digests``: exactly one digest per layer-0 block that
                   holds ROI voxels
``plan``           ``[seq, layer, z0, z1]`` of every chunk of layers 1 and 2: each on a block of
                   the header's layer-0 plan, a layer the header names, at most one per layer
                   and block, seqs new (neither the header's nor repeated); layer 1 plans
                   exactly the blocks with ROI voxels, layer 2 (where the header names it)
                   exactly those with voxels outside the ROI. At most
                   :data:`MAX_ROI_PLAN_ENTRIES` entries
``provenance``     map: what decided the ROI (``roi``: provider, its models, the steering
                   settings, the ROI's share of voxels, ``check``: the plausibility check's
                   outcome, a fallback taken); merged into the header's provenance, whose keys
                   it may not replace
=================  ===========================================================================

The complete header (the pending one with the frame's mask, digests, plan entries and
provenance) is what the receiver works with from then on; its chunk log keeps the ROI frame in
its place, so that ``header.dlad`` + ``chunks.dlad`` still replays as a stream.

Limits: a body is at most 64 MiB; msgpack strings, arrays and maps are bounded when parsing;
the receiver bounds every decompression by the voxels the slice range announces. A data frame
is at most :func:`max_data_frame_bytes` of its header: twice the raw int16 bytes of the
largest planned block plus 64 KiB (no codec expands CT slices that much; x265's parameter SEI
alone is about 2 KB), so a receiver knows from the header how much it may have to buffer; an
ROI frame at most :func:`max_roi_frame_bytes` (the mask bit-packed and its plan and digests).
Before the ROI frame a receiver budgets for every chunk it may plan
(:meth:`StreamHeader.planned_bound`: each other layer of each layer-0 block).
"""

from __future__ import annotations

import hashlib
import mmap
import re
import struct
from dataclasses import dataclass, field

import msgpack
import numpy as np
import zstandard

from shared.roimask import MaskError, decode_runs, encode_runs
from shared.volume import representation_problem

MAGIC = b"DLAD"
WIRE_VERSION = 1
FORMAT_NAME = "dlad-stream"
FORMAT_VERSION = 1
KIND_HEADER, KIND_DATA, KIND_END, KIND_ROI = 1, 2, 3, 4
PREFIX = struct.Struct(">4sBBI16s")
PREFIX_BYTES = PREFIX.size  # 26
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_DIMENSION = 8192
MAX_VOXELS = 1 << 31
MAX_STUDY_ID = 128
LAYERS = (0, 1, 2)
REGION_OF_LAYER = {0: "all", 1: "roi", 2: "outside-roi"}
#: Bytes of a ROI digest (SHA-256).
ROI_DIGEST_BYTES = 32
#: Codecs one layer may list: a sender tries a few per chunk, never dozens.
MAX_LAYER_CODECS = 8
#: Bounds of the header's ``dicom`` map: a series' identifying and descriptive attributes fit in a
#: few dozen entries; a DICOM long text (LT) is at most 10,240 characters.
MAX_DICOM_ATTRIBUTES = 128
MAX_DICOM_VALUE = 10240
_DICOM_KEYWORD = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,63}$")


class WireError(ValueError):
    """A frame or chunk violates the wire format."""


def _digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


def frame(kind: int, body: dict) -> bytes:
    """Serialise one frame."""
    packed = msgpack.packb(body, use_bin_type=True)
    if len(packed) > MAX_BODY_BYTES:
        raise WireError(f"chunk body of {len(packed)} bytes exceeds the {MAX_BODY_BYTES} limit")
    return PREFIX.pack(MAGIC, WIRE_VERSION, kind, len(packed), _digest(packed)) + packed


def _unpack_body(body: bytes) -> dict:
    try:
        value = msgpack.unpackb(
            body, raw=False, strict_map_key=True, max_str_len=1 << 20,
            max_bin_len=MAX_BODY_BYTES, max_array_len=1 << 20, max_map_len=1 << 12,
            max_ext_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
        raise WireError(f"bad msgpack body ({error})") from None
    if not isinstance(value, dict):
        raise WireError("a chunk body must be a msgpack map")
    return value


# --- typed chunks ---------------------------------------------------------------------------

def _require(body: dict, name: str, kinds, what: str):
    if name not in body:
        raise WireError(f"{what}: missing field {name!r}")
    value = body[name]
    # bool is an int subclass; no field of the format is a boolean where a number is expected.
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise WireError(f"{what}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def check_dicom_attributes(value) -> dict:
    """Validate the header's ``dicom`` map; return it, or raise :class:`WireError`.

    Keys are DICOM keywords (letters and digits, starting with a letter); values are strings,
    ints, finite floats or lists of those (multi-valued attributes), each string at most
    :data:`MAX_DICOM_VALUE` characters.

    >>> check_dicom_attributes({"SeriesNumber": 3, "ImageType": ["ORIGINAL", "PRIMARY"]})
    {'SeriesNumber': 3, 'ImageType': ['ORIGINAL', 'PRIMARY']}
    """
    if not isinstance(value, dict):
        raise WireError("header: dicom must be a map")
    if len(value) > MAX_DICOM_ATTRIBUTES:
        raise WireError(f"header: more than {MAX_DICOM_ATTRIBUTES} dicom attributes")

    def scalar(item) -> bool:
        if isinstance(item, bool):
            return False
        if isinstance(item, str):
            return len(item) <= MAX_DICOM_VALUE
        if isinstance(item, float):
            return bool(np.isfinite(item))
        return isinstance(item, int)

    for key, item in value.items():
        if not isinstance(key, str) or not _DICOM_KEYWORD.match(key):
            raise WireError(f"header: {key!r} is not a DICOM keyword")
        items = item if isinstance(item, list) else [item]
        if len(items) > 64 or not all(scalar(v) for v in items):
            raise WireError(f"header: dicom attribute {key} has a value that is not a short "
                            "string, a number or a list of them")
    return value


def layer_codecs(layer: dict) -> list[str]:
    """The codec names a (validated) layer entry allows; streams before 2026-12 name one."""
    return list(layer.get("codecs") or [layer["codec"]])


def check_layers(value: dict) -> dict[int, dict]:
    """Validate the header's ``layers`` map; return it keyed by int, or raise WireError.

    Every layer names registered codecs, its region is the one of its number, and its
    ``lossless`` flag is what the codec registry says of its codecs (all lossless or not), so
    the receiver never takes a lossy layer for an exact one.
    """
    from shared.codecs import CodecError, get_codec  # codecs never import the wire format

    layers = {}
    for key, layer in value.items():
        if (key not in ("0", "1", "2") or not isinstance(layer, dict)
                or not all(isinstance(name, str) for name in layer)):
            raise WireError(f"header: unknown layer {key!r}, or not a map of named fields")
        number = int(key)
        codec, codecs = layer.get("codec"), layer.get("codecs", [layer.get("codec")])
        if (not isinstance(codec, str) or not isinstance(codecs, list)
                or not 1 <= len(codecs) <= MAX_LAYER_CODECS or codecs[0] != codec
                or len(set(codecs)) != len(codecs)
                or not all(isinstance(name, str) and len(name) <= 32 for name in codecs)):
            raise WireError(f"header: layer {number} must name 1..{MAX_LAYER_CODECS} codecs, "
                            "'codec' being the first")
        try:
            lossless = all(get_codec(name).lossless for name in codecs)
        except CodecError as error:
            raise WireError(f"header: layer {number}: {error}") from None
        if layer.get("lossless") is not lossless:
            raise WireError(f"header: layer {number} says lossless={layer.get('lossless')!r} "
                            f"but its codecs are {'' if lossless else 'not '}lossless")
        if layer.get("region") != REGION_OF_LAYER[number]:
            raise WireError(f"header: layer {number} must have region "
                            f"{REGION_OF_LAYER[number]!r}")
        layers[number] = layer
    return layers


def _study_id(body: dict, what: str) -> str:
    study_id = _require(body, "study_id", str, what)
    if not 0 < len(study_id) <= MAX_STUDY_ID:
        raise WireError(f"{what}: study_id must have 1..{MAX_STUDY_ID} characters")
    return study_id


@dataclass(init=False)
class StreamHeader:
    """Everything a receiver needs before the first data chunk (see the module docstring).

    The ROI mask is kept bit-packed, as it travels (``roi_bits``): a receiver holds an eighth of
    a byte per voxel for it instead of one, and unpacks only the slices it applies
    (:meth:`roi_slices`). ``roi`` unpacks the whole mask.
    """

    study_id: str
    """Sender-chosen id; the receiver sanitises it before using it as a folder name."""
    shape: tuple[int, int, int]
    """``(nz, ny, nx)``."""
    affine: np.ndarray
    """4x4 RAS+ affine of voxel index ``(i, j, k)``."""
    spacing: tuple[float, float, float]
    """Voxel size in mm, ``(sx, sy, sz)``."""
    source_dtype: str
    """Stored dtype of the source file."""
    rescale: tuple[float, float]
    """``(slope, intercept)`` from stored values to HU."""
    value_range: tuple[int, int]
    """HU range of the original volume."""
    sha256: str
    """Hex SHA-256 of the original int16 voxels (little-endian, slice-major)."""
    roi_bits: np.ndarray
    """The ROI mask (voxels sent bit-exact by layers 0+1) as ``np.packbits`` of the slice-major
    bool mask: uint8, padding bits of the last byte zero."""
    layers: dict
    """``{layer: {"codec", "codecs", "lossless", "region"}}`` for the layers this stream
    carries (:func:`check_layers`)."""
    plan: list
    """``[(seq, layer, z0, z1), ...]`` in the sender's intended order."""
    created: str = ""
    """ISO-8601 UTC creation time."""
    provenance: dict = field(default_factory=dict)
    """ROI provider, diffusion settings, input description (informative only)."""
    dicom: dict = field(default_factory=dict)
    """DICOM attributes of the source series by keyword (empty unless the input was DICOM)."""
    roi_digests: list = field(default_factory=list)
    """``[(z0, z1, digest), ...]``: :func:`shared.layers.roi_digest` of the original ROI voxels
    of each block that has some (empty in streams made before ROI verification)."""
    roi_pending: bool = False
    """The header announces the ROI as pending: no mask, no digests, a plan of layer 0 only;
    the :class:`RoiFrame` brings them (:meth:`with_roi` makes the complete header)."""
    roi_frame: RoiFrame | None = None
    """The ROI frame that completed this header (None for a header that carries its ROI)."""

    def __init__(self, study_id: str, shape, affine, spacing, source_dtype: str, rescale,
                 value_range, sha256: str, roi: np.ndarray | None = None,
                 layers: dict | None = None, plan: list | None = None, created: str = "",
                 provenance: dict | None = None, *, roi_bits: np.ndarray | None = None,
                 dicom: dict | None = None, roi_digests: list | None = None,
                 roi_pending: bool = False):
        """``roi`` is the bool mask of ``shape``; a parser passes it packed as ``roi_bits``;
        ``roi_pending`` (neither given): the ROI follows in a :class:`RoiFrame`."""
        if roi_pending:
            if roi is not None or roi_bits is not None or roi_digests:
                raise ValueError("a header with a pending ROI carries no mask and no digests")
        elif (roi is None) == (roi_bits is None):
            raise ValueError("give the ROI either as a mask (roi) or packed (roi_bits)")
        self.study_id, self.shape, self.affine, self.spacing = study_id, shape, affine, spacing
        self.source_dtype, self.rescale, self.value_range = source_dtype, rescale, value_range
        self.sha256 = sha256
        self.roi_pending = roi_pending
        self.roi_frame = None
        self.roi_bits = None if roi_pending else (
            np.packbits(np.asarray(roi, bool).ravel()) if roi_bits is None else roi_bits)
        self.layers = {} if layers is None else layers
        self.plan = [] if plan is None else plan
        self.created = created
        self.provenance = {} if provenance is None else provenance
        self.dicom = {} if dicom is None else check_dicom_attributes(dicom)
        self.roi_digests = [] if roi_digests is None else [
            (int(z0), int(z1), bytes(digest)) for z0, z1, digest in roi_digests]

    @property
    def roi(self) -> np.ndarray:
        """The whole ROI mask, unpacked: one byte per voxel, a new array at every access.

        The array has its own anonymous memory map, unmapped as soon as the array is dropped.
        From malloc, a transient this large (the receiver unpacks the mask for the stream key of
        every study it opens) would raise glibc's mmap threshold and stay in a thread's heap,
        resident for good: 25 MB of the peak memory of a 50 MB study.
        """
        mask = np.frombuffer(mmap.mmap(-1, int(np.prod(self.shape))), dtype=bool)
        mask = mask.reshape(self.shape)
        for z in range(self.shape[0]):
            mask[z] = self.roi_slices(z, z + 1)[0]
        return mask

    def roi_slices(self, z0: int, z1: int) -> np.ndarray:
        """The ROI mask of slices ``[z0, z1)``, unpacked: bool, shape ``(z1 - z0, ny, nx)``.

        Raises:
            WireError: the ROI is still pending (no :class:`RoiFrame` yet).
        """
        if self.roi_bits is None:
            raise WireError("the ROI of this stream is not known yet (pending)")
        plane = self.shape[1] * self.shape[2]
        start, stop = z0 * plane, z1 * plane
        bits = np.unpackbits(self.roi_bits[start // 8:(stop + 7) // 8])
        offset = start % 8
        return bits[offset:offset + stop - start].view(bool).reshape(z1 - z0, *self.shape[1:])

    @property
    def roi_known(self) -> bool:
        """Whether the ROI mask is known: carried by the header, or brought by its ROI frame."""
        return self.roi_bits is not None

    @property
    def roi_voxels(self) -> int | None:
        """Voxels in the ROI (None while it is pending)."""
        return None if self.roi_bits is None else _count_bits(self.roi_bits)

    def to_frame(self) -> bytes:
        if self.roi_frame is not None:
            raise ValueError("a header completed by an ROI frame is sent as it was: pending")
        body = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "study_id": self.study_id,
            "created": self.created, "shape": list(self.shape),
            "affine": [float(v) for v in np.asarray(self.affine, float).ravel()],
            "spacing": [float(v) for v in self.spacing], "source_dtype": self.source_dtype,
            "rescale": [float(v) for v in self.rescale],
            "value_range": [int(v) for v in self.value_range], "sha256": self.sha256,
            **({"roi_pending": True} if self.roi_pending else {"roi": self._roi_field()}),
            "layers": {str(k): v for k, v in self.layers.items()},
            "plan": [list(map(int, entry)) for entry in self.plan],
            "provenance": self.provenance,
        }
        if self.dicom:
            body["dicom"] = self.dicom
        if self.roi_digests:
            body["roi_digests"] = [[z0, z1, digest] for z0, z1, digest in self.roi_digests]
        return frame(KIND_HEADER, body)

    def _roi_field(self) -> dict:
        """The header's ``roi``: the smaller of the mask's two encodings (:mod:`shared.roimask`)."""
        return roi_field(self)

    def planned_bound(self) -> list:
        """The plan, and for a header whose ROI is pending every chunk its :class:`RoiFrame`
        may add (each other layer of each layer-0 block, seq unknown: -1): what a receiver
        budgets for before the ROI is known."""
        if not self.roi_pending or self.roi_frame is not None:
            return list(self.plan)
        blocks = [(z0, z1) for _, layer, z0, z1 in self.plan if layer == 0]
        return list(self.plan) + [(-1, layer, z0, z1) for layer in sorted(self.layers)
                                  if layer != 0 for z0, z1 in blocks]

    def with_roi(self, roi: RoiFrame) -> StreamHeader:
        """The complete header: this pending one with the mask, digests, plan entries and
        provenance of ``roi``, checked against it (see :class:`RoiFrame`).

        Raises:
            WireError: the frame does not fit this header.
        """
        if not self.roi_pending or self.roi_frame is not None:
            raise WireError("ROI frame: the header carries its ROI already")
        if roi.study_id != self.study_id or roi.sha256 != self.sha256:
            raise WireError("ROI frame: study id or sha256 differ from the header's")
        shape = tuple(self.shape)
        roi_bits = _decode_roi(roi.roi, shape, "ROI frame")
        digests = _roi_digests([list(entry) for entry in roi.roi_digests], shape[0],
                               "ROI frame")
        blocks = {(z0, z1): seq for seq, layer, z0, z1 in self.plan if layer == 0}
        seqs = {seq for seq, *_ in self.plan}
        plane = shape[1] * shape[2]
        with_roi, outside = set(), set()
        for z0, z1 in blocks:
            voxels = _count_bits_range(roi_bits, z0 * plane, z1 * plane)
            if voxels:
                with_roi.add((z0, z1))
            if voxels < (z1 - z0) * plane:
                outside.add((z0, z1))
        entries: dict[int, set] = {layer: set() for layer in self.layers if layer != 0}
        for seq, layer, z0, z1 in roi.plan:
            if seq in seqs or layer not in entries or (z0, z1) not in blocks \
                    or (z0, z1) in entries[layer]:
                raise WireError(f"ROI frame: plan entry {[seq, layer, z0, z1]} is not a new "
                                "chunk of another layer of one of the header's layer-0 blocks")
            seqs.add(seq)
            entries[layer].add((z0, z1))
        if 1 in entries and entries[1] != with_roi:
            raise WireError("ROI frame: layer 1 must plan exactly the blocks with ROI voxels")
        if 2 in entries and entries[2] != outside:
            raise WireError("ROI frame: layer 2 must plan exactly the blocks with voxels "
                            "outside the ROI")
        if {(z0, z1) for z0, z1, _ in digests} != with_roi:
            raise WireError("ROI frame: roi_digests must hold one digest per block with ROI "
                            "voxels, for the header's blocks")
        clash = set(roi.provenance) & set(self.provenance)
        if clash:
            raise WireError(f"ROI frame: provenance may not replace the header's "
                            f"{', '.join(sorted(map(str, clash)))}")
        header = StreamHeader(
            study_id=self.study_id, shape=self.shape, affine=self.affine, spacing=self.spacing,
            source_dtype=self.source_dtype, rescale=self.rescale, value_range=self.value_range,
            sha256=self.sha256, roi_bits=roi_bits, layers=self.layers,
            plan=list(self.plan) + [tuple(entry) for entry in roi.plan], created=self.created,
            provenance={**self.provenance, **roi.provenance}, dicom=self.dicom,
            roi_digests=digests)
        header.roi_pending = True
        header.roi_frame = roi
        return header

    @classmethod
    def from_body(cls, body: dict) -> StreamHeader:
        what = "header"
        if body.get("format") != FORMAT_NAME:
            raise WireError("header: not a dlad-stream header")
        version = body.get("version")
        if version != FORMAT_VERSION:
            raise WireError(f"header: unsupported format version {version!r} "
                            f"(this receiver reads version {FORMAT_VERSION})")
        study_id = _study_id(body, what)
        shape = _require(body, "shape", list, what)
        if len(shape) != 3 or not all(isinstance(n, int) and 0 < n <= MAX_DIMENSION for n in shape):
            raise WireError(f"header: shape must be 3 integers in [1, {MAX_DIMENSION}]")
        if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
            raise WireError("header: volume too large")
        affine = _require(body, "affine", list, what)
        spacing = _require(body, "spacing", list, what)
        rescale = _require(body, "rescale", list, what)
        value_range = _require(body, "value_range", list, what)
        numbers = (int, float)
        if (len(affine) != 16 or len(spacing) != 3 or len(rescale) != 2 or len(value_range) != 2
                or not all(isinstance(v, numbers) and np.isfinite(v)
                           for v in affine + spacing + rescale)
                or not all(isinstance(v, int) and -32768 <= v <= 32767 for v in value_range)):
            raise WireError("header: malformed geometry (affine, spacing, rescale or value range)")
        matrix = np.array(affine, dtype=np.float64).reshape(4, 4)
        # The threshold is Volume's (shared/volume.py): a header the receiver could not write out.
        if (not np.array_equal(matrix[3], [0.0, 0.0, 0.0, 1.0])
                or abs(np.linalg.det(matrix[:3, :3])) < 1e-12 or not min(spacing) > 0):
            raise WireError("header: the affine must be invertible with a last row 0 0 0 1, and "
                            "the spacing positive")
        sha256 = _require(body, "sha256", str, what)
        if len(sha256) != 64:
            raise WireError("header: sha256 must be 64 hex characters")
        source_dtype = _require(body, "source_dtype", str, what)
        problem = representation_problem(source_dtype, float(rescale[0]), float(rescale[1]),
                                         (value_range[0], value_range[1]))
        if problem:
            raise WireError(f"header: the output cannot hold the voxels: {problem}")
        pending = body.get("roi_pending", False)
        if pending is not False and pending is not True:
            raise WireError("header: roi_pending must be true or absent")
        if pending:
            if "roi" in body or "roi_digests" in body:
                raise WireError("header: a pending ROI comes with no roi and no roi_digests")
            roi_digests, roi_bits = [], None
        else:
            roi_digests = _roi_digests(body.get("roi_digests", []), shape[0])
            roi_bits = _decode_roi(_require(body, "roi", dict, what), tuple(shape))
        layers = check_layers(_require(body, "layers", dict, what))
        plan = []
        seen = set()
        for entry in _require(body, "plan", list, what):
            if (not isinstance(entry, list) or len(entry) != 4
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry)):
                raise WireError("header: malformed plan entry")
            seq, layer, z0, z1 = entry
            if seq in seen or layer not in layers or not 0 <= z0 < z1 <= shape[0]:
                raise WireError(f"header: invalid plan entry {entry}")
            seen.add(seq)
            plan.append(tuple(entry))
        if pending:
            _check_pending_plan(plan, layers, shape[0])
        provenance = body.get("provenance", {})
        dicom = check_dicom_attributes(body.get("dicom", {}))
        return cls(study_id=study_id, shape=tuple(shape),
                   affine=matrix,
                   spacing=tuple(float(v) for v in spacing), source_dtype=source_dtype,
                   rescale=(float(rescale[0]), float(rescale[1])),
                   value_range=(value_range[0], value_range[1]), sha256=sha256, roi_bits=roi_bits,
                   layers=layers, plan=plan, created=str(body.get("created", "")),
                   provenance=provenance if isinstance(provenance, dict) else {}, dicom=dicom,
                   roi_digests=roi_digests, roi_pending=pending)


def _check_pending_plan(plan: list, layers: dict, nz: int) -> None:
    """A header with a pending ROI: a layer that needs the ROI (1) is announced, and the plan is
    layer 0 alone, blocks that cover the volume once (the ROI frame plans the other layers on
    these blocks)."""
    if 1 not in layers:
        raise WireError("header: a pending ROI needs a stream with the ROI layer (1)")
    covered = np.zeros(nz, dtype=np.int64)
    for _, layer, z0, z1 in plan:
        if layer != 0:
            raise WireError("header: with a pending ROI the plan holds layer 0 only")
        covered[z0:z1] += 1
    if not (covered == 1).all():
        raise WireError("header: with a pending ROI the layer-0 blocks must cover every "
                        "slice once")


def roi_field(header: StreamHeader) -> dict:
    """The ``roi`` field of a header or ROI frame for ``header``'s mask: the smaller of the
    mask's two encodings (:mod:`shared.roimask`)."""
    packed = zstandard.ZstdCompressor(level=9).compress(header.roi_bits.tobytes())
    runs = encode_runs(lambda z: header.roi_slices(z, z + 1)[0], header.shape)
    if runs is not None and len(runs) < len(packed):
        return {"encoding": "row-runs-zstd", "data": runs, "voxels": header.roi_voxels}
    return {"encoding": "packbits-zstd", "data": packed, "voxels": header.roi_voxels}


def _roi_digests(value, nz: int, what: str = "header") -> list:
    """The ``roi_digests`` of a header or ROI frame: disjoint ``[z0, z1, 32 bytes]`` blocks
    inside the volume."""
    if not isinstance(value, list) or len(value) > nz:
        raise WireError(f"{what}: roi_digests must be a list of at most one entry per slice")
    digests, covered = [], np.zeros(nz, dtype=bool)
    for entry in value:
        if (not isinstance(entry, list) or len(entry) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry[:2])
                or not isinstance(entry[2], bytes) or len(entry[2]) != ROI_DIGEST_BYTES):
            raise WireError(f"{what}: malformed roi_digests entry")
        z0, z1, digest = entry
        if not 0 <= z0 < z1 <= nz or covered[z0:z1].any():
            raise WireError(f"{what}: roi_digests block [{z0}, {z1}) is outside the volume or "
                            "overlaps another")
        covered[z0:z1] = True
        digests.append((z0, z1, digest))
    return digests


#: Set bits of every byte value (numpy < 2 has no bitwise_count).
_BITS_IN_BYTE = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(
    axis=1, dtype=np.uint8)


def _count_bits(packed: np.ndarray) -> int:
    return int(_BITS_IN_BYTE[packed].sum(dtype=np.int64))


def _count_bits_range(packed: np.ndarray, start: int, stop: int) -> int:
    """Set bits ``[start, stop)`` of a packed mask (first voxel in the high bit)."""
    if stop <= start:
        return 0
    first, last = start // 8, (stop - 1) // 8
    count = _count_bits(packed[first:last + 1])
    head, tail = start % 8, 7 - (stop - 1) % 8
    if head:
        count -= int(_BITS_IN_BYTE[packed[first] & np.uint8((0xFF << (8 - head)) & 0xFF)])
    if tail:
        count -= int(_BITS_IN_BYTE[packed[last] & np.uint8((1 << tail) - 1)])
    return count


def _decode_roi(roi_field: dict, shape, what: str = "header") -> np.ndarray:
    """The packed ROI mask of a header's or ROI frame's ``roi`` field (never unpacked: 1/8 byte
    per voxel)."""
    if not isinstance(roi_field, dict):
        raise WireError(f"{what}: roi must be a map")
    encoding = roi_field.get("encoding")
    if encoding not in ("packbits-zstd", "row-runs-zstd") or not isinstance(roi_field.get("data"), bytes):
        raise WireError(f"{what}: unsupported ROI encoding")
    total = int(np.prod(shape))
    expected = (total + 7) // 8
    if encoding == "row-runs-zstd":
        try:
            roi_bits = decode_runs(roi_field["data"], shape)
        except MaskError as error:
            raise WireError(f"{what}: {error}") from None
    else:
        try:
            with zstandard.ZstdDecompressor().stream_reader(roi_field["data"]) as reader:
                packed = reader.read(expected + 1)
        except zstandard.ZstdError:
            raise WireError(f"{what}: corrupt ROI mask") from None
        if len(packed) != expected:
            raise WireError(f"{what}: ROI mask has the wrong size")
        roi_bits = np.frombuffer(packed, np.uint8).copy()
    if total % 8:
        # Bits past the last voxel are no voxels: cleared, so that they count nowhere and the
        # mask packs to the same bytes as the unpacked mask would (the stream key hashes them).
        roi_bits[-1] &= np.uint8((0xFF << (8 - total % 8)) & 0xFF)
    voxels = roi_field.get("voxels")
    if isinstance(voxels, bool) or _count_bits(roi_bits) != voxels:
        raise WireError(f"{what}: ROI mask voxel count mismatch")
    return roi_bits


@dataclass
class DataChunk:
    """One coded block of slices of one layer."""

    study_id: str
    """Study this chunk belongs to."""
    seq: int
    """Index of the chunk in the header's plan."""
    layer: int
    """0 base, 1 ROI residual, 2 the voxels outside the ROI."""
    z0: int
    """First slice (inclusive)."""
    z1: int
    """Last slice (exclusive)."""
    codec: str
    """Codec registry name."""
    params: dict
    """Codec decode parameters."""
    payload: bytes
    """Coded slices."""

    def to_frame(self) -> bytes:
        return frame(KIND_DATA, {
            "study_id": self.study_id, "seq": self.seq, "layer": self.layer, "z0": self.z0,
            "z1": self.z1, "codec": self.codec, "params": self.params, "payload": self.payload})

    @classmethod
    def from_body(cls, body: dict) -> DataChunk:
        what = "data chunk"
        values = {name: _require(body, name, int, what) for name in ("seq", "layer", "z0", "z1")}
        if values["layer"] not in LAYERS:
            raise WireError(f"data chunk: unknown layer {values['layer']}")
        if not 0 <= values["z0"] < values["z1"] <= MAX_DIMENSION:
            raise WireError(f"data chunk: invalid slice range [{values['z0']}, {values['z1']})")
        return cls(study_id=_study_id(body, what), codec=_require(body, "codec", str, what),
                   params=_require(body, "params", dict, what),
                   payload=_require(body, "payload", bytes, what), **values)


@dataclass
class StreamEnd:
    """The sender's last frame: how many chunks and bytes it sent."""

    study_id: str
    """Study that ends."""
    chunks: int
    """Data chunks sent in this stream."""
    bytes: int
    """Stream bytes before this frame."""

    def to_frame(self) -> bytes:
        return frame(KIND_END, {"study_id": self.study_id, "chunks": self.chunks,
                                "bytes": self.bytes})

    @classmethod
    def from_body(cls, body: dict) -> StreamEnd:
        return cls(study_id=_study_id(body, "end"), chunks=_require(body, "chunks", int, "end"),
                   bytes=_require(body, "bytes", int, "end"))


#: Most plan entries an ROI frame may add: layers 1 and 2 of one-slice blocks.
MAX_ROI_PLAN_ENTRIES = 2 * MAX_DIMENSION


@dataclass
class RoiFrame:
    """The ROI of a stream whose header announced it as pending (kind 4, see the module
    docstring): mask, per-block digests, the plan of the layers that need the ROI, and the
    ROI's provenance. Parsed on its own, it is checked against its header by
    :meth:`StreamHeader.with_roi`."""

    study_id: str
    """Study of the stream."""
    sha256: str
    """The header's ``sha256``: binds the frame to its stream."""
    roi: dict
    """``{"encoding", "data", "voxels"}``: the mask, as in a header's ``roi``."""
    roi_digests: list
    """``[(z0, z1, digest), ...]`` as in a header's ``roi_digests``."""
    plan: list
    """``[(seq, layer, z0, z1), ...]``: chunks of layers 1 and 2, on the header's blocks."""
    provenance: dict = field(default_factory=dict)
    """What decided the ROI: provider, plausibility check, fallback (merged into the header's
    provenance; it may add keys, not replace them)."""
    raw: bytes | None = field(default=None, repr=False, compare=False)
    """The frame as received (a receiver logs it as it came), or None for one made here."""

    @classmethod
    def make(cls, header: StreamHeader, roi: np.ndarray, roi_digests: list, plan: list,
             provenance: dict | None = None) -> RoiFrame:
        """The ROI frame of the pending ``header`` for the bool mask ``roi``."""
        packed = StreamHeader(header.study_id, header.shape, header.affine, header.spacing,
                              header.source_dtype, header.rescale, header.value_range,
                              header.sha256, roi=roi)
        return cls(study_id=header.study_id, sha256=header.sha256, roi=roi_field(packed),
                   roi_digests=[(int(z0), int(z1), bytes(d)) for z0, z1, d in roi_digests],
                   plan=[tuple(map(int, entry)) for entry in plan],
                   provenance=dict(provenance or {}))

    def to_frame(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return frame(KIND_ROI, {
            "study_id": self.study_id, "sha256": self.sha256, "roi": self.roi,
            "roi_digests": [[z0, z1, digest] for z0, z1, digest in self.roi_digests],
            "plan": [list(entry) for entry in self.plan], "provenance": self.provenance})

    @classmethod
    def from_body(cls, body: dict) -> RoiFrame:
        """The frame's fields, checked for form; :meth:`StreamHeader.with_roi` checks them
        against the header (mask size, digests per block, plan)."""
        what = "ROI frame"
        sha256 = _require(body, "sha256", str, what)
        if len(sha256) != 64:
            raise WireError("ROI frame: sha256 must be 64 hex characters")
        roi = _require(body, "roi", dict, what)
        digests = _roi_digests(_require(body, "roi_digests", list, what), MAX_DIMENSION, what)
        entries = _require(body, "plan", list, what)
        if len(entries) > MAX_ROI_PLAN_ENTRIES:
            raise WireError(f"ROI frame: more than {MAX_ROI_PLAN_ENTRIES} plan entries")
        plan = []
        for entry in entries:
            if (not isinstance(entry, list) or len(entry) != 4
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry)
                    or entry[1] not in (1, 2) or not 0 <= entry[2] < entry[3] <= MAX_DIMENSION
                    or entry[0] < 0):
                raise WireError(f"ROI frame: malformed plan entry {entry!r}"[:200])
            plan.append(tuple(entry))
        return cls(study_id=_study_id(body, what), sha256=sha256, roi=roi, roi_digests=digests,
                   plan=plan, provenance=_require(body, "provenance", dict, what))


_PARSERS = {KIND_HEADER: StreamHeader.from_body, KIND_DATA: DataChunk.from_body,
            KIND_END: StreamEnd.from_body, KIND_ROI: RoiFrame.from_body}


def parse_frame(data: bytes) -> StreamHeader | DataChunk | StreamEnd | RoiFrame:
    """Parse one complete frame (prefix + body); raise :class:`WireError` if anything is off."""
    if len(data) < PREFIX_BYTES:
        raise WireError("frame shorter than its prefix")
    magic, version, kind, length, digest = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError("not a dlad frame (bad magic)")
    if version != WIRE_VERSION:
        raise WireError(f"unsupported wire version {version}")
    if kind not in _PARSERS:
        raise WireError(f"unknown frame kind {kind}")
    if length > MAX_BODY_BYTES:
        raise WireError(f"frame body of {length} bytes exceeds the {MAX_BODY_BYTES} limit")
    if len(data) != PREFIX_BYTES + length:
        raise WireError("frame length does not match its prefix")
    body = memoryview(data)[PREFIX_BYTES:]  # no copy of the body (a payload is megabytes)
    if _digest(body) != digest:
        raise WireError("checksum mismatch")
    parsed = _PARSERS[kind](_unpack_body(body))
    if kind == KIND_ROI:
        parsed.raw = bytes(data)
    return parsed


@dataclass
class FrameEvent:
    """What :class:`FrameReader` found: a parsed chunk, or an error at a stream offset."""

    offset: int
    """Stream offset of the frame (or of the bad bytes)."""
    size: int
    """Bytes the frame (or the skipped region) occupied."""
    chunk: StreamHeader | DataChunk | StreamEnd | RoiFrame | None = None
    """The parsed chunk, when the frame was good."""
    error: str | None = None
    """Why the bytes were rejected, when they were bad (the first reason of a merged run)."""
    bad_frames: int = 0
    """Bad regions merged into this error event (consecutive errors are reported as one)."""
    reasons: list = field(default_factory=list, repr=False)
    """The first few distinct reasons of a merged run (``error`` joins them)."""


#: Distinct reasons kept in the message of a merged run of bad regions.
MAX_MERGED_REASONS = 4
_NUMBERS = re.compile(r"\d+")


def _add_error(events: list[FrameEvent], offset: int, size: int, error: str) -> None:
    """Report ``size`` bad bytes at ``offset``, merged into the previous event if it is an
    error that ends there: a run of garbage is one event, whatever it holds (8 MB of frame
    magic would otherwise be two million events and as many log lines). The merged event's
    message is written by :func:`_finish_errors`."""
    last = events[-1] if events else None
    if last is not None and last.error is not None and last.offset + last.size == offset:
        last.size += size
        last.bad_frames += 1
        reasons = last.reasons
        if len(reasons) < MAX_MERGED_REASONS and error != reasons[-1]:
            kind = _NUMBERS.sub("N", error)
            if all(_NUMBERS.sub("N", known) != kind for known in reasons):
                reasons.append(error)
        return
    events.append(FrameEvent(offset, size, error=error, bad_frames=1, reasons=[error]))


def _finish_errors(events: list[FrameEvent]) -> list[FrameEvent]:
    for event in events:
        if event.bad_frames > 1:
            more = event.bad_frames - len(event.reasons)
            event.error = "; ".join(event.reasons) + (
                f" (and {more} more bad regions after it)" if more else "")
    return events


class FrameReader:
    """Incremental frame parser for a byte stream (a file read in pieces, a data channel).

    ``feed()`` returns every complete frame found so far; bytes that do not form a valid frame
    are reported as errors and skipped up to the next magic, consecutive bad regions as one
    event (``bad_frames`` says how many). ``pending`` counts the bytes of an incomplete frame
    at the end (a truncated stream leaves them there).

    ``max_body_bytes`` bounds the frame a reader waits for (and so its buffer): a prefix that
    announces a longer body is rejected at once. A receiver lowers it once the header says how
    large the study's frames can be, and clears ``headers_allowed``: a stream has one header,
    and parsing another (its ROI mask unpacked and counted: a 2 KB frame that costs a large
    study half a second) is work a peer could make the receiver repeat without end. For the same
    reason, once a stream's ROI frame is accepted (``known_roi``), another ROI frame is not
    parsed again: one with the same checksum is that frame again (a resumed sender sends it in
    every pass) and is returned as the known one; any other is a bad frame.
    """

    def __init__(self, max_body_bytes: int = MAX_BODY_BYTES):
        self._buffer = bytearray()
        self._offset = 0  # stream offset of _buffer[0]
        self.max_body_bytes = max_body_bytes
        self.headers_allowed = True
        self.known_roi: RoiFrame | None = None

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[FrameEvent]:
        buffer = self._buffer
        buffer += data
        events: list[FrameEvent] = []
        size = len(buffer)
        pos = 0  # the buffer is cut once at the end, not after every frame
        while True:
            start = buffer.find(MAGIC, pos)
            if start < 0:
                # Keep the last bytes: they may be the start of a magic split across reads.
                keep_from = max(pos, size - (len(MAGIC) - 1))
                if keep_from > pos:
                    _add_error(events, self._offset + pos, keep_from - pos,
                               f"{keep_from - pos} bytes that are not a frame")
                    pos = keep_from
                break
            if start > pos:
                _add_error(events, self._offset + pos, start - pos,
                           f"{start - pos} bytes that are not a frame")
                pos = start
            if size - pos < PREFIX_BYTES:
                break
            _, version, kind, length, checksum = PREFIX.unpack_from(buffer, pos)
            another_header = kind == KIND_HEADER and not self.headers_allowed
            known = self.known_roi
            if (kind == KIND_ROI and known is not None and version == WIRE_VERSION
                    and length <= self.max_body_bytes):
                known_frame = known.to_frame()
                if checksum != known_frame[PREFIX_BYTES - 16:PREFIX_BYTES] or \
                        length != len(known_frame) - PREFIX_BYTES:
                    pos = self._skip_bad(events, pos, "a second ROI frame that differs from "
                                                      "the first (not parsed)")
                    continue
                end = pos + PREFIX_BYTES + length
                if size < end:
                    break
                events.append(FrameEvent(self._offset + pos, end - pos, chunk=known))
                pos = end
                continue
            if (length > self.max_body_bytes or version != WIRE_VERSION or kind not in _PARSERS
                    or another_header):
                # Not a frame this reader would take: do not wait for its body.
                reason = (f"oversized frame ({length} bytes) rejected"
                          if length > self.max_body_bytes else
                          f"unsupported wire version {version}" if version != WIRE_VERSION
                          else f"unknown frame kind {kind}" if kind not in _PARSERS
                          else "a second header frame (not parsed)")
                pos = self._skip_bad(events, pos, reason)
                continue
            end = pos + PREFIX_BYTES + length
            if size < end:
                break
            with memoryview(buffer) as view:  # one copy of the frame, released before del
                data_of_frame = bytes(view[pos:end])
            try:
                chunk = parse_frame(data_of_frame)
            except WireError as error:
                # Do not trust the length of a frame that failed: resume at the next magic.
                pos = self._skip_bad(events, pos, str(error))
                continue
            events.append(FrameEvent(self._offset + pos, end - pos, chunk=chunk))
            pos = end
        self._consume(pos)
        return _finish_errors(events)

    def _skip_bad(self, events: list[FrameEvent], pos: int, reason: str) -> int:
        """Report the bytes from ``pos`` to the next magic as bad; return where to resume."""
        resume = self._buffer.find(MAGIC, pos + 1)
        if resume < 0:
            resume = max(pos + 1, len(self._buffer) - len(MAGIC) + 1)
        _add_error(events, self._offset + pos, resume - pos, reason)
        return resume

    def finish(self) -> list[FrameEvent]:
        """End of stream: report what is left as truncated, after parsing any frame behind it.

        A frame whose (corrupted) length ran past the end may hide good frames after it; they
        are recovered by resuming at the next magic.
        """
        events: list[FrameEvent] = []
        while self._buffer:
            resume = self._buffer.find(MAGIC, 1)
            if resume < 0:
                size = len(self._buffer)
                _add_error(events, self._offset, size,
                           f"truncated: the last {size} bytes are an incomplete frame")
                self._consume(size)
                break
            _add_error(events, self._offset, resume,
                       "incomplete frame (its length runs past the end)")
            self._consume(resume)
            events.extend(self.feed(b""))
        return _finish_errors(events)

    def _consume(self, count: int) -> None:
        del self._buffer[:count]
        self._offset += count


#: Room for a data frame's fields, codec headers and parameters beyond its coded voxels.
DATA_FRAME_OVERHEAD = 64 * 1024


def max_data_frame_bytes(header: StreamHeader) -> int:
    """Largest data frame (prefix + body) a stream with this header may carry.

    Twice the raw int16 bytes of the largest planned block, plus :data:`DATA_FRAME_OVERHEAD`,
    and never more than the format's own limit. Senders stay far below it (a lossless codec
    on noise expands by a few percent at most); a receiver uses it to bound its buffers.
    """
    plane = int(header.shape[1]) * int(header.shape[2])
    slices = max((z1 - z0 for _, _, z0, z1 in header.plan), default=1)
    return min(PREFIX_BYTES + MAX_BODY_BYTES, 2 * 2 * plane * slices + DATA_FRAME_OVERHEAD)


def max_roi_frame_bytes(header: StreamHeader) -> int:
    """Largest ROI frame (prefix + body) a stream with this header may carry: the mask
    bit-packed (an eighth of a byte a voxel) and zstd's worst-case overhead, a digest and two
    plan entries per slice (128 bytes a slice is ample for their msgpack), and
    :data:`DATA_FRAME_OVERHEAD` for the fields and the provenance."""
    voxels = int(np.prod(header.shape, dtype=np.int64))
    return min(PREFIX_BYTES + MAX_BODY_BYTES, voxels // 8 + voxels // 1024
               + 128 * int(header.shape[0]) + DATA_FRAME_OVERHEAD)


def max_frame_bytes(header: StreamHeader) -> int:
    """Largest frame a reader waits for once it has ``header``: a data frame, or the ROI frame
    while the ROI is not known."""
    data = max_data_frame_bytes(header)
    return data if header.roi_known else max(data, max_roi_frame_bytes(header))


def voxel_sha256(voxels: np.ndarray) -> str:
    """SHA-256 of int16 voxels as little-endian bytes in C (slice-major) order."""
    # Hash the array's buffer directly: no 2-byte-per-voxel copy of the volume.
    return hashlib.sha256(np.ascontiguousarray(voxels, dtype="<i2")).hexdigest()
