"""One sender's peer connection on the receiver: the ``dlad`` channel, its protocol and its budget.

A :class:`Session` moves through ``new`` (peer connection answered) -> ``header`` (hello
received) -> ``opening`` (header frame received and checked, study being opened) -> ``data``
(inventory sent, frames flowing) -> ``closed``. What a session may cost is bounded
(:class:`~receiver.limits.Limits`):

* the header frame: its prefix is read first (at most ``MAX_HEADER_BYTES``, and that much
  memory is reserved from the budget while it arrives), then the voxels and plan entries it
  announces, and only then is it parsed and checked as a whole (:func:`check_header`);
* the data: bytes beyond the credit window close the session, and so do more bytes than the
  study's stream can hold (twice its largest legitimate stream);
* errors: more than ``max_bad_frames`` bad frames (garbage runs, failed checksums, rejected
  chunks, protocol slips) or ``max_junk_bytes`` of garbage close the session at once, and the
  data it had queued is dropped unprocessed; ``progress_timeout`` seconds without a new chunk
  close it too (the service's housekeeping).

Network input never raises out of a handler: a session that breaks the protocol gets an
``error`` message (with ``retry``: whether trying again may help) and is closed, and the other
sessions go on.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from aiortc import RTCPeerConnection

from receiver.limits import MAX_HEADER_BYTES, LimitExceeded, check_announced, check_header
from receiver.store import StoreError
from shared.webrtc.ice import selected_pair
from shared.webrtc.protocol import (
    CHANNEL_LABEL,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    ProtocolError,
    encode_control,
    parse_control,
)
from shared.wire import KIND_HEADER, MAGIC, PREFIX, StreamHeader, WireError, parse_frame

log = logging.getLogger("dlad.receiver")

#: Messages a sender may have in flight beyond the credit window before it counts as ignoring
#: it (aiortc delivers whole messages; a sender may be a few messages late reading an ack).
WINDOW_SLACK_MESSAGES = 16

#: Seconds a sender turned away for lack of memory is told to wait (``retry_after``): studies
#: leave memory when their sessions end, which takes seconds, not minutes.
BUSY_RETRY_AFTER_S = 2.0


class Refusal(Exception):
    """The service cannot take a study now or at all; ``retry`` says whether to try again."""

    def __init__(self, reason: str, retry: bool):
        super().__init__(reason)
        self.retry = retry


class Session:
    """One peer connection (one sender, one study at a time; a warm sender sends several, one
    after the other, see :mod:`shared.webrtc.protocol`)."""

    def __init__(self, service, pc: RTCPeerConnection, remote: str):
        self.service = service
        self.limits = service.config.limits
        self.pc = pc
        self.remote = remote
        self.id = secrets.token_urlsafe(12)
        self.created = self.last_activity = self.last_progress = time.monotonic()
        self.header_since = self.created
        """When the current study's hello came (its header is due within the open timeout)."""
        self.channel = None
        self.state = "new"  # new -> header -> opening -> data -> closed
        self.study = None
        self.cost = None
        """The study's :class:`~receiver.limits.StudyCost`, once its header is accepted."""
        self.header_bytes = bytearray()
        self._header_reserved = 0
        self.consumed = 0
        """Bytes of this session (all its studies) processed: the credit window's measure."""
        self.received = 0
        self.study_received = 0
        """Bytes received for the current study (bounded by its stream's size)."""
        self.bad_frames = 0
        self.junk_bytes = 0
        self.data_started = 0.0
        self.last_sent = 0.0
        self.discard_input = False
        """Set when the session is closed for abuse: its queued data is dropped unread."""

        @pc.on("datachannel")
        def on_datachannel(channel):
            if channel.label != CHANNEL_LABEL or self.channel is not None:
                log.warning("session %s: unexpected data channel %r closed", self.id,
                            channel.label)
                channel.close()
                return
            self.channel = channel
            channel.on("message", self.on_message)
            channel.on("close", lambda: self.close("channel closed"))

        @pc.on("connectionstatechange")
        def on_state():
            if pc.connectionState in ("failed", "closed"):
                self.close(f"connection {pc.connectionState}")

    # --- messages ----------------------------------------------------------------------------

    def on_message(self, message) -> None:
        if self.state == "closed":
            return
        self.last_activity = time.monotonic()
        try:
            if isinstance(message, str):
                self._on_control(message)
            else:
                self._on_binary(bytes(message))
        except ProtocolError as error:
            self.fail(str(error), discard=True)
        except LimitExceeded as error:
            self.fail(str(error), discard=True)
        except Exception:  # never let network input take the receiver down
            log.exception("session %s: unexpected error on a message", self.id)
            self.fail("receiver error", retry=True)

    def _on_control(self, text: str) -> None:
        message = parse_control(text)
        if message["type"] == "keepalive":
            # A sender idle between two series: answer, so that it knows the link is alive.
            self.send_control("keepalive")
            return
        if message["type"] != "hello":
            raise ProtocolError(f"unexpected {message['type']!r} message from a sender")
        if self.state == "data":
            # The next study on the same connection (a warm sender between series, see the
            # inventory's multi_study): the current one is finished like a closed session.
            if self.study is not None:
                self.study.detach(self)
            self.study, self.cost, self.study_received = None, None, 0
            self.state = "new"
        elif self.state != "new":
            raise ProtocolError("a second hello")
        if message.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError(f"unsupported protocol version {message.get('protocol')!r} "
                                f"(this receiver speaks {PROTOCOL_VERSION})")
        self.state = "header"
        self.header_since = time.monotonic()

    def _on_binary(self, data: bytes) -> None:
        if self.state == "new":
            raise ProtocolError("binary data before the hello")
        if self.state == "data":
            self.received += len(data)
            self.study_received += len(data)
            backlog = self.received - self.consumed
            window = self.service.config.window
            if backlog > 2 * window + MAX_MESSAGE_BYTES * WINDOW_SLACK_MESSAGES:
                raise ProtocolError(f"sender ignores the flow-control window ({backlog} bytes "
                                    "unprocessed)")
            if self.study_received > self.max_session_bytes():
                raise ProtocolError(f"the session sent {self.study_received} bytes, more than "
                                    f"its study's stream can hold ({self.max_session_bytes()})")
            self.study.feed(self, data)
            return
        if self.state == "opening":
            self.note_error(f"{len(data)} bytes sent before the inventory were ignored")
            return
        self._on_header_bytes(data)

    def _on_header_bytes(self, data: bytes) -> None:
        """State ``header``: the first frame must be the stream header.

        Its prefix and size are checked first (and its size reserved from the memory budget),
        then the voxels and plan entries it announces, and only then is it parsed (the parse
        allocates the packed ROI mask, an eighth of a byte per voxel) and checked whole.
        """
        self.header_bytes += data
        if len(self.header_bytes) < PREFIX.size:
            return
        magic, version, kind, length, _ = PREFIX.unpack_from(self.header_bytes)
        if magic != MAGIC or kind != KIND_HEADER:
            raise ProtocolError("the first frame must be the stream header")
        if length > MAX_HEADER_BYTES:
            raise ProtocolError(f"header frame of {length} bytes is too large "
                                f"(at most {MAX_HEADER_BYTES})")
        end = PREFIX.size + length
        if not self._header_reserved:
            # The buffer, the frame's copy and its parse: three times its size at most.
            need = 3 * end
            if not self.service.memory.reserve(need):
                self.fail("the receiver is busy (memory budget in use); retry later",
                          retry=True, discard=True, retry_after=BUSY_RETRY_AFTER_S)
                return
            self._header_reserved = need
        if len(self.header_bytes) < end:
            return
        frame = bytes(self.header_bytes[:end])
        if len(self.header_bytes) > end:
            self.note_error(f"{len(self.header_bytes) - end} bytes after the header were sent "
                            "before the inventory and ignored")
        self.header_bytes = bytearray()
        try:
            check_announced(frame, self.limits)
            try:
                header = parse_frame(frame)
            except WireError as error:
                raise ProtocolError(f"bad header frame: {error}") from None
            if not isinstance(header, StreamHeader):
                raise ProtocolError("the first frame must be the stream header")
            cost = check_header(header, self.limits, self.service.config.window)
        finally:
            self._release_header_memory()
        self.state = "opening"
        self.cost = cost
        self.service.spawn(self._open_study(header, frame, cost))

    def _release_header_memory(self) -> None:
        if self._header_reserved:
            self.service.memory.release(self._header_reserved)
            self._header_reserved = 0

    def max_session_bytes(self) -> int:
        """Bytes one session may send for its study: twice the largest stream it allows."""
        return 2 * self.cost.stream + (1 << 20)

    async def _open_study(self, header: StreamHeader, frame: bytes, cost) -> None:
        try:
            runtime = await self.service.open_study(header, frame, cost)
        except Refusal as refusal:
            log.warning("session %s: study %s refused: %s", self.id, header.study_id, refusal)
            self.fail(str(refusal), retry=refusal.retry,
                      retry_after=BUSY_RETRY_AFTER_S if refusal.retry else None)
            return
        except StoreError as error:
            log.error("session %s: study %s refused: %s", self.id, header.study_id, error)
            self.fail(str(error), retry=True)
            return
        except Exception:  # a bug: the sender is told, not left waiting in "opening"
            log.exception("session %s: study %s could not be opened", self.id, header.study_id)
            self.fail("receiver error while opening the study", retry=True)
            return
        if self.state == "closed":
            return
        self.study = runtime
        runtime.attach(self)
        try:
            inventory = await runtime.call(runtime._inventory)
        except StoreError as error:  # the study left memory meanwhile (disk full, say)
            self.fail(str(error), retry=True)
            return
        if self.state == "closed":
            return
        log.info("session %s: study %s (%s): %d/%d chunks already here%s; ICE %s", self.id,
                 header.study_id, runtime.record.name, len(inventory["have"]),
                 len(header.plan), ", complete" if inventory["complete"] else "",
                 selected_pair(self.pc) or "pair unknown")
        self.state = "data"
        self.data_started = self.last_progress = time.monotonic()
        self.send_control("inventory", study_id=header.study_id,
                          folder=runtime.record.name, have=inventory["have"],
                          complete=inventory["complete"], window=self.service.config.window,
                          multi_study=True)

    # --- budget ------------------------------------------------------------------------------

    def problem_budget(self) -> int:
        """Bad frames this session may still send before it is closed."""
        return max(0, self.limits.max_bad_frames - self.bad_frames)

    def count_problems(self, problems: int, junk_bytes: int) -> bool:
        """Add a batch's bad frames and garbage; close the session when over budget (True)."""
        self.bad_frames += problems
        self.junk_bytes += junk_bytes
        if self.bad_frames > self.limits.max_bad_frames:
            self.fail(f"too many bad frames ({self.bad_frames}, at most "
                      f"{self.limits.max_bad_frames})", discard=True)
            return True
        if self.junk_bytes > self.limits.max_junk_bytes:
            self.fail(f"too much data that is not a frame ({self.junk_bytes} bytes, at most "
                      f"{self.limits.max_junk_bytes})", discard=True)
            return True
        return False

    def note_error(self, message: str) -> None:
        log.warning("session %s: %s", self.id, message)
        self.count_problems(1, 0)

    # --- sending and closing -----------------------------------------------------------------

    def send_control(self, kind: str, **fields) -> None:
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return
        self.last_sent = time.monotonic()
        try:
            channel.send(encode_control(kind, **fields))
        except Exception as error:  # a channel closing under us
            log.debug("session %s: cannot send %s: %s", self.id, kind, error)

    def fail(self, reason: str, retry: bool = False, discard: bool = False,
             retry_after: float | None = None) -> None:
        """Close the session for ``reason``, telling the sender; ``discard`` drops its queued
        data unprocessed (a session closed for abuse); ``retry_after`` tells a sender turned
        away for lack of room when to ask again."""
        if self.state == "closed":
            return
        log.warning("session %s (%s): closing: %s", self.id, self.remote, reason)
        if discard:
            self.discard_input = True
        self.close(reason, notify=True, retry=retry, retry_after=retry_after)

    def close(self, reason: str, notify: bool = False, retry: bool = False,
              retry_after: float | None = None) -> None:
        """End the session; ``notify`` tells the sender why, and whether to try again."""
        if self.state == "closed":
            return
        if notify:
            extra = {} if retry_after is None else {"retry_after": retry_after}
            self.send_control("error", reason=reason, retry=retry, **extra)
        self.state = "closed"
        self.header_bytes = bytearray()
        self._release_header_memory()
        log.info("session %s closed (%s)", self.id, reason)
        if self.study is not None:
            self.study.detach(self)
        self.service.forget(self)
        self.service.spawn(self._close_pc(notify))

    async def _close_pc(self, linger: bool) -> None:
        if linger:
            await asyncio.sleep(0.2)  # let the error message leave
        try:
            await self.pc.close()
        except Exception as error:
            log.debug("session %s: closing the peer connection: %s", self.id, error)
