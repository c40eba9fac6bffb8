"""A real aiortc pair, in this process, whose signaling goes through the proxy and whose data crosses the link.

aioice leaves 127.0.0.1 out of the candidates it gathers, so the receiver's candidates are
this machine's interface addresses; the relay listens on 127.0.0.1 and forwards to them, and
the packets never leave the machine. Only on a machine with no IPv4 interface but loopback
does the test make aioice gather 127.0.0.1, as there would be no candidate at all otherwise.
"""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
import aioice.ice
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from shared.link import LinkParams, run_behind_link, sdp_candidates

TOTAL_BYTES = 200_000
RATE = 4e6


def new_peer_connection() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN lookups


async def transfer_through_link() -> tuple[bytes, bytes, float, object, str]:
    received = bytearray()
    all_received = asyncio.Event()
    peers: list[RTCPeerConnection] = []

    async def answer_offer(request: web.Request) -> web.Response:
        receiver = new_peer_connection()
        peers.append(receiver)

        @receiver.on("datachannel")
        def on_datachannel(channel):
            @channel.on("message")
            def on_message(message):
                received.extend(message)
                if len(received) >= TOTAL_BYTES:
                    all_received.set()

        await receiver.setRemoteDescription(RTCSessionDescription(await request.text(), "offer"))
        await receiver.setLocalDescription(await receiver.createAnswer())
        return web.Response(text=receiver.localDescription.sdp, content_type="application/sdp")

    app = web.Application()
    app.router.add_post("/whip", answer_offer)
    runner = web.AppRunner(app)
    await runner.setup()
    proxy = None
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url, proxy = await run_behind_link(f"http://127.0.0.1:{runner.addresses[0][1]}/whip",
                                           LinkParams(rate=RATE, delay=0.010, queue_bytes=256_000), seed=1)
        sender = new_peer_connection()
        peers.append(sender)
        channel = sender.createDataChannel("volume")
        opened = asyncio.Event()
        channel.on("open", opened.set)
        await sender.setLocalDescription(await sender.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=sender.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp"}) as response:
                assert response.status == 200, await response.text()
                answer = await response.text()
        await sender.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await asyncio.wait_for(opened.wait(), 10)

        payload = os.urandom(TOTAL_BYTES)
        started = time.monotonic()
        for offset in range(0, TOTAL_BYTES, 4000):
            channel.send(payload[offset:offset + 4000])
        await asyncio.wait_for(all_received.wait(), 15)
        return payload, bytes(received), time.monotonic() - started, proxy.stats, answer
    finally:
        for peer in peers:
            await peer.close()
        if proxy is not None:
            await proxy.stop()
        await runner.cleanup()


def test_datachannel_transfer_goes_through_the_link(monkeypatch):
    if not aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False):
        monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])

    sent, received, elapsed, stats, answer = asyncio.run(asyncio.wait_for(transfer_through_link(), 40))

    assert received == sent
    assert {c.host for c in sdp_candidates(answer)} == {"127.0.0.1"}
    # Every byte crossed the relay: nothing took a direct path.
    assert stats.uplink.bytes_forwarded >= TOTAL_BYTES
    ideal = TOTAL_BYTES * 8 / RATE
    assert 0.8 * ideal <= elapsed < 10 * ideal
