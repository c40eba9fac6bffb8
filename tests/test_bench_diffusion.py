"""Smoke test of scripts/bench_diffusion.py on a tiny synthetic study, so that it cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_diffusion_runs_and_reports_every_case(tmp_path):
    baseline = tmp_path / "baseline.py"
    baseline.write_text((ROOT / "sender" / "diffusion.py").read_text())
    result = subprocess.run(
        [sys.executable, "scripts/bench_diffusion.py", "--synthetic", "4,48,40", "--slices", "4",
         "6", "--threads", "1", "2", "--repeats", "2", "--baseline", str(baseline)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for slices in (4, 6):
        assert f"| {slices} | NumPy explicit (float64, 4 fluxes) | 1 |" in out
        for threads in (1, 2):
            assert f"| {slices} | dlad-stream torch (float32) | {threads} |" in out
            assert f"| {slices} | baseline baseline.py (float32) | {threads} |" in out
    # The tolerance table: at most 1 HU from the oracle, the ROI untouched.
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 4 |")
            or line.startswith("| 6 |")]
    accuracy = [row for row in rows if len(row) == 7 and row[5].strip() in ("yes", "NO")]
    assert len(accuracy) == 2
    assert all(int(row[4]) <= 1 and row[5].strip() == "yes" for row in accuracy)


def test_bench_diffusion_rejects_bad_arguments():
    result = subprocess.run([sys.executable, "scripts/bench_diffusion.py", "--synthetic", "4,48",
                             "--slices", "4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "NZ,NY,NX" in result.stderr
