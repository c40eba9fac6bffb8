"""The U-Net provider with the bundled weights: contract, determinism, and liver recall on real CT.

The recall test is the safety regression test: the bundled model must keep at least 99.5 % of
the liver of the shared abdomen CT inside the final ROI while the ROI stays within 1.6 times
that of the dilated true liver. (The bundled model was trained on both shared scans, so this
guards against regressions; the held-out figures are in docs/UNET.md.)
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import data_file

from models.phantoms import make_phantom
from sender.io import load_volume
from sender.roi.mask_file import MaskFileProvider
from sender.roi.safety import check_roi_plausibility, roi_metrics
from sender.roi.unet import UNetProvider
from shared.volume import Volume


@pytest.fixture(scope="module")
def provider():
    return UNetProvider(device="cpu")


@pytest.fixture(scope="module")
def synthetic_abdomen() -> Volume:
    volume, _ = make_phantom(shape=(5, 96, 112), spacing=(3.0, 3.0, 5.0), seed=3)
    return volume


def test_probability_has_the_volume_shape_and_range(provider, synthetic_abdomen):
    p = provider.probability(synthetic_abdomen)
    assert p.shape == synthetic_abdomen.shape and p.dtype == np.float32
    assert 0.0 <= p.min() and p.max() <= 1.0


def test_inference_is_deterministic_and_independent_of_the_batch(provider, synthetic_abdomen):
    first = provider.probability(synthetic_abdomen)
    assert np.array_equal(first, provider.probability(synthetic_abdomen))
    one_by_one = UNetProvider(device="cpu", batch_size=1).probability(synthetic_abdomen)
    assert np.abs(one_by_one - first).max() < 1e-4


def test_test_time_flips_average_the_mirrored_prediction(provider, synthetic_abdomen):
    """flips=True is the mean of the map and of the map of the mirrored slices, mirrored
    back; an ensemble of one network twice is that network."""
    from models.inference import predict_probability
    from models.unet import BUNDLED_WEIGHTS

    volume = synthetic_abdomen
    single = UNetProvider(weights=BUNDLED_WEIGHTS, device="cpu")
    plain = single.probability(volume)
    flipped = UNetProvider(weights=BUNDLED_WEIGHTS, device="cpu", flips=True).probability(volume)
    nz, ny, nx = volume.shape
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0])
    mirror[0, 3] = nx - 1
    # The same voxels with the columns stored in reverse but the affine left as it is: the
    # network sees the patient mirrored.
    mirrored = predict_probability(single.model, volume.data[:, :, ::-1].copy(),
                                   volume.affine, volume.spacing)[:, :, ::-1]
    assert np.abs(flipped - (plain + mirrored) / 2).max() < 1e-5
    twice = predict_probability([single.model, single.model], volume.data, volume.affine,
                                volume.spacing)
    assert np.abs(twice - plain).max() < 1e-6
    assert UNetProvider(device="cpu", flips=True).describe()["test_time_flips"] is True


def test_the_default_is_the_bundled_ensemble_mean(provider, synthetic_abdomen):
    """Without weights the sender runs both bundled networks and averages them."""
    from models.unet import BUNDLED_ENSEMBLE

    assert provider.weights == list(BUNDLED_ENSEMBLE) and len(provider.models) == 2
    members = [UNetProvider(weights=path, device="cpu").probability(synthetic_abdomen)
               for path in BUNDLED_ENSEMBLE]
    assert np.abs(members[0] - members[1]).max() > 1e-3  # two different networks
    assert np.abs(provider.probability(synthetic_abdomen) - sum(members) / 2).max() < 1e-5
    assert [m["weights"] for m in provider.describe()["ensemble"]] == \
        [path.name for path in BUNDLED_ENSEMBLE]


def test_array_orientation_does_not_change_the_prediction(provider, synthetic_abdomen):
    """The same voxels stored flipped (LPS vs RAS rows/columns) get the same probabilities."""
    nz, ny, nx = synthetic_abdomen.shape
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = nx - 1, ny - 1  # index i -> nx - 1 - i, j -> ny - 1 - j
    flipped = Volume(data=synthetic_abdomen.data[:, ::-1, ::-1],
                     affine=synthetic_abdomen.affine @ flip, spacing=synthetic_abdomen.spacing)
    assert np.array_equal(provider.probability(flipped)[:, ::-1, ::-1],
                          provider.probability(synthetic_abdomen))


def test_the_map_does_not_depend_on_threads_or_batches(provider, synthetic_abdomen):
    """On CPU each batch runs on one torch thread, batches side by side: the map is the same
    bit for bit whatever the number of workers, the calling thread's torch threads or the
    batch size (a live sender's slices, computed as they arrive in batches of one or two,
    equal a whole-volume pass)."""
    import torch

    from models.inference import predict_probability

    volume = synthetic_abdomen
    args = (provider.models, volume.data, volume.affine, volume.spacing)
    reference = predict_probability(*args, batch_size=2, workers=1)
    threads = torch.get_num_threads()
    try:
        for torch_threads in (1, 2):
            torch.set_num_threads(torch_threads)
            for workers, batch_size in [(None, 8), (2, 1), (3, 2), (1, 5)]:
                np.testing.assert_array_equal(
                    predict_probability(*args, batch_size=batch_size, workers=workers),
                    reference)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(predict_probability(
        provider.models, volume.data[2:4], volume.affine, volume.spacing, workers=2),
        reference[2:4])
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="workers"):
            predict_probability(*args, workers=bad)


def test_arguments_are_checked(tmp_path):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            UNetProvider(batch_size=bad)
    with pytest.raises(ValueError, match="invalid device"):
        UNetProvider(device="toaster")
    with pytest.raises(FileNotFoundError):
        UNetProvider(weights=tmp_path / "missing.pt")


def test_describe_names_the_weights(provider):
    description = provider.describe()
    assert description["provider"] == "unet" and description["weights"] == "liver_unet.pt"
    assert len(description["weights_sha256"]) == 16 and description["device"] == "cpu"


def check_recall(provider, volume, mask_path):
    liver = MaskFileProvider(mask_path).probability(volume) > 0.5
    probability = provider.probability(volume)
    metrics = roi_metrics(probability, liver, volume.spacing)
    assert metrics.recall >= 0.995, metrics
    assert metrics.roi_ratio <= 1.6, metrics
    assert metrics.dice >= 0.90, metrics
    assert check_roi_plausibility(probability, volume) is None


def test_liver_recall_on_the_abdomen_ct(provider, abdomen_volume, abdomen_liver):
    check_recall(provider, abdomen_volume, abdomen_liver)


def test_liver_recall_on_the_torso_ct(provider):
    check_recall(provider, load_volume(data_file("torso_ct_sm.nii.gz")),
                 data_file("torso_ct_sm_liver.nii.gz"))


def test_a_scan_without_liver_takes_the_safe_fallback(provider):
    """The torso patient's pelvis (slices 0-59 of torso_ct_3mm, well below the liver): the
    predicted liver is at most a speck, so the sender falls back to sending everything
    bit-exact. (These slices were trained on as liver-free: a regression check.)"""
    torso = load_volume(data_file("torso_ct_3mm.nii.gz"))
    pelvis = Volume(data=torso.data[:60], affine=torso.affine, spacing=torso.spacing)
    warning = check_roi_plausibility(provider.probability(pelvis), pelvis)
    assert warning is not None and "no diffusion" in warning
