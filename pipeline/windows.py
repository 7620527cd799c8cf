"""Windows of a Dask array as the blocks of a new one, each made by one task.

Dask's ``overlap`` and slicing build a halo-grown or rescaled block from several tasks: a
slice of every neighbouring chunk, then a concatenation. One field of a few frames becomes a
thousand small tasks whose scheduling costs more than their work. :func:`map_windows` makes
each output block in one task, from the whole input chunks its window overlaps: the task
assembles the window and hands it to a function. :func:`halo_blocks` is Dask's
``overlap(..., boundary="none")`` made so.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

__all__ = ["extended_windows", "halo_blocks", "map_windows"]

Window = tuple[int, int]


@dataclass(frozen=True)
class _Placement:
    """Where one input chunk's part (``source``) goes in a window (``target``)."""

    source: tuple[slice, ...]
    target: tuple[slice, ...]


def _pieces(bounds: np.ndarray, start: int, stop: int) -> list[tuple[int, slice, slice]]:
    """The chunks along one axis (edges ``bounds``) that ``start:stop`` overlaps: each one's
    index, the slice of it that is taken, and where that goes in the window."""
    first = int(np.searchsorted(bounds, start, side="right")) - 1
    last = int(np.searchsorted(bounds, stop, side="left")) - 1
    pieces = []
    for index in range(first, last + 1):
        low, high = max(start, int(bounds[index])), min(stop, int(bounds[index + 1]))
        chunk_start = int(bounds[index])
        pieces.append(
            (index, slice(low - chunk_start, high - chunk_start), slice(low - start, high - start))
        )
    return pieces


def _window(
    function: Callable[[np.ndarray, tuple[int, ...]], np.ndarray] | None,
    index: tuple[int, ...],
    shape: tuple[int, ...],
    placements: list[_Placement],
    chunks: list[np.ndarray],
) -> np.ndarray:
    """Assemble one window from its input chunks and apply ``function`` to it."""
    if len(chunks) == 1:  # the window lies in one chunk
        region = chunks[0][(..., *placements[0].source)]
    else:
        region = np.empty(chunks[0].shape[: chunks[0].ndim - len(shape)] + shape, chunks[0].dtype)
        for placement, chunk in zip(placements, chunks, strict=True):
            region[(..., *placement.target)] = chunk[(..., *placement.source)]
    return region if function is None else function(region, index)


def map_windows(
    array: da.Array,
    windows: Sequence[Sequence[Window]],
    function: Callable[[np.ndarray, tuple[int, ...]], np.ndarray] | None,
    chunks: Sequence[tuple[int, ...]],
    *,
    dtype: np.dtype | type,
    name: str,
) -> da.Array:
    """A Dask array whose blocks are ``function`` of windows of ``array``, one task each.

    Parameters
    ----------
    array
        The input; its last ``len(windows)`` axes are windowed, the others keep their chunks
        (each output block takes the matching block of them).
    windows
        Per windowed axis, the (start, stop) of each output block's window along it; output
        block ``(..., i, j)`` is made from ``array[..., start_i:stop_i, start_j:stop_j]``.
        Windows may overlap and need not follow the input's chunks.
    function
        ``function(region, (i, j, ...))`` gives the output block of that window (the block's
        index along the windowed axes); None: the region itself.
    chunks
        The output's chunks along the windowed axes (one per window).
    dtype
        The output's dtype.
    name
        Prefix of the output's name (its task keys), which is completed by a token of the
        inputs, so equal inputs give the same keys.
    """
    spatial = len(windows)
    lead = array.ndim - spatial
    output = f"{name}-{tokenize(array.name, windows, function, chunks, dtype)}"
    bounds = [np.cumsum((0, *axis_chunks)) for axis_chunks in array.chunks[lead:]]
    graph = {}
    for index in itertools.product(*(range(len(axis)) for axis in windows)):
        window = [windows[axis][i] for axis, i in enumerate(index)]
        shape = tuple(stop - start for start, stop in window)
        per_axis = [_pieces(bounds[axis], *window[axis]) for axis in range(spatial)]
        placements = [
            _Placement(tuple(p[1] for p in combo), tuple(p[2] for p in combo))
            for combo in itertools.product(*per_axis)
        ]
        chunk_ids = [tuple(p[0] for p in combo) for combo in itertools.product(*per_axis)]
        for lead_index in itertools.product(*(range(n) for n in array.numblocks[:lead])):
            keys = [(array.name, *lead_index, *ids) for ids in chunk_ids]
            graph[(output, *lead_index, *index)] = (
                _window,
                function,
                index,
                shape,
                placements,
                keys,
            )
    layer = HighLevelGraph.from_collections(output, graph, dependencies=[array])
    return da.Array(
        layer,
        output,
        chunks=(*array.chunks[:lead], *chunks),
        dtype=dtype,
        meta=np.empty((0,) * array.ndim, dtype=dtype),
    )


def extended_windows(chunks: Sequence[int], halo: int) -> list[Window]:
    """Each chunk's (start, stop) along an axis grown by ``halo`` on both sides, clipped to
    the axis."""
    stops = np.cumsum(chunks).tolist()
    size = stops[-1] if stops else 0
    return [
        (max(0, stop - n - halo), min(size, stop + halo))
        for n, stop in zip(chunks, stops, strict=True)
    ]


def halo_blocks(array: da.Array, halo: Sequence[int]) -> da.Array:
    """Each block of ``array`` grown by ``halo`` pixels into its neighbours along the last
    ``len(halo)`` axes (not beyond the array's edges), one task per block; equal to
    ``dask.array.overlap.overlap(array, depth, boundary="none")``."""
    lead = array.ndim - len(halo)
    windows = [
        extended_windows(axis_chunks, depth)
        for axis_chunks, depth in zip(array.chunks[lead:], halo, strict=True)
    ]
    chunks = [tuple(stop - start for start, stop in axis) for axis in windows]
    return map_windows(array, windows, None, chunks, dtype=array.dtype, name="halo")
