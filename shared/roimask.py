"""The two encodings of the ROI mask in a stream header: packed bits, or row runs.

* ``packbits-zstd``: ``np.packbits`` of the slice-major bool mask, zstd-compressed.
* ``row-runs-zstd``: for every row of every slice (slice-major, then row by row), the columns
  where the mask switches on or off: ``k`` (their count, even), then the ``k`` switch columns in
  ``[0, nx]`` (a run ``[a, b)`` switches on at ``a`` and off at ``b``), coded either as gaps
  (the first column, then each minus the one before) or, when the row above in the same slice
  has as many switches, as their signed differences from that row's (zigzag), the choice
  following from the counts; every number an unsigned LEB128 varint; the whole zstd-compressed.
  A liver mask's edges move a few columns from row to row, so most numbers fit in a byte and
  repeat: 1.2-1.5 kB for the shared studies' ROIs against 4.2-4.4 kB of packed bits.

The sender writes the smaller encoding. Both decoders are bounded: packed bits by the voxel
count; row runs by the rows (:data:`MAX_RUN_ROWS`) and by the size of the packed bits (a mask
whose runs take more than that is always sent packed), and every switch column is checked.

Both directions work on arrays, never row by row in Python (a 300-slice 512 x 512 series is
on the live path to "ROI complete", issue 15): the encoder takes a slab of slices at a time
(:data:`SLAB_VOXELS`), the decoder writes the packed bits without ever unpacking the mask.
``tests/roimask_oracle.py`` keeps the row-by-row coder they replaced; the tests check that both
write the same bytes and accept and refuse the same streams, with the same messages.
"""

from __future__ import annotations

import numpy as np
import zstandard

#: Rows (slices x rows per slice) beyond which the mask always travels as packed bits: the
#: decoder finds the rows' bounds one row after the other (a light loop), and 2000 slices of
#: 512 x 512 are a million rows.
MAX_RUN_ROWS = 1 << 20
#: zstd level of the numbers (any level decodes alike). 9, the packed bits' level: on the live
#: path the mask costs zstd's seconds plus its bytes' on the link, and at 2 Mbit/s (wifi-2m, the
#: slowest profile) level 9 is within 1.4 ms of the best level on every mask measured, while 19
#: is 3-4 ms slower on the shared studies and 57-78 ms on 300-slice series (0.07-0.12 s more of
#: zstd to save 3-11 kB, 11-45 ms of transfer; docs/BENCHMARKS.md, "ROI mask coding").
_LEVEL = 9
#: Voxels the encoder takes at a time (whole slices, at least one): 16 slices of 512 x 512,
#: a few MB of transient memory however long the series.
SLAB_VOXELS = 1 << 22


class MaskError(ValueError):
    """An encoded ROI mask that does not decode to a mask of the announced shape."""


def _varints(values) -> bytes:
    """Non-negative integers as unsigned LEB128 varints, one after the other."""
    values = np.asarray(values, np.int64).ravel()
    if values.size and values.min() < 0:
        raise ValueError("varints are unsigned")
    lengths = np.ones(values.size, np.int64)
    rest = values >> 7
    while rest.any():
        lengths += rest != 0
        rest >>= 7
    ends = np.cumsum(lengths)
    out = np.empty(int(ends[-1]) if values.size else 0, np.uint8)
    for byte in range(int(lengths.max(initial=0))):
        which = np.flatnonzero(lengths > byte)
        more = np.where(lengths[which] > byte + 1, 0x80, 0)
        out[ends[which] - lengths[which] + byte] = ((values[which] >> (7 * byte)) & 0x7F) | more
    return out.tobytes()


def _slab_values(padded: np.ndarray, ny: int) -> np.ndarray:
    """The row-runs numbers (each row's count, then its gaps or zigzag differences), in stream
    order, of whole slices of ``ny`` rows given as bool rows ``(rows, nx + 2)``, each between
    two columns of zeros."""
    rows, nx = padded.shape[0], padded.shape[1] - 2
    # Along the flattened rows a switch is a change between neighbours; the change from one
    # row's last pad to the next row's first never is one.
    flat = padded.ravel()
    entry_rows, columns = np.divmod(np.flatnonzero(flat[1:] != flat[:-1]), nx + 2)
    counts = np.bincount(entry_rows, minlength=rows)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # each row's first entry
    above = np.concatenate([[-1], counts[:-1]])
    # A row is coded against the row above (same slice) when it has as many switches, some.
    delta_rows = (counts > 0) & (counts == above) & (np.arange(rows) % ny != 0)
    numbers = columns.copy()
    numbers[1:] -= columns[:-1]
    starts = first[counts > 0]
    numbers[starts] = columns[starts]  # a row's first gap is its first column
    delta = np.flatnonzero(delta_rows[entry_rows])
    # Entry i of a delta row has entry i of the row above, k entries earlier.
    difference = columns[delta] - columns[delta - counts[entry_rows[delta]]]
    numbers[delta] = (difference << 1) ^ (difference >> 63)  # zigzag
    values = np.empty(rows + columns.size, np.int64)
    count_positions = first + np.arange(rows)
    values[count_positions] = counts
    values[np.arange(columns.size) + entry_rows + 1] = numbers
    return values


