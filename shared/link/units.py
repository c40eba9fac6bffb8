"""The quantities dlad-link reads from people: rates, durations, sizes and probabilities.

Every parser raises :class:`ValueError` with a message that names the bad text and shows
what would have worked, so that the command line can print it as it is.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"^\s*(?P<value>[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(?P<unit>[a-z/%]*)\s*$", re.I)

#: Decimal rate units, all in bits: kbps and Mbps mean bits here, as in networking, not tc's bytes.
_RATE_UNITS = {
    "bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9,
    "bps": 1.0, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9,
}
_DURATION_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
#: Byte units as tc spells them: a lowercase b still means bytes, kb is 1000 bytes, kib 1024.
_BYTE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "kib": 1024, "mib": 1024**2}
_PACKET_UNITS = {"p", "pkt", "pkts", "packet", "packets"}
_UNLIMITED = {"unlimited", "inf", "none"}


def _split(text: str, what: str, example: str) -> tuple[float, str]:
    match = _NUMBER.match(text)
    if match is None:
        raise ValueError(f"invalid {what} {text!r} (use e.g. {example})")
    return float(match["value"]), match["unit"].lower()


def parse_rate(text: str) -> float | None:
    """Return a rate in bits per second, or None for ``unlimited``."""
    if text.strip().lower() in _UNLIMITED:
        return None
    example = "2mbit, 500kbit, 12Mbps or unlimited"
    value, unit = _split(text, "rate", example)
    factor = _RATE_UNITS.get(unit.removesuffix("/s"))
    if factor is None or value <= 0:
        raise ValueError(f"invalid rate {text!r} (use e.g. {example})")
    return value * factor


def parse_duration(text: str) -> float:
    """Return a duration in seconds; a unit is required except for zero."""
    example = "40ms, 0.5s or 200us"
    value, unit = _split(text, "duration", example)
    if unit == "" and value == 0:
        return 0.0
    if unit not in _DURATION_UNITS:
        raise ValueError(f"invalid duration {text!r} (use e.g. {example})")
    return value * _DURATION_UNITS[unit]


def parse_probability(text: str) -> float:
    """Return a probability from ``1%`` or ``0.01``."""
    example = "1% or 0.01"
    value, unit = _split(text, "probability", example)
    if unit == "%":
        value /= 100
    elif unit != "":
        raise ValueError(f"invalid probability {text!r} (use e.g. {example})")
    if value > 1:
        raise ValueError(f"invalid probability {text!r}: above 100% (use e.g. {example})")
    return value


def parse_bytes(text: str) -> int:
    """Return a size in bytes from ``1500``, ``1500B``, ``100kB`` or ``64KiB``."""
    example = "1500B, 100kB or 64KiB"
    value, unit = _split(text, "size", example)
    factor = 1 if unit == "" else _BYTE_UNITS.get(unit)
    if factor is None:
        raise ValueError(f"invalid size {text!r} (use e.g. {example})")
    return round(value * factor)


def parse_queue(text: str) -> tuple[int | None, int | None]:
    """Return a queue limit as ``(bytes, packets)``, one of them set, or both None for unlimited."""
    if text.strip().lower() in _UNLIMITED:
        return None, None
    example = "100kB, 64KiB, 50p or unlimited"
    value, unit = _split(text, "queue limit", example)
    if unit in _PACKET_UNITS:
        if value != int(value) or value < 1:
            raise ValueError(f"invalid queue limit {text!r}: a whole number of packets is needed")
        return None, int(value)
    if unit not in _BYTE_UNITS:
        raise ValueError(f"invalid queue limit {text!r} (use e.g. {example})")
    size = round(value * _BYTE_UNITS[unit])
    if size < 1:
        raise ValueError(f"invalid queue limit {text!r}: it must hold at least one byte")
    return size, None


def format_rate(bits_per_second: float | None) -> str:
    """Return a rate as people read it, e.g. ``1.98 Mbit/s``."""
    if bits_per_second is None:
        return "unlimited"
    for factor, unit in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if bits_per_second >= factor:
            return f"{bits_per_second / factor:.3g} {unit}"
    return f"{bits_per_second:.0f} bit/s"


def format_bytes(size: float) -> str:
    """Return a byte count as people read it, e.g. ``1.2 MB``."""
    for factor, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if size >= factor:
            return f"{size / factor:.3g} {unit}"
    return f"{size:.0f} B"
