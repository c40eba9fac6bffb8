"""PACS push: DICOM C-STORE (pynetdicom) of the exported series, through a persistent outbox.

``dlad-receive --listen ... --dicom-out DIR --pacs AE@HOST:PORT [--pacs-calling-ae TITLE]``
queues every DICOM version the export writes (:mod:`receiver.dicom_export`) and sends it to the
PACS. Nothing is lost when the PACS is down, refuses, or the receiver stops: a push is a *job*
file in ``DIR/.outbox/`` (written atomically before any attempt), listing the files to send and
those the PACS has confirmed; a confirmed file is recorded at once, a job is deleted only when
every file is confirmed, and a receiver started again on the same ``DIR`` resumes the jobs it
finds. Failures are retried with a growing delay (:data:`RETRY_DELAYS`), for as long as it
takes; every failure is logged with the PACS's answer.

A file counts as stored on a C-STORE status of success (0x0000) or of warning (0xB000 coercion
of data elements, 0xB006 elements discarded, 0xB007 data set does not match the SOP class): the
PACS holds the instance. Any other answer, no answer, or a refused association leaves it in the
outbox.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from shared.atomic import write_json_atomic

log = logging.getLogger("dlad.receiver")

OUTBOX = ".outbox"
#: Seconds before the n-th retry of a job (the last value repeats): quick at first (a PACS being
#: restarted), then once a minute, so that a PACS down for hours costs nothing.
RETRY_DELAYS = (2.0, 5.0, 10.0, 30.0, 60.0)
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 16 printable characters, no backslash


class PacsError(ValueError):
    """A PACS address or AE title that cannot be used."""


@dataclass(frozen=True)
class PacsTarget:
    """Where C-STORE goes."""

    ae_title: str
    """Called AE title of the PACS."""
    host: str
    """Host name or address of the PACS."""
    port: int
    """DICOM port of the PACS."""
    calling_ae_title: str = "DLAD"
    """Our AE title, as the PACS knows us."""

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def check_ae_title(title: str, what: str) -> str:
    """``title`` if it is a valid AE title (1-16 printable characters, no backslash)."""
    if not _AE_TITLE.match(title) or not title.strip():
        raise PacsError(f"{what} must be 1-16 printable characters without a backslash, "
                        f"got {title!r}")
    return title


def parse_pacs(value: str, calling_ae_title: str = "DLAD") -> PacsTarget:
    """``AE@HOST:PORT`` (``AE@[v6]:PORT`` for IPv6) -> :class:`PacsTarget`.

    >>> parse_pacs("ORTHANC@127.0.0.1:4242")
    PacsTarget(ae_title='ORTHANC', host='127.0.0.1', port=4242, calling_ae_title='DLAD')
    >>> parse_pacs("pacs.example:104")
    Traceback (most recent call last):
    ...
    receiver.pacs.PacsError: --pacs must be AE@HOST:PORT, got 'pacs.example:104'
    """
    title, at, address = value.partition("@")
    host, colon, port = address.rpartition(":")
    host = host.strip("[]")
    if not at or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PacsError(f"--pacs must be AE@HOST:PORT, got {value!r}")
    return PacsTarget(check_ae_title(title, "the PACS AE title"), host, int(port),
                      check_ae_title(calling_ae_title, "--pacs-calling-ae"))


def require() -> None:
    """Raise :class:`PacsError` with the fix when pynetdicom is missing."""
    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        raise PacsError("--pacs needs pynetdicom: pip install 'dlad-stream[dicom]'") from None


@dataclass
class Job:
    """One queued push: the files of one exported version."""

    path: Path
    """The job file in the outbox."""
    folder: Path
    """The version folder holding the files."""
    files: list[str]
    """File names to send, in order."""
    sent: list[str]
    """File names the PACS confirmed."""
    attempts: int = 0
    """Failed attempts so far."""
    last_error: str = ""
    """Why the last attempt failed."""

    @property
    def pending(self) -> list[str]:
        done = set(self.sent)
        return [name for name in self.files if name not in done]

    def save(self) -> None:
        write_json_atomic(self.path, {"folder": str(self.folder), "files": self.files,
                                      "sent": self.sent, "attempts": self.attempts,
                                      "last_error": self.last_error})

    @classmethod
    def load(cls, path: Path) -> Job | None:
        try:
            value = json.loads(path.read_text())
            return cls(path=path, folder=Path(value["folder"]), files=list(value["files"]),
                       sent=list(value.get("sent", [])), attempts=int(value.get("attempts", 0)),
                       last_error=str(value.get("last_error", "")))
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.error("PACS outbox: unreadable job %s left in place (%s)", path, error)
            return None


class Outbox:
    """The job files under ``DIR/.outbox``."""

    def __init__(self, dicom_dir: Path):
        self.folder = Path(dicom_dir) / OUTBOX
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, version_folder: Path, files: list[str]) -> Job:
        """Queue ``files`` of ``version_folder`` (durably, before anything is sent)."""
        name = f"{time.time_ns():020d}-{os.getpid()}.json"
        job = Job(path=self.folder / name, folder=Path(version_folder), files=list(files), sent=[])
        job.save()
        return job

    def jobs(self) -> list[Job]:
        """Pending jobs, oldest first."""
        found = []
        for path in sorted(self.folder.glob("*.json")):
            job = Job.load(path)
            if job is not None:
                found.append(job)
        return found

    def finish(self, job: Job) -> None:
        job.path.unlink(missing_ok=True)


def store_files(target: PacsTarget, folder: Path, names: list[str], on_stored) -> str:
    """C-STORE ``names`` (in ``folder``) over one association; call ``on_stored(name)`` for each
    file the PACS confirmed. Returns "" when all were stored, else why not (never raises)."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, SegmentationStorage

    ae = AE(ae_title=target.calling_ae_title)
    # A PACS that stops answering must not hold the outbox for long.
    ae.connection_timeout = 10
    ae.acse_timeout = 15
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    for sop_class in (CTImageStorage, SegmentationStorage):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    try:
        assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    except Exception as error:  # a name that does not resolve, say
        return f"cannot associate with {target}: {error}"
    if not assoc.is_established:
        return (f"association with {target} rejected" if assoc.is_rejected else
                f"no association with {target} (not reachable, or it aborted)")
    problem = ""
    try:
        for name in names:
            path = folder / name
            try:
                dataset = dcmread(path)
            except (OSError, ValueError) as error:
                problem = f"cannot read {path}: {error}"
                break
            status = assoc.send_c_store(dataset)
            code = getattr(status, "Status", None)
            if code in STORED_STATUSES:
                on_stored(name)
            else:
                problem = (f"{name}: C-STORE answered "
                           f"{'nothing' if code is None else f'status 0x{code:04X}'}")
                break
            if not assoc.is_established:
                problem = f"association with {target} ended after {name}"
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return problem


