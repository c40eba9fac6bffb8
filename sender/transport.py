"""``dlad-send --to URL``: stream a study to ``dlad-receive --listen`` over a WebRTC data channel.

One attempt: create a peer connection with one ordered, reliable data channel ``dlad``; POST
the SDP offer to the receiver with the bearer token (WHIP-style) and apply the answer; send the
hello and the header frame; read the receiver's inventory; send the frames of every planned
chunk it lacks, in the encoder's sending order (:meth:`sender.encoder.StudyEncoder.frames`, also
a replayed file's), then an end frame; wait for its ``done``. Chunks are encoded one at a time in
a worker thread while the previous one is on the wire, so the first ROI chunk leaves before the
rest of the volume is encoded. Two limits bound memory: the data channel's ``bufferedAmount``
(pause above ``high_water``, resume on ``bufferedamountlow``) and the receiver's credit window
(bytes beyond what it has processed).

If the connection drops, the sender connects again (``retries`` times, with backoff) and, the
receiver's inventory telling what it already has, sends only the rest. A sender run again later
does the same: study id, plan and chunks are derived from the input and the settings. A
receiver that is busy (503: all its sessions taken, or its memory budget) is asked again after
its ``Retry-After``, for up to ``busy_timeout`` seconds, without using up the retries. See
:mod:`shared.webrtc.protocol` for the messages and docs/STREAMING.md for the whole picture.

A :class:`Link` keeps its connection from one study to the next when the receiver takes several
per connection (a warm live sender, docs/LIVE.md).

Signaling over ``https://`` checks the receiver's certificate against the system's store or
``StreamOptions.ca_file``; plain ``http://`` to an address other than loopback is refused
unless ``allow_plain_http`` (the bearer token would travel in clear).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from shared.logs import printable
from shared.progress import progress
from shared.tls import client_tls_context
from shared.version import client_string
from shared.webrtc import sctp
from shared.webrtc.ice import enlarge_socket_buffers, ice_hosts, is_loopback, loopback_hosts_for
from shared.webrtc.protocol import (
    CHANNEL_LABEL,
    DEFAULT_WINDOW,
    MAX_MESSAGE_BYTES,
    MILESTONE_TEXT,
    PROTOCOL_VERSION,
    ProtocolError,
    encode_control,
    int_list,
    parse_control,
    split_message,
)
from shared.webrtc.signaling import SDP_CONTENT_TYPE
from shared.wire import DataChunk, FrameReader, RoiFrame, StreamEnd, StreamHeader, WireError

log = logging.getLogger("dlad.sender")

DEFAULT_PATH = "/studies"


class TransportError(RuntimeError):
    """The stream could not be delivered."""


class Refused(TransportError):
    """The receiver refused for good (wrong token, bad request, study refused): no retry."""


class Disconnected(TransportError):
    """The connection failed or dropped: worth another attempt."""


class Busy(Disconnected):
    """The receiver answered 503 (no free session, memory budget used): ask again later."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


#: Bounds of the wait a busy receiver may ask for (Retry-After), in seconds: no busy loop
#: below half a second, and no receiver parks a sender for more than 30 s at a time.
RETRY_AFTER_BOUNDS = (0.5, 30.0)
#: Longest wait between two connection attempts (the backoff doubles up to it): a receiver
#: that restarts is found again within seconds.
MAX_BACKOFF_S = 10.0


@dataclass
class StreamOptions:
    """Knobs of :func:`stream_study`."""

    retries: int = 5
    """Further attempts after a failed one (each resumes from the receiver's inventory)."""
    connect_timeout: float = 30.0
    """Seconds for signaling + ICE + DTLS + channel open + inventory: they take a second or
    two even over a lossy link; a connection not up after 30 s is tried again."""
    stall_timeout: float = 15.0
    """Seconds without any message from the receiver (it sends one at least every 2 s while
    data flows) before the connection counts as dead."""
    high_water: int = 1024 * 1024
    """Pause sending while the channel buffers more than this many bytes: 80 ms at 100 Mbit/s,
    enough to keep a fast link busy, little to hold in memory or to lose with a connection."""
    low_water: int = 256 * 1024
    """... and resume when it drops to this (``bufferedAmountLowThreshold``): a quarter left,
    so the buffer never runs dry while the next messages are queued."""
    message_bytes: int = sctp.whole_chunk_message_bytes(MAX_MESSAGE_BYTES)
    """Size of the binary messages the frame stream is cut into (whole SCTP chunks)."""
    max_passes: int = 3
    """Passes within one connection (a pass resends what the receiver reports missing): one
    is the rule, a second resends chunks rejected on the way; if a third leaves gaps,
    something else is wrong and the sender reconnects."""
    prefetch: int = 2
    """Encoded frames waiting to be sent, at most: the next is ready when the current one
    leaves, and few encoded chunks are held in memory."""
    backoff: float = 1.0
    """First wait before reconnecting (doubles, at most :data:`MAX_BACKOFF_S`)."""
    max_rate: float | None = None
    """Cap on the sending rate in bit/s (None: as fast as the channel goes)."""
    quiet: bool = False
    """No progress bar or milestone lines."""
    drop_after_chunks: int | None = None
    """Testing: cut the first connection abruptly after this many data chunks were sent."""
    keepalive_interval: float = 5.0
    """Seconds between keepalives on an idle connection kept warm (:class:`Link`): well within
    the receiver's idle timeout (60 s), so a warm connection is never closed for silence."""
    busy_timeout: float = 300.0
    """Seconds to keep asking a busy receiver (503) before giving up: five minutes, time for
    the studies ahead of this one to finish even over a slow link."""
    ca_file: str | None = None
    """PEM file of the certificate authorities that may sign an https receiver's certificate
    (None: the system's store)."""
    allow_plain_http: bool = False
    """Allow ``http://`` to an address other than loopback (the token travels in clear)."""
    ice_servers: list = field(default_factory=list)
    """aiortc ``RTCIceServer`` objects (STUN/TURN) for the peer connection."""


