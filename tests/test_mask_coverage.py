"""A --roi-mask that does not cover the CT is refused, or accepted knowingly and handled safely."""

from __future__ import annotations

import logging
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from sender.roi.mask_file import MaskFileProvider
from shared.nifti import write_nifti
from shared.volume import Volume, VolumeError


@pytest.fixture()
def ct_and_liver(phantom, tmp_path):
    volume, liver = phantom  # 8 x 96 x 112
    ct = write_nifti(volume, tmp_path / "ct.nii")
    return volume, liver, ct


def save_mask(mask: np.ndarray, affine: np.ndarray, path) -> None:
    nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0).astype(np.uint8), affine), str(path))


def test_a_mask_of_the_whole_scan_is_accepted(ct_and_liver, tmp_path):
    volume, liver, _ = ct_and_liver
    save_mask(liver, volume.affine, tmp_path / "liver.nii")
    probability = MaskFileProvider(tmp_path / "liver.nii").probability(volume)
    np.testing.assert_array_equal(probability > 0.5, liver)


def test_a_mask_covering_half_the_slices_is_refused(ct_and_liver, tmp_path):
    volume, liver, _ = ct_and_liver
    save_mask(liver[:4], volume.affine, tmp_path / "half.nii")
    with pytest.raises(VolumeError) as excinfo:
        MaskFileProvider(tmp_path / "half.nii").probability(volume)
    message = str(excinfo.value)
    assert "covers slices 0-3 of the CT's 0-7" in message and "slice(s) (4-7)" in message
    assert "--allow-partial-mask" in message and "\n" not in message


def test_a_mask_cropped_in_plane_is_refused(ct_and_liver, tmp_path):
    volume, liver, _ = ct_and_liver
    rows = np.flatnonzero((volume.data > -500).any(axis=(0, 2)))
    top = int(rows[0]) + 5  # the crop leaves 5 rows of tissue above it uncovered
    crop = liver[:, top:, :]
    affine = volume.affine.copy()
    affine[:3, 3] = (volume.affine @ [0, top, 0, 1])[:3]  # the crop's first voxel, in place
    save_mask(crop, affine, tmp_path / "crop.nii")
    with pytest.raises(VolumeError, match="lie outside its field of view"):
        MaskFileProvider(tmp_path / "crop.nii").probability(volume)


def test_allow_partial_sends_the_uncovered_tissue_exact(ct_and_liver, tmp_path, caplog):
    volume, liver, _ = ct_and_liver
    save_mask(liver[:4], volume.affine, tmp_path / "half.nii")
    provider = MaskFileProvider(tmp_path / "half.nii", allow_partial=True)
    with caplog.at_level(logging.WARNING, logger="dlad.sender"):
        probability = provider.probability(volume)
    tissue = volume.data > -500
    assert (probability[4:][tissue[4:]] == 1).all()  # uncovered tissue: ROI
    np.testing.assert_array_equal(probability[:4] > 0.5, liver[:4])
    assert "sent bit-exact as ROI (--allow-partial-mask)" in caplog.text
    assert provider.describe()["uncovered_voxels_sent_exact"] == int(tissue[4:].sum())


def test_air_outside_the_mask_does_not_matter(tmp_path):
    data = np.full((4, 32, 32), -1024, np.int16)
    data[:, 8:24, 8:24] = 50
    volume = Volume(data=data, affine=np.diag([1.0, 1.0, 2.0, 1.0]), spacing=(1, 1, 2))
    liver = np.zeros(data.shape, bool)
    liver[:, 10:20, 10:20] = True
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = [6, 6, 0]  # covers x, y in 6..27: all the tissue, not all the air
    save_mask(liver[:, 6:28, 6:28], affine, tmp_path / "tight.nii")
    probability = MaskFileProvider(tmp_path / "tight.nii").probability(volume)
    np.testing.assert_array_equal(probability > 0.5, liver)


def test_dlad_send_refuses_a_partial_mask_then_accepts_it_knowingly(ct_and_liver, tmp_path):
    volume, liver, ct = ct_and_liver
    save_mask(liver[:4], volume.affine, tmp_path / "half.nii")
    out = tmp_path / "study.dlad"
    command = [sys.executable, "-m", "sender.cli", str(ct), "--roi-mask",
               str(tmp_path / "half.nii"), "--out", str(out), "--quiet"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and not out.exists()
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlad-send: error: ROI mask half.nii")
    accepted = subprocess.run(command + ["--allow-partial-mask"], capture_output=True, text=True,
                              timeout=300)
    assert accepted.returncode == 0, accepted.stderr
    from receiver.stream import StudyStream

    stream = StudyStream()
    stream.feed(out.read_bytes())
    stream.finish()
    r = stream.reassembler
    assert r.roi_complete
    tissue = volume.data > -500
    np.testing.assert_array_equal(r.volume[4:][tissue[4:]], volume.data[4:][tissue[4:]])
