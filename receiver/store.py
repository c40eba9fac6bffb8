"""The receiver's on-disk study folders: what arrived, persisted so that nothing is lost or redone.

Layout of ``OUT_DIR`` (one folder per study stream)::

    OUT_DIR/
      .dlad-receiver.lock          held (flock) by the receiver process that serves OUT_DIR
      <folder>/                    named from the sanitised study id (see folder_name), or
      <study>/<series>/            for a stream from a DICOM series: the sanitised
                                   StudyInstanceUID and SeriesInstanceUID of the header's
                                   ``dicom`` map (see stream_location), so that the series of
                                   one study sit side by side
        header.dlad                the stream's header frame, written once (atomically)
        chunks.dlad                append-only log of the data-chunk frames applied, in order,
                                   and of the ROI frame where the header announced the ROI
                                   as pending (logged when accepted, before the chunks that
                                   need it); written and fsync'd after every batch, before
                                   anything about that batch is told to the sender
        status.json                progress report, atomically replaced (see StudyRecord.status)
        volume.nii                 NIfTI snapshot of the reassembled volume, atomically replaced
                                   (volume.nii.gz with --snapshot-format nii.gz)

``header.dlad`` followed by ``chunks.dlad`` is a valid ``.dlad`` stream: ``cat header.dlad
chunks.dlad > s.dlad && dlad-receive --in s.dlad --out s.nii.gz`` rebuilds the same volume.
A receiver restarted on the same folder replays the log (every frame's checksum and every
chunk's fit to the plan are checked again), cuts a torn tail left by a crash, and continues
from there: what it reports to a sender is exactly what the log holds.

Durability: a batch's frames are written with ``os.write`` and ``fsync``'d before the batch is
acknowledged; a failed write (disk full, I/O error) truncates the log back to its last good
frame and raises :class:`StoreWriteError`, and the service then drops the study from memory, so
that nothing the disk lacks is ever reported as received. New files and folders are made
inside a temporary folder that is fsync'd and renamed into place, and the parent folder is
fsync'd after the rename. Before writing, the :class:`~receiver.limits.DiskGuard` checks the
out-dir quota and the free-space reserve.

Permissions: files are created with the process umask (``dlad-receive`` sets 077 unless
``--umask`` says otherwise: files 0600, folders 0700, as patient data should be).

A folder belongs to one stream: its header's study id and :func:`~shared.webrtc.protocol.stream_key`.
Another stream claiming the same name (same id with other settings, or another id that
sanitises to the same name) gets the next free name (``<name>.2``, ``<name>.3``...), never the
first one's folder.

Nothing here is thread-safe: the service calls one study's methods from one task at a time.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from receiver.limits import DiskFull, DiskGuard, disk_usage
from receiver.stream import StudyStream
from shared.atomic import write_json_atomic
from shared.nifti import write_nifti
from shared.webrtc.protocol import stream_key
from shared.wire import DataChunk, FrameReader, RoiFrame, StreamHeader, WireError, parse_frame

log = logging.getLogger("dlad.receiver")

HEADER_FILE = "header.dlad"
LOG_FILE = "chunks.dlad"
STATUS_FILE = "status.json"
SNAPSHOT_FORMATS = ("nii", "nii.gz")
LOCK_FILE = ".dlad-receiver.lock"
TEMP_PREFIX = ".tmp-"
MAX_NAME = 64
MAX_VARIANTS = 50
READ_BYTES = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class StoreError(RuntimeError):
    """The study folder cannot be used (locked, full of other streams, unreadable)."""


class StoreWriteError(StoreError):
    """Data could not be written durably (disk full, quota, I/O error); nothing of it counts."""


def folder_name(study_id: str) -> str:
    """A safe folder name for ``study_id``: never a path, never hidden, at most 73 characters.

    Characters outside ``[A-Za-z0-9._-]`` become ``_``, leading dots and dashes are dropped,
    the name is cut to 64 characters; if anything changed, ``-`` and 8 hex digits of the raw
    id's hash are appended so that two different ids do not meet by sanitisation alone.
    """
    safe = _UNSAFE.sub("_", study_id).lstrip(".-")[:MAX_NAME] or "study"
    if safe != study_id:
        safe = f"{safe}-{hashlib.blake2b(study_id.encode('utf-8', 'surrogatepass'), digest_size=4).hexdigest()}"
    return safe


def stream_location(header: StreamHeader) -> tuple[str, ...]:
    """Path of a stream's folder below ``OUT_DIR``, as sanitised parts.

    ``(study, series)`` from the header's ``dicom`` StudyInstanceUID and SeriesInstanceUID when
    it carries both (a series of a DICOM study: the control scans of an ablation land beside its
    planning scan), else ``(folder_name(study_id),)``.

    >>> import numpy as np
    >>> stream_location(StreamHeader("s", (1, 1, 1), np.eye(4), (1, 1, 1), "int16", (1, 0),
    ...                 (0, 0), "0" * 64, roi=np.zeros((1, 1, 1), bool),
    ...                 dicom={"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4"}))
    ('1.2.3', '1.2.3.4')
    """
    study = header.dicom.get("StudyInstanceUID")
    series = header.dicom.get("SeriesInstanceUID")
    if isinstance(study, str) and isinstance(series, str) and study and series:
        return folder_name(study), folder_name(series)
    return (folder_name(header.study_id),)


def series_identity(header: StreamHeader) -> dict:
    """The DICOM identity of a stream for status files and listings (empty if not DICOM)."""
    keys = ("StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
            "StudyDescription", "Modality", "AcquisitionDate", "AcquisitionTime")
    return {key: header.dicom[key] for key in keys if key in header.dicom}


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``; elsewhere a no-op).

    Decoding leaves megabytes of freed buffers in malloc's pools; a receiver that keeps
    running between studies should not keep them.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (a new file, a rename) durable."""
    handle = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems without dir fsync
            raise
    finally:
        os.close(handle)


