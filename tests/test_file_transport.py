"""End to end through a file: dlad-send -> .dlad -> dlad-receive, on the shared DICOM + mask.

Checks what the issue checks: ROI bit for bit, geometry, CR and SSIM recomputed independently,
--exact bit for bit, a truncated and a corrupted file, bad input, and a lightweight receiver.
"""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from receiver.cli import main as receive_main
from sender.cli import main as send_main
from sender.roi.mask_file import MaskFileProvider
from sender.roi.steering import steer
from shared.metrics import ssim
from tests.conftest import data_file


@pytest.fixture(scope="module")
def streams(tmp_path_factory, abdomen_dicom, abdomen_liver):
    folder = tmp_path_factory.mktemp("streams")
    paths = {}
    for name, extra in (("layered", []), ("exact", ["--exact"])):
        paths[name] = folder / f"{name}.dlad"
        assert send_main([str(abdomen_dicom), "--roi-mask", str(abdomen_liver), "--out",
                          str(paths[name]), "--quiet", *extra]) == 0
    return paths


@pytest.fixture(scope="module")
def roi(abdomen_volume, abdomen_liver):
    probability = MaskFileProvider(abdomen_liver).probability(abdomen_volume)
    return steer(probability, abdomen_volume.spacing).roi


def received(path, tmp_path, name="recon.nii.gz"):
    out = tmp_path / name
    status = tmp_path / "status.json"
    code = receive_main(["--in", str(path), "--out", str(out), "--status", str(status), "--quiet"])
    image = nib.load(str(out))
    hu = np.asarray(image.get_fdata(), dtype=np.float64).transpose(2, 1, 0)
    return code, image, hu, json.loads(status.read_text())


def test_layered_default_meets_targets(streams, abdomen_volume, roi, tmp_path):
    code, image, hu, status = received(streams["layered"], tmp_path)
    original = abdomen_volume.data
    assert code == 0 and status["roi_complete"] and status["state"] == "complete"
    np.testing.assert_array_equal(hu[roi], original[roi])  # ROI bit-exact (via HU, independently)
    np.testing.assert_allclose(image.affine, abdomen_volume.affine, atol=1e-6)
    assert image.get_data_dtype() == np.uint16  # the DICOM's stored dtype survives
    ratio = original.size * 2 / streams["layered"].stat().st_size
    assert ratio >= 12, ratio
    assert ssim(original, hu, 4095) >= 0.99
    assert not np.array_equal(hu, original)  # outside the ROI it really is lossy


def test_exact_layer_is_bit_exact(streams, abdomen_volume, tmp_path):
    code, _, hu, status = received(streams["exact"], tmp_path)
    assert code == 0 and status["verified_sha256"] is True
    np.testing.assert_array_equal(hu, abdomen_volume.data)


def test_truncated_file_gives_partial_volume_and_says_what_is_missing(streams, abdomen_volume,
                                                                      roi, tmp_path, capsys):
    data = streams["exact"].read_bytes()
    truncated = tmp_path / "cut.dlad"
    truncated.write_bytes(data[: len(data) // 3])
    out = tmp_path / "cut.nii.gz"
    assert receive_main(["--in", str(truncated), "--out", str(out)]) == 3
    report = capsys.readouterr().out
    assert "MISSING" in report and "truncated" in report
    hu = nib.load(str(out)).get_fdata().transpose(2, 1, 0)
    # ROI chunks come first: after a third of the exact stream, the liver is already exact.
    np.testing.assert_array_equal(hu[roi], abdomen_volume.data[roi])


def test_corrupted_chunk_is_reported_and_skipped(streams, abdomen_volume, roi, tmp_path):
    data = bytearray(streams["layered"].read_bytes())
    data[len(data) // 2] ^= 0x5A
    damaged = tmp_path / "damaged.dlad"
    damaged.write_bytes(bytes(data))
    code, _, hu, status = received(damaged, tmp_path)
    assert code == 3
    assert any("checksum" in p for p in status["problems"])
    assert len(status["missing_chunks"]) == 1
    seq, layer, z0, z1 = status["missing_chunks"][0]
    untouched = np.ones(hu.shape[0], bool)
    untouched[z0:z1] = False
    # Every other slice is intact; the damaged block is never filled from the bad chunk.
    np.testing.assert_array_equal(hu[untouched][roi[untouched]],
                                  abdomen_volume.data[untouched][roi[untouched]])


def test_bad_input_fails_cleanly_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x.dlad"
    assert send_main([str(tmp_path / "nope.nii.gz"), "--roi-mask", "m.nii.gz", "--out",
                      str(out)]) == 1
    assert "input not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "junk.dlad").write_bytes(b"\x00" * 1000)
    assert receive_main(["--in", str(tmp_path / "junk.dlad"), "--out",
                         str(tmp_path / "r.nii.gz")]) == 1
    assert not (tmp_path / "r.nii.gz").exists()


def test_an_output_that_cannot_be_written_is_one_line_and_exit_1(tmp_path, capsys):
    from sender.encoder import EncodeSettings, StudyEncoder
    from tests.test_roi_verification import make_study

    stream = tmp_path / "s.dlad"
    stream.write_bytes(b"".join(StudyEncoder(make_study(), EncodeSettings(
        codec="zstd", group_slices=2)).frames()))
    (tmp_path / "taken.nii").mkdir()
    for out, status in (("taken.nii", "s.json"), ("ok.nii", "taken.nii")):
        assert receive_main(["--in", str(stream), "--out", str(tmp_path / out), "--status",
                             str(tmp_path / status), "--quiet"]) == 1
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("dlad-receive: error: cannot write")


def test_phantom_demo_and_lossless_codec_mode(tmp_path):
    for extra in ([], ["--codec", "jpegls", "--exact"]):
        out = tmp_path / "demo.dlad"
        assert send_main(["phantom", "--out", str(out), "--quiet", *extra]) == 0
        assert receive_main(["--in", str(out), "--out", str(tmp_path / "demo.nii.gz"),
                             "--quiet"]) == 0


def test_receiver_and_shared_do_not_import_torch_or_itk():
    code = ("import sys, receiver, receiver.cli, receiver.stream, shared, shared.wire, "
            "shared.codecs, shared.metrics, shared.nifti, shared.layers, shared.geometry\n"
            "heavy = [m for m in ('torch', 'itk') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_has_examples():
    for module in ("sender.cli", "receiver.cli"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                                text=True, check=True)
        assert "examples:" in result.stdout


def test_roi_choice_and_safe_fallback(tmp_path, capsys):
    from models.phantoms import make_phantom
    from sender.pipeline import safety_check

    volume, _ = make_phantom((4, 64, 64), spacing=(6.0, 6.0, 4.0))
    empty = np.zeros(volume.shape, np.float32)
    assert safety_check(False)(empty, volume).min() == 1.0  # fallback: everything is ROI
    assert safety_check(True)(empty, volume).max() == 0.0  # --allow-small-roi keeps it
    ct = data_file("torso_ct_sm.nii.gz")
    out = tmp_path / "box.dlad"
    assert send_main([str(ct), "--roi", "box:-60,0,60,120,100,140", "--out", str(out),
                      "--quiet"]) == 0
    assert receive_main(["--in", str(out), "--out", str(tmp_path / "box.nii.gz"), "--quiet"]) == 0
    with pytest.raises(SystemExit) as exit_info:  # a bad argument: exit 2, before any work
        send_main([str(ct), "--roi", "sphere", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "--roi must be" in capsys.readouterr().err
