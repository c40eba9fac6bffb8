"""One study's byte stream -> frames -> reassembled volume, with a record of what happened.

:class:`StudyStream` is what both transports feed: the file reader (``dlad-receive --in``)
hands it the file in pieces, the network service the data channel's messages. It never raises
on bad input: every rejected frame or chunk is logged and counted in :meth:`status`.
"""

from __future__ import annotations

import logging
import time

from receiver.reassembly import ChunkRejected, Reassembler
from shared.wire import DataChunk, FrameEvent, FrameReader, StreamEnd, StreamHeader

log = logging.getLogger("dlad.receiver")


class StudyStream:
    """Parses a stream of frames for one study and applies its chunks."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._reader = FrameReader()
        self.started = clock()
        self.header: StreamHeader | None = None
        self.reassembler: Reassembler | None = None
        self.end: StreamEnd | None = None
        self.bytes_received = 0
        self.duplicates = 0
        self.problems: list[str] = []

    def feed(self, data: bytes) -> list[DataChunk]:
        """Consume bytes; return the data chunks applied by this call.

        A residual that arrives before its base is held (not applied, not returned, not counted
        in :meth:`status`) and returned by the call that brings its base.
        """
        self.bytes_received += len(data)
        return self._handle(self._reader.feed(data))

    def finish(self) -> list[DataChunk]:
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

    def _handle(self, events: list[FrameEvent]) -> list[DataChunk]:
        applied = []
        for event in events:
            if event.error is not None:
                self._problem(f"at byte {event.offset}: {event.error} ({event.size} bytes skipped)")
            elif isinstance(event.chunk, StreamHeader):
                self.accept_header(event.chunk)
            elif isinstance(event.chunk, StreamEnd):
                self.end = event.chunk
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

    def _problem(self, message: str) -> None:
        self.problems.append(message)
        log.warning("%s", message)

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
            "problems": list(self.problems),
            "stream_ended": self.end is not None,
        }
        if self.reassembler is None:
            status["state"] = "waiting for header"
            return status
        r = self.reassembler
        header = r.header
        missing = r.missing()
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
