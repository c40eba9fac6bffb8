"""One study in the receiver's memory: its record on disk and the task that applies its input.

Each :class:`StudyRuntime` owns a queue of work (data of its session, calls) and one task that
runs the queue in order, each item on the service's worker thread: chunks are decoded and
logged there while the event loop keeps serving the network. The worker is shared by all
studies; every study submits one batch at a time to it, so studies that arrive together take
turns batch by batch and none can starve another.

A batch of data goes through :meth:`StudyRuntime._process` (worker thread): the stream applies
the chunks to the volume, the record appends them to the chunk log and fsyncs it, then a
snapshot is written when one is due. Only then does the event loop tell the sender (an ack
with the counts, ``done`` after an end frame). If the chunks cannot be stored (disk full,
quota, I/O error), the batch is not acknowledged, the session is closed with the reason and
the study is dropped from memory: its in-memory volume holds chunks the disk lacks, and the
next session reloads it from the log, so a sender is never told of a chunk that is not stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from receiver.events import StudyUpdate
from receiver.limits import StudyCost
from receiver.store import StoreError, StoreWriteError, StudyRecord
from shared.webrtc.protocol import MILESTONE_TEXT
from shared.wire import DataChunk

log = logging.getLogger("dlad.receiver")

#: Data of one session handed to the decoder at once, at most (plus the message that crosses
#: it): large enough that per-batch costs (an fsync, an ack) stay small, small enough that
#: studies arriving together take turns often.
BATCH_BYTES = 256 * 1024

#: Milestones that always trigger a snapshot (``roi_known``: status.json says the ROI is there).
MILESTONES = ("roi_known", "roi_complete", "base_complete", "exact_complete", "complete")


@dataclass
class Progress:
    """What one batch did, reported from the worker thread to the event loop."""

    consumed: int
    applied: int
    planned: int
    reached: list
    ended: bool
    new_chunks: int = 0
    """Chunks this batch applied (a residual waiting for its base included)."""
    bad_frames: int = 0
    """Bad frames and rejected chunks found in this batch."""
    junk_bytes: int = 0
    """Bytes of this batch that were no part of a good frame."""
    changed: list = field(default_factory=list)
    """Slice ranges ``(z0, z1)`` of the chunks the batch applied."""
    snapshot: bool = False
    """A new NIfTI snapshot was written."""
    failed: str | None = None
    """Why the batch's chunks could not be stored (then nothing of it counts)."""


