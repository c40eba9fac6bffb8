"""Three changes to aiortc's SCTP association, taken from the RFCs, applied by both peers.

aiortc (1.16) implements SCTP in Python: every packet costs a DTLS record, a UDP datagram and
some hundred microseconds of interpreter time on each side, so a stream is CPU-bound well
below the link rates dlad serves. Two departures from the SCTP specification make it worse,
and its slow start fills a link's queue until it overflows:

1. **Delayed acknowledgement** (RFC 9260 section 6.2). aiortc sends a SACK for every packet
   carrying DATA. The RFC asks for a SACK for *at least every second packet* and within
   200 ms of an unacknowledged DATA chunk, and for an immediate SACK when the packet shows a
   gap or carries a duplicate. Acknowledging every second packet halves the SACKs: half the
   encrypt/send work at the receiver and half the receive/decrypt/bookkeeping at the sender.
   :data:`ACK_DELAY` (well below the RFC's 200 ms) bounds the wait of a lone packet, e.g. the
   last one of a burst.
2. **Fast retransmit at most once** (RFC 9260 section 7.2.4: a TSN that has been fast
   retransmitted is not eligible for a subsequent fast retransmit; the T3 timer covers a
   lost retransmission). aiortc keeps counting miss indications for a chunk it has already
   retransmitted and sends it again every three SACKs while the first copy still waits in a
   queue; behind a 64 kB Wi-Fi queue at 2 Mbit/s fewer than half of its retransmissions
   replaced a lost packet (docs/LINK_BENCHMARK.md).
3. **Leaving slow start when the delay rises** (HyStart++, RFC 9406, written for TCP). Slow
   start doubles the congestion window every round trip until a loss; with an initial
   threshold as large as the peer's window (1 MiB) it fills the bottleneck's queue and
   overflows it, and the losses cost retransmissions and a halved window. HyStart++ watches
   the smallest round-trip time of each round (at least :data:`HYSTART_MIN_SAMPLES`
   samples); when it exceeds the previous round's by ``clamp(previous / 8, 4 ms, 16 ms)`` the
   queue has started to grow: the window then grows four times slower ("conservative slow
   start") for five rounds and congestion avoidance follows (one more packet per round
   trip), unless the delay falls back below where it rose (jitter, not a queue), which
   resumes slow start. Only the initial slow start uses it; after a loss aiortc's own
   threshold rules. And since SACKs now come for every second packet, slow start
   counts up to two chunks of acknowledged bytes per SACK (Appropriate Byte Counting, RFC
   3465, L = 2, meant for receivers that delay their acknowledgements), so the window still
   doubles per round trip instead of growing by half.

The rules wrap three private methods of :class:`aiortc.rtcsctptransport.RTCSctpTransport`, so
they are applied only to the aiortc versions they were written and tested against
(:data:`SUPPORTED_AIORTC`) and only when the attributes they rely on exist; otherwise aiortc
runs unchanged and :func:`status` says why. ``DLAD_SCTP_TUNING=0`` in the environment turns
them off (for comparison, or if a peer misbehaves). Importing this module applies them once
per process; both ``dlad-send`` and ``dlad-receive`` import it.

A fourth change is a bound, not tuning, and ``DLAD_SCTP_TUNING`` leaves it on: **bounded
reassembly**. aiortc buffers every DATA chunk it cannot deliver yet (behind a gap, or part of
a message whose end has not come) and only lowers the window it advertises; its own sender
never reads that window, and a hostile peer need not either, so a peer could make it buffer
without end (one endless message). Past :data:`MAX_REASSEMBLY_BYTES` buffered, DATA chunks
that are not the next in order are dropped unacknowledged (RFC 9260 section 6.2 lets a
receiver without buffer space drop them; the peer resends them later), and past that plus two
of aiortc's largest messages, every chunk is (only an endless message gets there; the
association then stalls and the application's timeouts end it). dlad peers keep at most a
couple of MiB in flight (the credit window), far below the bound.
"""

from __future__ import annotations

import asyncio
import os

import aiortc
from aiortc import rtcsctptransport

#: aiortc release series whose SCTP internals these wrappers were checked against.
SUPPORTED_AIORTC = ("1.16.",)

#: Longest wait before a lone DATA packet is acknowledged, in seconds (RFC 9260: <= 200 ms).
ACK_DELAY = 0.02

#: Acknowledge at least every this many packets carrying DATA (RFC 9260 section 6.2).
ACK_EVERY_PACKETS = 2

#: Slow start grows the window by at most this many chunks' bytes per SACK (RFC 3465: L = 2).
SLOW_START_CHUNKS_PER_SACK = 2

#: Round-trip samples a slow-start round needs before HyStart++ compares it (RFC 9406: 8).
HYSTART_MIN_SAMPLES = 8

#: Bounds of HyStart++'s delay threshold, in seconds (RFC 9406: MIN_RTT_THRESH, MAX_RTT_THRESH).
HYSTART_THRESHOLD = (0.004, 0.016)

#: Conservative slow start grows the window this many times slower (RFC 9406: 4) ...
HYSTART_CSS_GROWTH_DIVISOR = 4

