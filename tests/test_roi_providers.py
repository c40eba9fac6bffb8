"""Body and box ROI providers, the plausibility check and the ROI safety metrics."""

from __future__ import annotations

import numpy as np
import pytest

from models.phantoms import make_phantom
from sender.roi.body import BodyProvider
from sender.roi.box import BoxProvider
from sender.roi.safety import (
    FALLBACK_POLICY,
    MIN_LIVER_VOLUME_ML,
    check_roi_plausibility,
    fallback_probability,
    roi_metrics,
)
from sender.roi.steering import steer
from shared.volume import Volume, VolumeError

LPS_AFFINE = np.array([[-1.0, 0, 0, 50], [0, -1.0, 0, 40], [0, 0, 2.0, -10], [0, 0, 0, 1]])


def make_volume(data, affine=None, spacing=(1.0, 1.0, 2.0)) -> Volume:
    affine = np.diag([*spacing, 1.0]) if affine is None else affine
    return Volume(data=np.asarray(data, dtype=np.int16), affine=affine, spacing=spacing)


def torso_volume() -> Volume:
    """Air; an elliptic body with a gas pocket inside; a separate table strip and arm."""
    hu = np.full((4, 64, 80), -1000, dtype=np.int16)
    j, i = np.mgrid[:64, :80]
    body = ((i - 40) / 28.0) ** 2 + ((j - 30) / 20.0) ** 2 <= 1
    hu[:, body] = 40
    hu[:, 25:30, 35:45] = -950  # bowel gas, enclosed
    hu[:, 58:61, 5:75] = 200  # table, not touching the body
    hu[:, 28:34, 1:6] = 60  # an arm beside the trunk
    return make_volume(hu)


def test_body_provider_keeps_the_trunk_with_its_air_and_drops_table_and_arm():
    volume = torso_volume()
    p = BodyProvider().probability(volume)
    assert p.dtype == np.float32 and p.shape == volume.shape
    assert set(np.unique(p)) == {0.0, 1.0}
    assert np.all(p[:, 27, 40] == 1)  # the gas pocket is filled in
    assert np.all(p[:, 59, 40] == 0) and np.all(p[:, 30, 3] == 0)  # table, arm
    assert np.all(p[:, 0, 0] == 0)  # air
    assert BodyProvider().describe() == {"provider": "body", "threshold_hu": -500.0}


def test_body_provider_on_pure_air_and_bad_threshold():
    air = make_volume(np.full((2, 8, 8), -1000))
    assert not BodyProvider().probability(air).any()
    for bad in (float("nan"), -5000):
        with pytest.raises(ValueError, match="HU value"):
            BodyProvider(threshold_hu=bad)


def test_box_spec_parsing():
    box = BoxProvider.from_spec(" -10, 10.5 ,0,20,-5,5 ")
    assert box.bounds == (-10.0, 10.5, 0.0, 20.0, -5.0, 5.0)
    assert box.describe() == {"provider": "box", "box_ras_mm": [-10.0, 10.5, 0.0, 20.0, -5.0, 5.0]}


@pytest.mark.parametrize("spec, message", [
    ("1,2,3,4,5", "has 5 values; expected 6"),
    ("1,2,3,4,5,6,7", "has 7 values"),
    ("a,2,3,4,5,6", "every value must be a number"),
    ("0,10,5,5,0,1", "y0 < y1"),
    ("10,0,0,1,0,1", "x0 < x1"),
    ("0,1,0,1,nan,1", "finite"),
    ("", "has 1 values"),
])
def test_box_spec_errors_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        BoxProvider.from_spec(spec)


def test_box_selects_voxel_centres_in_world_space():
    # LPS-stored grid: i grows toward RAS -x, j toward RAS -y, k toward +z.
    volume = make_volume(np.zeros((5, 6, 7)), affine=LPS_AFFINE)
    # Voxel (i, j, k) lies at x = 50 - i, y = 40 - j, z = -10 + 2k.
    p = BoxProvider.from_spec("46,48,38,40,-6,-4").probability(volume)
    expected = np.zeros(volume.shape, dtype=np.float32)
    expected[2:4, 0:3, 2:5] = 1  # k in {2, 3}, j in {0, 1, 2}, i in {2, 3, 4}
    assert np.array_equal(p, expected)


def test_box_outside_the_scan_is_an_error():
    volume = make_volume(np.zeros((2, 4, 4)))
    with pytest.raises(VolumeError, match="contains no voxel centre"):
        BoxProvider.from_spec("100,200,0,1,0,1").probability(volume)


def liver_volume(section_px: int, slices: int = 10) -> tuple[Volume, np.ndarray]:
    """A 1 x 1 x 2 mm volume with a square 'liver' of ``section_px`` px per slice."""
    volume = make_volume(np.zeros((slices, 200, 200)))
    probability = np.zeros(volume.shape, dtype=np.float32)
    side = int(np.sqrt(section_px))
    probability[:, 50:50 + side, 50:50 + side] = 0.9
    return volume, probability


def test_plausibility_flags_an_empty_prediction():
    volume, probability = liver_volume(0)
    warning = check_roi_plausibility(np.zeros(volume.shape, np.float32), volume)
    assert warning is not None and "empty" in warning and "no diffusion" in warning
    assert "ROI is empty" in check_roi_plausibility(steer(probability, volume.spacing), volume)


def test_plausibility_flags_a_speck_and_accepts_a_liver():
    volume, speck = liver_volume(100, slices=3)  # 1 cm² x 6 mm = 0.6 mL
    warning = check_roi_plausibility(speck, volume)
    assert warning is not None and "implausibly small" in warning
    square = liver_volume(150 * 100)  # 150 cm² x 2 cm = 300 mL, but in a body of water
    assert check_roi_plausibility(steer(square[1], square[0].spacing), square[0]) is None
    # A liver in an abdomen (the anatomical checks need one: tests/test_roi_plausibility.py).
    volume, liver = make_phantom(shape=(10, 160, 160), spacing=(2.0, 2.0, 5.0), seed=7)
    assert check_roi_plausibility(liver.astype(np.float32), volume) is None
    assert MIN_LIVER_VOLUME_ML > 0


def test_plausibility_checks_the_shape():
    volume, _ = liver_volume(0)
    with pytest.raises(ValueError, match="does not match"):
        check_roi_plausibility(np.zeros((1, 2, 3), np.float32), volume)


def test_fallback_sends_everything_bit_exact():
    volume, _ = liver_volume(0, slices=2)
    p = fallback_probability(volume)
    assert FALLBACK_POLICY == "no-diffusion"
    assert steer(p, volume.spacing).roi.all()


def test_roi_metrics_of_a_perfect_and_of_a_shifted_prediction():
    volume, probability = liver_volume(40 * 40)
    liver = probability > 0.5
    perfect = roi_metrics(liver.astype(np.float32), liver, volume.spacing)
    assert perfect.dice == 1.0 and perfect.recall == 1.0 and perfect.roi_ratio == 1.0
    shifted = np.roll(liver, 10, axis=2).astype(np.float32)  # within the 15 px dilation
    metrics = roi_metrics(shifted, liver, volume.spacing)
    assert metrics.recall == 1.0 and metrics.dice == pytest.approx(0.75)
    far = np.roll(liver, 60, axis=2).astype(np.float32)  # beyond it
    assert roi_metrics(far, liver, volume.spacing).recall < 0.5
    with pytest.raises(ValueError, match="empty"):
        roi_metrics(far, np.zeros_like(liver), volume.spacing)
