"""The anatomical plausibility check (sender/roi/plausibility.py) and the safe fallback.

No liver where there is none: a head, neck, chest or pelvis sent by the default sender comes
back bit-exact everywhere, whatever the network calls liver there; a real liver, in every
variant the evaluation uses, keeps its ROI.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import data_file

from models import variants as V
from models.body_phantoms import make_region_phantom
from sender.io import load_volume
from sender.pipeline import prepare_study, safety_check
from sender.roi import plausibility as P
from sender.roi.mask_file import MaskFileProvider
from sender.roi.provider import StaticMaskProvider
from sender.roi.safety import check_roi_plausibility, roi_problem
from shared.volume import Volume


def thickness(volume: Volume) -> float:
    return volume.shape[0] * float(volume.spacing[2])


def verdict(probability, volume: Volume) -> str | None:
    return P.problem(P.find(probability, volume.data, volume.affine, volume.spacing),
                     thickness(volume))


@pytest.fixture(scope="module")
def torso_case() -> V.Case:
    volume = load_volume(data_file("torso_ct_sm.nii.gz"))
    liver = MaskFileProvider(data_file("torso_ct_sm_liver.nii.gz")).probability(volume) > 0.5
    return V.Case("torso", volume, liver)


@pytest.fixture(scope="module")
def abdomen_case(abdomen_volume, abdomen_liver) -> V.Case:
    liver = MaskFileProvider(abdomen_liver).probability(abdomen_volume) > 0.5
    return V.Case("abdomen", abdomen_volume, liver)


@pytest.mark.parametrize("make", [
    lambda c: c,
    lambda c: V.contrast_phase(c, 50.0, -0.3, 0.25, "plain"),
    lambda c: V.field_of_view(c, 0.0, 0.95, "fill 0"),
    lambda c: V.field_of_view(c, -3024.0, 0.95, "fill -3024"),
    lambda c: V.slab(c, "dome", 3, "dome"),
    lambda c: V.pixel_size(c, 5.0, "5 mm pixels"),
    lambda c: V.slice_thickness(c, 5.0, "5 mm slices"),
    lambda c: V.paint_lesion(c, 100.0, -60.0, 1, "10 cm tumour"),
], ids=["as is", "plain", "fill 0", "fill -3024", "dome slab", "5 mm pixels", "5 mm slices",
        "tumour"])
def test_true_livers_are_plausible(torso_case, abdomen_case, make):
    """The true liver, taken as the prediction, passes in the real scans and their variants."""
    for case in (torso_case, abdomen_case):
        variant = make(case)
        assert verdict(variant.liver.astype(np.float32), variant.volume) is None, variant.name


def test_a_slab_of_only_the_lowest_tip_falls_back(torso_case):
    """29 cm² of liver in a 750 cm² body: too little to tell from a muscle or a loop of
    bowel; sending the slice bit-exact costs only compression."""
    tip = V.slab(torso_case, "tip", 1, "tip")
    assert "largest section is only 4 %" in verdict(tip.liver.astype(np.float32), tip.volume)


def tissue(volume: Volume, low: float, high: float) -> np.ndarray:
    """A network that calls every voxel between ``low`` and ``high`` HU liver."""
    return ((volume.data >= low) & (volume.data <= high)).astype(np.float32)


def test_brain_called_liver_is_rejected():
    """Like the issue's head CT: brain tissue (about 25 HU) over 51 slices called liver."""
    volume, _ = make_region_phantom("head", shape=(51, 256, 256), seed=5,
                                    spacing=(0.9, 0.9, 3.0))
    brain = tissue(volume, 15, 50)
    assert brain.mean() > 0.04
    reason = verdict(brain, volume)
    assert reason is not None and "ring of bone" in reason and "cm²" in reason


@pytest.mark.parametrize("region, low, high, expected", [
    ("neck", 30, 140, "too small for an adult trunk"),
    ("thorax", 20, 90, "right of"),
    ("pelvis", -10, 70, "right of"),
])
def test_other_regions_called_liver_are_rejected(region, low, high, expected):
    volume, _ = make_region_phantom(region, shape=(12, 256, 256), seed=3)
    reason = verdict(tissue(volume, low, high), volume)
    assert reason is not None and expected in reason, reason


