"""From a probability map to the diffusion-steering map and the bit-exact ROI (Luu et al.).

The paper dilates the CNN's liver probability map slice by slice with a 30x30x1 disc, then sets
``p := 1`` wherever ``p > 0.75``. The ROI is every voxel with ``p == 1``: diffusion leaves it
untouched (its coefficient ``(1 - p) exp(-|grad I|/K)`` is 0) and the layered codec sends it
bit-exact. Elsewhere ``p`` stays soft, so diffusion fades in smoothly around the ROI.

Safety additions of dlad-stream (``z_margin_mm=0, fill_holes=False, uncertain_threshold=0``
is the paper's post-processing exactly):

* **uncertainty margin** (``uncertain_threshold = u``, before everything else): voxels whose
  probability is low but not negligible, ``p > u``, and that are connected (26-connectivity in
  3D) to the predicted liver ``p > 0.5`` join it with ``p := 1`` (hysteresis thresholding,
  Canny 1986). A tumour or a tip the network is unsure of is usually such a region, attached
  to the liver; voxels the network rules out (``p <= u``) stay out;

* **margin across slices** (``z_margin_mm = m``): after the in-plane disc, a running maximum
  along the slice axis over the ``h = floor(m / s_z)`` slices on either side,
  ``q'[k] = max(q[k-h], ..., q[k+h])`` (``s_z``: slice spacing). Dilation by the disc and then
  by the segment is dilation by their product, a cylinder of radius ``r`` and half-height
  ``h s_z <= m``; as thresholding commutes with the maximum, the ROI of slice ``k`` is the union
  of the paper's ROIs of the slices within ``m`` mm of it, the margin a radiotherapy planner
  puts around a target. It covers a liver tip or dome, or a lesion at the liver's edge, that
  the network misses on a few slices but finds on a neighbouring one.
* **holes filled per slice** (``fill_holes``): any background region of a slice's ROI that
  does not touch the slice's border (4-connectivity of the background) joins the ROI with
  ``p := 1``. A lesion the network does not call liver but which the liver surrounds (a dark
  metastasis or ablation zone in the middle of the organ) is then sent bit-exact too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

#: Default uncertainty margin of a predicted map: voxels with p above this, connected to the
#: predicted liver, join the ROI. Held out (docs/UNET.md, "Unseen scans"), 0.03 brought the
#: bundled ensemble's worst liver cover from 96.9 % to 100 % (fold B) and from 99.04 % to
#: 99.86 % (fold A) for an ROI of at most 1.87 x the dilated true liver; 0.1 was not enough
#: (99.59 %), 0.01 doubled the ROI (up to 3.9 x).
DEFAULT_UNCERTAIN_THRESHOLD = 0.03
#: Default margin across slices (mm) of a predicted map. The liver's lower border ends in thin
#: tongues (the left lobe's anterior-inferior edge, the right lobe's tip) that show on axial
#: slices as small islands apart from the main section, where a 2D network has the least
#: context: held out (docs/UNET.md, "The liver's lower tip"), the fold networks that never saw
#: the liver's lower slices gave such an island p < 0.03 over the 24 mm below the slice where
#: they began to see it. 24 mm brings every held-out case of both folds to 100 % of the liver in
#: the ROI (15 mm, the paper's disc radius at 1 mm pixels: 99.86 % in the worst, 18 mm
#: 99.95 %), for an ROI of at most 1.93 x the dilated true liver; it is in mm, so the same
#: anatomy gets the same margin whatever the slice spacing (8 slices at 3 mm, 12 at 2 mm).
DEFAULT_Z_MARGIN_MM = 24.0


@dataclass(frozen=True)
class SteeringSettings:
    """How a probability map becomes the ROI."""

    dilation_radius_px: float = 15.0
    """In-plane disc radius in pixels (the paper's 30x30x1 disc); ignored if a mm radius is set."""
    dilation_radius_mm: float | None = None
    """In-plane disc radius in millimetres (an ellipse in pixels when spacing is anisotropic)."""
    threshold: float = 0.75
    """After dilation, probabilities above this become exactly 1 (part of the ROI)."""
    z_margin_mm: float | None = None
    """Margin across slices in mm: each slice's ROI also takes that of the slices whose centres
    lie within this distance (0: in-plane only, as the paper). None: the ROI provider's own
    margin when the sender steers (:attr:`ProbabilityProvider.z_margin_mm`: the U-Net's
    prediction gets :data:`DEFAULT_Z_MARGIN_MM`, a given mask none); none for :func:`steer`
    called on its own."""
    fill_holes: bool = True
    """Fill the holes of every slice's ROI (enclosed lesions join it)."""
    uncertain_threshold: float | None = None
    """Uncertainty margin: voxels with ``p`` above this that are connected to the predicted
    liver (``p > 0.5``) join it. 0: off (the paper). None: the ROI provider's own when the
    sender steers (:attr:`ProbabilityProvider.uncertain_threshold`), off for :func:`steer`
    called on its own."""

    def __post_init__(self):
        if not 0.0 <= self.dilation_radius_px <= 512:
            raise ValueError(f"dilation radius must be in [0, 512] px, got {self.dilation_radius_px}")
        if self.dilation_radius_mm is not None and not 0.0 <= self.dilation_radius_mm <= 500:
            raise ValueError(f"dilation radius must be in [0, 500] mm, got {self.dilation_radius_mm}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.z_margin_mm is not None and not 0.0 <= self.z_margin_mm <= 500:
            raise ValueError(f"z margin must be in [0, 500] mm, got {self.z_margin_mm}")
        if not isinstance(self.fill_holes, bool | np.bool_):
            raise ValueError(f"fill_holes must be True or False, got {self.fill_holes!r}")
        if self.uncertain_threshold is not None and not 0.0 <= self.uncertain_threshold < 0.5:
            raise ValueError("uncertainty threshold must be in [0, 0.5), got "
                             f"{self.uncertain_threshold}")

    def radii_px(self, spacing) -> tuple[float, float]:
        """Disc radii ``(rx, ry)`` in pixels for in-plane ``spacing = (sx, sy, ...)``."""
        if self.dilation_radius_mm is None:
            return self.dilation_radius_px, self.dilation_radius_px
        return self.dilation_radius_mm / spacing[0], self.dilation_radius_mm / spacing[1]

    def z_margin_slices(self, spacing) -> int:
        """``h = floor(z_margin_mm / s_z)``: slices added on either side, ``s_z = spacing[2]``."""
        slice_mm = float(spacing[2])
        if not slice_mm > 0:
            raise ValueError(f"slice spacing must be positive, got {slice_mm}")
        return int(np.floor((self.z_margin_mm or 0.0) / slice_mm + 1e-9))

    def for_provider(self, provider) -> SteeringSettings:
        """These settings, with the margins of ``provider`` (its ``z_margin_mm`` and
        ``uncertain_threshold``, :class:`~sender.roi.provider.ProbabilityProvider`) where they
        leave them open (None)."""
        settings = self
        if settings.z_margin_mm is None:
            settings = replace(settings, z_margin_mm=float(provider.z_margin_mm))
        if settings.uncertain_threshold is None:
            settings = replace(settings,
                               uncertain_threshold=float(provider.uncertain_threshold))
        return settings

    def paper(self) -> SteeringSettings:
        """The same in-plane disc and threshold without the margin across slices, hole
        filling or uncertainty margin: the paper's post-processing (the reference ROI of
        :func:`roi_metrics`)."""
        return replace(self, z_margin_mm=0.0, fill_holes=False, uncertain_threshold=0.0)


@dataclass
class SteeringMap:
    """The post-processed probability map and the ROI it defines."""

    probability: np.ndarray | None
    """float32, shape of the volume: dilated, thresholded probability (1.0 inside the ROI);
    None when :func:`steer` was asked for the ROI only (``need_probability=False``)."""
    roi: np.ndarray
    """bool, shape of the volume: ``probability == 1``; sent bit-exact."""

    @property
    def roi_fraction(self) -> float:
        # count_nonzero: the mean's value without its float pass over the volume.
        return np.count_nonzero(self.roi) / self.roi.size


def disc_dilate(values: np.ndarray, radius_x: float, radius_y: float) -> np.ndarray:
    """Grey-level dilation of every slice of ``values`` (slice-major) by an elliptical disc.

    The disc is a union of horizontal segments, one per row offset ``dy``, of half-width
    ``floor(rx * sqrt(1 - (dy/ry)^2))``; each segment is a 1D running maximum (van Herk), so the
    cost grows with the radius, not with its square.
    """
    half_widths = disc_half_widths(radius_x, radius_y)
    if half_widths is None:
        return values.copy()
    row_max = {w: _row_max(values, w) if w > 0 else values for w in set(half_widths.values())}
    out = np.array(values, copy=True)
    ny = values.shape[1]
    for dy, w in half_widths.items():
        if abs(dy) >= ny:  # the disc is taller than the slice: no row lies that far away
            continue
        shifted = row_max[w]
        # out[:, y] = max(out[:, y], shifted[:, y + dy]) for the rows that exist.
        if dy >= 0:
            np.maximum(out[:, : ny - dy], shifted[:, dy:], out=out[:, : ny - dy])
        else:
            np.maximum(out[:, -dy:], shifted[:, : ny + dy], out=out[:, -dy:])
    return out


def disc_half_widths(radius_x: float, radius_y: float) -> dict[int, int] | None:
    """The disc of :func:`disc_dilate` as ``{row offset dy: half-width}`` (``dy`` from
    ``-floor(ry)`` to ``floor(ry)``); None for a disc of one pixel (``ry < 1`` and ``rx < 1``).

    >>> disc_half_widths(2.0, 2.0)
    {-2: 0, -1: 1, 0: 2, 1: 1, 2: 0}
    """
    ry = int(np.floor(radius_y))
    if ry < 1 and radius_x < 1:
        return None
    half_widths = {}
    for dy in range(-ry, ry + 1):
        ratio = 1.0 - (dy / radius_y) ** 2 if radius_y > 0 else 1.0
        # 1e-9: a column exactly on the ellipse (rx * sqrt(...) an integer up to rounding)
        # belongs to the disc.
        half_widths[dy] = int(np.floor(radius_x * np.sqrt(max(ratio, 0.0)) + 1e-9))
    return half_widths


def _row_max(values: np.ndarray, half_width: int) -> np.ndarray:
    """``out[..., x] = max(values[..., x-w .. x+w])`` along the last axis (outside: ignored).

    torch's max pooling (one thread, vectorised) gives the same values as scipy's
    ``maximum_filter1d`` (van Herk) about 3x faster on 512-pixel rows; scipy where torch is not
    installed. torch and scipy are imported here, where they are used: the sender's command
    line imports this module for its option defaults, and a sender replaying a .dlad should not
    pay for them.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        from scipy.ndimage import maximum_filter1d

        return maximum_filter1d(values, size=2 * half_width + 1, axis=-1, mode="constant",
                                cval=-np.inf)
    rows = torch.from_numpy(values).reshape(-1, 1, values.shape[-1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per calling thread: see LazyDiffusion.compute
    try:
        with torch.no_grad():
            pooled = F.max_pool1d(rows, 2 * half_width + 1, stride=1, padding=half_width)
    finally:
        torch.set_num_threads(threads)
    return pooled.reshape(values.shape).numpy()


def slice_margin(values: np.ndarray, half_width: int) -> np.ndarray:
    """Running maximum along the slice axis (axis 0): ``out[k] = max(values[k-h..k+h])``.

    Slices beyond the volume count as 0 (``values`` are probabilities in ``[0, 1]``).
    """
    if half_width < 1 or values.shape[0] == 1:
        return values
    from scipy.ndimage import maximum_filter1d

    return maximum_filter1d(values, size=2 * half_width + 1, axis=0, mode="constant", cval=0.0)


def slice_margin_mask(mask: np.ndarray, half_width: int) -> np.ndarray:
    """:func:`slice_margin` of a boolean mask: ``out[k] = any(mask[k-h..k+h])``.

    Computed in the mask's bounding box (grown by ``h`` slices) only: outside it every window
    holds no voxel of the mask. A liver's box is a fraction of a 300-slice series, where the
    float map's running maximum reads and writes every voxel (about 2 s on this machine).
    """
    if half_width < 1 or mask.shape[0] == 1 or not mask.any():
        return mask
    from scipy.ndimage import maximum_filter1d

    (z0, z1), (y0, y1), (x0, x1) = (
        (int(i[0]), int(i[-1]) + 1) for i in (
            np.flatnonzero(mask.any(axis=(1, 2))), np.flatnonzero(mask.any(axis=(0, 2))),
            np.flatnonzero(mask.any(axis=(0, 1)))))
    z0, z1 = max(z0 - half_width, 0), min(z1 + half_width, mask.shape[0])
    out = np.zeros_like(mask)
    box = mask[z0:z1, y0:y1, x0:x1].view(np.uint8)
    out[z0:z1, y0:y1, x0:x1] = maximum_filter1d(box, size=2 * half_width + 1, axis=0,
                                                mode="constant", cval=0).view(bool)
    return out


def fill_slice_holes(roi: np.ndarray) -> np.ndarray:
    """Per slice, the ROI plus every background region that does not reach the slice border.

    Each slice is filled within the bounding box of its ROI grown by one background pixel: a
    background region that reaches the box's edge reaches the slice's border through the
    background around the box, so the holes found there are exactly those of the whole slice
    (and the liver's box is a fraction of the slice).
    """
    from scipy.ndimage import binary_fill_holes

    if not roi.any():
        return roi
    filled = roi.copy()
    ny, nx = roi.shape[1:]
    for k, section in enumerate(roi):
        rows = np.flatnonzero(section.any(axis=1))
        if rows.size == 0:
            continue
        columns = np.flatnonzero(section.any(axis=0))
        y0, y1 = max(rows[0] - 1, 0), min(rows[-1] + 2, ny)
        x0, x1 = max(columns[0] - 1, 0), min(columns[-1] + 2, nx)
        box = np.zeros((y1 - y0 + 2, x1 - x0 + 2), dtype=bool)
        box[1:-1, 1:-1] = section[y0:y1, x0:x1]
        filled[k, y0:y1, x0:x1] = binary_fill_holes(box)[1:-1, 1:-1]
    return filled


def _bounding_box(mask: np.ndarray, grow=(0, 0, 0)) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every True voxel of ``mask``, grown by ``grow``
    voxels per axis (clipped to the array); None when the mask is empty."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        where = np.flatnonzero(mask.any(axis=others))
        if where.size == 0:
            return None
        box.append(slice(max(int(where[0]) - grow[axis], 0),
                         min(int(where[-1]) + 1 + grow[axis], mask.shape[axis])))
    return tuple(box)


def uncertain_region(probability: np.ndarray, threshold: float) -> np.ndarray | None:
    """The voxels :func:`join_uncertain` sets to 1: those of ``{p > threshold}`` connected
    (26-connectivity) to a voxel of ``{p > 0.5}``; None when that adds nothing to
    ``{p > 0.5}``.

    Labelled in the bounding box of ``{p > threshold}`` only: every component lies inside it,
    so the components are those of the whole volume (a liver's box is a fraction of a long
    series).
    """
    from scipy.ndimage import label

    candidates = probability > threshold
    box = _bounding_box(candidates)
    if box is None:
        return None
    candidates_box = candidates[box]
    core_box = probability[box] > 0.5
    if not core_box.any() or not (candidates_box & ~core_box).any():
        return None
    labels, count = label(candidates_box, structure=np.ones((3, 3, 3), dtype=bool))
    # A lookup table of the components that hold liver: one gather instead of np.isin's sort.
    holds_liver = np.zeros(count + 1, dtype=bool)
    holds_liver[labels[core_box]] = True
    holds_liver[0] = False
    joined = np.zeros_like(candidates)
    joined[box] = holds_liver[labels]
    return joined


def join_uncertain(probability: np.ndarray, threshold: float) -> np.ndarray:
    """``probability`` with ``p := 1`` on every voxel of ``{p > threshold}`` that is connected
    (26-connectivity) to a voxel of ``{p > 0.5}``; a copy when anything changes."""
    joined = uncertain_region(probability, threshold)
    if joined is None:
        return probability
    out = probability.copy()
    out[joined] = 1.0
    return out


def disc_dilate_mask(mask: np.ndarray, radius_x: float, radius_y: float) -> np.ndarray:
    """``disc_dilate(mask) > 0`` of a boolean slice-major mask, in the mask's bounding box.

    The same disc as :func:`disc_dilate`, whose rows reach at most ``floor(ry)`` rows and
    ``floor(rx)`` columns away: a voxel farther from the mask's bounding box than that has no
    mask voxel in its disc. So the dilation runs in that box grown by those reaches only, and
    gives the whole volume's result voxel for voxel (a liver's box is a fraction of a long
    series; the whole float map costs about 0.5 s for 300 slices of 512 x 512 here).
    """
    out = np.zeros_like(mask, dtype=bool)
    box = _bounding_box(mask, (0, int(np.floor(radius_y)), int(np.floor(radius_x + 1e-9))))
    if box is None:
        return out
    half_widths = disc_half_widths(radius_x, radius_y)
    out[box] = mask[box] if half_widths is None else _dilate_runs(mask[box], half_widths)
    return out


#: Voxels of the box :func:`_dilate_runs` paints at a time (its counters take 8 bytes each):
#: about 4 M voxels, 16 slices of 512 x 512, keep its memory near 100 MB.
_RUNS_SLAB_VOXELS = 1 << 22


def _dilate_runs(mask: np.ndarray, half_widths: dict[int, int]) -> np.ndarray:
    """The disc dilation of a boolean slice-major mask, run by run.

    Every run ``[a, b)`` of a row ``y`` widens to ``[a - w, b + w)`` (clipped to the row) in
    row ``y - dy`` for each row offset ``dy`` of the disc and its half-width ``w``: the rows of
    the disc :func:`disc_dilate` takes the maximum over, so the union of those intervals is
    ``disc_dilate(mask) > 0.5`` voxel for voxel (tested), painted as +1/-1 at the intervals'
    ends and a running sum. A liver's rows hold one to three runs, so this touches each row a
    few times where the grey dilation takes a running maximum over every column for every
    half-width (1.0 of 2.4 s in the ROI steps of a 300-slice series).
    """
    nz, ny, nx = mask.shape
    stride = nx + 1  # the column past the row's end holds the stops at nx
    out = np.empty_like(mask)
    slab = max(1, _RUNS_SLAB_VOXELS // (ny * stride))
    for z0 in range(0, nz, slab):
        part = mask[z0:z0 + slab]
        padded = np.zeros((part.shape[0], ny, nx + 2), np.int8)
        padded[..., 1:-1] = part
        edges = np.diff(padded, axis=-1)  # +1 at a run's first column, -1 past its last
        z, y, a = np.nonzero(edges == 1)
        b = np.nonzero(edges == -1)[2]  # the same rows in the same order: one stop per start
        starts, stops = [], []
        for dy, w in half_widths.items():
            target = y - dy
            keep = (target >= 0) & (target < ny)
            row = (z[keep] * ny + target[keep]) * stride
            starts.append(row + np.maximum(a[keep] - w, 0))
            stops.append(row + np.minimum(b[keep] + w, nx))
        size = part.shape[0] * ny * stride
        counts = np.bincount(np.concatenate(starts), minlength=size)
        counts -= np.bincount(np.concatenate(stops), minlength=size)
        np.cumsum(counts, out=counts)
        out[z0:z0 + slab] = (counts > 0).reshape(part.shape[0], ny, stride)[..., :nx]
    return out


def in_plane_dilation(probability: np.ndarray, spacing,
                      settings: SteeringSettings = SteeringSettings()) -> np.ndarray:
    """The first step of :func:`steer` without an uncertainty margin, slice by slice:
    ``disc_dilate(clip(p, 0, 1))``.

    It needs no other slice, so a live sender computes it for each slice as the slice arrives
    and hands the stack to :func:`steer` (``in_plane``) when the series is complete. (The
    uncertainty margin joins regions across slices before the dilation; with one, the stack
    cannot be used.)
    """
    p = np.clip(np.asarray(probability, dtype=np.float32), 0.0, 1.0)
    rx, ry = settings.radii_px(spacing)
    return disc_dilate(p, rx, ry)


def steer(probability: np.ndarray, spacing, settings: SteeringSettings = SteeringSettings(),
          in_plane: np.ndarray | None = None, need_probability: bool = True) -> SteeringMap:
    """Probability map -> steering map and ROI.

    With an uncertainty margin ``u > 0``, first ``p := 1`` on the regions of ``{p > u}`` that
    hold predicted liver (:func:`join_uncertain`). Then
    ``q = max over the cylinder (in-plane disc x slice margin) of clip(p, 0, 1)``; ``q := 1``
    where ``q > threshold``; then, with ``fill_holes``, ``q := 1`` in every hole of a slice's
    ``{q == 1}``. The ROI is ``{q == 1}``.

    ``in_plane``: :func:`in_plane_dilation` of ``probability`` with these settings, when it was
    computed already (slice by slice); it is used, and may be modified, in place.

    ``need_probability=False``: the ROI only (``probability`` None), for a sender that does not
    diffuse. ``max over the window of q > threshold`` is ``any over the window of
    (q > threshold)``, so the ROI is the same voxel for voxel, computed on a boolean mask in its
    bounding box (:func:`slice_margin_mask`) instead of the whole float map.
    """
    if in_plane is not None:
        if settings.uncertain_threshold:
            raise ValueError("an in-plane dilation computed beforehand cannot be used with an "
                             "uncertainty margin (it joins regions across slices first)")
        if in_plane.shape != np.shape(probability):
            raise ValueError(f"in-plane dilation {in_plane.shape} does not match the "
                             f"probability map {np.shape(probability)}")
        p = in_plane
    else:
        probability = np.asarray(probability, dtype=np.float32)
        if probability.ndim != 3:
            raise ValueError(f"probability map must be 3D (slices, rows, columns), got "
                             f"{probability.shape}")
        if not need_probability:
            return _roi_only(probability, spacing, settings)
        p = np.clip(probability, 0.0, 1.0)
        if settings.uncertain_threshold:
            p = join_uncertain(p, settings.uncertain_threshold)
        rx, ry = settings.radii_px(spacing)
        p = disc_dilate(p, rx, ry)
    half_width = settings.z_margin_slices(spacing)
    if not need_probability:
        # threshold < 1 (checked), so {q == 1} lies inside {q > threshold}.
        roi = slice_margin_mask(p > settings.threshold, half_width)
        return SteeringMap(probability=None,
                           roi=fill_slice_holes(roi) if settings.fill_holes else roi)
    p = slice_margin(p, half_width)
    p[p > settings.threshold] = 1.0
    roi = p == 1.0
    if settings.fill_holes:
        roi = fill_slice_holes(roi)
        p[roi] = 1.0
    return SteeringMap(probability=p, roi=roi)


def _roi_only(probability: np.ndarray, spacing, settings: SteeringSettings) -> SteeringMap:
    """:func:`steer`'s ROI without the steering map, on boolean masks in their bounding boxes.

    Voxel for voxel the same ROI: with ``t = threshold`` in ``(0, 1)``, ``clip(p, 0, 1) > t``
    is ``p > t``; after the uncertainty margin the voxels above ``t`` are those above it before
    plus the joined region (set to 1); the grey dilation's maximum over the disc exceeds ``t``
    exactly where some voxel of the disc does (:func:`disc_dilate_mask`), and the same holds
    for the running maximum across slices (:func:`slice_margin_mask`).
    """
    above = probability > settings.threshold
    if settings.uncertain_threshold:
        joined = uncertain_region(probability, settings.uncertain_threshold)
        if joined is not None:
            above |= joined
    rx, ry = settings.radii_px(spacing)
    roi = slice_margin_mask(disc_dilate_mask(above, rx, ry), settings.z_margin_slices(spacing))
    return SteeringMap(probability=None, roi=fill_slice_holes(roi) if settings.fill_holes else roi)