#: ... for at most this many rounds before congestion avoidance (RFC 9406: 5).
HYSTART_CSS_ROUNDS = 5

#: Miss count given to a chunk that was already retransmitted: three more misses cannot
#: bring it to aiortc's fast-retransmit threshold (3) again.
_NOT_ELIGIBLE = -(1 << 30)

_Transport = rtcsctptransport.RTCSctpTransport
_CHUNK = getattr(rtcsctptransport, "USERDATA_MAX_LENGTH", 1160)
_REQUIRED = ("_send_sack", "_receive_sack_chunk", "_update_rto")


def status() -> str:
    """``"applied"``, or why aiortc's SCTP runs unchanged."""
    return _status


async def _send_sack_delayed(self) -> None:
    """Called by aiortc after each received packet that needs a SACK: send it or defer it."""
    unacked = getattr(self, "_dlad_unacked_packets", 0) + 1
    urgent = (self._sack_misordered or self._sack_duplicates
              or self._association_state != _Transport.State.ESTABLISHED)
    if not urgent and unacked < ACK_EVERY_PACKETS:
        self._dlad_unacked_packets = unacked
        if getattr(self, "_dlad_ack_timer", None) is None:
            self._dlad_ack_timer = self._loop.call_later(ACK_DELAY, _ack_timer_expired, self)
        return
    timer = getattr(self, "_dlad_ack_timer", None)
    if timer is not None:
        timer.cancel()
        self._dlad_ack_timer = None
    self._dlad_unacked_packets = 0
    await _Transport._dlad_original_send_sack(self)


def _ack_timer_expired(self) -> None:
    self._dlad_ack_timer = None
    if self._sack_needed and self._association_state == _Transport.State.ESTABLISHED:
        self._dlad_unacked_packets = 0
        asyncio.ensure_future(_send_deferred_sack(self))


async def _send_deferred_sack(self) -> None:
    try:
        await _Transport._dlad_original_send_sack(self)
    except ConnectionError:  # the DTLS transport closed meanwhile: nothing left to acknowledge
        pass


async def _receive_sack_chunk_tuned(self, chunk) -> None:
    """aiortc's SACK handling, with rule 2 before it and the slow-start byte count after it."""
    fresh = not rtcsctptransport.uint32_gt(self._last_sacked_tsn, chunk.cumulative_tsn)
    if fresh and chunk.gaps:
        # Rule 2: chunks already resent are not struck again (only the T3 timer resends them).
        highest_reported = ((chunk.cumulative_tsn + chunk.gaps[-1][1])
                            % rtcsctptransport.SCTP_TSN_MODULO)
        for sent in self._sent_queue:
            if rtcsctptransport.uint32_gt(sent.tsn, highest_reported):
                break
            if sent._sent_count > 1 or sent._retransmit:
                sent._misses = _NOT_ELIGIBLE
    slow_start = (fresh and not chunk.gaps and self._fast_recovery_exit is None
                  and self._flight_size >= self._cwnd and self._cwnd <= self._ssthresh)
    if slow_start:
        cwnd, ssthresh, acked = self._cwnd, self._ssthresh, 0
        for sent in self._sent_queue:
            if rtcsctptransport.uint32_gt(sent.tsn, chunk.cumulative_tsn):
                break
            if not sent._acked:
                acked += sent._book_size
    await _Transport._dlad_original_receive_sack_chunk(self, chunk)
    if slow_start and self._ssthresh == ssthresh and self._cwnd == cwnd + min(acked, _CHUNK):
        # aiortc grew the window by at most one chunk per SACK; with a SACK for every second
        # packet that would slow slow start from x2 to x1.5 per round trip. Appropriate Byte
        # Counting (RFC 3465) allows L = 2 chunks per SACK for a receiver that delays them.
        increase = min(acked, SLOW_START_CHUNKS_PER_SACK * _CHUNK)
        hystart = getattr(self, "_dlad_hystart", None)
        if hystart is not None and hystart.in_css():
            increase //= HYSTART_CSS_GROWTH_DIVISOR
        self._cwnd = cwnd + increase


class _HyStart:
    """HyStart++ (RFC 9406) state of one association during its initial slow start."""

    __slots__ = ("initial_ssthresh", "end_tsn", "current_min", "previous_min", "samples",
                 "css_baseline", "css_rounds", "done")

    def __init__(self, initial_ssthresh: int):
        self.initial_ssthresh = initial_ssthresh
        self.end_tsn = None
        self.current_min = self.previous_min = float("inf")
        self.samples = 0
        self.css_baseline: float | None = None
        """The round's minimum RTT that started conservative slow start (None: not in it)."""
        self.css_rounds = 0
        self.done = False

    def in_css(self) -> bool:
        return self.css_baseline is not None and not self.done


