"""Incremental reassembly of a study from data chunks, in any order, each applied once.

The volume is one int16 array updated in place: a base chunk (layer 0) writes its slices, a
residual chunk adds to the voxels of its region (ROI for layer 1, the rest for layer 2). Memory
stays at one volume plus the decoder's state and, for a residual, its decoded block: a base is
decoded straight into the volume, the ROI mask stays bit-packed (unpacked one slice at a time)
and everything after decoding works in place. Every chunk is checked against the header's
plan (slice range, layer, one of the layer's codecs) and, for residuals, against the digest
of the base block they were computed on; anything that does not fit is rejected with a reason
and never applied. A chunk whose voxels would leave the header's HU range is wrong whatever its
checksum says: it is rejected before it touches the volume.

Nothing is called exact that is not proven. A block's ROI counts as exact only once its decoded
ROI voxels hash to the sender's digest of the original (:func:`shared.layers.roi_digest`, in
the header's ``roi_digests``), checked as soon as the block has its base and its ROI residual
(or a lossless base). On a mismatch (a checksum-valid but wrong base or residual: a faulty
decoder, another codec build, a hostile peer) the block's applied chunks of every layer are
dropped: its slices go back to "not received", the chunks count as missing again (a live sender
resends them on its next pass) and nothing of them stays counted as base, ROI or exact. The
whole volume is exact only when its SHA-256 equals the header's.

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
from shared.layers import block_digest, clip_base, roi_digest
from shared.volume import Volume
from shared.wire import DataChunk, RoiFrame, StreamHeader, WireError, layer_codecs, voxel_sha256

#: Bits of :meth:`Reassembler.slice_layers` (and of status.json's ``slice_layers``): the slice's
#: base, its ROI residual, its rest residual, and its ROI verified against the sender's digest.
HAS_BASE, HAS_ROI_RESIDUAL, HAS_REST_RESIDUAL, ROI_VERIFIED = 1, 2, 4, 8
#: Further bits: the slice's ROI (layer 1) or rest (layer 2) voxels arrived as original voxels
#: (a chunk with ``reference: none``), so they need no base.
ROI_FROM_VOXELS, REST_FROM_VOXELS = 16, 32
_VOXELS_BIT = {1: ROI_FROM_VOXELS, 2: REST_FROM_VOXELS}
_LAYER_BIT = {0: HAS_BASE, 1: HAS_ROI_RESIDUAL, 2: HAS_REST_RESIDUAL}


class ChunkRejected(ValueError):
    """A chunk that cannot be applied; the message says why."""


@dataclass
class Milestones:
    """Seconds since the reassembler started at which each milestone was reached."""

    first_roi_slice: float | None = None
    """First slice whose ROI voxels are verified exact (digest checked)."""
    roi_complete: float | None = None
    """Every ROI voxel verified exact."""
    base_complete: float | None = None
    """Every slice has its base layer."""
    exact_complete: float | None = None
    """Every voxel exact, SHA-256 verified (only for streams that carry layer 2)."""


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
    """Slices whose ROI voxels are verified exact against the sender's digest (a slice without
    ROI voxels once it has a base)."""
    exact_slices: int | None
    """Slices proven exact: all once the whole volume's SHA-256 verified, else 0; ``None`` for
    a stream without an exact layer."""
    roi_voxels: int
    """Voxels in the ROI."""
    roi_voxels_exact: int
    """ROI voxels proven exact (those of the ROI-exact slices)."""
    exact_layer_slices: int | None = None
    """Slices with every layer applied (exact once the SHA-256 says so); ``None`` without an
    exact layer."""
    roi_mismatches: int = 0
    """ROI digest checks that failed (each dropped its block)."""
    roi_known: bool = True
    """False while the ROI is pending (its frame not received): no ROI voxel counts yet."""

    @property
    def roi_fraction(self) -> float:
        """Share of the ROI's voxels that are exact (1.0 for an empty ROI, 0.0 while the ROI
        is pending)."""
        if not self.roi_known:
            return 0.0
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
        self._volume: np.ndarray | None = None  # made at first use (see volume)
        self._slice_state = np.zeros(nz, dtype=np.uint8)
        self.applied: set[int] = set()
        self.plan = {seq: (layer, z0, z1) for seq, layer, z0, z1 in header.plan}
        self.milestones = Milestones()
        self._base_digest: dict[tuple[int, int], bytes] = {}
        # Residuals that came before their base wait coded (a few percent of their decoded
        # size), up to max_waiting_bytes; they are decoded again once the base is there.
        self._waiting_for_base: dict[int, DataChunk] = {}
        self._waiting_bytes = 0
        self.max_waiting_bytes = max(4 << 20, 2 * int(np.prod(header.shape)) // 4)
        """Coded bytes of early residuals held at most (more are rejected: resent later)."""
        self._base_lossless = bool(header.layers.get(0, {}).get("lossless", False))
        #: Whole-volume SHA-256 check: None until every layer of every slice is in.
        self.verified: bool | None = None
        # Per slice: ROI voxels and the others; the block of the sender's ROI digest (-1: none).
        # All zero / none while the ROI is pending (attach_roi fills them in).
        self._roi_per_slice = np.zeros(nz, dtype=np.int64)
        self._rest_per_slice = np.zeros(nz, dtype=np.int64)
        self._roi_digests: dict[tuple[int, int], bytes] = {}
        self._digest_block = np.full(nz, -1, dtype=np.int64)
        self._digest_ranges: list[tuple[int, int]] = []
        if header.roi_known:
            self._init_roi()
        #: Which slices passed their block's ROI digest check.
        self.roi_verified = np.zeros(nz, dtype=bool)
        #: ROI digest checks that failed (each dropped its block).
        self.roi_mismatches = 0
        #: Times the volume's voxels changed (a chunk applied, a block dropped): a check of the
        #: voxels made by someone else holds only while this has not moved.
        self.changes = 0
        #: Residuals queued before their base arrived and rejected once it did, and blocks
        #: dropped after a failed ROI check: messages for the stream's problems.
        self.late_rejections: list[str] = []

    def _init_roi(self) -> None:
        """The per-slice ROI counts and the digest blocks of the (now known) ROI."""
        header = self.header
        nz = header.shape[0]
        # Slice by slice: the whole mask unpacked would take a byte per voxel.
        self._roi_per_slice = np.array([np.count_nonzero(header.roi_slices(z, z + 1))
                                        for z in range(nz)], dtype=np.int64)
        self._rest_per_slice = header.shape[1] * header.shape[2] - self._roi_per_slice
        self._roi_digests = {(z0, z1): digest for z0, z1, digest in header.roi_digests}
        self._digest_ranges = list(self._roi_digests)
        for index, (z0, z1) in enumerate(self._digest_ranges):
            self._digest_block[z0:z1] = index

    @property
    def roi_known(self) -> bool:
        """Whether the ROI is known (in the header, or from the stream's ROI frame)."""
        return self.header.roi_known

    def attach_roi(self, roi: RoiFrame) -> None:
        """The ROI frame of a stream whose header announced the ROI as pending: checked against
        the header (:meth:`~shared.wire.StreamHeader.with_roi`), then its plan entries join the
        plan and the ROI's voxels are counted; nothing applied so far changes (only bases can
        have come: layer-1/2 chunks are refused before the ROI).

        Raises:
            WireError: the frame does not fit the header, or the ROI is known already.
        """
        if self.roi_known:
            raise WireError("ROI frame: the ROI of this stream is known already")
        self.header = self.header.with_roi(roi)
        self.plan.update({seq: (layer, z0, z1) for seq, layer, z0, z1 in roi.plan})
        self._init_roi()
        self._verify_roi(0, self.header.shape[0])
        self._update_milestones()

    @property
    def roi_voxels_per_slice(self) -> np.ndarray:
        """ROI voxels of each slice (int64, a read-only view; zeros while the ROI is pending)."""
        view = self._roi_per_slice.view()
        view.flags.writeable = False
        return view

    @property
    def volume(self) -> np.ndarray:
        """The int16 volume being rebuilt; slices not received yet hold the header's minimum.

        It is made when first needed (the first chunk, a snapshot): a study that never gets a
        chunk, a header sent alone, takes no memory for its voxels.
        """
        if self._volume is None:
            self._volume = np.full(self.header.shape, self.header.value_range[0], dtype=np.int16)
        return self._volume

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
        if chunk.layer != 0 and not self.roi_known:
            raise ChunkRejected(f"chunk {chunk.seq}: layer {chunk.layer} before the ROI frame "
                                "(the header announced the ROI as pending)")
        expected = self.plan.get(chunk.seq)
        if expected is None:
            raise ChunkRejected(f"chunk {chunk.seq} is not in the plan")
        if (chunk.layer, chunk.z0, chunk.z1) != expected:
            raise ChunkRejected(f"chunk {chunk.seq}: layer/slices ({chunk.layer}, {chunk.z0}, "
                                f"{chunk.z1}) differ from the plan {expected}")
        allowed = layer_codecs(self.header.layers[chunk.layer])
        if chunk.codec not in allowed:
            raise ChunkRejected(f"chunk {chunk.seq}: codec {chunk.codec!r} is not one the "
                                f"header names for layer {chunk.layer} ({', '.join(allowed)})")
        if self.holds(chunk.seq):
            return []
        if (self._slice_state[chunk.z0:chunk.z1] & _LAYER_BIT[chunk.layer]).any():
            # Only a plan with overlapping blocks of one layer gets here (no sender makes
            # one): a second base would overwrite, a residual added twice would corrupt.
            what = "a base" if chunk.layer == 0 else f"layer {chunk.layer}"
            raise ChunkRejected(f"chunk {chunk.seq}: slices {chunk.z0}-{chunk.z1 - 1} already "
                                f"have {what}")
        codec = get_codec(chunk.codec)  # registered: the header's codecs were checked
        if chunk.layer == 0:
            applied = self._apply_base(chunk, codec)
        else:
            reference = chunk.params.get("reference", "base")
            if reference not in ("base", "none"):
                raise ChunkRejected(f"chunk {chunk.seq}: invalid reference {reference!r}")
            self._box(chunk)  # validated before anything is decoded
            block = self._decode_residual(chunk, codec)
            if reference == "none":
                self._apply_voxels(chunk, block)
                applied = [chunk]
            elif (chunk.z0, chunk.z1) in self._base_digest:
                self._apply_residual(chunk, block)
                applied = [chunk]
            else:
                if self._waiting_bytes + len(chunk.payload) > self.max_waiting_bytes:
                    raise ChunkRejected(f"chunk {chunk.seq}: residual before its base, and "
                                        f"{self._waiting_bytes} bytes of those already wait")
                del block
                self._waiting_for_base[chunk.seq] = chunk
                self._waiting_bytes += len(chunk.payload)
                applied = []
        self._update_milestones()
        return applied

    def _box(self, chunk: DataChunk) -> tuple[slice, slice]:
        """The rows and columns a layer-1 chunk covers (``params["box"]``: ``[y0, y1, x0,
        x1]``, the bounding box of its block's ROI; the whole slice without it)."""
        ny, nx = self.header.shape[1:]
        box = chunk.params.get("box")
        if box is None:
            return slice(0, ny), slice(0, nx)
        if (chunk.layer != 1 or not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in box)
                or not (0 <= box[0] < box[1] <= ny and 0 <= box[2] < box[3] <= nx)):
            raise ChunkRejected(f"chunk {chunk.seq}: invalid box {box!r}")
        return slice(box[0], box[1]), slice(box[2], box[3])

    def _decode_residual(self, chunk: DataChunk, codec: Codec) -> np.ndarray:
        rows, columns = self._box(chunk)
        shape = (chunk.z1 - chunk.z0, rows.stop - rows.start, columns.stop - columns.start)
        try:
            return codec.decode(chunk.payload, shape, chunk.params)
        except CodecError as error:
            raise ChunkRejected(f"chunk {chunk.seq}: {error}") from None

    def holds(self, seq: int) -> bool:
        """Whether chunk ``seq`` was applied, or is held until its base arrives."""
        return seq in self.applied or seq in self._waiting_for_base

    def _apply_base(self, chunk: DataChunk, codec: Codec) -> list[DataChunk]:
        # Decoded straight into the volume: no block-sized buffer beside the decoder's own. The
        # slices hold the fill value until their base arrives, so a payload that fails to decode
        # is undone by filling them again (apply() has refused a second base for a slice).
        if (self._slice_state[chunk.z0:chunk.z1] & (ROI_FROM_VOXELS | REST_FROM_VOXELS)).any():
            # Original voxels of the block came first (its ROI, or its rest): the base may
            # only fill in the others (decoded aside).
            return self._apply_late_base(chunk, codec)
        block = self.volume[chunk.z0:chunk.z1]
        try:
            codec.decode_into(chunk.payload, chunk.params, block)
        except CodecError as error:
            block.fill(self.header.value_range[0])
            raise ChunkRejected(f"chunk {chunk.seq}: {error}") from None
        except BaseException:
            block.fill(self.header.value_range[0])
            raise
        low, high = self.header.value_range
        if not self._base_lossless:
            clip_base(block, self.header.value_range)
        elif block.size and (block.min() < low or block.max() > high):
            block.fill(low)
            raise ChunkRejected(f"chunk {chunk.seq}: lossless base with voxels outside the "
                                f"header's range {low}..{high}")
        return self._base_applied(chunk, block, late=False)

    def _apply_late_base(self, chunk: DataChunk, codec: Codec) -> list[DataChunk]:
        block = self._decode_residual(chunk, codec)  # decoded aside, like a residual
        low, high = self.header.value_range
        if not self._base_lossless:
            clip_base(block, self.header.value_range)
        elif block.size and (block.min() < low or block.max() > high):
            raise ChunkRejected(f"chunk {chunk.seq}: lossless base with voxels outside the "
                                f"header's range {low}..{high}")
        for index, z in enumerate(range(chunk.z0, chunk.z1)):
            state = self._slice_state[z]
            roi = self._region(z, 1)
            keep = np.zeros_like(roi)
            if state & ROI_FROM_VOXELS:
                keep |= roi
            if state & REST_FROM_VOXELS:
                keep |= ~roi
            np.copyto(self.volume[z], block[index], where=~keep)
        # Residuals are computed against the base as decoded, whatever the volume holds now.
        return self._base_applied(chunk, block, late=True)

    def _base_applied(self, chunk: DataChunk, block: np.ndarray, late: bool) -> list[DataChunk]:
        """Record the base of ``chunk``'s block (decoded as ``block``), apply the residuals that
        waited for it and re-check the block's ROI; the chunks applied, ``chunk`` first.

        A late base (``late``) was not written over voxels the volume already holds exactly, so
        its waiting residuals are applied against ``block`` rather than the volume."""
        key = (chunk.z0, chunk.z1)
        self._base_digest[key] = block_digest(block)
        self._mark(chunk)
        applied = [chunk]
        for seq, waiting in list(self._waiting_for_base.items()):
            if key not in self._base_digest:
                break  # a residual before this one dropped the base (and the others waiting)
            if (waiting.z0, waiting.z1) == key and seq in self._waiting_for_base:
                del self._waiting_for_base[seq]
                self._waiting_bytes -= len(waiting.payload)
                try:
                    residual = self._decode_residual(waiting, get_codec(waiting.codec))
                    self._apply_residual(waiting, residual, base=block if late else None)
                    applied.append(waiting)
                except ChunkRejected as error:
                    self.late_rejections.append(str(error))
        self._verify_roi(chunk.z0, chunk.z1)
        return applied

    def _apply_voxels(self, chunk: DataChunk, block: np.ndarray) -> None:
        """A chunk of original voxels (``reference: none``): they replace the volume's in the
        layer's region (layer 1: the ROI, layer 2: the rest), whatever base the block has, or
        none yet."""
        low, high = self.header.value_range
        rows, columns = self._box(chunk)
        for index, z in enumerate(range(chunk.z0, chunk.z1)):
            region = self._region(z, chunk.layer)[rows, columns]
            if (block[index].min(where=region, initial=high) < low
                    or block[index].max(where=region, initial=low) > high):
                raise ChunkRejected(f"chunk {chunk.seq}: voxels outside the header's range "
                                    f"{low}..{high} in slice {z}")
        for index, z in enumerate(range(chunk.z0, chunk.z1)):
            np.copyto(self.volume[z, rows, columns], block[index],
                      where=self._region(z, chunk.layer)[rows, columns])
        self._mark(chunk)
        self._slice_state[chunk.z0:chunk.z1] |= _VOXELS_BIT[chunk.layer]
        self._verify_roi(chunk.z0, chunk.z1)

    def _region(self, z: int, layer: int) -> np.ndarray:
        """The voxels of slice ``z`` that a residual of ``layer`` covers (one slice unpacked)."""
        region = self.header.roi_slices(z, z + 1)[0]
        if layer == 2:
            np.logical_not(region, out=region)
        return region

    def _apply_residual(self, chunk: DataChunk, block: np.ndarray,
                        base: np.ndarray | None = None) -> None:
        if chunk.params.get("base_digest") != self._base_digest[(chunk.z0, chunk.z1)]:
            # One of the two is wrong, and nothing tells which: the base goes too, so that both
            # are requested again (a base kept here would block every residual of its block).
            dropped = self._drop(chunk.z0, chunk.z1)
            raise ChunkRejected(f"chunk {chunk.seq}: residual computed against a different "
                                "base than the one received (sender changed, or a damaged "
                                f"base?); chunks {', '.join(f'#{seq}' for seq in dropped)} of "
                                "its block dropped and missing again")
        rows, columns = self._box(chunk)
        target = self.volume[chunk.z0:chunk.z1, rows, columns]
        # base + residual, wrapping modulo 2^16, formed in the decoded block (used once). The
        # base is the volume's voxels, or ``base`` when the volume holds exact voxels instead.
        summed = block.view(np.uint16)
        base = target if base is None else base[:, rows, columns]
        np.add(summed, base.view(np.uint16), out=summed)
        low, high = self.header.value_range
        # Every original voxel lies in the header's range: a sum outside it is a wrong residual
        # (or base), refused before anything changes. Slice by slice: one mask slice unpacked.
        for index, z in enumerate(range(chunk.z0, chunk.z1)):
            region = self._region(z, chunk.layer)[rows, columns]  # min/max in place: no copy
            if (block[index].min(where=region, initial=high) < low
                    or block[index].max(where=region, initial=low) > high):
                # As for a digest mismatch: the base or the residual is wrong, and nothing
                # tells which, so the base goes too and both are requested again; unless the
                # block's ROI is proven (its base checked against the sender's digest).
                proven = self.roi_verified[chunk.z0:chunk.z1].all()
                dropped = [] if proven else self._drop(chunk.z0, chunk.z1)
                raise ChunkRejected(f"chunk {chunk.seq}: residual gives voxels outside the "
                                    f"header's range {low}..{high} in slice {z}; chunks "
                                    f"{', '.join(f'#{seq}' for seq in dropped) or 'none'} of its "
                                    "block dropped and missing again")
        for index, z in enumerate(range(chunk.z0, chunk.z1)):
            np.copyto(target[index], block[index],
                      where=self._region(z, chunk.layer)[rows, columns])
        self._mark(chunk)
        # The voxels changed, so what was proven of them before is not any more: a lossless base
        # proves its ROI by itself, and a layer-1 residual applied over it afterwards (a plan
        # no sender makes, but a peer can) must be checked again, as must the volume's SHA-256.
        if chunk.layer == 1:
            self._revoke_roi(chunk.z0, chunk.z1)
        self.verified = None
        self._verify_roi(chunk.z0, chunk.z1)

    # --- ROI verification --------------------------------------------------------------------

    def _verify_roi(self, z0: int, z1: int) -> None:
        """Check the ROI digest of every block in ``[z0, z1)`` that now has all it needs."""
        for index in sorted(set(self._digest_block[z0:z1].tolist()) - {-1}):
            b0, b1 = self._digest_ranges[index]
            if self.roi_verified[b0:b1].all() or not self._roi_layers_in(b0, b1):
                continue
            digest = roi_digest(self.volume[b0:b1],
                                lambda z: self.header.roi_slices(z, z + 1)[0], b0)
            if digest == self._roi_digests[(b0, b1)]:
                self.roi_verified[b0:b1] = True
                self._slice_state[b0:b1] |= ROI_VERIFIED
            else:
                self.roi_mismatches += 1
                dropped = self._drop(b0, b1)
                self.late_rejections.append(
                    f"slices {b0}-{b1 - 1}: the ROI voxels do not match the sender's digest; "
                    f"chunks {', '.join(f'#{seq}' for seq in dropped)} dropped (their slices are "
                    "not received any more) and missing again")

    def _revoke_roi(self, z0: int, z1: int) -> None:
        """The ROI voxels of ``[z0, z1)`` changed: their blocks are not verified any more."""
        for index in set(self._digest_block[z0:z1].tolist()) - {-1}:
            b0, b1 = self._digest_ranges[index]
            self.roi_verified[b0:b1] = False
            self._slice_state[b0:b1] &= np.uint8(0xFF ^ ROI_VERIFIED)

    def _roi_layers_in(self, z0: int, z1: int) -> bool:
        """Whether every slice of ``[z0, z1)`` has what makes its ROI exact."""
        return bool(self._roi_ready(self._slice_state[z0:z1], self._roi_per_slice[z0:z1]).all())

    def _roi_ready(self, state: np.ndarray, roi_voxels: np.ndarray) -> np.ndarray:
        """Slices whose ROI voxels have all their layers: none to have, original voxels, or a
        base with its ROI residual (or a lossless base)."""
        has_base = (state & HAS_BASE) > 0
        residual = ((state & HAS_ROI_RESIDUAL) > 0) | self._base_lossless
        return (roi_voxels == 0) | ((state & ROI_FROM_VOXELS) > 0) | (has_base & residual)

    def _drop(self, z0: int, z1: int) -> list[int]:
        """Undo every applied chunk that touches ``[z0, z1)`` (and the slices those touch)."""
        dropped: set[int] = set()
        while True:
            more = {seq for seq in self.applied - dropped
                    if self.plan[seq][1] < z1 and z0 < self.plan[seq][2]}
            if not more:
                break
            dropped |= more
            z0 = min([z0] + [self.plan[seq][1] for seq in more])
            z1 = max([z1] + [self.plan[seq][2] for seq in more])
        self.applied -= dropped
        self.changes += 1
        self.volume[z0:z1].fill(self.header.value_range[0])
        self._slice_state[z0:z1] = 0
        self.roi_verified[z0:z1] = False
        for key in [key for key in self._base_digest if key[0] < z1 and z0 < key[1]]:
            del self._base_digest[key]
        for seq in [seq for seq, waiting in self._waiting_for_base.items()
                    if waiting.z0 < z1 and z0 < waiting.z1]:
            self._waiting_bytes -= len(self._waiting_for_base.pop(seq).payload)
        self.verified = None
        return sorted(dropped)

    def _mark(self, chunk: DataChunk) -> None:
        self.changes += 1
        self.applied.add(chunk.seq)
        self._slice_state[chunk.z0:chunk.z1] |= _LAYER_BIT[chunk.layer]

    # --- state -------------------------------------------------------------------------------

    def slice_layers(self) -> np.ndarray:
        """Per slice, the layers it has as ``HAS_BASE | HAS_ROI_RESIDUAL | HAS_REST_RESIDUAL``
        bits, plus ``ROI_VERIFIED`` once its block's ROI digest matched (uint8, a read-only
        copy)."""
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
            roi_voxels_exact=int(self._roi_per_slice[roi_exact].sum()),
            exact_layer_slices=(int(self.exact_layer_slices.sum()) if self.exact_expected
                                else None),
            roi_mismatches=self.roi_mismatches, roi_known=self.roi_known)

    @property
    def roi_exact_slices(self) -> np.ndarray:
        """Slices whose ROI voxels are proven exact (digest checked); slices without ROI voxels
        count once they have their base. None of them while the ROI is pending."""
        if not self.roi_known:
            return np.zeros(len(self._slice_state), dtype=bool)
        has_base = (self._slice_state & HAS_BASE) > 0
        return self.roi_verified | (has_base & (self._roi_per_slice == 0))

    @property
    def exact_layer_slices(self) -> np.ndarray:
        """Slices with every layer applied (exact once the volume's SHA-256 says so); none
        while the ROI is pending (the layers that need it are still to come)."""
        if not self.roi_known:
            return np.zeros(len(self._slice_state), dtype=bool)
        rest_done = ((self._slice_state & HAS_REST_RESIDUAL) > 0) | (self._rest_per_slice == 0)
        return self._roi_ready(self._slice_state, self._roi_per_slice) & rest_done

    @property
    def exact_slices(self) -> np.ndarray:
        """Slices proven exact: all of them once the whole volume's SHA-256 verified, else none
        (the digest covers the volume, not a slice)."""
        if self.verified is True:
            return np.ones_like(self.roi_verified)
        return np.zeros_like(self.roi_verified)

    @property
    def roi_complete(self) -> bool:
        return self.roi_known and bool(self.roi_exact_slices[self._roi_per_slice > 0].all())

    @property
    def base_complete(self) -> bool:
        return bool(((self._slice_state & HAS_BASE) > 0).all())

    @property
    def exact_expected(self) -> bool:
        """Whether this stream carries layer 2 (so it can end bit-exact)."""
        return 2 in self.header.layers

    @property
    def exact_complete(self) -> bool:
        """Every voxel exact: the whole volume's SHA-256 verified."""
        return self.exact_expected and self.verified is True

    @property
    def complete(self) -> bool:
        """Every planned chunk applied (the ROI known: its frame plans the layers after 0)."""
        return self.roi_known and len(self.applied) == len(self.plan)

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
        if (self.verified is None and self.exact_expected
                and bool(self.exact_layer_slices.all())):
            self.verified = voxel_sha256(self.volume) == self.header.sha256
        if m.exact_complete is None and self.exact_complete:
            m.exact_complete = now

    def to_volume(self) -> Volume:
        """The current reconstruction with the header's geometry (missing slices at min HU)."""
        header = self.header
        return Volume(data=self.volume, affine=header.affine, spacing=header.spacing,
                      source_dtype=header.source_dtype, rescale_slope=header.rescale[0],
                      rescale_intercept=header.rescale[1], description=header.study_id)
