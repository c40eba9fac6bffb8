"""One link direction on the asyncio event loop: a :class:`LinkModel` plus the timer that delivers."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from .model import Drop, LinkModel
from .params import LinkParams

#: The event loop sleeps in whole milliseconds, rounded up, so a timer fires up to 1 ms late.
#: Waking this much before a packet is due, and sending what is due up to this much after the
#: wakeup, centres deliveries on their due time (within about +/- 0.5 ms) and batches the
#: packets of fast links into one wakeup.
_TIMER_SLACK = 0.0005


@dataclass
class DirectionStats:
    """Counters of one link direction (or several added up with ``+``)."""

    packets_in: int = 0
    "Datagrams that entered the link."
    bytes_in: int = 0
    "Bytes of the datagrams that entered the link."
    packets_forwarded: int = 0
    "Datagrams delivered at the far end."
    bytes_forwarded: int = 0
    "Bytes of the datagrams delivered at the far end."
    packets_lost: int = 0
    "Datagrams dropped by the loss model."
    packets_queue_dropped: int = 0
    "Datagrams dropped because the queue was full."
    delay_total: float = 0.0
    "Sum over delivered datagrams of the seconds from entry to delivery."
    first_forward_at: float | None = None
    "Event-loop time of the first delivery."
    last_forward_at: float | None = None
    "Event-loop time of the last delivery."

    @property
    def packets_in_flight(self) -> int:
        """Datagrams in the queue or on the wire."""
        return self.packets_in - self.packets_forwarded - self.packets_lost - self.packets_queue_dropped

    @property
    def mean_delay(self) -> float | None:
        """Mean seconds from entry to delivery, queueing included."""
        return self.delay_total / self.packets_forwarded if self.packets_forwarded else None

    @property
    def rate(self) -> float | None:
        """Delivered bits per second between the first and the last delivery."""
        if self.first_forward_at is None or self.last_forward_at == self.first_forward_at:
            return None
        return self.bytes_forwarded * 8 / (self.last_forward_at - self.first_forward_at)

    def __add__(self, other: DirectionStats) -> DirectionStats:
        total = DirectionStats(**{
            f.name: getattr(self, f.name) + getattr(other, f.name)
            for f in fields(self) if not f.name.endswith("_at")
        })
        firsts = [t for t in (self.first_forward_at, other.first_forward_at) if t is not None]
        lasts = [t for t in (self.last_forward_at, other.last_forward_at) if t is not None]
        total.first_forward_at = min(firsts, default=None)
        total.last_forward_at = max(lasts, default=None)
        return total


class EmulatedLink:
    """One link direction: packets handed to :meth:`send` come out of their `deliver` callback later, or never.

    Must be created with an event loop running; the link's clock (and its delivery trace)
    starts then.
    """

    def __init__(self, params: LinkParams, *, seed: int | str | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.params = params
        self._model = LinkModel(params, origin=self._loop.time(), seed=seed)
        self._stats = DirectionStats()
        # Heap of (delivery time, sequence, entry time, datagram, deliver callback); the
        # sequence keeps equal delivery times in arrival order.
        self._pending: list[tuple[float, int, float, bytes, Callable[[bytes], object]]] = []
        self._sequence = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    @property
    def stats(self) -> DirectionStats:
        """A copy of the counters so far."""
        return replace(self._stats)

    def send(self, data: bytes, deliver: Callable[[bytes], object]) -> None:
        """Put a datagram on the link; `deliver(data)` runs when it reaches the far end."""
        now = self._loop.time()
        self._stats.packets_in += 1
        self._stats.bytes_in += len(data)
        verdict = self._model.admit(now, len(data))
        if verdict is Drop.LOSS:
            self._stats.packets_lost += 1
        elif verdict is Drop.QUEUE:
            self._stats.packets_queue_dropped += 1
        else:
            heapq.heappush(self._pending, (verdict, next(self._sequence), now, data, deliver))
            if verdict < self._timer_at:
                self._arm(verdict)

    def close(self) -> None:
        """Stop delivering; datagrams still on the link are discarded."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = float("inf")
        self._pending.clear()

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when - _TIMER_SLACK, self._deliver_due)
        self._timer_at = when

    def _deliver_due(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        now = self._loop.time()
        stats = self._stats
        while self._pending and self._pending[0][0] <= now + _TIMER_SLACK:
            _, _, entered, data, deliver = heapq.heappop(self._pending)
            stats.packets_forwarded += 1
            stats.bytes_forwarded += len(data)
            stats.delay_total += now - entered
            if stats.first_forward_at is None:
                stats.first_forward_at = now
            stats.last_forward_at = now
            deliver(data)
        if self._pending:
            self._arm(self._pending[0][0])
