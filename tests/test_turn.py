"""A study delivered through a real TURN server (coturn) between peers with no route to each other.

Three network namespaces: the receiver's (10.71.1.2) and the sender's (10.71.2.2), each joined
by a veth pair to a middle one (10.71.1.1, 10.71.2.1) that does not forward packets. coturn
runs in the middle one; so does a TCP forwarder for the HTTPS signaling (the only path between
the peers besides the relay). Both peers get ``--ice-server turn:...`` and the credentials;
their host candidates cannot reach each other, so the media can only cross through coturn's
relay. Needs root, ``ip netns`` and ``turnserver`` (``.ci/run`` installs coturn); skipped with
the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from attack_helpers import make_certificate
from test_streaming import ROOT, TOKEN, check_complete, encode_phantom, study_folders

RECEIVER_IP, TURN_RECEIVER_SIDE = "10.71.1.2", "10.71.1.1"
SENDER_IP, TURN_SENDER_SIDE = "10.71.2.2", "10.71.2.1"
SIGNALING_PORT = 8700
TURN_PORT = 3478

FORWARDER = """
import asyncio, sys
listen_host, listen_port, target_host, target_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
async def handle(reader, writer):
    target_reader, target_writer = await asyncio.open_connection(target_host, target_port)
    await asyncio.gather(pipe(reader, target_writer), pipe(target_reader, writer), return_exceptions=True)