def _size_limit(shape) -> int:
    """The most bytes of numbers (before zstd) a mask of ``shape`` may take as row runs: its
    packed bits' size, or 4 kB, so that the runs of a small mask fit (a byte per row at least)."""
    nz, ny, nx = shape
    return max(4096, (nz * ny * nx + 7) // 8)


def encode_runs(mask_slices, shape) -> bytes | None:
    """The ``row-runs-zstd`` bytes of a mask given slice by slice (``mask_slices(z)`` -> bool
    ``(ny, nx)``), or None when it has more rows than :data:`MAX_RUN_ROWS` or its numbers take
    more bytes than :func:`decode_runs` accepts (many short runs: packed bits are smaller)."""
    nz, ny, nx = shape
    if nz * ny > MAX_RUN_ROWS:
        return None
    group = max(1, SLAB_VOXELS // max(1, ny * nx))
    parts, size, limit = [], 0, _size_limit(shape)
    for z0 in range(0, nz, group):
        padded = np.zeros((min(group, nz - z0), ny, nx + 2), bool)
        for index in range(padded.shape[0]):
            padded[index, :, 1:-1] = mask_slices(z0 + index)
        parts.append(_varints(_slab_values(padded.reshape(-1, nx + 2), ny)))
        size += len(parts[-1])
        if size > limit:
            return None
    return zstandard.ZstdCompressor(level=_LEVEL).compress(b"".join(parts))


def _read_varints(raw: bytes) -> np.ndarray:
    """Every LEB128 varint of ``raw`` (int64); the stream must end on a complete one."""
    data = np.frombuffer(raw, np.uint8)
    if not data.size:
        return np.zeros(0, np.int64)
    if data[-1] & 0x80:
        raise MaskError("ROI runs end inside a number")
    ends = np.flatnonzero(data < 0x80)
    starts = np.concatenate([[0], ends[:-1] + 1])
    if (ends - starts).max(initial=0) > 4:  # no switch column or count needs 5 bytes
        raise MaskError("ROI runs hold a number out of range")
    position = np.arange(data.size) - np.repeat(starts, ends - starts + 1)
    shifted = (data & 0x7F).astype(np.int64) << (7 * position)
    return np.add.reduceat(shifted, starts)


def _row_starts(values: np.ndarray, rows: int) -> np.ndarray:
    """Where each row's count is in ``values``, for the rows up to the first that starts past
    the end (a row's count is followed by its numbers, so this is one loop)."""
    listed, starts, position = values.tolist(), [], 0
    append = starts.append
    try:
        for _ in range(rows):
            count = listed[position]
            append(position)
            position += 1 + count
    except IndexError:
        pass  # the rows from here end early
    return np.array(starts, np.int64)


def _switch_columns(numbers: np.ndarray, counts: np.ndarray, ny: int, nx: int):
    """The switch columns of rows of ``counts`` switches from their ``numbers``, the row of each,
    and the first row whose columns are not increasing in ``[0, nx]`` (None: all are).

    A row is its gaps' cumulative sum, or (a delta row: as many switches as the row above, in
    the same slice) the row above plus its differences. Along a chain of delta rows, entry i is
    anchor row's entry i plus the differences of entry i of each row to it: the entries are put
    chain by chain, entry by entry, row by row (a position computed, no sort), so that one
    cumulative sum gives them all.
    """
    rows = counts.size
    first = np.concatenate([[0], np.cumsum(counts)])
    entry_rows = np.repeat(np.arange(rows), counts)
    position = np.arange(numbers.size) - first[entry_rows]
    above = np.concatenate([[-1], counts[:-1]])
    delta_rows = (counts > 0) & (counts == above) & (np.arange(rows) % ny != 0)
    anchors = np.maximum.accumulate(np.where(delta_rows, 0, np.arange(rows)))
    depth = np.arange(rows) - anchors
    chain_rows = np.bincount(anchors, minlength=rows)
    # A gap over nx makes its row invalid, as does a difference over nx either way (zigzag
    # 2 nx + 1 and up): clipped to 2 nx + 2 (and gap rows' columns to nx + 1) they still do,
    # and no sum of them can overflow, whatever a peer sends (numbers up to 2^35).
    numbers = np.minimum(numbers, 2 * nx + 2)
    delta = delta_rows[entry_rows]
    gaps = np.where(delta, 0, numbers)
    running = np.cumsum(gaps)
    gap_columns = np.minimum(running - (running - gaps)[first[entry_rows]], nx + 1)
    values = np.where(delta, (numbers >> 1) ^ -(numbers & 1), gap_columns)
    order = (first[anchors[entry_rows]] + position * chain_rows[anchors[entry_rows]]
             + depth[entry_rows])
    chained = np.empty_like(values)
    chained[order] = values
    total = np.cumsum(chained)
    columns = total[order] - (total - chained)[order - depth[entry_rows]]
    bad = (columns < 0) | (columns > nx)
    bad[1:] |= (columns[1:] <= columns[:-1]) & (position[1:] > 0)
    first_bad = int(entry_rows[np.argmax(bad)]) if bad.any() else None
    return columns, entry_rows, first_bad


def decode_runs(data: bytes, shape) -> np.ndarray:
    """The packed bits (``np.packbits`` of the slice-major mask) of ``row-runs-zstd`` bytes.

    The rows are checked in order and the first fault found is the one reported, as a decoder
    reading row by row would.

    Raises:
        MaskError: more rows than :data:`MAX_RUN_ROWS`, a stream larger than the packed mask,
            or switch columns that are not an even, increasing list in ``[0, nx]``.
    """
    nz, ny, nx = shape
    rows = nz * ny
    if rows > MAX_RUN_ROWS:
        raise MaskError("too many rows for the row-runs encoding")
    limit = _size_limit(shape)
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            raw = reader.read(limit + 1)
    except zstandard.ZstdError:
        raise MaskError("corrupt ROI runs") from None
    if len(raw) > limit:
        raise MaskError("ROI runs larger than the mask they describe")
    values = _read_varints(raw)
    starts = _row_starts(values, rows)
    counts = values[starts]
    wrong = np.flatnonzero((counts % 2 == 1) | (counts > nx + 1)
                           | (starts + 1 + counts > values.size))
    readable = int(wrong[0]) if wrong.size else starts.size  # rows before the first fault
    starts, counts = starts[:readable], counts[:readable]
    end = int(starts[-1] + 1 + counts[-1]) if readable else 0
    is_number = np.ones(end, bool)
    is_number[starts] = False
    columns, entry_rows, first_bad = _switch_columns(values[:end][is_number], counts, ny, nx)
    if first_bad is not None:
        raise MaskError("ROI runs: switch columns out of order or range")
    if wrong.size:
        raise MaskError("ROI runs: invalid switch count")
    if readable < rows:
        raise MaskError("ROI runs end early")
    if end != values.size:
        raise MaskError("ROI runs: data after the last row")
    return _pack(entry_rows * nx + columns, rows * nx)


def _pack(switches: np.ndarray, total: int) -> np.ndarray:
    """``np.packbits`` of the ``total``-voxel mask whose runs switch on and off at the flat voxel
    indices ``switches`` (on and off in turn; runs disjoint and in order), built byte by byte:
    the mask is never unpacked (1/8 byte per voxel).

    The bytes a run covers whole are 0xFF (one np.repeat of 0x00 and 0xFF over the bytes between
    and inside the runs); the one or two it covers in part get their bits OR-ed in (a byte may
    hold the ends of several runs).
    """
    on, off = switches[0::2], switches[1::2]
    first_whole, stop_whole = (on + 7) // 8, off // 8
    whole = first_whole < stop_whole
    # Disjoint runs in order: the bounds never decrease (a run may stop where the next starts).
    bounds = np.empty(2 * int(whole.sum()) + 2, np.int64)
    bounds[0], bounds[-1] = 0, (total + 7) // 8
    bounds[1:-1:2], bounds[2:-1:2] = first_whole[whole], stop_whole[whole]
    fill = np.zeros(bounds.size - 1, np.uint8)
    fill[1::2] = 0xFF
    packed = np.repeat(fill, np.diff(bounds))
    # Bits [s, e) of a byte (the first voxel in the high bit): 0xFF >> s minus 0xFF >> e.
    head = on // 8
    head_stop = np.minimum(off - 8 * head, 8)
    np.bitwise_or.at(packed, head,
                     ((0xFF >> (on - 8 * head)) ^ (0xFF >> head_stop)).astype(np.uint8))
    tail = (off - 1) // 8
    past = tail > head
    np.bitwise_or.at(packed, tail[past],
                     (0xFF ^ (0xFF >> (off[past] - 8 * tail[past]))).astype(np.uint8))
    return packed
