"""The receiver under attack and on a failing disk (issue 13), on loopback, bounded in time.

Each test plays one attack of the issue against ``dlad-receive --listen`` (in this process, or
as a child process where its memory, log or open-file limit is what is checked) and checks both
the defence and that a legitimate sender is still served, bit-exact. The figures (how fast, how
much memory) are measured by ``scripts/bench_stress.py`` and reported in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from attack_helpers import blank_header, garbage, make_certificate, slow_client
from test_streaming import (
    ROOT,
    TOKEN,
    RawClient,
    Receiver,
    check_complete,
    encode_phantom,
    log_seqs,
    post_offer,
    quick,
    run,
    study_folders,
)

from receiver.http import PlainHttpRefused
from receiver.limits import LimitExceeded, Limits, check_header, parse_networks
from receiver.service import ReceiverService, ServiceConfig
from receiver.store import HEADER_FILE, LOG_FILE, STATUS_FILE, StoreWriteError, StudyStore
from sender.transport import FileSource, Refused, stream_study
from shared.logs import RateLimitFilter, SafeFormatter, printable
from shared.receiver_process import ReceiverProcess
from shared.tls import server_tls_context
from shared.webrtc.ice import CandidateError, screen_candidates
from shared.webrtc.protocol import encode_control
from shared.webrtc.signaling import TokenError, read_token_file, token_bits
from shared.wire import MAGIC, FrameReader

AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/sdp"}


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Two small phantom streams (exact layer): ``{"a": (path, volume, header), "b": ...}``."""
    folder = tmp_path_factory.mktemp("attack-streams")
    made = {}
    for name, seed in (("a", 5), ("b", 6)):
        path = folder / f"{name}.dlad"
        volume, header = encode_phantom(path, seed, True)
        made[name] = (path, volume, header)
    return made


@pytest.fixture()
def token_file(tmp_path) -> Path:
    path = tmp_path / "token.txt"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


