"""The U-Net provider with the bundled weights: contract, determinism, and liver recall on real CT.

The recall test is the safety regression test: the bundled model must keep at least 99.5 % of
the liver of the shared abdomen CT inside the final ROI while the ROI stays within 1.6 times
that of the dilated true liver. (The bundled model was trained on both shared scans, so this
guards against regressions; the held-out figures are in docs/UNET.md.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.phantoms import make_phantom
from sender.io import load_volume
from sender.roi.mask_file import MaskFileProvider
from sender.roi.safety import check_roi_plausibility, roi_metrics
from sender.roi.unet import UNetProvider
from shared.volume import Volume

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """A file of ../shared/data; skip only when the whole folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present on this machine")
    path = SHARED_DATA / name
    assert path.exists(), f"{path} is missing from the shared data folder"
    return path


@pytest.fixture(scope="module")
def provider():
    return UNetProvider(device="cpu")


@pytest.fixture(scope="module")
def phantom() -> Volume:
    volume, _ = make_phantom(shape=(5, 96, 112), spacing=(3.0, 3.0, 5.0), seed=3)
    return volume


def test_probability_has_the_volume_shape_and_range(provider, phantom):
    p = provider.probability(phantom)
    assert p.shape == phantom.shape and p.dtype == np.float32
    assert 0.0 <= p.min() and p.max() <= 1.0


def test_inference_is_deterministic_and_independent_of_the_batch(provider, phantom):
    first = provider.probability(phantom)
    assert np.array_equal(first, provider.probability(phantom))
    one_by_one = UNetProvider(device="cpu", batch_size=1).probability(phantom)
    assert np.abs(one_by_one - first).max() < 1e-4


def test_array_orientation_does_not_change_the_prediction(provider, phantom):
    """The same voxels stored flipped (LPS vs RAS rows/columns) get the same probabilities."""
    nz, ny, nx = phantom.shape
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = nx - 1, ny - 1  # index i -> nx - 1 - i, j -> ny - 1 - j
    flipped = Volume(data=phantom.data[:, ::-1, ::-1], affine=phantom.affine @ flip,
                     spacing=phantom.spacing)
    assert np.array_equal(provider.probability(flipped)[:, ::-1, ::-1],
                          provider.probability(phantom))


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


@pytest.mark.parametrize("ct, mask", [("abdomen_ct_dicom", "abdomen_ct_liver.nii.gz"),
                                      ("torso_ct_sm.nii.gz", "torso_ct_sm_liver.nii.gz")])
def test_liver_recall_on_the_shared_scans(provider, ct, mask):
    volume = load_volume(shared_file(ct))
    liver = MaskFileProvider(shared_file(mask)).probability(volume) > 0.5
    probability = provider.probability(volume)
    metrics = roi_metrics(probability, liver, volume.spacing)
    assert metrics.recall >= 0.995, metrics
    assert metrics.roi_ratio <= 1.6, metrics
    assert metrics.dice >= 0.90, metrics
    assert check_roi_plausibility(probability, volume) is None
