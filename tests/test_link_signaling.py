"""The signaling proxy: forwarding, answer rewriting, relays per session, errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import aiohttp
import pytest
from aiohttp import web

from shared.link import LinkParams, SignalingProxy, run_behind_link, sdp_candidates

OFFER = "\r\n".join([
    "v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0",
    "m=application 40000 UDP/DTLS/SCTP webrtc-datachannel", "c=IN IP4 192.0.2.2",
    "a=candidate:1 1 udp 2130706431 192.0.2.2 40000 typ host",
    "a=end-of-candidates", "a=ice-ufrag:offr", "a=ice-pwd:0123456789abcdefghijkl", "",
])


def answer_sdp(port: int) -> str:
    return "\r\n".join([
        "v=0", "o=- 2 2 IN IP4 0.0.0.0", "s=-", "t=0 0",
        f"m=application {port} UDP/DTLS/SCTP webrtc-datachannel", "c=IN IP4 127.0.0.1",
        f"a=candidate:1 1 udp 2130706431 127.0.0.1 {port} typ host",
        f"a=candidate:2 1 udp 2130706431 fd00::2 {port + 1} typ host",
        f"a=candidate:3 1 udp 2130706431 0d6f0c1e-1111-2222-3333-444455556666.local {port + 2} typ host",
        "a=end-of-candidates", "a=ice-ufrag:answ", "a=ice-pwd:abcdefghijkl0123456789", "",
    ])


def run(coroutine, timeout: float = 10.0):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


class Echo(asyncio.DatagramProtocol):
    """Stands in for the receiver's ICE socket."""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        self.transport.sendto(data, addr)