def _describe(error: OSError) -> str:
    if isinstance(error, DiskFull):
        return str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({error.strerror})"
    return f"{error.strerror or error} ({type(error).__name__})"


def read_header_file(path: Path) -> tuple[StreamHeader, bytes]:
    """The header frame stored in ``path`` (raises StoreError if it is not one)."""
    try:
        data = path.read_bytes()
        header = parse_frame(data)
    except (OSError, WireError) as error:
        raise StoreError(f"{path}: not a valid header frame ({error})") from None
    if not isinstance(header, StreamHeader):
        raise StoreError(f"{path}: not a header frame")
    return header, data


class StudyRecord:
    """One study folder and the volume being rebuilt in memory from what arrived."""

    def __init__(self, folder: Path, header: StreamHeader, key: str,
                 snapshot_format: str = "nii", disk: DiskGuard | None = None):
        if snapshot_format not in SNAPSHOT_FORMATS:
            raise ValueError(f"snapshot format must be one of {SNAPSHOT_FORMATS}")
        self.snapshot_file = f"volume.{snapshot_format}"
        self.folder = folder
        self.name = "/".join(folder.parts[-len(stream_location(header)):])
        """The folder's path below ``OUT_DIR`` (``study/series`` for a DICOM series)."""
        self._header = header
        self.key = key
        self.disk = disk
        self.stream = StudyStream(name=header.study_id)
        self.stream.accept_header(header)
        self.times: dict[str, str] = {"created": _now()}
        self.counters = {"sessions": 0, "network_bytes": 0, "resumed_with": 0}
        self.connected = False
        self.snapshot_info: dict = {}
        self.last_pass: dict = {}
        self.last_snapshot = 0.0
        self.dirty = True
        self.snapshot_written = False
        """Whether the last :meth:`write_snapshot` wrote a new volume."""
        self._log: int | None = None  # file descriptor of the chunk log, opened for appending
        self._log_bytes = 0

    @property
    def header(self) -> StreamHeader:
        """The stream's header, completed by its ROI frame once that arrived (a header that
        announced the ROI as pending)."""
        return self.stream.reassembler.header

    @property
    def snapshot_path(self) -> Path:
        """Where the NIfTI snapshot is (it may not exist yet)."""
        return self.folder / self.snapshot_file

    # --- persistence -------------------------------------------------------------------------

    @classmethod
    def create(cls, folder: Path, header: StreamHeader, key: str, snapshot_format: str = "nii",
               disk: DiskGuard | None = None):
        """A record for a folder just claimed (its empty log made by the claim)."""
        return cls(folder, header, key, snapshot_format, disk)

    @classmethod
    def load(cls, folder: Path, header: StreamHeader, key: str,
             snapshot_format: str = "nii", disk: DiskGuard | None = None) -> StudyRecord:
        """Rebuild from ``folder``: replay the chunk log, cut a torn tail, restore counters."""
        record = cls(folder, header, key, snapshot_format, disk)
        record._remove_stale_temporaries()
        path = folder / LOG_FILE
        good = 0
        if path.exists():
            # First pass: find the end of the last frame that verifies (a crash may leave a
            # partial frame at the end); cut the log there so later appends stay parseable.
            reader = FrameReader()
            with open(path, "rb") as handle:
                while data := handle.read(READ_BYTES):
                    for event in reader.feed(data):
                        if event.chunk is not None:
                            good = event.offset + event.size
            size = path.stat().st_size
            if size > good:
                log.warning("%s: cutting %d bytes of torn or damaged log tail", path, size - good)
                with open(path, "r+b") as handle:
                    handle.truncate(good)
                    os.fsync(handle.fileno())
                if disk is not None:
                    disk.charge(good - size)
            with open(path, "rb") as handle:
                while data := handle.read(READ_BYTES):
                    record.stream.feed(data)
            record.stream.finish()
        else:
            path.touch()
            _fsync_dir(folder)
        record._log_bytes = good
        previous = record._read_status()
        if previous.get("stream_key") == key:
            record.times = {**previous.get("times", {}), **{"reloaded": _now()}}
            for name in record.counters:
                value = previous.get("transfer", {}).get(name)
                if isinstance(value, int):
                    record.counters[name] = value
        record.counters["resumed_with"] = len(record.stream.reassembler.applied)
        record.check_milestones()
        return record

    def _remove_stale_temporaries(self) -> None:
        """Delete what a crash left of an atomic write here (a snapshot, a status): files named
        ``.<file>.<random>`` (:func:`shared.atomic.atomic_path`), each up to a whole volume of
        patient data that nothing would ever use or remove."""
        names = [f"volume.{fmt}" for fmt in SNAPSHOT_FORMATS] + [STATUS_FILE]
        for path in self.folder.glob(".*"):
            if path.is_file() and any(path.name.startswith(f".{name}.") for name in names):
                size = path.stat().st_size
                path.unlink()
                log.warning("%s: removed %s, left by an interrupted write", self.folder, path.name)
                if self.disk is not None:
                    self.disk.charge(-size)

    def _read_status(self) -> dict:
        try:
            value = json.loads((self.folder / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def append(self, chunks: list[DataChunk | RoiFrame]) -> None:
        """Add applied chunks to the log, durably (write + fsync) before returning; the
        stream's ROI frame (a header that announced the ROI as pending) is logged the same way,
        in its place, so that the log replays it before the chunks that need it.

        Raises :class:`StoreWriteError` when they cannot all be stored (quota, reserve, disk
        full, I/O error); the log is then cut back to where it was, so it never ends in a torn
        frame and holds none of these chunks.
        """
        if not chunks:
            return
        data = b"".join(chunk.to_frame() for chunk in chunks)
        start = self._log_bytes
        try:
            if self.disk is not None:
                self.disk.require(len(data))
            if self._log is None:
                self._log = os.open(self.folder / LOG_FILE, os.O_WRONLY | os.O_APPEND)
            view = memoryview(data)
            while view:
                written = os.write(self._log, view)
                view = view[written:]
            os.fsync(self._log)
        except OSError as error:
            self._cut_log(start)
            raise StoreWriteError(f"{len(chunks)} chunks not stored in {self.folder}: "
                                  f"{_describe(error)}") from error
        self._log_bytes += len(data)
        if self.disk is not None:
            self.disk.charge(len(data))

    def _cut_log(self, size: int) -> None:
        """After a failed append: the log back to ``size`` bytes (a shrink needs no space)."""
        try:
            if self._log is None:
                self._log = os.open(self.folder / LOG_FILE, os.O_WRONLY | os.O_APPEND)
            os.ftruncate(self._log, size)
            os.fsync(self._log)
        except OSError as error:  # the replay at the next load cuts a torn tail anyway
            log.error("study %s: cannot cut the chunk log back to %d bytes: %s",
                      self.header.study_id, size, error)

    def close(self) -> None:
        if self._log is not None:
            os.close(self._log)
            self._log = None

    def remove_if_empty(self) -> bool:
        """Delete the folder if its chunk log holds nothing (call after :meth:`close`).

        A study that never got a chunk (a header sent alone, a session closed for garbage)
        leaves no folder behind: a peer cannot fill the out-dir with empty studies. Returns
        whether the folder was removed.
        """
        try:
            if self._log_bytes or (self.folder / LOG_FILE).stat().st_size:
                return False
        except OSError:
            return False
        size = disk_usage(self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.disk is not None:
            self.disk.charge(-size)
        if len(self.name.split("/")) > 1:
            try:  # a DICOM study's folder left without any series goes too
                self.folder.parent.rmdir()
            except OSError:
                pass
        try:
            _fsync_dir(self.folder.parent)
        except OSError:
            pass
        return not self.folder.exists()

    # --- progress ----------------------------------------------------------------------------

    @property
    def reassembler(self):
        return self.stream.reassembler

    def check_milestones(self) -> list[str]:
        """Record the wall time of milestones reached since the last call; return their names."""
        r = self.reassembler
        reached = []
        for name, done in (("first_chunk", bool(r.applied)),
                           ("roi_known", r.roi_known and self._header.roi_pending),
                           ("roi_complete", r.roi_complete),
                           ("base_complete", r.base_complete),
                           ("exact_complete", r.exact_complete), ("complete", r.complete)):
            if done and name not in self.times:
                self.times[name] = _now()
                reached.append(name)
        return reached

    def status(self) -> dict:
        """The study's status: :meth:`StudyStream.status` plus folder, times and transfer."""
        status = self.stream.status()
        r = self.reassembler
        status.update({
            "folder": self.name,
            **({"dicom": series_identity(self.header)} if self.header.dicom else {}),
            "stream_key": self.key,
            "sha256": self.header.sha256,
            "layers_planned": sorted(self.header.layers),
            "layer_chunks": {str(layer): [sum(1 for s in r.applied if r.plan[s][0] == layer),
                                          sum(1 for entry in r.plan.values() if entry[0] == layer)]
                             for layer in sorted(self.header.layers)},
            "connected": self.connected,
            "times": dict(self.times),
            "transfer": {**self.counters, "log_bytes": self._log_bytes,
                         "last_pass": dict(self.last_pass)},
            "snapshot": dict(self.snapshot_info),
            "updated": _now(),
        })
        return status

    def write_snapshot(self, with_volume: bool = True) -> dict:
        """Atomically replace the NIfTI snapshot (optional) and then status.json.

        No volume is written before a chunk has been applied (a header alone must not make the
        receiver write a volume of fill values). A snapshot that does not fit within the disk
        limits, or fails to write, is skipped with an error in the log: the chunk log, not the
        snapshot, is what must be on disk, and the next snapshot will try again.
        """
        r = self.reassembler
        path = self.snapshot_path
        with_volume = (with_volume and bool(r.applied)
                       and (self.dirty or not path.exists()))
        self.snapshot_written = False
        if with_volume:
            old_size = path.stat().st_size if path.exists() else 0
            try:
                if self.disk is not None:
                    self.disk.require(_snapshot_bytes(self.header))
                write_nifti(r.to_volume(), path, compresslevel=1)
            except OSError as error:
                log.error("study %s: snapshot not written: %s", self.header.study_id,
                          _describe(error))
            else:
                if self.disk is not None:
                    self.disk.charge(path.stat().st_size - old_size)
                self.snapshot_info = {"file": self.snapshot_file, "written": _now(),
                                      "chunks_applied": len(r.applied),
                                      "roi_complete": r.roi_complete, "complete": r.complete}
                self.dirty = False
                self.snapshot_written = True
        self.last_snapshot = time.monotonic()
        status = self.status()
        try:
            write_json_atomic(self.folder / STATUS_FILE, status)
        except OSError as error:
            log.error("study %s: status.json not written: %s", self.header.study_id,
                      _describe(error))
        if with_volume:
            release_memory()
        return status


def _snapshot_bytes(header: StreamHeader) -> int:
    """Size of an uncompressed NIfTI snapshot of the study (the .nii.gz one is smaller)."""
    voxels = int(header.shape[0]) * int(header.shape[1]) * int(header.shape[2])
    try:
        itemsize = max(2, np.dtype(header.source_dtype).itemsize)
    except TypeError:
        itemsize = 2
    return 352 + voxels * itemsize


class StudyStore:
    """``OUT_DIR`` of one receiver: finds, creates and loads study folders."""

    def __init__(self, out_dir: Path, snapshot_format: str = "nii",
                 disk: DiskGuard | None = None):
        self.snapshot_format = snapshot_format
        self.out_dir = Path(out_dir)
        self.disk = disk
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create the out-dir {self.out_dir}: {error}") from None
        mode = stat.S_IMODE(self.out_dir.stat().st_mode)
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("the out-dir %s is accessible by other users (mode %o); the studies "
                        "in it are patient data: chmod 700 it", self.out_dir, mode)
        self._lock = open(self.out_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise StoreError(f"{self.out_dir} is in use by another dlad-receive") from None
        for stale in self.out_dir.glob(TEMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()

    def candidates(self, header: StreamHeader) -> Iterator[Path]:
        """Folders the stream may use, in order: its location, then ``.2``, ``.3``... of it."""
        *parents, base = stream_location(header)
        parent = self.out_dir.joinpath(*parents)
        yield parent / base
        for n in range(2, MAX_VARIANTS + 1):
            yield parent / f"{base}.{n}"

    def open(self, header: StreamHeader, header_frame: bytes, disk_need: int = 0
             ) -> tuple[StudyRecord, bool]:
        """The record for this stream: loaded from its folder, or in a new one.

        Returns ``(record, existed)``. Raises StoreError when no folder name is free, when a
        new study's ``disk_need`` bytes do not fit the disk limits, or when its folder cannot
        be made.
        """
        key = stream_key(header)
        for folder in self.candidates(header):
            name = folder.relative_to(self.out_dir)
            if not folder.exists():
                try:
                    if self.disk is not None:
                        self.disk.require(disk_need)
                    self._claim(folder, header_frame)
                except OSError as error:
                    raise StoreWriteError(f"cannot make a folder for study "
                                          f"{header.study_id!r}: {_describe(error)}") from None
                log.info("study %s: new folder %s", header.study_id, folder)
                return StudyRecord.create(folder, header, key, self.snapshot_format,
                                          self.disk), False
            try:
                stored, _ = read_header_file(folder / HEADER_FILE)
            except StoreError as error:
                log.warning("skipping folder %s: %s", folder, error)
                continue
            if stored.study_id == header.study_id and stream_key(stored) == key:
                try:
                    record = StudyRecord.load(folder, stored, key, self.snapshot_format,
                                              self.disk)
                except OSError as error:
                    raise StoreError(f"cannot load {folder}: {_describe(error)}") from None
                log.info("study %s: resuming in %s with %d/%d chunks", header.study_id, folder,
                         len(record.reassembler.applied), len(record.reassembler.plan))
                return record, True
            log.warning("study %s: folder %s holds another stream (%s); trying the next name",
                        header.study_id, name, "other settings" if stored.study_id ==
                        header.study_id else f"study {stored.study_id!r}")
        raise StoreError(f"no free folder for study {header.study_id!r} (more than "
                         f"{MAX_VARIANTS} different streams with this id)")

    def _claim(self, folder: Path, header_frame: bytes) -> None:
        """Create ``folder`` with its header and an empty log, atomically and durably.

        Both files are made in a temporary folder, fsync'd with it, and the folder is renamed
        into place; then the out-dir is fsync'd so that the rename survives a crash.
        """
        temporary = self.out_dir / f"{TEMP_PREFIX}{folder.name}-{os.getpid()}-{time.monotonic_ns()}"
        if folder.parent != self.out_dir and not folder.parent.is_dir():
            # A study's folder (of DICOM series): made once, durably, before its first series.
            folder.parent.mkdir(exist_ok=True)
            _fsync_dir(self.out_dir)
        temporary.mkdir()
        try:
            with open(temporary / HEADER_FILE, "wb") as out:
                out.write(header_frame)
                out.flush()
                os.fsync(out.fileno())
            with open(temporary / LOG_FILE, "wb") as out:
                os.fsync(out.fileno())
            _fsync_dir(temporary)
            os.rename(temporary, folder)  # fails if folder appeared meanwhile (non-empty)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        _fsync_dir(folder.parent)
        if self.disk is not None:
            self.disk.charge(len(header_frame))

    def stream_folders(self) -> Iterator[Path]:
        """Every stream folder: ``OUT_DIR/<folder>`` and ``OUT_DIR/<study>/<series>``."""
        for folder in sorted(self.out_dir.iterdir()):
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            if (folder / HEADER_FILE).exists():
                yield folder
                continue
            for series in sorted(folder.iterdir()):
                if series.is_dir() and not series.name.startswith(".") and \
                        (series / HEADER_FILE).exists():
                    yield series

    def list(self) -> list[dict]:
        """Every stream folder with its last status (for ``GET /studies``)."""
        studies = []
        for folder in self.stream_folders():
            try:
                status = json.loads((folder / STATUS_FILE).read_text())
            except (OSError, ValueError):
                status = {}
            if not isinstance(status, dict):
                status = {}
            studies.append({"folder": str(folder.relative_to(self.out_dir)),
                            "study_id": status.get("study_id"),
                            **({"dicom": status["dicom"]} if isinstance(status.get("dicom"), dict)
                               else {}),
                            "state": status.get("state", "unknown"),
                            "chunks_applied": status.get("chunks_applied"),
                            "chunks_planned": status.get("chunks_planned"),
                            "roi_complete": status.get("roi_complete"),
                            "verified_sha256": status.get("verified_sha256")})
        return studies
