"""Named links to start from; any value can be overridden (``dlad-link --profile wifi-2m --loss 2%``).

The profiles are symmetric. Their queues hold a few bandwidth-delay products (rate x RTT),
as real access links do: enough for a congestion controller to fill the pipe, not so much
that the queueing delay runs away (wifi-2m: 64 kB drain in 256 ms).
"""

from __future__ import annotations

from .params import LinkParams

PROFILES: dict[str, LinkParams] = {
    "wifi-2m": LinkParams(rate=2e6, delay=0.040, queue_bytes=64_000),
    "4g-12m": LinkParams(rate=12e6, delay=0.060, loss=0.01, queue_bytes=512_000),
    "cable-20m": LinkParams(rate=20e6, delay=0.020, queue_bytes=256_000),
    "lan-100m": LinkParams(rate=100e6, delay=0.001, queue_bytes=128_000),
}


def get_profile(name: str) -> LinkParams:
    """Return the named profile, or raise ValueError listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown link profile {name!r} (known: {', '.join(PROFILES)})") from None
