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


#: Socket buffer asked for the peer connection's UDP sockets. The default (about 200 KiB of
#: kernel memory, some 90 datagrams) overflows on loopback whenever the receiving process is
#: briefly busy, and each loss costs SCTP a retransmission timeout (at least 1 s).
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


def enlarge_socket_buffers(pc, size: int = SOCKET_BUFFER_BYTES) -> int:
    """Ask for ``size``-byte send/receive buffers on ``pc``'s ICE sockets (best effort).

    Call after ``setLocalDescription`` (the sockets exist once candidates are gathered). The
    kernel caps the size at net.core.rmem_max / wmem_max. Returns the sockets changed.
    """
    import socket

    changed = 0
    try:
        connection = pc.sctp.transport.transport.iceGatherer._connection
        protocols = list(connection._protocols)
    except AttributeError:  # another aiortc layout: keep the defaults
        return 0
    for protocol in protocols:
        sock = getattr(getattr(protocol, "transport", None), "get_extra_info", lambda _: None)(
            "socket")
        if sock is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            changed += 1
        except OSError:
            pass
    return changed
