"""dlad-link's UDP relay over real loopback sockets: rate, delay, loss, queue, trace, seeds, clients.

Timing assertions measure over enough packets (a second or more of traffic) that event-loop
lateness on a loaded machine stays well inside the tolerances.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import struct
import time

import pytest

from shared.link import DeliveryTrace, GilbertElliott, LinkParams, LinkRelay

_HEADER = struct.Struct("!Id")  # sequence number, send time


def run(coroutine, timeout: float = 10.0):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


class Endpoint(asyncio.DatagramProtocol):
    """A loopback UDP socket that records what it receives and when; optionally echoes it back."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.received: list[tuple[float, bytes, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.received.append((time.monotonic(), data, addr))
        if self.echo:
            self.transport.sendto(data, addr)

    @property
    def address(self) -> tuple[str, int]:
        return self.transport.get_extra_info("sockname")[:2]

    def sequence_numbers(self) -> list[int]:
        return [_HEADER.unpack_from(data)[0] for _, data, _ in self.received]

    def one_way_delays(self) -> list[float]:
        return [arrived - _HEADER.unpack_from(data)[1] for arrived, data, _ in self.received]


async def open_endpoint(echo: bool = False) -> Endpoint:
    loop = asyncio.get_running_loop()
    _, endpoint = await loop.create_datagram_endpoint(lambda: Endpoint(echo), local_addr=("127.0.0.1", 0))
    return endpoint


def packet(sequence: int, size: int) -> bytes:
    return _HEADER.pack(sequence, time.monotonic()).ljust(size, b"\0")


async def send_paced(endpoint: Endpoint, to, count: int, size: int, rate: float) -> None:
    """Send `count` numbered datagrams at `rate` bits/s, in 5 ms batches.

    A batch holds at most 64 datagrams, so that a stalled event loop cannot catch up with a
    burst that overflows the relay's socket buffer in the kernel.
    """
    start, sent = time.monotonic(), 0
    while sent < count:
        due = min(count, sent + 64, int((time.monotonic() - start) * rate / (8 * size)) + 1)
        for sequence in range(sent, due):
            endpoint.transport.sendto(packet(sequence, size), to)
        sent = due
        await asyncio.sleep(0.005)


async def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def relayed(uplink: LinkParams, downlink: LinkParams | None = None, *, seed=None, echo: bool = False):
    """A started relay between a client endpoint and an upstream endpoint, all closed afterwards."""
    upstream = await open_endpoint(echo)
    client = await open_endpoint()
    relay = LinkRelay(upstream.address, uplink, downlink, seed=seed)
    try:
        await relay.start()
        yield relay, client, upstream
    finally:
        await relay.stop()
        client.transport.close()
        upstream.transport.close()


