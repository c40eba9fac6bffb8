"""Turns a prepared study (original, ROI, diffused volume) into wire frames, lazily.

Modes (``EncodeSettings.codec``):

* ``"layered"`` (default): layer 0 = lossy HEVC of the diffused volume; layer 1 = lossless
  residual inside the ROI, after which every ROI voxel equals the original; layer 2 (``exact``)
  = the voxels outside the ROI, lossless, after which the whole volume is bit-exact. Residual
  chunks are coded with each of ``residual_codecs`` and sent with the smallest.
  With ``exact`` every base is a cheap preview (``preview_crf``, no quality guard: the exact
  layer replaces it), and the ROI layer and layer 2 carry the original voxels themselves
  (``params["reference"] = "none"``) where they code smaller than their residual against the
  preview (measured on one block of each kind), so the exact stream pays for the volume's
  noise once, not in a base and again in its residual. Without ``exact`` the ROI layer is
  original voxels only where that is smaller than the bases it needs plus its residual.
* any lossless codec name (``jpegxl``, ``jpegls``, ``hevc-lossless``...): layer 0 = that codec on
  the diffused volume (the ROI is already exact: diffusion leaves it untouched); with ``exact``,
  layer 2 = the outside-ROI residual against it, with the same codec.

Frames are produced one chunk at a time in the scheduler's order (:mod:`sender.scheduler`), so
the first chunks can leave before the rest of the volume is encoded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import msgpack
import numpy as np

from sender.quality import block_ssim
from sender.scheduler import PREVIEW_SHARE, PlannedChunk, auto_group, plan_chunks
from shared.codecs import CodecError, codec_names, get_codec
from shared.layers import block_digest, clip_base, residual, roi_digest
from shared.volume import Volume, representation_problem
from shared.wire import (
    REGION_OF_LAYER,
    DataChunk,
    RoiFrame,
    StreamEnd,
    StreamHeader,
    voxel_sha256,
)

LAYERED = "layered"
#: What the ROI layer may be (EncodeSettings.roi_layer).
ROI_LAYER_CHOICES = ("auto", "residual", "voxels")
#: Share of the quick JPEG-LS estimate of the ROI's bytes taken as its size when previews go
#: before the ROI layer is chosen: JPEG-LS codes CT 4-7 % larger than JPEG XL (bench_peers)
#: and a residual is chosen only where it is smaller still, so the previews stay within
#: PREVIEW_SHARE of what the ROI will cost.
QUICK_ESTIMATE_SHARE = 0.9
#: CRF/QP decrement of the base quality guard per retry.
GUARD_STEP = 4
log = logging.getLogger("dlad.sender")


@dataclass(frozen=True)
class EncodeSettings:
    """How a study is coded."""

    codec: str = LAYERED
    """``"layered"`` or the name of a lossless codec applied to the diffused volume."""
    exact: bool = False
    """Also send layer 2, so the whole volume arrives bit-exact."""
    crf: float | None = 18.0
    """x265 constant rate factor of the lossy base (layered mode); ``None`` when ``qp`` is set."""
    qp: int | None = None
    """x265 fixed quantiser of the lossy base, instead of a CRF."""
    preset: str = "faster"
    """x265 speed preset of the base (slower presets gain < 0.5 % here: the ROI residual
    dominates the stream)."""
    residual_codecs: tuple[str, ...] = ("jpegxl", "jpegls")
    """Lossless codecs of the residual layers in layered mode: every chunk is coded with each
    and the smallest payload is sent (the header lists them all)."""
    group_slices: int | None = None
    """Slices per chunk (HEVC predicts between the slices of a chunk); ``None``: about 2^22
    voxels a chunk, 4 to 32 slices (:func:`sender.scheduler.auto_group`)."""
    preview_crf: float = 30.0
    """x265 CRF of the bases with ``exact``: there a base is only a preview (the lossless
    layers replace it), so a cheap one lets the whole volume be viewable early and costs the
    exact stream little (layered mode)."""
    roi_layer: str = "auto"
    """The ROI layer (layered mode): ``"residual"`` against the base, ``"voxels"`` (the ROI's
    original voxels, needing no base), or ``"auto"``: whichever codes the ROI's bytes smaller,
    measured on the block with the most ROI voxels (:meth:`StudyEncoder._choose_roi_reference`)."""
    min_ssim: float | None = 0.99
    """Quality guard of the lossy base: every block's SSIM (L = 4095) after layers 0+1 must
    reach this, else it is re-coded at a lower CRF/QP, and at last without diffusion. Not with
    ``exact``: there layers 0+1 are a stage on the way to the exact volume, and a finer base
    costs bytes before the ROI without making the whole smaller (docs/BENCHMARKS.md)."""

    def __post_init__(self):
        lossless = [n for n in codec_names() if get_codec(n).lossless]
        if self.codec != LAYERED and self.codec not in lossless:
            raise ValueError(f"codec must be 'layered' or a lossless codec "
                             f"({', '.join(lossless)}), got {self.codec!r}")
        if (not self.residual_codecs or len(set(self.residual_codecs)) != len(self.residual_codecs)
                or not set(self.residual_codecs) <= set(lossless)):
            raise ValueError(f"residual codecs must be distinct lossless codecs "
                             f"({', '.join(lossless)}), got {', '.join(self.residual_codecs)!r}")
        if self.group_slices is not None and not 1 <= self.group_slices <= 256:
            raise ValueError(f"slices per chunk must be in [1, 256], got {self.group_slices}")
        if not 0 <= self.preview_crf <= 51:
            raise ValueError(f"preview CRF must be in [0, 51], got {self.preview_crf}")
        if self.roi_layer not in ROI_LAYER_CHOICES:
            raise ValueError(f"ROI layer must be one of {', '.join(ROI_LAYER_CHOICES)}, got "
                             f"{self.roi_layer!r}")
        if self.codec == LAYERED:
            self.base_codec()  # validates the rate settings
        if self.min_ssim is not None and not 0 < self.min_ssim < 1:
            raise ValueError(f"minimum SSIM must be in (0, 1), got {self.min_ssim}")

    def base_codec(self, rate: float | None = None, preview: bool = False):
        """The lossy HEVC base codec, at the configured rate or at ``rate`` (CRF or QP); with
        ``preview``, at :attr:`preview_crf`."""
        if preview:
            return get_codec("hevc", crf=self.preview_crf, preset=self.preset)
        if self.qp is None:
            return get_codec("hevc", crf=self.crf if rate is None else rate, preset=self.preset)
        return get_codec("hevc", qp=self.qp if rate is None else int(rate), preset=self.preset)

    @property
    def layers(self) -> tuple[int, ...]:
        if self.codec == LAYERED:
            return (0, 1, 2) if self.exact else (0, 1)
        return (0, 2) if self.exact else (0,)

    def codecs_of_layer(self, layer: int) -> list:
        """The codecs a layer's chunks are tried with, in the header's order."""
        if self.codec != LAYERED:
            return [get_codec(self.codec)]
        if layer == 0:
            return [self.base_codec()]
        return [get_codec(name) for name in self.residual_codecs]


@dataclass
class PreparedStudy:
    """The sender's inputs to encoding: original, ROI and diffused voxels."""

    volume: Volume
    """The original volume."""
    roi: np.ndarray | None
    """bool, voxels that must arrive bit-exact after layers 0+1 (None: still being computed,
    see :class:`StudyEncoder`'s ``roi``)."""
    diffused: np.ndarray | None
    """int16, the diffused volume (equal to the original inside the ROI); or a
    :class:`~sender.diffusion.LazyDiffusion` that computes each block when it is encoded (None
    with the ROI)."""
    study_id: str
    """Id written into every chunk."""
    provenance: dict = field(default_factory=dict)
    """Provider, diffusion settings and input description for the header."""
    sha256: str = ""
    """SHA-256 of the original voxels, when already known (else the encoder computes it)."""
    dicom: dict = field(default_factory=dict)
    """DICOM attributes of the source series for the header (:mod:`sender.dicom_attributes`)."""


