"""An HTTP signaling proxy that puts the WebRTC sessions it sets up behind emulated links.

The sender POSTs its offer to the proxy instead of the receiver (WHIP-style). The proxy
forwards the request and, when the receiver answers with an SDP, opens one :class:`LinkRelay`
per usable receiver candidate and rewrites the answer so the candidates point at the relays.
The sender's ICE then only knows the relays, and every packet of the session crosses the link.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from shared.tls import client_tls_context

from .params import LinkParams
from .profiles import get_profile
from .relay import LinkRelay, RelayStats
from .sdp import is_relayable, rewrite_sdp_candidates, sdp_candidates, strip_sdp_candidates

logger = logging.getLogger("dlad.link")

Address = tuple[str, int]

#: Headers that describe one HTTP hop, or the body as it was encoded on it, rather than the message.
_HOP_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "content-encoding",
})
_SIGNALING_TIMEOUT = aiohttp.ClientTimeout(total=30)


class _NoRelayableCandidate(Exception):
    """The answer lists no candidate a relay could stand in for."""


def _find_sdp(headers, body: bytes) -> tuple[str, Callable[[str], bytes]] | None:
    """Return the SDP a message carries and how to re-encode the message around a new one."""
    content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return None
    if content_type == "application/sdp":
        return text, str.encode
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            document = json.loads(text)
        except ValueError:
            return None
        if isinstance(document, dict) and isinstance(document.get("sdp"), str):
            return document["sdp"], lambda sdp: json.dumps({**document, "sdp": sdp}).encode()
    return None


def _end_to_end(headers) -> CIMultiDict:
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in _HOP_HEADERS)


class SignalingProxy:
    """Forwards HTTP signaling to `target_url`'s server and relays the sessions it answers.

    Every request (any method, path, query, headers including Authorization, body) goes to the
    same path on the target. On a 2xx answer to a POST that carries an SDP (``application/sdp``,
    or JSON with an ``"sdp"`` field), the proxy relays each IPv4 UDP candidate of the answer
    (see :func:`is_relayable`), drops the others, and returns the rewritten answer; it also
    strips the candidates from the offer it forwards (see :func:`strip_sdp_candidates`). A
    ``Location`` header names the session: a successful DELETE of it stops its relays.
    `downlink` defaults to `uplink`. An ``https`` target's certificate is checked against the
    system's store or `ca_file`; the proxy itself serves plain HTTP (meant for loopback: a
    sender refuses ``http://`` to another host without ``--allow-plain-http``).
    """

    def __init__(
        self,
        target_url: str,
        uplink: LinkParams,
        downlink: LinkParams | None = None,
        *,
        listen: Address = ("127.0.0.1", 0),
        relay_host: str = "127.0.0.1",
        seed: int | str | None = None,
        ca_file: str | None = None,
    ) -> None:
        target = urlsplit(target_url)
        if target.scheme not in ("http", "https") or not target.hostname:
            raise ValueError(f"the signaling URL must be http(s)://HOST[:PORT][/PATH], not {target_url!r}")
        self._ssl: ssl.SSLContext | bool = True
        if target.scheme == "https":
            self._ssl = client_tls_context(ca_file)
        self.target_url = target_url
        self._target_origin = f"{target.scheme}://{target.netloc}"
        self.uplink_params = uplink
        self.downlink_params = uplink if downlink is None else downlink
        self._listen = listen
        self._relay_host = relay_host
        self._seed = seed
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._origin = ""
        self._relays: list[LinkRelay] = []
        # Relays by the path of the session resource the receiver named in its Location header.
        self._sessions: dict[str, list[LinkRelay]] = {}

    @property
    def url(self) -> str:
        """The proxy's origin, ``http://HOST:PORT``; known once started."""
        if not self._origin:
            raise RuntimeError("the proxy is not started")
        return self._origin

    def proxied_url(self, target_url: str) -> str:
        """`target_url`, a URL on the target server, as reached through the proxy."""
        parts = urlsplit(target_url)
        return urlunsplit(urlsplit(self.url)[:2] + parts[2:])

    @property
    def relays(self) -> list[LinkRelay]:
        """Every relay opened so far, stopped ones included."""
        return list(self._relays)

    @property
    def stats(self) -> RelayStats:
        """Counters of all relays added up."""
        return sum((relay.stats for relay in self._relays), RelayStats())

    async def start(self) -> None:
        """Start serving on `listen`."""
        self._client = aiohttp.ClientSession(timeout=_SIGNALING_TIMEOUT)
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, *self._listen).start()
        except OSError:
            await self.stop()
            raise
        host, port = self._runner.addresses[0][:2]
        self._origin = f"http://{host}:{port}"
        logger.info("signaling proxy %s -> %s", self._origin, self._target_origin)

    async def stop(self) -> None:
        """Stop serving and stop every relay."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()
        for relay in self._relays:
            await relay.stop()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        offer = _find_sdp(request.headers, body) if request.method == "POST" else None
        if offer is not None:
            sdp, encode = offer
            body = encode(strip_sdp_candidates(sdp))
        try:
            async with self._client.request(
                request.method, self._target_origin + request.raw_path, headers=_end_to_end(request.headers),
                data=body or None, allow_redirects=False, ssl=self._ssl,
            ) as response:
                answer_body = await response.read()
                status, reason, headers = response.status, response.reason, _end_to_end(response.headers)
                resource = urljoin(str(response.url), headers["Location"]) if "Location" in headers else None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return web.Response(status=502, text=f"dlad-link: {self.target_url} did not answer: {exc!r}\n")

        success = 200 <= status < 300
        answer = _find_sdp(headers, answer_body) if success and offer is not None else None
        if answer is not None:
            sdp, encode = answer
            try:
                relays = await self._open_relays(sdp)
            except (_NoRelayableCandidate, OSError) as exc:
                return web.Response(status=502, text=f"dlad-link: cannot relay the answer: {exc}\n")
            answer_body = encode(rewrite_sdp_candidates(sdp, {relay.upstream: relay.address for relay in relays}))
            if resource is not None:
                self._sessions[urlsplit(resource).path] = relays
        if request.method == "DELETE" and success:
            for relay in self._sessions.pop(request.path, []):
                await relay.stop()
        location = headers.get("Location", "")
        if location.startswith(self._target_origin + "/"):
            headers["Location"] = self._origin + location[len(self._target_origin):]
        return web.Response(status=status, reason=reason, headers=headers, body=answer_body)

    async def _open_relays(self, sdp: str) -> list[LinkRelay]:
        upstreams = list(dict.fromkeys(
            (candidate.host, candidate.port) for candidate in sdp_candidates(sdp) if is_relayable(candidate)))
        if not upstreams:
            raise _NoRelayableCandidate("the answer lists no IPv4 UDP host candidate")
        relays = []
        for upstream in upstreams:
            seed = None if self._seed is None else f"{self._seed}/relay{len(self._relays)}"
            relay = LinkRelay(upstream, self.uplink_params, self.downlink_params,
                              listen=(self._relay_host, 0), seed=seed)
            self._relays.append(relay)
            await relay.start()
            relays.append(relay)
        return relays


async def run_behind_link(
    receiver_url: str,
    params: LinkParams | str,
    listen: Address = ("127.0.0.1", 0),
    *,
    downlink: LinkParams | str | None = None,
    seed: int | str | None = None,
    ca_file: str | None = None,
) -> tuple[str, SignalingProxy]:
    """Put a receiver's signaling URL behind an emulated link.

    `params` is the link (a :class:`LinkParams` or a profile name such as ``"wifi-2m"``),
    for both directions unless `downlink` is given. Returns the URL the sender should use in
    place of `receiver_url` (same path, the proxy's host and port) and the started proxy,
    which the caller stops with ``await proxy.stop()``. `ca_file` checks an ``https``
    receiver's certificate (default: the system's store).
    """
    uplink = get_profile(params) if isinstance(params, str) else params
    if isinstance(downlink, str):
        downlink = get_profile(downlink)
    proxy = SignalingProxy(receiver_url, uplink, downlink, listen=listen, seed=seed, ca_file=ca_file)
    await proxy.start()
    return proxy.proxied_url(receiver_url), proxy
