"""A warm, persistent sender for live sessions: series in from the scanner, streams out.

During a CT-guided ablation the scanner pushes a planning scan and then a control scan every few
minutes. ``dlad-send --dicom-listen`` (:mod:`sender.dicom_node`) and ``dlad-send --watch``
(:mod:`sender.watch`) hand every instance they accept to a
:class:`~sender.series.SeriesCollector`, which groups instances by StudyInstanceUID /
SeriesInstanceUID and declares a series complete when
``count`` instances are in (``--series-count``) or when no new instance came for ``timeout``
seconds (``--series-timeout``, default 5 s). :class:`LiveSession` then sends each complete
series, one after the other, through one :class:`~sender.transport.Link` kept warm between them:
torch, the U-Net and the WebRTC connection stay up, so a series costs its own work only.

Per series: the instances (decoded already, as they arrived) become a volume
(:func:`sender.dicom.series_from_datasets`: the same checks as a folder on disk), its ``dicom``
attributes (:mod:`sender.dicom_attributes`, de-identified with ``--deidentify``), then the
stream starts at once: with the live default (layered ``--exact``, no diffusion) the header
announces the ROI as pending and the previews (layer 0, which do not depend on the ROI) go on
the wire while the ROI of the whole series (U-Net backlog, plausibility check, ROI steps) is
computed in the pipeline's ROI thread; then the ROI frame, then the ROI layer and the rest,
chunk after chunk encoded while the previous ones are on the wire. Where the bases depend on
the ROI (diffusion on, no exact layer) the ROI is computed first and travels in the header.

Nothing is lost: instances are in the spool before they are acknowledged (:mod:`sender.spool`);
a series leaves the pending list only when the receiver confirmed it complete; one that could
not be delivered is tried again, and a sender restarted finds it in the spool. A series pushed
again unchanged is recognised (same instances, same voxels: :meth:`Spool.delivered_as`) and not
sent twice; one that gained instances is sent as a new version (the receiver keeps it beside
the first, ``<series>.2``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sender.series import CompleteSeries, SeriesCollector
from sender.spool import Spool

log = logging.getLogger("dlad.sender")

#: Longest wait between two tries of a series that could not be delivered.
MAX_RETRY_WAIT_S = 30.0

#: Python's GIL switch interval in a live sender (:func:`sys.setswitchinterval`; Python's
#: default is 5 ms). The U-Net workers compute each arriving slice in threads of this process
#: while the event loop, the WebRTC stack and the DICOM node run Python; every torch call a
#: worker makes returns to Python and waits for the GIL, up to the switch interval each time
#: while another thread holds it. Measured on the 2-core machine beside one busy Python thread
#: (``python scripts/bench_unet.py --gil``, docs/BENCHMARKS.md run I): one abdomen slice through
#: the two networks (traced, :func:`models.inference.gil_free`) with its pre- and
#: post-processing took 0.45 s at 5 ms and 0.14 s at 0.5 ms (0.11 s with no busy thread), and
#: the busy thread kept its pace (17.7 and 18.1 million loops per second).
LIVE_GIL_SWITCH_INTERVAL_S = 0.0005


@dataclass
class SeriesReport:
    """What happened to one series (a line of ``--session-log``)."""

    study_uid: str
    series_uid: str
    instances: int
    outcome: str
    """``delivered``, ``already delivered``, ``refused``, ``failed`` or ``invalid``."""
    detail: str = ""
    slices: int = 0
    study_id: str = ""
    folder: str | None = None
    seconds: dict = field(default_factory=dict)
    """Stage -> seconds: ``decode_cpu`` (on arrival), ``assemble``, ``roi`` (of which
    ``unet_rest``: the U-Net's slices not done when the series completed, and
    ``plausibility``: the anatomical check), ``roi_ready``, ``first_chunk``, ``roi_known``
    (the ROI frame at the receiver, where the stream started with the ROI pending),
    ``roi_complete``, ``complete`` (those but the first three since the series was
    complete); and two counts: ``unet_slices_ready`` and ``anatomy_slices_ready``, the slices
    whose map and whose anatomy for the check the workers computed as the series arrived."""
    bytes_sent: int = 0
    verified: bool | None = None


class LiveSession:
    """Sends complete series one after the other over one warm link (see the module docstring).

    Args:
        link: the :class:`~sender.transport.Link` to the receiver (kept warm).
        spool: where the instances are, and where deliveries are recorded.
        prepare: ``prepare(series) -> (StudyEncoder, DicomSeries)`` for a :class:`CompleteSeries`
            (decoding, ROI, lazy diffusion; runs in a worker thread).
        session_log: append one JSON line per series here (None: no file).
        on_report: called with each :class:`SeriesReport` (tests, benchmarks).
    """

    def __init__(self, link, spool: Spool, prepare, session_log: Path | None = None,
                 on_report: Callable[[SeriesReport], None] | None = None,
                 collector: SeriesCollector | None = None):
        self.link = link
        self.spool = spool
        self.prepare = prepare
        self.session_log = session_log
        self.on_report = on_report
        self.collector = collector
        self.queue: asyncio.Queue[CompleteSeries] = asyncio.Queue()
        self.reports: list[SeriesReport] = []
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlad-prepare")
        self._loop: asyncio.AbstractEventLoop | None = None
        self.busy = False

    def submit(self, series: CompleteSeries) -> None:
        """Queue a complete series (from the collector's task, or any thread)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is not None and running is not self._loop:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, series)
        else:
            self.queue.put_nowait(series)

    @property
    def idle(self) -> bool:
        return self.queue.empty() and not self.busy

    async def run(self) -> None:
        """Send series as they come (until cancelled)."""
        from sender.transport import Refused, TransportError

        self._loop = asyncio.get_running_loop()
        while True:
            series = await self.queue.get()
            self.busy = True
            try:
                wait = 1.0
                while True:
                    try:
                        report = await self.send(series)
                        break
                    except Refused as error:
                        report = self._report(series, "refused", str(error))
                        log.error("series %s refused by the receiver: %s (it stays in the "
                                  "spool)", series.series_uid, error)
                        break
                    except TransportError as error:
                        log.warning("series %s not delivered (%s); trying again in %.0f s",
                                    series.series_uid, error, wait)
                        await asyncio.sleep(wait)
                        wait = min(2 * wait, MAX_RETRY_WAIT_S)
                self._record(report)
            finally:
                if self.collector is not None:
                    for arrival in series.arrivals:
                        self.collector.released(arrival)
                self.busy = False

    async def send(self, series: CompleteSeries) -> SeriesReport:
        from sender.dicom import DicomSeriesError
        from sender.transport import EncoderSource
        from shared.volume import VolumeError

        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            encoder, dicom_series, timings = await loop.run_in_executor(
                self.worker, self.prepare, series)
        except (DicomSeriesError, VolumeError, ValueError) as error:
            log.error("series %s cannot be sent: %s", series.series_uid, error)
            return self._report(series, "invalid", str(error))
        if encoder is None:
            report = self._report(series, "already delivered", timings.pop("reason", ""))
            report.seconds.update(timings)
            return report
        from sender.encoder import RoiFailed

        source = EncoderSource(encoder)
        try:
            result = await self.link.deliver(source, started=series.completed_at)
        except RoiFailed as error:  # the stream had started with its ROI pending
            log.error("series %s cannot be sent: %s", series.series_uid, error)
            report = self._report(series, "invalid", str(error))
            report.seconds.update(timings)
            return report
        report = self._report(series, "delivered" if result.complete else "failed")
        report.slices = encoder.study.volume.shape[0]
        report.study_id = encoder.study.study_id
        report.folder = result.folder
        report.bytes_sent = result.bytes_sent
        report.verified = result.verified
        report.seconds.update(timings)
        report.seconds["prepare"] = round(time.monotonic() - started, 3)
        for name in ("first_chunk", "roi_known", "roi_complete", "complete"):
            if name in result.milestones:
                report.seconds[name] = result.milestones[name]
        if result.complete and result.verified is not False:
            self.spool.mark_delivered(series.study_uid, series.series_uid,
                                      [a.sop_uid for a in series.arrivals],
                                      encoder.study.sha256, result.folder)
            roi = result.milestones.get("roi_complete")
            log.info("series %s (%d slices) delivered to %s: ROI complete %s, all %.2f s after "
                     "the series was complete; %d bytes%s", series.series_uid, report.slices,
                     result.folder, f"{roi:.2f} s" if roi is not None else "earlier",
                     result.milestones.get("complete", float("nan")), result.bytes_sent,
                     ", SHA-256 verified" if result.verified else "")
        else:
            log.error("series %s: the receiver did not confirm it complete%s", series.series_uid,
                      " (SHA-256 MISMATCH)" if result.verified is False else "")
        return report

    def _report(self, series: CompleteSeries, outcome: str, detail: str = "") -> SeriesReport:
        return SeriesReport(series.study_uid, series.series_uid, len(series.arrivals), outcome,
                            detail, seconds={"decode_cpu": round(sum(
                                a.decode_s for a in series.arrivals), 3)})

    def _record(self, report: SeriesReport) -> None:
        self.reports.append(report)
        if self.on_report is not None:
            self.on_report(report)
        if self.session_log is not None:
            line = json.dumps({"time": time.time(), **vars(report)}, default=str)
            with open(self.session_log, "a") as out:
                out.write(line + "\n")

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)


