"""Smoke test of the U-Net training (models/training.py) on tiny phantoms: outputs, resume,
data layouts, options. The sender's file reader and ROI scoring are injected as the command
line (scripts/train_liver_unet.py) injects them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import training
from models.phantoms import make_phantom
from models.unet import load_weights
from sender.io import load_volume
from sender.roi.safety import roi_metrics
from shared.nifti import write_nifti
from shared.volume import Volume

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_liver_unet.py"
HOOKS = training.TrainingHooks(
    read_volume=load_volume,
    score_roi=lambda probability, liver, spacing: roi_metrics(probability, liver,
                                                              spacing).to_dict())


def run_training(argv: list[str]) -> int:
    """``training.main`` as the command line calls it."""
    return training.main(argv, hooks=HOOKS)


def write_pair(folder: Path, stem: str, seed: int, ct_name=None, mask_name=None):
    """A tiny phantom and its liver mask as NIfTI; the first seed from ``seed`` with a liver."""
    while True:
        volume, liver = make_phantom(shape=(3, 40, 48), spacing=(8.0, 8.0, 6.0), seed=seed)
        if liver.sum() > 50:
            break
        seed += 1000
    ct = write_nifti(volume, folder / (ct_name or f"{stem}_ct.nii.gz"))
    mask_volume = Volume(data=liver.astype("int16"), affine=volume.affine, spacing=volume.spacing,
                         source_dtype="uint8")
    mask = write_nifti(mask_volume, folder / (mask_name or f"{stem}_liver.nii.gz"))
    return ct, mask


def tiny_run(tmp_path: Path, steps: int, *extra: str) -> list[str]:
    train_ct, train_mask = write_pair(tmp_path, "train", seed=11)
    val_ct, val_mask = write_pair(tmp_path, "val", seed=12)
    return ["--out", str(tmp_path / "run"), "--train", str(train_ct), str(train_mask),
            "--val", str(val_ct), str(val_mask), "--steps", str(steps), "--batch-size", "2",
            "--widths", "4", "8", "--crop-sizes", "16", "32", "--warmup-steps", "1",
            "--val-every", "2", "--checkpoint-every", "1", "--threads", "1",
            "--device", "cpu", *extra]


def test_training_writes_weights_sidecar_and_checkpoint(tmp_path):
    negative = write_pair(tmp_path, "pelvis", seed=13)[0]
    assert run_training(tiny_run(tmp_path, 2, "--phantoms", "1",
                               "--negative", str(negative), "0", "2")) == 0
    run = tmp_path / "run"
    sidecar = json.loads((run / "liver_unet.json").read_text())
    assert sidecar["training_data"]["phantoms"] == 1
    assert sidecar["training_data"]["liver_free_slices"] == [
        {"ct": "pelvis_ct.nii.gz", "slices": [0, 2]}]
    assert sidecar["validation"]["results"][0]["scan"] == "val_ct.nii.gz"
    assert {"dice", "recall", "roi_fraction", "roi_ratio"} <= set(
        sidecar["validation"]["results"][0])
    assert "--phantoms 1" in sidecar["retrain"]
    assert load_weights(run / "liver_unet.pt").config.widths == (4, 8)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2
    with pytest.raises(SystemExit, match="exists"):
        run_training(tiny_run(tmp_path, 2))


@pytest.mark.parametrize("extra", [[], ["--average-from", "0.3"]],
                         ids=["plain", "averaged"])
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch, extra):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    straight.mkdir()
    interrupted.mkdir()
    assert run_training(tiny_run(straight, 3, *extra)) == 0

    make_batch = training.make_batch

    def crash_at_step_two(scans, args, config, step):
        if step == 2:
            raise KeyboardInterrupt
        return make_batch(scans, args, config, step)

    monkeypatch.setattr(training, "make_batch", crash_at_step_two)
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_run(interrupted, 3, *extra))
    monkeypatch.setattr(training, "make_batch", make_batch)
    assert torch.load(interrupted / "run" / "checkpoint.pt", weights_only=True)["step"] == 2
    with pytest.raises(SystemExit, match="changed options"):
        run_training(tiny_run(interrupted, 3, *extra, "--resume", "--lr", "0.1"))
    assert run_training(tiny_run(interrupted, 3, *extra, "--resume")) == 0
    expected = torch.load(straight / "run" / "liver_unet.pt", weights_only=True)["state_dict"]
    resumed = torch.load(interrupted / "run" / "liver_unet.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)


def test_dataset_layouts_are_recognised(tmp_path):
    msd = tmp_path / "Task03_Liver"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    write_pair(msd, "", 1, "imagesTr/liver_0.nii.gz", "labelsTr/liver_0.nii.gz")
    lits = tmp_path / "LiTS"
    (lits / "batch1").mkdir(parents=True)
    write_pair(lits, "", 2, "batch1/volume-7.nii", "batch1/segmentation-7.nii")
    total = tmp_path / "Totalsegmentator"
    (total / "s0001" / "segmentations").mkdir(parents=True)
    write_pair(total, "", 3, "s0001/ct.nii.gz", "s0001/segmentations/liver.nii.gz")
    found = {root.name: training.discover_dataset(root) for root in (msd, lits, total)}
    assert [c.patient for c in found["Task03_Liver"]] == ["Task03_Liver/liver_0"]
    assert [c.mask.name for c in found["LiTS"]] == ["segmentation-7.nii"]
    assert [c.ct.name for c in found["Totalsegmentator"]] == ["ct.nii.gz"]
    with pytest.raises(SystemExit, match="no CT has a matching mask"):
        (tmp_path / "empty" / "imagesTr").mkdir(parents=True)
        (tmp_path / "empty" / "labelsTr").mkdir()
        training.discover_dataset(tmp_path / "empty")


def test_patient_level_split_never_shares_a_patient(tmp_path):
    root = tmp_path / "ts"
    for index in range(5):
        (root / f"s{index}" / "segmentations").mkdir(parents=True)
        for name in ("ct.nii.gz", "segmentations/liver.nii.gz"):
            (root / f"s{index}" / name).write_bytes(b"")
    args = training.parse_args(["--out", str(tmp_path / "o"), "--dataset", str(root),
                             "--val-fraction", "0.4"])
    trained, validation = training.split_cases(args)
    assert len(validation) == 2 and len(trained) == 3
    assert not {c.patient for c in trained} & {c.patient for c in validation}


def test_lesion_augmentation_paints_only_the_liver_and_keeps_other_draws(tmp_path):
    """``--lesion-prob``: lesions change liver pixels only, the target stays the same, and a
    run without lesions draws exactly what it drew before the option existed."""
    args = training.parse_args(["--out", str(tmp_path), "--phantoms", "2", "--lesion-prob", "1",
                             "--batch-size", "4", "--crop-sizes", "64"])
    config = training.UNetConfig()
    scans = training.make_phantom_scans(2, 0, config)
    index = scans[0].hu.shape[0] // 2
    hu, liver = training.geometric(scans[0].hu[index], scans[0].liver[index], 96,
                                training.geometry_settings(args), np.random.default_rng(3))
    painted = training.add_lesions(hu, liver, np.random.default_rng(4))
    changed = painted != hu
    assert changed.any() and not changed[liver == 0].any()
    assert torch.equal(training.add_lesions(hu, torch.zeros_like(liver), np.random.default_rng(4)),
                       hu)
    with_lesions = training.make_batch(scans, args, config, 5)
    args.lesion_prob = 0.0
    without = training.make_batch(scans, args, config, 5)
    assert torch.equal(with_lesions[1], without[1])  # same crops, same targets
    assert not torch.equal(with_lesions[0], without[0])


def test_weight_averaging_ships_the_mean_and_keeps_the_last_weights(tmp_path):
    assert run_training(tiny_run(tmp_path, 4, "--average-from", "0.5")) == 0
    run = tmp_path / "run"
    averaged = load_weights(run / "liver_unet.pt")
    last = load_weights(run / "last_unet.pt")
    assert any(not torch.equal(a, b) for a, b in zip(averaged.state_dict().values(),
                                                      last.state_dict().values()))
    history = json.loads((run / "history.json").read_text())
    assert history[-1]["averaged_steps"] == 2 and history[-1]["validation"]
    sidecar = json.loads((run / "liver_unet.json").read_text())
    assert sidecar["training"]["average_from"] == 0.5
    assert sidecar["validation"]["results"] == history[-1]["validation"]


def test_update_average_is_the_running_mean():
    model = training.LiverUNet(training.UNetConfig(widths=(2, 4)))
    average, count = None, 0
    for scale in (1.0, 2.0, 6.0):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(scale)
        average, count = training.update_average(model, average, count)
    assert count == 3
    assert all(torch.allclose(mean, torch.full_like(mean, 3.0)) for mean in average)


@pytest.mark.parametrize("argv, message", [
    (["--out", "x", "--phantoms", "1", "--lesion-prob", "1.5"], "--lesion-prob must be in"),
    (["--out", "x", "--phantoms", "1", "--average-from", "1"], "--average-from must be in"),
    (["--out", "x"], "give training data"),
    (["--out", "x", "--phantoms", "1", "--crop-sizes", "24"], "multiples of 16"),
    (["--out", "x", "--phantoms", "1", "--steps", "0"], "--steps must be at least 1"),
    (["--out", "x", "--phantoms", "1", "--label", "0"], "--label must be a positive"),
    (["--out", "x", "--phantoms", "1", "--negative", "ct.nii", "5", "2"], "START < STOP"),
    (["--out", "x", "--phantoms", "1", "--negative", "a.nii", "0", "2", "--val", "a.nii",
      "m.nii"], "is a validation scan"),
])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        training.parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_command_line_is_a_thin_wrapper_with_help():
    """scripts/train_liver_unet.py runs models.training.main with the sender's hooks."""
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                            text=True, timeout=120, check=True)
    assert "--lesion-prob" in result.stdout and "Examples:" in result.stdout
    assert len(SCRIPT.read_text().splitlines()) < 80
