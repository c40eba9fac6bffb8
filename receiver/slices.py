"""What each slice of a study being received is worth: not yet, preview, liver exact, exact.

One place decides it, for the viewer (states drawn on the views and the slice ruler) and for
the DICOM export (``LossyImageCompression`` of each instance):

=========  ==================================================================================
``0``      *not yet*: no layer of the slice has arrived (its voxels hold the fill value)
``1``      *preview*: the lossy base is there; the ROI part of the slice is not exact yet (or
           the slice has no ROI voxel: a lossy slice without liver)
``2``      *liver exact*: every ROI voxel of the slice is exact, the rest is still the preview
``3``      *exact*: every voxel of the slice equals the sender's, **and** the whole volume's
           SHA-256 matched the header's (nothing is called exact before that proof)
=========  ==================================================================================

"Exact" follows the reassembler: its ``roi_exact_slices`` (base + ROI residual, or a lossless
base) and ``verified`` (SHA-256 of the whole volume against the header, checked when every
slice has all its layers). A stream whose base is lossless and carries no layer 2 has no
verification of its own in the reassembler; :func:`volume_verified` checks the SHA-256 itself
once every slice has its lossless base, so such a study can be called exact too.
"""

from __future__ import annotations

import numpy as np

from receiver.reassembly import HAS_BASE, Reassembler
from shared.wire import voxel_sha256

NOT_YET, PREVIEW, LIVER_EXACT, EXACT = 0, 1, 2, 3
STATE_NAMES = ("not yet", "preview", "liver exact", "exact")


def roi_voxels_per_slice(reassembler: Reassembler) -> np.ndarray:
    """ROI voxels of each slice (int64, one entry per slice; zeros while the ROI is pending)."""
    return reassembler.roi_voxels_per_slice


def volume_verified(reassembler: Reassembler) -> bool:
    """True once the whole volume is proven equal to the sender's (SHA-256 of the voxels).

    The reassembler's own check (streams with an exact layer) is used when it has one; a
    stream whose base is lossless proves it here, once, when every slice has its base.
    """
    if reassembler.verified is not None:
        return bool(reassembler.verified)
    base = reassembler.header.layers.get(0, {})
    if not base.get("lossless") or 2 in reassembler.header.layers or not reassembler.base_complete:
        return False
    # Hashed once per state of the volume: a chunk applied or dropped since makes it stale.
    changes, verified = getattr(reassembler, "_dlad_lossless_verified", (None, False))
    if changes != reassembler.changes:
        verified = voxel_sha256(reassembler.volume) == reassembler.header.sha256
        reassembler._dlad_lossless_verified = (reassembler.changes, verified)
    return verified


def slice_states(reassembler: Reassembler) -> np.ndarray:
    """The state code (see the module docstring) of every slice, uint8, one per slice."""
    has_base = (reassembler.slice_layers() & HAS_BASE) > 0
    states = np.where(has_base, PREVIEW, NOT_YET).astype(np.uint8)
    with_roi = roi_voxels_per_slice(reassembler) > 0
    states[reassembler.roi_exact_slices & with_roi] = LIVER_EXACT
    if volume_verified(reassembler):
        states[:] = EXACT
    return states
