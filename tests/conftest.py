"""Shared fixtures: the real CT samples beside the repo and small synthetic volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data_file(name: str) -> Path:
    """A file of ../shared/data. Missing files fail the test loudly (never a silent skip),
    except on a machine that has no ../shared/data at all, where the test is skipped."""
    if not DATA.is_dir():
        pytest.skip(f"no shared data folder at {DATA}")
    path = DATA / name
    assert path.exists(), f"{path} is missing from the shared data folder"
    return path


@pytest.fixture(scope="session")
def abdomen_dicom() -> Path:
    return data_file("abdomen_ct_dicom")


@pytest.fixture(scope="session")
def abdomen_liver() -> Path:
    return data_file("abdomen_ct_liver.nii.gz")


@pytest.fixture(scope="session")
def abdomen_volume(abdomen_dicom):
    from sender.io import load_volume
    return load_volume(abdomen_dicom)


@pytest.fixture(scope="session")
def phantom():
    from models.phantoms import make_phantom
    # 403 x 326 mm in plane (anisotropic on purpose): the whole abdomen, liver on every slice.
    return make_phantom((8, 96, 112), spacing=(3.6, 3.4, 2.5), seed=3)


@pytest.fixture()
def rng():
    return np.random.default_rng(1234)
