"""A UDP relay that carries datagrams between clients and one upstream address over an emulated link."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field

from .emulator import DirectionStats, EmulatedLink
from .params import LinkParams

logger = logging.getLogger("dlad.link")

Address = tuple[str, int]

#: Receive buffer asked of the kernel for every relay socket (it caps the request at
#: net.core.rmem_max). A burst that fills the default buffer while the event loop is busy
#: would be lost before the emulated queue, which is the one that should decide.
_RECEIVE_BUFFER = 4 * 1024 * 1024


def _enlarge_receive_buffer(transport: asyncio.BaseTransport) -> None:
    try:
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
    except OSError:
        pass  # The default buffer still works; it absorbs shorter stalls only.


@dataclass
class RelayStats:
    """Counters of both directions of a relay (or of several relays added up with ``+``)."""

    uplink: DirectionStats = field(default_factory=DirectionStats)
    "Client to upstream, i.e. sender to receiver."
    downlink: DirectionStats = field(default_factory=DirectionStats)
    "Upstream to client, i.e. receiver to sender."

    def __add__(self, other: RelayStats) -> RelayStats:
        return RelayStats(self.uplink + other.uplink, self.downlink + other.downlink)


class _ListenProtocol(asyncio.DatagramProtocol):
    """The relay's public socket, where clients send."""

    def __init__(self, relay: LinkRelay) -> None:
        self._relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _enlarge_receive_buffer(transport)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self._relay._from_client(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # A client that went away answers with ICMP errors; ICE handles the loss itself.
        logger.debug("relay socket error: %s", exc)


class _UpstreamSession(asyncio.DatagramProtocol):
    """The socket that speaks to the upstream for one client, so the upstream sees one source per client."""

    def __init__(self, relay: LinkRelay, client: Address) -> None:
        self._relay = relay
        self.client = client
        self._transport: asyncio.DatagramTransport | None = None
        self._waiting: list[bytes] = []  # What the link delivered before the socket was open.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        _enlarge_receive_buffer(transport)
        for data in self._waiting:
            self._transport.sendto(data)
        self._waiting.clear()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self._relay._from_upstream(self, data)

    def error_received(self, exc: Exception) -> None:
        logger.debug("upstream socket of %s: %s", self.client, exc)

    def send(self, data: bytes) -> None:
        """Send a datagram to the upstream."""
        if self._transport is None:
            self._waiting.append(data)
        else:
            self._transport.sendto(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class LinkRelay:
    """Relays UDP between clients and `upstream` through an emulated link, one :class:`LinkParams` per direction.

    The relay listens on `listen` (loopback by default) and learns each client from its first
    datagram. Every client gets its own socket towards the upstream, so the upstream sees
    distinct sources, and its answers go back to that client. All clients share the link of
    each direction, as hosts behind one access link do. `downlink` defaults to `uplink`.
    """

    def __init__(
        self,
        upstream: Address,
        uplink: LinkParams,
        downlink: LinkParams | None = None,
        *,
        listen: Address = ("127.0.0.1", 0),
        seed: int | str | None = None,
        max_clients: int = 16,
    ) -> None:
        self.upstream = upstream
        self.uplink_params = uplink
        self.downlink_params = uplink if downlink is None else downlink
        self._listen = listen
        self._seed = seed
        self._max_clients = max_clients
        self._transport: asyncio.DatagramTransport | None = None
        self._uplink: EmulatedLink | None = None
        self._downlink: EmulatedLink | None = None
        self._sessions: dict[Address, _UpstreamSession] = {}
        self._opening: set[asyncio.Task] = set()

    @property
    def address(self) -> Address:
        """Where clients send to; the port is known once started."""
        if self._transport is None:
            raise RuntimeError("the relay is not started")
        host, port = self._transport.get_extra_info("sockname")[:2]
        return host, port

    @property
    def clients(self) -> list[Address]:
        """Client addresses seen so far."""
        return list(self._sessions)

    @property
    def stats(self) -> RelayStats:
        """Counters of both directions so far."""
        if self._uplink is None or self._downlink is None:
            return RelayStats()
        return RelayStats(self._uplink.stats, self._downlink.stats)

    async def start(self) -> None:
        """Open the listening socket; the link's clock starts now."""
        seed = self._seed
        self._uplink = EmulatedLink(self.uplink_params, seed=None if seed is None else f"{seed}/up")
        self._downlink = EmulatedLink(self.downlink_params, seed=None if seed is None else f"{seed}/down")
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _ListenProtocol(self), local_addr=self._listen)
        logger.info("relay %s:%d -> %s:%d", *self.address, *self.upstream)

    async def stop(self) -> None:
        """Close every socket; datagrams still on the link are discarded. The stats remain."""
        for task in self._opening:
            task.cancel()
        await asyncio.gather(*self._opening, return_exceptions=True)
        for link in (self._uplink, self._downlink):
            if link is not None:
                link.close()
        for session in self._sessions.values():
            session.close()
        if self._transport is not None:
            self._transport.close()
        # Let the transports' connection_lost callbacks run, which release the sockets.
        await asyncio.sleep(0)

    def _from_client(self, data: bytes, client: Address) -> None:
        session = self._sessions.get(client)
        if session is None:
            if len(self._sessions) >= self._max_clients:
                logger.debug("relay %s:%d: ignoring client %s beyond %d clients",
                             *self.address, client, self._max_clients)
                return
            session = self._open_session(client)
        self._uplink.send(data, session.send)

    def _from_upstream(self, session: _UpstreamSession, data: bytes) -> None:
        self._downlink.send(data, lambda delivered: self._transport.sendto(delivered, session.client))

    def _open_session(self, client: Address) -> _UpstreamSession:
        session = _UpstreamSession(self, client)
        self._sessions[client] = session
        # Opening the socket is a coroutine; the session holds what the link delivers meanwhile.
        task = asyncio.get_running_loop().create_task(self._connect(session))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)
        logger.info("relay %s:%d: new client %s:%d", *self.address, *client)
        return session

    async def _connect(self, session: _UpstreamSession) -> None:
        try:
            await asyncio.get_running_loop().create_datagram_endpoint(lambda: session, remote_addr=self.upstream)
        except OSError as exc:
            logger.warning("relay %s:%d: cannot open a socket to %s:%d: %s",
                           *self.address, *self.upstream, exc)
            # Forget the client, so that its next datagram tries again.
            del self._sessions[session.client]
