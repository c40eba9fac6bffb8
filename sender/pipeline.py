"""The sender's processing chain: input -> ROI probability -> steering map -> diffusion ->
PreparedStudy -> StudyEncoder.

:func:`build_encoder` is the whole chain from an input path (or :data:`PHANTOM`) and settings;
the CLI (``dlad-send``) only turns options into those settings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sender.dicom import DicomOptions
from sender.diffusion import DiffusionSettings, diffuse
from sender.encoder import EncodeSettings, PreparedStudy, StudyEncoder
from sender.roi.provider import ProbabilityProvider
from sender.roi.steering import SteeringSettings, steer
from shared.volume import Volume
from shared.wire import MAX_STUDY_ID, voxel_sha256

log = logging.getLogger("dlad.sender")

#: Input name of the built-in synthetic abdominal phantom (it brings its own liver mask).
PHANTOM = "phantom"
#: The demo phantom (:func:`models.phantoms.make_phantom`): 24 slices of 256 x 256 voxels of
#: 1.5 x 1.5 x 2.5 mm (a 384 mm field of view holds the whole abdomen), the noise of a routine
#: abdominal CT (12 HU), and a seed whose slab shows the liver on every slice.
PHANTOM_SETTINGS = {"shape": (24, 256, 256), "spacing": (1.5, 1.5, 2.5), "seed": 5,
                    "noise_hu": 12.0}


@dataclass(frozen=True)
class RoiChoice:
    """Where the ROI comes from: a mask file, or an automatic provider."""

    spec: str | None = None
    """``"unet"`` (default without a mask), ``"body"`` or ``"box:x0,x1,y0,y1,z0,z1"``."""
    mask: Path | None = None
    """Segmentation file aligned to the CT in physical space (wins over ``spec``)."""
    label: int | None = None
    """Label of ``mask`` to use (default: any non-zero)."""
    allow_small: bool = False
    """Keep an automatic ROI that looks implausible instead of the safe fallback."""
    allow_partial_mask: bool = False
    """Accept a mask whose field of view leaves CT tissue uncovered (sent bit-exact)."""


def make_provider(choice: RoiChoice, device: str | None = None, phantom_mask=None):
    """The ROI provider ``choice`` names (``phantom_mask``: the phantom's own liver)."""
    from sender.roi.mask_file import MaskFileProvider
    from sender.roi.provider import StaticMaskProvider

    if choice.mask is not None:
        if choice.spec is not None:
            raise ValueError("give either --roi-mask or --roi, not both")
        return MaskFileProvider(choice.mask, choice.label, choice.allow_partial_mask)
    if choice.label is not None:
        raise ValueError("--roi-label needs --roi-mask")
    if choice.allow_partial_mask:
        raise ValueError("--allow-partial-mask needs --roi-mask")
    if choice.spec is None and phantom_mask is not None:
        return StaticMaskProvider(phantom_mask, "synthetic phantom liver")
    spec = choice.spec or "unet"
    if spec == "unet":
        from sender.roi.unet import UNetProvider
        return UNetProvider(device=device)
    if spec == "body":
        from sender.roi.body import BodyProvider
        return BodyProvider()
    if spec.startswith("box:"):
        from sender.roi.box import BoxProvider
        return BoxProvider.from_spec(spec.removeprefix("box:"))
    raise ValueError(f"--roi must be 'unet', 'body' or 'box:x0,x1,y0,y1,z0,z1', got {spec!r}")


def safety_check(allow_small_roi: bool):
    """The U-Net's plausibility check: warn, and fall back to the safe policy unless allowed."""
    from sender.roi.safety import FALLBACK_ADVICE, fallback_probability, roi_problem

    def check(probability, volume):
        problem = roi_problem(probability, volume)
        if problem is None:
            return probability
        if allow_small_roi:
            log.warning("%s -- kept because of --allow-small-roi", problem)
            return probability
        log.warning("%s; %s", problem, FALLBACK_ADVICE)
        return fallback_probability(volume)

    return check


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
        **({"inserted_slices": volume.extra["inserted_slices"]}
           if volume.extra.get("inserted_slices") else {}),
        "roi": {**provider.describe(), **asdict(steering),
                "fraction": round(steering_map.roi_fraction, 6)},
        "diffusion": asdict(diffusion),
    }
    digest = voxel_sha256(volume.data)
    return PreparedStudy(volume=volume, roi=steering_map.roi, diffused=diffused,
                         study_id=study_id or default_study_id(volume, digest),
                         provenance=provenance, sha256=digest)


def build_encoder(source: str | Path, roi: RoiChoice = RoiChoice(),
                  steering: SteeringSettings = SteeringSettings(),
                  diffusion: DiffusionSettings = DiffusionSettings(),
                  encode: EncodeSettings = EncodeSettings(), device: str | None = None,
                  study_id: str | None = None, dicom: DicomOptions = DicomOptions()
                  ) -> StudyEncoder:
    """Load ``source`` (a path, or :data:`PHANTOM`), segment, diffuse: a ready StudyEncoder.

    ``dicom`` holds the choices for a DICOM folder (series, gaps, unreadable files).
    """
    from sender.io import load_volume

    started = time.perf_counter()
    phantom_mask = None
    if str(source) == PHANTOM:
        from models.phantoms import make_phantom
        volume, phantom_mask = make_phantom(**PHANTOM_SETTINGS)
    else:
        volume = load_volume(source, dicom)
    log.info("loaded %s: %s voxels, spacing %s mm, %s in %.1f s", volume.description,
             "x".join(map(str, volume.shape)), tuple(round(s, 3) for s in volume.spacing),
             volume.source_dtype, time.perf_counter() - started)
    provider = make_provider(roi, device, phantom_mask)
    automatic = provider.name == "unet"
    prepared = prepare_study(volume, provider, steering, diffusion, device=device,
                             study_id=study_id,
                             roi_check=safety_check(roi.allow_small) if automatic else None)
    return StudyEncoder(prepared, encode)
