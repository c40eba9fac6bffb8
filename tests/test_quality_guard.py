"""The base quality guard: fast SSIM equals the reference SSIM; weak blocks get re-coded."""

from __future__ import annotations

import numpy as np

from receiver.stream import StudyStream
from sender.diffusion import diffuse
from sender.encoder import EncodeSettings, PreparedStudy, StudyEncoder
from sender.io import load_volume
from sender.quality import block_ssim
from sender.roi.mask_file import MaskFileProvider
from sender.roi.steering import steer
from shared.metrics import ssim
from tests.conftest import data_file


def test_fast_ssim_equals_reference(rng):
    a = rng.integers(-1024, 2000, (3, 40, 52)).astype(np.int16)
    b = (a + rng.normal(0, 40, a.shape)).astype(np.int16)
    assert abs(block_ssim(a, b) - ssim(a, b, 4095)) < 1e-5
    assert np.isnan(block_ssim(a[:, :8], b[:, :8]))


def test_guard_lifts_a_low_resolution_scan_above_target():
    ct, mask = data_file("torso_ct_sm.nii.gz"), data_file("torso_ct_sm_liver.nii.gz")
    volume = load_volume(ct)
    steering = steer(MaskFileProvider(mask).probability(volume), volume.spacing)
    prepared = PreparedStudy(volume, steering.roi, diffuse(volume.data, steering.probability), "t")
    results = {}
    for guard in (None, 0.99):
        encoder = StudyEncoder(prepared, EncodeSettings(min_ssim=guard))
        stream = StudyStream()
        stream.feed(b"".join(encoder.frames()))
        results[guard] = ssim(volume.data, stream.reassembler.volume, 4095)
        np.testing.assert_array_equal(stream.reassembler.volume[steering.roi],
                                      volume.data[steering.roi])
    assert results[None] < 0.99 <= results[0.99]  # 3 mm voxels: CRF 14 alone is not enough
