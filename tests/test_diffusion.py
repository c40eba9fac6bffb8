"""Probability-steered Perona–Malik: ROI bit-exact, matches the NumPy oracle, stable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sender.diffusion import DiffusionSettings, diffuse, diffuse_slabs
from tests.diffusion_oracle import diffuse_numpy


@pytest.fixture()
def noisy(rng):
    volume = rng.normal(40, 25, (4, 48, 40)).round().astype(np.int16)
    volume[:, 20:, :] += 600  # an edge that must survive
    probability = np.zeros(volume.shape, np.float32)
    probability[:, 5:15, 5:15] = 1.0
    probability[:, 30:40, 10:30] = 0.5
    return volume, probability


def test_roi_voxels_bit_exact(noisy):
    volume, probability = noisy
    out = diffuse(volume, probability, DiffusionSettings(kappa=40, iterations=30))
    roi = probability == 1
    np.testing.assert_array_equal(out[roi], volume[roi])
    assert out.dtype == np.int16


def test_matches_numpy_reference_within_one_hu(noisy):
    volume, probability = noisy
    out = diffuse(volume, probability, DiffusionSettings(kappa=30, iterations=15))
    reference = diffuse_numpy(volume, probability, kappa=30, iterations=15)
    difference = np.abs(out.astype(int) - reference)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_real_ct_within_stated_tolerance_of_the_numpy_oracle(abdomen_volume, abdomen_liver):
    """The module's stated tolerance on a real CT and its steering map: at most 1 HU after
    rounding, on fewer than 0.1 % of the voxels; the ROI untouched."""
    from sender.roi.mask_file import MaskFileProvider
    from sender.roi.steering import SteeringSettings, steer

    steering = steer(MaskFileProvider(abdomen_liver).probability(abdomen_volume),
                     abdomen_volume.spacing, SteeringSettings())
    volume = abdomen_volume.data[8:11]  # three slices: the float64 oracle is slow
    probability = steering.probability[8:11]
    settings = DiffusionSettings()
    out = diffuse(volume, probability, settings, device="cpu")
    reference = diffuse_numpy(volume, probability, settings.kappa, settings.iterations)
    difference = np.abs(out.astype(np.int32) - reference)
    assert difference.max() <= 1
    assert (difference > 0).mean() < 1e-3
    assert (out != volume).mean() > 0.5  # it did diffuse
    roi = probability == 1
    np.testing.assert_array_equal(out[roi], volume[roi])


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_every_block_layout_gives_the_same_bits(noisy, mode):
    """Blocks of slices, worker threads and the one-block layout CUDA uses: same arithmetic,
    same order of the sum, so bit-identical results (the CUDA path is this code on another
    device)."""
    volume, probability = noisy
    settings = DiffusionSettings(kappa=30, mode=mode)
    nz = volume.shape[0]
    whole = diffuse_slabs(volume, probability, settings, "cpu", slab=nz)
    layouts = [(1, 1), (1, 2), (3, 2), (nz, 3)] if mode == "2d" else [(nz + 5, 2)]
    for slab, workers in layouts:
        np.testing.assert_array_equal(
            diffuse_slabs(volume, probability, settings, "cpu", slab, workers), whole)
    np.testing.assert_array_equal(diffuse(volume, probability, settings, "cpu"), whole)


def test_3d_mode_refuses_blocks_of_slices(noisy):
    volume, probability = noisy
    with pytest.raises(ValueError, match="couples"):
        diffuse_slabs(volume, probability, DiffusionSettings(mode="3d"), "cpu", slab=2)


def test_thread_count_restored_and_odd_inputs_accepted(noisy):
    """Workers set torch to one thread while they run and restore it; read-only, big-endian
    and non-contiguous inputs are read as they are."""
    volume, probability = noisy
    expected = diffuse(volume, probability, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        odd = volume.astype(">i2")
        odd.flags.writeable = False
        np.testing.assert_array_equal(diffuse(odd, probability.astype(np.float64), device="cpu"),
                                      expected)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    strided = np.asfortranarray(volume)
    np.testing.assert_array_equal(diffuse(strided, probability, device="cpu"), expected)


def test_degenerate_shapes(rng):
    """Axes of length 1 have no faces; a single voxel stays what it is."""
    for shape in [(1, 1, 1), (3, 1, 9), (2, 7, 1)]:
        volume = rng.normal(0, 50, shape).round().astype(np.int16)
        zero = np.zeros(shape, np.float32)
        for mode in ("2d", "3d"):
            out = diffuse(volume, zero, DiffusionSettings(kappa=1e4, mode=mode), device="cpu")
            assert out.shape == shape
            if mode == "2d" and shape[1] == 1 and shape[2] == 1:
                np.testing.assert_array_equal(out, volume)
            # conservative: the mean of each connected set of voxels is kept
            assert abs(out.astype(float).mean() - volume.mean()) <= 1


def test_smooths_homogeneous_tissue_and_keeps_edges(noisy):
    volume, probability = noisy
    out = diffuse(volume, np.zeros_like(probability), DiffusionSettings(kappa=60, iterations=15))
    assert out[:, :18].std() < 0.5 * volume[:, :18].std()
    edge_before = volume[:, 22:].mean() - volume[:, :18].mean()
    edge_after = out[:, 22:].mean() - out[:, :18].mean()
    assert edge_after == pytest.approx(edge_before, rel=0.02)


def test_maximum_principle(noisy):
    volume, probability = noisy
    for mode in ("2d", "3d"):
        out = diffuse(volume, probability * 0, DiffusionSettings(kappa=1e4, iterations=50,
                                                                  mode=mode))
        assert volume.min() <= out.min() and out.max() <= volume.max()


def test_3d_mode_mixes_slices_and_2d_does_not(rng):
    volume = (np.arange(4)[:, None, None] * 20 + rng.normal(0, 5, (4, 32, 32))).round()
    volume = volume.astype(np.int16)
    zero = np.zeros(volume.shape, np.float32)
    means = volume.mean(axis=(1, 2))
    flat2d = diffuse(volume, zero, DiffusionSettings(kappa=1e4, iterations=40, mode="2d"))
    flat3d = diffuse(volume, zero, DiffusionSettings(kappa=1e4, iterations=40, mode="3d"))
    np.testing.assert_allclose(flat2d.mean(axis=(1, 2)), means, atol=0.6)  # per slice, conservative
    assert np.ptp(flat3d.mean(axis=(1, 2))) < 0.5 * np.ptp(means)


def test_settings_validation():
    with pytest.raises(ValueError, match="kappa"):
        DiffusionSettings(kappa=0)
    with pytest.raises(ValueError, match="stability"):
        DiffusionSettings(time_step=0.3)
    with pytest.raises(ValueError, match="mode"):
        DiffusionSettings(mode="4d")
    assert DiffusionSettings(mode="3d").dt == pytest.approx(1 / 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_within_one_hu(noisy):
    volume, probability = noisy
    cpu = diffuse(volume, probability, device="cpu")
    gpu = diffuse(volume, probability, device="cuda")
    assert np.abs(cpu.astype(int) - gpu).max() <= 1
    np.testing.assert_array_equal(gpu[probability == 1], volume[probability == 1])
