"""Rescaling to and from the conv-net's scale: scipy's linear affine transform, and the same
values from any Dask chunking (hypothesis draws shapes, scales and chunks)."""

from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from pipeline.convnet.rescale import rescale_planes, rescale_planes_dask

PROPERTIES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _scipy_rescale(array: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
    """The reference: scipy's order-1 affine transform, output pixel i at input
    (i + 0.5) * n_in / n_out - 0.5, edges repeated."""
    ratios = [i / o for i, o in zip(array.shape[-2:], shape_yx, strict=True)]
    matrix = np.diag([1.0] * (array.ndim - 2) + ratios)
    offset = np.array([0.0] * (array.ndim - 2) + [0.5 * r - 0.5 for r in ratios])
    out_shape = (*array.shape[:-2], *shape_yx)
    return ndi.affine_transform(
        array.astype(np.float64),
        matrix,
        offset=offset,
        output_shape=out_shape,
        order=1,
        mode="nearest",
    )


@st.composite
def cases(draw):
    """An array (lead axes, y, x), a target plane, input chunks and output chunks."""
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    plane_in = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    plane_out = (draw(st.integers(1, 60)), draw(st.integers(1, 60)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    array = rng.normal(size=(*lead, *plane_in)).astype(np.float32)
    chunks_in = tuple(draw(st.integers(1, n)) for n in array.shape)
    chunks_out = (
        *(draw(st.integers(1, n)) for n in lead),
        *(draw(st.integers(1, n)) for n in plane_out),
    )
    return array, plane_out, chunks_in, chunks_out, draw(st.integers(0, 12))


def _grown(chunks: tuple[int, ...], halo: int) -> np.ndarray:
    """The indices of each chunk grown by ``halo`` on both sides (clipped), one after another."""
    edges = np.cumsum((0, *chunks))
    return np.concatenate(
        [
            np.arange(max(0, a - halo), min(edges[-1], b + halo))
            for a, b in itertools.pairwise(edges)
        ]
    )


@PROPERTIES
@given(cases())
def test_rescaling_is_scipys_linear_transform_and_any_chunking_gives_the_same_bits(case) -> None:
    array, plane_out, chunks_in, chunks_out, halo = case
    whole = rescale_planes(array, plane_out)
    assert whole.shape == (*array.shape[:-2], *plane_out)
    assert whole.dtype == np.float32
    np.testing.assert_allclose(whole, _scipy_rescale(array, plane_out), rtol=0, atol=1e-5)
    tiled = rescale_planes_dask(da.from_array(array, chunks=chunks_in), plane_out, chunks_out)
    assert tiled.chunks[-2:] == da.empty(tiled.shape, chunks=chunks_out).chunks[-2:]
    np.testing.assert_array_equal(tiled.compute(), whole)
    # with a halo: every block grown into its neighbours, the same bits as slices of the whole
    grown = rescale_planes_dask(da.from_array(array, chunks=chunks_in), plane_out, chunks_out, halo)
    rows, columns = (_grown(c, halo) for c in tiled.chunks[-2:])
    np.testing.assert_array_equal(grown.compute(), whole[..., rows[:, np.newaxis], columns])
    assert grown.chunks[:-2] == tiled.chunks[:-2]


def test_a_ramp_is_interpolated_exactly_and_edges_are_repeated() -> None:
    ramp = np.arange(4, dtype=np.uint16)[np.newaxis].repeat(2, axis=0)  # values 0 1 2 3 along x
    doubled = rescale_planes(ramp, (2, 8))
    # output pixel i sits at (i + 0.5) / 2 - 0.5 of the input: -0.25 (clamped), 0.25, 0.75, ...
    np.testing.assert_allclose(doubled[0], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])
    assert doubled.dtype == np.float32  # integers are interpolated as float32
    halved = rescale_planes(np.array([[0.0, 2.0, 4.0, 6.0]]), (1, 2))  # at 0.5 and 2.5
    np.testing.assert_allclose(halved, [[1.0, 5.0]])
    assert halved.dtype == np.float64
