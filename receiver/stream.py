"""One study's byte stream -> frames -> reassembled volume, with a record of what happened.

:class:`StudyStream` is what both transports feed: the file reader (``dlad-receive --in``)
hands it the file in pieces, the network service the data channel's messages. It never raises
on bad input: every rejected frame or chunk is logged and counted in :meth:`status`.

Whatever the input, its memory stays bounded: a run of garbage is one problem however many
bad frames it holds (see :class:`~shared.wire.FrameReader`), at most :data:`KEPT_PROBLEMS`
problem texts are kept (the first and the latest halves, with the total count), and once the
header is known the reader waits for no frame larger than the header allows
(:func:`~shared.wire.max_data_frame_bytes`).
"""

from __future__ import annotations

import logging
import time
from collections import deque

from receiver.reassembly import ChunkRejected, Reassembler
from shared.wire import (
    DataChunk,
    FrameEvent,
    FrameReader,
    RoiFrame,
    StreamEnd,
    StreamHeader,
    WireError,
    max_frame_bytes,
)

log = logging.getLogger("dlad.receiver")

#: Problem texts kept (half the first ones, half the latest): enough to diagnose a stream,
#: bounded whatever a peer sends.
KEPT_PROBLEMS = 200


class StudyStream:
    """Parses a stream of frames for one study and applies its chunks."""

    def __init__(self, clock=time.monotonic, name: str = ""):
        self._clock = clock
        self._reader = FrameReader()
        self.name = name
        """Shown before each logged problem (``"study X: "``); empty: the study id, once known."""
        self.started = clock()
        self.header: StreamHeader | None = None
        self.reassembler: Reassembler | None = None
        self.end: StreamEnd | None = None
        self.bytes_received = 0
        self.duplicates = 0
        self.problem_count = 0
        """Problems reported so far: runs of bad data (one each, however long) and rejected
        chunks."""
        self.bad_frames = 0
        """Bad frames so far: every bad region inside a run counted, and rejected chunks (what a
        network session's error budget counts)."""
        self.bad_bytes = 0
        """Bytes skipped as not part of any good frame."""
        self._first_problems: list[str] = []
        self._latest_problems: deque[str] = deque(maxlen=KEPT_PROBLEMS // 2)

    @property
    def problems(self) -> list[str]:
        """The kept problem texts: the first ones, a note of how many were left out, the latest."""
        left_out = self.problem_count - len(self._first_problems) - len(self._latest_problems)
        note = [f"... {left_out} more problems not kept ..."] if left_out > 0 else []
        return self._first_problems + note + list(self._latest_problems)

    def feed(self, data: bytes, max_bad_frames: int | None = None
             ) -> list[DataChunk | RoiFrame]:
        """Consume bytes; return the data chunks applied by this call, and the stream's ROI frame
        where this call accepted it (in stream order: it comes before the chunks that need it,
        and is logged with them).

        A residual that arrives before its base is held (not applied, not returned, not counted
        in :meth:`status`) and returned by the call that brings its base. With
        ``max_bad_frames``, stop applying (and drop the rest of ``data``) once this call has
        found more bad frames than that: the caller is about to close a session that sends
        garbage, and decoding it would only cost time.
        """
        self.bytes_received += len(data)
        return self._handle(self._reader.feed(data), max_bad_frames)

    def finish(self) -> list[DataChunk | RoiFrame]:
        """End of input: report an incomplete trailing frame, recover frames behind it."""
        return self._handle(self._reader.finish())

    def accept_header(self, header: StreamHeader) -> None:
        """Use ``header`` (first frame of the stream, or restored from disk on resume)."""
        if self.header is not None:
            if (header.sha256, header.plan, header.layers) != (
                    self.header.sha256, self.header.plan, self.header.layers):
                self._problem("a second header that differs from the first was ignored")
            return
        self.header = header
        self.reassembler = Reassembler(header, clock=self._clock, started=self.started)
        self._reader.max_body_bytes = max_frame_bytes(header)
        self._reader.headers_allowed = False  # another one is a bad frame, never parsed again

    def _accept_roi(self, offset: int, roi: RoiFrame) -> list[RoiFrame]:
        """The stream's ROI frame: ``[roi]`` when it completes the header (the caller logs it
        before the chunks that follow), ``[]`` when it is the known one again or is refused."""
        r = self.reassembler
        if r is None:
            self._problem(f"at byte {offset}: ROI frame before any header, skipped")
            return []
        if r.header.roi_frame is roi:
            self.duplicates += 1  # a resumed sender sends it again in every pass
            return []
        if not self.header.roi_pending:
            self._problem(f"at byte {offset}: an ROI frame in a stream whose header carries "
                          "the ROI, ignored")
            return []
        try:
            r.attach_roi(roi)
        except WireError as error:
            self._problem(f"at byte {offset}: {error}")
            return []
        self._reader.known_roi = roi
        self._reader.max_body_bytes = max_frame_bytes(r.header)
        return [roi]

    def _handle(self, events: list[FrameEvent], max_bad_frames: int | None = None
                ) -> list[DataChunk | RoiFrame]:
        applied = []
        budget_end = None if max_bad_frames is None else self.bad_frames + max_bad_frames
        for event in events:
            if budget_end is not None and self.bad_frames > budget_end:
                break
            if event.error is not None:
                self.bad_bytes += event.size
                self._problem(f"at byte {event.offset}: {event.error} ({event.size} bytes "
                              "skipped)", count=max(event.bad_frames, 1))
            elif isinstance(event.chunk, StreamHeader):
                self.accept_header(event.chunk)
            elif isinstance(event.chunk, StreamEnd):
                self.end = event.chunk
            elif isinstance(event.chunk, RoiFrame):
                applied += self._accept_roi(event.offset, event.chunk)
            elif self.reassembler is None:
                self._problem(f"at byte {event.offset}: data chunk before any header, skipped")
            else:
                try:
                    duplicate = self.reassembler.holds(event.chunk.seq)
                    applied += self.reassembler.apply(event.chunk)
                    self.duplicates += duplicate
                except ChunkRejected as error:
                    self._problem(f"at byte {event.offset}: {error}")
                for late in self.reassembler.late_rejections:
                    self._problem(late)
                self.reassembler.late_rejections.clear()
        return applied

    def _problem(self, message: str, count: int = 1) -> None:
        """Record one problem (``count``: the bad frames it stands for)."""
        self.problem_count += 1
        self.bad_frames += count
        if len(self._first_problems) < KEPT_PROBLEMS // 2:
            self._first_problems.append(message)
        else:
            self._latest_problems.append(message)
        name = self.name or (self.header.study_id if self.header is not None else "")
        log.warning("study %s: %s", name or "?", message)

    def status(self) -> dict:
        """JSON-able progress report: chunks, layers per slice, milestones, problems.

        What is proven and what is only applied are kept apart: ``roi_exact_slices`` and
        ``roi_verified_slices`` count slices whose ROI voxels matched the sender's digest (bit 8
        of ``slice_layers``; slices without ROI voxels count in the first once they have their
        base), ``roi_mismatches`` the failed checks (each dropped its block); ``exact_layer_slices``
        counts slices with every layer applied, ``exact_slices`` the slices proven exact (all of
        them once ``verified_sha256`` is true, the whole volume's SHA-256 check).
        """
        status = {
            "bytes_received": self.bytes_received,
            "elapsed_s": round(self._clock() - self.started, 3),
            "duplicates": self.duplicates,
            "problems": self.problems,
            "problem_count": self.problem_count,
            "bad_frames": self.bad_frames,
            "stream_ended": self.end is not None,
        }
        if self.reassembler is None:
            status["state"] = "waiting for header"
            return status
        r = self.reassembler
        header = r.header
        missing = r.missing()
        status["roi_known"] = r.roi_known
        progress = r.progress()
        status.update({
            "study_id": header.study_id,
            "shape": list(header.shape),
            "chunks_planned": progress.chunks_planned,
            "chunks_applied": progress.chunks_applied,
            "missing_chunks": [list(entry) for entry in missing],
            "missing_layers": sorted({entry[1] for entry in missing}),
            "slice_layers": r.slice_layers().tolist(),
            "slices_with_base": progress.slices_with_base,
            "roi_exact_slices": progress.roi_exact_slices,
            "roi_verified_slices": int(r.roi_verified.sum()),
            "roi_digest_blocks": len(header.roi_digests),
            "roi_mismatches": progress.roi_mismatches,
            "exact_layer_slices": progress.exact_layer_slices,
            "exact_slices": progress.exact_slices,
            "source_inserted_slices": inserted_slices(header),
            "roi_complete": r.roi_complete,
            "base_complete": r.base_complete,
            "exact_expected": r.exact_expected,
            "exact_complete": r.exact_complete,
            "verified_sha256": r.verified,
            "milestones_s": vars(r.milestones).copy(),
            "state": "complete" if r.complete else "partial",
        })
        return status


def inserted_slices(header: StreamHeader) -> list[int]:
    """Slices the sender filled in for missing source images (``dlad-send --allow-gaps``), as
    its header's provenance says (slice indices; anything malformed is ignored)."""
    value = header.provenance.get("inserted_slices")
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool)
            and 0 <= v < header.shape[0]]