class LiveSender:
    """A whole live sender: the DICOM node and/or the watched folder, the collector, the session
    and its warm link; what ``dlad-send --dicom-listen/--watch`` runs (and the tests, in
    process).

    Args:
        pipeline: the warm :class:`~sender.pipeline.SeriesPipeline`.
        spool: the :class:`~sender.spool.Spool`.
        url, token, options: the receiver, as for :class:`~sender.transport.Link`.
        listen: ``(host, port)`` of the DICOM node, or None.
        ae_title: the node's AE title.
        watch: the folder to watch, or None.
        settle: seconds a watched file must stay unchanged when inotify cannot tell.
        series_timeout, series_count: when a series is complete (:class:`SeriesCollector`).
        session_log: JSON lines, one per series.
        allow_hosts, allow_calling_ae: who may push to the node
            (:class:`~sender.dicom_node.DicomNode`).
        dicom_tls: the node's TLS context (DICOM over TLS), or None.
    """

    def __init__(self, pipeline, spool: Spool, url: str, token: str, options=None, *,
                 listen: tuple[str, int] | None = None, ae_title: str = "DLAD",
                 watch: Path | None = None, settle: float = 2.0, series_timeout: float = 5.0,
                 series_count: int | None = None, session_log: Path | None = None,
                 on_report: Callable[[SeriesReport], None] | None = None,
                 max_associations: int = 8, allow_hosts: tuple | None = None,
                 allow_calling_ae: list[str] | None = None, dicom_tls=None):
        from sender.transport import Link, StreamOptions

        if listen is None and watch is None:
            raise ValueError("a live sender needs --dicom-listen or --watch (or both)")
        self.spool = spool
        self.link = Link(url, token, options or StreamOptions(), keep_warm=True)
        self.collector = SeriesCollector(series_timeout, series_count)
        self.session = LiveSession(self.link, spool, pipeline, session_log, on_report,
                                   collector=self.collector)
        self.collector.on_complete = self.session.submit
        if hasattr(pipeline, "observe"):
            self.collector.observers.append(pipeline.observe)
        self.pipeline = pipeline
        self.node = None
        self.watcher = None
        if listen is not None:
            from sender.dicom_node import DicomNode

            self.node = DicomNode(listen[0], listen[1], ae_title, spool, self.collector,
                                  max_associations, allow_hosts=allow_hosts,
                                  allow_calling_ae=allow_calling_ae, tls=dicom_tls)
        if watch is not None:
            from sender.watch import FolderWatcher

            self.watcher = FolderWatcher(watch, spool, self.collector, settle=settle)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Connect to the receiver, then open the node and the folder; series left in the
        spool by an earlier run are queued first.

        Raises:
            Refused: the receiver refuses the connection (wrong token, a certificate not
                trusted with ``--ca-file``, a wrong URL path): a setting to fix, not a receiver
                that is down, so the session does not start taking images it could not send.
        """
        from sender.transport import Refused, TransportError

        await self.link.start()
        try:
            await self.link.connect()
        except Refused:
            raise
        except TransportError as error:
            # Not fatal: the scanner may push before the link is back; the session retries.
            log.warning("receiver %s not reachable yet (%s); series wait in the spool until "
                        "it is", self.link.url, error)
        self._tasks.append(asyncio.create_task(self.session.run(), name="live session"))
        self._tasks.append(asyncio.create_task(self.collector.run(), name="series collector"))
        for pending in self.spool.pending():
            self.collector.add_pending(pending)
        if self.node is not None:
            self.node.start()
        if self.watcher is not None:
            self._tasks.append(asyncio.create_task(self.watcher.run(), name="watch folder"))

    async def stop(self) -> None:
        """Stop taking instances, then stop sending (undelivered series stay in the spool)."""
        if self.node is not None:
            self.node.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        await self.link.close()
        self.session.close()
        if hasattr(self.pipeline, "close"):
            self.pipeline.close()
        left = len(self.spool.pending())
        if left:
            log.warning("%d series not delivered stay in the spool %s; they are sent at the "
                        "next start", left, self.spool.root)

    async def wait_reports(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` series were dealt with in this run (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.session.reports) >= count:
                return True
            await asyncio.sleep(0.05)
        return False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no series is open or waiting (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.collector.open_series() == 0 and self.session.idle:
                return True
            await asyncio.sleep(0.05)
        return False
