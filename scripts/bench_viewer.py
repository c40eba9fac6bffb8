"""Live viewer latency: the shared abdomen CT streamed through dlad-link while a headless Chromium
shows it (docs/VIEWER.md; results in docs/BENCHMARKS.md, "Live viewer (issue 16)").

Per run: a fresh receiver process (``dlad-receive --listen --viewer``), Chromium opens the
study's page *before* the study arrives (the page waits for it), then the
pre-encoded stream (``--exact``, liver mask) is sent through ``dlad-link`` (``--profile``). The
page records, on the browser's wall clock (same machine as the receiver):

* ``first_image_s``: first frame showing received data - the receiver's ``first_chunk`` time;
* ``liver_exact_s``: first frame showing every ROI slice "liver exact" - ``roi_complete``;
* ``update_median_s`` / ``update_max_s``: server state (taken after a batch) -> frame on screen;
* ``page_load_s``: navigation -> the page waiting for the study; the static assets' size raw and
  gzip'd.

    python scripts/bench_viewer.py --runs 3 --profile wifi-2m

Needs ``chromium`` (Debian) and ../shared/data. The machine's load average is recorded per run.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from chromium import Chromium  # noqa: E402

from receiver.viewer import STATIC_DIR  # noqa: E402
from sender.transport import FileSource, StreamOptions, stream_study  # noqa: E402
from shared.link.signaling import run_behind_link  # noqa: E402
from shared.receiver_process import ReceiverProcess  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
VIEWER_TOKEN = "bench-viewer-token-0123456789"
SENDER_TOKEN = "bench-sender-token-0123456789"


def encode_abdomen(path: Path) -> str:
    """The abdomen stream (liver mask, --exact), encoded once; returns its study id."""
    from sender.encoder import EncodeSettings
    from sender.pipeline import RoiChoice, build_encoder

    encoder = build_encoder(DATA / "abdomen_ct_dicom", RoiChoice(mask=DATA / "abdomen_ct_liver.nii.gz"),
                            encode=EncodeSettings(exact=True))
    path.write_bytes(b"".join(encoder.frames()))
    return encoder.header.study_id


async def one_run(work: Path, stream: Path, study_id: str, profile: str) -> dict:
    token_file, viewer_token_file = work / "token.txt", work / "viewer-token.txt"
    token_file.write_text(SENDER_TOKEN)
    viewer_token_file.write_text(VIEWER_TOKEN)
    for path in (token_file, viewer_token_file):
        path.chmod(0o600)
    receiver = ReceiverProcess.start(work / "out", token_file, work / "receiver.log", "--viewer",
                                     "--viewer-token-file", str(viewer_token_file))
    try:
        async with Chromium() as browser:
            page = await browser.page()
            await page.goto(receiver.url + "/viewer/")
            await page.evaluate(
                "fetch('/viewer/login', {method: 'POST', headers: {'Content-Type': "
                f"'application/json'}}, body: JSON.stringify({{token: '{VIEWER_TOKEN}'}})}})"
                ".then(r => r.status)")
            started = time.monotonic()
            await page.goto(f"{receiver.url}/viewer/study?study={study_id}")
            await page.wait_for("document.getElementById('title').textContent.startsWith('waiting')", 120)
            page_load_s = time.monotonic() - started
            url, proxy = await run_behind_link(receiver.url, profile, seed=1)
            try:
                result = await stream_study(FileSource(stream), url, SENDER_TOKEN,
                                            StreamOptions(quiet=True))
            finally:
                await proxy.stop()
            await page.wait_for("window.dladViewer.metrics.exactShown !== null", 120)
            metrics = await page.evaluate("JSON.stringify(window.dladViewer.metrics)")
            await page.close()
    finally:
        receiver.stop()
    metrics = json.loads(metrics)
    status = json.loads(next((work / "out").glob("*/status.json")).read_text())
    latencies = sorted(metrics["latencies"])
    return {
        "complete": result.complete, "verified": result.verified,
        "first_image_s": round((metrics["firstImage"] - metrics["firstChunkServer"]) / 1000, 3),
        "liver_exact_s": round((metrics["liverExactShown"] - metrics["roiCompleteServer"]) / 1000, 3),
        "update_median_s": round(statistics.median(latencies), 3),
        "update_max_s": round(latencies[-1], 3), "updates": len(latencies),
        "page_load_s": round(page_load_s, 2),
        "roi_complete_s": status["milestones_s"]["roi_complete"],
        "slices_fetched": metrics["slicesFetched"], "requests": metrics["requests"],
        "load_avg": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: python scripts/bench_viewer.py --runs 3")
    parser.add_argument("--runs", type=int, default=3, help="runs, each with a fresh receiver (default 3)")
    parser.add_argument("--profile", default="wifi-2m", help="dlad-link profile (default wifi-2m)")
    args = parser.parse_args()
    assets = sorted(p for p in STATIC_DIR.iterdir() if p.is_file())
    raw = sum(p.stat().st_size for p in assets)
    packed = sum(len(gzip.compress(p.read_bytes(), 9)) for p in assets)
    print(f"assets: {raw / 1e6:.2f} MB as files, {packed / 1e6:.2f} MB gzip'd ({len(assets)} files)")
    with tempfile.TemporaryDirectory(prefix="dlad-bench-viewer-") as folder:
        folder = Path(folder)
        stream = folder / "abdomen.dlad"
        study_id = encode_abdomen(stream)
        print(f"stream: {stream.stat().st_size / 1e3:.0f} kB")
        rows = []
        for index in range(args.runs):
            work = folder / f"run{index}"
            work.mkdir()
            row = asyncio.run(one_run(work, stream, study_id, args.profile))
            print(json.dumps(row))
            rows.append(row)
    for key in ("first_image_s", "liver_exact_s", "update_median_s", "update_max_s", "page_load_s"):
        print(f"{key}: median {statistics.median(r[key] for r in rows):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
