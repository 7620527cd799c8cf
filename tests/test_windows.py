"""Windows of a Dask array as blocks made by one task each: the same values as Dask's own
overlap and as slicing the whole array, from any chunking (hypothesis draws them)."""

from __future__ import annotations

import dask.array as da
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.windows import halo_blocks, map_windows

PROPERTIES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def chunked_arrays(draw):
    """An array with one or two leading axes and two windowed ones, and its chunks."""
    shape = (
        draw(st.integers(1, 3)),
        *(draw(st.integers(1, 3)) for _ in range(draw(st.integers(0, 1)))),
        draw(st.integers(1, 30)),
        draw(st.integers(1, 30)),
    )
    chunks = tuple(draw(st.integers(1, n)) for n in shape)
    values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 1000, shape)
    return da.from_array(values, chunks=chunks), values


@PROPERTIES
@given(chunked_arrays(), st.integers(0, 8), st.integers(0, 8))
def test_halo_blocks_are_dasks_overlap_in_one_task_per_block(case, halo_y, halo_x) -> None:
    array, _ = case
    halo_y, halo_x = (min(h, *c) for h, c in zip((halo_y, halo_x), array.chunks[-2:], strict=True))
    grown = halo_blocks(array, (halo_y, halo_x))
    lead = array.ndim - 2
    depth = {axis: 0 for axis in range(lead)} | {lead: halo_y, lead + 1: halo_x}
    reference = da.overlap.overlap(array, depth=depth, boundary="none")
    assert grown.chunks == reference.chunks
    np.testing.assert_array_equal(grown.compute(), reference.compute())
    assert len(grown.dask.layers[grown.name]) == np.prod(grown.numblocks)


@PROPERTIES
@given(chunked_arrays(), st.data())
def test_any_windows_are_the_slices_of_the_whole_array_given_to_the_function(case, data) -> None:
    array, values = case

    def windows_along(n: int) -> list[tuple[int, int]]:
        starts = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4))
        return [(s, data.draw(st.integers(s + 1, n))) for s in starts]

    windows = [windows_along(n) for n in array.shape[-2:]]

    def summed(region: np.ndarray, index: tuple[int, int]) -> np.ndarray:
        return region.sum(axis=(-2, -1), keepdims=True) + 1000 * np.array(index).sum()

    chunks = [(1,) * len(axis) for axis in windows]
    result = map_windows(array, windows, summed, chunks, dtype=values.dtype, name="sum")
    expected = np.empty(result.shape, dtype=values.dtype)
    for i, (y0, y1) in enumerate(windows[0]):
        for j, (x0, x1) in enumerate(windows[1]):
            expected[..., i, j] = values[..., y0:y1, x0:x1].sum(axis=(-2, -1)) + 1000 * (i + j)
    np.testing.assert_array_equal(result.compute(), expected)
    # the identity: each block is its window
    plain = map_windows(
        array,
        windows,
        None,
        [tuple(b - a for a, b in axis) for axis in windows],
        dtype=values.dtype,
        name="w",
    )
    blocks = plain.blocks
    first = tuple(0 for _ in range(array.ndim - 2))
    np.testing.assert_array_equal(
        blocks[(*first, 0, 0)].compute(),
        values[tuple(slice(0, c[0]) for c in array.chunks[:-2])][
            ..., slice(*windows[0][0]), slice(*windows[1][0])
        ],
    )