@dataclass
class StreamResult:
    """What happened, as confirmed by the receiver."""

    complete: bool = False
    verified: bool | None = None
    attempts: int = 0
    chunks_planned: int = 0
    chunks_sent: int = 0
    """Data chunks sent over all attempts (a chunk lost with a connection counts twice)."""
    chunks_skipped: int = 0
    """Chunks the receiver already had when the first attempt began."""
    chunks_resumed: int = 0
    """Chunks the receiver had when the last reconnection began (0 without reconnection)."""
    bytes_sent: int = 0
    """Frame bytes sent over all attempts (header and end frames included)."""
    transfer_s: float = 0.0
    """Seconds from the first data byte to the receiver's last ``done``."""
    milestones: dict = field(default_factory=dict)
    """Milestone -> seconds since ``started`` when the receiver reported it."""
    folder: str | None = None
    missing: list = field(default_factory=list)
    problems: int = 0
    duplicates: int = 0

    @property
    def goodput_mbit_s(self) -> float:
        return 8 * self.bytes_sent / self.transfer_s / 1e6 if self.transfer_s > 0 else 0.0


# --- what is sent ----------------------------------------------------------------------------

class FrameSource:
    """The frames of one study: a header, data frames by seq. Subclasses make them."""

    header: StreamHeader
    header_frame: bytes
    order: list[int]
    """Every planned seq, in sending order."""

    @property
    def study_id(self) -> str:
        return self.header.study_id

    def frame(self, seq: int) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def frames(self, todo: list[int]) -> Iterator[tuple[int, bytes]]:
        """``(seq, frame)`` of every chunk of ``todo``, in sending order, made one at a time
        (each ``next`` runs in the encoding thread)."""
        for seq in todo:
            yield seq, self.frame(seq)

    def frames_except(self, have: set[int]) -> Iterator[tuple[int | None, bytes]]:
        """What a pass sends to a receiver that has the chunks ``have``: ``(seq, frame)`` of
        every other planned chunk in sending order, and ``(None, frame)`` for the stream's ROI
        frame where its header announced the ROI as pending (in its place: before the chunks
        that need it)."""
        return self.frames([seq for seq in self.order if seq not in have])


