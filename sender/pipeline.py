"""The sender's processing chain: input -> ROI probability -> steering map -> diffusion ->
PreparedStudy -> StudyEncoder.

:func:`build_encoder` is the whole chain from an input path (or :data:`PHANTOM`) and settings;
the CLI (``dlad-send``) only turns options into those settings.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from sender.dicom import DicomOptions
from sender.diffusion import DiffusionSettings, LazyDiffusion
from sender.encoder import LAYERED, EncodeSettings, PreparedStudy, StudyEncoder, can_defer_roi
from sender.roi.provider import ProbabilityProvider
from sender.roi.steering import SteeringSettings, in_plane_dilation, steer
from shared.volume import Volume, VolumeError
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
    """Where the ROI comes from: a mask file, or an automatic provider.

    Checked when made, before any volume is loaded: a missing mask file raises
    :class:`VolumeError`, a choice that makes no sense (a bad ``box:`` spec, a label without a
    mask) :class:`ValueError`.
    """

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

    def __post_init__(self):
        if self.mask is not None:
            if self.spec is not None:
                raise ValueError("give either --roi-mask or --roi, not both")
            if not Path(self.mask).exists():
                raise VolumeError(f"--roi-mask not found: {self.mask}")
        elif self.label is not None:
            raise ValueError("--roi-label needs --roi-mask")
        elif self.allow_partial_mask:
            raise ValueError("--allow-partial-mask needs --roi-mask")
        if self.spec is None or self.spec in ("unet", "body"):
            return
        if not self.spec.startswith("box:"):
            raise ValueError("--roi must be 'unet', 'body' or 'box:x0,x1,y0,y1,z0,z1', got "
                             f"{self.spec!r}")
        from sender.roi.box import BoxProvider

        BoxProvider.from_spec(self.spec.removeprefix("box:"))


def make_provider(choice: RoiChoice, device: str | None = None, phantom_mask=None):
    """The ROI provider ``choice`` names (``phantom_mask``: the phantom's own liver)."""
    from sender.roi.mask_file import MaskFileProvider
    from sender.roi.provider import StaticMaskProvider

    if choice.mask is not None:
        return MaskFileProvider(choice.mask, choice.label, choice.allow_partial_mask)
    if choice.spec is None and phantom_mask is not None:
        return StaticMaskProvider(phantom_mask, "synthetic phantom liver")
    spec = choice.spec or "unet"
    if spec == "unet":
        from sender.roi.unet import UNetProvider
        return UNetProvider(device=device)
    if spec == "body":
        from sender.roi.body import BodyProvider
        return BodyProvider()
    from sender.roi.box import BoxProvider
    return BoxProvider.from_spec(spec.removeprefix("box:"))  # RoiChoice checked the spec


def safety_check(allow_small_roi: bool, anatomy: dict | None = None):
    """The U-Net's plausibility check: warn, and fall back to the safe policy unless allowed.

    ``anatomy``: per-slice anatomy measured beforehand (a live series' slices as they
    arrived; :func:`sender.roi.safety.roi_problem`)."""
    from sender.roi.safety import FALLBACK_ADVICE, fallback_probability, roi_problem

    def check(probability, volume):
        problem = roi_problem(probability, volume, anatomy=anatomy)
        if problem is None:
            check.decision = {"plausible": True}
            return probability
        if allow_small_roi:
            log.warning("%s -- kept because of --allow-small-roi", problem)
            check.decision = {"plausible": False, "problem": problem, "kept": True}
            return probability
        log.warning("%s; %s", problem, FALLBACK_ADVICE)
        check.decision = {"plausible": False, "problem": problem, "fallback": True}
        return fallback_probability(volume)

    check.decision = None
    """The last check's outcome, for the stream's provenance."""
    return check


def default_study_id(volume: Volume, digest: str) -> str:
    """A readable, content-derived id: input name plus the first 12 hex digits of the SHA-256."""
    stem = volume.description.split(" ")[0] or "study"
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        stem = stem.removesuffix(suffix)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._") or "study"
    return f"{safe[: MAX_STUDY_ID - 13]}-{digest[:12]}"


def default_diffusion(encode: EncodeSettings) -> DiffusionSettings:
    """The diffusion a coding mode gets unless one is asked for.

    * Layered modes (the default, ``--exact``): **none**. Measured on five studies
      (``scripts/study_diffusion.py``, docs/BENCHMARKS.md "What diffusion buys"): at equal
      whole-volume SSIM the diffused base saves no bytes (0.995-1.04 x the undiffused stream),
      its previews keep fewer edges outside the ROI (GMSD) up to base CRF 24 and about as many
      at CRF 30-36, and with the quality guard on the stream even grows (up to +10 %, the guard
      re-coding the blocks diffusion pushed below its SSIM target), while the sender spends
      time diffusing.
    * One lossless codec on the diffused volume (``--codec NAME``, the paper's setting): the
      paper's 15 iterations, which raise that codec's compression ratio by 7-152 % at a
      whole-volume SSIM of 0.996 or more (the ROI bit-exact) where the noise is of the order
      of K (not on a 60 HU low-dose phantom).
    """
    if encode.codec == LAYERED:
        return replace(DiffusionSettings(), iterations=0)
    return DiffusionSettings()


def prepare_study(volume: Volume, provider: ProbabilityProvider,
                  steering: SteeringSettings = SteeringSettings(),
                  diffusion: DiffusionSettings = DiffusionSettings(),
                  device: str | None = None, study_id: str | None = None,
                  roi_check=None, sha256: str | None = None) -> PreparedStudy:
    """Compute the ROI and the diffused volume.

    ``roi_check(probability, volume)`` returns the probability map to use: the provider's, or a
    safe replacement when an automatic segmentation looks implausible. A provider whose map
    comes with its in-plane dilation done already (``in_plane``, a live series' slices as they
    arrived) saves :func:`~sender.roi.steering.steer` that step. ``sha256``: of the voxels,
    when known.
    """
    started = time.perf_counter()
    raw = provider.probability(volume)
    probability = roi_check(raw, volume) if roi_check is not None else raw
    steering = steering.for_provider(provider)
    in_plane = provider.in_plane(steering) if probability is raw and hasattr(
        provider, "in_plane") else None
    steering_map = steer(probability, volume.spacing, steering, in_plane=in_plane,
                         need_probability=diffusion.iterations > 0)
    log.info("ROI (%s): %.1f %% of voxels in %.1f s", provider.name,
             100 * steering_map.roi_fraction, time.perf_counter() - started)
    # Diffusion runs block by block as the encoder reaches each block (pipelined with the
    # network); p == 1 voxels are copied from the original, whatever the float arithmetic did.
    diffused = LazyDiffusion(volume.data, steering_map.probability, steering_map.roi, diffusion,
                             device=device)
    provenance = {
        **input_provenance(volume),
        "roi": {**provider.describe(), **asdict(steering),
                "fraction": round(steering_map.roi_fraction, 6),
                **({"check": roi_check.decision}
                   if getattr(roi_check, "decision", None) is not None else {})},
        "diffusion": asdict(diffusion),
    }
    digest = sha256 or voxel_sha256(volume.data)
    return PreparedStudy(volume=volume, roi=steering_map.roi, diffused=diffused,
                         study_id=study_id or default_study_id(volume, digest),
                         provenance=provenance, sha256=digest)


def input_provenance(volume: Volume) -> dict:
    """The provenance of the input: its description, and the slices the sender filled in."""
    return {"input": volume.description,
            **({"inserted_slices": volume.extra["inserted_slices"]}
               if volume.extra.get("inserted_slices") else {})}


def build_encoder(source: str | Path, roi: RoiChoice = RoiChoice(),
                  steering: SteeringSettings = SteeringSettings(),
                  diffusion: DiffusionSettings | None = None,
                  encode: EncodeSettings = EncodeSettings(), device: str | None = None,
                  study_id: str | None = None, dicom: DicomOptions = DicomOptions(),
                  deidentifier=None) -> StudyEncoder:
    """Load ``source`` (a path, or :data:`PHANTOM`), segment, diffuse: a ready StudyEncoder.

    ``diffusion`` None: :func:`default_diffusion` of the coding mode. ``dicom`` holds the
    choices for a DICOM folder (series, gaps, unreadable files); the series' attributes go into
    the header (:mod:`sender.dicom_attributes`), through ``deidentifier`` (``--deidentify``)
    when given.
    """
    if diffusion is None:
        diffusion = default_diffusion(encode)
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
    attributes = volume.extra.get("dicom", {})
    if deidentifier is not None and attributes:
        attributes = deidentifier.attributes(attributes)
        number = attributes.get("SeriesNumber")
        # The folder's name may be the patient's: the stream says only what the series is.
        volume.description = f"DICOM series {number if number is not None else ''}".strip()
    provider = make_provider(roi, device, phantom_mask)
    automatic = provider.name == "unet"
    prepared = prepare_study(volume, provider, steering, diffusion, device=device,
                             study_id=study_id,
                             roi_check=safety_check(roi.allow_small) if automatic else None)
    prepared.dicom = attributes
    return StudyEncoder(prepared, encode)


class SeriesPipeline:
    """The chain for DICOM series of a live session, kept warm from one series to the next.

    Built once: the ROI provider (the U-Net loaded on its device and run once on a dummy volume,
    so that the first series does not pay for the framework's set-up) and the settings. Called
    with a complete series (:class:`sender.live.CompleteSeries`): assembles its instances into a
    volume (:func:`sender.dicom.series_from_datasets`: their pixel data was decoded as they
    arrived), skips it if the spool says this very series was delivered already, computes the
    ROI of the whole series and returns ``(StudyEncoder, DicomSeries, timings)``; diffusion and
    encoding happen later, block by block, as the stream is sent.

    Args:
        roi, steering, diffusion, encode, device: as for :func:`build_encoder`.
        deidentifier: a :class:`sender.dicom_attributes.Deidentifier` for ``--deidentify``.
        spool: the :class:`sender.spool.Spool` (deliveries already made), or None.
    """

    def __init__(self, roi: RoiChoice = RoiChoice(),
                 steering: SteeringSettings = SteeringSettings(),
                 diffusion: DiffusionSettings = DiffusionSettings(),
                 encode: EncodeSettings = EncodeSettings(), device: str | None = None,
                 deidentifier=None, spool=None):
        started = time.perf_counter()
        self.roi_choice, self.steering, self.diffusion, self.encode = roi, steering, diffusion, \
            encode
        self.device = device
        self.deidentifier = deidentifier
        self.spool = spool
        self.provider = make_provider(roi, device)
        self.automatic = self.provider.name == "unet"
        self.slices = SliceProbabilities(self.provider, steering) if self.automatic else None
        # The ROI of a series whose stream has started (see __call__), one series at a time.
        self._roi_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlad-roi")
        self._warm_up()
        log.info("live pipeline ready (%s ROI) in %.1f s", self.provider.name,
                 time.perf_counter() - started)

    def _warm_up(self) -> None:
        """One pass of the provider over a dummy volume: loads kernels, allocates buffers."""
        if not self.automatic:
            return
        affine = np.diag([-0.8, -0.8, 2.5, 1.0])
        dummy = Volume(np.full((2, 512, 512), -1000, np.int16), affine, (0.8, 0.8, 2.5))
        self.provider.probability(dummy)

    def observe(self, arrival) -> None:
        """An instance just arrived: its slice's liver probability can be computed now."""
        if self.slices is not None:
            self.slices.submit(arrival)

    def close(self) -> None:
        self._roi_thread.shutdown(wait=True, cancel_futures=True)
        if self.slices is not None:
            self.slices.close()

    def __call__(self, series) -> tuple[StudyEncoder | None, object, dict]:
        """``(encoder, DicomSeries, timings)`` of a complete series (encoder None: delivered
        already, ``timings["reason"]`` says when).

        Where the ROI may follow the stream's start (:func:`~sender.encoder.can_defer_roi`: the
        live default, layered ``--exact`` without diffusion), the encoder is returned as soon
        as the series is assembled, its ROI computed meanwhile in this pipeline's ROI thread
        (:meth:`roi`): the header and the first previews go on the wire while the U-Net's
        backlog, the plausibility check and the ROI steps finish. Otherwise the ROI is
        computed first and travels in the header.
        """
        assembled = self.assemble(series)
        if assembled.volume is None:
            return None, assembled.dicom_series, assembled.timings
        if can_defer_roi(self.encode, self.diffusion.iterations):
            study = PreparedStudy(volume=assembled.volume, roi=None, diffused=None,
                                  study_id=assembled.study_id,
                                  # The provider (models, device) names the stream: a
                                  # sender with another one makes another stream, whose ROI
                                  # frame a receiver never has to refuse as a second one.
                                  provenance={**input_provenance(assembled.volume),
                                              "roi_provider": self.provider.describe(),
                                              "diffusion": asdict(self.diffusion)},
                                  sha256=assembled.sha256, dicom=assembled.attributes)
            roi = self._roi_thread.submit(self.roi, assembled)
            return StudyEncoder(study, self.encode, roi=roi), assembled.dicom_series, \
                assembled.timings
        return StudyEncoder(self.roi(assembled), self.encode), assembled.dicom_series, \
            assembled.timings

    def assemble(self, series) -> AssembledSeries:
        """The series' instances (decoded on arrival) as a volume, its SHA-256, attributes and
        study id; ``volume`` None when the spool says these instances were delivered."""
        from sender.dicom import series_from_datasets
        from sender.dicom_attributes import stream_attributes

        timings: dict = {}
        started = time.perf_counter()
        datasets = [arrival.dataset if arrival.dataset is not None else _read_instance(arrival.path)
                    for arrival in series.arrivals]
        # Decoded on arrival (the node or the watcher): pydicom keeps the array with the
        # dataset, handed over here so that nothing is decoded twice.
        decoded = [arrival.dataset.pixel_array if arrival.dataset is not None else None
                   for arrival in series.arrivals]
        dicom_series = series_from_datasets(datasets, series_uid=series.series_uid,
                                            names=[a.sop_uid for a in series.arrivals],
                                            decoded=decoded)
        volume = dicom_series.volume
        digest = voxel_sha256(volume.data)
        timings["assemble"] = round(time.perf_counter() - started, 3)
        instances = {a.sop_uid for a in series.arrivals}
        delivered = self.spool.delivered_as(series.study_uid, series.series_uid) \
            if self.spool is not None else None
        if delivered is not None and delivered.get("sha256") == digest and \
                instances <= set(delivered.get("instances", [])):
            if self.slices is not None:
                self.slices.forget(series.series_uid)
            timings["reason"] = (f"the same {len(instances)} instances were delivered at "
                                 f"{delivered.get('at')} (receiver folder "
                                 f"{delivered.get('receiver_folder')})")
            log.info("series %s: %s; not sent again", series.series_uid, timings["reason"])
            return AssembledSeries(series, dicom_series, None, digest, "", {}, timings)
        attributes = stream_attributes(dicom_series, self.deidentifier)
        number = attributes.get("SeriesNumber")
        # The description is part of the stream (provenance): identifying nothing, and the
        # same however the series came (network or folder), so a series resent matches.
        volume.description = f"DICOM series {number if number is not None else ''}".strip()
        study_id = f"series{number if number is not None else ''}-{digest[:12]}"
        return AssembledSeries(series, dicom_series, volume, digest, study_id, attributes,
                               timings)

    def roi(self, assembled: AssembledSeries) -> PreparedStudy:
        """The ROI of an assembled series (U-Net: the slices done as they arrived and the
        rest, plausibility check, ROI steps across slices) and its lazy diffusion."""
        started = time.perf_counter()
        timings = assembled.timings
        provider = self.provider
        if self.slices is not None:
            provider = self.slices.provider_for(assembled.series.series_uid,
                                                assembled.dicom_series)
            timings["unet_slices_ready"] = provider.ready
            timings["anatomy_slices_ready"] = len(provider.anatomy)
            timings["unet_rest"] = round(time.perf_counter() - started, 3)
        roi_check = None
        if self.automatic:
            check = safety_check(self.roi_choice.allow_small, getattr(provider, "anatomy", None))

            def roi_check(probability, volume):
                checked = time.perf_counter()
                try:
                    return check(probability, volume)
                finally:
                    timings["plausibility"] = round(time.perf_counter() - checked, 3)
                    roi_check.decision = check.decision  # for the ROI's provenance

        prepared = prepare_study(assembled.volume, provider, self.steering, self.diffusion,
                                 device=self.device, study_id=assembled.study_id,
                                 roi_check=roi_check, sha256=assembled.sha256)
        prepared.dicom = assembled.attributes
        timings["roi"] = round(time.perf_counter() - started, 3)
        completed = getattr(assembled.series, "completed_at", None)
        if completed is not None:  # since the series was complete (monotonic clock)
            timings["roi_ready"] = round(time.monotonic() - completed, 3)
        return prepared


@dataclass
class AssembledSeries:
    """A complete live series made a volume (:meth:`SeriesPipeline.assemble`), before its ROI."""

    series: object
    """The :class:`~sender.series.CompleteSeries`."""
    dicom_series: object
    """The :class:`~sender.dicom.DicomSeries` of its instances."""
    volume: Volume | None
    """The volume (None: delivered already, not to be sent again)."""
    sha256: str
    """SHA-256 of the voxels."""
    study_id: str
    """The stream's study id."""
    attributes: dict
    """The stream's DICOM attributes (de-identified with ``--deidentify``)."""
    timings: dict
    """Stage -> seconds (``assemble``; ``roi``, ``roi_ready``... added by :meth:`roi`)."""


def _read_instance(path):
    import pydicom

    return pydicom.dcmread(path)


#: Slices per forward pass of a worker that runs the U-Net on a live series' slices as they
#: arrive. With one intra-op thread a batch of 4 or 8 costs the same per slice as a batch of 2
#: (0.111 against 0.116 CPU s on this machine), and a small batch is what the series'
#: completion may have to wait for.
ARRIVAL_BATCH = 2


def arrival_workers(device: str, cores: int) -> int:
    """Worker threads that run the U-Net while a series arrives, each with one torch thread:
    one per core on CPU (``cores``: torch's default thread count), one on CUDA.

    Independent single-threaded workers instead of one worker with all cores: measured on this
    2-core machine (docs/BENCHMARKS.md, "Where the seconds go"), a slice took 0.064-0.085 s per
    network on one thread but 0.12-0.31 s on two while another process kept a core busy (every
    parallel region waits for its share on the busy core), and a live sender always has other
    work then: the DICOM node receives, decodes and spools the next slices. On a quiet machine
    two single-threaded workers also do more than one with two threads (0.111 against 0.124
    CPU s per slice).

    >>> arrival_workers("cpu", 2), arrival_workers("cuda:0", 16)
    (2, 1)
    """
    return 1 if str(device).startswith("cuda") else max(1, int(cores))


class SliceProbabilities:
    """The U-Net's liver probability of each slice of a live series, computed as it arrives.

    The network is 2D: a slice's map depends on that slice alone (and on the in-plane
    orientation and pixel size, which every slice of a series shares). So while the scanner is
    still pushing a series, worker threads (:func:`arrival_workers`, one torch thread each)
    run the U-Net on the slices already there, in small batches (:data:`ARRIVAL_BATCH`), and
    when the series is complete the workers finish the slices still queued and only those
    they could not do remain: the ROI of a 300-slice series is ready seconds after its last
    image instead of after a whole-volume pass. Only axial stacks are done this way (their
    slice axis stays the slice axis in the network's orientation, :mod:`models.preprocessing`);
    other series are done whole at the end.

    The map of a slice does not depend on the slices batched with it nor on the threads that
    compute it, bit for bit: on CPU every slice passes through the networks alone, on one torch
    thread (:mod:`models.inference`), in the workers as in a whole-volume pass. The first
    step of the ROI post-processing, the in-plane disc dilation, is per slice too
    (:func:`~sender.roi.steering.in_plane_dilation`), and done here as well: when the series is
    complete only the steps across slices remain (margin, threshold, holes). With an
    uncertainty margin (the U-Net's default), which joins regions across slices before the
    dilation, only the maps are done as slices arrive. So is the per-slice anatomy the
    plausibility check measures (:func:`sender.roi.plausibility.anatomy_of_slice`: body
    outline, bone rings, fat, lungs) of every slice with predicted liver: at completion only
    the check's aggregation over the series remains.
    """

    def __init__(self, provider, steering: SteeringSettings = SteeringSettings()):
        import queue
        import threading
        from collections import Counter

        import torch

        self.unet = provider
        self.steering = steering.for_provider(provider)
        self._dilate = not self.steering.uncertain_threshold
        self.batch_size = provider.batch_size
        self.workers = arrival_workers(getattr(provider.device, "type", "cpu"),
                                       torch.get_num_threads())
        self._queue: queue.Queue = queue.Queue()
        self._done: dict[str, dict[str, tuple]] = {}
        """Per series, per SOPInstanceUID: the slice's probability, its in-plane dilation and
        its anatomy (None where not computed)."""
        self._geometry: dict[str, tuple] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queued: dict[str, set[str]] = {}
        """Per series: SOPInstanceUIDs submitted and not yet taken by a worker."""
        self._in_flight: Counter = Counter()
        """Per series: batches the workers are computing right now."""
        self._taken: set[str] = set()
        """Series already complete: slices of theirs still queued are not worth computing."""
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"dlad-unet-slices-{n}",
                                          daemon=True) for n in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, arrival) -> None:
        if arrival.dataset is not None and not self._closed:
            with self._lock:
                if arrival.series_uid in self._taken:
                    return
                self._queued.setdefault(arrival.series_uid, set()).add(arrival.sop_uid)
            self._queue.put(arrival)

    def close(self) -> None:
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)

    def forget(self, series_uid: str) -> None:
        with self._lock:
            self._done.pop(series_uid, None)
            self._geometry.pop(series_uid, None)
            self._queued.pop(series_uid, None)
            self._taken.add(series_uid)

    @staticmethod
    def _slice(dataset) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]] | None:
        """HU, the slice's affine and spacing, or None where it cannot be done alone."""
        from sender.dicom import affine_from_dicom

        try:
            cosines = np.array([float(v) for v in dataset.ImageOrientationPatient])
            dy, dx = (float(v) for v in dataset.PixelSpacing)
            position = np.array([float(v) for v in dataset.ImagePositionPatient])
            slope = float(dataset.get("RescaleSlope", 1) or 1)
            intercept = float(dataset.get("RescaleIntercept", 0) or 0)
            stored = dataset.pixel_array
        except Exception:  # the series' own checks will say what is wrong
            return None
        row, column = cosines[:3], cosines[3:]
        normal = np.cross(row, column)
        affine = affine_from_dicom(row, column, (dy, dx), position, normal)
        hu = np.rint(stored.astype(np.float64) * slope + intercept)
        if hu.ndim != 2 or hu.min() < -32768 or hu.max() > 32767:
            return None
        return hu.astype(np.int16), affine, (dx, dy, 1.0)

    @staticmethod
    def _axial(affine: np.ndarray) -> bool:
        import nibabel as nib

        return int(nib.orientations.io_orientation(affine)[2, 0]) == 2

    def _work(self) -> None:
        import queue

        import torch

        # Per thread (OpenMP): the process's other threads keep its default.
        torch.set_num_threads(1)
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < ARRIVAL_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            groups: dict[str, list] = {}
            for arrival in batch:
                groups.setdefault(arrival.series_uid, []).append(arrival)
            for series_uid, arrivals in groups.items():
                with self._lock:
                    queued = self._queued.get(series_uid, set())
                    queued.difference_update(a.sop_uid for a in arrivals)
                    if series_uid in self._taken:
                        self._idle.notify_all()
                        continue  # forgotten: its map is not needed
                    self._in_flight[series_uid] += 1
                try:
                    self._compute(series_uid, arrivals)
                finally:
                    with self._lock:
                        self._in_flight[series_uid] -= 1
                        if self._in_flight[series_uid] <= 0:
                            del self._in_flight[series_uid]
                        self._idle.notify_all()

    def _compute(self, series_uid: str, arrivals) -> None:
        """The U-Net (and what else is per slice) on some arriving slices of one series."""
        from models.inference import predict_probability
        from sender.roi.plausibility import LIVER_THRESHOLD, anatomy_of_slice

        slices = [(a.sop_uid, self._slice(a.dataset)) for a in arrivals]
        slices = [(uid, s) for uid, s in slices if s is not None]
        if not slices:
            return
        affine, spacing = slices[0][1][1], slices[0][1][2]
        if not self._axial(affine):
            return
        hu = np.stack([s[0] for _, s in slices])
        try:
            probability = predict_probability(self.unet.models, hu, affine, spacing,
                                              batch_size=self.batch_size,
                                              flips=self.unet.flips)
            dilated = in_plane_dilation(probability, spacing, self.steering) \
                if self._dilate else [None] * len(probability)
            # Only slices with predicted liver are measured by the check.
            anatomy = [anatomy_of_slice(section, affine, spacing)
                       if (p > LIVER_THRESHOLD).any() else None
                       for section, p in zip(hu, probability)]
        except Exception:  # computed again, whole, when the series completes
            log.debug("U-Net on arriving slices failed", exc_info=True)
            return
        with self._lock:
            done = self._done.setdefault(series_uid, {})
            self._geometry[series_uid] = (affine, spacing)
            for (uid, _), p, q, a in zip(slices, probability, dilated, anatomy):
                done[uid] = (p, q, a)

    def provider_for(self, series_uid: str, dicom_series) -> _PrecomputedUNet:
        """The U-Net's map of a complete series: the slices done as they arrived or still
        queued (the workers finish them), the others now (in slice order, whole-volume
        geometry)."""
        import nibabel as nib

        from models.inference import predict_probability

        volume = dicom_series.volume
        with self._lock:
            while self._queued.get(series_uid) or self._in_flight.get(series_uid):
                self._idle.wait()
            self._queued.pop(series_uid, None)
            done = self._done.pop(series_uid, None) or {}
            affine, spacing = self._geometry.pop(series_uid, (None, None))
            self._taken.add(series_uid)
        if affine is not None and (not np.array_equal(
                nib.orientations.io_orientation(affine)[:2],
                nib.orientations.io_orientation(volume.affine)[:2])
                or self.steering.radii_px(spacing) != self.steering.radii_px(volume.spacing)):
            done = {}  # another in-plane orientation or pixel size: do it whole
        probability = np.empty(volume.shape, dtype=np.float32)
        in_plane = np.empty(volume.shape, dtype=np.float32) if self._dilate else None
        anatomy = {}
        missing = []
        for k, name in enumerate(dicom_series.sources):
            if name in done:
                probability[k] = done[name][0]
                if in_plane is not None:
                    in_plane[k] = done[name][1]
                if done[name][2] is not None:
                    anatomy[k] = done[name][2]
            else:
                missing.append(k)
        if missing:
            probability[missing] = predict_probability(
                self.unet.models, volume.data[missing], volume.affine, volume.spacing,
                batch_size=self.batch_size, flips=self.unet.flips)
            if in_plane is not None:
                in_plane[missing] = in_plane_dilation(probability[missing], volume.spacing,
                                                      self.steering)
        return _PrecomputedUNet(self.unet, probability, ready=len(volume.data) - len(missing),
                                in_plane=in_plane,
                                radii=self.steering.radii_px(volume.spacing),
                                spacing=volume.spacing, anatomy=anatomy)