class Client(asyncio.DatagramProtocol):
    """Stands in for the sender's ICE socket."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        self.received.put_nowait(data)

    async def round_trip(self, to, data: bytes, timeout: float = 1.0) -> bytes | None:
        self.transport.sendto(data, to)
        try:
            return await asyncio.wait_for(self.received.get(), timeout)
        except asyncio.TimeoutError:
            return None


class FakeReceiver:
    """A tiny signaling server that answers offers with an SDP whose 127.0.0.1 candidate is an echo socket."""

    def __init__(self, echo_port: int) -> None:
        self.echo_port = echo_port
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{path:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.method, request.path_qs, dict(request.headers), body))
        if request.headers.get("Authorization") != "Bearer secret":
            return web.Response(status=401, text="who are you?")
        if request.method == "POST" and request.path == "/whip":
            return web.Response(status=201, text=answer_sdp(self.echo_port), content_type="application/sdp",
                                headers={"Location": "/whip/session-1", "ETag": "x1"})
        if request.method == "POST" and request.path == "/offer":
            return web.json_response({"type": "answer", "sdp": answer_sdp(self.echo_port)},
                                     headers={"Location": f"{request.url.origin()}/offer/session-2"})
        if request.method == "POST" and request.path == "/ipv6-only":
            sdp = "\r\n".join(line for line in answer_sdp(self.echo_port).split("\r\n") if "127.0.0.1 " not in line)
            return web.Response(text=sdp, content_type="application/sdp")
        if request.method == "GET":
            return web.json_response({"query": request.query_string, "custom": request.headers.get("X-Custom")})
        return web.Response(status=204)


@contextlib.asynccontextmanager
async def proxied_receiver():
    """A fake receiver with its echo socket, behind a started proxy; yields (receiver, proxy)."""
    loop = asyncio.get_running_loop()
    echo_transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    receiver = FakeReceiver(echo_transport.get_extra_info("sockname")[1])
    runner = web.AppRunner(receiver.app)
    await runner.setup()
    proxy = None
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        proxy = SignalingProxy(f"http://127.0.0.1:{runner.addresses[0][1]}", LinkParams(delay=0.005), seed=1)
        await proxy.start()
        yield receiver, proxy
    finally:
        if proxy is not None:
            await proxy.stop()
        await runner.cleanup()
        echo_transport.close()


@contextlib.asynccontextmanager
async def client_socket():
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(Client, local_addr=("127.0.0.1", 0))
    try:
        yield client
    finally:
        transport.close()


def test_offer_is_forwarded_with_authorization_and_answer_points_at_a_working_relay():
    async def scenario():
        async with proxied_receiver() as (receiver, proxy), aiohttp.ClientSession() as http, client_socket() as client:
            async with http.post(f"{proxy.url}/whip?room=7", data=OFFER, headers={
                    "Content-Type": "application/sdp", "Authorization": "Bearer secret"}) as response:
                status, headers, answer = response.status, response.headers, await response.text()
            method, path, forwarded_headers, body = receiver.requests[-1]
            assert (method, path) == ("POST", "/whip?room=7")
            assert forwarded_headers["Authorization"] == "Bearer secret"
            # The offer reaches the receiver without candidates, so its ICE can only find the sender through the relay.
            assert "a=candidate:" not in body.decode() and "end-of-candidates" not in body.decode()
            assert body.decode().count("\r\n") == OFFER.count("\r\n") - 2

            assert status == 201 and headers["Location"] == "/whip/session-1" and headers["ETag"] == "x1"
            assert headers["Content-Type"].startswith("application/sdp")
            candidates = sdp_candidates(answer)
            [relay] = proxy.relays
            assert [(c.host, c.port) for c in candidates] == [relay.address]
            assert relay.upstream == ("127.0.0.1", receiver.echo_port)
            assert relay.address[1] != receiver.echo_port
            assert await client.round_trip(relay.address, b"ping") == b"ping"
            assert proxy.stats.uplink.packets_forwarded == 1 and proxy.stats.downlink.packets_forwarded == 1

            # A successful DELETE of the session resource stops its relays.
            async with http.delete(f"{proxy.url}/whip/session-1",
                                   headers={"Authorization": "Bearer secret"}) as response:
                assert response.status == 204
            assert await client.round_trip(relay.address, b"ping", timeout=0.3) is None

    run(scenario())


def test_json_answer_is_rewritten_and_absolute_location_points_at_the_proxy():
    async def scenario():
        async with proxied_receiver() as (receiver, proxy), aiohttp.ClientSession() as http:
            async with http.post(f"{proxy.url}/offer", json={"type": "offer", "sdp": OFFER},
                                 headers={"Authorization": "Bearer secret"}) as response:
                assert response.status == 200
                document = await response.json()
                location = response.headers["Location"]
            assert json.loads(receiver.requests[-1][3])["sdp"].count("a=candidate:") == 0
            assert document["type"] == "answer"
            [relay] = proxy.relays
            assert [(c.host, c.port) for c in sdp_candidates(document["sdp"])] == [relay.address]
            assert location == f"{proxy.url}/offer/session-2"

    run(scenario())


def test_other_methods_pass_through_unchanged():
    async def scenario():
        async with proxied_receiver() as (receiver, proxy), aiohttp.ClientSession() as http:
            auth = {"Authorization": "Bearer secret"}
            async with http.get(f"{proxy.url}/status?a=1&b=two", headers={**auth, "X-Custom": "yes"}) as response:
                assert await response.json() == {"query": "a=1&b=two", "custom": "yes"}
            async with http.patch(f"{proxy.url}/whip/session-1", data=b"a=ice-ufrag:zz\r\n",
                                  headers={**auth, "Content-Type": "application/trickle-ice-sdpfrag"}) as response:
                assert response.status == 204
            assert receiver.requests[-1][0] == "PATCH" and receiver.requests[-1][3] == b"a=ice-ufrag:zz\r\n"
            # Errors come back as they are, and open no relay.
            async with http.post(f"{proxy.url}/whip", data=OFFER,
                                 headers={"Content-Type": "application/sdp"}) as response:
                assert (response.status, await response.text()) == (401, "who are you?")
            assert proxy.relays == []

    run(scenario())


def test_answer_without_ipv4_candidate_and_unreachable_receiver_give_502():
    async def scenario():
        async with proxied_receiver() as (receiver, proxy), aiohttp.ClientSession() as http:
            async with http.post(f"{proxy.url}/ipv6-only", data=OFFER, headers={
                    "Content-Type": "application/sdp", "Authorization": "Bearer secret"}) as response:
                assert response.status == 502
                assert "no IPv4 UDP host candidate" in await response.text()

        with socket.socket() as probe:  # a port where nothing listens
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        url, proxy = await run_behind_link(f"http://127.0.0.1:{closed_port}/whip", "wifi-2m")
        try:
            assert url == f"{proxy.url}/whip"
            async with aiohttp.ClientSession() as http, http.post(url, data=OFFER) as response:
                assert response.status == 502
        finally:
            await proxy.stop()

    run(scenario())


def test_proxy_refuses_a_bad_target_url():
    with pytest.raises(ValueError, match="http"):
        SignalingProxy("ftp://example", LinkParams())
