"""The sender's spool: DICOM instances on disk before they are acknowledged, and what was sent.

A scanner that got a C-STORE success status deletes nothing, but it will not send the image
again either: from that moment the sender is responsible for it. So every instance is written
here (temporary name, fsync, rename) *before* the SCP answers, exactly as it was received
(transfer syntax, pixel data and all), and a series leaves the spool only once the receiver has
confirmed it complete. A sender restarted after a crash finds the series it had not delivered
and sends them. The watch folder uses the same spool, so both modes behave alike.

Layout (UIDs are DICOM UI values, ``[0-9.]``, at most 64 characters; anything else is refused
before it can become a path)::

    SPOOL/
      deidentify.key                       the site secret of --deidentify (0600, made once)
      series/<StudyInstanceUID>/<SeriesInstanceUID>/
        <SOPInstanceUID>.dcm               one instance, as received (DICOM Part 10 file)
        delivered.json                     written when the receiver confirmed the series:
                                           instances, voxel SHA-256, receiver folder, time

Limits: the spool refuses an instance when it would hold more than ``max_bytes`` or leave less
than ``min_free_bytes`` on its disk (the SCP answers "out of resources", 0xA700, and the scanner
keeps the image); delivered series older than ``keep_days`` are removed at start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from shared.atomic import write_json_atomic

log = logging.getLogger("dlad.sender")

SERIES_DIR = "series"
DELIVERED_FILE = "delivered.json"
KEY_FILE = "deidentify.key"
SUFFIX = ".dcm"
TEMP_PREFIX = ".tmp-"
#: DICOM UI value representation: digits and dots, at most 64 characters (PS3.5 6.2).
UID_PATTERN = re.compile(r"^[0-9][0-9.]{0,63}$")


class SpoolError(RuntimeError):
    """The spool cannot take an instance (full disk, limit reached, unusable folder)."""


def valid_uid(value) -> bool:
    """True for a DICOM UID that is safe as a file name (``[0-9.]``, 1-64 characters).

    >>> valid_uid("1.2.840.10008.5.1.4.1.1.2"), valid_uid("../etc"), valid_uid("")
    (True, False, False)
    """
    return isinstance(value, str) and bool(UID_PATTERN.match(value)) and ".." not in value


def _fsync_dir(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@dataclass
class SpooledSeries:
    """One series in the spool."""

    study_uid: str
    series_uid: str
    folder: Path
    instances: dict[str, Path] = field(default_factory=dict)
    """SOPInstanceUID -> file."""
    delivered: dict | None = None
    """The content of delivered.json, when the series was confirmed complete."""

    @property
    def key(self) -> tuple[str, str]:
        return self.study_uid, self.series_uid


class Spool:
    """The spool folder (see the module docstring). Thread-safe: the SCP writes from its
    association threads while the session reads and marks series delivered."""

    def __init__(self, root: Path, max_bytes: int = 20 * 1024 ** 3,
                 min_free_bytes: int = 1024 ** 3, keep_days: float = 7.0):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.keep_days = keep_days
        self._lock = threading.Lock()
        try:
            (self.root / SERIES_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SpoolError(f"cannot use {self.root} as the spool: {error}") from None
        self._bytes = 0
        self._series: dict[tuple[str, str], SpooledSeries] = {}
        self._scan()

    # --- start-up ----------------------------------------------------------------------------

    def _scan(self) -> None:
        """Index what a previous run left; drop temporaries and old delivered series."""
        cutoff = time.time() - self.keep_days * 86400
        for study in sorted((self.root / SERIES_DIR).iterdir()):
            if not study.is_dir() or not valid_uid(study.name):
                continue
            for folder in sorted(study.iterdir()):
                if not folder.is_dir() or not valid_uid(folder.name):
                    continue
                series = SpooledSeries(study.name, folder.name, folder)
                for path in folder.iterdir():
                    if path.name.startswith(TEMP_PREFIX):
                        path.unlink(missing_ok=True)  # a write a crash interrupted: never acked
                    elif path.suffix == SUFFIX and valid_uid(path.stem):
                        series.instances[path.stem] = path
                        self._bytes += path.stat().st_size
                delivered = folder / DELIVERED_FILE
                if delivered.exists():
                    try:
                        series.delivered = json.loads(delivered.read_text())
                    except (OSError, ValueError):
                        series.delivered = None
                    if series.delivered is not None and delivered.stat().st_mtime < cutoff:
                        self._bytes -= sum(p.stat().st_size for p in series.instances.values())
                        shutil.rmtree(folder, ignore_errors=True)
                        log.info("spool: removed series %s, delivered more than %g days ago",
                                 folder.name, self.keep_days)
                        continue
                if series.instances or series.delivered:
                    self._series[series.key] = series

    def pending(self) -> list[SpooledSeries]:
        """Series with instances never confirmed delivered (oldest first): new series, and
        delivered ones that received other instances since."""
        with self._lock:
            waiting = [s for s in self._series.values() if s.instances and (
                s.delivered is None or set(s.instances) - set(s.delivered.get("instances", [])))]
        return sorted(waiting, key=lambda s: min(p.stat().st_mtime for p in s.instances.values()))

    # --- instances ---------------------------------------------------------------------------

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one instance durably; return its path. Raises :class:`SpoolError`.

        An instance already there with the same bytes is not written again; with other bytes it
        replaces the old one (a corrected image sent again under its UID).
        """
        for what, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                          ("SOPInstanceUID", sop_uid)):
            if not valid_uid(uid):
                raise SpoolError(f"invalid {what} {uid!r}")
        with self._lock:
            series = self._series.get((study_uid, series_uid))
            if series is None:
                folder = self.root / SERIES_DIR / study_uid / series_uid
                series = SpooledSeries(study_uid, series_uid, folder)
            path = series.folder / f"{sop_uid}{SUFFIX}"
            old_size = path.stat().st_size if path.exists() else 0
            if old_size == len(data) and _same_bytes(path, data):
                return path
            if self._bytes - old_size + len(data) > self.max_bytes:
                raise SpoolError(f"the spool holds {self._bytes / 1e9:.2f} GB, its limit is "
                                 f"{self.max_bytes / 1e9:.2f} GB")
            series.folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(series.folder).free
            if free - len(data) < self.min_free_bytes:
                raise SpoolError(f"only {free / 1e9:.2f} GB free on the spool's disk")
            temporary = series.folder / f"{TEMP_PREFIX}{sop_uid}-{threading.get_ident()}"
            try:
                with open(temporary, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temporary, path)
                _fsync_dir(series.folder)
            except OSError as error:
                temporary.unlink(missing_ok=True)
                raise SpoolError(f"cannot write to the spool: {error}") from None
            self._bytes += len(data) - old_size
            series.instances[sop_uid] = path
            self._series[series.key] = series
            return path

    def series(self, study_uid: str, series_uid: str) -> SpooledSeries | None:
        with self._lock:
            return self._series.get((study_uid, series_uid))

    # --- deliveries --------------------------------------------------------------------------

    def mark_delivered(self, study_uid: str, series_uid: str, instances: list[str],
                       sha256: str, folder: str | None) -> None:
        """Record that the receiver confirmed the series (these instances) complete."""
        record = {"instances": sorted(instances), "sha256": sha256, "receiver_folder": folder,
                  "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with self._lock:
            series = self._series.get((study_uid, series_uid))
            if series is None:
                return
            write_json_atomic(series.folder / DELIVERED_FILE, record)
            series.delivered = record

    def delivered_as(self, study_uid: str, series_uid: str) -> dict | None:
        with self._lock:
            series = self._series.get((study_uid, series_uid))
            return None if series is None else series.delivered

    @property
    def bytes(self) -> int:
        return self._bytes

    def key_file(self) -> Path:
        return self.root / KEY_FILE


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
    except OSError:
        return False