async def main():
    server = await asyncio.start_server(handle, listen_host, listen_port)
    print("forwarding", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture()
def namespaces():
    """(receiver ns, sender ns, middle ns), torn down afterwards; skips where not possible."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")
    if shutil.which("turnserver") is None:
        pytest.skip("no turnserver (apt-get install coturn; .ci/run does)")
    tag = f"{os.getpid() % 100000}"
    names = (f"dlr{tag}", f"dls{tag}", f"dlt{tag}")
    probe = sh("ip", "netns", "add", names[2], check=False)
    if probe.returncode != 0:
        pytest.skip(f"the kernel does not allow network namespaces here: {probe.stderr.strip()}")
    try:
        for name in names[:2]:
            sh("ip", "netns", "add", name)
        receiver, sender, middle = names
        for ns, link, address, peer_address in ((receiver, f"vr{tag}", RECEIVER_IP,
                                                 TURN_RECEIVER_SIDE),
                                                (sender, f"vs{tag}", SENDER_IP,
                                                 TURN_SENDER_SIDE)):
            sh("ip", "link", "add", f"{link}a", "type", "veth", "peer", "name", f"{link}b")
            sh("ip", "link", "set", f"{link}a", "netns", ns)
            sh("ip", "link", "set", f"{link}b", "netns", middle)
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", f"{link}a")
            sh("ip", "-n", middle, "addr", "add", f"{peer_address}/24", "dev", f"{link}b")
            sh("ip", "-n", ns, "link", "set", f"{link}a", "up")
            sh("ip", "-n", middle, "link", "set", f"{link}b", "up")
        for ns in names:
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", middle, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        yield names
    finally:
        for name in names:
            sh("ip", "netns", "del", name, check=False)


def start(ns: str, command: list[str], log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen(["ip", "netns", "exec", ns, *command], stdout=handle,
                            stderr=subprocess.STDOUT, cwd=ROOT)


def wait_for(log: Path, pattern: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text()):
            return
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in {log}: {log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


TURN_CREDENTIALS = "dlad:turn-password-0123456789"


@contextlib.contextmanager
def relay_and_receiver(tmp_path: Path, namespaces, *receiver_options: str):
    """coturn and the signaling forwarder in the middle namespace, an HTTPS receiver with the
    relay in its own; yields ``(token, credentials, cert, out, logs)`` and stops them after."""
    receiver_ns, sender_ns, middle_ns = namespaces
    # The peers really have no route to each other.
    route = sh("ip", "netns", "exec", receiver_ns, "ip", "route", "get", SENDER_IP, check=False)
    assert route.returncode != 0, route.stdout
    token = tmp_path / "token.txt"
    token.write_text(TOKEN + "\n")
    credentials = tmp_path / "turn.txt"
    credentials.write_text(TURN_CREDENTIALS + "\n")
    for path in (token, credentials):
        path.chmod(0o600)
    cert, key = make_certificate(tmp_path / "tls", addresses=(TURN_SENDER_SIDE, RECEIVER_IP))
    logs = {name: tmp_path / f"{name}.log" for name in ("turn", "forward", "receiver")}
    out = tmp_path / "out"
    processes = []
    try:
        turn = start(middle_ns, [
            "turnserver", "-n", f"--listening-ip={TURN_RECEIVER_SIDE}",
            f"--listening-ip={TURN_SENDER_SIDE}", f"--relay-ip={TURN_RECEIVER_SIDE}",
            f"--listening-port={TURN_PORT}", "--lt-cred-mech", f"--user={TURN_CREDENTIALS}",
            "--realm=dlad.test", "--no-tls", "--no-dtls", "--no-cli", "--fingerprint",
            "--log-file=stdout", "--simple-log", "--min-port=49160", "--max-port=49200",
            "--pidfile", str(tmp_path / "turn.pid")], logs["turn"])
        processes.append(turn)
        forward = start(middle_ns, [sys.executable, "-c", FORWARDER, TURN_SENDER_SIDE,
                                    str(SIGNALING_PORT), RECEIVER_IP, str(SIGNALING_PORT)],
                        logs["forward"])
        processes.append(forward)
        receiver = start(receiver_ns, [
            sys.executable, "-m", "receiver.cli", "--listen", f"{RECEIVER_IP}:{SIGNALING_PORT}",
            "--token-file", str(token), "--out-dir", str(out), "--tls-cert", str(cert),
            "--tls-key", str(key), "--ice-server", f"turn:{TURN_RECEIVER_SIDE}:{TURN_PORT}",
            "--ice-credentials", str(credentials), *receiver_options], logs["receiver"])
        processes.append(receiver)
        wait_for(logs["forward"], "forwarding", forward)
        wait_for(logs["receiver"], "listening on https://", receiver)
        wait_for(logs["turn"], "(?i)listener opened|relay", turn, timeout=30)
        yield token, credentials, cert, out, logs
    finally:
        for process in reversed(processes):
            stop(process)


def sender_connection_options(token: Path, credentials: Path, cert: Path) -> list[str]:
    """What the sender needs to reach the receiver from its namespace: HTTPS through the
    forwarder (its CA), the TURN server on its side of the middle namespace."""
    return ["--to", f"https://{TURN_SENDER_SIDE}:{SIGNALING_PORT}", "--token-file", str(token),
            "--ca-file", str(cert), "--ice-server", f"turn:{TURN_SENDER_SIDE}:{TURN_PORT}",
            "--ice-credentials", str(credentials)]


def check_relayed(receiver_text: str, sessions: int = 1) -> None:
    """Every ICE pair the receiver nominated has a relay end, none the sender's own address."""
    pairs = re.findall(r"ICE (\w+) ([\d.]+):\d+ -> (\w+) ([\d.]+):\d+", receiver_text)
    assert len(pairs) >= sessions, receiver_text[-3000:]
    for pair in pairs:
        assert "relay" in (pair[0], pair[2]), pair
        assert SENDER_IP not in pair, pair  # no direct path was used


def test_study_crosses_a_turn_relay_between_isolated_peers(tmp_path, namespaces):
    receiver_ns, sender_ns, middle_ns = namespaces
    study = tmp_path / "study.dlad"
    volume, header = encode_phantom(study, seed=7, exact=True)
    with relay_and_receiver(tmp_path, namespaces) as (token, credentials, cert, out, logs):
        sent = subprocess.run(
            ["ip", "netns", "exec", sender_ns, sys.executable, "-m", "sender.cli", str(study),
             *sender_connection_options(token, credentials, cert), "--retries", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=240)
    receiver_text = logs["receiver"].read_text()
    assert sent.returncode == 0, (sent.stderr[-3000:], receiver_text[-3000:],
                                  logs["turn"].read_text()[-3000:])
    assert "SHA-256 verified by the receiver" in sent.stdout
    check_relayed(receiver_text)
    (folder,) = study_folders(out)
    check_complete(folder, volume, header)


def test_live_session_crosses_a_turn_relay(tmp_path, namespaces):
    """``dlad-send --dicom-listen`` with the same connection options (HTTPS with ``--ca-file``,
    ``--ice-server`` and ``--ice-credentials``) to a receiver that probes only the relay
    (``--allow-peers``): storescu pushes a series to the node in the sender's namespace, it
    arrives bit-exact through coturn."""
    from live_series import write_series
    from test_live import J2K, check_received, series_folders

    from models.phantoms import make_phantom
    from tests.dcmtk import dcmtk_tool

    storescu = dcmtk_tool("storescu")
    if storescu is None:
        pytest.skip("no dcmtk storescu (apt-get install dcmtk; .ci/run does)")
    receiver_ns, sender_ns, middle_ns = namespaces
    volume = make_phantom((8, 64, 80), spacing=(5.0, 5.2, 2.5), seed=21)[0]
    _, series_uid, files = write_series(tmp_path / "series", volume, transfer_syntax=J2K)
    session_log = tmp_path / "session.jsonl"
    with relay_and_receiver(tmp_path, namespaces, "--allow-peers",
                            f"{TURN_RECEIVER_SIDE}/32") as (token, credentials, cert, out, logs):
        sender_log = tmp_path / "sender.log"
        sender = start(sender_ns, [
            sys.executable, "-m", "sender.cli", "--dicom-listen", "127.0.0.1:11112",
            *sender_connection_options(token, credentials, cert), "--spool",
            str(tmp_path / "spool"), "--exact", "--roi", "body", "--series-count", str(len(files)),
            "--session-log", str(session_log)], sender_log)
        try:
            wait_for(sender_log, "live session ready", sender, timeout=120)
            pushed = subprocess.run(["ip", "netns", "exec", sender_ns, storescu, "-xv", "-aec",
                                     "DLAD", "127.0.0.1", "11112", *map(str, files)],
                                    capture_output=True, text=True, timeout=60)
            assert pushed.returncode == 0, pushed.stdout + pushed.stderr
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and not (
                    session_log.exists() and session_log.read_text().strip()):
                assert sender.poll() is None, sender_log.read_text()[-3000:]
                time.sleep(0.2)
        finally:
            stop(sender)
    receiver_text = logs["receiver"].read_text()
    lines = [json.loads(line) for line in session_log.read_text().splitlines()]
    assert [line["outcome"] for line in lines] == ["delivered"], (
        lines, sender_log.read_text()[-3000:], receiver_text[-3000:])
    assert "outside --allow-peers dropped" in receiver_text  # the sender's host candidates
    check_relayed(receiver_text)
    check_received(series_folders(out)[series_uid], volume, len(files))