class _PrecomputedUNet(ProbabilityProvider):
    """The U-Net provider with its map already computed (same name, margin and description),
    and the map's in-plane dilation for the radii it was made with."""

    def __init__(self, unet, probability: np.ndarray, ready: int, in_plane: np.ndarray,
                 radii: tuple[float, float], spacing, anatomy: dict | None = None):
        self.unet, self._probability, self.ready = unet, probability, ready
        self._in_plane, self._radii, self._spacing = in_plane, radii, spacing
        self.anatomy = anatomy or {}
        """``{slice index: SliceAnatomy}`` of the slices measured as they arrived (for the
        plausibility check, :func:`sender.roi.plausibility.find`)."""
        self.name = unet.name
        self.z_margin_mm = unet.z_margin_mm
        self.uncertain_threshold = unet.uncertain_threshold

    def in_plane(self, steering: SteeringSettings) -> np.ndarray | None:
        """The in-plane dilation for ``steering`` (None if it asks for other radii, or for an
        uncertainty margin, which comes before the dilation)."""
        if self._in_plane is None or steering.radii_px(self._spacing) != self._radii \
                or steering.uncertain_threshold:
            return None
        in_plane, self._in_plane = self._in_plane, None  # handed over once: steer() owns it
        return in_plane

    def probability(self, volume: Volume) -> np.ndarray:
        if self._probability.shape != volume.shape:
            raise ValueError("precomputed probability of another shape")
        return self._probability

    def describe(self) -> dict:
        return self.unet.describe()
