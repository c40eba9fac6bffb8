"""``dlad-send --watch DIR``: take the DICOM files a scanner exports into a folder.

Many scanners and workstations export a series by writing files into a shared folder. A file
must never be read while it is being written, so a file is taken only when both hold:

1. **it is finished**: the writer closed it (inotify ``IN_CLOSE_WRITE``, or it was renamed into
   the folder, ``IN_MOVED_TO``: the safe temp-then-rename way of writing) and its size and
   modification time have not changed since; or, where inotify says nothing (network shares,
   other systems), its size and modification time have stayed the same for ``settle`` seconds;
2. **it is a whole, usable CT image**: it parses as DICOM, passes the same checks as an image
   pushed over the network (:func:`sender.dicom_node.check_ct_image`) and its pixel data
   decodes (a truncated file fails here even if its writer paused longer than ``settle``).

A file that is finished but not usable is reported once (``not a usable CT image: ...``) and
looked at again only if it changes. Names starting with ``.`` or ending with ``.tmp``,
``.part`` or ``.partial`` are the usual in-progress names and are ignored, as are ``DICOMDIR``
files. Sub-folders are watched too. A file taken goes to the spool (:mod:`sender.spool`), the same
way an instance received over the network does, and then to the series collector; the folder
itself is left as it is (the scanner or the admin owns it), and a file taken is not taken again
unless it changes.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sender.dicom_node import Refusal, check_ct_image, decode_pixels
from sender.series import Arrival, SeriesCollector
from sender.spool import Spool, SpoolError

log = logging.getLogger("dlad.sender")

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")
#: Files taken per look at the folder, at most (the next looks take the rest), so that the
#: collector's clocks go on while a folder of old files is read.
MAX_TAKEN_PER_SCAN = 200


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float
    """``time.monotonic()`` when this size and time were first seen."""
    closed: bool = False
    """inotify said the writer closed it (or it was renamed here) at this size and time."""
    done: bool = False
    """Taken, or reported unusable, at this size and time."""


class FolderWatcher:
    """Watches ``folder`` and hands finished CT images to ``collector`` (module docstring).

    Args:
        folder: the folder to watch (created if missing).
        settle: seconds a file's size and time must stay unchanged when inotify cannot tell.
        poll: seconds between two scans of the folder.
        use_inotify: use inotify when available (Linux, local file systems).
    """

    def __init__(self, folder: Path, spool: Spool, collector: SeriesCollector,
                 settle: float = 2.0, poll: float = 0.25, use_inotify: bool = True):
        if not settle > 0 or not poll > 0:
            raise ValueError("--watch-settle and the poll interval must be > 0 s")
        self.folder = Path(folder)
        self.spool, self.collector = spool, collector
        self.settle, self.poll = settle, poll
        self.use_inotify = use_inotify
        self.seen: dict[str, _Seen] = {}
        self.taken = 0
        self.refused = 0
        self._inotify = None
        self._watches: dict[int, Path] = {}
        self._wakeup = asyncio.Event()

    # --- inotify -----------------------------------------------------------------------------

    def _start_inotify(self) -> None:
        if not self.use_inotify:
            return
        try:
            from inotify_simple import INotify
        except ImportError:
            log.info("watch: inotify_simple is not installed; files are taken when their size "
                     "has not changed for %g s", self.settle)
            return
        try:
            self._inotify = INotify()
        except OSError as error:
            log.info("watch: no inotify (%s); files are taken when their size has not changed "
                     "for %g s", error, self.settle)
            return
        self._add_watch(self.folder)
        asyncio.get_running_loop().add_reader(self._inotify.fileno(), self._on_inotify)

    def _add_watch(self, folder: Path) -> None:
        from inotify_simple import flags

        if self._inotify is None or folder in self._watches.values():
            return
        try:
            descriptor = self._inotify.add_watch(
                folder, flags.CLOSE_WRITE | flags.MOVED_TO | flags.CREATE | flags.ONLYDIR)
        except OSError as error:  # out of watches (fs.inotify.max_user_watches): poll it
            log.debug("watch: no inotify watch on %s: %s", folder, error)
            return
        self._watches[descriptor] = folder

    def _on_inotify(self) -> None:
        from inotify_simple import flags

        for event in self._inotify.read(timeout=0):
            folder = self._watches.get(event.wd)
            if folder is None or not event.name:
                continue
            path = folder / event.name
            if event.mask & flags.ISDIR:
                if event.mask & (flags.CREATE | flags.MOVED_TO):
                    self._add_watch(path)
                continue
            if event.mask & (flags.CLOSE_WRITE | flags.MOVED_TO):
                try:
                    stat = path.stat()
                except OSError:
                    continue
                entry = self.seen.get(str(path))
                if entry is None or (entry.size, entry.mtime_ns) != (stat.st_size,
                                                                     stat.st_mtime_ns):
                    entry = _Seen(stat.st_size, stat.st_mtime_ns, time.monotonic())
                    self.seen[str(path)] = entry
                entry.closed = True
                self._wakeup.set()

    def _stop_inotify(self) -> None:
        if self._inotify is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._inotify.fileno())
            except (RuntimeError, ValueError):
                pass
            self._inotify.close()
            self._inotify = None

    # --- scanning ----------------------------------------------------------------------------

    @staticmethod
    def ignored(name: str) -> bool:
        """In-progress or non-image names the watcher leaves alone."""
        lower = name.lower()
        return name.startswith(".") or lower.endswith(IGNORED_SUFFIXES) or lower == "dicomdir"

    def _files(self):
        stack = [self.folder]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in sorted(entries, key=lambda e: e.name):
                if self.ignored(entry.name):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                        self._add_watch(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        yield entry
                except OSError:
                    continue

    def scan(self) -> list[Path]:
        """One look at the folder: the files finished now and not taken yet."""
        now = time.monotonic()
        ready = []
        present = set()
        for entry in self._files():
            try:
                stat = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            present.add(entry.path)
            seen = self.seen.get(entry.path)
            if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                # New, or still being written: (re)start its clock.
                self.seen[entry.path] = _Seen(stat.st_size, stat.st_mtime_ns, now)
                continue
            if seen.done:
                continue
            if (seen.closed or now - seen.since >= self.settle) and \
                    len(ready) < MAX_TAKEN_PER_SCAN:
                ready.append(Path(entry.path))
        for gone in set(self.seen) - present:
            del self.seen[gone]
        return ready

    def take(self, path: Path) -> bool:
        """Read, check and spool one finished file; True if it was taken."""
        seen = self.seen.get(str(path))
        started = time.thread_time()
        try:
            data = path.read_bytes()
        except OSError as error:
            log.debug("watch: cannot read %s yet: %s", path, error)
            return False
        if seen is not None and len(data) != seen.size:
            seen.closed = False  # changed under us: wait until it settles again
            return False
        try:
            arrival = self._check(path, data)
        except Refusal as refusal:
            self.refused += 1
            if seen is not None:
                seen.done = True
            log.warning("watch: %s is not a usable CT image: %s", path, refusal.reason)
            return False
        except SpoolError as error:
            log.error("watch: cannot spool %s (%s); will try again", path, error)
            return False
        arrival.decode_s = time.thread_time() - started
        if seen is not None:
            seen.done = True
        self.taken += 1
        self.collector.add(arrival)
        return True

    def _check(self, path: Path, data: bytes) -> Arrival:
        import pydicom

        try:
            dataset = pydicom.dcmread(io.BytesIO(data))
        except Exception as error:  # not DICOM, or cut short in its header
            raise Refusal(0, f"not a readable DICOM file ({str(error).strip()[:100]})") from None
        sop_class = str(dataset.get("SOPClassUID", "") or "")
        if sop_class and sop_class != "1.2.840.10008.5.1.4.1.1.2":
            name = getattr(dataset.SOPClassUID, "name", sop_class)
            raise Refusal(0, f"{name}: this sender takes CT Image Storage only")
        check_ct_image(dataset)
        decode_pixels(dataset)
        study, series = str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID)
        room = self.collector.room_for(study, series)
        if room is not None:
            raise SpoolError(room)
        sop = str(dataset.SOPInstanceUID)
        stored = self.spool.store(study, series, sop, data)
        return Arrival(study, series, sop, stored, dataset=dataset, source=str(path))

    async def run(self) -> None:
        """Watch until cancelled. Checking and decoding run in a worker thread."""
        self.folder.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._start_inotify()
        log.info("watching %s for DICOM files (%s, then a DICOM check)", self.folder,
                 "inotify close-write or rename" if self._inotify is not None else
                 f"size unchanged for {self.settle:g} s")
        try:
            while True:
                started = time.monotonic()
                ready = self.scan()
                # A huge folder takes long to list: look less often rather than all the time.
                pause = max(self.poll, 4 * (time.monotonic() - started))
                for path in ready:
                    await loop.run_in_executor(None, self.take, path)
                try:
                    await asyncio.wait_for(self._wakeup.wait(), pause)
                except asyncio.TimeoutError:
                    pass
                self._wakeup.clear()
        finally:
            self._stop_inotify()