@pytest.mark.parametrize("rate", [2e6, 8e6])
def test_delivered_rate_matches_the_link_rate(rate):
    size = 1200
    count = int(rate * 1.5 / (8 * size))  # 1.5 s of traffic at the link rate

    async def scenario():
        async with relayed(LinkParams(rate=rate)) as (relay, client, upstream):
            await send_paced(client, relay.address, count, size, 1.25 * rate)
            await wait_until(lambda: len(upstream.received) == count, 3.0)
            assert len(upstream.received) == count
            assert relay.stats.uplink.bytes_forwarded == count * size
            # Skip the first packets: the link idles between the sender's first batches.
            times = [arrived for arrived, _, _ in upstream.received][count // 20:]
            return size * 8 * (len(times) - 1) / (times[-1] - times[0])

    assert run(scenario()) == pytest.approx(rate, rel=0.10)


def test_one_way_delay_and_jitter_keep_order():
    async def scenario(params):
        async with relayed(params) as (relay, client, upstream):
            await send_paced(client, relay.address, 40, 100, 100 * 8 / 0.02)  # one every 20 ms
            await wait_until(lambda: len(upstream.received) == 40, 2.0)
            assert upstream.sequence_numbers() == list(range(40))
            return upstream.one_way_delays(), relay.stats.uplink.mean_delay

    delays, mean_delay = run(scenario(LinkParams(delay=0.040)))
    # Never early; the quickest packet shows the delay the link adds, the median that it is
    # added to all (a process waiting for a CPU only makes packets late).
    assert 0.039 <= min(delays) <= 0.044
    assert statistics.median(delays) <= 0.055
    assert 0.039 <= mean_delay <= statistics.mean(delays) + 0.001  # the relay's own account of it

    delays, _ = run(scenario(LinkParams(delay=0.040, jitter=0.010)))
    assert min(delays) >= 0.029
    assert max(delays) - min(delays) >= 0.005


def test_random_loss_rate_within_binomial_tolerance():
    count, loss = 2000, 0.10

    async def scenario():
        async with relayed(LinkParams(loss=loss), seed=3) as (relay, client, upstream):
            await send_paced(client, relay.address, count, 200, 8e6)
            await wait_until(lambda: relay.stats.uplink.packets_in == count, 2.0)
            await wait_until(lambda: relay.stats.uplink.packets_in_flight == 0, 2.0)
            await asyncio.sleep(0.05)
            return len(upstream.received), relay.stats.uplink

    received, stats = run(scenario())
    assert stats.packets_in == count
    assert stats.packets_lost == count - received
    assert abs(stats.packets_lost - count * loss) <= 4 * math.sqrt(count * loss * (1 - loss))


def test_drop_tail_queue_limits_a_burst():
    async def scenario():
        # At 200 kbit/s a 1000-byte packet takes 40 ms: the burst of 40 is in long before the queue moves.
        async with relayed(LinkParams(rate=200e3, queue_bytes=10_000)) as (relay, client, upstream):
            for sequence in range(40):
                client.transport.sendto(packet(sequence, 1000), relay.address)
            await wait_until(lambda: relay.stats.uplink.packets_in == 40, 1.0)
            await wait_until(lambda: relay.stats.uplink.packets_in_flight == 0, 2.0)
            await asyncio.sleep(0.05)
            return upstream.sequence_numbers(), relay.stats.uplink

    delivered, stats = run(scenario())
    # One packet leaves at once on the bucket's credit and ten wait in the 10 kB queue; a slow
    # event loop may read the tail of the burst after the first departure made room again.
    assert 11 <= len(delivered) <= 13
    assert delivered[:11] == list(range(11))  # drop-tail: the head of the burst gets through
    assert stats.packets_queue_dropped == 40 - len(delivered)


def test_trace_driven_rate_follows_the_trace(tmp_path):
    # 0-500 ms: an opportunity every 2 ms (6 Mbit/s); 500-1000 ms: every 6 ms (about 2 Mbit/s).
    opportunities = list(range(2, 501, 2)) + list(range(506, 1000, 6)) + [1000]
    trace_file = tmp_path / "step.trace"
    trace_file.write_text("".join(f"{t}\n" for t in opportunities))
    trace = DeliveryTrace.load(trace_file)

    async def scenario():
        async with relayed(LinkParams(trace=trace)) as (relay, client, upstream):
            started = time.monotonic()
            await send_paced(client, relay.address, int(7e6 / (8 * 1500)), 1500, 7e6)  # 1 s at 7 Mbit/s
            await asyncio.sleep(max(started + 1.0 - time.monotonic(), 0))
            arrivals = [arrived - started for arrived, _, _ in upstream.received]

        def rate_between(begin, end):
            return sum(begin <= t < end for t in arrivals) * 1500 * 8 / (end - begin)

        return rate_between(0.05, 0.45), rate_between(0.55, 0.95), rate_between(0.0, 1.0)

    fast, slow, whole = run(scenario())
    assert fast == pytest.approx(6e6, rel=0.10)
    assert slow == pytest.approx(84 * 1500 * 8 / 0.5, rel=0.10)
    assert whole == pytest.approx(trace.mean_rate, rel=0.10)


def test_same_seed_drops_the_same_packets():
    params = LinkParams(gilbert=GilbertElliott(p=0.1, r=0.3), delay=0.005, jitter=0.003)

    async def delivered(seed):
        async with relayed(params, seed=seed) as (relay, client, upstream):
            await send_paced(client, relay.address, 300, 200, 4e6)
            await wait_until(lambda: relay.stats.uplink.packets_in == 300, 2.0)
            await wait_until(lambda: relay.stats.uplink.packets_in_flight == 0, 2.0)
            await asyncio.sleep(0.05)
            return upstream.sequence_numbers()

    first = run(delivered(7))
    assert 0 < len(first) < 300
    assert run(delivered(7)) == first
    assert run(delivered(8)) != first


def test_each_client_gets_its_own_upstream_source_and_its_own_answers():
    async def scenario():
        uplink, downlink = LinkParams(delay=0.010), LinkParams(delay=0.030)
        async with relayed(uplink, downlink, echo=True) as (relay, first, upstream):
            second = await open_endpoint()
            try:
                for sequence in range(5):
                    first.transport.sendto(packet(sequence, 100), relay.address)
                    second.transport.sendto(packet(100 + sequence, 100), relay.address)
                    await asyncio.sleep(0.01)
                await wait_until(lambda: len(first.received) == 5 and len(second.received) == 5, 2.0)
                assert sorted(relay.clients) == sorted([first.address, second.address])
                return first, second, upstream
            finally:
                second.transport.close()

    first, second, upstream = run(scenario())
    sources = {addr for _, _, addr in upstream.received}
    assert len(sources) == 2 and not sources & {first.address, second.address}
    assert first.sequence_numbers() == list(range(5))
    assert second.sequence_numbers() == list(range(100, 105))
    # 10 ms up, 30 ms down; the quickest packets show it, a loaded machine only adds lateness.
    assert 0.0095 <= min(upstream.one_way_delays()) <= 0.020
    assert 0.039 <= min(first.one_way_delays() + second.one_way_delays()) <= 0.060
