"""ROI from a mask: physical-space alignment, the paper's dilation and threshold."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import grey_dilation

from sender.roi.mask_file import MaskFileProvider
from sender.roi.steering import SteeringSettings, disc_dilate, steer
from shared.volume import VolumeError


def test_mask_aligned_through_physical_space_not_index(abdomen_volume, abdomen_liver):
    probability = MaskFileProvider(abdomen_liver).probability(abdomen_volume)
    raw = np.asanyarray(nib.load(str(abdomen_liver)).dataobj).transpose(2, 1, 0) > 0
    # The NIfTI mask is LAS, the DICOM loads as LPS: the arrays differ by a flip of y.
    np.testing.assert_array_equal(probability > 0, raw[:, ::-1, :])
    assert not np.array_equal(probability > 0, raw)


def test_label_selection_and_empty_label(tmp_path, phantom):
    volume, liver = phantom
    labels = np.where(liver, 5, 0).astype(np.uint8)
    labels[0, :3, :3] = 2
    nib.save(nib.Nifti1Image(labels.transpose(2, 1, 0), volume.affine), tmp_path / "seg.nii.gz")
    p = MaskFileProvider(tmp_path / "seg.nii.gz", label=5).probability(volume)
    np.testing.assert_array_equal(p > 0, liver)
    with pytest.raises(VolumeError, match="label 7"):
        MaskFileProvider(tmp_path / "seg.nii.gz", label=7).probability(volume)


def test_disc_dilation_matches_grey_dilation(rng):
    values = rng.random((3, 50, 61)).astype(np.float32) ** 6
    for rx, ry in ((15, 15), (4, 7), (2.5, 2.5)):
        yy, xx = np.mgrid[-int(ry):int(ry) + 1, -int(rx):int(rx) + 1]
        footprint = (xx / rx) ** 2 + (yy / ry) ** 2 <= 1 + 1e-9
        expected = np.stack([grey_dilation(s, footprint=footprint, mode="constant", cval=0)
                             for s in values])
        np.testing.assert_array_equal(disc_dilate(values, rx, ry), expected)


def test_steering_threshold_and_roi(phantom):
    volume, liver = phantom
    probability = liver.astype(np.float32) * 0.8
    result = steer(probability, volume.spacing, SteeringSettings(dilation_radius_px=3))
    assert result.roi.sum() > liver.sum()  # dilated
    assert np.all(result.probability[result.roi] == 1.0)
    assert result.roi[liver].all()
    low = steer(liver.astype(np.float32) * 0.5, volume.spacing)
    assert not low.roi.any() and low.probability.max() == pytest.approx(0.5)


def test_dilation_in_mm_is_elliptical_in_pixels():
    settings = SteeringSettings(dilation_radius_mm=15)
    assert settings.radii_px((0.5, 1.5, 2.0)) == (30.0, 10.0)
    with pytest.raises(ValueError, match="threshold"):
        SteeringSettings(threshold=1.5)
