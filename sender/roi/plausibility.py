"""Is a predicted liver anatomically plausible? Findings from the scan's own anatomy.

The U-Net sees one slice at a time and has been trained on abdomens; on a head, neck, thorax
or pelvis it may call brain, heart, thyroid or bladder "liver". Diffusing such a scan would
lose what the radiologist came for, so the sender checks the prediction against the scan
itself before it trusts it (:func:`find`, then :func:`problem`); any failed check sends the
whole volume bit-exact. A false alarm costs compression only, a missed one costs image
quality, so the checks are strict.

Everything is measured in the canonical orientation of :mod:`models.preprocessing` (columns
from the patient's right to left, rows anterior to posterior, slices inferior to superior) on
the slices where the predicted liver ``L = {p > 0.5}`` lies, at a working pixel of about
:data:`WORK_PIXEL_MM` (every n-th row and column):

* **body outline** ``B``: per slice, the largest connected region of ``h > -500`` HU with its
  holes filled, after the scanner's padding outside the field of view is turned into air
  (:func:`models.preprocessing.suppress_padding`);
* **side**: the share of ``L`` on the patient's right of the body's centre line (the
  liver is a right upper-quadrant organ; the heart, spleen and stomach lie left or central,
  the brain, bladder and uterus central);
* **bone enclosure**: the share of ``L`` inside a closed ring of bone (``h > 250`` HU, gaps
  up to :data:`BONE_GAP_MM` bridged): a skull or a pelvic ring, never the rib cage, whose
  ribs are centimetres apart in an axial slice;
* **tissues of the scan**: the share of fat (-190 to -30 HU) in the body of those slices
  (the head holds almost none; an adult abdomen 10-50 %), and the median HU of ``L``;
* **lungs**: the share of the body taken by lung (components of -980 to -500 HU inside the
  body whose median is above -960 HU, which leaves out bowel gas);
* **size and shape**: volume, largest section, the body's section where the liver lies, and
  the share of ``L`` in its largest 3D connected component (a liver is one solid organ,
  scattered false positives are many small ones).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: Probability above which a voxel counts as predicted liver.
LIVER_THRESHOLD = 0.5
#: The checks run on every n-th row and column, n chosen for pixels of about this size (mm):
#: areas and shares are unchanged at this scale, and a 512 x 512 slice costs a quarter.
WORK_PIXEL_MM = 1.5
#: Tissue above this is body (air and lung are below).
BODY_HU = -500.0
#: Bone; gaps of up to this width (mm) in a ring of bone are bridged (joints, sutures, noise).
BONE_HU = 250.0
BONE_GAP_MM = 3.0
#: Fat, and lung (with the median of a lung component above LUNG_MEDIAN_HU: air is below).
FAT_HU = (-190.0, -30.0)
LUNG_HU = (-980.0, -500.0)
LUNG_MEDIAN_HU = -960.0


@dataclass(frozen=True)
class AnatomyFindings:
    """Measurements of a predicted liver against the scan's own anatomy."""

    volume_ml: float
    """Volume of the predicted liver."""
    largest_section_cm2: float
    """Its largest axial section."""
    slices: int
    """Slices that hold some of it."""
    scan_slices: int
    """Slices of the scan."""
    right_share: float
    """Share of it on the patient's right of the body's centre line (0.5: centred)."""
    bone_enclosed_share: float
    """Share of it inside a closed ring of bone (skull, pelvic ring)."""
    fat_share: float
    """Share of fat in the body outline of its slices."""
    lung_share: float
    """Share of lung in the body outline of its slices."""
    body_section_cm2: float
    """Median section of the body outline over its slices."""
    liver_body_share: float
    """Largest share of a slice's body section that it takes."""
    largest_component_share: float
    """Share of it in its largest 3D connected component."""
    median_hu: float
    """Median HU of it."""

    def to_dict(self) -> dict:
        return {key: round(value, 4) if isinstance(value, float) else value
                for key, value in asdict(self).items()}


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import label

    labels, count = label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _disc(radius_px: float) -> np.ndarray:
    r = int(np.ceil(radius_px))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return yy ** 2 + xx ** 2 <= radius_px ** 2 + 1e-9


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` of one slice plus every background region that does not reach the border
    (4-connectivity; as ``scipy.ndimage.binary_fill_holes``, in one labelling pass)."""
    from scipy.ndimage import label

    labels, count = label(~mask)
    if count == 0:
        return mask
    outside = np.zeros(count + 1, dtype=bool)
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        outside[edge] = True
    outside[0] = False
    return mask | ~outside[labels] & (labels > 0)


def body_outline(section: np.ndarray) -> np.ndarray:
    """The body of one slice: the largest region above :data:`BODY_HU`, holes filled."""
    tissue = section > BODY_HU
    if not tissue.any():
        return tissue
    return fill_holes(_largest_component(tissue))


def enclosed_by_bone(section: np.ndarray, body: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Pixels of one slice inside a closed ring of bone (gaps up to :data:`BONE_GAP_MM`)."""
    from scipy.ndimage import binary_closing

    bone = (section > BONE_HU) & body
    if not bone.any():
        return bone
    radius = BONE_GAP_MM / 2 / pixel_mm
    closed = binary_closing(bone, structure=_disc(radius), border_value=0) if radius >= 1 \
        else bone
    return fill_holes(closed) & ~closed


def lung_mask(section: np.ndarray, body: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Lung in one slice: air-like components inside the body that are not plain air."""
    from scipy.ndimage import label

    low, high = LUNG_HU
    candidates = body & (section >= low) & (section <= high)
    labels, count = label(candidates)
    if count == 0:
        return candidates
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    # A component is lung when most of it is above LUNG_MEDIAN_HU (its median is), which
    # leaves out bowel gas; only components of 3 cm² or more count.
    above = np.bincount(labels.ravel(), weights=(section > LUNG_MEDIAN_HU).ravel(),
                        minlength=count + 1)
    keep = (sizes * pixel_mm ** 2 >= 300.0) & (above > sizes / 2)
    keep[0] = False
    return keep[labels]


@dataclass(frozen=True)
class SliceAnatomy:
    """What :func:`find` measures of one slice's own anatomy, whatever the liver: computed
    once per slice, as a live series' slices arrive (:func:`slice_anatomy`), so that only the
    liver's share of each remains when the series is complete. All on the working grid."""

    source: np.ndarray
    """The slice's HU on the working grid (canonical orientation) it was computed from: a
    cached entry is used only for a slice with exactly these values."""
    pixel_mm: float
    """The working pixel it was computed for."""
    section: np.ndarray
    """``source`` with the padding outside the field of view turned into air."""
    centre: float
    """Column of the body's centre line (its mean column)."""
    enclosed: np.ndarray
    """Pixels inside a closed ring of bone (:func:`enclosed_by_bone`)."""
    fat: float
    """Fat pixels in the body."""
    lung: float
    """Lung pixels in the body (:func:`lung_mask`)."""
    body: float
    """Pixels of the body outline."""


def working_steps(spacing_xy) -> tuple[int, int]:
    """``(step_y, step_x)``: every n-th row and column for pixels of about
    :data:`WORK_PIXEL_MM` (``spacing_xy``: the canonical in-plane spacing)."""
    sx, sy = (float(v) for v in spacing_xy)
    return max(1, round(WORK_PIXEL_MM / sy)), max(1, round(WORK_PIXEL_MM / sx))


def slice_anatomy(source: np.ndarray, pixel_mm: float) -> SliceAnatomy:
    """:class:`SliceAnatomy` of one slice on the working grid (``source``: canonical
    orientation, every n-th row and column, :func:`working_steps`)."""
    from models.preprocessing import suppress_padding

    section = suppress_padding(source)
    body = body_outline(section)
    centre = float(np.nonzero(body)[1].mean()) if body.any() else (section.shape[1] - 1) / 2
    return SliceAnatomy(
        source=source, pixel_mm=pixel_mm, section=section, centre=centre,
        enclosed=enclosed_by_bone(section, body, pixel_mm),
        fat=float((body & (section >= FAT_HU[0]) & (section <= FAT_HU[1])).sum()),
        lung=float(lung_mask(section, body, pixel_mm).sum()), body=float(body.sum()))


def anatomy_of_slice(hu: np.ndarray, affine: np.ndarray, spacing) -> SliceAnatomy:
    """:class:`SliceAnatomy` of one axial slice ``hu`` (2D, the array orientation of
    ``affine``'s grid, a one-slice volume's affine), as :func:`find` computes it for that
    slice of a volume with the same in-plane orientation and pixel size."""
    from models.preprocessing import canonical_spacing, to_canonical

    sx, sy, _ = canonical_spacing(spacing, affine)
    step_y, step_x = working_steps((sx, sy))
    section = to_canonical(np.asarray(hu)[None], affine)[0]
    return slice_anatomy(np.ascontiguousarray(section[::step_y, ::step_x]),
                         float(np.sqrt(sx * step_x * sy * step_y)))


def _canonical_slice_sources(affine: np.ndarray, slices: int) -> np.ndarray | None:
    """For each slice of the canonical array, the array slice it is (``None`` when the
    canonical slices are not the array's slices: a sagittal or coronal stack)."""
    from models.preprocessing import to_canonical

    index = np.broadcast_to(np.arange(slices).reshape(slices, 1, 1), (slices, 2, 2))
    canonical = to_canonical(index, affine)
    if canonical.shape[0] != slices or not (canonical == canonical[:, :1, :1]).all():
        return None
    return np.asarray(canonical[:, 0, 0])


def _largest_component_share(mask: np.ndarray) -> float:
    """Share of ``mask`` in its largest 3D connected component (labelled in its bounding box,
    which holds every component)."""
    where = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
             for axis in range(3)]
    if any(w.size == 0 for w in where):
        return 0.0
    box = mask[tuple(slice(int(w[0]), int(w[-1]) + 1) for w in where)]
    return float(_largest_component(box).sum()) / max(1.0, float(box.sum()))


def find(probability: np.ndarray, hu: np.ndarray, affine: np.ndarray, spacing,
         anatomy=None) -> AnatomyFindings | None:
    """Findings of the predicted liver ``probability > 0.5`` in the scan ``hu``.

    Args:
        probability: liver probability, the shape of ``hu``.
        hu: the scan, slice-major HU.
        affine: its voxel-to-RAS+ matrix.
        spacing: ``(sx, sy, sz)`` in mm.
        anatomy: optional ``{array slice index: SliceAnatomy}`` computed beforehand
            (:func:`anatomy_of_slice`, as a live series' slices arrive); an entry is used only
            where its ``source`` equals the slice's working grid value for value (and its
            pixel size matches), so the findings are those computed without it.

    Returns:
        the findings, or ``None`` when nothing is predicted.
    """
    from models.preprocessing import canonical_spacing, to_canonical

    liver = to_canonical(np.asarray(probability) > LIVER_THRESHOLD, affine)
    if not liver.any():
        return None
    hu = to_canonical(np.asarray(hu), affine)
    sx, sy, sz = canonical_spacing(spacing, affine)
    voxel_ml = sx * sy * sz / 1000.0
    per_slice = liver.reshape(liver.shape[0], -1).sum(axis=1)
    volume_ml = float(per_slice.sum()) * voxel_ml
    largest_section_cm2 = float(per_slice.max()) * sx * sy / 100.0
    occupied = np.flatnonzero(per_slice)
    step_y, step_x = working_steps((sx, sy))
    coarse = liver[:, ::step_y, ::step_x]
    component_share = _largest_component_share(coarse)
    pixel_mm = float(np.sqrt(sx * step_x * sy * step_y))
    area_cm2 = sx * step_x * sy * step_y / 100.0
    sources = _canonical_slice_sources(affine, liver.shape[0]) if anatomy else None
    right = total = enclosed = fat = lung = body_area = 0.0
    sections, shares, values = [], [], []
    for k in occupied:
        mask = coarse[k]
        count = float(mask.sum())
        if count == 0:
            continue
        source = hu[k, ::step_y, ::step_x]
        known = anatomy.get(int(sources[k])) if sources is not None else None
        if known is None or known.pixel_mm != pixel_mm or \
                known.source.dtype != source.dtype or not np.array_equal(known.source, source):
            known = slice_anatomy(source, pixel_mm)
        right += float(mask[:, : int(np.floor(known.centre)) + 1].sum())
        total += count
        enclosed += float((mask & known.enclosed).sum())
        fat += known.fat
        lung += known.lung
        body_area += known.body
        sections.append(known.body * area_cm2)
        shares.append(count / known.body if known.body else 1.0)
        values.append(known.section[mask])
    return AnatomyFindings(
        volume_ml=volume_ml, largest_section_cm2=largest_section_cm2,
        slices=int(len(occupied)), scan_slices=int(liver.shape[0]),
        right_share=right / total if total else 0.5,
        bone_enclosed_share=enclosed / total if total else 0.0,
        fat_share=fat / body_area if body_area else 0.0,
        lung_share=lung / body_area if body_area else 0.0,
        body_section_cm2=float(np.median(sections)) if sections else 0.0,
        liver_body_share=float(max(shares)) if shares else 1.0,
        largest_component_share=component_share,
        median_hu=float(np.median(np.concatenate(values))) if values else 0.0)


#: Size: an adult liver holds 1200-1800 mL; even a 4 cm slab through its lower tip holds more
#: than 30 mL (the shared scans: 700 mL in 40 mm, 1000 mL in 90 mm). A scan thinner than
#: 2 cm (a few control slices) needs only MIN_LIVER_SECTION_CM2 times its thickness.
MIN_LIVER_VOLUME_ML = 30.0
#: Away from its very dome and tip an adult liver's axial section is 50-250 cm² (the shared
#: scans: 29 to 187 cm² per slice).
MIN_LIVER_SECTION_CM2 = 15.0
#: Side: 84-100 % of the true liver lies right of the body's centre line in every slice range
#: of the shared scans and their variants (docs/UNET.md); a large left lobe brings this down
#: (65-100 % in the synthetic phantoms); a heart, spleen, stomach, brain or bladder is left or
#: central. Below this share the liver is implausible (situs inversus, 1 in 10,000, then
#: takes the safe fallback too).
MIN_RIGHT_SHARE = 0.6
#: Bone: no liver voxel of the shared scans lies inside a closed ring of bone; a brain lies
#: entirely inside the skull, a bladder or uterus inside the pelvic ring.
MAX_BONE_ENCLOSED_SHARE = 0.2
#: Body: an adult trunk's section is 350-1000 cm² (the shared scans: 630-830 cm², truncated by
#: a field of view or not); a head is 150-250 cm², a neck 100-200 cm². (A small child's
#: abdomen can be below this too: it then takes the safe fallback.)
MIN_BODY_SECTION_CM2 = 250.0
#: A liver takes at most about a third of the trunk's section (shared scans: 22-32 %, 38 % in
#: a field of view that cuts the body); a brain fills 80 % of the head's.
MAX_LIVER_BODY_SHARE = 0.6
#: ... and at its largest section at least a tenth of it (shared scans: 21-32 %; 4-5 % in a
#: slab of only the lowest tip, which fails the size check anyway; a very obese patient may
#: come close to it). Muscle, bowel or vessels called liver in a chest or pelvis are smaller.
MIN_LIVER_BODY_SHARE = 0.1
#: Among lungs: where lung takes more than this share of the body, a liver section below
#: MIN_LIVER_AMONG_LUNGS of it is the heart, a vessel or an effusion (or the very dome of the
#: liver, which the safe fallback then sends bit-exact). Shared scans: lung at most 12 %.
MAX_LUNG_SHARE = 0.3
MIN_LIVER_AMONG_LUNGS = 0.15
#: Fat: an adult abdomen's body holds 10-50 % fat (shared scans: 22-45 %); a head almost none.
MIN_FAT_SHARE = 0.03
#: Shape: a liver is one solid organ (its largest connected part holds 96-100 % of the true
#: liver in the shared scans, 86-100 % of the held-out fold models' predicted livers; the left
#: lobe's tip may be a separate island); bowel loops and muscles called liver in a real pelvis
#: were 51-69 % (docs/UNET.md).
MIN_COMPONENT_SHARE = 0.75
#: HU: liver parenchyma lies between 40 (plain; the issue's unseen plain and late livers 40-60)
#: and 150 HU (enhanced); the predicted livers of held-out scans and variants had medians of
#: 36-110 HU (30-32 with a 10 cm hypodense tumour in a plain liver), bowel, kidney and muscle
#: called liver in a real lower abdomen and pelvis 11-29 HU. Below the floor: a severely fatty
#: liver, or a plain one mostly replaced by tumour, is sent bit-exact too (compression only).
LIVER_HU = (30.0, 200.0)


def problem(findings: AnatomyFindings | None, thickness_mm: float) -> str | None:
    """Why the predicted liver of ``findings`` is implausible, or ``None``.

    Args:
        findings: :func:`find`'s result (``None``: nothing predicted).
        thickness_mm: the scan's extent along its slices (number of slices x spacing).
    """
    if findings is None:
        return "the predicted liver is empty"
    f = findings
    reasons = []
    min_volume = min(MIN_LIVER_VOLUME_ML, MIN_LIVER_SECTION_CM2 * thickness_mm / 10.0)
    if f.volume_ml < min_volume or f.largest_section_cm2 < MIN_LIVER_SECTION_CM2:
        reasons.append(f"it is implausibly small ({f.volume_ml:.1f} mL, largest axial section "
                       f"{f.largest_section_cm2:.1f} cm²; a liver has at least {min_volume:g} "
                       f"mL here and {MIN_LIVER_SECTION_CM2:g} cm²)")
    if f.right_share < MIN_RIGHT_SHARE:
        reasons.append(f"only {100 * f.right_share:.0f} % of it lies on the patient's right of "
                       f"the body's centre line (a liver: at least {100 * MIN_RIGHT_SHARE:g} %)")
    if f.bone_enclosed_share > MAX_BONE_ENCLOSED_SHARE:
        reasons.append(f"{100 * f.bone_enclosed_share:.0f} % of it lies inside a closed ring of "
                       "bone (a skull or a pelvic ring)")
    if f.body_section_cm2 < MIN_BODY_SECTION_CM2:
        reasons.append(f"the body's section there is {f.body_section_cm2:.0f} cm², too small for "
                       f"an adult trunk (at least {MIN_BODY_SECTION_CM2:g} cm²: a head, neck or "
                       "limb?)")
    if f.liver_body_share > MAX_LIVER_BODY_SHARE:
        reasons.append(f"it fills {100 * f.liver_body_share:.0f} % of the body's section (a "
                       f"liver: at most {100 * MAX_LIVER_BODY_SHARE:g} %)")
    if f.liver_body_share < MIN_LIVER_BODY_SHARE:
        reasons.append(f"its largest section is only {100 * f.liver_body_share:.0f} % of the "
                       f"body's (a liver: at least {100 * MIN_LIVER_BODY_SHARE:g} %)")
    if f.lung_share > MAX_LUNG_SHARE and f.liver_body_share < MIN_LIVER_AMONG_LUNGS:
        reasons.append(f"it is small ({100 * f.liver_body_share:.0f} % of the body's section) "
                       f"among lungs ({100 * f.lung_share:.0f} % of the body): a chest")
    if f.fat_share < MIN_FAT_SHARE:
        reasons.append(f"the body around it holds almost no fat ({100 * f.fat_share:.1f} %; an "
                       "abdomen holds 10-50 %)")
    if f.largest_component_share < MIN_COMPONENT_SHARE:
        reasons.append(f"it is scattered (its largest part holds "
                       f"{100 * f.largest_component_share:.0f} %)")
    if not LIVER_HU[0] <= f.median_hu <= LIVER_HU[1]:
        reasons.append(f"its median of {f.median_hu:.0f} HU is not liver tissue "
                       f"({LIVER_HU[0]:g} to {LIVER_HU[1]:g} HU)")
    if not reasons:
        return None
    return "the predicted liver is anatomically implausible: " + "; ".join(reasons)
