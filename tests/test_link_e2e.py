"""End to end through the emulated link: ``dlad-link demo`` runs a receiver process, the link and a
sender process, on loopback.

A small synthetic study (8 x 64 x 64, liver mask, exact layer), encoded once, crosses a
throttled, lossy link (2 Mbit/s, 20 ms, 1 % loss both ways); the receiver's volume must be the
original bit for bit, its SHA-256 verified, the ROI complete before the exact layer, and every
byte must have gone through the relay. A second test interrupts the demo mid-stream, as Ctrl-C
does, and checks that it stops every process it started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shared.nifti import read_nifti

ROOT = Path(__file__).resolve().parents[1]
DEMO = [sys.executable, "-m", "shared.link.cli", "demo"]
LINK = ["--rate", "2mbit", "--delay", "20ms", "--loss", "1%", "--queue", "64kB", "--seed", "3"]
UNITS = {"B": 1, "kB": 1e3, "MB": 1e6}


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """A small phantom encoded with its exact layer: (path of the .dlad, volume, ROI mask)."""
    from models.phantoms import make_phantom
    from sender.encoder import EncodeSettings, StudyEncoder
    from sender.pipeline import prepare_study
    from sender.roi.provider import StaticMaskProvider

    volume, liver = make_phantom((8, 64, 64), spacing=(6.0, 6.0, 4.0), seed=3)
    prepared = prepare_study(volume, StaticMaskProvider(liver, "phantom liver"))
    encoder = StudyEncoder(prepared, EncodeSettings(exact=True, group_slices=2, preset="fast"))
    path = tmp_path_factory.mktemp("link-e2e") / "small.dlad"
    path.write_bytes(b"".join(encoder.frames()))
    return path, volume, encoder.header.roi


def demo_environment(folder: Path) -> dict:
    """The demo keeps its logs (and the token while it runs) in a temporary folder: make it the test's."""
    return {**os.environ, "TMPDIR": str(folder)}


def own_copy(path: Path, folder: Path) -> Path:
    """The study under the test's own folder: the receiver's and the sender's command lines then
    both name that folder, which is how the test finds any process the demo left behind."""
    copy = folder / path.name
    shutil.copyfile(path, copy)
    return copy


def processes_mentioning(text: str) -> list[int]:
    """Ids of live processes whose command line contains `text` (here: a test's own folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass  # ended meanwhile
    return found


def test_demo_streams_a_small_study_bit_exact_through_a_lossy_throttled_link(small_study, tmp_path):
    path, volume, roi = small_study
    path = own_copy(path, tmp_path)
    out_dir = tmp_path / "received"
    started = time.monotonic()
    demo = subprocess.run([*DEMO, *LINK, "--out-dir", str(out_dir), str(path)], cwd=ROOT,
                          env=demo_environment(tmp_path), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "SHA-256 of the exact volume verified" in demo.stdout
    assert "receiver: ROI complete (bit-exact, every block digest verified)" in demo.stdout

    (status_file,) = out_dir.glob("*/status.json")
    status = json.loads(status_file.read_text())
    assert status["state"] == "complete" and status["verified_sha256"] is True
    times = status["times"]
    assert times["roi_complete"] <= times["exact_complete"]
    received = read_nifti(status_file.parent / status["snapshot"]["file"]).data
    np.testing.assert_array_equal(received[roi], volume.data[roi])
    np.testing.assert_array_equal(received, volume.data)

    # Every byte of the stream crossed the link (the relay delivered at least the stream's size,
    # SCTP and DTLS headers on top), and met its delay.
    uplink = re.search(r"link uplink\s*: ([\d.]+) (B|kB|MB) in \d+ datagrams delivered, .* mean delay ([\d.]+) ms",
                       demo.stdout)
    assert uplink, demo.stdout
    assert float(uplink[1]) * UNITS[uplink[2]] >= 0.99 * path.stat().st_size
    assert float(uplink[3]) >= 20.0
    assert processes_mentioning(str(tmp_path)) == []
    assert elapsed < 60


def test_demo_stops_every_process_when_interrupted(small_study, tmp_path):
    path = own_copy(small_study[0], tmp_path)
    out_dir = tmp_path / "received"
    # 100 kbit/s: the 50 kB study takes about 4 s on the link, time enough to interrupt it.
    demo = subprocess.Popen([*DEMO, "--rate", "100kbit", "--delay", "20ms", "--out-dir", str(out_dir), str(path)],
                            cwd=ROOT, env=demo_environment(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and demo.poll() is None:
            if any(log.stat().st_size for log in out_dir.glob("*/chunks.dlad")):
                break
            time.sleep(0.05)
        assert demo.poll() is None, "the demo ended before it could be interrupted"
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 130, output
    assert "interrupted; stopping the sender, the link and the receiver" in output
    assert processes_mentioning(str(tmp_path)) == []
