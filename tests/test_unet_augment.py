"""The training augmentations (models/augment.py), the liver-free region phantoms
(models/body_phantoms.py) and the padding suppression (models/preprocessing.py): each does what
it claims, and the same seed gives the same result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt

from models import augment, training
from models.body_phantoms import REGIONS, make_region_phantom
from models.phantoms import make_phantom
from models.preprocessing import AIR_HU, suppress_padding
from models.unet import UNetConfig


@pytest.fixture(scope="module")
def crop() -> tuple[torch.Tensor, torch.Tensor]:
    """A 2 mm phantom slice with a large liver: ``(HU, liver fraction)``."""
    volume, liver = make_phantom(shape=(6, 160, 160), spacing=(2.0, 2.0, 5.0), seed=1)
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    return torch.from_numpy(volume.data[k].astype(np.float32)), torch.from_numpy(
        liver[k].astype(np.float32))


def same_twice(function, *args, seed=11):
    first = function(*args, np.random.default_rng(seed))
    second = function(*args, np.random.default_rng(seed))
    assert torch.equal(first, second), "the same seed gave two results"
    return first


def test_contrast_phase_moves_the_liver_to_another_phase(crop):
    hu, liver = crop
    core = liver > 0.9
    targets = []
    for seed in range(12):
        out = same_twice(augment.contrast_phase, hu, liver, seed=seed)
        targets.append(float(out[core].median()))
        fat_or_air = (hu < -50) & (liver == 0)
        assert torch.equal(out[fat_or_air], hu[fat_or_air])  # fat and air untouched
    low, high = augment.PLAIN_LIVER_HU[0], augment.ENHANCED_LIVER_HU[1]
    assert all(low - 15 <= t <= high + 15 for t in targets), targets
    assert min(targets) < augment.PLAIN_LIVER_HU[1] and max(targets) > 80  # both kinds drawn


def test_contrast_phase_keeps_a_crop_without_liver(crop):
    hu, liver = crop
    out = augment.contrast_phase(hu, torch.zeros_like(liver), np.random.default_rng(0))
    soft = (hu > 100) & (hu < 350)  # enhancing organs change, nothing else
    assert torch.equal(out[hu < -50], hu[hu < -50]) and not torch.equal(out[soft], hu[soft])


def test_reconstruction_kernel_changes_texture_and_noise(crop):
    hu, _ = crop
    outs = [same_twice(augment.reconstruction_kernel, hu, seed=seed) for seed in range(8)]
    differences = [float((out - hu).std()) for out in outs]
    assert all(4.0 < d < 200.0 for d in differences), differences
    assert all(abs(float((out - hu).mean())) < 5.0 for out in outs)  # no global shift


def test_field_of_view_fills_outside_a_circle_and_preprocessing_removes_it(crop):
    hu, _ = crop
    seen = set()
    for seed in range(30):
        out = same_twice(augment.field_of_view, hu, seed=seed)
        changed = out != hu
        fill = float(out[0, 0])
        seen.add(fill)
        assert fill in augment.PADDING_VALUES_HU
        assert all(float(v) == fill for v in (out[0, -1], out[-1, 0], out[-1, -1]))
        assert torch.all(out[changed] == fill)
        cleaned = augment.remove_padding(out)
        if fill > -500:  # 0 HU looks like water: it must become air
            assert torch.all(cleaned[out == fill][:10] == AIR_HU)
            assert torch.equal(cleaned[~changed & (hu != fill)], hu[~changed & (hu != fill)])
    assert seen == set(augment.PADDING_VALUES_HU)


def test_capsule_lesion_is_large_inside_the_liver_and_reaches_its_edge(crop):
    hu, liver = crop
    core = (liver > 0.5).numpy()
    depth = distance_transform_edt(core) * 2.0  # mm at 2 mm pixels
    for seed in range(6):
        out = same_twice(lambda h, mask, r: augment.capsule_lesion(h, mask, r, 2.0), hu, liver,
                         seed=seed)
        changed = (out != hu).numpy()
        assert changed.any() and not changed[liver.numpy() == 0].any()
        area_cm2 = changed.sum() * 4 / 100
        assert area_cm2 > 3.0, area_cm2  # a 5-10 cm tumour, cut by the slice and the liver
        assert depth[changed].min() <= 4.0  # it reaches the capsule
    empty = torch.zeros_like(liver)
    assert torch.equal(augment.capsule_lesion(hu, empty, np.random.default_rng(0), 2.0), hu)


def test_domain_settings_are_checked():
    with pytest.raises(ValueError, match="phase_prob"):
        augment.DomainSettings(phase_prob=1.5)
    assert not augment.DomainSettings().active and augment.DomainSettings(kernel_prob=0.1).active


def test_domain_augmentations_change_images_not_targets_and_are_seeded(tmp_path):
    base = ["--out", str(tmp_path), "--phantoms", "2", "--batch-size", "4", "--crop-sizes", "64"]
    config = UNetConfig()
    scans = training.make_phantom_scans(2, 0, config)
    plain = training.make_batch(scans, training.parse_args(base), config, 3)
    argv = base + ["--phase-prob", "1", "--kernel-prob", "1", "--fov-prob", "1",
                   "--capsule-lesion-prob", "1"]
    domain = training.make_batch(scans, training.parse_args(argv), config, 3)
    again = training.make_batch(scans, training.parse_args(argv), config, 3)
    assert torch.equal(domain[0], again[0]) and torch.equal(domain[1], again[1])
    assert torch.equal(domain[1], plain[1])  # same crops and targets
    assert not torch.equal(domain[0], plain[0])


@pytest.mark.parametrize("region", REGIONS)
def test_region_phantoms_hold_no_liver_and_are_seeded(region):
    volume, liver = make_region_phantom(region, shape=(4, 96, 96), seed=2)
    again, _ = make_region_phantom(region, shape=(4, 96, 96), seed=2)
    other, _ = make_region_phantom(region, shape=(4, 96, 96), seed=3)
    assert not liver.any() and liver.shape == volume.shape
    assert np.array_equal(volume.data, again.data) and not np.array_equal(volume.data, other.data)
    body = volume.data > -500
    assert 0.1 < body.mean() < 0.95
    assert (volume.data > 300).any()  # bone: skull, spine, ribs or pelvis


def test_region_phantoms_refuse_unknown_regions():
    with pytest.raises(ValueError, match="region must be one of"):
        make_region_phantom("knee")


def test_liver_free_phantoms_join_training(tmp_path):
    config = UNetConfig()
    scans = training.make_region_phantom_scans(4, 0, config)
    assert [s.name.split("-")[0] for s in scans] == list(REGIONS)
    assert all(s.synthetic and int(s.liver.max()) == 0 for s in scans)


def test_padding_suppression():
    section = np.full((40, 40), -3024, np.int16)
    section[5:35, 5:35] = 40
    assert np.array_equal(suppress_padding(section), section)  # below -500: the window's air
    zero = np.where(section == -3024, 0, section).astype(np.int16)
    zero[15:25, 15:25] = 0  # water inside the body, not connected to the border
    cleaned = suppress_padding(zero[None])[0]
    assert np.all(cleaned[section == -3024] == AIR_HU)
    assert np.all(cleaned[15:25, 15:25] == 0) and np.all(cleaned[5:15, 5:35] == 40)
    noisy = np.random.default_rng(0).normal(0, 10, (40, 40)).astype(np.int16)
    assert suppress_padding(noisy) is noisy  # no constant border: nothing to do
