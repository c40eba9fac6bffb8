#!/usr/bin/env python
"""Benchmark of a live session: a scanner pushes series to a warm ``dlad-send --dicom-listen``.

A real DICOM client (dcmtk's ``storescu``, JPEG 2000 lossless proposed with ``-xv``) pushes the
shared abdomen series (its empty UIDs filled on a copy), then a "control scan" (the same images
under new series and instance UIDs, same study) to a sender process started beforehand and left
warm (torch, the U-Net, the WebRTC connection), which streams each series with ``--exact`` to a
receiver process, directly (``loopback``) or through the link emulator (``dlad-link``'s code in
this process: ``wifi-2m``, ``4g-12m``). Per series:

* ``roi_s`` / ``all_s``: seconds from the last C-STORE response (``storescu`` exits right after
  it and the release) to the receiver's "ROI complete" / "all chunks applied" (its status.json
  wall times; both processes on this machine's clock);
* ``first_chunk_s``: the same to the receiver's first chunk applied (with the live default the
  header announces the ROI as pending, so that is a preview that left before the ROI was
  computed); ``roi_frame_s``: to the ROI frame at the receiver (its ``roi_known`` time; none
  for a stream whose header carries the ROI); ``sender_roi_ready_s``: the sender's ROI computed
  (U-Net backlog, plausibility check, ROI steps), from its session log, since it saw the series
  complete;
* ``roi_bytes``: stream bytes up to ROI complete (header, ROI frame and the chunks the receiver
  applied until then, from its chunk log); ``roi_link_s`` = ``roi_bytes`` x 8 / link rate, the link's
  physical time for them; the target is ``roi_s <= 1.3 roi_link_s + 1 s``;
* ``sender_cpu_s``: CPU seconds of the sender process from the push to the series complete at
  the receiver (decoding on arrival, U-Net, ROI, diffusion, encoding, WebRTC), and per slice.

A 300-slice 512 x 512 synthetic series (the phantom generator, JPEG 2000) is pushed on loopback
the same way (``--large-slices``, 0 to skip): first chunk applied at the receiver after the last
C-STORE response (target: on the wire within 5 s of series completion). ``--large-profile``
sends it through a link instead, e.g. a 100-slice series through ``wifi-2m`` to see how the
ROI target of that link holds for a longer series than the shared one.

Stage costs, measured in this process one stage at a time (CPU seconds per slice, medians of
``--stage-runs``, interleaved): DICOM decode through ITK (GDCM, the old path) and through pydicom
(the new path), U-Net, ROI post-processing (the ROI alone, as a live session without diffusion
computes it, and with the steering map diffusion needs), diffusion (one thread, block by block as
the sender runs it), encoding with ``--exact`` (all chunks), for the 20-slice series and the
300-slice one. Target: decode + ROI + diffusion + encoding <= 0.12 s per 512 x 512 slice,
reported for a live session's default (no diffusion in the layered modes, JPEG-LS residuals) and
with the paper's 15 iterations (``--iterations 15``).

Usage::

    python scripts/bench_session.py [--profiles loopback,wifi-2m,4g-12m] [--runs 1]
        [--large-slices 300] [--stage-runs 3] [--json out.json] [--markdown out.md]
        [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dcmtk import dcmtk_tool  # noqa: E402
from live_series import fill_uids, write_series  # noqa: E402

from receiver.reassembly import Reassembler  # noqa: E402
from shared.link import PROFILES, run_behind_link  # noqa: E402
from shared.link.demo import Child, write_token_file  # noqa: E402
from shared.receiver_process import ReceiverProcess  # noqa: E402
from shared.wire import FrameReader, RoiFrame  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SERIES_TIMEOUT_S = 600.0
STORESCU = dcmtk_tool("storescu")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its finished children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def wall(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def roi_first_bytes(folder: Path) -> int:
    """Stream bytes up to ROI complete: the header, the chunks applied until then and, where
    the header announced the ROI as pending, the ROI frame (logged in its place)."""
    header_bytes = (folder / "header.dlad").read_bytes()
    header = FrameReader().feed(header_bytes)[0].chunk
    reassembler = Reassembler(header)
    total = len(header_bytes)
    for event in FrameReader().feed((folder / "chunks.dlad").read_bytes()):
        if reassembler.roi_complete:
            break
        if isinstance(event.chunk, RoiFrame):
            reassembler.attach_roi(event.chunk)
        else:
            reassembler.apply(event.chunk)
        total += event.size
    return total


async def wait_for_line(log: Path, pattern: str, child: Child, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        if child.returncode is not None:
            raise RuntimeError(f"{log.name}: process ended: {child.log_tail(5)}")
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{log.name}: {pattern!r} not seen within {timeout:g} s")


async def wait_complete(out: Path, series_uid: str, timeout: float) -> tuple[Path, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for status_file in out.glob(f"*/{series_uid}/status.json"):
            try:
                status = json.loads(status_file.read_text())
            except (OSError, ValueError):
                continue
            if status.get("state") == "complete" and "complete" in status.get("times", {}):
                return status_file.parent, status
        await asyncio.sleep(0.02)
    raise RuntimeError(f"series {series_uid} not complete at the receiver within {timeout:g} s")


async def push(port: int, files: list[Path]) -> float:
    """storescu the files (JPEG 2000 lossless proposed); the wall time when it is done."""
    process = await asyncio.create_subprocess_exec(
        STORESCU, "-xv", "-aec", "DLAD", "127.0.0.1", str(port), *map(str, files),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    done = time.time()
    if process.returncode != 0:
        raise RuntimeError(f"storescu failed ({process.returncode}): {output.decode()[-2000:]}")
    return done


async def session(profile: str, series: list[tuple[str, Path]], work: Path, count: int,
                  seed: int) -> list[dict]:
    """One warm sender, the series pushed one after the other through ``profile``."""
    shutil.rmtree(work, ignore_errors=True)  # a fresh spool, receiver folder and logs
    work.mkdir(parents=True)
    token = write_token_file(work / "token.txt")
    out = work / "received"
    receiver = await asyncio.to_thread(ReceiverProcess.start, out, token, work / "receiver.log")
    receiver_url = receiver.url
    proxy = None
    sender = None
    rows = []
    try:
        url = receiver_url
        if profile != "loopback":
            url, proxy = await run_behind_link(receiver_url, profile, seed=seed)
        sender = await Child.start([
            sys.executable, "-m", "sender.cli", "--dicom-listen", "127.0.0.1:0", "--to", url,
            "--token-file", str(token), "--spool", str(work / "spool"), "--exact",
            "--series-count", str(count), "--session-log", str(work / "session.jsonl")],
            work / "sender.log")
        port = int((await wait_for_line(work / "sender.log", r"listening on 127\.0\.0\.1:(\d+)",
                                        sender, 300)).group(1))
        await wait_for_line(work / "sender.log", "live session ready", sender, 120)
        await asyncio.sleep(1.0)  # the link's first connection settles
        for label, folder in series:
            files = sorted(folder.glob("*.dcm"))
            series_uid = _series_uid(files[0])
            cpu_before = cpu_seconds(sender.process.pid)
            pushed = await push(port, files)
            received, status = await wait_complete(out, series_uid, SERIES_TIMEOUT_S)
            cpu = cpu_seconds(sender.process.pid) - cpu_before
            times = status["times"]
            rate = PROFILES[profile].rate if profile != "loopback" else None
            roi_bytes = roi_first_bytes(received)
            sender_stages = await asyncio.to_thread(_sender_seconds, work / "session.jsonl",
                                                    series_uid)
            row = {
                "profile": profile, "series": label, "slices": len(files),
                "roi_s": round(wall(times["roi_complete"]) - pushed, 3),
                "all_s": round(wall(times["complete"]) - pushed, 3),
                "first_chunk_s": round(wall(times["first_chunk"]) - pushed, 3),
                # The ROI frame at the receiver (a stream started with its ROI pending), and
                # the sender's ROI ready (its session log; since it saw the series complete).
                "roi_frame_s": round(wall(times["roi_known"]) - pushed, 3)
                if "roi_known" in times else None,
                "sender_roi_ready_s": sender_stages.get("roi_ready"),
                "roi_bytes": roi_bytes, "stream_bytes": status["bytes_received"],
                "roi_link_s": round(roi_bytes * 8 / rate, 3) if rate else None,
                "all_link_s": round(status["bytes_received"] * 8 / rate, 3) if rate else None,
                "sender_cpu_s": round(cpu, 2), "sender_cpu_per_slice_s": round(cpu / len(files), 4),
                "verified": status.get("verified_sha256"), "load_avg": round(os.getloadavg()[0], 2),
                "sender_seconds": sender_stages,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if sender is not None:
            await sender.stop()
        if proxy is not None:
            await proxy.stop()
        await asyncio.to_thread(receiver.stop)
    return rows


def _sender_seconds(session_log: Path, series_uid: str) -> dict:
    """The sender's own stage seconds of a series (its ``--session-log`` line; the line is
    written right after the receiver confirmed the series, so wait for it briefly)."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if session_log.exists():
            for line in session_log.read_text().splitlines():
                entry = json.loads(line)
                if entry.get("series_uid") == series_uid:
                    return entry.get("seconds", {})
        time.sleep(0.05)
    return {}