def _update_rto_hystart(self, rtt: float) -> None:
    """aiortc's RTO update, then HyStart++'s round bookkeeping and delay checks."""
    _Transport._dlad_original_update_rto(self, rtt)
    state = getattr(self, "_dlad_hystart", None)
    if state is None:
        state = self._dlad_hystart = _HyStart(self._ssthresh)
    if state.done:
        return
    if self._ssthresh != state.initial_ssthresh or self._fast_recovery_exit is not None:
        state.done = True  # a loss set the threshold: standard congestion control from here
        return
    if state.end_tsn is None or rtcsctptransport.uint32_gte(self._last_sacked_tsn,
                                                            state.end_tsn):
        # A round ends when the chunk that was last sent as it began is acknowledged.
        if state.in_css():
            state.css_rounds += 1
            if state.css_rounds >= HYSTART_CSS_ROUNDS:
                self._ssthresh = self._cwnd  # congestion avoidance from here
                state.done = True
                return
        state.previous_min, state.current_min, state.samples = state.current_min, rtt, 0
        state.end_tsn = self._sent_queue[-1].tsn if self._sent_queue else self._last_sacked_tsn
    state.current_min = min(state.current_min, rtt)
    state.samples += 1
    if state.samples < HYSTART_MIN_SAMPLES:
        return
    if state.in_css():
        if state.current_min < state.css_baseline:
            state.css_baseline = None  # the delay fell back (jitter, not a queue): slow start
    elif state.previous_min != float("inf"):
        low, high = HYSTART_THRESHOLD
        if state.current_min >= state.previous_min + min(max(state.previous_min / 8, low),
                                                         high):
            state.css_baseline, state.css_rounds = state.current_min, 0


def whole_chunk_message_bytes(limit: int) -> int:
    """The largest multiple of aiortc's DATA chunk payload not above ``limit``.

    aiortc cuts a message into chunks of at most ``USERDATA_MAX_LENGTH`` (1160) bytes, one chunk
    per packet: a 16 KiB message is 14 full packets and one of 144 bytes. Messages of whole
    chunks (16,240 bytes) save that short packet, its headers and its acknowledgement.
    """
    return limit // _CHUNK * _CHUNK if 0 < _CHUNK <= limit else limit


#: Bytes of undeliverable DATA a receiver buffers before it drops out-of-order chunks.
MAX_REASSEMBLY_BYTES = 8 * 1024 * 1024

#: aiortc's initial advertised receive window: what is buffered = this - the current window.
_INITIAL_RWND = 1024 * 1024

#: aiortc's largest message (bytes): in-order data beyond the bound plus two of these can only
#: be an endless message.
_MAX_MESSAGE = getattr(rtcsctptransport, "MAX_MESSAGE_SIZE", 262144)


async def _receive_data_chunk_bounded(self, chunk) -> None:
    """aiortc's DATA handling, unless the chunk would take the buffer past its bound."""
    buffered = _INITIAL_RWND - self._advertised_rwnd + len(chunk.user_data)
    if buffered > MAX_REASSEMBLY_BYTES:
        in_order = (self._last_received_tsn is not None
                    and chunk.tsn == rtcsctptransport.tsn_plus_one(self._last_received_tsn))
        if not in_order or buffered > MAX_REASSEMBLY_BYTES + 2 * _MAX_MESSAGE:
            self._dlad_dropped_chunks = getattr(self, "_dlad_dropped_chunks", 0) + 1
            return  # not marked received: not acknowledged, the peer may resend it
    await _Transport._dlad_original_receive_data_chunk(self, chunk)


def _apply_bounds() -> str:
    if not aiortc.__version__.startswith(SUPPORTED_AIORTC):
        return f"not applied: aiortc {aiortc.__version__} is not one of {SUPPORTED_AIORTC}"
    if not all(hasattr(_Transport, name) for name in ("_receive_data_chunk",)) or not hasattr(
            rtcsctptransport, "tsn_plus_one"):
        return "not applied: aiortc has no _receive_data_chunk"
    if not hasattr(_Transport, "_dlad_original_receive_data_chunk"):
        _Transport._dlad_original_receive_data_chunk = _Transport._receive_data_chunk
    _Transport._receive_data_chunk = _receive_data_chunk_bounded
    return "applied"


def bounds_status() -> str:
    """``"applied"``, or why aiortc's reassembly runs unbounded."""
    return _bounds_status


def _apply() -> str:
    if os.environ.get("DLAD_SCTP_TUNING", "1").strip().lower() in ("0", "off", "no", "false"):
        return "off (DLAD_SCTP_TUNING)"
    if not aiortc.__version__.startswith(SUPPORTED_AIORTC):
        return f"not applied: aiortc {aiortc.__version__} is not one of {SUPPORTED_AIORTC}"
    missing = [name for name in _REQUIRED if not hasattr(_Transport, name)]
    if missing:
        return f"not applied: aiortc has no {', '.join(missing)}"
    if not hasattr(_Transport, "_dlad_original_send_sack"):  # not yet wrapped in this process
        _Transport._dlad_original_send_sack = _Transport._send_sack
        _Transport._dlad_original_receive_sack_chunk = _Transport._receive_sack_chunk
        _Transport._dlad_original_update_rto = _Transport._update_rto
    _Transport._send_sack = _send_sack_delayed
    _Transport._receive_sack_chunk = _receive_sack_chunk_tuned
    _Transport._update_rto = _update_rto_hystart
    return "applied"


_status = _apply()
_bounds_status = _apply_bounds()
