"""Synthetic liver lesions (models/phantoms.py: insert_lesion) and the ROI's cover of them.

A focal lesion is part of the liver ROI: a dark metastasis or ablation zone must reach the
receiver bit-exact even when the network does not call it liver. These tests paint lesions
into a phantom and into the real abdomen CT and check that the sender's final ROI (bundled
U-Net, default steering: margin across slices and holes filled) covers every lesion voxel.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from models.phantoms import LESION_HYPER_HU, LESION_HYPO_HU, insert_lesion, make_phantom
from sender.roi.mask_file import MaskFileProvider
from sender.roi.steering import SteeringSettings, steer
from shared.volume import Volume


@pytest.fixture(scope="module")
def provider():
    from sender.roi.unet import UNetProvider
    return UNetProvider(device="cpu")


def test_insert_lesion_changes_only_the_liver_and_is_seeded():
    volume, liver = make_phantom(shape=(6, 96, 96), spacing=(3.0, 3.0, 5.0), seed=5)
    hu = volume.data.astype(np.float32)
    weight = insert_lesion(hu, liver, np.random.default_rng(5), spacing=volume.spacing)
    assert weight.max() == 1.0 and weight.min() == 0.0 and (weight > 0).sum() > 20
    assert np.all(weight[~liver] == 0) and np.array_equal(hu[~liver], volume.data[~liver])
    change = (hu - volume.data)[weight == 1.0]
    low, high = min(LESION_HYPO_HU), max(LESION_HYPER_HU)
    assert 1.2 * low <= change.mean() <= 1.2 * high and abs(change.mean()) >= 15
    again = volume.data.astype(np.float32)
    insert_lesion(again, liver, np.random.default_rng(5), spacing=volume.spacing)
    assert np.array_equal(again, hu)
    flat = np.zeros((40, 40), np.float32)  # 2D, and an empty liver changes nothing
    assert not insert_lesion(flat, np.zeros((40, 40)), np.random.default_rng(0)).any()
    assert not flat.any()


@pytest.mark.parametrize("kwargs, message", [
    ({"radius_px": (0.0, 3.0)}, "radius_px"),
    ({"hyper_prob": 1.5}, "hyper_prob"),
])
def test_insert_lesion_checks_its_arguments(kwargs, message):
    hu, liver = np.zeros((8, 8), np.float32), np.ones((8, 8))
    with pytest.raises(ValueError, match=message):
        insert_lesion(hu, liver, np.random.default_rng(0), **kwargs)
    with pytest.raises(ValueError, match="float"):
        insert_lesion(np.zeros((8, 8), np.int16), liver, np.random.default_rng(0))
    with pytest.raises(ValueError, match="same 2D or 3D"):
        insert_lesion(hu, np.ones((8, 9)), np.random.default_rng(0))


def with_lesion(volume: Volume, lesion: np.ndarray, delta_hu: float) -> Volume:
    data = np.clip(volume.data.astype(np.int32) + np.where(lesion, int(delta_hu), 0),
                   -1024, 3071).astype(np.int16)
    return Volume(data=data, affine=volume.affine, spacing=volume.spacing)


def test_phantom_lesion_is_inside_the_roi(provider):
    """A large dark lesion in a phantom's liver (not a training phantom: another generator
    seed and size) ends up in the bundled U-Net's ROI."""
    volume, liver = make_phantom(shape=(8, 176, 176), spacing=(2.0, 2.0, 5.0), seed=2024)
    hu = volume.data.astype(np.float32)
    rng = np.random.default_rng(7)
    weight = insert_lesion(hu, liver, rng, radius_px=(12.0, 16.0), hyper_prob=0.0,
                           spacing=volume.spacing)
    lesion = weight > 0
    assert lesion.sum() > 500
    painted = Volume(data=np.rint(hu).astype(np.int16), affine=volume.affine,
                     spacing=volume.spacing)
    roi = steer(provider.probability(painted), painted.spacing,
                SteeringSettings().for_provider(provider)).roi
    assert roi[lesion].all(), f"{(~roi[lesion]).sum()} lesion voxels outside the ROI"


@pytest.fixture(scope="module")
def abdomen_depth(abdomen_volume, abdomen_liver):
    """The shared abdomen CT's liver mask and each liver voxel's depth below its surface (mm)."""
    liver = MaskFileProvider(abdomen_liver).probability(abdomen_volume) > 0.5
    sx, sy, sz = abdomen_volume.spacing
    return liver, distance_transform_edt(liver, sampling=(sz, sy, sx))


@pytest.mark.parametrize("where, radius_mm, delta_hu", [
    ("deep", 30, -70),   # a large hypodense metastasis in the middle of the liver
    ("edge", 20, -70),   # a hypodense lesion against the capsule
    ("edge", 12, -40),
    ("edge", 20, 60),    # an arterially enhancing lesion against the capsule
])
def test_real_ct_lesion_is_inside_the_roi(provider, abdomen_volume, abdomen_depth, where,
                                          radius_mm, delta_hu):
    """Spherical lesions painted into the shared abdomen CT (the lesion voxels stay liver) are
    covered by the final ROI."""
    liver, depth = abdomen_depth
    low, high = (25, np.inf) if where == "deep" else (3, 8)
    candidates = np.argwhere((depth >= low) & (depth <= high))
    centre = candidates[np.random.default_rng(radius_mm).integers(len(candidates))]
    sx, sy, sz = abdomen_volume.spacing
    axes = [((np.arange(n) - c) * s) ** 2 for n, c, s in
            zip(liver.shape, centre, (sz, sy, sx), strict=True)]
    lesion = liver & (axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
                      <= radius_mm ** 2)
    assert lesion.sum() > 1000
    painted = with_lesion(abdomen_volume, lesion, delta_hu)
    roi = steer(provider.probability(painted), painted.spacing,
                SteeringSettings().for_provider(provider)).roi
    assert roi[lesion].all(), f"{(~roi[lesion]).sum()} of {lesion.sum()} lesion voxels missed"