def _series_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


# --- stage costs ---------------------------------------------------------------------------------

def stage_costs(folder: Path, runs: int) -> dict:
    """CPU seconds per slice of each sender stage on the series in ``folder`` (medians)."""
    import itk
    import pydicom
    import torch

    from sender.cli import LIVE_RESIDUAL_CODECS
    from sender.dicom import read_series
    from sender.diffusion import DiffusionSettings, LazyDiffusion
    from sender.encoder import EncodeSettings, PreparedStudy, StudyEncoder
    from sender.roi.steering import SteeringSettings, steer
    from sender.roi.unet import UNetProvider
    from shared.wire import voxel_sha256

    files = sorted(folder.glob("*.dcm"))
    volume = read_series(folder).volume
    provider = UNetProvider()
    provider.probability(volume)  # warm-up
    probability = provider.probability(volume)
    settings = SteeringSettings(z_margin_mm=15.0)
    steering_map = steer(probability, volume.spacing, settings)
    lazy = LazyDiffusion(volume.data, steering_map.probability, steering_map.roi,
                         DiffusionSettings())
    diffused = lazy.full().copy()

    def decode_itk():
        names = [str(f) for f in files]
        reader = itk.ImageSeriesReader[itk.Image[itk.F, 3]].New(
            ImageIO=itk.GDCMImageIO.New(), FileNames=names, ForceOrthogonalDirection=False)
        reader.Update()

    def decode_pydicom():
        for path in files:
            pydicom.dcmread(path).pixel_array  # noqa: B018 - the decode is the point

    def roi():  # a live session's default: no diffusion, so the ROI alone
        steer(probability, volume.spacing, settings, need_probability=False)

    def roi_map():  # with diffusion: the steering map too
        steer(probability, volume.spacing, settings)

    def diffusion():
        LazyDiffusion(volume.data, steering_map.probability, steering_map.roi,
                      DiffusionSettings()).full()

    def encoder(residual_codecs, diffused_volume):
        def encode():
            study = PreparedStudy(volume=volume, roi=steering_map.roi, diffused=diffused_volume,
                                  study_id="bench", sha256=voxel_sha256(volume.data))
            encoder = StudyEncoder(study, EncodeSettings(exact=True,
                                                         residual_codecs=residual_codecs))
            for planned in encoder.plan:
                encoder.encode_chunk(planned)
        return encode

    def unet():
        provider.probability(volume)

    # A live session's default (layered --exact): no diffusion (sender.pipeline.default_diffusion),
    # JPEG-LS residuals; "with diffusion": the paper's 15 iterations (--iterations 15) first.
    stages = {"decode_itk": decode_itk, "decode": decode_pydicom, "unet": unet, "roi": roi,
              "roi_map": roi_map, "diffusion": diffusion, "encode": encoder(LIVE_RESIDUAL_CODECS, volume.data),
              "encode_diffused": encoder(LIVE_RESIDUAL_CODECS, diffused),
              "encode_file_default": encoder(EncodeSettings().residual_codecs, volume.data)}
    samples: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(runs):
        for name, function in stages.items():  # interleaved
            started = time.process_time()
            function()
            samples[name].append(time.process_time() - started)
    slices = volume.shape[0]
    result = {name: round(statistics.median(values) / slices, 4) for name, values in samples.items()}
    result["slices"] = slices
    result["target_sum"] = round(sum(result[n] for n in ("decode", "roi", "encode")), 4)
    result["target_sum_diffusion"] = round(sum(result[n] for n in (
        "decode", "roi_map", "diffusion", "encode_diffused")), 4)
    result["decode_speedup"] = round(result["decode_itk"] / result["decode"], 1)
    result["torch_threads"] = torch.get_num_threads()
    return result


