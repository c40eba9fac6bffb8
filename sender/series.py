"""Instances grouped into series: when is a series complete (``--series-count``, ``--series-timeout``).

The DICOM node (:mod:`sender.dicom_node`) and the watch folder (:mod:`sender.watch`) hand every
instance they accept, as an :class:`Arrival`, to a :class:`SeriesCollector`, which groups them
by StudyInstanceUID / SeriesInstanceUID and declares a series complete (a
:class:`CompleteSeries`) when ``count`` instances are in or when no new instance came for
``timeout`` seconds; the live session (:mod:`sender.live`) sends it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sender.spool import SpooledSeries

log = logging.getLogger("dlad.sender")

#: Seconds between two looks at the open series (a timeout is noticed this late at most).
COLLECTOR_TICK_S = 0.05
#: Instances kept decoded in memory while their series is open (about 0.5 MB each for
#: 512 x 512); beyond, they are read again from the spool when their series completes.
MAX_INSTANCES_IN_MEMORY = 3000


@dataclass
class Arrival:
    """One accepted instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    path: Path
    """Where the spool keeps it."""
    dataset: object | None = None
    """The pydicom Dataset with its pixel data decoded (None: read it from ``path``)."""
    source: str = ""
    """Where it came from (calling AE title and address, or watched file)."""
    decode_s: float = 0.0
    """CPU seconds spent decoding it."""


@dataclass
class CompleteSeries:
    """A series the collector declared complete."""

    study_uid: str
    series_uid: str
    arrivals: list[Arrival]
    reason: str
    """``"count"``, ``"timeout"`` or ``"spool"`` (left by an earlier run)."""
    completed_at: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` when it was declared complete."""
    last_arrival_at: float = 0.0
    """``time.monotonic()`` of its last instance (the last C-STORE response, near enough)."""


class SeriesCollector:
    """Groups instances into series and says when each is complete (thread-safe ``add``).

    Args:
        timeout: a series is complete when no instance of it came for this many seconds.
        count: ... or as soon as it holds this many instances (None: timeout only).
        on_complete: called with each :class:`CompleteSeries`, from the collector's task.
        max_series: open series at most; an instance of one more is refused (the SCP answers
            "out of resources").
    """

    def __init__(self, timeout: float = 5.0, count: int | None = None,
                 on_complete: Callable[[CompleteSeries], None] | None = None,
                 max_series: int = 64, max_instances: int = 5000):
        if not timeout > 0:
            raise ValueError(f"--series-timeout must be > 0 s, got {timeout}")
        if count is not None and count < 1:
            raise ValueError(f"--series-count must be >= 1, got {count}")
        self.timeout = timeout
        self.count = count
        self.on_complete = on_complete
        self.max_series = max_series
        self.max_instances = max_instances
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], dict[str, Arrival]] = {}
        self._last: dict[tuple[str, str], float] = {}
        self._in_memory = 0
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.observers: list[Callable[[Arrival], None]] = []
        """Told of every instance taken (the pipeline starts on its slice at once)."""

    def room_for(self, study_uid: str, series_uid: str) -> str | None:
        """Why an instance of this series cannot be taken now (None: it can)."""
        with self._lock:
            key = (study_uid, series_uid)
            if key not in self._open and len(self._open) >= self.max_series:
                return f"{len(self._open)} series are open, the limit is {self.max_series}"
            if len(self._open.get(key, ())) >= self.max_instances:
                return f"the series holds {self.max_instances} instances, the limit"
        return None

    def add(self, arrival: Arrival) -> None:
        """Take one instance (from any thread)."""
        key = (arrival.study_uid, arrival.series_uid)
        with self._lock:
            series = self._open.setdefault(key, {})
            if arrival.dataset is not None:
                if self._in_memory >= MAX_INSTANCES_IN_MEMORY:
                    arrival.dataset = None
                else:
                    self._in_memory += 1
            previous = series.get(arrival.sop_uid)
            if previous is not None and previous.dataset is not None:
                self._in_memory -= 1
            series[arrival.sop_uid] = arrival
            self._last[key] = time.monotonic()
            full = self.count is not None and len(series) >= self.count
        for observer in self.observers:
            observer(arrival)
        if full:
            self._wake()

    def add_pending(self, spooled: SpooledSeries) -> None:
        """A series an earlier run left in the spool undelivered: complete at once."""
        arrivals = [Arrival(spooled.study_uid, spooled.series_uid, uid, path,
                            source="spool") for uid, path in spooled.instances.items()]
        self._emit(CompleteSeries(spooled.study_uid, spooled.series_uid, arrivals, "spool"))

    def _wake(self) -> None:
        if self._loop is not None and self._wakeup is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def released(self, arrival: Arrival) -> None:
        """The session is done with an instance's decoded pixels (memory accounting)."""
        if arrival.dataset is not None:
            arrival.dataset = None
            with self._lock:
                self._in_memory -= 1

    def complete_now(self) -> list[CompleteSeries]:
        """Take out every series that is complete now (by count or timeout)."""
        now = time.monotonic()
        done = []
        with self._lock:
            for key in list(self._open):
                series = self._open[key]
                by_count = self.count is not None and len(series) >= self.count
                if by_count or now - self._last[key] >= self.timeout:
                    del self._open[key]
                    last = self._last.pop(key)
                    done.append(CompleteSeries(*key, list(series.values()),
                                               "count" if by_count else "timeout",
                                               completed_at=now, last_arrival_at=last))
        return done

    def open_series(self) -> int:
        with self._lock:
            return len(self._open)

    def _emit(self, series: CompleteSeries) -> None:
        log.info("series %s complete (%s): %d instance(s)", series.series_uid,
                 {"count": "instance count reached", "timeout": f"no new instance for "
                  f"{self.timeout:g} s", "spool": "left undelivered by an earlier run"}[
                     series.reason], len(series.arrivals))
        if self.on_complete is not None:
            self.on_complete(series)

    async def run(self) -> None:
        """Declare series complete as they become so (until cancelled)."""
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), COLLECTOR_TICK_S)
            except asyncio.TimeoutError:
                pass
            self._wakeup.clear()
            for series in self.complete_now():
                self._emit(series)