def test_right_sided_soft_tissue_of_a_chest_is_rejected():
    """Even a prediction on the patient's right (vena cava, right heart, an effusion) is
    rejected in a chest: small among the lungs."""
    volume, _ = make_region_phantom("thorax", shape=(12, 256, 256), seed=4)
    prediction = tissue(volume, 20, 90)
    # Keep the patient's right only: in this LPS grid array columns grow toward the left.
    prediction[:, :, prediction.shape[2] // 2:] = 0
    reason = verdict(prediction, volume)
    assert reason is not None, "a chest's right-sided soft tissue passed as a liver"


def test_padding_does_not_fool_the_body_outline(abdomen_case):
    """A fill of 0 HU outside the field of view would look like a ring of water: the body
    outline, and so the side and the shares, are measured without it."""
    plain = P.find(abdomen_case.liver.astype(np.float32), abdomen_case.volume.data,
                   abdomen_case.volume.affine, abdomen_case.volume.spacing)
    padded_case = V.field_of_view(abdomen_case, 0.0, 0.95, "fill 0")
    padded = P.find(padded_case.liver.astype(np.float32), padded_case.volume.data,
                    padded_case.volume.affine, padded_case.volume.spacing)
    assert abs(padded.body_section_cm2 - plain.body_section_cm2) < 0.05 * plain.body_section_cm2
    assert abs(padded.right_share - plain.right_share) < 0.05


def test_nothing_predicted_is_empty():
    volume, _ = make_region_phantom("pelvis", shape=(4, 96, 96), seed=1)
    assert P.find(np.zeros(volume.shape, np.float32), volume.data, volume.affine,
                  volume.spacing) is None
    assert "empty" in check_roi_plausibility(np.zeros(volume.shape, np.float32), volume)


class EverythingIsLiver(StaticMaskProvider):
    """A network gone wrong: the whole body is liver."""

    name = "unet"

    def __init__(self, volume: Volume):
        super().__init__(volume.data > -500, "everything")


@pytest.mark.parametrize("build", [
    lambda: load_volume(data_file("torso_ct_3mm.nii.gz")),
    lambda: make_region_phantom("head", shape=(8, 192, 192), seed=8)[0],
], ids=["real pelvis", "head phantom"])
def test_the_sender_sends_an_implausible_liver_bit_exact(build):
    """Through the sender's chain (prepare_study with its safety check): fallback, the whole
    volume is ROI and untouched by diffusion."""
    volume = build()
    if volume.shape[0] > 30:  # the torso patient's pelvis, far below the liver
        volume = V.slices(V.Case("t", volume, np.zeros(volume.shape, bool)), 0, 30, "pelvis").volume
    prepared = prepare_study(volume, EverythingIsLiver(volume),
                             roi_check=safety_check(allow_small_roi=False))
    assert prepared.roi.all()
    assert np.array_equal(prepared.diffused, volume.data)


@pytest.fixture(scope="module")
def provider():
    from sender.roi.unet import UNetProvider
    return UNetProvider(device="cpu")


@pytest.mark.parametrize("region", ["head", "neck", "thorax", "pelvis"])
def test_the_bundled_unet_finds_no_liver_in_other_regions(provider, region):
    """The bundled network and the check together: no liver in phantoms of other regions
    (the network trained on this generator, with other seeds)."""
    volume, _ = make_region_phantom(region, shape=(12, 256, 256), seed=424_242)
    assert roi_problem(provider.probability(volume), volume) is not None


def test_the_bundled_unet_finds_no_liver_in_a_head_from_another_generator(provider):
    """A head CT from a generator no training run used (models.phantoms.make_head_phantom:
    skull with diploe, grey and white matter, ventricles, falx), at 0.45 mm pixels."""
    from models.phantoms import make_head_phantom

    volume, _ = make_head_phantom((12, 512, 512), spacing=(0.45, 0.45, 5.0), seed=11)
    assert roi_problem(provider.probability(volume), volume) is not None



@pytest.mark.parametrize("start, stop, expected", [
    (0, 30, "not liver tissue"),      # pelvis: bowel, bladder wall, muscle
    (25, 55, "not liver tissue"),     # lower abdomen below the liver: kidney, colon
])
def test_right_sided_soft_tissue_below_the_liver_is_rejected(start, stop, expected):
    """A real patient's slices below the liver (torso_ct_3mm, liver from slice ~61), with
    what a network trained on one upper abdomen called liver there (held-out fold A: one
    solid, right-sided region of 0-45 HU, 400-500 mL) taken as the prediction: the HU of the
    scan's own tissue tell it from a liver."""
    from scipy.ndimage import label

    volume = load_volume(data_file("torso_ct_3mm.nii.gz"))
    crop = V.slices(V.Case("t", volume, np.zeros(volume.shape, bool)), start, stop, "c").volume
    from models.preprocessing import from_canonical, to_canonical

    # Keep the patient's right (canonical columns run from the right to the left) and one
    # solid region.
    soft = to_canonical(tissue(crop, 0, 45), crop.affine).copy()
    soft[:, :, soft.shape[2] // 2:] = 0
    soft = from_canonical(soft, crop.affine) > 0.5
    labels, _ = label(soft)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    prediction = (labels == sizes.argmax()).astype(np.float32)
    findings = P.find(prediction, crop.data, crop.affine, crop.spacing)
    assert findings.right_share > 0.9 and findings.largest_component_share == 1.0
    reason = P.problem(findings, thickness(crop))
    assert reason is not None and expected in reason, reason


def slice_by_slice(probability, volume: Volume, flip_normal: bool = False) -> dict:
    """The per-slice anatomy a live sender measures as the slices arrive: each slice alone,
    with its own one-slice affine (its normal the other way round with ``flip_normal``, as
    DICOM's row x column cross product may give it), only where liver is predicted."""
    cache = {}
    for k in range(volume.shape[0]):
        if not (probability[k] > P.LIVER_THRESHOLD).any():
            continue
        affine = volume.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0],
                                           [0, 0, -1 if flip_normal else 1, k], [0, 0, 0, 1.0]])
        cache[k] = P.anatomy_of_slice(volume.data[k], affine, volume.spacing)
    return cache


