#!/usr/bin/env python
"""Load held by ``dlad-receive --listen`` under attack: legitimate studies beside attackers.

Every scenario starts a fresh receiver process on loopback (default limits unless said) and
replays pre-encoded phantom studies with ``dlad-send study.dlad --to URL`` (separate processes).
Attackers run as child processes of this script (``--attack KIND``, at ``nice 19``: on one
2-core machine their own CPU would otherwise be taken from the legitimate sender, which a
remote attacker's is not) and report what happened to them as JSON lines:

* ``flood``: a session with the valid token sends a header, then garbage (random bytes with a
  frame magic every 64 bytes) as fast as the channel takes it; when closed, it reconnects and
  starts again. Reports the seconds from its first garbage to the receiver's ``error``.
* ``slowloris``: 200 connections without a token that send a request head a byte at a time
  (half send nothing at all), reopened when closed. Reports how long each stayed open.
* ``hog``: two sessions that each send the header of a large study (42 Mi voxels, 84 MB of
  int16) and its first chunk (so the receiver really allocates the volume), then nothing, to
  take memory; refused ones retry.
* ``spam``: offers without a token, 50 at a time, in a loop (401s, log lines).

Scenarios, interleaved run by run (``--runs``):

* ``solo`` / ``flood``: one legitimate study alone, and beside the flooder. Slowdown = median
  transfer time beside the flood / median alone (target <= 1.5); the flooder's sessions must be
  closed within 2 s; receiver log growth per second of flood.
* ``slowloris``: one legitimate study beside 200 slow connections (target: unaffected; all
  closed within 30 s).
* ``quiet`` / ``crowd``: ``--studies`` (4) legitimate studies at once, alone and beside all four
  attackers, with ``--memory-budget 512M``: all bit-exact (the receiver's SHA-256 check, and
  this script's own check of the snapshot against the original voxels), the receiver's peak RSS
  above idle (target <= the budget), its CPU, and each transfer's slowdown.
* ``offers`` (once): 100 offers in parallel against ``--max-sessions 8`` (count of 201 / 503),
  then a legitimate sender that arrives while all slots are taken; one attacker session is
  deleted and the time until the legitimate study is complete is measured.

Transfer time = the receiver's ``status.json`` ``transfer.last_pass.seconds`` (inventory sent
to ``done`` sent). Memory = the receiver's VmHWM (peak RSS) minus its RSS when idle; CPU =
its utime + stime over the scenario.

Usage::

    python scripts/bench_stress.py [--runs 3] [--studies 4] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # attack_helpers: the attack suite's tools
sys.path.insert(0, str(ROOT / "scripts"))

from bench_stream import proc_cpu, proc_mem, start_receiver  # noqa: E402

STUDY_SHAPE = (48, 256, 256)
HOG_SHAPE = (160, 512, 512)


# --- attackers (child processes: python scripts/bench_stress.py --attack KIND URL TOKEN) -------

def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def flood(url: str, token: str) -> None:
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from attack_helpers import blank_header, garbage

    from shared.webrtc.ice import ice_hosts
    from shared.webrtc.protocol import CHANNEL_LABEL, encode_control, split_message

    junk = garbage(16 * 1024)
    number = 0
    while True:
        number += 1
        header = blank_header(f"flood-{os.getpid()}-{number}", (8, 64, 64)).to_frame()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        channel = pc.createDataChannel(CHANNEL_LABEL)
        opened, errors = asyncio.Event(), asyncio.Queue()
        channel.on("open", opened.set)
        channel.on("message", lambda m, queue=errors: queue.put_nowait(json.loads(m)))
        try:
            with ice_hosts(("127.0.0.1",)):
                await pc.setLocalDescription(await pc.createOffer())
            async with aiohttp.ClientSession() as http:
                async with http.post(url + "/studies", data=pc.localDescription.sdp.encode(),
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/sdp"}) as response:
                    if response.status != 201:
                        await asyncio.sleep(0.5)
                        continue
                    answer = await response.text()
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            await asyncio.wait_for(opened.wait(), 30)
            channel.send(encode_control("hello", protocol=1))
            for piece in split_message(header):
                channel.send(piece)
            while (await asyncio.wait_for(errors.get(), 30))["type"] != "inventory":
                pass
            started = time.monotonic()
            reason = None
            while time.monotonic() - started < 60:
                while not errors.empty():
                    message = errors.get_nowait()
                    if message["type"] == "error":
                        reason = message["reason"]
                if reason is not None or channel.readyState != "open":
                    break
                if channel.bufferedAmount < 256 * 1024:
                    channel.send(junk)
                await asyncio.sleep(0.001)
            report(attack="flood", closed_after=round(time.monotonic() - started, 3),
                   reason=reason)
        except (asyncio.TimeoutError, OSError, aiohttp.ClientError) as error:
            report(attack="flood", failed=str(error))
            await asyncio.sleep(0.5)
        finally:
            await pc.close()


async def slowloris(url: str, token: str) -> None:
    from attack_helpers import slow_client

    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)

    async def one(index: int) -> None:
        while True:
            seconds = await slow_client(host, int(port), index % 2 == 0,
                                        time.monotonic() + 120)
            report(attack="slowloris", open_s=None if seconds is None else round(seconds, 2))

    await asyncio.gather(*(one(i) for i in range(200)))


async def hog(url: str, token: str) -> None:
    import aiohttp
    import numpy as np
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from attack_helpers import blank_header

    from shared.codecs import get_codec
    from shared.webrtc.ice import ice_hosts
    from shared.webrtc.protocol import CHANNEL_LABEL, encode_control, split_message
    from shared.wire import DataChunk

    async def one(index: int) -> None:
        number = 0
        while True:
            number += 1
            study = blank_header(f"hog-{index}-{number}", HOG_SHAPE)
            header = study.to_frame()
            _, layer, z0, z1 = study.plan[0]
            block = np.zeros((z1 - z0, *HOG_SHAPE[1:]), np.int16)
            payload, params = get_codec("zstd").encode(block)
            first = DataChunk(study.study_id, 0, layer, z0, z1, "zstd", params, payload).to_frame()
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            channel = pc.createDataChannel(CHANNEL_LABEL)
            opened, messages = asyncio.Event(), asyncio.Queue()
            channel.on("open", opened.set)
            channel.on("message", lambda m, queue=messages: queue.put_nowait(json.loads(m)))
            try:
                with ice_hosts(("127.0.0.1",)):
                    await pc.setLocalDescription(await pc.createOffer())
                async with aiohttp.ClientSession() as http:
                    async with http.post(url + "/studies", data=pc.localDescription.sdp.encode(),
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/sdp"}) as response:
                        answer = await response.text()
                        if response.status != 201:
                            await asyncio.sleep(1)
                            continue
                await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
                await asyncio.wait_for(opened.wait(), 30)
                channel.send(encode_control("hello", protocol=1))
                for piece in split_message(header):
                    channel.send(piece)
                message = await asyncio.wait_for(messages.get(), 60)
                report(attack="hog", answer=message["type"], reason=message.get("reason"))
                if message["type"] == "inventory":
                    for piece in split_message(first):  # the volume gets allocated
                        channel.send(piece)
                # Hold the memory until the receiver closes the session.
                while channel.readyState == "open":
                    await asyncio.sleep(0.5)
            except (asyncio.TimeoutError, OSError, aiohttp.ClientError) as error:
                report(attack="hog", failed=str(error))
                await asyncio.sleep(1)
            finally:
                await pc.close()

    await asyncio.gather(one(0), one(1))


async def spam(url: str, token: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        while True:
            async def post():
                async with http.post(url + "/studies", data=b"v=0\r\n",
                                     headers={"Content-Type": "application/sdp"}) as response:
                    return response.status
            codes = await asyncio.gather(*(post() for _ in range(50)), return_exceptions=True)
            report(attack="spam", codes=sorted({c for c in codes if isinstance(c, int)}))
            await asyncio.sleep(0.05)


ATTACKS = {"flood": flood, "slowloris": slowloris, "hog": hog, "spam": spam}


class Attacker:
    """An attack in a child process; its JSON lines collected into ``events``."""

    def __init__(self, kind: str, url: str, token: str, work: Path):
        self.kind = kind
        self.output = work / f"attack-{kind}-{secrets.token_hex(3)}.jsonl"
        self.handle = open(self.output, "w")
        # At the lowest priority: on this 2-core machine the attacker's own CPU would otherwise
        # be taken from the legitimate sender; a real attacker spends its own machine's.
        self.process = subprocess.Popen(
            ["nice", "-n", "19", sys.executable, __file__, "--attack", kind, url, token],
            cwd=ROOT, stdout=self.handle, stderr=subprocess.DEVNULL)

    def events(self) -> list[dict]:
        events = []
        for line in self.output.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        return events

    def stop(self) -> list[dict]:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.handle.close()
        return self.events()

    def wait_for(self, predicate, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(predicate(event) for event in self.events()):
                return
            time.sleep(0.1)
        raise RuntimeError(f"attack {self.kind}: nothing happened in {timeout:g} s")


# --- legitimate studies --------------------------------------------------------------------------

def encode_studies(work: Path, count: int) -> list[dict]:
    from models.phantoms import make_phantom
    from sender.encoder import EncodeSettings, StudyEncoder
    from sender.pipeline import prepare_study
    from sender.roi.provider import StaticMaskProvider

    studies = []
    for index in range(count):
        volume, liver = make_phantom(STUDY_SHAPE, spacing=(330 / STUDY_SHAPE[2],
                                                          330 / STUDY_SHAPE[1], 2.5),
                                     seed=20 + index)
        prepared = prepare_study(volume, StaticMaskProvider(liver, "phantom liver"))
        encoder = StudyEncoder(prepared, EncodeSettings(exact=True))
        path = work / f"study-{index}.dlad"
        with open(path, "wb") as out:
            for data in encoder.frames():
                out.write(data)
        studies.append({"path": path, "study_id": encoder.header.study_id,
                        "sha256": encoder.header.sha256, "bytes": path.stat().st_size})
    return studies


def send(receiver, studies: list[dict], token_file: Path) -> list[dict]:
    """Replay ``studies`` at once; return each one's outcome, checked bit-exact."""
    from shared.nifti import read_nifti
    from shared.wire import voxel_sha256

    senders = [subprocess.Popen(
        [sys.executable, "-m", "sender.cli", str(study["path"]), "--to", receiver.url,
         "--token-file", str(token_file), "--quiet"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for study in studies]
    peak = 0
    while any(s.poll() is None for s in senders):
        peak = max(peak, proc_mem(receiver.pid)["VmHWM"])
        time.sleep(0.05)
    time.sleep(0.5)  # the last snapshot
    outcomes = []
    for study, sender in zip(studies, senders):
        _, err = sender.communicate()
        outcome = {"study": study["study_id"], "exit": sender.returncode}
        folder = receiver.out_dir / study["study_id"]
        try:
            status = json.loads((folder / "status.json").read_text())
            snapshot = read_nifti(folder / status["snapshot"]["file"])
            outcome.update(seconds=status["transfer"]["last_pass"]["seconds"],
                           verified=status["verified_sha256"],
                           independent=voxel_sha256(snapshot.data) == study["sha256"])
        except (OSError, KeyError, ValueError) as error:
            outcome.update(seconds=None, verified=False, independent=False, error=str(error),
                           stderr=err[-500:])
        outcomes.append(outcome)
    return outcomes


def run_scenario(name: str, studies: list[dict], token_file: Path, work: Path,
                 attacks: tuple = (), extra: tuple = ()) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    receiver, idle, cpu0 = start_receiver(folder, token_file, *extra)
    attackers = []
    try:
        token = token_file.read_text().strip()
        for kind in attacks:
            attackers.append(Attacker(kind, receiver.url, token, work))
        for attacker in attackers:  # the attack is under way before the legit senders start
            if attacker.kind == "flood":
                attacker.wait_for(lambda e: "closed_after" in e)
            elif attacker.kind == "hog":
                attacker.wait_for(lambda e: "answer" in e)
        if attackers:
            time.sleep(1.0)
        log_before = receiver.log_path.stat().st_size
        attack_started = time.monotonic()
        outcomes = send(receiver, studies, token_file)
        wall = time.monotonic() - attack_started
        for attacker in attackers:  # how long the slow connections are held (up to 40 s)
            if attacker.kind == "slowloris":
                deadline = time.monotonic() + 40
                while (time.monotonic() < deadline and sum(
                        1 for e in attacker.events() if e.get("open_s") is not None) < 200):
                    time.sleep(0.2)
        attack_seconds = time.monotonic() - attack_started
        log_growth = receiver.log_path.stat().st_size - log_before
        cpu = proc_cpu(receiver.pid) - cpu0
        memory = proc_mem(receiver.pid)
    finally:
        events = [event for attacker in attackers for event in attacker.stop()]
        receiver.stop()
    floods = [e["closed_after"] for e in events if "closed_after" in e]
    slow = [e["open_s"] for e in events if e.get("attack") == "slowloris"]
    return {
        "scenario": name, "load_avg": round(os.getloadavg()[0], 2), "outcomes": outcomes,
        "all_bit_exact": all(o["verified"] and o["independent"] and o["exit"] == 0
                             for o in outcomes),
        "seconds": [o["seconds"] for o in outcomes],
        "wall_s": round(wall, 3),
        "receiver_idle_rss_mb": round(idle["VmRSS"] / 2**20, 1),
        "receiver_peak_above_idle_mb": round((memory["VmHWM"] - idle["VmRSS"]) / 2**20, 1),
        "receiver_cpu_s": round(cpu, 2),
        "log_bytes_per_s": round(log_growth / max(attack_seconds, 1e-3)),
        "flood_sessions": len(floods), "flood_closed_max_s": max(floods, default=None),
        "flood_closed_median_s": statistics.median(floods) if floods else None,
        "slow_connections_closed": len(slow), "slow_open_max_s": max(
            (s for s in slow if s is not None), default=None),
        "slow_left_open": sum(1 for s in slow if s is None),
    }


# --- the offers scenario (in this process) ----------------------------------------------------------

def run_offers(study: dict, token_file: Path, work: Path) -> dict:
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection

    from shared.webrtc.ice import ice_hosts
    from shared.webrtc.protocol import CHANNEL_LABEL

    folder = Path(tempfile.mkdtemp(prefix="offers-", dir=work))
    receiver, _, _ = start_receiver(folder, token_file, "--max-sessions", "8")
    token = token_file.read_text().strip()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/sdp"}

    async def scenario():
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.createDataChannel(CHANNEL_LABEL)
        with ice_hosts(("127.0.0.1",)):
            await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp.encode()
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            async def post():
                async with http.post(receiver.url + "/studies", data=offer,
                                     headers=headers) as response:
                    await response.read()
                    return response.status, response.headers.get("Location")
            answers = await asyncio.gather(*(post() for _ in range(100)))
            sender_log = open(folder / "sender.log", "w")
            sender = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sender.cli", str(study["path"]), "--to", receiver.url,
                "--token-file", str(token_file), cwd=ROOT, stdout=sender_log,
                stderr=sender_log)
            # Wait until the sender has been told the receiver is busy, then free one slot.
            deadline = time.monotonic() + 120
            while "busy" not in (folder / "sender.log").read_text():
                assert time.monotonic() < deadline and sender.returncode is None
                await asyncio.sleep(0.05)
            waiting = sender.returncode is None
            attackers = {loc.rsplit("/", 1)[-1] for code, loc in answers if code == 201}
            location = next(loc for code, loc in answers if code == 201)
            freed = time.monotonic()
            async with http.delete(receiver.url + location, headers=headers) as response:
                await response.read()
            admitted = None
            while admitted is None and sender.returncode is None:
                async with http.get(receiver.url + "/studies", headers=headers) as response:
                    listing = await response.json()
                if any(s["id"] not in attackers for s in listing["sessions"]):
                    admitted = time.monotonic() - freed
                await asyncio.sleep(0.02)
            code = await sender.wait()
            served = time.monotonic() - freed
            sender_log.close()
        await pc.close()
        return [c for c, _ in answers], waiting, code, served, admitted

    try:
        codes, waiting, code, served, admitted = asyncio.run(scenario())
        status = json.loads((receiver.out_dir / study["study_id"] / "status.json").read_text())
    finally:
        receiver.stop()
    return {"scenario": "offers", "accepted": codes.count(201), "busy": codes.count(503),
            "other": len(codes) - codes.count(201) - codes.count(503),
            "legit_waited_while_full": waiting, "legit_exit": code,
            "legit_admitted_after_slot_freed_s": None if admitted is None else round(admitted, 2),
            "legit_done_after_slot_freed_s": round(served, 2),
            "verified": status["verified_sha256"], "load_avg": round(os.getloadavg()[0], 2)}


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--attack":
        kind, url, token = sys.argv[2:5]
        try:
            asyncio.run(ATTACKS[kind](url, token))
        except KeyboardInterrupt:
            pass
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each scenario")
    parser.add_argument("--studies", type=int, default=4, help="legitimate studies at once")
    parser.add_argument("--scenarios", default="flood,slowloris,crowd,offers",
                        help="comma-separated scenarios (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-stress-"))
    token_file = work / "token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
          f"encoding {args.studies} studies {STUDY_SHAPE}", file=sys.stderr)
    studies = encode_studies(work, args.studies)
    chosen = args.scenarios.split(",")
    budget = ("--memory-budget", "512M")
    plans = []
    for _ in range(args.runs):  # interleaved: each run has every scenario once
        if "flood" in chosen:
            plans += [("solo", studies[:1], (), ()), ("flood", studies[:1], ("flood",), ())]
        if "slowloris" in chosen:
            plans += [("slowloris", studies[:1], ("slowloris",), ())]
        if "crowd" in chosen:
            plans += [("quiet", studies, (), budget),
                      ("crowd", studies, ("flood", "slowloris", "hog", "spam"), budget)]
    results = []
    for name, chosen_studies, attacks, extra in plans:
        result = run_scenario(name, chosen_studies, token_file, work, attacks, extra)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "outcomes"}), file=sys.stderr)
    if "offers" in chosen:
        results.append(run_offers(studies[0], token_file, work))
        print(json.dumps(results[-1]), file=sys.stderr)
    summary = summarise(results, args.studies)
    print(summary)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "summary": summary}, indent=1,
                                        default=str))
    return 0


