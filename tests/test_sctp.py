"""shared/webrtc/sctp.py: delayed SACKs and fast retransmission at most once (RFC 9260 6.2, 7.2.4)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import subprocess
import sys

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.rtcsctptransport import DataChunk, RTCSctpTransport, SackChunk

from shared.webrtc import sctp
from shared.webrtc.ice import enlarge_socket_buffers, ice_hosts

# pyproject.toml pins the aiortc series the tuning supports: with any other, these fail (the
# install is wrong). Only a deliberate DLAD_SCTP_TUNING=0 skips them.
pytestmark = pytest.mark.skipif(sctp.status().startswith("off"), reason=sctp.status())


def test_tuning_is_applied_and_can_be_switched_off():
    assert sctp.status() == "applied"
    code = "import shared.webrtc.sctp as s; print(s.status())"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "DLAD_SCTP_TUNING": "0"})
    assert off.stdout.strip() == "off (DLAD_SCTP_TUNING)"


# --- delayed acknowledgement, on a real loopback association ----------------------------------


async def transfer(messages: list[bytes]) -> tuple[list[bytes], collections.Counter]:
    """Send ``messages`` over a data channel between two peer connections of this process."""
    sent_chunks: collections.Counter = collections.Counter()
    original_send_chunk = RTCSctpTransport._send_chunk

    async def counting_send_chunk(self, chunk):
        sent_chunks[(self.is_server, type(chunk).__name__)] += 1
        await original_send_chunk(self, chunk)

    received: list[bytes] = []
    done = asyncio.Event()
    with ice_hosts(("127.0.0.1",)):
        offerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        answerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = offerer.createDataChannel("test")

    @answerer.on("datachannel")
    def on_datachannel(incoming):
        @incoming.on("message")
        def on_message(message):
            received.append(message)
            if len(received) == len(messages):
                done.set()

    RTCSctpTransport._send_chunk = counting_send_chunk
    try:
        with ice_hosts(("127.0.0.1",)):
            await offerer.setLocalDescription(await offerer.createOffer())
            await answerer.setRemoteDescription(offerer.localDescription)
            await answerer.setLocalDescription(await answerer.createAnswer())
            await offerer.setRemoteDescription(answerer.localDescription)
        for pc in (offerer, answerer):  # as dlad's peers do: no loss in the kernel's queues
            enlarge_socket_buffers(pc)
        opened = asyncio.Event()
        channel.on("open", opened.set)
        await asyncio.wait_for(opened.wait(), 20)
        for message in messages:
            channel.send(message)
        await asyncio.wait_for(done.wait(), 60)
    finally:
        RTCSctpTransport._send_chunk = original_send_chunk
        await offerer.close()
        await answerer.close()
    return received, sent_chunks


def test_receiver_acknowledges_every_second_packet_and_data_arrives_intact():
    messages = [hashlib.sha256(bytes([i])).digest() * 512 for i in range(64)]  # 64 x 16 KiB
    received, sent = asyncio.run(asyncio.wait_for(transfer(messages), 120))
    assert received == messages
    # aiortc makes the offerer the SCTP server (is_server True): it sends the data.
    data_packets = sent[(True, "DataChunk")]
    sacks = sent[(False, "SackChunk")]
    assert data_packets >= 64 * 14
    # One SACK per two packets, plus the few sent at once for a lone packet, a gap or a
    # duplicate; aiortc alone sends one per packet.
    assert sacks <= 0.6 * data_packets, (sacks, data_packets)


# --- fast retransmission at most once, on one association driven by hand ---------------------


class _NoDtls:
    state = "connected"


def association_with_chunks_in_flight(count: int, first_tsn: int = 1000):
    """An established association whose ``count`` chunks were sent once and await a SACK."""
    transport = RTCSctpTransport(_NoDtls())
    transport._association_state = RTCSctpTransport.State.ESTABLISHED
    transport._last_sacked_tsn = first_tsn - 1
    sent = []

    async def record_send(chunk):
        if isinstance(chunk, DataChunk):
            sent.append(chunk.tsn)

    async def nothing():
        return None

    transport._send_chunk = record_send
    transport._data_channel_flush = nothing
    for tsn in range(first_tsn, first_tsn + count):
        chunk = DataChunk()
        chunk.tsn = tsn
        chunk.user_data = b"x" * 1000
        chunk._abandoned = chunk._acked = chunk._retransmit = False
        chunk._book_size, chunk._expiry, chunk._max_retransmits = 1000, None, None
        chunk._misses, chunk._sent_count, chunk._sent_time = 0, 1, 0.0
        chunk._in_flight = False
        transport._sent_queue.append(chunk)
        transport._flight_size_increase(chunk)
    transport._cwnd = 10 * count * 1000
    return transport, sent


async def lose_first_chunk(receive_sack, sacks: int) -> list[int]:
    """The first chunk is lost and each SACK reports one more chunk after it received."""
    transport, sent = association_with_chunks_in_flight(40)
    try:
        for k in range(1, sacks + 1):
            sack = SackChunk()
            sack.cumulative_tsn = 999
            sack.advertised_rwnd = 1 << 20
            sack.gaps = [(2, 1 + k)]  # TSNs 1001 .. 1000 + k received, 1000 missing
            sack.duplicates = []
            await receive_sack(transport, sack)
    finally:
        transport._t3_cancel()
    return [tsn for tsn in sent if tsn == 1000]


def test_a_lost_chunk_is_fast_retransmitted_once():
    patched = asyncio.run(lose_first_chunk(RTCSctpTransport._receive_sack_chunk, 15))
    assert patched == [1000]


def test_aiortc_alone_retransmits_the_same_chunk_again_and_again():
    """The defect the rule removes (if aiortc fixes it, this test says so)."""
    original = asyncio.run(lose_first_chunk(RTCSctpTransport._dlad_original_receive_sack_chunk,
                                            15))
    assert len(original) >= 3


# --- HyStart++: leaving slow start when the delay rises ----------------------------------------


class _Sent:
    def __init__(self, tsn):
        self.tsn = tsn


def slow_starting_association():
    async def create():  # aiortc binds the association to the running loop
        return RTCSctpTransport(_NoDtls())

    transport = asyncio.run(create())
    transport._association_state = RTCSctpTransport.State.ESTABLISHED
    transport._ssthresh = 1 << 20
    transport._cwnd = 40_000
    transport._last_sacked_tsn = 0
    return transport


def play_rounds(transport, rtts_per_round: list[float], samples: int = 10) -> list[str]:
    """Feed RTT samples round by round; return the phase after each round."""
    phases = []
    tsn = 0
    for rtt in rtts_per_round:
        transport._sent_queue.clear()
        transport._sent_queue.append(_Sent(tsn + samples))  # the round ends at this TSN
        for _ in range(samples):
            tsn += 1
            transport._last_sacked_tsn = tsn
            transport._update_rto(rtt)
        state = transport._dlad_hystart
        phases.append("avoidance" if transport._cwnd > transport._ssthresh - 1
                      and transport._ssthresh != state.initial_ssthresh
                      else "css" if state.in_css() else "slow start")
    return phases


def test_hystart_keeps_slow_start_while_the_delay_is_flat():
    transport = slow_starting_association()
    assert play_rounds(transport, [0.040] * 8) == ["slow start"] * 8
    assert transport._ssthresh == 1 << 20


def test_hystart_leaves_slow_start_when_the_queue_grows():
    transport = slow_starting_association()
    # 40 ms, then +10 ms (more than clamp(40/8, 4, 16) = 5 ms): conservative slow start for
    # five rounds, then congestion avoidance with the threshold at the window.
    phases = play_rounds(transport, [0.040, 0.040, 0.050, 0.050, 0.050, 0.050, 0.050, 0.050,
                                     0.050])
    assert phases[:3] == ["slow start", "slow start", "css"]
    assert phases[-1] == "avoidance"
    assert transport._ssthresh == transport._cwnd


def test_hystart_resumes_slow_start_when_the_delay_falls_back():
    transport = slow_starting_association()
    phases = play_rounds(transport, [0.040, 0.040, 0.050, 0.045, 0.030, 0.030])
    assert phases[2] == "css"
    assert phases[-1] == "slow start"
    assert transport._ssthresh == 1 << 20


def test_hystart_stays_out_after_a_loss():
    transport = slow_starting_association()
    play_rounds(transport, [0.040])
    transport._ssthresh = 20_000  # aiortc halved the window on a loss
    play_rounds(transport, [0.040, 0.080, 0.080])
    assert transport._dlad_hystart.done and transport._ssthresh == 20_000