# --- report --------------------------------------------------------------------------------------

def target(row: dict) -> tuple[str, bool]:
    """The issue's target for a session row (text) and whether the row meets it."""
    if row["roi_link_s"] is not None:  # through dlad-link
        goal = 1.3 * row["roi_link_s"] + 1.0
        return f"ROI <= 1.3 x link + 1 = {goal:.2f} s", row["roi_s"] <= goal
    if row["slices"] <= 20:
        return "ROI <= 2 s", row["roi_s"] <= 2.0
    return "first chunk <= 5 s", row["first_chunk_s"] <= 5.0


def markdown(sessions: list[dict], stages: dict[str, dict], load: str) -> str:
    lines = [f"Load average during the runs: {load}", "",
             "| profile | series | slices | first chunk (s) | sender's ROI ready (s) | ROI frame "
             "(s) | ROI complete (s) | link time of ROI-first bytes (s) | all complete (s) | "
             "target | met | sender CPU (s) | CPU per slice (s) | verified |", "|" + "---|" * 14]
    for row in sessions:
        goal, met = target(row)
        link = "" if row["roi_link_s"] is None else f"{row['roi_link_s']:.2f}"
        frame = "" if row.get("roi_frame_s") is None else f"{row['roi_frame_s']:.2f}"
        ready = ("" if row.get("sender_roi_ready_s") is None
                 else f"{row['sender_roi_ready_s']:.2f}")
        lines.append(
            f"| {row['profile']} | {row['series']} | {row['slices']} | {row['first_chunk_s']:.2f} "
            f"| {ready} | {frame} | {row['roi_s']:.2f} | {link} | {row['all_s']:.2f} | {goal} | "
            f"{'yes' if met else '**no**'} | {row['sender_cpu_s']:.1f} | "
            f"{row['sender_cpu_per_slice_s']:.3f} | {row['verified']} |")
    if not stages:
        return "\n".join(lines) + "\n"
    lines += ["", "CPU seconds per slice, medians:", "",
              "| series | slices | decode ITK (warm) | decode pydicom | speed-up | U-Net | ROI | "
              "ROI and steering map | diffusion (15 it.) | encode (--exact, JPEG-LS residuals) | "
              "encode, diffused | encode (file default: JPEG XL or JPEG-LS) | decode+ROI+encode "
              "(live default) | decode+ROI+diffusion+encode (--iterations 15) |",
              "|" + "---|" * 14]
    for label, row in stages.items():
        lines.append(f"| {label} | {row['slices']} | {row['decode_itk']:.4f} | {row['decode']:.4f}"
                     f" | {row['decode_speedup']:.1f}x | {row['unet']:.4f} | {row['roi']:.4f} | "
                     f"{row['roi_map']:.4f} | {row['diffusion']:.4f} | {row['encode']:.4f} | "
                     f"{row['encode_diffused']:.4f} | {row['encode_file_default']:.4f} | "
                     f"{row['target_sum']:.4f} | {row['target_sum_diffusion']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python scripts/bench_session.py "
                                            "--profiles loopback,wifi-2m --runs 1")
    parser.add_argument("--profiles", default="loopback,wifi-2m,4g-12m",
                        help="comma-separated: loopback (no link) or dlad-link profiles "
                             "(default: %(default)s)")
    parser.add_argument("--runs", type=int, default=1, help="sessions per profile")
    parser.add_argument("--large-slices", type=int, default=300,
                        help="slices of the synthetic series (0: skip it)")
    parser.add_argument("--large-profile", default="loopback",
                        help="the link of the synthetic series: loopback (its first-chunk "
                             "target) or a dlad-link profile, to see how the wifi-2m ROI "
                             "target holds for a longer series (default: %(default)s)")
    parser.add_argument("--stage-runs", type=int, default=3,
                        help="repeats of the per-stage CPU timing of the abdomen series, "
                             "median reported (0: skip the stage costs; default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the results as Markdown tables here")
    parser.add_argument("--work", type=Path, help="working folder (kept; default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    args = parser.parse_args(argv)
    if STORESCU is None:
        parser.error("dcmtk's storescu (Debian package dcmtk) is needed")
    work = args.work or Path(tempfile.mkdtemp(prefix="dlad-bench-session-"))
    work.mkdir(parents=True, exist_ok=True)
    loads = [os.getloadavg()[0]]
    try:
        planning, control = work / "planning", work / "control"
        if not planning.exists():
            study, _ = fill_uids(DATA / "abdomen_ct_dicom", planning)
            fill_uids(DATA / "abdomen_ct_dicom", control, study_uid=study)
        large = work / f"large{args.large_slices}"
        if args.large_slices and not large.exists():
            from models.phantoms import make_phantom

            print(f"writing the {args.large_slices}-slice synthetic series (JPEG 2000)...",
                  flush=True)
            volume, _ = make_phantom((args.large_slices, 512, 512), (0.8, 0.8, 1.0), seed=7,
                                     noise_hu=12.0)
            write_series(large, volume, transfer_syntax="1.2.840.10008.1.2.4.90",
                         description=f"synthetic {args.large_slices}-slice")
        sessions = []
        for number in range(args.runs):
            for profile in [p for p in args.profiles.split(",") if p]:
                sessions += asyncio.run(session(
                    profile, [("planning", planning), ("control scan", control)],
                    work / f"{profile}-{number}", 20, seed=number))
                loads.append(os.getloadavg()[0])
        if args.large_slices:
            sessions += asyncio.run(session(args.large_profile, [("synthetic", large)],
                                            work / "large-session", args.large_slices, seed=0))
            loads.append(os.getloadavg()[0])
        stages = {"abdomen": stage_costs(planning, args.stage_runs)} if args.stage_runs else {}
        if args.large_slices and args.stage_runs:
            stages[f"synthetic {args.large_slices}"] = stage_costs(large, max(1, args.stage_runs
                                                                              // 3))
        loads.append(os.getloadavg()[0])
        load = ", ".join(f"{v:.1f}" for v in loads)
        text = markdown(sessions, stages, load)
        print(text)
        if args.markdown:
            args.markdown.write_text(text)
        if args.json:
            args.json.write_text(json.dumps({"sessions": sessions, "stages": stages,
                                             "load": loads}, indent=1))
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
