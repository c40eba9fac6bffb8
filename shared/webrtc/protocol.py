"""The dlad data-channel protocol spoken between ``dlad-send --to`` and ``dlad-receive --listen``.

One ordered, reliable WebRTC data channel labelled :data:`CHANNEL_LABEL` per study session.
Text messages are control messages (one JSON object each); binary messages are consecutive
pieces of the dlad frame byte stream (the same bytes a ``.dlad`` file holds, see
:mod:`shared.wire`), cut into messages of at most :data:`MAX_MESSAGE_BYTES`.

Exchange (``S`` sender, ``R`` receiver)::

    S  text   {"type": "hello", "protocol": 1, "client": "dlad-send/0.1.0"}
    S  binary the header frame
    R  text   {"type": "inventory", "study_id", "folder", "have": [seq...], "complete",
               "window", "multi_study"}      (or {"type": "error", "reason", "retry"[, "retry_after"]})
    S  binary the data frames of the planned chunks not in "have", then an end frame
    R  text   {"type": "ack", "consumed", "applied", "planned", "roi_complete",
               "base_complete", "exact_complete", "verified"}   (after each batch it applied)
    R  text   {"type": "done", "complete", "verified", "missing": [seq...], ...,
               "roi_mismatches", "roi_known"}             (after it applied the end frame)

``missing`` includes chunks the receiver rejected or dropped after a failed ROI digest check
(``roi_mismatches`` counts those checks): the sender sends them again on its next pass.

A header that announces the ROI as pending (:mod:`shared.wire`) is followed, in every pass, by
the previews, then the ROI frame, then the chunks that need the ROI: ``have`` may name chunks
the sender plans only once its ROI is computed, and ``roi_known`` false in ``done`` says the
receiver still lacks the ROI frame (then it planned only the bases, and the sender sends the
frame and every chunk after it again).

An ``error`` says why the receiver closes the session; ``retry`` whether trying again may
help, and ``retry_after`` (seconds, only when the receiver is busy: no memory for the study
now) when to ask again: a sender waits that long without counting a failed attempt.

Several studies on one connection (a warm sender streaming the series of a live session): a
receiver whose inventory says ``"multi_study": true`` accepts, after its ``done``, another
``hello`` followed by the next study's header frame on the same channel, and the exchange above
starts again (the previous study is finished as if its session had closed). While idle between
studies the sender sends ``{"type": "keepalive"}`` every few seconds and the receiver answers
with the same message, so that each side knows the other is there and the receiver's idle timeout
does not close a connection that waits for the next series.

``consumed`` counts the bytes of this session (all its studies) the receiver has processed; the
sender keeps at most ``window`` bytes beyond it in flight, so the receiver's memory stays bounded whatever the
speed of its decoder. The receiver only answers ``done`` once every applied chunk is on disk.
This module is shared by both sides and imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json

import msgpack
import numpy as np

from shared.wire import StreamHeader

CHANNEL_LABEL = "dlad"
PROTOCOL_VERSION = 1
#: Binary message size the sender uses (the WebRTC-safe size; aiortc splits it into SCTP chunks).
MAX_MESSAGE_BYTES = 16 * 1024
#: Largest control message either side accepts.
MAX_CONTROL_BYTES = 64 * 1024
#: Default credit window: bytes the sender may have in flight beyond what the receiver processed.
DEFAULT_WINDOW = 1024 * 1024
CONTROL_TYPES = ("hello", "inventory", "ack", "done", "error", "keepalive")
#: The milestones a receiver reports (``reached`` of an ack, ``times`` of status.json), in words.
MILESTONE_TEXT = {
    "first_chunk": "first chunk applied",
    "roi_known": "ROI frame received (the stream's header announced the ROI as pending)",
    "first_roi_slice": "first ROI slice bit-exact (digest verified)",
    "base_complete": "base complete (every slice viewable)",
    "roi_complete": "ROI complete (bit-exact, every block digest verified)",
    "exact_complete": "exact layer complete (whole volume SHA-256 verified)",
    "complete": "all chunks applied",
}


class ProtocolError(ValueError):
    """A control message that does not follow the protocol."""


def encode_control(kind: str, **fields) -> str:
    """One control message as the JSON text that travels on the channel."""
    if kind not in CONTROL_TYPES:
        raise ValueError(f"unknown control message type {kind!r}")
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))


def parse_control(message) -> dict:
    """Decode and minimally validate a control message; raise :class:`ProtocolError`."""
    if not isinstance(message, str):
        raise ProtocolError("a control message must be text")
    if len(message) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control message of {len(message)} characters is too long")
    try:
        value = json.loads(message)
    except ValueError:
        raise ProtocolError("control message is not JSON") from None
    if not isinstance(value, dict) or value.get("type") not in CONTROL_TYPES:
        raise ProtocolError("control message without a known 'type'")
    return value


def int_list(value, limit: int) -> list[int]:
    """A list of non-negative ints below ``limit`` from untrusted JSON (anything else: error)."""
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < limit for v in value):
        raise ProtocolError("expected a list of chunk numbers")
    return value


def stream_key(header: StreamHeader) -> str:
    """Identity of a stream: every header field except its creation time.

    Two runs of ``dlad-send`` on the same input with the same settings give the same key (the
    study id and plan are derived from the voxels), so the second can resume the first; any
    difference (other voxels, ROI, layers, plan, coding or diffusion settings) gives another
    key, and the receiver never mixes the chunks of two keys.
    """
    fields = [
        header.study_id, [int(n) for n in header.shape],
        [float(v) for v in np.asarray(header.affine, float).ravel()],
        [float(v) for v in header.spacing], header.source_dtype,
        [float(v) for v in header.rescale], [int(v) for v in header.value_range],
        header.sha256, "pending" if header.roi_bits is None else
        hashlib.sha256(header.roi_bits.tobytes()).hexdigest(),
        sorted((int(k), sorted(v.items()) if isinstance(v, dict) else v)
               for k, v in header.layers.items()),
        [list(map(int, entry)) for entry in header.plan],
        header.provenance, header.dicom,
        [[z0, z1, digest] for z0, z1, digest in header.roi_digests],
    ]
    packed = msgpack.packb(fields, use_bin_type=True, default=str)
    return hashlib.blake2b(packed, digest_size=16).hexdigest()


def split_message(data: bytes, size: int = MAX_MESSAGE_BYTES) -> list[bytes]:
    """Cut ``data`` into binary messages of at most ``size`` bytes."""
    view = memoryview(data)
    return [bytes(view[i:i + size]) for i in range(0, len(data), size)] or []
