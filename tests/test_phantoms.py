"""The one synthetic phantom generator (models/phantoms.py): the demo study, determinism, noise."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from models.phantoms import make_phantom
from sender.pipeline import PHANTOM_SETTINGS


def test_the_generator_needs_neither_torch_nor_itk():
    code = ("import sys, models.phantoms\n"
            "heavy = [m for m in ('torch', 'itk') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_demo_phantom_shows_the_whole_abdomen_and_the_liver_on_every_slice():
    volume, liver = make_phantom(**PHANTOM_SETTINGS)
    assert volume.shape == liver.shape == PHANTOM_SETTINGS["shape"]
    assert volume.spacing == PHANTOM_SETTINGS["spacing"]
    assert liver.any(axis=(1, 2)).all()
    assert 0.05 < liver.mean() < 0.3
    # The body lies inside the field of view: the border of every slice is air.
    border = np.concatenate([volume.data[:, 0], volume.data[:, -1], volume.data[:, :, 0],
                             volume.data[:, :, -1]], axis=1)
    assert np.median(border) < -900 and (border > -500).mean() < 0.01
    # Liver HU of a plain or portal venous CT.
    assert 30 < np.median(volume.data[liver]) < 160


def test_same_seed_same_phantom_and_noise_leaves_the_anatomy():
    shape, spacing = (3, 48, 56), (8.0, 8.0, 5.0)
    a, liver_a = make_phantom(shape, spacing, seed=4)
    b, liver_b = make_phantom(shape, spacing, seed=4)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.affine, b.affine)
    quiet, liver_quiet = make_phantom(shape, spacing, seed=4, noise_hu=0.0)
    noisy, liver_noisy = make_phantom(shape, spacing, seed=4, noise_hu=12.0)
    np.testing.assert_array_equal(liver_a, liver_quiet)
    np.testing.assert_array_equal(liver_a, liver_noisy)
    body = quiet.data > -500  # away from the clipping of air at -1024 HU
    noise = noisy.data[body].astype(np.float64) - quiet.data[body]
    assert abs(noise.mean()) < 4 * 12.0 / np.sqrt(noise.size)  # zero-mean: within 4 standard errors
    assert noise.std() == pytest.approx(12.0, rel=0.05)
    other, _ = make_phantom(shape, spacing, seed=5)
    assert not np.array_equal(a.data, other.data)


@pytest.mark.parametrize("kwargs, message", [
    ({"noise_hu": -1.0}, "noise_hu"),
    ({"shape": (0, 16, 16)}, "positive"),
    ({"spacing": (1.0, 0.0, 1.0)}, "positive"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_phantom(**kwargs)