def summarise(results: list[dict], count: int) -> str:
    def of(name):
        return [r for r in results if r["scenario"] == name]

    lines = ["| scenario | runs | transfer s (median) | all done s (median) | slowdown | "
             "bit-exact | peak RSS above idle MB (max) | receiver CPU s (median) | "
             "log B/s (max) | attack figures |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    solo = median([s for r in of("solo") for s in r["seconds"]])
    quiet = median([r["wall_s"] for r in of("quiet")])
    # One study: its transfer (inventory to done) against the same alone; several at once: the
    # time until all are done (senders turned away for memory wait, not transfer).
    for name, base, key in (("solo", None, "seconds"), ("flood", solo, "seconds"),
                            ("slowloris", solo, "seconds"), ("quiet", None, "wall_s"),
                            ("crowd", quiet, "wall_s")):
        rows = of(name)
        if not rows:
            continue
        seconds = median([s for r in rows for s in r["seconds"]])
        wall = median([r["wall_s"] for r in rows])
        measured = seconds if key == "seconds" else wall
        slowdown = f"{measured / base:.2f}x" if base and measured else "-"
        figures = []
        if name in ("flood", "crowd"):
            figures.append(f"flood sessions closed after <= "
                           f"{max((r['flood_closed_max_s'] or 0) for r in rows):.2f} s "
                           f"({sum(r['flood_sessions'] for r in rows)} sessions)")
        if name in ("slowloris", "crowd"):
            figures.append(f"slow connections open <= "
                           f"{max((r['slow_open_max_s'] or 0) for r in rows):.1f} s, "
                           f"{sum(r['slow_left_open'] for r in rows)} left open")
        lines.append(
            f"| {name} | {len(rows)} | {seconds} | {wall} | {slowdown} | "
            f"{all(r['all_bit_exact'] for r in rows)} ({sum(len(r['outcomes']) for r in rows)}"
            f" studies) | {max(r['receiver_peak_above_idle_mb'] for r in rows)} | "
            f"{median([r['receiver_cpu_s'] for r in rows])} | "
            f"{max(r['log_bytes_per_s'] for r in rows)} | {'; '.join(figures) or '-'} |")
    for row in of("offers"):
        lines.append(f"\noffers: 100 in parallel with --max-sessions 8: {row['accepted']} "
                     f"accepted, {row['busy']} got 503, {row['other']} other; the legitimate "
                     f"sender waited while full: {row['legit_waited_while_full']}, was admitted "
                     f"{row['legit_admitted_after_slot_freed_s']} s and done "
                     f"{row['legit_done_after_slot_freed_s']} s after a slot was freed "
                     f"(exit {row['legit_exit']}, verified {row['verified']})")
    loads = [r["load_avg"] for r in results]
    lines.append(f"\nload average during the runs: {min(loads)}-{max(loads)}; "
                 f"{count} studies of {STUDY_SHAPE} at once in quiet/crowd")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