class PacsPusher:
    """Sends the outbox's jobs to one PACS, retrying until each file is confirmed."""

    def __init__(self, target: PacsTarget, dicom_dir: Path, delays=RETRY_DELAYS):
        self.target = target
        self.outbox = Outbox(dicom_dir)
        self.delays = tuple(delays)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlad-pacs")
        self.stored = 0
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pacs push")
        pending = self.outbox.jobs()
        if pending:
            log.info("PACS %s: %d queued push(es) in %s", self.target, len(pending),
                     self.outbox.folder)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    def queue(self, version_folder: Path, files: list[Path]) -> None:
        """Queue a written version (durably) and wake the sender up."""
        self.outbox.add(version_folder, [Path(f).name for f in files])
        self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            self._wakeup.clear()
            jobs = self.outbox.jobs()
            failed = False
            for job in jobs:
                pending = job.pending
                if not pending:
                    self.outbox.finish(job)
                    continue

                def stored(name, job=job):
                    job.sent.append(name)
                    job.save()  # recorded at once: a crash never re-sends what was confirmed
                    self.stored += 1

                problem = await loop.run_in_executor(self._executor, store_files, self.target,
                                                     job.folder, pending, stored)
                if problem:
                    job.attempts += 1
                    job.last_error = problem
                    job.save()
                    log.warning("PACS %s: push of %s failed (attempt %d, %d/%d stored): %s",
                                self.target, job.folder, job.attempts, len(job.sent),
                                len(job.files), problem)
                    failed = True
                    break
                log.info("PACS %s: %d instances of %s stored", self.target, len(job.files),
                         job.folder)
                self.outbox.finish(job)
            if failed:
                delay = self.delays[min(failures, len(self.delays) - 1)]
                failures += 1
                try:
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                continue
            failures = 0
            await self._wakeup.wait()

    @property
    def pending_jobs(self) -> int:
        return len(list(self.outbox.folder.glob("*.json")))
