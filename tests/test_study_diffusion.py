"""Smoke test of scripts/study_diffusion.py on a tiny synthetic study, so that it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_study_diffusion_runs_on_a_tiny_study(tmp_path):
    out = tmp_path / "study.json"
    result = subprocess.run(
        [sys.executable, "scripts/study_diffusion.py", "--studies", "head-phantom",
         "--synthetic-shape", "3,64,64", "--crfs", "18", "30", "--kappas", "10", "--json",
         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (study,) = json.loads(out.read_text())["studies"]
    assert set(study["curves"]) == {"0.0", "10.0"}
    for points in study["curves"].values():
        assert [p["crf"] for p in points] == [18, 30]
        for p in points:
            assert p["roi_exact"]
            assert 0 < p["preview_bytes"] < p["bytes"] and 0 < p["roi_complete_bytes"] <= p["bytes"]
            assert 0 <= p["gmsd_outside"] < 1 and 0 < p["ssim"] <= 1
        assert points[0]["bytes"] > points[1]["bytes"]  # a higher CRF costs fewer bytes
        assert points[0]["ssim"] > points[1]["ssim"]
    assert len(study["comparisons"]) == 2
    assert set(study["shipped"]) == set(study["shipped_exact"]) == {"0.0", "10.0"}
    # The paper's setting: every lossless codec gains on the diffused volume.
    assert study["lossless"] and all(s["diffused"] < s["original"]
                                     for s in study["lossless"].values())
    assert "The paper's setting" in result.stdout