def coded_size(payload: bytes, params: dict) -> int:
    """Bytes a chunk's payload and decode parameters take on the wire (msgpack)."""
    return len(payload) + len(msgpack.packb(params, use_bin_type=True))


def smallest(codecs: list, block: np.ndarray) -> tuple[object, bytes, dict]:
    """``(codec, payload, params)`` of the codec that codes ``block`` in the fewest bytes.

    Every payload is decoded as the receiver will decode it (with its strict header checks)
    and must give ``block`` back exactly: libjxl, for one, may start a lossless codestream with
    a reference-only frame (patches) that the receiver refuses, and a chunk the receiver cannot
    decode would leave ROI voxels inexact. A codec that cannot code the block, or whose payload
    fails this check, is skipped; if none is left, the last error is raised.
    """
    best, failure = None, None
    for codec in codecs:
        try:
            payload, params = codec.encode(block)
            if not np.array_equal(codec.decode(payload, block.shape, dict(params)), block):
                raise CodecError(f"{codec.name}: its payload does not decode to the block")
        except CodecError as error:
            failure = error
            continue
        if best is None or coded_size(payload, params) < coded_size(best[1], best[2]):
            best = (codec, payload, params)
    if best is None:
        raise failure
    return best


def fill_region(voxels: np.ndarray, unknown: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """``voxels`` with the ``unknown`` ones set to one constant, the median of the ROI's voxels
    (the liver's), so that a lossless coder spends little on them and on their edge (measured
    against the median of the other voxels and against the base's voxels: docs/BENCHMARKS.md)."""
    if not unknown.any():
        return voxels
    fill = np.int16(np.median(voxels[roi])) if roi.any() else np.int16(0)
    return np.where(unknown, fill, voxels)


class RoiFailed(RuntimeError):
    """The ROI of a study whose stream had started (its ROI pending) could not be computed."""


def can_defer_roi(settings: EncodeSettings, diffusion_iterations: int) -> bool:
    """Whether a stream may start before its ROI is known (header with a pending ROI, then
    previews, then the ROI frame: shared/wire.py): only where no base depends on the ROI, i.e.
    layered ``exact`` mode, whose bases are previews of the original voxels, without
    diffusion (which the ROI steers). Elsewhere the ROI stays in the header."""
    return settings.codec == LAYERED and settings.exact and diffusion_iterations == 0


class StudyEncoder:
    """Builds the header and encodes chunks on demand.

    With ``roi`` (a future of the :class:`PreparedStudy` with its ROI, computed in another
    thread; ``study`` has ``roi`` and ``diffused`` None), the header announces the ROI as
    pending and plans layer 0 alone (its blocks in slice order): :meth:`chunks` yields the
    previews as long as the ROI is not ready, then the :class:`~shared.wire.RoiFrame` (mask,
    digests, the plan of layers 1 and 2), then the rest in the usual order. Only where
    :func:`can_defer_roi`.

    Example:
        >>> encoder = StudyEncoder(prepared, EncodeSettings(exact=True))   # doctest: +SKIP
        >>> with open("study.dlad", "wb") as out:                          # doctest: +SKIP
        ...     for frame in encoder.frames():
        ...         out.write(frame)
    """

    def __init__(self, study: PreparedStudy, settings: EncodeSettings = EncodeSettings(),
                 roi: Future | None = None):
        original = study.volume.data
        self._roi_future = roi
        self._roi_lock = threading.Lock()
        self.roi_frame: RoiFrame | None = None
        """The ROI frame, once the ROI is attached (a stream whose ROI was pending)."""
        if roi is not None:
            if not can_defer_roi(settings, 0) or study.roi is not None:
                raise ValueError("a pending ROI needs layered --exact coding (previews that do "
                                 "not depend on it) and a study without its ROI yet")
        elif study.diffused.shape != study.volume.shape or study.roi.shape != study.volume.shape:
            raise ValueError("diffused volume and ROI must have the volume's shape")
        # A diffused volume given whole is checked now; a lazy one (LazyDiffusion) block by
        # block, as its blocks are computed (_diffused).
        elif isinstance(study.diffused, np.ndarray) and not np.array_equal(
                study.diffused[study.roi], original[study.roi]):
            raise ValueError("the diffused volume differs from the original inside the ROI")
        self._checked: set[tuple[int, int]] = set()
        self.study = study
        self.settings = settings
        self.value_range = (int(original.min()), int(original.max()))
        self.group = settings.group_slices or auto_group(study.volume.shape)
        if roi is None:
            self.plan: list[PlannedChunk] = plan_chunks(study.roi, self.group, settings.layers)
            self._roi_voxels = {(c.z0, c.z1): int(study.roi[c.z0:c.z1].sum()) for c in self.plan}
        else:  # the bases alone, in slice order, until the ROI is known (_attach_roi)
            self.plan = plan_chunks(np.zeros((study.volume.shape[0], 1, 1), bool), self.group,
                                    (0,))
            self._roi_voxels = {}
        #: The ROI layer as residuals ("base") or original voxels ("none"): see
        #: :meth:`_choose_roi_reference`.
        self._roi_reference: str | None = None
        #: Layer 2 of ROI blocks and of plain blocks ("roi", "plain"): "none" (the original
        #: voxels) or "base" (a residual), whichever the first block of the kind coded smaller.
        self._rest_reference: dict[str, str] = {}
        self._codecs = {layer: settings.codecs_of_layer(layer) for layer in settings.layers}
        self._base = np.zeros_like(original)
        self._base_ready: dict[tuple[int, int], tuple[bytes, dict]] = {}
        """Blocks whose base is encoded: their payload and parameters (the decoded base is in
        ``_base``)."""
        # Chunks of different blocks may be encoded at once in several threads (the sender
        # encodes bases ahead, see sender.transport.EncoderSource); a block's own steps (its
        # base, then residuals against it) take its lock.
        self._block_locks = {(chunk.z0, chunk.z1): threading.Lock() for chunk in self.plan}
        source_dtype, rescale = self._output_representation()
        self.header = StreamHeader(
            study_id=study.study_id, shape=study.volume.shape, affine=study.volume.affine,
            spacing=study.volume.spacing, source_dtype=source_dtype, rescale=rescale,
            value_range=self.value_range, sha256=study.sha256 or voxel_sha256(original),
            roi=study.roi, roi_digests=None if roi is not None else self._roi_digests(),
            roi_pending=roi is not None,
            layers={layer: {"codec": codecs[0].name, "codecs": [c.name for c in codecs],
                            "lossless": all(c.lossless for c in codecs),
                            "region": REGION_OF_LAYER[layer]}
                    for layer, codecs in self._codecs.items()},
            plan=[chunk.as_entry() for chunk in self.plan],
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            provenance={**study.provenance, "mode": settings.codec, "exact": settings.exact,
                        "group_slices": self.group,
                        **({"base_crf": settings.crf, "base_qp": settings.qp,
                            "preset": settings.preset,
                            **({"preview_crf": settings.preview_crf} if self._previews else {})}
                           if settings.codec == LAYERED else {})},
            dicom=study.dicom)

    @property
    def roi_known(self) -> bool:
        """Whether the ROI is known (always, unless it was pending and is not attached yet)."""
        return self.study.roi is not None

    def wait_for_roi(self) -> None:
        """Attach the pending ROI once it is computed (at once if it is): the full plan (the
        bases keep their seqs, layers 1 and 2 follow), the digests and the ROI frame.

        Raises:
            RoiFailed: the ROI could not be computed (the cause attached).
        """
        with self._roi_lock:
            if self.roi_known:
                return
            try:
                prepared = self._roi_future.result()
            except Exception as error:
                raise RoiFailed(f"the ROI could not be computed: {error}") from error
            self._attach_roi(prepared)

    def _attach_roi(self, prepared: PreparedStudy) -> None:
        if prepared.volume is not self.study.volume or prepared.roi is None \
                or prepared.roi.shape != self.study.volume.shape:
            raise RoiFailed("the ROI computed is not of this study's volume")
        provenance = {key: value for key, value in prepared.provenance.items()
                      if key not in self.header.provenance}
        full = plan_chunks(prepared.roi, self.group, self.settings.layers)
        base_seq = {(c.z0, c.z1): c.seq for c in self.plan}
        later = [c for c in full if c.layer != 0]
        plan = [PlannedChunk(base_seq[(c.z0, c.z1)], 0, c.z0, c.z1) for c in full
                if c.layer == 0]
        plan += [PlannedChunk(len(base_seq) + index, c.layer, c.z0, c.z1)
                 for index, c in enumerate(later)]
        self._roi_voxels = {(c.z0, c.z1): int(prepared.roi[c.z0:c.z1].sum()) for c in plan}
        self.plan = plan
        study = replace(self.study, roi=prepared.roi, diffused=prepared.diffused,
                        provenance={**self.study.provenance, **provenance})
        self.roi_frame = RoiFrame.make(self.header, prepared.roi, self._roi_digests(study),
                                       [c.as_entry() for c in plan if c.layer != 0], provenance)
        self.study = study  # last: roi_known says true once everything else is in place

    def _output_representation(self) -> tuple[str, tuple[float, float]]:
        """The stored dtype and rescale for the header: the source's when they hold every HU of
        the volume's range exactly (lossy voxels take any of them), else int16 HU (slope 1,
        intercept 0), with a warning: the receiver refuses a header that cannot."""
        volume = self.study.volume
        rescale = (volume.rescale_slope, volume.rescale_intercept)
        problem = representation_problem(volume.source_dtype, *rescale, self.value_range)
        if problem is None:
            return volume.source_dtype, rescale
        log.warning("%s: the receiver will store int16 HU (slope 1, intercept 0)", problem)
        return "int16", (1.0, 0.0)

    def _roi_digests(self, study: PreparedStudy | None = None) -> list[tuple[int, int, bytes]]:
        """:func:`~shared.layers.roi_digest` of the original ROI voxels of every block that the
        ROI-exact layer (1, or a lossless 0) covers and that holds ROI voxels (of ``study``,
        by default the encoder's)."""
        layer = 1 if 1 in self.settings.layers else 0
        study = study or self.study
        original, roi = study.volume.data, study.roi
        blocks = sorted({(c.z0, c.z1) for c in self.plan if c.layer == layer})
        return [(z0, z1, roi_digest(original[z0:z1], roi[z0:z1], z0)) for z0, z1 in blocks
                if roi[z0:z1].any()]

    @property
    def _previews(self) -> bool:
        """Whether the bases are previews: lossy layered mode with the exact layer, which
        makes every block exact whatever its base. On the shared scans and the synthetic ones
        of scripts/bench_peers.py, previews at CRF 30 with the ROI and the rest as original
        voxels make the exact stream 1-5 % smaller than a CRF 18 base under residuals, and
        the ROI complete 6-49 % sooner (docs/BENCHMARKS.md)."""
        return self.settings.codec == LAYERED and self.settings.exact

    def frames(self, skip: frozenset[int] | set[int] = frozenset()) -> Iterator[bytes]:
        """Header frame, every planned chunk not in ``skip`` (by seq), then the end frame.

        The chunks go: the bases the ROI needs (those of blocks with ROI voxels when the ROI
        layer is residuals: :meth:`_choose_roi_reference`); the other bases, the plan's order
        (nearest the ROI first), while their bytes stay within
        :data:`~sender.scheduler.PREVIEW_SHARE` of the ROI's (the bases it needs plus the ROI
        layer, estimated from its first chunk: its bytes per ROI voxel for every ROI voxel
        to send); the ROI layer; the bases left; the exact layer. So the whole volume is
        viewable before the liver is exact wherever that costs the liver little. With
        ``exact`` the bases are previews, sent whatever the ROI layer: they go first, within
        the same share of a quick estimate of the ROI's bytes (:meth:`_quick_roi_bytes`),
        before the ROI layer is chosen.
        """
        header = self.header.to_frame()
        yield header
        sent, total = 0, len(header)
        for chunk in self.chunks(skip):
            data = chunk.to_frame()
            sent += isinstance(chunk, DataChunk)
            total += len(data)
            yield data
        yield StreamEnd(self.study.study_id, sent, total).to_frame()

    def chunks(self, skip: frozenset[int] | set[int] = frozenset()
               ) -> Iterator[DataChunk | RoiFrame]:
        """Every planned chunk not in ``skip``, encoded one at a time in the sending order of
        :meth:`frames` (which the transport sends too), and the ROI frame where the ROI was
        pending (in every pass: a receiver that has it already knows it again by its
        checksum)."""
        spent = 0  # bytes of bases sent before the ROI's own bytes were measured
        if not self.roi_known:
            # The ROI is being computed: the previews go meanwhile, in slice order, then the
            # ROI frame; a base needs no ROI, and the link would otherwise idle.
            early = set()
            for planned in [p for p in self.plan if p.seq not in skip]:
                if self._roi_future.done():
                    break
                chunk = self.encode_chunk(planned)
                spent += len(chunk.payload)
                early.add(planned.seq)
                yield chunk
            skip = set(skip) | early
            self.wait_for_roi()
        if self.roi_frame is not None:
            yield self.roi_frame
        pending = [planned for planned in self.plan if planned.seq not in skip]
        roi_layer = [p for p in pending if p.layer == 1]
        held: dict[int, DataChunk] = {}
        if roi_layer and self._roi_reference is None:
            if self._previews and any(p.layer == 0 for p in pending):
                # Previews are sent whatever the ROI layer: they go at once, as far as a quick
                # estimate of the ROI's bytes allows, instead of after the choice of the ROI
                # layer (four lossless codings of the probe block; about 1 s that a live
                # sender would otherwise keep the whole-volume view waiting). None left (all
                # sent while the ROI was computed): no estimate to make.
                budget = PREVIEW_SHARE * self._quick_roi_bytes(roi_layer) - spent
                for planned in [p for p in pending if p.layer == 0]:
                    chunk = self.encode_chunk(planned)
                    if len(chunk.payload) > budget:
                        held[planned.seq] = chunk
                        break
                    budget -= len(chunk.payload)
                    spent += len(chunk.payload)
                    pending.remove(planned)
                    yield chunk
            held.update(self._choose_roi_reference(roi_layer[0]))
        bases = [p for p in pending if p.layer == 0]
        # The bases the ROI needs (residuals are added to them) go first; the others are a
        # whole-volume view, sent first as far as the budget allows.
        needs_base = self._roi_reference == "base" or not roi_layer
        required = [p for p in bases if needs_base and self._roi_voxels[(p.z0, p.z1)]]
        optional = [p for p in bases if p not in required]
        roi_bytes = 0.0
        for planned in required:
            chunk = held.pop(planned.seq, None) or self.encode_chunk(planned)
            roi_bytes += len(chunk.payload)
            yield chunk
        if roi_layer:  # the first ROI chunk, encoded ahead to estimate the ROI's bytes
            first = held.get(roi_layer[0].seq) or self.encode_chunk(roi_layer[0])
            held[first.seq] = first
            rate = len(first.payload) / max(1, self._roi_voxels[(first.z0, first.z1)])
            roi_bytes += rate * sum(self._roi_voxels[(p.z0, p.z1)] for p in roi_layer)
        budget = PREVIEW_SHARE * roi_bytes - spent if (required or roi_layer) else float("inf")
        deferred: list[PlannedChunk] = []
        for planned in optional:
            if deferred:
                deferred.append(planned)
                continue
            chunk = held.pop(planned.seq, None) or self.encode_chunk(planned)
            if len(chunk.payload) <= budget:
                budget -= len(chunk.payload)
                yield chunk
            else:
                held[planned.seq] = chunk
                deferred.append(planned)
        for planned in roi_layer + deferred + [p for p in pending if p.layer == 2]:
            yield held.pop(planned.seq, None) or self.encode_chunk(planned)

    def _quick_roi_bytes(self, roi_layer: list[PlannedChunk]) -> float:
        """An estimate of the ROI layer's bytes, quick and on the low side: the first ROI block's
        original ROI voxels in JPEG-LS (a fast coder), per ROI voxel, for every ROI voxel of
        ``roi_layer``, times :data:`QUICK_ESTIMATE_SHARE`."""
        probe = roi_layer[0]
        rows, columns = self._roi_box(probe.z0, probe.z1)
        original = self.study.volume.data[probe.z0:probe.z1, rows, columns]
        roi = self.study.roi[probe.z0:probe.z1, rows, columns]
        payload, _ = get_codec("jpegls").encode(fill_region(original, ~roi, roi))
        rate = len(payload) / max(1, self._roi_voxels[(probe.z0, probe.z1)])
        return QUICK_ESTIMATE_SHARE * rate * sum(self._roi_voxels[(p.z0, p.z1)]
                                                 for p in roi_layer)

    def _choose_roi_reference(self, probe: PlannedChunk) -> dict[int, DataChunk]:
        """Code the ROI layer as residuals or as original voxels, by one measured block.

        As residuals, the ROI needs its blocks' bases before it; as original voxels (the ROI
        region of the original, the rest filled with a constant) it needs nothing else, but
        the voxels code larger than residuals against a good base. On the block with the most
        ROI voxels, both ways and the base are coded; scaled to the whole ROI (bases by the
        blocks' voxels, the ROI layer by the ROI's), original voxels are chosen when they
        bring the ROI's bytes below (1 - PREVIEW_SHARE - 2 %) of the residual way's: when
        they save more than the whole-volume view first may cost. With ``exact``, whose bases
        are previews that the stream sends anyway, the smaller way is chosen.

        Returns the chunks coded on the way, by seq, for the sender to send when their turn
        comes.
        """
        self._roi_reference = "base"
        if not self._roi_voxels_allowed() or self.settings.roi_layer == "residual":
            return {}
        if self.settings.roi_layer == "voxels":
            self._roi_reference = "none"
            return {}
        started = time.perf_counter()
        z0, z1 = probe.z0, probe.z1
        base_chunk = next(p for p in self.plan if p.layer == 0 and (p.z0, p.z1) == (z0, z1))
        base = self.encode_chunk(base_chunk)
        as_residual = self.encode_chunk(probe)
        as_voxels = self._roi_voxels_chunk(probe)
        roi_blocks = [(p.z0, p.z1) for p in self.plan if p.layer == 1]
        block_share = sum(b - a for a, b in roi_blocks) / (z1 - z0)
        roi_share = sum(self._roi_voxels[b] for b in roi_blocks) / self._roi_voxels[(z0, z1)]
        with_residuals = len(base.payload) * block_share + len(as_residual.payload) * roi_share
        with_voxels = len(as_voxels.payload) * roi_share
        chosen = as_residual
        margin = 1.0 if self.settings.exact else 1 - PREVIEW_SHARE - 0.02
        if with_voxels < margin * with_residuals:
            self._roi_reference, chosen = "none", as_voxels
        log.info("ROI layer as %s (probe slices %d-%d: residuals with bases %.0f bytes, "
                 "original voxels %.0f; %.2f s)", "original voxels"
                 if self._roi_reference == "none" else "residuals", z0, z1 - 1, with_residuals,
                 with_voxels, time.perf_counter() - started)
        return {base.seq: base, chosen.seq: chosen}

    def _roi_voxels_allowed(self) -> bool:
        """Whether the ROI layer may be original voxels: layered mode (a lossless base makes
        the ROI exact by itself)."""
        return self.settings.codec == LAYERED

    def _roi_box(self, z0: int, z1: int) -> tuple[slice, slice]:
        """Rows and columns of the bounding box of the ROI of slices ``[z0, z1)``: the ROI
        layer codes only that (zeros cost little to code, but as much as any voxel to
        decode)."""
        rows = np.flatnonzero(self.study.roi[z0:z1].any(axis=(0, 2)))
        columns = np.flatnonzero(self.study.roi[z0:z1].any(axis=(0, 1)))
        return (slice(int(rows[0]), int(rows[-1]) + 1),
                slice(int(columns[0]), int(columns[-1]) + 1))

    def _roi_voxels_chunk(self, planned: PlannedChunk) -> DataChunk:
        """The ROI layer of a block as original voxels: the ROI's, the rest one constant."""
        z0, z1 = planned.z0, planned.z1
        rows, columns = self._roi_box(z0, z1)
        original = self.study.volume.data[z0:z1, rows, columns]
        roi = self.study.roi[z0:z1, rows, columns]
        codec, payload, params = smallest(self._codecs[1], fill_region(original, ~roi, roi))
        params["reference"] = "none"
        params["box"] = [rows.start, rows.stop, columns.start, columns.stop]
        return DataChunk(study_id=self.study.study_id, seq=planned.seq, layer=1, z0=z0, z1=z1,
                         codec=codec.name, params=params, payload=payload)

    def encode_chunk(self, planned: PlannedChunk) -> DataChunk:
        """Encode one planned chunk (its block's base is encoded first if needed)."""
        z0, z1 = planned.z0, planned.z1
        if planned.layer == 1 and self._roi_reference == "none":
            return self._roi_voxels_chunk(planned)
        if planned.layer == 0:
            codec = self._codecs[0][0]
            payload, params = self._encode_base(z0, z1)
        else:
            base = self._decoded_base(z0, z1)
            original = self.study.volume.data[z0:z1]
            region = self.study.roi[z0:z1] if planned.layer == 1 else ~self.study.roi[z0:z1]
            box = self._roi_box(z0, z1) if planned.layer == 1 else (slice(None), slice(None))
            codec, payload, params = smallest(self._codecs[planned.layer],
                                              residual(original, base, region)[:, box[0], box[1]])
            params["base_digest"] = block_digest(base)
            if planned.layer == 1:
                params["box"] = [box[0].start, box[0].stop, box[1].start, box[1].stop]
            kind = "plain" if not self._roi_voxels[(z0, z1)] else "roi"
            if planned.layer == 2 and self._codecs[0][0].lossless is False \
                    and self._rest_reference.get(kind) != "base":
                # Outside the ROI the original voxels (the ROI, known by then, filled with a
                # constant) may code smaller than their residual against the base, a preview
                # for plain blocks: on scans with little noise the residual of a lossy base
                # codes no smaller than the voxels themselves (docs/BENCHMARKS.md). Both are
                # tried on the first block of each kind; the others follow its choice (each
                # try costs a lossless encode of the block).
                voxels = smallest(self._codecs[2], fill_region(original, ~region, ~region))
                if self._rest_reference.get(kind) == "none" or (
                        coded_size(*voxels[1:]) < coded_size(payload, params)):
                    codec, payload, params = voxels
                    params["reference"] = "none"
                self._rest_reference[kind] = params.get("reference", "base")
        return DataChunk(study_id=self.study.study_id, seq=planned.seq, layer=planned.layer,
                         z0=z0, z1=z1, codec=codec.name, params=params, payload=payload)

    def _encode_base(self, z0: int, z1: int) -> tuple[bytes, dict]:
        with self._block_locks[(z0, z1)]:
            ready = self._base_ready.get((z0, z1))
            if ready is None:
                ready = self._base_ready[(z0, z1)] = self._encode_base_now(z0, z1)
            return ready[0], dict(ready[1])

    def _encode_base_now(self, z0: int, z1: int) -> tuple[bytes, dict]:
        codec = self._codecs[0][0]
        block = self._diffused(z0, z1)
        if codec.lossless:
            payload, params = codec.encode(block)
            decoded = block
        elif self._previews:
            codec = self.settings.base_codec(preview=True)
            payload, params = codec.encode(block)
            decoded = clip_base(codec.decode(payload, block.shape, params), self.value_range)
            params["quality"] = {"rate": self.settings.preview_crf, "diffused": True,
                                 "preview": True}
        else:
            payload, params, decoded = self._encode_guarded_base(z0, z1)
        self._base[z0:z1] = decoded
        return payload, params

    def _encode_guarded_base(self, z0: int, z1: int) -> tuple[bytes, dict, np.ndarray]:
        """Lossy base of one block, re-coded until the receiver's view reaches ``min_ssim``.

        The residual layers are computed against what the receiver will decode, so the encoder
        decodes its own payload (and clips it exactly as the receiver does). The steps: the
        configured CRF/QP, then lower by GUARD_STEP down to 0, then the undiffused block (where
        the diffusion itself cost too much structure). Deterministic, so a resumed sender makes
        the same choices.
        """
        settings = self.settings
        original = self.study.volume.data[z0:z1]
        roi = self.study.roi[z0:z1]
        source, diffused = self._diffused(z0, z1), True
        rate = settings.crf if settings.qp is None else settings.qp
        while True:
            codec = settings.base_codec(rate)
            payload, params = codec.encode(source)
            decoded = clip_base(codec.decode(payload, source.shape, params), self.value_range)
            if settings.min_ssim is None or settings.exact:
                return payload, params, decoded
            score = block_ssim(original, np.where(roi, original, decoded))
            if not score < settings.min_ssim:  # also NaN: slices too small to measure
                break
            if rate > 0:
                rate = max(0, rate - GUARD_STEP)
            elif diffused:
                source, diffused = original, False
            else:
                log.warning("slices %d-%d: SSIM %.4f below %.4f even at the best quality",
                            z0, z1 - 1, score, settings.min_ssim)
                break
        params["quality"] = {"rate": rate, "diffused": diffused, "ssim": round(float(score), 5)}
        return payload, params, decoded

    def _diffused(self, z0: int, z1: int) -> np.ndarray:
        """The diffused block (computed now if the volume is lazy), equal to the original in
        the ROI; the original while the ROI is pending (nothing is diffused then)."""
        if not self.roi_known:
            return self.study.volume.data[z0:z1]
        block = self.study.diffused[z0:z1]
        if (z0, z1) not in self._checked:
            roi = self.study.roi[z0:z1]
            if not np.array_equal(block[roi], self.study.volume.data[z0:z1][roi]):
                raise ValueError("the diffused volume differs from the original inside the ROI")
            self._checked.add((z0, z1))
        return block

    def _decoded_base(self, z0: int, z1: int) -> np.ndarray:
        # Encoded now if a resumed stream skips the base of this block; waited for if another
        # thread is encoding it.
        self._encode_base(z0, z1)
        return self._base[z0:z1]
