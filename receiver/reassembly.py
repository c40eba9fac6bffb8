"""Incremental reassembly of a study from data chunks, in any order, each applied once.

The volume is one int16 array updated in place: a base chunk (layer 0) writes its slices, a
residual chunk adds to the voxels of its region (ROI for layer 1, the rest for layer 2). Memory
stays at one volume plus the decoder's state and, for a residual, its decoded block: a base is
decoded straight into the volume, the ROI mask stays bit-packed (unpacked one slice at a time)
and everything after decoding works in place. Every chunk is checked against the header's
plan (slice range, layer, codec) and, for residuals, against the digest of the base block they
were computed on; anything that does not fit is rejected with a reason and never applied.

What a caller reads: :meth:`Reassembler.apply` returns the chunks a call applied (a residual
that arrives before its base is held, and applied, and returned, with that base);
:meth:`Reassembler.progress` counts chunks, slices and ROI voxels done (:class:`Progress`);
:meth:`Reassembler.slice_layers` gives each slice's layers as ``HAS_*`` bits; the properties
below say which slices are exact and which milestones are reached.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from shared.codecs import Codec, CodecError, get_codec
from shared.layers import apply_residual, block_digest, clip_base
from shared.volume import Volume
from shared.wire import DataChunk, StreamHeader, voxel_sha256

#: Bits of :meth:`Reassembler.slice_layers`: the slice's base, its ROI residual, its rest residual.
HAS_BASE, HAS_ROI_RESIDUAL, HAS_REST_RESIDUAL = 1, 2, 4
_LAYER_BIT = {0: HAS_BASE, 1: HAS_ROI_RESIDUAL, 2: HAS_REST_RESIDUAL}


class ChunkRejected(ValueError):
    """A chunk that cannot be applied; the message says why."""


@dataclass
class Milestones:
    """Seconds since the reassembler started at which each milestone was reached."""

    first_roi_slice: float | None = None
    """First slice whose ROI voxels are all exact."""
    roi_complete: float | None = None
    """Every ROI voxel exact."""
    base_complete: float | None = None
    """Every slice has its base layer."""
    exact_complete: float | None = None
    """Every voxel exact (only for streams that carry layer 2)."""


@dataclass(frozen=True)
class Progress:
    """How much of the study is rebuilt (a snapshot: later chunks do not change it)."""

    chunks_planned: int
    """Chunks in the header's plan."""
    chunks_applied: int
    """Chunks applied to the volume (a residual held for its base is not applied yet)."""
    slices: int
    """Slices of the volume."""
    slices_with_base: int
    """Slices whose base layer arrived: they can be viewed."""
    roi_exact_slices: int
    """Slices whose ROI voxels are all exact (a slice without ROI voxels once it has a base)."""
    exact_slices: int | None
    """Slices whose every voxel is exact; ``None`` for a stream without an exact layer."""
    roi_voxels: int
    """Voxels in the ROI."""
    roi_voxels_exact: int
    """ROI voxels known to be exact (those of the ROI-exact slices)."""

    @property
    def roi_fraction(self) -> float:
        """Share of the ROI's voxels that are exact (1.0 for an empty ROI)."""
        return self.roi_voxels_exact / self.roi_voxels if self.roi_voxels else 1.0

    @property
    def base_fraction(self) -> float:
        """Share of the voxels that have a base (slices are all the same size)."""
        return self.slices_with_base / self.slices

    @property
    def exact_fraction(self) -> float:
        """Share of the voxels that are exact (0.0 for a stream without an exact layer)."""
        return (self.exact_slices or 0) / self.slices


