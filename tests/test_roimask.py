"""The row-runs coding of the ROI mask (shared/roimask.py) against the row-by-row coder it
replaced (tests/roimask_oracle.py): the same bytes for every mask, the same masks back, and the
same streams accepted and refused, with the same messages."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import roimask
from shared.roimask import MAX_RUN_ROWS, MaskError, decode_runs, encode_runs
from tests import roimask_oracle as oracle

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def runs(values) -> bytes:
    """A row-runs stream of the numbers ``values`` (counts and numbers as the format has them)."""
    return zstandard.ZstdCompressor().compress(oracle._varints(list(values)))


def assert_same_bytes_and_round_trip(mask: np.ndarray) -> bytes | None:
    """The oracle's bytes, and the mask back from them; or None for a mask whose runs the
    decoders refuse as larger than the packed mask, where the oracle wrote them all the same."""
    encoded = encode_runs(lambda z: mask[z], mask.shape)
    before = oracle.encode_runs(lambda z: mask[z], mask.shape)
    if encoded is None:
        for decode in (decode_runs, oracle.decode_runs):
            with pytest.raises(MaskError, match="larger"):
                decode(before, mask.shape)
        return None
    assert encoded == before
    packed = decode_runs(encoded, mask.shape)
    np.testing.assert_array_equal(packed, np.packbits(mask.ravel()))
    np.testing.assert_array_equal(oracle.decode_runs(encoded, mask.shape), packed)
    return encoded


def outcome(decode, data: bytes, shape):
    """``(packed bytes, None)`` or ``(None, the error)``."""
    try:
        return decode(data, shape).tobytes(), None
    except ValueError as error:
        return None, error


def assert_decoders_agree(data: bytes, shape) -> None:
    """Both accept with the same bits, or both refuse with the same message (the oracle's
    message may be numpy's own for an empty stream, which it never meant to accept)."""
    before, refused = outcome(oracle.decode_runs, data, shape)
    now, error = outcome(decode_runs, data, shape)
    if refused is None:
        assert error is None, f"refused what the oracle accepts: {error}"
        assert now == before
        return
    assert isinstance(error, MaskError), f"accepted what the oracle refuses ({refused})"
    if isinstance(refused, MaskError):
        assert str(error) == str(refused)
    else:  # the oracle's varint reader fails on an empty stream
        assert zstandard.ZstdDecompressor().decompressobj().decompress(data) == b""
        assert str(error) == "ROI runs end early"


# --- masks ------------------------------------------------------------------------------------

ROWS = ("empty", "full", "random", "runs", "above", "shifted", "edges")


@st.composite
def masks(draw, max_rows: int = 7, max_columns: int = 13) -> np.ndarray:
    """Small masks built row by row: empty and full rows, random voxels, a few runs, copies of the
    row above (chains of delta rows), the row above shifted by a column, runs at both edges."""
    nz = draw(st.integers(1, 3))
    ny = draw(st.integers(1, max_rows))
    nx = draw(st.integers(1, max_columns))
    mask = np.zeros((nz, ny, nx), bool)
    for z in range(nz):
        for y in range(ny):
            kind = draw(st.sampled_from(ROWS))
            above = mask[z, y - 1] if y else np.zeros(nx, bool)
            if kind == "full":
                mask[z, y] = True
            elif kind == "random":
                mask[z, y] = draw(st.lists(st.booleans(), min_size=nx, max_size=nx))
            elif kind == "runs":
                cuts = sorted(draw(st.lists(st.integers(0, nx), max_size=6)))
                for a, b in zip(cuts[::2], cuts[1::2]):
                    mask[z, y, a:b] = True
            elif kind == "above":
                mask[z, y] = above
            elif kind == "shifted":
                shift = draw(st.sampled_from((-1, 1)))
                mask[z, y] = np.roll(above, shift)
                mask[z, y, 0 if shift == 1 else -1] = False
            elif kind == "edges":
                mask[z, y, :draw(st.integers(1, nx))] = True
                mask[z, y, nx - draw(st.integers(0, nx)):] = True
    return mask


@FUZZ
@given(masks())
def test_the_bytes_are_the_oracles_and_the_mask_comes_back(mask):
    assert_same_bytes_and_round_trip(mask)


def ellipsoids(shape, seed: int, holes: bool = True) -> np.ndarray:
    """A few overlapping ellipsoids with noisy edges (and holes): several runs per row."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    mask = np.zeros(shape, bool)
    for _ in range(3):
        centre = rng.uniform(0, 1, 3) * shape
        axes = rng.uniform(0.2, 0.6, 3) * shape
        radius = sum(((v - c) / a) ** 2 for v, c, a in zip((z, y, x), centre, axes))
        mask |= radius + rng.normal(0, 0.05, shape) < 1
    if holes:
        mask &= rng.random(shape) > 0.02
    return mask


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 17), (1, 23, 1), (7, 1, 9), (1, 5, 5),
                                   (3, 7, 11), (5, 37, 45), (2, 64, 64), (4, 13, 3)])
def test_seeded_masks_of_every_kind(shape):
    """Empty, full, single voxels (corners included), rows touching both edges, ellipsoids with
    holes, rows as long as the row above; shapes whose slices are not whole bytes."""
    nz, ny, nx = shape
    assert_same_bytes_and_round_trip(np.zeros(shape, bool))
    assert_same_bytes_and_round_trip(np.ones(shape, bool))
    for z, y, x in ((0, 0, 0), (nz - 1, ny - 1, nx - 1), (0, 0, nx - 1), (nz - 1, ny - 1, 0),
                    (nz // 2, ny // 2, nx // 2)):
        single = np.zeros(shape, bool)
        single[z, y, x] = True
        assert_same_bytes_and_round_trip(single)
    edges = np.zeros(shape, bool)
    edges[:, :, 0] = edges[:, :, -1] = True
    assert_same_bytes_and_round_trip(edges)
    assert_same_bytes_and_round_trip(~edges)
    stripes = np.zeros(shape, bool)
    stripes[:, :, ::2] = True  # as many runs as a row can have, the same in every row
    assert_same_bytes_and_round_trip(stripes)
    for seed in range(3):
        assert_same_bytes_and_round_trip(ellipsoids(shape, seed))
        assert_same_bytes_and_round_trip(np.random.default_rng(seed).random(shape) < 0.3)


def test_many_slabs_give_the_same_bytes(monkeypatch):
    """The encoder works a slab of slices at a time: slab bounds change nothing (a slice's first
    row is never coded against the slice before)."""
    mask = ellipsoids((11, 21, 19), seed=5, holes=False)
    whole = assert_same_bytes_and_round_trip(mask)
    for voxels in (1, 21 * 19, 3 * 21 * 19 + 5):
        monkeypatch.setattr(roimask, "SLAB_VOXELS", voxels)
        assert assert_same_bytes_and_round_trip(mask) == whole


def test_a_long_series_of_many_short_runs():
    """300 slices of 96 x 100 (not whole bytes per row), many runs per row, chains of rows."""
    rng = np.random.default_rng(15)
    mask = np.repeat(rng.random((300, 8, 100)) < 0.4, 12, axis=1)  # chains of 12 equal rows
    mask[:, ::5] ^= rng.random((300, 20, 100)) < 0.05
    assert_same_bytes_and_round_trip(mask)


def test_runs_larger_than_the_packed_mask_are_not_written():
    """Every other column in the ROI: 32 bytes of row runs (45 of packed bits, zstd 9), but 8695
    bytes of numbers, more than the decoder accepts (4096): no row runs, the mask goes packed."""
    stripes = np.zeros((5, 37, 45), bool)
    stripes[:, :, ::2] = True
    assert assert_same_bytes_and_round_trip(stripes) is None
    mask = ellipsoids((5, 37, 45), seed=1)
    assert assert_same_bytes_and_round_trip(mask) is not None


def test_too_many_rows_for_row_runs():
    shape = (MAX_RUN_ROWS // 4 + 1, 4, 1)
    assert encode_runs(lambda z: np.zeros((4, 1), bool), shape) is None
    assert oracle.encode_runs(lambda z: np.zeros((4, 1), bool), shape) is None
    with pytest.raises(MaskError, match="too many rows"):
        decode_runs(runs([0]), shape)


def test_varints():
    values = [0, 1, 127, 128, 300, 16383, 16384, 2 ** 21, 2 ** 28 - 1, 2 ** 35 - 1, 2 ** 40]
    assert roimask._varints(values) == oracle._varints(values)
    assert roimask._varints([]) == b""
    np.testing.assert_array_equal(roimask._read_varints(roimask._varints(values[:-1])),
                                  values[:-1])


# --- damaged and hostile streams ----------------------------------------------------------------

SHAPE = (2, 3, 8)


@pytest.mark.parametrize("values, message", [
    ([], "end early"),                                     # no row at all
    ([0, 0, 0, 0, 0], "end early"),                        # one row short
    ([2, 1, 3] + [0] * 4, "end early"),                     # a row short after runs
    ([3, 1, 1, 1] + [0] * 5, "invalid switch count"),       # odd
    ([10] + [0] * 10 + [0] * 5, "invalid switch count"),    # more than nx + 1
    ([0] * 5 + [2, 1], "invalid switch count"),             # the last row's numbers cut short
    ([2, 5, 5] + [0] * 5, "out of order or range"),         # stop at 10 > nx
    ([2, 0, 9] + [0] * 5, "out of order or range"),         # stop at 9 > nx
    ([2, 3, 0] + [0] * 5, "out of order or range"),         # a zero gap: not increasing
    ([2, 1, 3, 2, 3, 0] + [0] * 4, "out of order or range"),  # delta row: start at -1
    ([2, 1, 3, 2, 0, 10] + [0] * 4, "out of order or range"),  # delta row: stop past nx
    ([2, 1, 3, 2, 0, 5] + [0] * 4, "out of order or range"),   # delta row: stop before start
    ([2, 0, 8, 2, 0, 0, 2, 0, 0, 2, 7, 1, 2, 1, 0, 2, 1, 0], None),  # chains to the end
    ([2, 0, 8, 2, 0, 0, 2, 0, 16] + [0] * 3, "out of order or range"),  # chain runs past nx
    ([0] * 6 + [7], "data after the last row"),
    ([0] * 6 + [0], "data after the last row"),
    ([4, 0, 1, 1, 1, 4, 0, 0, 0, 0, 4, 2, 2, 2, 1] + [0] * 3, "out of order or range"),
    ([4, 0, 1, 1, 1, 4, 0, 0, 0, 0, 4, 2, 2, 2, 1], "out of order or range"),  # before the end
    ([2, 1, 3, 2, 3, 0, 0, 5], "out of order or range"),  # the first fault is the one told
    ([4, 0, 1, 1, 1, 4, 0, 0, 0, 0, 3] + [0] * 3, "invalid switch count"),
])
def test_hostile_streams_are_refused_as_the_oracle_refuses_them(values, message):
    data = runs(values)
    assert_decoders_agree(data, SHAPE)
    if message is None:  # full rows, then [7, 8), [6, 8), [5, 8) as a chain of delta rows
        expected = np.zeros(SHAPE, bool)
        expected[0] = True
        for y in range(3):
            expected[1, y, 7 - y:] = True
        np.testing.assert_array_equal(decode_runs(data, SHAPE), np.packbits(expected.ravel()))
    else:
        with pytest.raises(MaskError, match=message):
            decode_runs(data, SHAPE)


def test_damaged_bytes_are_refused():
    shape = (1, 2, 8)
    for data, message in (
            (runs([2, 1, 3, 0])[:-3], "ROI runs"),               # the zstd frame cut short
            (b"not zstd at all", "corrupt"),
            (zstandard.ZstdCompressor().compress(b"\x02\x81"), "inside a number"),
            (zstandard.ZstdCompressor().compress(b"\x02\x81\x80\x80\x80\x80\x00\x00\x00"),
             "out of range"),                                  # a 6-byte number
            (zstandard.ZstdCompressor().compress(bytes(4097)), "larger"),
            (zstandard.ZstdCompressor().compress(b""), "end early")):
        assert_decoders_agree(data, shape)
        with pytest.raises(MaskError, match=message):
            decode_runs(data, shape)
    # A stream within the limit but larger than the packed mask of a big shape decodes no more
    # than it may: refused as soon as it holds more than the packed bytes.
    big = (4, 128, 128)
    assert_decoders_agree(zstandard.ZstdCompressor().compress(bytes(8193)), big)
    with pytest.raises(MaskError, match="larger"):
        decode_runs(zstandard.ZstdCompressor().compress(bytes(8193)), big)


@FUZZ
@given(st.lists(st.integers(0, 20), max_size=40), st.integers(1, 3), st.integers(1, 4),
       st.integers(1, 9))
def test_fuzzed_number_streams(values, nz, ny, nx):
    assert_decoders_agree(runs(values), (nz, ny, nx))


@FUZZ
@given(masks(max_rows=5, max_columns=9), st.data())
def test_fuzzed_damage_to_valid_streams(mask, data):
    """A valid stream's numbers edited (a byte replaced, inserted or removed, the end cut): the
    decoders agree on every one."""
    raw = bytearray(zstandard.ZstdDecompressor().decompress(
        oracle.encode_runs(lambda z: mask[z], mask.shape)))
    for _ in range(data.draw(st.integers(1, 3))):
        edit = data.draw(st.sampled_from(("replace", "insert", "remove", "cut")))
        at = data.draw(st.integers(0, len(raw)))
        byte = data.draw(st.integers(0, 255))
        if edit == "replace" and at < len(raw):
            raw[at] = byte
        elif edit == "insert":
            raw.insert(at, byte)
        elif edit == "remove" and at < len(raw):
            del raw[at]
        elif edit == "cut":
            del raw[at:]
    assert_decoders_agree(zstandard.ZstdCompressor().compress(bytes(raw)), mask.shape)


@FUZZ
@given(st.binary(max_size=80), st.integers(1, 3), st.integers(1, 4), st.integers(1, 9))
def test_fuzzed_bytes(data, nz, ny, nx):
    assert_decoders_agree(data, (nz, ny, nx))
    assert_decoders_agree(zstandard.ZstdCompressor().compress(data), (nz, ny, nx))