class StudyRuntime:
    """One study in memory: its record, its memory reservation and the task applying its input."""

    def __init__(self, service, record: StudyRecord, cost: StudyCost):
        self.service = service
        self.record = record
        self.cost = cost
        """The memory reserved for it (released by :meth:`unload`) and its stream bounds."""
        self.session = None
        self.items: deque = deque()
        self.wakeup = asyncio.Event()
        self.detached_at = time.monotonic()
        self.busy = False
        self.broken: str | None = None
        """Set when its data could not be stored: the study must be reloaded from disk."""
        self.last_progress_log = 0.0
        self.bytes_since_log = 0
        self._seen_end = record.stream.end
        self._stopping = False
        self.worker = asyncio.create_task(self._work(), name=f"study {record.name}")

    @property
    def name(self) -> str:
        return self.record.header.study_id

    @property
    def complete(self) -> bool:
        return self.record.reassembler.complete

    # --- queueing (event loop) ---------------------------------------------------------------

    def call(self, function) -> asyncio.Future:
        """Run ``function()`` in the worker thread after everything queued before it."""
        future = asyncio.get_running_loop().create_future()
        if self.broken is not None:
            future.set_exception(StoreError(f"study {self.name} is being reloaded"))
            return future
        self.items.append(("call", function, future))
        self.wakeup.set()
        return future

    def feed(self, session, data: bytes) -> None:
        self.items.append(("data", session, data))
        self.wakeup.set()

    @property
    def idle(self) -> bool:
        return not self.items and not self.busy

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        executor = self.service.executor
        while not self._stopping:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.items and not self._stopping:
                kind, owner, payload = self.items.popleft()
                self.busy = True
                try:
                    if kind == "call":
                        try:
                            result = await loop.run_in_executor(executor, owner)
                        except Exception as error:  # reported to whoever awaits it
                            if not payload.done():
                                payload.set_exception(error)
                        else:
                            if not payload.done():
                                payload.set_result(result)
                        continue
                    if owner.discard_input:
                        continue  # a session closed for abuse: its queued data is dropped
                    # Coalesce consecutive data of the same session into one batch.
                    parts = [payload]
                    size = len(payload)
                    while (self.items and self.items[0][0] == "data" and self.items[0][1] is owner
                           and size < BATCH_BYTES):
                        size += len(self.items[0][2])
                        parts.append(self.items.popleft()[2])
                    data = b"".join(parts)
                    budget = owner.problem_budget()
                    try:
                        progress = await loop.run_in_executor(executor, self._process, data,
                                                              budget)
                    except Exception:  # a bug, not bad input (StudyStream never raises on it)
                        log.exception("study %s: failed to process %d bytes", self.name, size)
                        owner.close("receiver error while applying data", notify=True,
                                    retry=True)
                        continue
                    self._report(owner, progress)
                finally:
                    self.busy = False

    # --- worker thread -----------------------------------------------------------------------

    def _process(self, data: bytes, max_bad_frames: int | None) -> Progress:
        record = self.record
        stream = record.stream
        bad, junk = stream.bad_frames, stream.bad_bytes
        applied = stream.feed(data, max_bad_frames=max_bad_frames)  # chunks, and a ROI frame
        chunks = [chunk for chunk in applied if isinstance(chunk, DataChunk)]
        record.counters["network_bytes"] += len(data)
        r = record.reassembler
        found = dict(bad_frames=stream.bad_frames - bad, junk_bytes=stream.bad_bytes - junk)
        try:
            record.append(applied)
        except StoreWriteError as error:
            return Progress(consumed=len(data), applied=len(r.applied), planned=len(r.plan),
                            reached=[], ended=False, failed=str(error), **found)
        reached = record.check_milestones()
        ended = stream.end is not self._seen_end
        self._seen_end = stream.end
        if applied:
            record.dirty = True
        interval = self.service.config.snapshot_interval
        if (any(name in MILESTONES for name in reached) or ended
                or (record.dirty and time.monotonic() - record.last_snapshot >= interval)):
            record.write_snapshot(with_volume=self.service.config.snapshot_volume
                                  or ended or "complete" in reached)
        else:
            record.snapshot_written = False
        return Progress(consumed=len(data), applied=len(r.applied), planned=len(r.plan),
                        reached=reached, ended=ended, new_chunks=len(applied),
                        changed=[(chunk.z0, chunk.z1) for chunk in chunks],
                        snapshot=record.snapshot_written, **found)

    def _finish_pass(self) -> dict | None:
        """After a session: drop a partial frame, write the snapshot if anything changed."""
        record = self.record
        try:
            record.stream.finish()
            record.connected = False
            return record.write_snapshot(with_volume=record.dirty)
        except Exception:  # keep serving the other studies
            log.exception("study %s: cannot write its snapshot", self.name)
            return None

    def _inventory(self) -> dict:
        record = self.record
        record.connected = True
        record.counters["sessions"] += 1
        r = record.reassembler
        return {"have": sorted(r.applied), "complete": r.complete}

    # --- reporting (event loop) --------------------------------------------------------------

    def _report(self, session, progress: Progress) -> None:
        if progress.failed is not None:
            self._store_failed(session, progress.failed)
            return
        r = self.record.reassembler
        self.service.notify(self, StudyUpdate(changed=progress.changed, reached=progress.reached,
                                              ended=progress.ended, snapshot=progress.snapshot))
        for name in progress.reached:
            log.info("study %s: %s (%d/%d chunks)", self.name, MILESTONE_TEXT.get(name, name),
                     progress.applied, progress.planned)
        self.bytes_since_log += progress.consumed
        now = time.monotonic()
        if now - self.last_progress_log >= self.service.config.progress_interval:
            rate = 8 * self.bytes_since_log / max(now - self.last_progress_log, 1e-3) / 1e6
            if self.last_progress_log:
                log.info("study %s: %d/%d chunks, %.1f MB received, %.1f Mbit/s", self.name,
                         progress.applied, progress.planned,
                         self.record.counters["network_bytes"] / 1e6, rate)
            self.last_progress_log, self.bytes_since_log = now, 0
        # Credit goes to the session that sent the bytes, even if it has moved on to its next
        # study meanwhile (several studies per connection): its window must not shrink by the
        # bytes of the previous one.
        session.consumed += progress.consumed
        if session is not self.session:
            return  # a session taken over or moved on: its data was applied, nobody to tell
        if progress.new_chunks or progress.ended:
            session.last_progress = now
        if session.count_problems(progress.bad_frames, progress.junk_bytes):
            return  # over its error budget: closed
        session.send_control("ack", consumed=session.consumed, applied=progress.applied,
                             planned=progress.planned, roi_complete=r.roi_complete,
                             base_complete=r.base_complete, exact_complete=r.exact_complete,
                             verified=r.verified, reached=progress.reached)
        if progress.ended:
            self._end_of_pass(session, progress)

    def _end_of_pass(self, session, progress: Progress) -> None:
        r = self.record.reassembler
        seconds = time.monotonic() - session.data_started
        self.record.last_pass = {"bytes": session.consumed, "seconds": round(seconds, 3),
                                 "mbit_s": round(8 * session.consumed / max(seconds, 1e-6)
                                                 / 1e6, 2)}
        self.call(lambda: self.record.write_snapshot(with_volume=False))
        missing = [seq for seq, *_ in r.missing()]
        end = self.record.stream.end
        log.info("study %s: end of pass (%d chunks sent in it): %d/%d applied, %s", self.name,
                 end.chunks if end else -1, progress.applied, progress.planned,
                 "complete" if r.complete else f"{len(missing)} missing")
        if r.verified is not None:
            (log.info if r.verified else log.error)(
                "study %s: SHA-256 of the exact volume %s", self.name,
                "verified" if r.verified else "DOES NOT MATCH the sender's")
        session.send_control("done", complete=r.complete, verified=r.verified,
                             missing=missing[:100000], applied=progress.applied,
                             planned=progress.planned, roi_complete=r.roi_complete,
                             exact_complete=r.exact_complete,
                             duplicates=self.record.stream.duplicates,
                             problems=self.record.stream.problem_count,
                             roi_mismatches=r.roi_mismatches, roi_known=r.roi_known,
                             folder=self.record.name)

    def _store_failed(self, session, reason: str) -> None:
        """The batch's chunks are not on disk: close the session, reload the study later."""
        if self.broken is None:
            self.broken = reason
            log.error("study %s: %s; the study is dropped from memory and will be reloaded "
                      "from its chunk log", self.name, reason)
        if session is not None and session.state != "closed":
            session.fail(f"the receiver could not store the data: {reason}", retry=True,
                         discard=True)
        if self.session is not None and self.session is not session:
            self.session.fail("the receiver could not store the data", retry=True, discard=True)
        self.service.drop_study(self)

    # --- sessions ----------------------------------------------------------------------------

    def attach(self, session) -> None:
        previous = self.session
        if previous is not None and previous is not session:
            log.warning("study %s: a new connection takes over from session %s", self.name,
                        previous.id)
            previous.close("replaced by a newer connection for the same study", notify=True,
                           retry=True)
        self.session = session

    def detach(self, session) -> None:
        if self.session is session:
            self.session = None
            self.detached_at = time.monotonic()
            if self.broken is not None:
                return
            self.call(self._finish_pass).add_done_callback(self._pass_finished)

    def _pass_finished(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self.service.notify(self, StudyUpdate(ended=True))

    async def unload(self) -> None:
        """Stop the worker after the item in progress, then close the record.

        Queued items are dropped (calls fail with StoreError). The batch being applied in the
        worker thread, if any, ends first: the chunk log is never closed under a write. The
        caller releases the study's memory reservation.
        """
        self._stopping = True
        while self.items:
            kind, _, future = self.items.popleft()
            if kind == "call" and not future.done():
                future.set_exception(StoreError(f"study {self.name} left memory"))
                future.exception()  # retrieved: nobody may be waiting for it any more
        self.wakeup.set()
        if self.worker is not asyncio.current_task():
            await self.worker
        self.record.close()
