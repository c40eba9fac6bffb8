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


# --- STUN / TURN servers ---------------------------------------------------------------------

ICE_SCHEMES = ("stun", "turn", "turns")


class IceConfigError(ValueError):
    """An ``--ice-server`` URL or its credentials file cannot be used."""


def read_ice_credentials(path) -> tuple[str, str]:
    """``(username, password)`` from a file holding one ``USERNAME:PASSWORD`` line.

    The password may contain ``:``; surrounding whitespace is stripped. Like the token file it
    should be readable by its owner only.
    """
    from pathlib import Path

    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise IceConfigError(f"cannot read ICE credentials file {path}: {error}") from None
    username, sep, password = text.partition(":")
    if not sep or not username or not password or "\n" in text:
        raise IceConfigError(f"ICE credentials file {path} must hold one USERNAME:PASSWORD line")
    return username, password


def ice_servers(urls: list[str] | None, credentials_file=None) -> list:
    """aiortc ``RTCIceServer`` objects for ``--ice-server`` URLs (and ``--ice-credentials``).

    ``stun:HOST[:PORT]``, ``turn:HOST[:PORT][?transport=udp|tcp]`` and ``turns:HOST[:PORT]``
    (TURN over TLS; the server's certificate is checked against the system's store). TURN URLs
    need credentials. aiortc uses the first STUN and the first TURN server it is given.
    """
    from aiortc import RTCIceServer
    from aiortc.rtcicetransport import parse_stun_turn_uri

    servers = []
    credentials = None
    for url in urls or []:
        scheme = url.partition(":")[0].lower()
        if scheme not in ICE_SCHEMES:
            raise IceConfigError(f"--ice-server {url!r}: the URL must start with stun:, turn: "
                                 "or turns:")
        try:
            parse_stun_turn_uri(url)
        except ValueError as error:
            raise IceConfigError(f"--ice-server {url!r}: {error}") from None
        if scheme == "stun":
            servers.append(RTCIceServer(urls=url))
            continue
        if credentials_file is None:
            raise IceConfigError(f"--ice-server {url!r}: a TURN server needs --ice-credentials")
        if credentials is None:
            credentials = read_ice_credentials(credentials_file)
        servers.append(RTCIceServer(urls=url, username=credentials[0],
                                    credential=credentials[1]))
    return servers


# --- the remote candidates a receiver accepts --------------------------------------------------

class CandidateError(ValueError):
    """An offer whose ICE candidates the receiver will not probe."""


def screen_candidates(sdp: str, allow: tuple | None, limit: int) -> tuple[str, int]:
    """The offer without the candidates the receiver must not probe; and how many were dropped.

    Every ``a=candidate`` line counts against ``limit`` (an offer with more is refused: each
    candidate costs a pair of STUN checks, retransmitted up to 7 times). With ``allow`` (a tuple
    of ``ipaddress`` networks), candidates whose address is not inside one of them are removed,
    names (mDNS ``.local`` and others) included: the receiver sends no packet to an address the
    administrator did not allow. Raises :class:`CandidateError` when the offer lists more than
    ``limit`` candidates, or when ``allow`` leaves none.
    """
    lines = sdp.splitlines(keepends=True)
    candidates = [line for line in lines if line.startswith("a=candidate:")]
    if len(candidates) > limit:
        raise CandidateError(f"the offer lists {len(candidates)} ICE candidates, more than "
                             f"this receiver probes ({limit})")
    if allow is None:
        return sdp, 0
    kept, dropped = [], 0
    for line in lines:
        if line.startswith("a=candidate:"):
            fields = line.split()
            try:
                address = ipaddress.ip_address(fields[4].strip("[]"))
            except (IndexError, ValueError):
                address = None
            if address is None or not any(address in network for network in allow):
                dropped += 1
                continue
        kept.append(line)
    if candidates and dropped == len(candidates):
        raise CandidateError("none of the offer's ICE candidates is in --allow-peers")
    return "".join(kept), dropped


def selected_pair(pc) -> str | None:
    """The candidate pair a peer connection's ICE nominated, in words (None if unknown).

    ``"relay 10.0.0.1:49170 -> host 10.0.0.2:40211"``: says whether the media goes through a
    TURN relay, which an administrator wants to know.
    """
    try:
        connection = pc.sctp.transport.transport.iceGatherer._connection
        pair = next(iter(connection._nominated.values()))
    except (AttributeError, StopIteration):
        return None
    local, remote = pair.local_candidate, pair.remote_candidate
    return (f"{local.type} {local.host}:{local.port} -> {remote.type} "
            f"{remote.host}:{remote.port}")
