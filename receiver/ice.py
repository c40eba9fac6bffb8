"""Which local addresses a peer connection offers as ICE host candidates.

aioice offers every interface address except 127.0.0.1. When signaling runs on loopback (the
receiver listens on 127.0.0.1, the sender talks to http://127.0.0.1:...), dlad keeps the
media on loopback too: it gathers on 127.0.0.1 only. The choice is held in a context variable
that wraps aioice's address lookup, so it applies to the peer connections set up by the task
that chose it and to nothing else in the process.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress

import aioice.ice

_HOSTS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "dlad_ice_hosts", default=None)
_original = aioice.ice.get_host_addresses


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    hosts = _HOSTS.get()
    if hosts is None:
        return _original(use_ipv4, use_ipv6)
    return [h for h in hosts if (":" in h and use_ipv6) or (":" not in h and use_ipv4)]


if getattr(aioice.ice.get_host_addresses, "__name__", "") != "_get_host_addresses":
    aioice.ice.get_host_addresses = _get_host_addresses


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (name or address) is this machine's loopback."""
    if not host:
        return False
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def ice_hosts(hosts: tuple[str, ...] | None):
    """Within the block (this task), gather host candidates on ``hosts`` only (None: all)."""
    token = _HOSTS.set(tuple(hosts) if hosts is not None else None)
    try:
        yield
    finally:
        _HOSTS.reset(token)


def loopback_hosts_for(host: str | None) -> tuple[str, ...] | None:
    """``("127.0.0.1",)`` (or ``("::1",)``) when ``host`` is loopback, else None (all)."""
    if not is_loopback(host):
        return None
    return ("::1",) if ":" in (host or "") else ("127.0.0.1",)