def reversed_slices(volume: Volume) -> Volume:
    """The same scan stored with its slices in the other order (affine adjusted)."""
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, volume.shape[0] - 1
    return Volume(np.ascontiguousarray(volume.data[::-1]), volume.affine @ flip, volume.spacing)


def test_anatomy_measured_slice_by_slice_gives_the_same_findings(torso_case, abdomen_case):
    """Incremental plausibility: the per-slice anatomy measured as slices arrive (each slice
    alone) and the series' aggregation give the findings, and so the verdict, of the check
    over the whole series, exactly: real scans and their variants (padding, pixel sizes, slice
    order reversed), and head, neck, chest and pelvis phantoms with tissue called liver."""
    cases = []
    for case in (torso_case, abdomen_case):
        for variant in (case, V.field_of_view(case, -3024.0, 0.95, "fill -3024"),
                        V.field_of_view(case, 0.0, 0.95, "fill 0"),
                        V.pixel_size(case, 5.0, "5 mm pixels")):
            cases.append((variant.liver.astype(np.float32), variant.volume))
    for region, low, high in [("head", 15, 50), ("neck", 30, 140), ("thorax", 20, 90),
                              ("pelvis", -10, 70)]:
        volume, _ = make_region_phantom(region, shape=(12, 256, 256), seed=3)
        cases.append((tissue(volume, low, high), volume))
    cases.append((cases[0][0][::-1].copy(), reversed_slices(cases[0][1])))
    verdicts = set()
    for probability, volume in cases:
        whole = P.find(probability, volume.data, volume.affine, volume.spacing)
        for flip_normal in (False, True):
            cache = slice_by_slice(probability, volume, flip_normal)
            assert cache
            assert P.find(probability, volume.data, volume.affine, volume.spacing,
                          anatomy=cache) == whole
        verdicts.add(roi_problem(probability, volume) is None)
        assert roi_problem(probability, volume, anatomy=cache) == roi_problem(probability,
                                                                             volume)
    assert verdicts == {True, False}  # plausible livers and implausible ones among the cases


def test_anatomy_of_other_pixels_is_not_used(abdomen_case):
    """A cached slice whose working-grid values differ from the series' slice (another
    decoding, a replaced instance) is measured again: the findings stay those of the scan."""
    volume, probability = abdomen_case.volume, abdomen_case.liver.astype(np.float32)
    whole = P.find(probability, volume.data, volume.affine, volume.spacing)
    cache = slice_by_slice(probability, volume)
    wrong = {k: P.anatomy_of_slice(np.full_like(volume.data[k], 40), volume.affine,
                                   volume.spacing) for k in cache}
    assert P.find(probability, volume.data, volume.affine, volume.spacing,
                  anatomy=wrong) == whole
    assert whole.fat_share > 0.01  # a body of 40 HU everywhere would hold no fat
