"""GMSD (shared.metrics.gmsd): the edge-preservation metric of the diffusion study."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from shared.metrics import gmsd


@pytest.fixture()
def edges(rng):
    """A slice with steps of 60 HU (soft tissue) and 1000 HU (bone), plus 10 HU noise."""
    image = np.zeros((2, 64, 64))
    image[:, :, 20:] = 60.0
    image[:, 40:, :] = 1000.0
    return image + rng.normal(0, 10, image.shape)


def test_identical_images_score_zero(edges):
    assert gmsd(edges, edges, 4095) == 0.0
    assert gmsd(edges[0], edges[0], 400) == 0.0  # 2D


def test_grows_with_blur_and_sees_soft_tissue_edges_only_in_a_narrow_range(edges):
    mild = ndimage.gaussian_filter(edges, (0, 0.7, 0.7))
    strong = ndimage.gaussian_filter(edges, (0, 2.0, 2.0))
    assert 0 < gmsd(edges, mild, 4095) < gmsd(edges, strong, 4095)
    # The soft-tissue window (clipped, L = 400) weighs the 60 HU edge; L = 4095 barely does.
    soft = edges.copy()
    soft[:, :38] = ndimage.gaussian_filter(edges, (0, 2.0, 2.0))[:, :38]  # blur the 60 HU step
    window = (-160, 240)
    assert gmsd(np.clip(edges, *window), np.clip(soft, *window), 400) > \
        3 * gmsd(edges, soft, 4095)


def test_mask_restricts_the_pixels(edges):
    damaged = edges.copy()
    damaged[:, :, 40:] = ndimage.gaussian_filter(edges, (0, 3.0, 3.0))[:, :, 40:]
    left = np.zeros(edges.shape, bool)
    left[:, :, :32] = True
    assert gmsd(edges, damaged, 4095, ~left) > 5 * gmsd(edges, damaged, 4095, left)
    assert math.isnan(gmsd(edges, damaged, 4095, np.zeros(edges.shape, bool)))


def test_rejects_mismatched_or_tiny_images():
    with pytest.raises(ValueError, match="shape"):
        gmsd(np.zeros((8, 8)), np.zeros((8, 9)), 4095)
    with pytest.raises(ValueError, match="6 x 6"):
        gmsd(np.zeros((4, 4)), np.zeros((4, 4)), 4095)
