"""The receiver's HTTP(S) listener: TLS, a connection cap and timeouts that slow clients cannot dodge.

aiohttp keeps an idle or half-sent connection open for an hour by default and accepts as many
connections as the process has file descriptors: 200 clients that send their headers a byte at
a time (slowloris) hold 200 descriptors for as long as they like, with no token needed. Here:

* **header timeout**: a connection must deliver a complete request head within
  ``header_timeout`` seconds of opening, or of its previous response (aiohttp's keep-alive
  timer, which runs exactly while no request is being handled); idle keep-alive connections
  end after the same time. The TLS handshake has the same bound.
* **body timeout**: handlers read bodies through :func:`read_body` (``body_timeout``).
* **connection cap**: :class:`GuardedSite` counts open connections and closes new ones beyond
  ``max_connections`` at once (the cap is set below the open-file limit, so the process never
  runs out of descriptors and never floods its log with "Too many open files").
* **TLS**: :func:`shared.tls.server_tls_context` (TLS 1.2 or newer, the certificate chain and
  key given, no system CA loaded).
  Plain HTTP on an address other than loopback is refused unless asked for
  (:func:`check_plain_http`): the bearer token and the DTLS fingerprints would travel in clear.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref

from aiohttp import web

from shared.webrtc.ice import is_loopback

log = logging.getLogger("dlad.receiver")


class PlainHttpRefused(ValueError):
    """Plain HTTP on a non-loopback address without ``--allow-plain-http``."""


def check_plain_http(host: str, tls: bool, allowed: bool) -> None:
    """Refuse to serve signaling in clear text off loopback unless ``allowed``."""
    if tls or allowed or is_loopback(host):
        return
    raise PlainHttpRefused(
        f"refusing plain HTTP on {host}: the bearer token and the session keys' fingerprints "
        "would cross the network in clear. Give --tls-cert/--tls-key, put the receiver behind "
        "a TLS reverse proxy (listen on 127.0.0.1), or pass --allow-plain-http on a network "
        "you trust (docs/OPERATIONS.md)")


async def read_body(request: web.Request, timeout: float) -> bytes:
    """The request body, or 408 if it does not arrive within ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        raise web.HTTPRequestTimeout(text="request body too slow\n") from None


class _CountedProtocol(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection: counted, and closed at once over the cap."""

    __slots__ = ("_inner", "_site", "_refused", "__weakref__")

    def __init__(self, inner: asyncio.Protocol, site: GuardedSite):
        self._inner = inner
        self._site = site
        self._refused = False

    def connection_made(self, transport) -> None:
        site = self._site
        if len(site.connections) > site.max_connections:
            self._refused = True
            site.refused += 1
            if site.refused == 1 or site.refused % 1000 == 0:
                log.warning("more than %d HTTP connections open: new ones are closed at once "
                            "(%d so far)", site.max_connections, site.refused)
            transport.abort()
            return
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            self._inner.data_received(data)

    def eof_received(self):
        return None if self._refused else self._inner.eof_received()

    def connection_lost(self, exc) -> None:
        self._site.connections.discard(self)
        if not self._refused:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self._refused:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if not self._refused:
            self._inner.resume_writing()


class GuardedSite(web.BaseSite):
    """A TCP site (HTTP or HTTPS) that closes connections beyond ``max_connections`` at once.

    Connections are counted from the moment they are accepted (before a TLS handshake) until
    they close; a connection whose TLS handshake fails is dropped by asyncio without a
    ``connection_lost``, so the count is a weak set of the live protocols.
    """

    __slots__ = ("_host", "_port", "max_connections", "connections", "refused",
                 "_handshake_timeout")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_connections: int,
                 handshake_timeout: float, ssl_context: ssl.SSLContext | None = None,
                 backlog: int = 128):
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host, self._port = host, port
        self.max_connections = max_connections
        self.connections: weakref.WeakSet = weakref.WeakSet()
        self.refused = 0
        self._handshake_timeout = handshake_timeout

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    def _protocol(self) -> asyncio.Protocol:
        inner = self._runner.server()
        protocol = _CountedProtocol(inner, self)
        self.connections.add(protocol)
        return protocol

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        extra = {"ssl_handshake_timeout": self._handshake_timeout} if self._ssl_context else {}
        self._server = await loop.create_server(
            self._protocol, self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, reuse_address=True, **extra)
