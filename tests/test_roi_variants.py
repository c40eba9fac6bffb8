"""Synthetic variants of a labelled scan (models/variants.py), used by scripts/eval_roi.py:
each changes what it says and keeps the liver (and lesion) voxels known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from models import variants as V
from models.phantoms import make_phantom


@pytest.fixture(scope="module")
def case() -> V.Case:
    volume, liver = make_phantom(shape=(12, 128, 112), spacing=(2.0, 2.0, 4.0), seed=5)
    return V.Case("phantom", volume, liver)


def test_contrast_phase_sets_the_liver_hu(case):
    plain = V.contrast_phase(case, 50.0, -0.3, 0.25, "plain")
    before = case.volume.data[case.liver].astype(float)
    parenchyma = np.abs(before - np.median(before)) < 15  # not the vessels
    assert abs(float(np.median(plain.volume.data[case.liver][parenchyma])) - 50) <= 2
    fat = (case.volume.data < -60) & ~case.liver
    assert np.array_equal(plain.volume.data[fat], case.volume.data[fat])
    assert np.array_equal(plain.liver, case.liver) and plain.volume.affine is not case.volume.affine


def test_kernel_noise_is_seeded_and_checked(case):
    sharp = V.kernel_noise(case, "sharp", 20.0, 1, "sharp")
    assert np.array_equal(sharp.volume.data, V.kernel_noise(case, "sharp", 20.0, 1, "x").volume.data)
    smooth = V.kernel_noise(case, "smooth", 0.0, 1, "smooth")
    assert np.abs(np.diff(smooth.volume.data.astype(float), axis=2)).mean() < \
        np.abs(np.diff(case.volume.data.astype(float), axis=2)).mean()
    with pytest.raises(ValueError, match="kernel"):
        V.kernel_noise(case, "bone", 1.0, 1, "x")


def test_field_of_view_fills_outside_the_circle(case):
    padded = V.field_of_view(case, -2048.0, 0.8, "fov")
    assert np.all(padded.volume.data[:, 0, 0] == -2048)
    assert not (padded.liver & (padded.volume.data == -2048)).any()


@pytest.mark.parametrize("where", ["dome", "tip"])
def test_slab_keeps_the_top_or_bottom_liver_slices(case, where):
    slab = V.slab(case, where, 3, where)
    assert slab.volume.shape[0] == 3 and slab.liver.any(axis=(1, 2)).any()
    with_liver = np.flatnonzero(case.liver.any(axis=(1, 2)))
    expected = with_liver[-3:] if where == "dome" else with_liver[:3]  # slices go up (LPS)
    start = int(expected[0]) if where == "dome" else int(with_liver[0])
    assert np.array_equal(slab.volume.data, case.volume.data[start:start + 3])
    assert np.allclose(slab.volume.affine[:3, 3],
                       case.volume.affine[:3, 3] + start * case.volume.affine[:3, 2])


def test_pixel_size_and_slice_thickness_keep_the_extent(case):
    coarse = V.pixel_size(case, 5.0, "5 mm")
    assert np.allclose(coarse.volume.spacing[:2], (112 * 2 / 45, 128 * 2 / 51))
    assert coarse.volume.shape == (12, 51, 45) and coarse.liver.shape == coarse.volume.shape
    ratio = coarse.liver.sum() * np.prod(coarse.volume.spacing) / (
        case.liver.sum() * np.prod(case.volume.spacing))
    assert 0.85 < ratio < 1.15
    thin = V.slice_thickness(case, 1.0, "1 mm")
    assert thin.volume.shape[0] == 48 and thin.volume.spacing[2] == 1.0
    thick = V.slice_thickness(case, 8.0, "8 mm")
    assert thick.volume.shape[0] == 6 and thick.volume.spacing[2] == 8.0
    # The centre of the first voxel moves by half the change of voxel size: same extent.
    assert np.isclose(thick.volume.affine[2, 3] - case.volume.affine[2, 3], 2.0)


def test_paint_lesion_reaches_the_capsule_and_stays_liver(case):
    painted = V.paint_lesion(case, 60.0, -70.0, 0, "tumour")
    lesion = painted.lesion
    assert lesion.sum() > 500 and not (lesion & ~case.liver).any()
    sx, sy, sz = case.volume.spacing
    depth = distance_transform_edt(case.liver, sampling=(sz, sy, sx))
    assert depth[lesion].min() <= max(sx, sz)  # it touches the liver's surface
    changed = painted.volume.data != case.volume.data
    assert not (changed & ~case.liver).any()
    assert float(np.mean(painted.volume.data[lesion] - case.volume.data[lesion])) < -50
