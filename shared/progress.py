"""Progress of long work: a tqdm bar on a terminal, plain lines in a log.

A tqdm bar redraws its line with carriage returns: right on a terminal, a mess in a redirected
log (one line holding hundreds of states). :func:`progress` gives a tqdm bar when its stream is
a terminal and a :class:`LineProgress` otherwise, which prints a plain line when the work
starts, at most every ``interval`` seconds while it goes on, and when it ends::

    dlad-send: diffusion: iteration 0 of 15
    dlad-send: diffusion: iteration 6 of 15 (40 %), 10.2 s
    dlad-send: diffusion: iteration 15 of 15 (100 %), done in 24.8 s

Both take the same calls (the part of tqdm's interface this project uses): iteration,
``update``, ``set_postfix``/``set_postfix_str``, ``write``, ``close`` and ``with``. Given a ``logger``, the
display shows only when that logger is enabled for INFO (the command lines: unless ``--quiet``)
and plain lines go through it, with the program's log format (``dlad-send: ...``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

from tqdm import tqdm

#: Seconds between two plain progress lines: a line every few seconds would drown the log of
#: a long job, one a minute would leave a 30 s step silent.
LINE_INTERVAL_S = 10.0


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", initial: int = 0, disable: bool = False,
             file: TextIO | None = None, logger: logging.Logger | None = None,
             interval: float = LINE_INTERVAL_S):
    """A progress display for ``iterable`` (or for ``update`` calls): tqdm on a terminal,
    plain lines otherwise.

    Args:
        iterable: what to iterate over (its ``len`` is the total when it has one).
        total: the number of steps, if known.
        desc: what is being done (``"diffusion"``).
        unit: one step (``"iteration"``): singular, plain lines say ``iteration 3 of 15``.
        initial: steps already done.
        disable: show nothing.
        file: where a bar, or plain lines without ``logger``, go (default: standard error).
        logger: show only if it is enabled for INFO, and send plain lines through it.
        interval: least seconds between two plain lines.
    """
    file = sys.stderr if file is None else file
    if logger is not None and not logger.isEnabledFor(logging.INFO):
        disable = True
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if _is_terminal(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial,
                    disable=disable, file=file, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial,
                        disable=disable, file=file, logger=logger, interval=interval)


def _is_terminal(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class LineProgress:
    """Progress as plain lines: at the start, every ``interval`` seconds, at the end."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None,
                 desc: str = "", unit: str = "it", initial: int = 0, disable: bool = False,
                 file: TextIO | None = None, logger: logging.Logger | None = None,
                 interval: float = LINE_INTERVAL_S, clock=time.monotonic) -> None:
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.disable = disable
        self.file = sys.stderr if file is None else file
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._started = self._last_line = clock()
        self._postfix = ""
        self._closed = False
        self._print(self._state())

    def _state(self) -> str:
        where = f"{self.unit} {self.n}" + (f" of {self.total}" if self.total is not None else "")
        head = f"{self.desc}: {where}" if self.desc else where
        if self.total and self.n:
            head += f" ({100 * self.n / self.total:.0f} %)"
        return head + (f", {self._postfix}" if self._postfix else "")

    def _print(self, text: str) -> None:
        if self.disable:
            return
        if self.logger is not None:
            self.logger.info("%s", text)
        else:
            print(text, file=self.file, flush=True)

    def update(self, n: int = 1) -> None:
        """``n`` more steps done; a line if the last one is ``interval`` seconds old."""
        self.n += n
        now = self._clock()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._print(f"{self._state()}, {now - self._started:.1f} s")

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        """Text shown after the count (on the next line printed)."""
        self._postfix = text

    def set_postfix(self, refresh: bool = True, **values) -> None:
        """``name=value`` pairs shown after the count (on the next line printed)."""
        self._postfix = ", ".join(f"{name}={value}" for name, value in values.items())

    def write(self, text: str, file: TextIO | None = None) -> None:
        """Print a message (tqdm's ``write``: here just a line)."""
        print(text, file=self.file if file is None else file, flush=True)

    def close(self, outcome: str = "done in") -> None:
        """The closing line (once)."""
        if not self._closed:
            self._closed = True
            self._print(f"{self._state()}, {outcome} {self._clock() - self._started:.1f} s")

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self.close("done in" if exc_type is None else "stopped after")