class EncoderSource(FrameSource):
    """Frames encoded on demand by a :class:`~sender.encoder.StudyEncoder` (pipelined).

    ``workers`` threads encode bases ahead of the sending order (:meth:`encode_ahead`): with two,
    two blocks are diffused and coded at once on a 2-core machine while the event loop sends.
    """

    def __init__(self, encoder, workers: int = 2):
        self.encoder = encoder
        self.header = encoder.header
        self.header_frame = encoder.header.to_frame()
        self.workers = workers
        self._ahead: dict = {}
        self._pool: ThreadPoolExecutor | None = None

    @property
    def order(self) -> list[int]:
        """The planned seqs (the bases alone while the encoder's ROI is pending)."""
        return [planned.seq for planned in self.encoder.plan]

    def frame(self, seq: int) -> bytes:
        future = self._ahead.pop(seq, None)
        if future is not None:
            return future.result()
        planned = next(p for p in self.encoder.plan if p.seq == seq)
        return self.encoder.encode_chunk(planned).to_frame()

    def frames(self, todo: list[int]) -> Iterator[tuple[int, bytes]]:
        """The chunks of ``todo`` in the encoder's sending order
        (:meth:`sender.encoder.StudyEncoder.frames`: whole-volume bases first where they delay
        the ROI little), the same order ``dlad-send --out`` writes."""
        wanted = set(todo)
        skip = {planned.seq for planned in self.encoder.plan if planned.seq not in wanted}
        for seq, frame in self._frames(skip):
            if seq is not None:
                yield seq, frame

    def frames_except(self, have: set[int]) -> Iterator[tuple[int | None, bytes]]:
        """The chunks the receiver lacks and the ROI frame (a pending ROI), in the encoder's
        sending order: while the ROI is computed, previews; the plan of the chunks after it
        is known only then, so what the receiver has is given as ``have``."""
        return self._frames(set(have))

    def _frames(self, skip: set[int]) -> Iterator[tuple[int | None, bytes]]:
        for chunk in self.encoder.chunks(skip):
            if not isinstance(chunk, DataChunk):  # the ROI frame
                yield None, chunk.to_frame()
                continue
            # A base encoded ahead is the encoder's own (cached) one: the future is done with.
            self._ahead.pop(chunk.seq, None)
            yield chunk.seq, chunk.to_frame()

    def encode_ahead(self, skip: set[int] = frozenset()) -> None:
        """Start encoding the bases (layer 0) of every block, in plan order, in ``workers``
        threads, ahead of the chunk being sent: a base (diffusion, lossy coding, the quality
        guard's decode) is the expensive part of a block; residuals, a fraction of it, are
        encoded in sending order against the bases. Started during the handshake, so the first
        chunk is ready (or nearly) when the inventory comes; chunks in ``skip`` are left out."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers,
                                            thread_name_prefix="dlad-encode-ahead")
        first = True
        for planned in self.encoder.plan:
            if planned.layer == 0 and planned.seq not in skip and planned.seq not in self._ahead:
                self._ahead[planned.seq] = self._pool.submit(self._encode, planned, first)
                first = False

    def _encode(self, planned, first: bool = False) -> bytes:
        if not first and not getattr(self.encoder, "roi_known", True):
            # While the study's ROI is computed (a live series whose stream started at once),
            # the previews after the first take the CPU the U-Net and the ROI steps leave: the
            # ROI is on the way to "ROI complete", those bases are not; the first is the first
            # chunk on the wire, at full priority. (Lowered once per thread, for good: raising
            # it back needs a privilege a sender may not have.)
            _lower_priority()
        return self.encoder.encode_chunk(planned).to_frame()

    def drop_ahead(self, seqs) -> None:
        """The receiver has these: do not encode them ahead (those already started finish)."""
        for seq in seqs:
            future = self._ahead.pop(seq, None)
            if future is not None:
                future.cancel()

    def close(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


#: Niceness a thread that encodes bases ahead adds to its own while the ROI is pending, from
#: the second base on (Linux: a thread's own; about a third of the CPU share of the threads
#: at the process's).
AHEAD_NICENESS = 5


_lowered = threading.local()


def _lower_priority() -> None:
    """Lower the calling thread's scheduling priority by :data:`AHEAD_NICENESS`, once per
    thread (where the system allows it; elsewhere, nothing)."""
    if getattr(_lowered, "done", False):
        return
    _lowered.done = True
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread,
                       os.getpriority(os.PRIO_PROCESS, thread) + AHEAD_NICENESS)
    except (OSError, AttributeError):
        pass


class FileSource(FrameSource):
    """The frames of a ``.dlad`` file written by ``dlad-send --out`` (replayed as they are)."""

    def __init__(self, path: Path):
        self.data = Path(path).read_bytes()
        self._frames: dict[int, tuple[int, int]] = {}
        header = None
        roi: tuple[int, RoiFrame] | None = None
        reader = FrameReader()
        events = reader.feed(self.data) + reader.finish()
        for event in events:
            if event.error is not None:
                raise ValueError(f"{path}: damaged stream at byte {event.offset}: {event.error}")
            if isinstance(event.chunk, StreamHeader) and header is None:
                header = event.chunk
                self.header_frame = self.data[event.offset:event.offset + event.size]
            elif isinstance(event.chunk, DataChunk):
                self._frames[event.chunk.seq] = (event.offset, event.size)
            elif isinstance(event.chunk, RoiFrame) and roi is None:
                roi = (event.offset, event.chunk)
        if header is None:
            raise ValueError(f"{path} holds no dlad-stream header")
        self.header = header
        #: The ROI frame of a header that announced the ROI as pending, and the stream offset
        #: it had (it is replayed before the chunks that came after it).
        self.roi: tuple[int, RoiFrame] | None = None
        if header.roi_pending:
            if roi is None:
                raise ValueError(f"{path}: the header announces the ROI as pending and no "
                                 "ROI frame follows")
            try:
                header = header.with_roi(roi[1])
            except WireError as error:
                raise ValueError(f"{path}: {error}") from None
            self.roi = roi
        planned = [entry[0] for entry in header.plan]
        absent = [seq for seq in planned if seq not in self._frames]
        if absent:
            raise ValueError(f"{path} lacks {len(absent)} planned chunks (first: {absent[0]})")
        # Replayed in the order they were written: the encoder's sending order (whole-volume
        # bases first where they delay the ROI little), which may differ from the plan's.
        wanted = set(planned)
        self.order = [seq for seq in sorted(self._frames, key=lambda seq: self._frames[seq][0])
                      if seq in wanted]

    def frame(self, seq: int) -> bytes:
        offset, size = self._frames[seq]
        return self.data[offset:offset + size]

    def frames_except(self, have: set[int]) -> Iterator[tuple[int | None, bytes]]:
        roi_sent = self.roi is None
        for seq in self.order:
            if not roi_sent and self._frames[seq][0] > self.roi[0]:
                roi_sent = True
                yield None, self.roi[1].to_frame()
            if seq not in have:
                yield seq, self.frame(seq)
        if not roi_sent:
            yield None, self.roi[1].to_frame()


# --- one connection --------------------------------------------------------------------------

class _Channel:
    """A peer connection's data channel with the waits the sender needs."""

    def __init__(self, pc: RTCPeerConnection, options: StreamOptions):
        self.pc = pc
        self.options = options
        self.channel = pc.createDataChannel(CHANNEL_LABEL, ordered=True)
        self.channel.bufferedAmountLowThreshold = options.low_water
        self.opened = asyncio.Event()
        self.closed = asyncio.Event()
        self.low = asyncio.Event()
        self.acked = asyncio.Event()
        self.arrived = asyncio.Event()
        self.messages: asyncio.Queue = asyncio.Queue()
        self.close_reason = ""
        self.refusal = ""
        self.sent_data = 0  # bytes sent after the inventory (the receiver's "consumed" scale)
        self.consumed = 0
        self.window = DEFAULT_WINDOW
        self.last_ack = time.monotonic()
        self.on_ack = None
        self._pace_until = 0.0
        self.channel.on("open", self.opened.set)
        self.channel.on("close", lambda: self._close("the data channel closed"))
        self.channel.on("bufferedamountlow", self.low.set)
        self.channel.on("message", self._on_message)

        @pc.on("connectionstatechange")
        def on_state():
            if pc.connectionState in ("failed", "closed"):
                self._close(f"connection {pc.connectionState}")

    def _close(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = self.close_reason or reason
            self.closed.set()

    def _on_message(self, message) -> None:
        try:
            control = parse_control(message)
        except ProtocolError as error:
            log.warning("ignored a message from the receiver: %s", error)
            return
        kind = control["type"]
        if kind == "ack":
            consumed = control.get("consumed")
            if isinstance(consumed, int) and consumed > self.consumed:
                self.consumed = consumed
            self.last_ack = time.monotonic()
            self.acked.set()
            self.arrived.set()
            if self.on_ack is not None:
                self.on_ack(control)
        else:
            self.last_ack = time.monotonic()
            if kind == "error":
                reason = printable(control.get("reason", "?"))
                self.close_reason = f"the receiver closed the session: {reason}"
                if not control.get("retry"):
                    self.refusal = f"the receiver refused: {reason}"
            self.messages.put_nowait(control)
            self.arrived.set()

    async def _wait(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait up to ``timeout`` s for ``event``; False on timeout; Disconnected if closed."""
        if not event.is_set() and not self.closed.is_set():
            waiter = asyncio.ensure_future(event.wait())
            closer = asyncio.ensure_future(self.closed.wait())
            try:
                await asyncio.wait({waiter, closer}, timeout=max(timeout, 0.0),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                closer.cancel()
        if event.is_set():
            return True
        if self.closed.is_set():
            self.raise_closed()
        return False

    def raise_closed(self):
        if self.refusal:
            raise Refused(self.refusal)
        raise Disconnected(self.close_reason)

    async def _until(self, event: asyncio.Event, timeout: float, what: str) -> None:
        if not await self._wait(event, timeout):
            raise Disconnected(f"timed out after {timeout:g} s waiting for {what}")

    async def _stalled_wait(self, event: asyncio.Event, what: str,
                            deadline: float = float("inf")) -> None:
        """Wait for ``event`` while the receiver shows signs of life (acks) and until deadline."""
        while True:
            limit = min(deadline, self.last_ack + self.options.stall_timeout)
            if await self._wait(event, limit - time.monotonic()):
                return
            if time.monotonic() >= min(deadline, self.last_ack + self.options.stall_timeout):
                raise Disconnected(f"no answer from the receiver while waiting for {what}")

    async def expect(self, kind: str, timeout: float) -> dict:
        """The next control message of type ``kind`` (acks are handled as they come)."""
        deadline = time.monotonic() + timeout
        while True:
            while self.messages.empty():
                self.arrived.clear()
                await self._stalled_wait(self.arrived, f"the receiver's {kind!r}", deadline)
            message = self.messages.get_nowait()
            if message["type"] == "error":
                reason = printable(message.get("reason", "?"))
                retry_after = message.get("retry_after")
                if (message.get("retry") and isinstance(retry_after, (int, float))
                        and not isinstance(retry_after, bool)):
                    raise Busy(f"the receiver is busy: {reason}", _retry_after(retry_after))
                if message.get("retry"):
                    raise Disconnected(f"the receiver closed the session: {reason}")
                raise Refused(f"the receiver refused: {reason}")
            if message["type"] == kind:
                return message
            log.debug("ignored a %r message while waiting for %r", message["type"], kind)

    async def send_bytes(self, data: bytes, counted: bool) -> None:
        options = self.options
        for piece in split_message(data, options.message_bytes):
            while self.channel.bufferedAmount > options.high_water:
                self.low.clear()
                await self._until(self.low, options.stall_timeout, "the send buffer to drain")
            while counted and self.sent_data - self.consumed > self.window:
                self.acked.clear()
                await self._stalled_wait(self.acked, "the receiver to process data")
            if options.max_rate:
                now = time.monotonic()
                self._pace_until = max(self._pace_until, now) + 8 * len(piece) / options.max_rate
                if self._pace_until - now > 0.005:  # shorter sleeps pace no better
                    await asyncio.sleep(self._pace_until - now)
            if self.closed.is_set():
                self.raise_closed()
            self.channel.send(piece)
            if counted:
                self.sent_data += len(piece)


class _Connection:
    """One peer connection to the receiver; it carries one study after another."""

    def __init__(self, link: Link):
        self.link = link
        self.pc = RTCPeerConnection(RTCConfiguration(
            iceServers=list(link.options.ice_servers)))
        self.ch = _Channel(self.pc, link.options)
        log.debug("SCTP tuning (shared/webrtc/sctp.py): %s", sctp.status())
        self.location: str | None = None
        self.multi_study = False
        """The receiver takes several studies on this connection (its inventory said so)."""
        self.studies = 0
        self.delivering = False

    @property
    def alive(self) -> bool:
        return not self.ch.closed.is_set()

    async def open(self) -> None:
        link = self.link
        try:
            await asyncio.wait_for(self._connect(), link.options.connect_timeout)
        except asyncio.TimeoutError:
            raise Disconnected(f"could not connect within {link.options.connect_timeout:g} s") \
                from None

    async def _connect(self) -> None:
        link = self.link
        with ice_hosts(link.ice_addresses):
            await self.pc.setLocalDescription(await self.pc.createOffer())
        enlarge_socket_buffers(self.pc)
        answer = await link.post_offer(self.pc.localDescription.sdp, self)
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await self.ch._until(self.ch.opened, link.options.connect_timeout, "the data channel")

    def keepalive(self) -> None:
        if self.alive and self.multi_study and not self.delivering:
            self.ch.channel.send(encode_control("keepalive"))

    async def probe(self) -> None:
        """Ask a connection opened while idle whether the receiver keeps it between studies:
        one that does answers a keepalive (an older one refuses it: :class:`Refused`)."""
        self.ch.channel.send(encode_control("keepalive"))
        await self.ch.expect("keepalive", self.link.options.connect_timeout)
        self.multi_study = True

    async def deliver(self, s: _Delivery) -> None:
        """Send one study: hello, header, inventory, passes until the receiver has it all."""
        self.delivering = True
        try:
            await self._deliver(s)
        finally:
            self.delivering = False
            self.ch.on_ack = None

    async def _deliver(self, s: _Delivery) -> None:
        options = self.link.options
        while not self.ch.messages.empty():  # keepalive answers, the previous study's leftovers
            self.ch.messages.get_nowait()
        if hasattr(s.source, "encode_ahead"):
            # The first chunks are diffused and encoded while the header and inventory cross.
            s.source.encode_ahead()
        self.studies += 1
        self.ch.channel.send(encode_control("hello", protocol=PROTOCOL_VERSION,
                                            client=client_string("dlad-send")))
        await self.ch.send_bytes(s.source.header_frame, counted=False)
        s.result.bytes_sent += len(s.source.header_frame)
        inventory = await self.ch.expect("inventory", options.connect_timeout)
        self.multi_study = inventory.get("multi_study") is True
        # Not cut to the plan: with a pending ROI the sender knows the chunks after the ROI
        # frame only once the ROI is computed, and a receiver may have them from before.
        have = set(int_list(inventory.get("have"), 1 << 31))
        window = inventory.get("window")
        if isinstance(window, int) and not isinstance(window, bool) and window > 0:
            self.ch.window = max(window, options.message_bytes)
        folder = inventory.get("folder")
        s.result.folder = printable(folder) if isinstance(folder, str) else None
        if have and hasattr(s.source, "drop_ahead"):
            s.source.drop_ahead(have)
        s.say(f"{'connected to' if self.studies == 1 else 'on the open connection to'} "
              f"{self.link.url}: inventory after {time.monotonic() - s.started:.2f} s "
              f"since start ({len(have)} chunks there)")
        if not s.source.header.roi_pending:
            have &= set(s.source.order)
        if s.result.attempts == 1:
            s.result.chunks_skipped = len(have)
        else:
            s.result.chunks_resumed = len(have)
        s.report_inventory(have, inventory)
        self.ch.on_ack = s.on_ack
        for number in range(options.max_passes):
            done = await self._pass(s, have)
            planned = set(s.source.order)
            s.result.chunks_planned = len(planned)
            s.on_done(done)
            if done.get("complete"):
                return
            missing = set(int_list(done.get("missing", []), 1 << 31)) & planned
            if done.get("roi_known") is False and s.source.header.roi_pending:
                # The receiver lacks the ROI frame (damaged on the way, say): it plans the
                # bases alone and refused what needs the ROI; that goes again with the frame.
                missing |= planned - {entry[0] for entry in s.source.header.plan}
            if not missing:
                break
            if number + 1 < options.max_passes:
                # Rejected chunks (damaged, or dropped after a failed ROI digest check): the
                # receiver counts them as missing, so they go again, at most max_passes times.
                log.warning("the receiver lacks %d chunks after pass %d; sending them again",
                            len(missing), number + 1)
            have = planned - missing
        mismatches = done.get("roi_mismatches")
        raise TransportError(
            f"the receiver still lacks chunks after {options.max_passes} passes (it rejected "
            f"them: {done.get('problems', '?')} problems"
            + (f", {mismatches} ROI digest mismatches" if isinstance(mismatches, int)
               and mismatches else "") + ")")

    async def _pass(self, s: _Delivery, have: set[int]) -> dict:
        options = self.link.options
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(maxsize=max(1, options.prefetch))

        async def produce():
            try:
                frames = s.source.frames_except(have)
                while (item := await loop.run_in_executor(self.link.encode_pool, next, frames,
                                                          None)) is not None:
                    await queue.put(item)
                await queue.put(None)
            except Exception as error:  # an encoder failure ends the pass with it
                await queue.put(error)

        producer = asyncio.create_task(produce())
        sent = 0
        total = len(s.source.header_frame)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, Exception):
                    raise item
                seq, frame = item
                if s.first_data_at is None:
                    s.first_data_at = time.monotonic()
                    what = "the ROI frame" if seq is None else f"chunk #{seq}"
                    s.say(f"first frame ({what}, {len(frame)} bytes) left at "
                          f"{s.first_data_at - s.started:.2f} s since start")
                await self.ch.send_bytes(frame, counted=True)
                total += len(frame)
                s.result.bytes_sent += len(frame)
                if seq is None:  # the ROI frame (a header that announced the ROI as pending)
                    s.say(f"ROI frame ({len(frame)} bytes) left at "
                          f"{time.monotonic() - s.started:.2f} s since start")
                    continue
                sent += 1
                s.result.chunks_sent += 1
                s.on_sent(seq, len(frame))
                drop = options.drop_after_chunks
                if drop is not None and s.result.attempts == 1 and s.result.chunks_sent >= drop:
                    log.warning("testing: cutting the connection after %d chunks", sent)
                    await self.pc.close()
                    raise Disconnected("connection cut on purpose (--drop-after)")
            end = StreamEnd(s.source.study_id, sent, total).to_frame()
            await self.ch.send_bytes(end, counted=True)
            s.result.bytes_sent += len(end)
        finally:
            producer.cancel()
            try:
                await producer
            except (asyncio.CancelledError, Exception):
                pass
        return await self.ch.expect("done", options.stall_timeout)

    async def close(self) -> None:
        try:
            await self.pc.close()
        except Exception as error:  # closing a half-open connection
            log.debug("closing the peer connection: %s", error)
        if self.location:
            await self.link.delete_session(self.location)


class _Delivery:
    """One study on its way: what was sent and confirmed, progress shown to the user."""

    def __init__(self, link: Link, source: FrameSource, started: float | None):
        self.link = link
        self.source = source
        self.options = link.options
        self.started = time.monotonic() if started is None else started
        self.result = StreamResult(chunks_planned=len(source.order))
        self.first_data_at: float | None = None
        self.bar = None
        self._applied = 0

    def say(self, text: str) -> None:
        if self.options.quiet:
            return
        if self.bar is not None:
            self.bar.write(f"dlad-send: {text}", file=sys.stderr)
        else:
            print(f"dlad-send: {text}", file=sys.stderr)

    def report_inventory(self, have: set, inventory: dict) -> None:
        planned = len(self.source.order)
        if have:
            self.say(f"receiver already has {len(have)}/{planned} chunks "
                     f"(folder {self.result.folder}); sending the other {planned - len(have)}")
        if self.bar is None and not self.options.quiet:
            self.bar = progress(total=planned, initial=len(have), unit="chunk",
                                desc="applied at receiver", file=sys.stderr)
        self._applied = len(have)

    def on_sent(self, seq: int, size: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"sent {self.result.bytes_sent / 1e6:.1f} MB", refresh=False)

    def on_ack(self, ack: dict) -> None:
        now = round(time.monotonic() - self.started, 3)
        for name in ack.get("reached") or []:
            if name in MILESTONE_TEXT and name not in self.result.milestones:
                self.result.milestones[name] = now
                self.say(f"receiver: {MILESTONE_TEXT[name]} at {now:.2f} s")
        applied = ack.get("applied")
        planned = ack.get("planned")
        if isinstance(planned, int) and self.bar is not None and planned > (self.bar.total or 0):
            self.bar.total = planned  # the ROI frame planned the layers after the bases
        if isinstance(applied, int) and self.bar is not None and applied > self._applied:
            self.bar.update(applied - self._applied)
            self._applied = applied

    def on_done(self, done: dict) -> None:
        self.result.complete = bool(done.get("complete"))
        verified = done.get("verified")
        self.result.verified = verified if isinstance(verified, bool) else None
        missing = done.get("missing")
        self.result.missing = missing if isinstance(missing, list) else []
        for name in ("problems", "duplicates"):
            value = done.get(name)
            if isinstance(value, int):
                setattr(self.result, name, value)
        if self.first_data_at is not None:
            self.result.transfer_s = time.monotonic() - self.first_data_at
        if self.result.complete:
            self.result.milestones.setdefault("complete", round(
                time.monotonic() - self.started, 3))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Link:
    """The way to one receiver: a connection kept open from one study to the next.

    :meth:`deliver` sends a study, connecting first if there is no live connection, and
    reconnecting (``retries`` times, with backoff) when it drops; each new connection resumes
    from the receiver's inventory. A receiver that takes several studies per connection keeps
    the connection between them; with ``keep_warm`` the link also sends keepalives while idle
    and reconnects by itself when the connection is lost, so that the next study finds it open.

    Example:
        >>> async with Link("http://127.0.0.1:8700", token, keep_warm=True) as link:  # doctest: +SKIP
        ...     for source in sources:
        ...         result = await link.deliver(source)
    """

    def __init__(self, url: str, token: str, options: StreamOptions = StreamOptions(),
                 keep_warm: bool = False):
        parts = check_url(url, options.allow_plain_http)
        self.ssl: ssl.SSLContext | bool = True
        if parts.scheme == "https":
            self.ssl = client_tls_context(options.ca_file)
        path = parts.path if parts.path not in ("", "/") else DEFAULT_PATH
        self.url = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
        self.token = token
        self.options = options
        self.keep_warm = keep_warm
        self.ice_addresses = loopback_hosts_for(parts.hostname)
        self.encode_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlad-encode")
        self.http: aiohttp.ClientSession | None = None
        self.connection: _Connection | None = None
        self.connections = 0
        """Connections opened so far."""
        self._lock = asyncio.Lock()
        self._warm_task: asyncio.Task | None = None

    async def __aenter__(self) -> Link:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        if self.http is None:
            # One connection per request: signaling is a few requests per study, and a pooled
            # connection could be reused just as the receiver closes it (its idle timeout). A
            # request is answered within seconds (the receiver gathers its ICE candidates
            # first): 30 s, the same bound as the whole connection set-up.
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                              connector=aiohttp.TCPConnector(force_close=True))
        if self.keep_warm and self._warm_task is None:
            self._warm_task = asyncio.create_task(self._keep_warm())

    async def close(self) -> None:
        if self._warm_task is not None:
            self._warm_task.cancel()
            try:
                await self._warm_task
            except asyncio.CancelledError:
                pass
            self._warm_task = None
        await self._drop()
        if self.http is not None:
            await self.http.close()
            self.http = None
        self.encode_pool.shutdown(wait=True, cancel_futures=True)

    # --- connections -------------------------------------------------------------------------

    async def _connected(self) -> _Connection:
        async with self._lock:
            if self.connection is not None and self.connection.alive:
                return self.connection
            await self._drop()
            connection = _Connection(self)
            self.connections += 1
            try:
                await connection.open()
            except BaseException:
                await connection.close()
                raise
            self.connection = connection
            return connection

    async def _drop(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            await connection.close()

    async def connect(self) -> None:
        """Open the connection now (else the first :meth:`deliver` does)."""
        await self.start()
        await self._connected()

    async def _keep_warm(self) -> None:
        """While idle: keepalives on the open connection; a new one when it is lost."""
        interval = self.options.keepalive_interval
        delay = self.options.backoff
        while self.keep_warm:
            await asyncio.sleep(interval)
            connection = self.connection
            if connection is not None and connection.delivering:
                continue
            if connection is not None and connection.alive:
                if not connection.multi_study:
                    continue  # a receiver without keepalives: the next study reconnects
                if time.monotonic() - connection.ch.last_ack > self.options.stall_timeout:
                    log.warning("no answer from the receiver for %.0f s while idle; "
                                "reconnecting", self.options.stall_timeout)
                    async with self._lock:
                        if self.connection is connection:
                            await self._drop()
                    continue
                connection.keepalive()
                continue
            try:
                connection = await self._connected()
            except Refused as error:
                # A refused connection (token, certificate, URL) does not mend by itself in
                # seconds: say so loudly, and look again at the longest backoff.
                log.error("the receiver %s refuses the connection: %s; trying again in %g s",
                          self.url, error, MAX_BACKOFF_S)
                await asyncio.sleep(MAX_BACKOFF_S)
                continue
            except (TransportError, OSError) as error:
                log.info("receiver %s not reachable while idle (%s); trying again in %g s",
                         self.url, error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
                continue
            try:
                if not connection.multi_study:
                    await connection.probe()
                delay = self.options.backoff
            except Refused as error:
                log.warning("the receiver does not keep idle connections (%s); connecting "
                            "for each series instead", error)
                self.keep_warm = False
                await self._drop()
            except (TransportError, OSError) as error:
                log.info("receiver %s not reachable while idle (%s); trying again in %g s",
                         self.url, error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)

    # --- delivering --------------------------------------------------------------------------

    async def deliver(self, source: FrameSource, started: float | None = None) -> StreamResult:
        """Deliver ``source``; raise :class:`TransportError` if it cannot (:class:`Refused` for
        good)."""
        await self.start()
        delivery = _Delivery(self, source, started)
        options = self.options
        delay = options.backoff
        busy_until = None
        try:
            while True:
                delivery.result.attempts += 1
                wait = None
                try:
                    connection = await self._connected()
                    await connection.deliver(delivery)
                    if not connection.multi_study:
                        await self._drop()
                    return delivery.result
                except Busy as error:
                    # Not a failed attempt: the receiver is there, with no room right now.
                    await self._drop()
                    delivery.result.attempts -= 1
                    now = time.monotonic()
                    busy_until = busy_until or now + options.busy_timeout
                    if now >= busy_until:
                        raise TransportError(f"{error} (still busy after "
                                             f"{options.busy_timeout:g} s)") from None
                    wait = min(error.retry_after, busy_until - now)
                    delivery.say(f"the receiver is busy ({error}); asking again in {wait:g} s")
                except Disconnected as error:
                    await self._drop()
                    if delivery.result.attempts > options.retries:
                        raise TransportError(f"{error} (gave up after "
                                             f"{delivery.result.attempts} attempts)") from None
                    delivery.say(f"connection lost ({error}); reconnecting in {delay:g} s "
                                 f"(attempt {delivery.result.attempts + 1} of "
                                 f"{options.retries + 1})")
                except BaseException:
                    await self._drop()
                    raise
                if wait is not None:
                    await asyncio.sleep(wait)
                    continue
                busy_until = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
        finally:
            delivery.close()
            if hasattr(source, "close"):
                source.close()

    # --- HTTP signaling ----------------------------------------------------------------------

    async def post_offer(self, sdp: str, connection: _Connection) -> str:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": SDP_CONTENT_TYPE}
        try:
            async with self.http.post(self.url, data=sdp.encode(), headers=headers,
                                      ssl=self.ssl) as response:
                text = await response.text()
                if response.status == 201 or response.status == 200:
                    if "Location" in response.headers:
                        connection.location = urljoin(self.url, response.headers["Location"])
                    return text
                message = (f"signaling: HTTP {response.status} from {self.url}: "
                           f"{printable(text.strip())}")
                if response.status in (401, 403):
                    raise Refused(f"{message} (is --token-file the receiver's token?)")
                if response.status == 503:
                    raise Busy(message, _retry_after(response.headers.get("Retry-After")))
                if response.status in (408, 429) or response.status >= 500:
                    raise Disconnected(message)
                raise Refused(message)
        except aiohttp.ClientConnectorCertificateError as error:
            raise Refused(f"signaling: the certificate of {self.url} is not trusted "
                          f"({error.certificate_error}); give its CA with --ca-file") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            raise Disconnected(f"signaling: cannot reach {self.url}: {error}") from None

    async def delete_session(self, location: str) -> None:
        try:
            async with self.http.delete(location, headers={
                    "Authorization": f"Bearer {self.token}"}, ssl=self.ssl,
                    timeout=aiohttp.ClientTimeout(total=5)) as response:  # a courtesy
                await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass


def check_url(url: str, allow_plain_http: bool = False):
    """``urlsplit(url)`` of a usable receiver URL; ValueError says what is wrong with it.

    Plain ``http://`` is only for loopback (or with ``allow_plain_http``): the bearer token and
    the DTLS fingerprints would otherwise cross the network in clear.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--to must be http(s)://HOST:PORT[/PATH], got {url!r}")
    if parts.scheme == "http" and not allow_plain_http and not is_loopback(parts.hostname):
        raise ValueError(f"refusing plain HTTP to {parts.hostname}: the token would travel "
                         "in clear; use https:// (the receiver's --tls-cert, or a TLS reverse "
                         "proxy), or pass --allow-plain-http on a network you trust")
    return parts


def _retry_after(value) -> float:
    """Seconds a 503's ``Retry-After`` (or an error's ``retry_after``) asks for, within
    :data:`RETRY_AFTER_BOUNDS`."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = 2.0
    if not math.isfinite(seconds):
        seconds = 2.0
    low, high = RETRY_AFTER_BOUNDS
    return min(max(seconds, low), high)


async def stream_study(source: FrameSource, url: str, token: str,
                       options: StreamOptions = StreamOptions(),
                       started: float | None = None) -> StreamResult:
    """Deliver ``source`` to the receiver at ``url``; raise TransportError if it cannot."""
    async with Link(url, token, options) as link:
        return await link.deliver(source, started)

def process_started() -> float:
    """``time.monotonic()`` of this process's start (Linux), else now."""
    try:
        with open("/proc/self/stat") as handle:
            ticks = int(handle.read().rpartition(")")[2].split()[19])
        import os
        uptime_at_start = ticks / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return time.monotonic() - max(0.0, uptime - uptime_at_start)
    except (OSError, ValueError, IndexError):
        return time.monotonic()
