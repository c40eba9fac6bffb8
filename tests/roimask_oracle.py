"""The row-runs coding of the ROI mask as first written, row by row in Python: the tests' oracle
and the benchmark's baseline.

This is :mod:`shared.roimask` as it was before it was vectorised (issue 15), kept verbatim so
that the tests can check that the product writes the same bytes for every mask and accepts and
refuses the same inputs (``tests/test_roimask.py``), and ``scripts/bench_roimask.py`` times both
in the same run (importing it as ``tests.roimask_oracle``, the repository root on its path). It
lives with the tests, not in the product: nothing the sender or the receiver runs uses it. It
compresses at the product's zstd level (a choice of the sender, not part of the format).
"""

from __future__ import annotations

import math

import numpy as np
import zstandard

from shared.roimask import _LEVEL, MAX_RUN_ROWS, MaskError


def _varints(values: list[int]) -> bytes:
    out = bytearray()
    for value in values:
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def _zigzag(value: int) -> int:
    return value * 2 if value >= 0 else -value * 2 - 1


def _row_switches(mask: np.ndarray) -> list[list[int]]:
    """Per row of a 2D bool slice, the columns where the mask switches (even count)."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    rows, columns = np.nonzero(np.diff(padded, axis=1))
    bounds = np.searchsorted(rows, np.arange(mask.shape[0] + 1)).tolist()
    columns = columns.tolist()
    return [columns[a:b] for a, b in zip(bounds, bounds[1:])]


def encode_runs(mask_slices, shape) -> bytes | None:
    """The ``row-runs-zstd`` bytes of a mask given slice by slice (``mask_slices(z)`` -> bool
    ``(ny, nx)``), or None when it has more rows than :data:`MAX_RUN_ROWS`."""
    nz, ny, _ = shape
    if nz * ny > MAX_RUN_ROWS:
        return None
    values: list[int] = []
    for z in range(nz):
        above: list[int] = []
        for index, switches in enumerate(_row_switches(mask_slices(z))):
            values.append(len(switches))
            if index and switches and len(switches) == len(above):
                values.extend(_zigzag(b - a) for a, b in zip(above, switches))
            else:
                values.extend(b - a for a, b in zip([0] + switches, switches))
            above = switches
    return zstandard.ZstdCompressor(level=_LEVEL).compress(_varints(values))


def _read_varints(raw: bytes) -> np.ndarray:
    """Every LEB128 varint of ``raw`` (int64); the stream must end on a complete one."""
    data = np.frombuffer(raw, np.uint8)
    if data.size and data[-1] & 0x80:
        raise MaskError("ROI runs end inside a number")
    ends = np.flatnonzero(data < 0x80)
    starts = np.concatenate([[0], ends[:-1] + 1])
    if (ends - starts).max(initial=0) > 4:  # no switch column or count needs 5 bytes
        raise MaskError("ROI runs hold a number out of range")
    position = np.arange(data.size) - np.repeat(starts, ends - starts + 1)
    shifted = (data & 0x7F).astype(np.int64) << (7 * position)
    return np.add.reduceat(shifted, starts) if data.size else np.zeros(0, np.int64)


def decode_runs(data: bytes, shape) -> np.ndarray:
    """The packed bits (``np.packbits`` of the slice-major mask) of ``row-runs-zstd`` bytes.

    Raises:
        MaskError: more rows than :data:`MAX_RUN_ROWS`, a stream larger than the packed mask,
            or switch columns that are not an even, increasing list in ``[0, nx]``.
    """
    nz, ny, nx = shape
    if nz * ny > MAX_RUN_ROWS:
        raise MaskError("too many rows for the row-runs encoding")
    total = nz * ny * nx
    limit = max(4096, (total + 7) // 8)
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            raw = reader.read(limit + 1)
    except zstandard.ZstdError:
        raise MaskError("corrupt ROI runs") from None
    if len(raw) > limit:
        raise MaskError("ROI runs larger than the mask they describe")
    values = _read_varints(raw).tolist()
    packed = np.zeros((total + 7) // 8, np.uint8)
    # Slices are unpacked a few at a time, as few as fill whole bytes of the packed mask (one
    # slice of 512 x 512): the mask is never unpacked whole.
    group, position, index = 8 // math.gcd(ny * nx, 8), 0, 0
    for z0 in range(0, nz, group):
        count = min(group, nz - z0)
        starts: list[int] = []
        stops: list[int] = []
        for z in range(count):
            above: list[int] = []
            for y in range(ny):
                if index >= len(values):
                    raise MaskError("ROI runs end early")
                k = values[index]
                numbers = values[index + 1:index + 1 + k]
                index += 1 + k
                if k % 2 or k > nx + 1 or len(numbers) != k:
                    raise MaskError("ROI runs: invalid switch count")
                if y and k and k == len(above):
                    switches = [a + (n >> 1 if not n & 1 else -((n + 1) >> 1))
                                for a, n in zip(above, numbers)]
                else:
                    switches, column = [], 0
                    for n in numbers:
                        column += n
                        switches.append(column)
                if k and (switches[0] < 0 or switches[-1] > nx
                          or any(b <= a for a, b in zip(switches, switches[1:]))):
                    raise MaskError("ROI runs: switch columns out of order or range")
                row = (z * ny + y) * nx
                starts.extend(row + column for column in switches[::2])
                stops.extend(row + column for column in switches[1::2])
                above = switches
        steps = np.zeros(count * ny * nx + 1, np.int8)
        np.add.at(steps, np.array(starts, np.int64), 1)
        np.add.at(steps, np.array(stops, np.int64), -1)
        np.cumsum(steps, out=steps)  # 1 inside a run, 0 outside: a bool mask in place
        bits = np.packbits(steps[:-1].view(bool))
        packed[position:position + bits.size] |= bits
        position += (count * ny * nx) // 8
    if index != len(values):
        raise MaskError("ROI runs: data after the last row")
    return packed