class Reassembler:
    """Holds the volume being rebuilt and applies chunks to it."""

    def __init__(self, header: StreamHeader, clock=time.monotonic, started: float | None = None):
        self.header = header
        self._clock = clock
        self._started = clock() if started is None else started
        nz = header.shape[0]
        self.volume = np.full(header.shape, header.value_range[0], dtype=np.int16)
        self._slice_state = np.zeros(nz, dtype=np.uint8)
        self.applied: set[int] = set()
        self.plan = {seq: (layer, z0, z1) for seq, layer, z0, z1 in header.plan}
        self.milestones = Milestones()
        self._base_digest: dict[tuple[int, int], bytes] = {}
        self._waiting_for_base: dict[int, tuple[DataChunk, np.ndarray]] = {}
        # Slice by slice: the whole mask unpacked would take a byte per voxel.
        self._roi_per_slice = np.array([np.count_nonzero(header.roi_slices(z, z + 1))
                                        for z in range(nz)], dtype=np.int64)
        self._rest_per_slice = header.shape[1] * header.shape[2] - self._roi_per_slice
        self._base_lossless = bool(header.layers.get(0, {}).get("lossless", False))
        self.verified: bool | None = None
        #: Residuals queued before their base arrived and rejected once it did.
        self.late_rejections: list[str] = []

    # --- applying chunks ---------------------------------------------------------------------

    def apply(self, chunk: DataChunk) -> list[DataChunk]:
        """Apply ``chunk``; return the chunks this call applied, in order.

        That is ``[chunk]``, or for a base the base followed by the residuals that were held
        for it; ``[]`` for a duplicate (see :meth:`holds`) and for a residual that arrives
        before its base: it is decoded and held, and applied when the base comes.

        Raises:
            ChunkRejected: the chunk does not fit the header's plan, or cannot be decoded.
        """
        if chunk.study_id != self.header.study_id:
            raise ChunkRejected(f"chunk for study {chunk.study_id!r}, expected "
                                f"{self.header.study_id!r}")
        expected = self.plan.get(chunk.seq)
        if expected is None:
            raise ChunkRejected(f"chunk {chunk.seq} is not in the plan")
        if (chunk.layer, chunk.z0, chunk.z1) != expected:
            raise ChunkRejected(f"chunk {chunk.seq}: layer/slices ({chunk.layer}, {chunk.z0}, "
                                f"{chunk.z1}) differ from the plan {expected}")
        if chunk.codec != self.header.layers[chunk.layer].get("codec"):
            raise ChunkRejected(f"chunk {chunk.seq}: codec {chunk.codec!r} differs from the "
                                f"header's {self.header.layers[chunk.layer].get('codec')!r}")
        if self.holds(chunk.seq):
            return []
        codec = get_codec(chunk.codec)
        if chunk.layer == 0:
            applied = self._apply_base(chunk, codec)
        else:
            shape = (chunk.z1 - chunk.z0,) + tuple(self.header.shape[1:])
            try:
                block = codec.decode(chunk.payload, shape, chunk.params)
            except CodecError as error:
                raise ChunkRejected(f"chunk {chunk.seq}: {error}") from None
            if (chunk.z0, chunk.z1) in self._base_digest:
                self._apply_residual(chunk, block)
                applied = [chunk]
            else:
                self._waiting_for_base[chunk.seq] = (chunk, block)
                applied = []
        self._update_milestones()
        return applied

    def holds(self, seq: int) -> bool:
        """Whether chunk ``seq`` was applied, or is held until its base arrives."""
        return seq in self.applied or seq in self._waiting_for_base

    def _apply_base(self, chunk: DataChunk, codec: Codec) -> list[DataChunk]:
        # Decoded straight into the volume: no block-sized buffer beside the decoder's own. The
        # slices hold the fill value until their base arrives, so a payload that fails to decode
        # is undone by filling them again; a second base for a slice (a plan with overlapping
        # blocks, which no sender makes) is refused for the same reason.
        if (self._slice_state[chunk.z0:chunk.z1] & HAS_BASE).any():
            raise ChunkRejected(f"chunk {chunk.seq}: slices {chunk.z0}-{chunk.z1 - 1} already "
                                "have a base")
        block = self.volume[chunk.z0:chunk.z1]
        try:
            codec.decode_into(chunk.payload, chunk.params, block)
        except CodecError as error:
            block.fill(self.header.value_range[0])
            raise ChunkRejected(f"chunk {chunk.seq}: {error}") from None
        except BaseException:
            block.fill(self.header.value_range[0])
            raise
        if not self._base_lossless:
            clip_base(block, self.header.value_range)
        key = (chunk.z0, chunk.z1)
        self._base_digest[key] = block_digest(block)
        self._mark(chunk)
        applied = [chunk]
        for seq, (waiting, residual) in list(self._waiting_for_base.items()):
            if (waiting.z0, waiting.z1) == key:
                del self._waiting_for_base[seq]
                try:
                    self._apply_residual(waiting, residual)
                    applied.append(waiting)
                except ChunkRejected as error:
                    self.late_rejections.append(str(error))
        return applied

    def _apply_residual(self, chunk: DataChunk, block: np.ndarray) -> None:
        if chunk.params.get("base_digest") != self._base_digest[(chunk.z0, chunk.z1)]:
            raise ChunkRejected(f"chunk {chunk.seq}: residual computed against a different "
                                "base than the one received (sender changed?)")
        # Slice by slice, so that only one slice of the ROI mask is unpacked at a time.
        for index, z in enumerate(range(chunk.z0, chunk.z1)):
            region = self.header.roi_slices(z, z + 1)[0]
            if chunk.layer == 2:
                np.logical_not(region, out=region)
            apply_residual(self.volume[z], block[index], region)
        self._mark(chunk)

    def _mark(self, chunk: DataChunk) -> None:
        self.applied.add(chunk.seq)
        self._slice_state[chunk.z0:chunk.z1] |= _LAYER_BIT[chunk.layer]

    # --- state -------------------------------------------------------------------------------

    def slice_layers(self) -> np.ndarray:
        """Per slice, the layers it has as ``HAS_BASE | HAS_ROI_RESIDUAL | HAS_REST_RESIDUAL``
        bits (uint8, a read-only copy)."""
        layers = self._slice_state.copy()
        layers.flags.writeable = False
        return layers

    def progress(self) -> Progress:
        """Chunks, slices and ROI voxels done so far."""
        roi_exact = self.roi_exact_slices
        return Progress(
            chunks_planned=len(self.plan), chunks_applied=len(self.applied),
            slices=len(self._slice_state),
            slices_with_base=int(np.count_nonzero(self._slice_state & HAS_BASE)),
            roi_exact_slices=int(roi_exact.sum()),
            exact_slices=int(self.exact_slices.sum()) if self.exact_expected else None,
            roi_voxels=int(self._roi_per_slice.sum()),
            roi_voxels_exact=int(self._roi_per_slice[roi_exact].sum()))

    @property
    def roi_exact_slices(self) -> np.ndarray:
        has_base = (self._slice_state & HAS_BASE) > 0
        roi_done = ((self._slice_state & HAS_ROI_RESIDUAL) > 0) | (self._roi_per_slice == 0)
        return has_base & (roi_done | self._base_lossless)

    @property
    def exact_slices(self) -> np.ndarray:
        rest_done = ((self._slice_state & HAS_REST_RESIDUAL) > 0) | (self._rest_per_slice == 0)
        return self.roi_exact_slices & rest_done

    @property
    def roi_complete(self) -> bool:
        return bool(self.roi_exact_slices[self._roi_per_slice > 0].all())

    @property
    def base_complete(self) -> bool:
        return bool(((self._slice_state & HAS_BASE) > 0).all())

    @property
    def exact_expected(self) -> bool:
        """Whether this stream carries layer 2 (so it can end bit-exact)."""
        return 2 in self.header.layers

    @property
    def exact_complete(self) -> bool:
        return self.exact_expected and bool(self.exact_slices.all())

    @property
    def complete(self) -> bool:
        """Every planned chunk applied."""
        return len(self.applied) == len(self.plan)

    def missing(self) -> list[tuple[int, int, int, int]]:
        """Planned chunks not applied yet, as ``(seq, layer, z0, z1)``."""
        return [(seq, *entry) for seq, entry in self.plan.items() if seq not in self.applied]

    def _update_milestones(self) -> None:
        now = round(self._clock() - self._started, 4)
        m = self.milestones
        if m.first_roi_slice is None and (self.roi_exact_slices & (self._roi_per_slice > 0)).any():
            m.first_roi_slice = now
        if m.roi_complete is None and self.roi_complete:
            m.roi_complete = now
        if m.base_complete is None and self.base_complete:
            m.base_complete = now
        if m.exact_complete is None and self.exact_complete:
            m.exact_complete = now
            self.verified = voxel_sha256(self.volume) == self.header.sha256

    def to_volume(self) -> Volume:
        """The current reconstruction with the header's geometry (missing slices at min HU)."""
        header = self.header
        return Volume(data=self.volume, affine=header.affine, spacing=header.spacing,
                      source_dtype=header.source_dtype, rescale_slope=header.rescale[0],
                      rescale_intercept=header.rescale[1], description=header.study_id)
