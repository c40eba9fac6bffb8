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


def test_study_crosses_a_turn_relay_between_isolated_peers(tmp_path, namespaces):
    receiver_ns, sender_ns, middle_ns = namespaces
    # The peers really have no route to each other.
    route = sh("ip", "netns", "exec", receiver_ns, "ip", "route", "get", SENDER_IP, check=False)
    assert route.returncode != 0, route.stdout
    study = tmp_path / "study.dlad"
    volume, header = encode_phantom(study, seed=7, exact=True)
    token = tmp_path / "token.txt"
    token.write_text(TOKEN + "\n")
    credentials = tmp_path / "turn.txt"
    credentials.write_text("dlad:turn-password-0123456789\n")
    for path in (token, credentials):
        path.chmod(0o600)
    cert, key = make_certificate(tmp_path / "tls", addresses=(TURN_SENDER_SIDE, RECEIVER_IP))
    processes = []
    try:
        turn_log = tmp_path / "turn.log"
        turn = start(middle_ns, [
            "turnserver", "-n", f"--listening-ip={TURN_RECEIVER_SIDE}",
            f"--listening-ip={TURN_SENDER_SIDE}", f"--relay-ip={TURN_RECEIVER_SIDE}",
            f"--listening-port={TURN_PORT}", "--lt-cred-mech",
            "--user=dlad:turn-password-0123456789", "--realm=dlad.test", "--no-tls",
            "--no-dtls", "--no-cli", "--fingerprint", "--log-file=stdout", "--simple-log",
            "--min-port=49160", "--max-port=49200", "--pidfile", str(tmp_path / "turn.pid")],
            turn_log)
        processes.append(turn)
        forward_log = tmp_path / "forward.log"
        forward = start(middle_ns, [sys.executable, "-c", FORWARDER, TURN_SENDER_SIDE,
                                    str(SIGNALING_PORT), RECEIVER_IP, str(SIGNALING_PORT)],
                        forward_log)
        processes.append(forward)
        receiver_log = tmp_path / "receiver.log"
        out = tmp_path / "out"
        receiver = start(receiver_ns, [
            sys.executable, "-m", "receiver.cli", "--listen", f"{RECEIVER_IP}:{SIGNALING_PORT}",
            "--token-file", str(token), "--out-dir", str(out), "--tls-cert", str(cert),
            "--tls-key", str(key), "--ice-server", f"turn:{TURN_RECEIVER_SIDE}:{TURN_PORT}",
            "--ice-credentials", str(credentials)], receiver_log)
        processes.append(receiver)
        wait_for(forward_log, "forwarding", forward)
        wait_for(receiver_log, "listening on https://", receiver)
        wait_for(turn_log, "(?i)listener opened|relay", turn, timeout=30)
        sent = subprocess.run(
            ["ip", "netns", "exec", sender_ns, sys.executable, "-m", "sender.cli", str(study),
             "--to", f"https://{TURN_SENDER_SIDE}:{SIGNALING_PORT}", "--token-file", str(token),
             "--ca-file", str(cert), "--ice-server", f"turn:{TURN_SENDER_SIDE}:{TURN_PORT}",
             "--ice-credentials", str(credentials), "--retries", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=240)
    finally:
        for process in reversed(processes):
            stop(process)
    receiver_text = receiver_log.read_text()
    assert sent.returncode == 0, (sent.stderr[-3000:], receiver_text[-3000:],
                                  turn_log.read_text()[-3000:])
    assert "SHA-256 verified by the receiver" in sent.stdout
    # The nominated pair has a relay end: the media went through coturn.
    pair = re.search(r"ICE (\w+) ([\d.]+):\d+ -> (\w+) ([\d.]+):\d+", receiver_text)
    assert pair is not None, receiver_text[-3000:]
    assert "relay" in (pair.group(1), pair.group(3)), pair.group(0)
    assert SENDER_IP not in pair.group(0), pair.group(0)  # no direct path was used
    (folder,) = study_folders(out)
    check_complete(folder, volume, header)
