"""Log lines that a peer cannot forge or flood: sanitised text and rate-limited records.

Both peers log text that came from the other side: study ids, chunk fields, error reasons,
URL paths. :func:`printable` escapes every control, line-separator and bidirectional-override
character in it, so a study id ``"x\\n12:00:00 study y: SHA-256 verified"`` shows up as one
line with a visible ``\\n`` instead of a forged second line. :class:`SafeFormatter` applies it
to every record's message (a traceback appended by ``log.exception`` keeps its own lines).

A peer that makes the receiver log the same warning in a loop (garbage frames, refused
requests) must not fill the disk: :class:`RateLimitFilter` lets each kind of line (logger,
level and message template) through in bursts of :data:`BURST` and then at most one per
:data:`REFILL_S` seconds, and tells how many were suppressed when the next one passes.

>>> printable("study\\nforged line")
'study\\\\nforged line'
>>> printable("a" * 10, limit=4)
'aaaa...(10 chars)'
"""

from __future__ import annotations

import logging
import threading
import time
import unicodedata

#: Lines of one kind let through at once before rate limiting starts (a burst of warnings
#: about one bad sender stays readable in full).
BURST = 20

#: Then one more line of that kind per this many seconds, at most.
REFILL_S = 1.0

#: Longest piece of peer text shown in a log line (a study id is at most 128 characters).
MAX_TEXT = 300

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text, limit: int | None = MAX_TEXT) -> str:
    """``text`` with every character that could break or fake a log line escaped.

    Control characters (C0, C1, DEL), line and paragraph separators and bidirectional
    formatting characters (which can reorder what a terminal shows) become ``\\n``, ``\\xNN``
    or ``\\uNNNN``; the result is cut to ``limit`` characters with a note of the full length.
    """
    text = str(text)
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char.isprintable() or char == " ":
            if unicodedata.category(char) == "Cf":  # format characters: bidi overrides, ZW*
                out.append(f"\\u{ord(char):04x}")
            else:
                out.append(char)
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    result = "".join(out)
    if limit is not None and len(result) > limit:
        result = f"{result[:limit]}...({len(text)} chars)"
    return result


class SafeFormatter(logging.Formatter):
    """A formatter whose message part is passed through :func:`printable` (no length cut).

    The message is sanitised after the arguments are merged into it, so every argument a
    peer controls is covered wherever it is logged; the exception text of ``log.exception``
    is added afterwards with its line breaks.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        original = record.message
        record.message = printable(original, limit=4 * MAX_TEXT)
        try:
            return super().formatMessage(record)
        finally:
            record.message = original


class RateLimitFilter(logging.Filter):
    """Token bucket per kind of line: ``BURST`` at once, then one per ``REFILL_S`` seconds.

    A kind is (logger name, level, message template), so "session %s: bad frame" from a flood
    is limited as one kind while other messages pass. When a line passes after some of its
    kind were dropped, " [N similar lines suppressed]" is appended to it. Records at
    ``CRITICAL`` always pass.
    """

    def __init__(self, burst: int = BURST, refill_s: float = REFILL_S, clock=time.monotonic,
                 max_kinds: int = 4096):
        super().__init__()
        self.burst, self.refill_s, self.clock = burst, refill_s, clock
        self.max_kinds = max_kinds
        self._buckets: dict[tuple, list] = {}  # kind -> [tokens, last refill, suppressed]
        self._lock = threading.Lock()
        self.suppressed = 0
        """Lines dropped so far (all kinds)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL:
            return True
        kind = (record.name, record.levelno, str(record.msg)[:200])
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(kind)
            if bucket is None:
                if len(self._buckets) >= self.max_kinds:  # a flood of distinct templates
                    self._buckets.clear()
                bucket = self._buckets[kind] = [float(self.burst), now, 0]
            tokens = min(self.burst, bucket[0] + (now - bucket[1]) / self.refill_s)
            bucket[1] = now
            if tokens < 1:
                bucket[0] = tokens
                bucket[2] += 1
                self.suppressed += 1
                return False
            bucket[0] = tokens - 1
            dropped, bucket[2] = bucket[2], 0
        if dropped:
            record.msg = f"{record.msg} [{dropped} similar lines suppressed]"
        return True


def configure(prefix: str, level: int, rate_limit: bool = True, times: bool = True
              ) -> logging.Handler:
    """Root logging for a command: one stderr handler, sanitised and (optionally) rate-limited.

    Returns the handler. ``prefix`` starts every line (``"dlad-receive: "``), then the time
    when ``times``.
    """
    handler = logging.StreamHandler()
    layout = f"{prefix}%(asctime)s %(message)s" if times else f"{prefix}%(message)s"
    handler.setFormatter(SafeFormatter(layout, datefmt="%H:%M:%S"))
    if rate_limit:
        handler.addFilter(RateLimitFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
