"""The sender's processing chain: ROI probability -> steering map -> diffusion -> PreparedStudy."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np

from sender.diffusion import DiffusionSettings, diffuse
from sender.encoder import PreparedStudy
from sender.roi.provider import ProbabilityProvider
from sender.roi.steering import SteeringSettings, steer
from shared.volume import Volume
from shared.wire import MAX_STUDY_ID, voxel_sha256

log = logging.getLogger("dlad.sender")


def default_study_id(volume: Volume, digest: str) -> str:
    """A readable, content-derived id: input name plus the first 12 hex digits of the SHA-256."""
    stem = volume.description.split(" ")[0] or "study"
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        stem = stem.removesuffix(suffix)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._") or "study"
    return f"{safe[: MAX_STUDY_ID - 13]}-{digest[:12]}"


def prepare_study(volume: Volume, provider: ProbabilityProvider,
                  steering: SteeringSettings = SteeringSettings(),
                  diffusion: DiffusionSettings = DiffusionSettings(),
                  device: str | None = None, study_id: str | None = None,
                  roi_check=None) -> PreparedStudy:
    """Compute the ROI and the diffused volume.

    ``roi_check(probability, volume)`` returns the probability map to use: the provider's, or a
    safe replacement when an automatic segmentation looks implausible.
    """
    started = time.perf_counter()
    probability = provider.probability(volume)
    if roi_check is not None:
        probability = roi_check(probability, volume)
    steering = steering.with_provider_margin(provider.z_margin_mm)
    steering_map = steer(probability, volume.spacing, steering)
    log.info("ROI (%s): %.1f %% of voxels in %.1f s", provider.name,
             100 * steering_map.roi_fraction, time.perf_counter() - started)
    started = time.perf_counter()
    diffused = diffuse(volume.data, steering_map.probability, diffusion, device=device)
    # Belt and braces: the scheme leaves p == 1 voxels untouched; make the invariant explicit.
    np.copyto(diffused, volume.data, where=steering_map.roi)
    log.info("diffusion (K=%g HU, %d iterations, %s): %.2f s", diffusion.kappa,
             diffusion.iterations, diffusion.mode, time.perf_counter() - started)
    provenance = {
        "input": volume.description,
        "roi": {**provider.describe(), **asdict(steering),
                "fraction": round(steering_map.roi_fraction, 6)},
        "diffusion": asdict(diffusion),
    }
    digest = voxel_sha256(volume.data)
    return PreparedStudy(volume=volume, roi=steering_map.roi, diffused=diffused,
                         study_id=study_id or default_study_id(volume, digest),
                         provenance=provenance, sha256=digest)
