"""The receiver's on-disk study folders: what arrived, persisted so that nothing is lost or redone.

Layout of ``OUT_DIR`` (one folder per study stream)::

    OUT_DIR/
      .dlad-receiver.lock          held (flock) by the receiver process that serves OUT_DIR
      <folder>/                    named from the sanitised study id (see folder_name)
        header.dlad                the stream's header frame, written once (atomically)
        chunks.dlad                append-only log of the data-chunk frames applied, in order;
                                   flushed and fsync'd after every batch
        status.json                progress report, atomically replaced (see StudyRecord.status)
        volume.nii                 NIfTI snapshot of the reassembled volume, atomically replaced
                                   (volume.nii.gz with --snapshot-format nii.gz)

``header.dlad`` followed by ``chunks.dlad`` is a valid ``.dlad`` stream: ``cat header.dlad
chunks.dlad > s.dlad && dlad-receive --in s.dlad --out s.nii.gz`` rebuilds the same volume.
A receiver restarted on the same folder replays the log (every frame is checked again), cuts a
torn tail left by a crash, and continues from there.

A folder belongs to one stream: its header's study id and :func:`~shared.webrtc.protocol.stream_key`.
Another stream claiming the same name (same id with other settings, or another id that
sanitises to the same name) gets the next free name (``<name>.2``, ``<name>.3``...), never the
first one's folder.

Nothing here is thread-safe: the service calls one study's methods from one task at a time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from receiver.stream import StudyStream
from shared.atomic import write_json_atomic
from shared.nifti import write_nifti
from shared.webrtc.protocol import stream_key
from shared.wire import DataChunk, FrameReader, StreamHeader, WireError, parse_frame

log = logging.getLogger("dlad.receiver")

HEADER_FILE = "header.dlad"
LOG_FILE = "chunks.dlad"
STATUS_FILE = "status.json"
SNAPSHOT_FORMATS = ("nii", "nii.gz")
LOCK_FILE = ".dlad-receiver.lock"
TEMP_PREFIX = ".tmp-"
MAX_NAME = 64
MAX_VARIANTS = 50
MAX_PROBLEMS = 200
READ_BYTES = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class StoreError(RuntimeError):
    """The study folder cannot be used (locked, full of other streams, unreadable)."""


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
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


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
                 snapshot_format: str = "nii"):
        if snapshot_format not in SNAPSHOT_FORMATS:
            raise ValueError(f"snapshot format must be one of {SNAPSHOT_FORMATS}")
        self.snapshot_file = f"volume.{snapshot_format}"
        self.folder = folder
        self.header = header
        self.key = key
        self.stream = StudyStream()
        self.stream.accept_header(header)
        self.times: dict[str, str] = {"created": _now()}
        self.counters = {"sessions": 0, "network_bytes": 0, "resumed_with": 0}
        self.connected = False
        self.snapshot_info: dict = {}
        self.last_pass: dict = {}
        self.last_snapshot = 0.0
        self.dirty = True
        self._log = None
        self._log_bytes = 0

    # --- persistence -------------------------------------------------------------------------

    @classmethod
    def create(cls, folder: Path, header: StreamHeader, key: str, snapshot_format: str = "nii"):
        record = cls(folder, header, key, snapshot_format)
        (folder / LOG_FILE).touch()
        return record

    @classmethod
    def load(cls, folder: Path, header: StreamHeader, key: str,
             snapshot_format: str = "nii") -> StudyRecord:
        """Rebuild from ``folder``: replay the chunk log, cut a torn tail, restore counters."""
        record = cls(folder, header, key, snapshot_format)
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
            with open(path, "rb") as handle:
                while data := handle.read(READ_BYTES):
                    record.stream.feed(data)
            record.stream.finish()
        else:
            path.touch()
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

    def _read_status(self) -> dict:
        try:
            value = json.loads((self.folder / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def append(self, chunks: list[DataChunk]) -> None:
        """Add applied chunks to the log, durably (flush + fsync) before returning."""
        if not chunks:
            return
        if self._log is None:
            self._log = open(self.folder / LOG_FILE, "ab")
        for chunk in chunks:
            data = chunk.to_frame()
            self._log.write(data)
            self._log_bytes += len(data)
        self._log.flush()
        os.fsync(self._log.fileno())

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # --- progress ----------------------------------------------------------------------------

    @property
    def reassembler(self):
        return self.stream.reassembler

    def check_milestones(self) -> list[str]:
        """Record the wall time of milestones reached since the last call; return their names."""
        r = self.reassembler
        reached = []
        for name, done in (("first_chunk", bool(r.applied)), ("roi_complete", r.roi_complete),
                           ("base_complete", r.base_complete),
                           ("exact_complete", r.exact_complete), ("complete", r.complete)):
            if done and name not in self.times:
                self.times[name] = _now()
                reached.append(name)
        return reached

    def trim_problems(self) -> None:
        problems = self.stream.problems
        if len(problems) > MAX_PROBLEMS:
            del problems[:len(problems) - MAX_PROBLEMS]

    def status(self) -> dict:
        """The study's status: :meth:`StudyStream.status` plus folder, times and transfer."""
        self.trim_problems()
        status = self.stream.status()
        r = self.reassembler
        status.update({
            "folder": self.folder.name,
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
        """Atomically replace the NIfTI snapshot (optional) and then status.json."""
        r = self.reassembler
        with_volume = with_volume and (self.dirty or not (self.folder / self.snapshot_file).exists())
        if with_volume:
            write_nifti(r.to_volume(), self.folder / self.snapshot_file, compresslevel=1)
            self.snapshot_info = {"file": self.snapshot_file, "written": _now(),
                                  "chunks_applied": len(r.applied),
                                  "roi_complete": r.roi_complete, "complete": r.complete}
            self.dirty = False
        self.last_snapshot = time.monotonic()
        status = self.status()
        write_json_atomic(self.folder / STATUS_FILE, status)
        if with_volume:
            release_memory()
        return status


class StudyStore:
    """``OUT_DIR`` of one receiver: finds, creates and loads study folders."""

    def __init__(self, out_dir: Path, snapshot_format: str = "nii"):
        self.snapshot_format = snapshot_format
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
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

    def candidates(self, study_id: str):
        base = folder_name(study_id)
        yield base
        for n in range(2, MAX_VARIANTS + 1):
            yield f"{base}.{n}"

    def open(self, header: StreamHeader, header_frame: bytes) -> tuple[StudyRecord, bool]:
        """The record for this stream: loaded from its folder, or in a new one.

        Returns ``(record, existed)``. Raises StoreError when no folder name is free.
        """
        key = stream_key(header)
        for name in self.candidates(header.study_id):
            folder = self.out_dir / name
            if not folder.exists():
                self._claim(folder, header_frame)
                log.info("study %s: new folder %s", header.study_id, folder)
                return StudyRecord.create(folder, header, key, self.snapshot_format), False
            try:
                stored, _ = read_header_file(folder / HEADER_FILE)
            except StoreError as error:
                log.warning("skipping folder %s: %s", folder, error)
                continue
            if stored.study_id == header.study_id and stream_key(stored) == key:
                record = StudyRecord.load(folder, stored, key, self.snapshot_format)
                log.info("study %s: resuming in %s with %d/%d chunks", header.study_id, folder,
                         len(record.reassembler.applied), len(record.reassembler.plan))
                return record, True
            log.warning("study %s: folder %s holds another stream (%s); trying the next name",
                        header.study_id, name, "other settings" if stored.study_id ==
                        header.study_id else f"study {stored.study_id!r}")
        raise StoreError(f"no free folder for study {header.study_id!r} (more than "
                         f"{MAX_VARIANTS} different streams with this id)")

    def _claim(self, folder: Path, header_frame: bytes) -> None:
        """Create ``folder`` with its header atomically (a temp folder renamed into place)."""
        temporary = self.out_dir / f"{TEMP_PREFIX}{folder.name}-{os.getpid()}-{time.monotonic_ns()}"
        temporary.mkdir()
        try:
            with open(temporary / HEADER_FILE, "wb") as out:
                out.write(header_frame)
                out.flush()
                os.fsync(out.fileno())
            os.rename(temporary, folder)  # fails if folder appeared meanwhile (non-empty)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        _fsync_dir(self.out_dir)

    def list(self) -> list[dict]:
        """Every study folder with its last status (for ``GET /studies``)."""
        studies = []
        for folder in sorted(self.out_dir.iterdir()):
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            try:
                status = json.loads((folder / STATUS_FILE).read_text())
            except (OSError, ValueError):
                status = {}
            studies.append({"folder": folder.name, "study_id": status.get("study_id"),
                            "state": status.get("state", "unknown"),
                            "chunks_applied": status.get("chunks_applied"),
                            "chunks_planned": status.get("chunks_planned"),
                            "roi_complete": status.get("roi_complete"),
                            "verified_sha256": status.get("verified_sha256")})
        return studies
