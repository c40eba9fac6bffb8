"""The arithmetic of one link direction: which packets get through and when they arrive.

Nothing here touches a socket or the event loop: :class:`LinkModel` takes the time a packet
enters and returns the time it leaves the far end, so tests can drive it with made-up clocks.
Times are seconds on any monotonic clock.
"""

from __future__ import annotations

import enum
import random
from bisect import bisect_left
from collections import deque

from .params import TRACE_MTU, DeliveryTrace, GilbertElliott, LinkParams


class Drop(enum.Enum):
    """Why a packet did not make it through the link."""

    LOSS = "loss"
    "The loss model dropped it on entry."
    QUEUE = "queue"
    "The queue was full when it arrived (drop-tail)."


class BernoulliLoss:
    """Independent loss: each packet is lost with the same probability."""

    def __init__(self, probability: float, rng: random.Random) -> None:
        self._probability = probability
        self._rng = rng

    def lose(self) -> bool:
        """Draw the fate of the next packet."""
        return self._rng.random() < self._probability


class GilbertElliottLoss:
    """Bursty loss from a :class:`GilbertElliott` chain that starts in the good state."""

    def __init__(self, model: GilbertElliott, rng: random.Random) -> None:
        self._model = model
        self._rng = rng
        self._bad = False

    def lose(self) -> bool:
        """Step the chain, then draw the fate of the next packet in the state reached."""
        if self._bad:
            self._bad = self._rng.random() >= self._model.r
        else:
            self._bad = self._rng.random() < self._model.p
        delivered = self._model.h if self._bad else self._model.k
        return self._rng.random() >= delivered


class Unshaped:
    """A link without a rate limit: packets leave as they come."""

    def departure(self, arrival: float, size: int) -> float:
        """Return when a packet that entered at `arrival` leaves the queue."""
        return arrival


class TokenBucket:
    """A constant-rate link with a bucket of `burst` bytes.

    The bucket fills at the link rate up to its depth; a packet leaves once the packets ahead
    of it have left and the bucket holds its size. Sustained traffic therefore leaves at exactly
    the rate, one packet every ``size * 8 / rate`` seconds, while an idle link lets one burst
    through at once. With ``burst = 0`` this is plain serialization:
    ``departure = max(now, link_free_at) + size * 8 / rate``.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self._seconds_per_byte = 8.0 / rate
        self._depth = burst * self._seconds_per_byte
        # The time at which the bucket would be empty had nothing been sent since; the bucket
        # holds (now - _empty_at) worth of bytes, capped at its depth.
        self._empty_at = float("-inf")
        self._last_departure = float("-inf")

    def departure(self, arrival: float, size: int) -> float:
        """Return when a packet that entered at `arrival` leaves the queue."""
        at_head = max(arrival, self._last_departure)
        self._empty_at = max(self._empty_at, at_head - self._depth) + size * self._seconds_per_byte
        self._last_departure = max(at_head, self._empty_at)
        return self._last_departure


class TraceSchedule:
    """A link whose rate follows a mahimahi delivery trace, starting at `origin`.

    Each opportunity carries up to 1500 bytes: a small packet leaves at the first opportunity
    once it is at the head of the queue and lets the next packets use the rest of that
    opportunity; a large one uses as many opportunities as its size needs. An opportunity
    that finds the queue empty is lost, as in mahimahi.
    """

    def __init__(self, trace: DeliveryTrace, origin: float) -> None:
        self._times = [t / 1000 for t in trace.opportunities_ms]
        self._period = trace.period_ms / 1000
        self._origin = origin
        # Opportunities are numbered from 0 along the looping trace: the last one used, and
        # the bytes it can still carry.
        self._index = -1
        self._bytes_left = 0

    def _time(self, index: int) -> float:
        cycle, position = divmod(index, len(self._times))
        return self._origin + cycle * self._period + self._times[position]

    def _first_at_or_after(self, when: float) -> int:
        cycle, offset = divmod(max(when - self._origin, 0.0), self._period)
        position = bisect_left(self._times, offset)
        return int(cycle) * len(self._times) + position

    def departure(self, arrival: float, size: int) -> float:
        """Return when a packet that entered at `arrival` leaves the queue."""
        # What the last opportunity left over serves this packet only if it was already
        # waiting then; an opportunity does not wait for packets.
        if self._index < 0 or arrival > self._time(self._index):
            self._bytes_left = 0
        needed = size - self._bytes_left
        self._bytes_left = max(-needed, 0)
        while needed > 0:
            self._index = max(self._index + 1, self._first_at_or_after(arrival))
            needed -= TRACE_MTU
            self._bytes_left = max(-needed, 0)
        return self._time(self._index)


class LinkModel:
    """One link direction: loss on entry, a drop-tail queue, the rate, then delay and jitter.

    `seed` makes the random draws reproducible; loss and jitter draw from separate streams,
    so adding jitter leaves the loss pattern of a seed as it was. `origin` is the time the
    link starts, where a delivery trace starts too.
    """

    def __init__(self, params: LinkParams, *, origin: float = 0.0, seed: int | str | None = None) -> None:
        self.params = params
        loss_rng = random.Random(None if seed is None else f"{seed}/loss")
        self._jitter_rng = random.Random(None if seed is None else f"{seed}/jitter")
        self._loss = (GilbertElliottLoss(params.gilbert, loss_rng) if params.gilbert is not None
                      else BernoulliLoss(params.loss, loss_rng))
        if params.trace is not None:
            self._shaper: Unshaped | TokenBucket | TraceSchedule = TraceSchedule(params.trace, origin)
        elif params.rate is not None:
            self._shaper = TokenBucket(params.rate, params.burst)
        else:
            self._shaper = Unshaped()
        # (departure, size) of the packets that have not left the queue yet, oldest first.
        self._backlog: deque[tuple[float, int]] = deque()
        self._backlog_bytes = 0
        self._last_delivery = float("-inf")

    def queued(self, now: float) -> tuple[int, int]:
        """Return the packets and bytes waiting for the link at `now`."""
        self._forget_departed(now)
        return len(self._backlog), self._backlog_bytes

    def admit(self, now: float, size: int) -> float | Drop:
        """Let a packet of `size` bytes in at `now`: return when it reaches the far end, or why it is dropped."""
        if self._loss.lose():
            return Drop.LOSS
        packets, queued_bytes = self.queued(now)
        limits = self.params
        if (limits.queue_packets is not None and packets + 1 > limits.queue_packets) or (
                limits.queue_bytes is not None and queued_bytes + size > limits.queue_bytes):
            return Drop.QUEUE
        departure = self._shaper.departure(now, size)
        self._backlog.append((departure, size))
        self._backlog_bytes += size
        return self._propagate(departure)

    def _forget_departed(self, now: float) -> None:
        while self._backlog and self._backlog[0][0] <= now:
            self._backlog_bytes -= self._backlog.popleft()[1]

    def _propagate(self, departure: float) -> float:
        delay = self.params.delay
        if self.params.jitter:
            delay = max(delay + self._jitter_rng.uniform(-self.params.jitter, self.params.jitter), 0.0)
        delivery = departure + delay
        if not self.params.reorder:
            # Clamping keeps FIFO order: a packet drawn a short delay waits for the one ahead.
            delivery = max(delivery, self._last_delivery)
            self._last_delivery = delivery
        return delivery
