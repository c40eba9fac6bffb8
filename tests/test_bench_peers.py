"""Smoke test of scripts/bench_peers.py on a tiny synthetic study, so that it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

PEERS = ("JPEG XL effort 7", "JPEG XL effort 3", "JPEG 2000", "HTJ2K", "CharLS JPEG-LS", "zstd 19")


def load_script():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "scripts" / "bench_peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_peers_runs_every_case_on_a_tiny_study(tmp_path):
    out = tmp_path / "peers.json"
    result = subprocess.run(
        [sys.executable, "scripts/bench_peers.py", "--studies", "head-phantom",
         "--synthetic-shape", "3,64,64", "--repeats", "2", "--dlad-codecs", "jpegls", "zstd",
         "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    (study,) = figures["studies"]
    assert set(study["singles"]) == {"jpegls", "zstd"}
    rows = study["rows"]
    assert set(rows) == {f"dlad best single ({study['best_single']})", "dlad --exact",
                         "dlad layered default", *PEERS}
    for name, row in rows.items():
        assert row["exact"] == (name != "dlad layered default"), name  # every lossless bit-exact
        assert len({row["bytes"], 0}) == 2 and row["cr"] > 1
        assert all(row[key] >= 0 for key in ("encode_wall", "encode_cpu", "decode_wall",
                                              "decode_cpu"))
    layered = rows["dlad layered default"]
    assert layered["roi_exact"] and 0.9 < layered["ssim"] < 1
    assert 0 < layered["roi_complete_bytes"] <= layered["bytes"]
    peer = study["peer_layered"]
    assert peer["ssim"] >= layered["ssim"]  # equal SSIM: the peer at least as good
    assert 0 < peer["roi_complete_bytes"] <= peer["total_bytes"]
    assert all(math.isfinite(v) and v > 0 for v in study["targets"].values())
    assert "### Summary: targets" in result.stdout


def test_stored_values_follow_the_dicom_convention():
    from shared.volume import Volume

    bench = load_script()
    hu = np.array([[[-1024, 0, 3071]]], np.int16)
    values = bench.StoredValues.of(Volume(data=hu, affine=np.eye(4), spacing=(1, 1, 1)))
    assert values.intercept == -1024 and values.bits == 12
    np.testing.assert_array_equal(values.stored, [[[0, 1024, 4095]]])
    np.testing.assert_array_equal(values.to_hu(values.stored), hu)
    # Padding below -1024 (some scanners write -2048 outside the field of view).
    low = np.array([[[-2048, 40]]], np.int16)
    values = bench.StoredValues.of(Volume(data=low, affine=np.eye(4), spacing=(1, 1, 1)))
    assert values.intercept == -2048 and values.stored.min() == 0
    np.testing.assert_array_equal(values.to_hu(values.stored), low)


def test_jpegxl_helper_codes_narrow_images_losslessly():
    """libjxl refuses uint16 samples declared as 8-bit: such images (small residuals) go as
    uint8; wider ones declare their bit depth."""
    import imagecodecs

    bench = load_script()
    rng = np.random.default_rng(5)
    for bits in (1, 8, 9, 12):
        image = rng.integers(0, 1 << bits, (40, 56)).astype(np.uint16)
        coded = bench.jpegxl_encode(image, bits, lossless=True, effort=3)
        np.testing.assert_array_equal(imagecodecs.jpegxl_decode(coded), image)
