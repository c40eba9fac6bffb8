"""Tools of the attack suite (tests/test_attacks.py, tests/test_turn.py, scripts/bench_stress.py).

Self-signed certificates, hand-made headers, slow HTTP clients, a garbage flooder and a view
of a process's memory. Everything runs on loopback (or in network namespaces) and is bounded in
time.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import time
from pathlib import Path

import numpy as np

from shared.wire import MAGIC, StreamHeader


def make_certificate(folder: Path, addresses=("127.0.0.1",), name: str = "dlad-test"
                     ) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for ``addresses``; returns (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
            + [x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def blank_header(study_id: str, shape, group: int = 4, layers=(0,)) -> StreamHeader:
    """A valid header for a study of ``shape`` with an empty ROI (nothing allocated but bits)."""
    nz = shape[0]
    voxels = int(np.prod(shape))
    plan = []
    for layer in layers:
        for z0 in range(0, nz, group):
            plan.append((len(plan), layer, z0, min(z0 + group, nz)))
    return StreamHeader(
        study_id=study_id, shape=tuple(shape), affine=np.eye(4), spacing=(1.0, 1.0, 1.0),
        source_dtype="int16", rescale=(1.0, 0.0), value_range=(-1024, 3071), sha256="0" * 64,
        roi_bits=np.zeros((voxels + 7) // 8, np.uint8),
        layers={layer: {"codec": "zstd", "lossless": True,
                        "region": {0: "all", 1: "roi", 2: "outside-roi"}[layer]}
                for layer in layers},
        plan=plan)


def garbage(size: int, magic_every: int = 64, seed: int = 0) -> bytes:
    """Random bytes with a frame magic every ``magic_every`` bytes (a frame parser's worst case)."""
    rng = np.random.default_rng(seed)
    data = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    for at in range(0, size - len(MAGIC), magic_every):
        data[at:at + len(MAGIC)] = MAGIC
    return bytes(data)


async def slow_client(host: str, port: int, send_headers: bool, deadline: float,
                      period: float = 1.0) -> float | None:
    """A slowloris connection: an unfinished request head, one more byte every ``period`` s.

    Returns the seconds until the server closed it (None if it was still open at ``deadline``,
    a ``time.monotonic()``). ``send_headers=False`` connects and sends nothing.
    """
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return 0.0  # refused at once: closed
    try:
        if send_headers:
            writer.write(b"POST /studies HTTP/1.1\r\nHost: receiver\r\nX-Slow: ")
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(1024), period)
                if not data:
                    return time.monotonic() - started
            except asyncio.TimeoutError:
                pass
            except (ConnectionError, OSError):
                return time.monotonic() - started
            if send_headers:
                try:
                    writer.write(b"a")
                    await writer.drain()
                except (ConnectionError, OSError):
                    return time.monotonic() - started
        return None
    finally:
        writer.close()


def process_memory(pid: int) -> dict:
    """``VmRSS`` and ``VmHWM`` (peak) of a process, in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, amount = line.split(":")
                values[name] = int(amount.split()[0]) * 1024
    return values


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
