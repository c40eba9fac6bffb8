"""The DICOM series reader (sender/dicom.py): decoding, geometry, and every refusal.

Series are synthesised with pydicom in tmp dirs (tests/dicom_series.py); the shared abdomen
series is read too. A refusal is a DicomSeriesError with a one-line message that names the
files and the problem; through dlad-send it is exit 1, one line, no traceback, nothing written.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom import uid  # noqa: E402

from sender.dicom import (  # noqa: E402
    DicomSeriesError,
    affine_from_dicom,
    read_series,
    series_from_datasets,
)
from shared.geometry import LPS_TO_RAS  # noqa: E402
from shared.wire import voxel_sha256  # noqa: E402
from tests.dicom_series import ct_slices, make_dataset, make_enhanced, save, write_series  # noqa: E402

SYNTAXES = [None, uid.ImplicitVRLittleEndian, uid.ExplicitVRBigEndian,
            uid.DeflatedExplicitVRLittleEndian, uid.RLELossless, uid.JPEGLSLossless,
            uid.JPEG2000Lossless, uid.JPEGLosslessSV1]


def hu(stored: np.ndarray, intercept: float = -1024) -> np.ndarray:
    return (stored.astype(np.int32) + int(intercept)).astype(np.int16)


def world(affine: np.ndarray, i: float, j: float, k: float) -> np.ndarray:
    return (affine @ [i, j, k, 1.0])[:3]


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: "explicit-le" if s is None else s.name)
def test_every_transfer_syntax_decodes_bit_exact(tmp_path, syntax):
    if syntax == uid.JPEGLosslessSV1:
        pytest.importorskip("imagecodecs")
    stored = ct_slices()
    write_series(tmp_path, stored, syntax=syntax)
    series = read_series(tmp_path)
    np.testing.assert_array_equal(series.volume.data, hu(stored))
    assert series.volume.source_dtype == "uint16"
    assert (series.volume.rescale_slope, series.volume.rescale_intercept) == (1.0, -1024.0)


def test_geometry_keeps_every_slice_position(tmp_path):
    stored = ct_slices(count=5)
    first, step = np.array([-100.0, -80.0, -300.0]), np.array([0.0, 0.0, 2.5])
    write_series(tmp_path, stored, first=first, step=step, pixel_spacing=(0.8, 0.7))
    series = read_series(tmp_path)
    affine = series.volume.affine
    for k in range(5):
        lps = first + k * step
        np.testing.assert_allclose(world(affine, 0, 0, k), LPS_TO_RAS[:3, :3] @ lps, atol=1e-6)
    # i along the rows (column spacing 0.7), j along the columns (row spacing 0.8)
    np.testing.assert_allclose(world(affine, 1, 0, 0) - world(affine, 0, 0, 0), [-0.7, 0, 0])
    np.testing.assert_allclose(world(affine, 0, 1, 0) - world(affine, 0, 0, 0), [0, -0.8, 0])
    assert series.volume.spacing == pytest.approx((0.7, 0.8, 2.5))
    assert [p.name for p in map(__import__("pathlib").Path, series.sources)] == \
        [f"IM{5 - k:04d}.dcm" for k in range(5)]


def test_oblique_and_tilted_stacks_keep_their_positions(tmp_path):
    angle = np.deg2rad(20)
    row = np.array([np.cos(angle), np.sin(angle), 0.0])
    column = np.array([0.0, 0.0, -1.0])
    normal = np.cross(row, column)
    # A tilted gantry: the slices step along the normal plus a shift inside the plane.
    step = 3.0 * normal + 0.4 * column
    stored = ct_slices(count=4)
    write_series(tmp_path, stored, first=(10.0, 20.0, 30.0), step=step,
                 orientation=(*row, *column))
    series = read_series(tmp_path)
    affine = series.volume.affine
    for k in range(4):
        expected = LPS_TO_RAS[:3, :3] @ (np.array([10.0, 20.0, 30.0]) + k * step)
        np.testing.assert_allclose(world(affine, 0, 0, k), expected, atol=1e-3)
    np.testing.assert_array_equal(series.volume.data, hu(stored))
    # Written as NIfTI, the shear stays exact: in the sform, with the qform marked unusable.
    import nibabel as nib

    from shared.nifti import write_nifti

    image = nib.load(str(write_nifti(series.volume, tmp_path / "tilted.nii")))
    assert int(image.header["qform_code"]) == 0 and int(image.header["sform_code"]) == 1
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)


def test_the_shared_abdomen_series(abdomen_dicom):
    series = read_series(abdomen_dicom)
    volume = series.volume
    assert volume.shape == (20, 512, 512) and series.description == "CT Body 3.0"
    # Same voxels and geometry as ITK's reader gave (the digest was taken with ITK 5.4).
    assert voxel_sha256(volume.data) == \
        "0d9f62d8433a424e582d5a4478ba5af0eff3f5c3589fc90af21b0c448fd0ff5e"
    np.testing.assert_allclose(volume.affine[:3, 3], [249.51171875, 437.51171875, -804.5])
    assert series.sources[0].endswith("IM0020.dcm")  # lowest along the normal first
    attributes = series.attributes()
    assert attributes["SeriesDescription"] == "CT Body 3.0" and attributes["Modality"] == "CT"
    assert "PixelData" not in series.metadata


def test_in_memory_datasets_and_the_header_map(tmp_path):
    from shared.wire import check_dicom_attributes

    stored = ct_slices(count=4)
    datasets = [make_dataset(stored[k], (0.0, 0.0, 2.0 * k), instance=k + 1) for k in range(4)]
    series = series_from_datasets(reversed(datasets))
    np.testing.assert_array_equal(series.volume.data, hu(stored))
    assert all("PixelData" in ds for ds in datasets)  # the caller's datasets are untouched
    attributes = check_dicom_attributes(series.attributes())
    assert attributes["SeriesDescription"] == "Synthetic CT" and attributes["SeriesNumber"] == 1


def message_of(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_a_missing_slice_is_refused_and_named(tmp_path):
    stored = ct_slices(count=6)
    paths = write_series(tmp_path, stored)
    paths[3].unlink()  # z = -294 mm
    with pytest.raises(DicomSeriesError) as excinfo:
        read_series(tmp_path)
    message = message_of(excinfo)
    assert "1 slice(s) missing" in message and "--allow-gaps" in message
    assert paths[2].name in message and paths[4].name in message
    assert "4.000 mm apart where the spacing is 2.000 mm" in message
    assert "Synthetic CT" in message


def test_allow_gaps_fills_at_the_original_positions(tmp_path, caplog):
    stored = ct_slices(count=7)
    paths = write_series(tmp_path, stored, first=(0.0, 0.0, 0.0), step=(0.0, 0.0, 1.5))
    paths[2].unlink()
    paths[3].unlink()
    with caplog.at_level(logging.WARNING, logger="dlad.sender"):
        series = read_series(tmp_path, allow_gaps=True)
    data = series.volume.data
    assert series.inserted == [2, 3] and data.shape[0] == 7
    kept = [0, 1, 4, 5, 6]
    np.testing.assert_array_equal(data[kept], hu(stored)[kept])
    assert (data[[2, 3]] == hu(stored)[kept].min()).all()
    for k in kept:  # every real slice where the scanner put it
        np.testing.assert_allclose(world(series.volume.affine, 0, 0, k), [0, 0, 1.5 * k])
    assert "2 missing slice(s) filled" in caplog.text and "z = 3.00, 4.50 mm" in caplog.text
    assert series.volume.extra["inserted_slices"] == [2, 3]


def test_inserted_slices_travel_to_the_receiver_summary(tmp_path):
    from receiver import cli as receiver_cli

    stored = ct_slices(count=6, rows=64, columns=80)
    paths = write_series(tmp_path / "series", stored)
    paths[2].unlink()
    out = tmp_path / "study.dlad"
    subprocess.run([sys.executable, "-m", "sender.cli", str(tmp_path / "series"), "--roi", "body",
                    "--allow-gaps", "--out", str(out), "--quiet"], check=True, timeout=300)
    from receiver.stream import StudyStream

    stream = StudyStream()
    stream.feed(out.read_bytes())
    stream.finish()
    status = stream.status()
    assert status["source_inserted_slices"] == [2]  # the third slice along z
    assert "filled by the sender (--allow-gaps): 2" in receiver_cli.summary(status, "x.nii")


def test_uneven_spacing_is_refused_never_resampled(tmp_path):
    stored = ct_slices(count=5)
    paths = write_series(tmp_path, stored, first=(0.0, 0.0, 0.0), step=(0.0, 0.0, 2.0))
    ds = pydicom.dcmread(paths[3])
    ds.ImagePositionPatient = ["0", "0", "5.0"]  # 1 mm off the 2 mm grid
    ds.save_as(paths[3])
    for allow_gaps in (False, True):
        with pytest.raises(DicomSeriesError) as excinfo:
            read_series(tmp_path, allow_gaps=allow_gaps)
        message = message_of(excinfo)
        assert "uneven slice spacing" in message and paths[3].name in message


def test_a_foreign_slice_of_another_series_is_refused(tmp_path):
    stored = ct_slices(count=6)
    paths = write_series(tmp_path, stored)
    ds = pydicom.dcmread(paths[2])
    ds.SeriesInstanceUID = "1.2.3.999"
    ds.SeriesDescription = "Other"
    ds.save_as(paths[2])
    with pytest.raises(DicomSeriesError) as excinfo:
        read_series(tmp_path)
    message = message_of(excinfo)
    assert "holds 2 series" in message and "--series-uid" in message
    assert "1.2.3.999 'Other' (1 images)" in message
    assert "'Synthetic CT' (5 images)" in message
    # Choosing the main series leaves a hole where the foreign slice was: refused as a gap.
    with pytest.raises(DicomSeriesError, match="slice\\(s\\) missing"):
        read_series(tmp_path, series_uid="1.2.826.0.1.3680043.2.1125.1")
    with pytest.raises(DicomSeriesError, match="no series with UID"):
        read_series(tmp_path, series_uid="9.9")


def test_a_foreign_slice_without_series_uid_is_caught_by_its_position(tmp_path):
    stored = ct_slices(count=6)
    write_series(tmp_path, stored, series_uid="")
    # Another scan's slice, same orientation, shifted in plane and between two slices.
    save(make_dataset(stored[0], (-90.0, -80.0, -297.0), series_uid=""), tmp_path / "x.dcm")
    with pytest.raises(DicomSeriesError, match="uneven slice spacing.*x.dcm"):
        read_series(tmp_path)
    (tmp_path / "x.dcm").unlink()
    save(make_dataset(stored[0], (-90.0, -80.0, -288.0), series_uid=""), tmp_path / "x.dcm")
    with pytest.raises(DicomSeriesError, match="x.dcm lies 10.000 mm off the line"):
        read_series(tmp_path)


def test_interleaved_series_list_themselves(tmp_path):
    write_series(tmp_path, ct_slices(count=4), series_uid="1.2.3.1", description="Arterial",
                 names=[f"a{k}.dcm" for k in range(4)])
    write_series(tmp_path, ct_slices(count=3, seed=1), series_uid="1.2.3.2",
                 description="Venous", number=2, names=[f"v{k}.dcm" for k in range(3)])
    with pytest.raises(DicomSeriesError) as excinfo:
        read_series(tmp_path)
    message = message_of(excinfo)
    assert message.endswith("1.2.3.1 'Arterial' (4 images); 1.2.3.2 'Venous' (3 images)")
    series = read_series(tmp_path, series_uid="1.2.3.2")
    np.testing.assert_array_equal(series.volume.data, hu(ct_slices(count=3, seed=1)))
    assert len(series.skipped) == 4


@pytest.mark.parametrize("damage", ["garbage", "truncated-header", "truncated-pixels", "text"])
def test_unreadable_files_are_refused_by_name(tmp_path, damage):
    stored = ct_slices(count=6)
    paths = write_series(tmp_path, stored, syntax=uid.JPEG2000Lossless)
    bad = paths[-1]  # the first slice along z: skipping it would silently shorten the volume
    data = bad.read_bytes()
    bad.write_bytes({"garbage": np.random.default_rng(0).bytes(len(data)),
                     "truncated-header": data[:200], "truncated-pixels": data[:-300],
                     "text": b"scanner export notes\n"}[damage])
    with pytest.raises(DicomSeriesError) as excinfo:
        read_series(tmp_path)
    message = message_of(excinfo)
    assert bad.name in message
    if damage != "truncated-pixels":
        assert "--skip-unreadable" in message


def test_skip_unreadable_names_them_and_still_refuses_a_hole(tmp_path, caplog):
    stored = ct_slices(count=6)
    paths = write_series(tmp_path, stored)
    (tmp_path / "README.txt").write_text("exported by the scanner")
    with caplog.at_level(logging.WARNING, logger="dlad.sender"):
        series = read_series(tmp_path, skip_unreadable=True)
    assert "README.txt" in caplog.text and series.volume.shape[0] == 6
    paths[2].write_bytes(b"\x00" * 1000)
    with pytest.raises(DicomSeriesError, match="missing"):
        read_series(tmp_path, skip_unreadable=True)


def test_non_image_dicom_is_skipped_with_a_warning(tmp_path, caplog):
    stored = ct_slices(count=3)
    write_series(tmp_path, stored)
    ds = make_dataset(stored[0], (0, 0, 0))
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)  # a Basic Text SR
    with caplog.at_level(logging.WARNING, logger="dlad.sender"):
        series = read_series(tmp_path)
    assert series.volume.shape[0] == 3 and "report.dcm" in caplog.text
    assert series.skipped == [str(tmp_path / "report.dcm")]


@pytest.mark.parametrize("field,value,what", [
    ("orientation", (0, 1, 0, 0, 0, -1), "image orientation"),
    ("pixel_spacing", (0.9, 0.7), "pixel spacing"),
    ("frame_uid", "1.2.3.4", "frame of reference"),
])
def test_mixed_geometry_is_refused(tmp_path, field, value, what):
    stored = ct_slices(count=4)
    write_series(tmp_path, stored)
    save(make_dataset(stored[0], (-100.0, -80.0, -292.0), **{field: value}), tmp_path / "odd.dcm")
    with pytest.raises(DicomSeriesError, match=f"mixed {what}.*odd.dcm"):
        read_series(tmp_path)


@pytest.mark.parametrize("spacing", [(0.0, 0.7), (-0.8, 0.7)])
def test_a_pixel_spacing_that_is_not_positive_is_refused_by_name(tmp_path, spacing):
    write_series(tmp_path, ct_slices(count=3), pixel_spacing=spacing)
    with pytest.raises(DicomSeriesError) as excinfo:
        read_series(tmp_path)
    message = message_of(excinfo)
    assert "PixelSpacing that is not positive" in message and "IM0001.dcm" in message


def test_a_warning_that_is_not_about_the_file_does_not_condemn_it(tmp_path, monkeypatch):
    """Only pydicom's warnings mark a file damaged: a ResourceWarning the garbage collector
    happens to emit while a good file is read (an unclosed file elsewhere) is not its fault."""
    write_series(tmp_path, ct_slices(count=3))
    read = pydicom.dcmread

    def read_during_gc(*args, **kwargs):
        import warnings

        warnings.warn("unclosed file <_io.BufferedReader>", ResourceWarning, stacklevel=1)
        return read(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", read_during_gc)
    assert read_series(tmp_path).volume.shape[0] == 3


def test_mixed_sizes_are_refused(tmp_path):
    write_series(tmp_path, ct_slices(count=4))
    save(make_dataset(ct_slices(count=1, rows=30)[0], (-100.0, -80.0, -292.0)),
         tmp_path / "odd.dcm")
    with pytest.raises(DicomSeriesError, match="mixed image size.*odd.dcm"):
        read_series(tmp_path)


def test_duplicate_positions_and_copies(tmp_path, caplog):
    stored = ct_slices(count=4)
    paths = write_series(tmp_path, stored)
    shutil.copy(paths[1], tmp_path / "copy.dcm")  # the same instance twice: used once
    with caplog.at_level(logging.WARNING, logger="dlad.sender"):
        series = read_series(tmp_path)
    np.testing.assert_array_equal(series.volume.data, hu(stored))
    assert "copies of another instance" in caplog.text
    save(make_dataset(stored[0], (-100.0, -80.0, -298.0)), tmp_path / "other.dcm")
    with pytest.raises(DicomSeriesError, match="share a position.*at z = -298.000 mm"):
        read_series(tmp_path)


def test_per_slice_rescale(tmp_path, caplog):
    stored = ct_slices(count=3)
    paths = write_series(tmp_path, stored)
    ds = pydicom.dcmread(paths[1])
    ds.RescaleIntercept = "-1000"
    ds.save_as(paths[1])
    with caplog.at_level(logging.WARNING, logger="dlad.sender"):
        series = read_series(tmp_path)
    expected = hu(stored)
    expected[1] += 24
    np.testing.assert_array_equal(series.volume.data, expected)
    assert series.volume.source_dtype == "int16" and series.volume.rescale_intercept == 0
    assert "differ between slices" in caplog.text
    ds.RescaleSlope = "0.5"
    ds.save_as(paths[1])
    with pytest.raises(DicomSeriesError, match="non-integral"):
        read_series(tmp_path)


def test_signed_pixels(tmp_path):
    stored = (ct_slices(count=3).astype(np.int32) - 2048).astype(np.int16)
    write_series(tmp_path, stored, signed=True, intercept=0.0, syntax=uid.JPEGLSLossless)
    series = read_series(tmp_path)
    np.testing.assert_array_equal(series.volume.data, stored)
    assert series.volume.source_dtype == "int16"


def test_docstring_examples_run():
    import doctest

    import sender.dicom

    assert doctest.testmod(sender.dicom).failed == 0


def test_affine_convention():
    affine = affine_from_dicom([1, 0, 0], [0, 1, 0], (2.0, 1.0), [5.0, 6.0, 7.0], [0, 0, 3.0])
    np.testing.assert_allclose(affine, [[-1, 0, 0, -5], [0, -2, 0, -6], [0, 0, 3, 7],
                                        [0, 0, 0, 1]])


@pytest.mark.parametrize("case", ["gap", "two-series", "corrupt"])
def test_dlad_send_refuses_with_one_line_and_writes_nothing(tmp_path, case):
    folder = tmp_path / "series"
    paths = write_series(folder, ct_slices(count=5))
    if case == "gap":
        paths[2].unlink()
    elif case == "two-series":
        write_series(folder, ct_slices(count=2), series_uid="1.2.3.7", names=["b1.dcm", "b2.dcm"])
    else:
        paths[0].write_bytes(b"not dicom")
    out = tmp_path / "study.dlad"
    result = subprocess.run([sys.executable, "-m", "sender.cli", str(folder), "--roi", "body",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("dlad-send: error: ")
    assert "Traceback" not in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [folder]


@pytest.mark.parametrize("syntax", [None, uid.JPEG2000Lossless])
def test_enhanced_multi_frame_images_are_split_into_their_frames(tmp_path, syntax):
    stored = ct_slices(count=5)
    save(make_enhanced(stored, order=[3, 0, 4, 1, 2]), tmp_path / "enhanced.dcm", syntax)
    series = read_series(tmp_path)
    np.testing.assert_array_equal(series.volume.data, hu(stored))
    for k in range(5):
        np.testing.assert_allclose(world(series.volume.affine, 0, 0, k),
                                   LPS_TO_RAS[:3, :3] @ [-100.0, -80.0, -300.0 + 2 * k])
    assert series.volume.spacing == pytest.approx((0.7, 0.8, 2.0))
    assert series.sources[0].endswith("enhanced.dcm frame 2")


def test_enhanced_frames_with_their_own_rescale(tmp_path):
    stored = ct_slices(count=3)
    save(make_enhanced(stored, intercepts=[-1024, -1000, -1024]), tmp_path / "e.dcm")
    series = read_series(tmp_path)
    expected = hu(stored)
    expected[1] += 24
    np.testing.assert_array_equal(series.volume.data, expected)


def test_enhanced_image_with_a_missing_frame_is_refused(tmp_path):
    stored = ct_slices(count=5)
    ds = make_enhanced(stored[[0, 1, 3, 4]], order=None)
    for group, z in zip(ds.PerFrameFunctionalGroupsSequence, (0, 1, 3, 4)):
        group.PlanePositionSequence[0].ImagePositionPatient = [-100.0, -80.0, -300.0 + 2 * z]
    save(ds, tmp_path / "e.dcm")
    with pytest.raises(DicomSeriesError, match="1 slice\\(s\\) missing.*e.dcm frame 2"):
        read_series(tmp_path)
    del ds.PerFrameFunctionalGroupsSequence[0]
    save(ds, tmp_path / "e.dcm")
    with pytest.raises(DicomSeriesError, match="without one per-frame functional group"):
        read_series(tmp_path)