async def live_offer():
    """An offer from a peer connection that stays open (it answers the receiver's ICE checks
    but never applies the answer): a session made from it holds its slot until a timeout."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    from shared.webrtc.ice import ice_hosts
    from shared.webrtc.protocol import CHANNEL_LABEL

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel(CHANNEL_LABEL)
    with ice_hosts(("127.0.0.1",)):
        await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


def encode_study(path: Path, shape, seed: int):
    """Encode a phantom of ``shape`` (exact layer) into ``path``; return (volume, header)."""
    from models.phantoms import make_phantom
    from sender.encoder import EncodeSettings, StudyEncoder
    from sender.pipeline import prepare_study
    from sender.roi.provider import StaticMaskProvider

    # An in-plane field of view of 330 mm holds the whole abdomen.
    spacing = (330 / shape[2], 330 / shape[1], 2.5)
    volume, liver = make_phantom(shape, spacing=spacing, seed=seed)
    prepared = prepare_study(volume, StaticMaskProvider(liver, "phantom liver"))
    encoder = StudyEncoder(prepared, EncodeSettings(exact=True, group_slices=2, preset="fast"))
    path.write_bytes(b"".join(encoder.frames()))
    return volume, encoder.header


async def open_raw(url: str, header_frame: bytes) -> tuple[RawClient, dict]:
    """A hand-driven sender past the inventory (or the error that refused its header)."""
    client = RawClient()
    await client.connect(url)
    client.channel.send(encode_control("hello", protocol=1))
    client.send(header_frame)
    while True:
        message = await asyncio.wait_for(client.messages.get(), 30)
        if message["type"] in ("inventory", "error"):
            return client, message


# --- 1. admission ------------------------------------------------------------------------------

def test_parallel_offers_get_at_most_max_sessions_and_a_freed_slot_serves_a_sender(studies,
                                                                                    tmp_path):
    path, volume, header = studies["a"]

    async def scenario():
        async with Receiver(tmp_path / "out", limits={"max_sessions": 8}) as service:
            attacker_pc, offer = await live_offer()
            offer = offer.encode()
            peak = 0

            async def watch():
                nonlocal peak
                while True:
                    peak = max(peak, len(service.sessions) + service._opening)
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch())
            connector = aiohttp.TCPConnector(limit=0, force_close=True)
            async with aiohttp.ClientSession(connector=connector) as http:
                async def post():
                    async with http.post(service.url + "/studies", data=offer,
                                         headers=AUTH) as response:
                        await response.read()
                        return response.status, response.headers.get("Location")

                answers = await asyncio.gather(*(post() for _ in range(100)))
                codes = sorted(code for code, _ in answers)
                # A legitimate sender arrives while every slot is taken: it waits (503,
                # Retry-After) and is served as soon as one attacker's session ends.
                legit = asyncio.create_task(stream_study(FileSource(path), service.url, TOKEN,
                                                         quick()))
                await asyncio.sleep(2.0)
                assert not legit.done()
                location = next(loc for code, loc in answers if code == 201)
                freed = time.monotonic()
                async with http.delete(service.url + location, headers=AUTH) as response:
                    assert response.status == 204
                result = await legit
                served_after = time.monotonic() - freed
            watcher.cancel()
            await attacker_pc.close()
            return codes, peak, result, served_after

    codes, peak, result, served_after = run(scenario())
    assert codes.count(201) == 8 and codes.count(503) == 92, codes
    assert peak <= 8
    assert result.complete and result.verified
    print(f"legit sender done {served_after:.2f} s after a slot was freed")
    assert served_after < 20
    (folder,) = study_folders(tmp_path / "out")
    check_complete(folder, volume, header)


def test_headers_over_the_limits_are_refused_before_allocation(tmp_path):
    limits = {"max_voxels": 64 << 20, "memory_budget": 96 << 20, "max_plan_entries": 1000}
    huge = blank_header("huge", (64, 64, 64)).to_frame()
    # The shape field says 8192^3 voxels: refused from two msgpack fields, before the parse
    # would unpack anything (the frame's ROI is not even valid).
    body = __import__("msgpack").unpackb(huge[26:], raw=False)
    body["shape"] = [8192, 8192, 8192]
    from shared.wire import KIND_HEADER, frame
    lying = frame(KIND_HEADER, body)
    over_budget = blank_header("over-budget", (160, 512, 512)).to_frame()  # 42 Mi voxels
    many_entries = blank_header("many", (1200, 8, 8), group=1).to_frame()
    overlapping = blank_header("overlap", (8, 16, 16), group=4)
    overlapping.plan.append((len(overlapping.plan), 0, 2, 6))

    async def scenario():
        reasons = {}
        async with Receiver(tmp_path / "out", limits=limits) as service:
            for name, header_frame in (("lying", lying), ("budget", over_budget),
                                       ("entries", many_entries),
                                       ("overlap", overlapping.to_frame())):
                client, message = await open_raw(service.url, header_frame)
                reasons[name] = message
                await client.close()
            await asyncio.sleep(0.3)
            left = (len(service.studies), service.memory.used)
        return reasons, left

    reasons, left = run(scenario())
    assert all(message["type"] == "error" and not message["retry"]
               for message in reasons.values()), reasons
    assert "voxels" in reasons["lying"]["reason"]
    assert "memory" in reasons["budget"]["reason"]
    assert "chunks" in reasons["entries"]["reason"]
    assert "overlaps" in reasons["overlap"]["reason"]
    assert left == (0, 0)
    assert study_folders(tmp_path / "out") == []


def test_a_study_that_fails_to_open_is_refused_not_left_waiting(tmp_path, monkeypatch):
    """Whatever goes wrong while a study is opened, its sender gets an error at once (an
    exception there left the session in "opening", unanswered, holding its slot)."""
    async def broken_open(*args, **kwargs):
        raise TypeError("a bug")

    async def scenario():
        async with Receiver(tmp_path / "out") as service:
            monkeypatch.setattr(service, "open_study", broken_open)
            client, message = await open_raw(service.url, blank_header("x", (4, 8, 8)).to_frame())
            await client.close()
            await asyncio.sleep(0.3)
            return message, len(service.sessions)

    message, sessions = run(scenario())
    assert message["type"] == "error" and "receiver error" in message["reason"], message
    assert sessions == 0


def test_check_header_bounds_stream_and_memory():
    header = blank_header("s", (32, 256, 256))
    cost = check_header(header, Limits(), window=1 << 20)
    assert cost.memory > 2 * 32 * 256 * 256 and cost.stream > 0
    with pytest.raises(LimitExceeded, match="stream"):
        check_header(header, Limits(max_stream_bytes=1 << 20), window=1 << 20)
    with pytest.raises(LimitExceeded, match="memory"):
        check_header(header, Limits(memory_budget=4 << 20), window=1 << 20)


def test_memory_budget_admits_what_fits_and_a_header_only_study_writes_no_volume(tmp_path):
    """Header-only studies (the +1 GiB attack): the budget admits one, refuses the next (retry),
    and the admitted one writes no volume of fill values and leaves no folder."""
    limits = {"memory_budget": 200 << 20}
    first = blank_header("first", (96, 512, 512)).to_frame()   # ~ 50 MB volume, ~ 80 MB cost
    second = blank_header("second", (160, 512, 512)).to_frame()  # ~ 84 MB volume

    async def scenario():
        async with Receiver(tmp_path / "out", limits=limits) as service:
            one, inventory = await open_raw(service.url, first)
            two, refusal = await open_raw(service.url, second)
            used = service.memory.used
            await one.close()
            await two.close()
            await asyncio.sleep(1.5)
        return inventory, refusal, used

    inventory, refusal, used = run(scenario())
    assert inventory["type"] == "inventory"
    assert refusal["type"] == "error" and refusal["retry"] and "busy" in refusal["reason"]
    assert used <= 200 << 20
    # It never got a chunk: no volume was written, and its folder went with it.
    assert study_folders(tmp_path / "out") == []


def test_a_sender_turned_away_for_memory_waits_and_is_served_when_memory_frees(studies,
                                                                               tmp_path):
    from receiver.limits import SESSION_MEMORY, study_cost
    from shared.wire import FrameReader as Reader

    path, volume, header = studies["a"]
    hog = blank_header("hog", (96, 512, 512))
    legit_cost = study_cost(Reader().feed(FileSource(path).header_frame)[0].chunk, 1 << 20)
    # Room for the hog's study and two sessions, not for the legitimate study beside them.
    budget = study_cost(hog, 1 << 20).memory + 2 * SESSION_MEMORY + legit_cost.memory // 2

    async def scenario():
        async with Receiver(tmp_path / "out", limits={"memory_budget": budget}) as service:
            holder, inventory = await open_raw(service.url, hog.to_frame())
            assert inventory["type"] == "inventory"
            legit = asyncio.create_task(stream_study(FileSource(path), service.url, TOKEN,
                                                     quick()))
            await asyncio.sleep(3.0)
            assert not legit.done()  # told to wait (retry_after), not failed
            await holder.close()  # the hog leaves: its study can be unloaded for the legit one
            return await legit

    result = run(scenario())
    assert result.complete and result.verified and result.attempts == 1
    check_complete(tmp_path / "out" / header.study_id, volume, header)


# --- 1. error budget, fairness, logs -------------------------------------------------------------

def test_garbage_flood_closes_the_session_and_a_legit_transfer_goes_on(studies, tmp_path):
    (path, volume, header), (other, _, other_header) = studies["a"], studies["b"]
    flood = garbage(16 * 1024)

    async def scenario():
        async with Receiver(tmp_path / "out") as service:
            legit = asyncio.create_task(stream_study(FileSource(path), service.url, TOKEN,
                                                     quick()))
            attacker, inventory = await open_raw(service.url, FileSource(other).header_frame)
            assert inventory["type"] == "inventory"
            started = time.monotonic()
            closed_after = None
            error = None
            while time.monotonic() - started < 30:
                while not attacker.messages.empty():
                    message = attacker.messages.get_nowait()
                    if message["type"] == "error":
                        error, closed_after = message, time.monotonic() - started
                if error is not None:
                    break
                if attacker.channel.readyState == "open" and \
                        attacker.channel.bufferedAmount < 256 * 1024:
                    attacker.channel.send(flood)
                await asyncio.sleep(0.002)
            await attacker.close()
            result = await legit
            status = json.loads((tmp_path / "out" / other_header.study_id / STATUS_FILE)
                                .read_text())
            return error, closed_after, result, status

    error, closed_after, result, status = run(scenario())
    assert error is not None and "bad frames" in error["reason"] and not error["retry"]
    print(f"flooding session closed {closed_after:.2f} s after its first garbage")
    assert closed_after < 10
    assert result.complete and result.verified
    check_complete(tmp_path / "out" / header.study_id, volume, header)
    # Its problems were counted up to the budget, not beyond, and kept bounded.
    assert status["problem_count"] <= 2 * Limits().max_bad_frames + 300
    assert len(status["problems"]) <= 201


def test_frame_reader_merges_a_run_of_garbage_into_one_problem():
    reader = FrameReader()
    events = reader.feed(MAGIC * 250_000) + reader.finish()
    assert len(events) <= 2
    assert sum(event.size for event in events) == 1_000_000
    assert events[0].bad_frames > 200_000


def test_file_mode_garbage_is_bounded(tmp_path):
    """8 MB of frame magic given to ``dlad-receive --in``: a few problems, little memory."""
    source = tmp_path / "magic.dlad"
    source.write_bytes(MAGIC * (2 << 20))
    # The process's own peak (VmHWM: ru_maxrss would carry over pytest's from the fork).
    probe = ("import re, sys; from receiver.cli import main; code = main(sys.argv[1:]); "
             "peak = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]; "
             "print('maxrss', peak, file=sys.stderr); sys.exit(code)")
    # The same command on a missing input: the same imports, no data.
    baseline = subprocess.run([sys.executable, "-c", probe, "--in", str(tmp_path / "none"),
                               "--out", str(tmp_path / "none.nii")], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    done = subprocess.run([sys.executable, "-c", probe, "--in", str(source), "--out",
                           str(tmp_path / "out.nii")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    idle_kib = int(baseline.stderr.split("maxrss")[-1])
    peak_kib = int(done.stderr.split("maxrss")[-1])
    lines = done.stderr.splitlines()
    print(f"8 MB of magic: {len(lines)} lines, peak {peak_kib // 1024} MiB "
          f"(idle {idle_kib // 1024} MiB)")
    assert len(lines) < 20 and "problems)" in done.stderr
    assert peak_kib - idle_kib < 80 * 1024  # a few copies of the 8 MB input at most
    assert not (tmp_path / "out.nii").exists()


def test_headers_after_the_first_are_bad_frames_never_parsed(studies, monkeypatch):
    """A stream has one header. Every header frame after it is a bad frame (counted against a
    session's error budget) and is not parsed: a parse unpacks and counts the ROI mask, half a
    second for a large study from a 2 KB frame, which a peer could make the receiver repeat
    (valid and identical, the copies counted as nothing) for as long as its session lasted."""
    from receiver.stream import StudyStream
    from shared import wire

    path, volume, header = studies["a"]
    source = FileSource(path)
    parses = []
    parse = wire._PARSERS[wire.KIND_HEADER]
    monkeypatch.setitem(wire._PARSERS, wire.KIND_HEADER,
                        lambda body: parses.append(1) or parse(body))
    stream = StudyStream()
    stream.feed(source.header_frame)
    stream.feed(source.header_frame * 40 + source.frame(source.order[0]))
    assert len(parses) == 1
    assert stream.bad_frames >= 40 and "a second header frame" in " ".join(stream.problems)
    assert stream.reassembler.applied == {source.order[0]}  # the data after them still counts


def test_log_lines_are_sanitised_and_rate_limited():
    record = logging.LogRecord("dlad.receiver", logging.WARNING, __file__, 1,
                               "study %s: bad", ("x\n12:00:00 study y: verified\u202e",), None)
    text = SafeFormatter("%(message)s").format(record)
    assert "\n" not in text and "\\n12:00:00" in text and "\\u202e" in text
    clock = [0.0]
    limiter = RateLimitFilter(burst=5, refill_s=1.0, clock=lambda: clock[0])
    passed = sum(limiter.filter(logging.LogRecord("x", logging.WARNING, "", 1, "flood %d",
                                                  (i,), None)) for i in range(10_000))
    assert passed == 5 and limiter.suppressed == 9995
    clock[0] = 2.0
    later = logging.LogRecord("x", logging.WARNING, "", 1, "flood %d", (1,), None)
    assert limiter.filter(later) and "suppressed" in later.getMessage()
    assert printable("a\x00b\x1b[31m") == "a\\x00b\\x1b[31m"


# --- 1. HTTP: slowloris --------------------------------------------------------------------------

def test_slowloris_connections_are_closed_and_a_legit_transfer_is_unaffected(studies, tmp_path):
    path, volume, header = studies["a"]

    async def scenario():
        async with Receiver(tmp_path / "out") as service:
            host, port = service.address
            deadline = time.monotonic() + 30
            slow = [asyncio.create_task(slow_client(host, port, i % 2 == 0, deadline))
                    for i in range(200)]
            await asyncio.sleep(0.5)
            result = await stream_study(FileSource(path), service.url, TOKEN, quick())
            closed = await asyncio.gather(*slow)
            async with aiohttp.ClientSession() as http:
                async with http.get(service.url + "/health") as response:
                    health = response.status
            return result, closed, health

    result, closed, health = run(scenario())
    assert result.complete and result.verified
    assert all(seconds is not None for seconds in closed), "a slow connection stayed open"
    print(f"200 slow connections closed after at most {max(closed):.1f} s")
    assert max(closed) <= 30 and health == 200
    check_complete(tmp_path / "out" / header.study_id, volume, header)


def spawn_receiver_with_few_files(tmp_path: Path, token_file: Path) -> ReceiverProcess:
    """``dlad-receive --listen`` under an open-file limit of 200, soft and hard (it cannot
    raise it), two sessions and a 3 s header timeout."""
    limited = ("import resource, runpy; resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200)); "
               "runpy.run_module('receiver.cli', run_name='__main__')")
    return ReceiverProcess.spawn(
        [sys.executable, "-c", limited, "--listen", "127.0.0.1:0", "--token-file",
         str(token_file), "--out-dir", str(tmp_path / "out"), "--max-sessions", "2",
         "--header-timeout", "3"], tmp_path / "receiver.log", cwd=ROOT)


def test_slowloris_against_a_low_open_file_limit_does_not_flood_the_log(tmp_path, token_file):
    receiver = spawn_receiver_with_few_files(tmp_path, token_file)
    url = receiver.url
    try:
        host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)

        async def attack():
            deadline = time.monotonic() + 20
            closed = await asyncio.gather(*(slow_client(host, int(port), True, deadline, 0.5)
                                            for _ in range(300)))
            async with aiohttp.ClientSession() as http:
                async with http.get(url + "/health") as response:
                    return closed, response.status

        closed, health = run(attack(), timeout=60)
    finally:
        receiver.stop()
    text = receiver.log_path.read_text()
    assert all(seconds is not None for seconds in closed) and health == 200
    assert "Too many open files" not in text
    assert len(text) < 20_000, text[-2000:]


def test_a_burst_of_connections_after_a_stall_does_not_run_out_of_files(tmp_path, token_file):
    """Connections that pile up while the receiver's loop is busy (here: stopped) are accepted
    in one burst when it resumes, each holding a file until it is closed: with 100 slow
    connections already open under a limit of 200 files, the burst ran the receiver out of
    files ("Too many open files", tracebacks in the log) although the connection cap (104)
    was respected. The cap leaves room for the bursts now."""
    import signal

    receiver = spawn_receiver_with_few_files(tmp_path, token_file)
    url = receiver.url
    try:
        host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)

        async def attack():
            deadline = time.monotonic() + 8
            clients = [asyncio.create_task(slow_client(host, int(port), True, deadline, 0.5))
                       for _ in range(100)]
            await asyncio.sleep(1.0)
            os.kill(receiver.pid, signal.SIGSTOP)
            try:
                clients += [asyncio.create_task(slow_client(host, int(port), True, deadline,
                                                            0.5)) for _ in range(200)]
                await asyncio.sleep(1.5)
            finally:
                os.kill(receiver.pid, signal.SIGCONT)
            await asyncio.gather(*clients)
            async with aiohttp.ClientSession() as http:
                async with http.get(url + "/health") as response:
                    return response.status

        health = run(attack(), timeout=60)
    finally:
        receiver.stop()
    assert health == 200
    assert "Too many open files" not in receiver.log_path.read_text()


@pytest.mark.parametrize("open_files", [200, 256, 1024, 65536])
def test_connection_cap_leaves_room_for_accept_bursts(open_files):
    from receiver.limits import FD_PER_SESSION, FD_RESERVE_BASE, accept_backlog, connection_cap

    limits = Limits(max_sessions=2)
    cap, burst = connection_cap(limits, open_files), accept_backlog(limits, open_files)
    assert cap + 2 * burst + FD_RESERVE_BASE + FD_PER_SESSION * 2 <= open_files
    assert 8 <= burst <= 128 and 8 <= cap <= 1024


# --- 1. ICE ----------------------------------------------------------------------------------------

def with_candidates(sdp: str, addresses: list[str]) -> str:
    lines = sdp.splitlines(keepends=True)
    at = max(i for i, line in enumerate(lines) if line.startswith("a=candidate:")) + 1
    extra = [f"a=candidate:{9000 + i} 1 udp 2130706431 {address} {40000 + i % 20000} typ host\r\n"
             for i, address in enumerate(addresses)]
    return "".join(lines[:at] + extra + lines[at:])


def test_ice_candidates_are_capped_and_screened(tmp_path):
    async def scenario():
        async with Receiver(tmp_path / "out", limits={
                "allow_peers": parse_networks("127.0.0.0/8")}) as service:
            pc, offer = await live_offer()
            too_many = with_candidates(offer, [f"10.0.{i // 250}.{i % 250 + 1}"
                                               for i in range(600)])
            crowded = await post_offer(service.url, too_many.encode(), AUTH)
            mixed = with_candidates(offer, ["10.1.2.3", "8.8.8.8", "192.168.7.7"])
            status, headers, _ = await post_offer(service.url, mixed.encode(), AUTH)
            session = service.sessions[headers["Location"].rsplit("/", 1)[-1]]
            ice = session.pc.sctp.transport.transport
            remote = [c.ip for c in ice.getRemoteCandidates()]
            outside = with_candidates(offer.replace("127.0.0.1", "10.9.9.9"), [])
            refused = await post_offer(service.url, outside.encode(), AUTH)
            await pc.close()
            return crowded, status, remote, refused

    crowded, status, remote, refused = run(scenario())
    assert crowded[0] == 400 and "601 ICE candidates" in crowded[2], crowded
    assert status == 201 and remote and all(ip.startswith("127.") for ip in remote), remote
    assert refused[0] == 400 and "allow-peers" in refused[2]


def test_a_loopback_receiver_probes_only_loopback_peers_by_default(tmp_path):
    """The issue's case: an offer listing private and public addresses, to a receiver on
    127.0.0.1 without --allow-peers: only the loopback candidate is kept."""
    async def scenario():
        async with Receiver(tmp_path / "out") as service:
            pc, offer = await live_offer()
            mixed = with_candidates(offer, ["10.1.2.3", "8.8.8.8", "192.168.7.7", "fe80::1"])
            status, headers, _ = await post_offer(service.url, mixed.encode(), AUTH)
            session = service.sessions[headers["Location"].rsplit("/", 1)[-1]]
            remote = [c.ip for c in session.pc.sctp.transport.transport.getRemoteCandidates()]
            await pc.close()
            return status, remote

    status, remote = run(scenario())
    assert status == 201 and remote and all(ip.startswith("127.") for ip in remote), remote


def test_screen_candidates():
    sdp = ("v=0\r\na=candidate:1 1 udp 1 127.0.0.1 5000 typ host\r\n"
           "a=candidate:2 1 udp 1 8.8.8.8 5000 typ host\r\n"
           "a=candidate:3 1 udp 1 abc.local 5000 typ host\r\n")
    kept, dropped = screen_candidates(sdp, parse_networks("127.0.0.1"), 10)
    assert dropped == 2 and "8.8.8.8" not in kept and "abc.local" not in kept
    assert screen_candidates(sdp, None, 10) == (sdp, 0)
    with pytest.raises(CandidateError):
        screen_candidates(sdp, None, 2)


# --- 2. durability --------------------------------------------------------------------------------

def test_a_failed_append_leaves_the_log_as_it_was(studies, tmp_path, monkeypatch):
    path, volume, header = studies["a"]
    source = FileSource(path)
    store = StudyStore(tmp_path / "out")
    record, _ = store.open(source.header, source.header_frame)
    record.stream.feed(b"".join(source.frame(seq) for seq in source.order[:3]))
    first = [c for c in FrameReader().feed(b"".join(source.frame(s) for s in source.order[:3]))]
    record.append([event.chunk for event in first])
    size = (record.folder / LOG_FILE).stat().st_size
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills in the middle of a frame
        real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("receiver.store.os.write", half_then_full)
    more = FrameReader().feed(b"".join(source.frame(s) for s in source.order[3:6]))
    with pytest.raises(StoreWriteError, match="disk is full"):
        record.append([event.chunk for event in more])
    monkeypatch.undo()
    assert (record.folder / LOG_FILE).stat().st_size == size
    record.close()
    store.close()
    again = StudyStore(tmp_path / "out")
    reloaded, existed = again.open(source.header, source.header_frame)
    assert existed and sorted(reloaded.reassembler.applied) == sorted(source.order[:3])
    again.close()


def test_a_restart_removes_what_a_crash_left_of_a_snapshot(studies, tmp_path):
    """A receiver killed while it wrote a snapshot leaves its temporary file (a whole volume
    of patient data) in the study folder: the next load of the folder removes it."""
    path, volume, header = studies["a"]
    source = FileSource(path)
    store = StudyStore(tmp_path / "out")
    record, _ = store.open(source.header, source.header_frame)
    record.close()
    store.close()
    left = [record.folder / ".volume.nii.k3j9x_1a.nii", record.folder / ".status.json.q8w2e7r4"]
    for stale in left:
        stale.write_bytes(b"\0" * 1000)
    again = StudyStore(tmp_path / "out")
    reloaded, existed = again.open(source.header, source.header_frame)
    reloaded.close()
    again.close()
    assert existed and not any(stale.exists() for stale in left)
    assert sorted(p.name for p in record.folder.iterdir()) == sorted([HEADER_FILE, LOG_FILE])


@pytest.fixture()
def small_disk(tmp_path):
    """A 4 MiB tmpfs (the test is root in CI); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_acknowledges_nothing_that_is_not_stored(tmp_path, small_disk):
    path = tmp_path / "big.dlad"
    volume, header = encode_study(path, (24, 128, 128), seed=9)
    source = FileSource(path)
    assert path.stat().st_size > 200_000, path.stat().st_size
    out = small_disk / "out"

    async def fill_and_send():
        async with Receiver(out) as service:
            client, inventory = await open_raw(service.url, source.header_frame)
            assert inventory["type"] == "inventory"
            # The disk fills up: about 120 kB are left for a stream of more than that.
            filler = small_disk / "filler"
            with open(filler, "wb", buffering=0) as handle:
                try:
                    while True:
                        handle.write(b"\0" * 4096)
                except OSError:
                    pass
            left = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            with open(filler, "r+b") as handle:
                handle.truncate(max(0, filler.stat().st_size - (120_000 - left)))
            acked, error = 0, None
            for seq in source.order:
                if client.channel.readyState != "open":
                    break  # the receiver closed the session
                client.send(source.frame(seq))
                await asyncio.sleep(0.01)
            deadline = time.monotonic() + 30
            while error is None and time.monotonic() < deadline:
                try:
                    message = await asyncio.wait_for(client.messages.get(), 5)
                except asyncio.TimeoutError:
                    break
                if message["type"] == "ack" and "applied" in message:
                    acked = max(acked, message["applied"])
                elif message["type"] == "error":
                    error = message
            await client.close()
            return acked, error

    async def restart_and_finish():
        (small_disk / "filler").unlink()
        async with Receiver(out) as service:
            client, inventory = await open_raw(service.url, source.header_frame)
            await client.close()
            await asyncio.sleep(0.3)
            result = await stream_study(source, service.url, TOKEN, quick())
        return inventory, result

    acked, error = run(fill_and_send())
    (folder,) = study_folders(out)
    on_disk = log_seqs(folder)
    assert error is not None and "disk is full" in error["reason"] and error["retry"], error
    assert 0 < len(on_disk) < len(source.order)
    print(f"disk full after {len(on_disk)}/{len(source.order)} chunks stored, {acked} acked")
    assert acked <= len(on_disk), (acked, on_disk)  # nothing acknowledged that is not stored
    inventory, result = run(restart_and_finish())
    assert sorted(inventory["have"]) == sorted(on_disk)  # after restart: inventory == disk
    print(f"after restart: inventory {len(inventory['have'])} chunks == {len(on_disk)} on disk")
    assert result.complete and result.verified
    check_complete(folder, volume, header)


# --- 3. TLS -----------------------------------------------------------------------------------------

def test_tls_signaling_delivers_and_checks_the_certificate(studies, tmp_path):
    (path, volume, header), (other, other_volume, other_header) = studies["a"], studies["b"]
    cert, key = make_certificate(tmp_path / "tls")

    async def scenario():
        from shared.link.signaling import run_behind_link

        async with Receiver(tmp_path / "out", tls=server_tls_context(cert, key)) as service:
            assert service.url.startswith("https://")
            with pytest.raises(Refused, match="not trusted"):
                await stream_study(FileSource(path), service.url, TOKEN, quick())
            direct = await stream_study(FileSource(path), service.url, TOKEN,
                                        quick(ca_file=str(cert)))
            # dlad-link in front of an HTTPS receiver: it checks the certificate upstream.
            url, proxy = await run_behind_link(service.url + "/studies", "lan-100m",
                                               ca_file=str(cert))
            try:
                linked = await stream_study(FileSource(other), url, TOKEN, quick())
            finally:
                await proxy.stop()
            return direct, linked

    direct, linked = run(scenario())
    assert direct.complete and direct.verified and linked.complete and linked.verified
    check_complete(tmp_path / "out" / header.study_id, volume, header)
    check_complete(tmp_path / "out" / other_header.study_id, other_volume, other_header)


def test_plain_http_is_refused_off_loopback(tmp_path, token_file):
    async def scenario():
        service = ReceiverService(ServiceConfig(out_dir=tmp_path / "out", token=TOKEN))
        with pytest.raises(PlainHttpRefused):
            await service.start("0.0.0.0", 0)
        service.store.close()
        service.executor.shutdown()

    run(scenario())
    sent = subprocess.run([sys.executable, "-m", "sender.cli", "phantom", "--to",
                           "http://192.0.2.1:8700", "--token-file", str(token_file)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 2 and "refusing plain HTTP" in sent.stderr
    received = subprocess.run([sys.executable, "-m", "receiver.cli", "--listen", "0.0.0.0:0",
                               "--token-file", str(token_file), "--out-dir",
                               str(tmp_path / "o2")], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    assert received.returncode == 1 and "refusing plain HTTP" in received.stderr


# --- 5. hygiene ----------------------------------------------------------------------------------------

def test_weak_tokens_are_refused(tmp_path):
    weak = tmp_path / "weak.txt"
    weak.write_text("secret-password\n")
    weak.chmod(0o600)
    with pytest.raises(TokenError, match="weak"):
        read_token_file(weak)
    assert read_token_file(weak, allow_weak=True) == "secret-password"
    assert read_token_file(weak, role="sender") == "secret-password"  # the receiver decides
    assert token_bits("a" * 64) < 128 and token_bits(os.urandom(16).hex()) == 128
    assert token_bits(TOKEN) >= 128


def test_receiver_outputs_are_private_and_forged_ids_stay_on_one_line(studies, tmp_path,
                                                                      token_file):
    from test_streaming import retitle, send_command, start_receiver_process

    path, volume, header = studies["a"]
    forged = tmp_path / "forged.dlad"
    retitle(path, forged, "x\ndlad-receive: 00:00:00 study y: SHA-256 verified")
    receiver = start_receiver_process(tmp_path, token_file)
    try:
        sent = subprocess.run(send_command(token_file, receiver.url, str(forged), "--quiet"),
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert sent.returncode == 0, sent.stderr
    finally:
        receiver.stop()
    log = receiver.log_path.read_text()
    assert not any(line.startswith("dlad-receive: 00:00:00") for line in log.splitlines())
    assert "\\ndlad-receive: 00:00:00" in log
    out = receiver.out_dir
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for item in out.rglob("*"):
        expected = 0o700 if item.is_dir() else 0o600
        assert stat.S_IMODE(item.stat().st_mode) == expected, item


def test_a_peer_ignoring_the_receive_window_cannot_make_sctp_buffer_without_end():
    """One endless message (and out-of-order data behind a gap): aiortc's reassembly stays
    bounded (shared/webrtc/sctp.py), and the association still carries data afterwards."""
    from aiortc import RTCConfiguration, RTCPeerConnection
    from aiortc.rtcsctptransport import SCTP_DATA_FIRST_FRAG, DataChunk, tsn_plus_one

    from shared.webrtc import sctp
    from shared.webrtc.ice import ice_hosts

    if sctp.bounds_status() != "applied":
        pytest.skip(sctp.bounds_status())

    async def scenario():
        with ice_hosts(("127.0.0.1",)):
            offerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            answerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        channel = offerer.createDataChannel("test")
        received = asyncio.Queue()
        answerer.on("datachannel", lambda incoming: incoming.on(
            "message", lambda message: received.put_nowait(message)))
        try:
            with ice_hosts(("127.0.0.1",)):
                await offerer.setLocalDescription(await offerer.createOffer())
                await answerer.setRemoteDescription(offerer.localDescription)
                await answerer.setLocalDescription(await answerer.createAnswer())
                await offerer.setRemoteDescription(answerer.localDescription)
            opened = asyncio.Event()
            channel.on("open", opened.set)
            await asyncio.wait_for(opened.wait(), 30)
            channel.send(b"before")
            assert await asyncio.wait_for(received.get(), 30) == b"before"
            transport = answerer.sctp
            tsn = transport._last_received_tsn
            peak = 0
            # Out of order, behind a gap (TSN + 1 never comes), then an endless message.
            for index in range(12_000):  # 12,000 x 1,160 bytes: 13 MiB
                chunk = DataChunk(flags=SCTP_DATA_FIRST_FRAG if index == 0 else 0)
                chunk.tsn = (tsn + 2 + index) % (1 << 32)
                chunk.stream_id, chunk.stream_seq, chunk.protocol = channel.id, 999, 53
                chunk.user_data = b"x" * 1160
                await transport._receive_data_chunk(chunk)
                peak = max(peak, (1 << 20) - transport._advertised_rwnd)
            for _ in range(12_000):  # in order: a message that never ends
                tsn = transport._last_received_tsn
                chunk = DataChunk(flags=0)
                chunk.tsn = tsn_plus_one(tsn)
                chunk.stream_id, chunk.stream_seq, chunk.protocol = channel.id, 1000, 53
                chunk.user_data = b"y" * 1160
                await transport._receive_data_chunk(chunk)
                peak = max(peak, (1 << 20) - transport._advertised_rwnd)
            return peak
        finally:
            await offerer.close()
            await answerer.close()

    peak = run(scenario(), timeout=120)
    print(f"peak SCTP reassembly buffer: {peak / 2**20:.1f} MiB")
    assert peak <= sctp.MAX_REASSEMBLY_BYTES + 2 * 262144 + 1160
