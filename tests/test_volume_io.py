"""Volume loading and NIfTI writing keep geometry, dtype and values."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from sender.io import load_volume
from shared.nifti import read_nifti, write_nifti
from shared.volume import Volume, VolumeError
from tests.conftest import data_file


def test_dicom_series_geometry(abdomen_volume):
    volume = abdomen_volume
    assert volume.shape == (20, 512, 512)
    assert volume.source_dtype == "uint16"
    assert (volume.rescale_slope, volume.rescale_intercept) == (1.0, -1024.0)
    assert volume.data.dtype == np.int16 and volume.data.min() == -1024
    # ITK reports LPS origin (-249.512, -437.512, -804.5) with identity direction: RAS flips x, y.
    np.testing.assert_allclose(volume.affine[:3, :3], np.diag([-0.976562, -0.976562, 2.0]),
                               atol=1e-5)
    np.testing.assert_allclose(volume.affine[:3, 3], [249.512, 437.512, -804.5], atol=1e-3)
    np.testing.assert_allclose(volume.spacing, (0.976562, 0.976562, 2.0), atol=1e-5)


def test_int32_nifti_loads_and_round_trips(tmp_path):
    path = data_file("torso_ct_3mm.nii.gz")
    volume = load_volume(path)
    image = nib.load(str(path))
    assert volume.shape == (112, 101, 122) and volume.source_dtype == "int32"
    np.testing.assert_array_equal(volume.data.transpose(2, 1, 0), np.asanyarray(image.dataobj))
    written = write_nifti(volume, tmp_path / "out.nii.gz")
    again = nib.load(str(written))
    assert again.get_data_dtype() == np.int32
    np.testing.assert_array_equal(again.affine, image.affine)
    np.testing.assert_array_equal(np.asanyarray(again.dataobj), np.asanyarray(image.dataobj))


def test_dicom_to_nifti_keeps_hu_dtype_and_affine(abdomen_volume, tmp_path):
    path = write_nifti(abdomen_volume, tmp_path / "dicom.nii.gz")
    image = nib.load(str(path))
    assert image.get_data_dtype() == np.uint16  # stored as in the DICOM, with its intercept
    np.testing.assert_array_equal(image.get_fdata().transpose(2, 1, 0), abdomen_volume.data)
    np.testing.assert_allclose(image.affine, abdomen_volume.affine, atol=1e-6)


def test_integral_float_accepted_and_fractional_rejected(tmp_path):
    data = np.arange(2 * 20 * 20, dtype=np.float32).reshape(20, 20, 2) - 1000
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 5, 1])), tmp_path / "f.nii")
    volume = load_volume(tmp_path / "f.nii")
    assert volume.source_dtype == "float32"
    write_nifti(volume, tmp_path / "g.nii")
    np.testing.assert_array_equal(nib.load(str(tmp_path / "g.nii")).get_fdata(), data)
    nib.save(nib.Nifti1Image(data + 0.5, np.eye(4)), tmp_path / "h.nii")
    with pytest.raises(VolumeError, match="non-integral"):
        load_volume(tmp_path / "h.nii")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_keep_geometry(tmp_path, suffix, rng):
    import itk
    values = rng.integers(-1024, 3000, size=(5, 12, 14)).astype(np.int16)
    image = itk.image_from_array(values)
    image.SetSpacing((0.7, 0.8, 3.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    itk.imwrite(image, str(tmp_path / f"ct{suffix}"))
    volume = load_volume(tmp_path / f"ct{suffix}")
    np.testing.assert_array_equal(volume.data, values)
    np.testing.assert_allclose(volume.affine, [[-0.7, 0, 0, -10], [0, -0.8, 0, 20],
                                               [0, 0, 3.0, 30], [0, 0, 0, 1]], atol=1e-6)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(VolumeError, match="not found"):
        load_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VolumeError, match="unsupported input"):
        load_volume(tmp_path / "notes.txt")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(VolumeError, match="cannot read NIfTI"):
        load_volume(tmp_path / "broken.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="no DICOM series"):
        load_volume(tmp_path / "empty")
    with pytest.raises(VolumeError, match="outside int16"):
        Volume(data=np.full((2, 2, 2), 40000, np.int32), affine=np.eye(4), spacing=(1, 1, 1))


def test_nifti_write_is_atomic_and_leaves_no_temporaries(tmp_path, phantom):
    volume, _ = phantom
    write_nifti(volume, tmp_path / "a.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]
    assert np.array_equal(read_nifti(tmp_path / "a.nii.gz").data, volume.data)


@pytest.mark.parametrize("source_dtype, rescale", [("int16", (1.0, 0.0)),
                                                   ("uint16", (1.0, -1024.0)),
                                                   ("int16", (0.5, -1000.0)),
                                                   ("float32", (1.0, 0.0))])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_slice_by_slice_writer_equals_nibabel(tmp_path, source_dtype, rescale, suffix, rng):
    import gzip
    hu = rng.integers(-1024, 2000, size=(5, 7, 9)).astype(np.int16)
    if rescale[0] == 0.5:
        hu = (hu // 2 * 2).astype(np.int16)  # representable as stored * 0.5 - 1000
    affine = np.array([[-0.8, 0, 0, 120], [0, 0.8, 0.1, -90], [0, 0, 2.5, 40], [0, 0, 0, 1]])
    volume = Volume(data=hu, affine=affine, spacing=(0.8, 0.8, 2.5), source_dtype=source_dtype,
                    rescale_slope=rescale[0], rescale_intercept=rescale[1])
    write_nifti(volume, tmp_path / f"ours{suffix}")
    image = nib.Nifti1Image(volume.stored_values().transpose(2, 1, 0), affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_zooms(volume.spacing)
    image.header.set_slope_inter(*rescale)
    # The affine is sheared (a tilted gantry): no quaternion holds it, so the writer marks the
    # qform unusable (code 0) where nibabel would store an approximation with code 1.
    image.set_qform(affine, code=0)
    image.set_sform(affine, code=1)
    nib.save(image, tmp_path / f"nibabel{suffix}")
    read = gzip.open if suffix.endswith(".gz") else open
    with read(tmp_path / f"ours{suffix}", "rb") as ours, \
            read(tmp_path / f"nibabel{suffix}", "rb") as reference:
        assert ours.read() == reference.read()
    np.testing.assert_array_equal(read_nifti(tmp_path / f"ours{suffix}").data, hu)
