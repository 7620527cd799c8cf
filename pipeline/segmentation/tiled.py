"""Exact tiled instance segmentation on Dask (contract 2 of docs/ARCHITECTURE.md).

Each block reads its core plus a halo, segments the whole extended region, and keeps the pixels of
its core. A cell's id is derived from the cell itself: ``1 + the global raster index (t, z, y, x)
of its first pixel``. Every block that sees a whole cell computes the same cell and so the same id,
without talking to its neighbours; a cell is therefore never joined to another merely because it
touches a block face, and never split.

That holds for every cell whose surroundings fit in the halo. Each block checks it: every cell in
its core, and every cell touching one of those, must stay farther from an inner face of the
extended region than its own distance-transform value plus the recipe's influence radius. A block
where that fails raises :class:`HaloTooSmall`; the run then recomputes the field with a larger
halo (see :mod:`pipeline.orchestration.field`). Ids are finally renumbered 1..n per field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol, TypeVar

import dask
import dask.array as da
import numpy as np
from distributed import Future, wait

from pipeline.errors import HaloTooSmall
from pipeline.windows import halo_blocks

__all__ = [
    "HaloTooSmall",
    "Recipe",
    "label_dtype",
    "label_frames",
    "raise_first_error",
    "relabel_consecutive",
    "sorted_ids",
    "with_halo_retries",
]

T = TypeVar("T")


class Recipe(Protocol):
    """A segmentation recipe on one image region, as :func:`label_frames` runs it per block."""

    def influence_radius_um(self) -> float:
        """How far (um) a pixel's result depends on its surroundings beyond its own cell."""

    def cells(
        self, region: np.ndarray, frame_value: float, pixel_size: Sequence[float]
    ) -> tuple[np.ndarray, Callable[[], np.ndarray]]:
        """Cells (int labels) of a region ([k,] *spatial), and a function that gives the
        foreground's EDT in um (called only where a block has inner faces to check)."""

    def filter(
        self,
        cells: np.ndarray,
        pixel_size: Sequence[float],
        border_faces: Sequence[tuple[bool, bool]] | None = None,
    ) -> np.ndarray:
        """Cells that survive the recipe's size and border filters."""


def with_halo_retries(
    attempt: Callable[[dict[str, float]], T], halo_um: dict[str, float], retries: int
) -> T:
    """``attempt(halo_um)``, again with the halo doubled each time it raises
    :class:`HaloTooSmall`, at most ``retries`` more times (then the error propagates).

    The one retry rule of both ``pipeline run`` and ``pipeline.segment`` on Dask input.
    """
    while True:
        try:
            return attempt(halo_um)
        except HaloTooSmall:
            if retries <= 0:
                raise
            retries -= 1
            halo_um = {axis: 2.0 * value for axis, value in halo_um.items()}


def raise_first_error(futures: Sequence[Future]) -> None:
    """Wait for ``futures`` and raise the error of the first that failed (e.g. ``HaloTooSmall``,
    which :func:`with_halo_retries` catches), if any. No futures: nothing to wait for."""
    if not futures:
        return
    wait(futures)
    for future in futures:
        if future.status == "error":
            future.result()


def label_dtype(n_pixels: int) -> np.dtype:
    """Smallest unsigned dtype that can number one object per pixel, so ids never overflow."""
    return np.dtype(np.uint32) if n_pixels < np.iinfo(np.uint32).max else np.dtype(np.uint64)


def _core_bounds(chunks: Sequence[int], index: int) -> tuple[int, int]:
    start = int(sum(chunks[:index]))
    return start, start + int(chunks[index])


def _distance_to_inner_faces(
    shape: Sequence[int], pixel_size: Sequence[float], inner: Sequence[tuple[bool, bool]]
) -> np.ndarray:
    """Micrometres from each pixel to the first pixel beyond an inner face (inf: no inner face)."""
    distance = np.full(tuple(shape), np.inf)
    for axis, (n, step, (low, high)) in enumerate(zip(shape, pixel_size, inner, strict=True)):
        coords = np.arange(n, dtype=np.float64)
        along = np.full(n, np.inf)
        if low:
            along = np.minimum(along, (coords + 1) * step)
        if high:
            along = np.minimum(along, (n - coords) * step)
        view = [np.newaxis] * len(shape)
        view[axis] = slice(None)
        distance = np.minimum(distance, along[tuple(view)])
    return distance


def _check_cells_fit(
    cells: np.ndarray,
    distance: Callable[[], np.ndarray],
    core: tuple[slice, ...],
    pixel_size: Sequence[float],
    inner: Sequence[tuple[bool, bool]],
    margin_um: float,
    where: str,
) -> None:
    """Raise :class:`HaloTooSmall` if a core cell, or a cell touching one, nears an inner face."""
    if not any(low or high for low, high in inner):
        return
    core_cells = np.unique(cells[core])
    core_cells = core_cells[core_cells > 0]
    if core_cells.size == 0:
        return
    checked = np.zeros(int(cells.max()) + 1, dtype=bool)
    checked[core_cells] = True
    for axis in range(cells.ndim):
        a = np.moveaxis(cells, axis, 0)[:-1]
        b = np.moveaxis(cells, axis, 0)[1:]
        touching = (a != b) & (a > 0) & (b > 0)
        pairs_a, pairs_b = a[touching], b[touching]
        checked[pairs_b[checked[pairs_a]]] = True
        checked[pairs_a[checked[pairs_b]]] = True
    checked[0] = False
    in_checked = checked[cells]
    room = _distance_to_inner_faces(cells.shape, pixel_size, inner)
    if np.any(distance()[in_checked] + margin_um >= room[in_checked]):
        raise HaloTooSmall(f"a cell near {where} does not fit in the halo; increase tiling.halo_um")


def _label_block(
    block: np.ndarray,
    frame_value: np.ndarray,
    *,
    core_chunks: tuple[tuple[int, ...], ...],
    halo: tuple[int, ...],
    pixel_size: tuple[float, ...],
    recipe: Recipe,
    dtype: np.dtype,
    block_id: tuple[int, ...],
) -> np.ndarray:
    """Segment one extended block (1, [k,] *spatial) and return its core as global cell ids."""
    n_spatial = len(pixel_size)
    lead = block.ndim - n_spatial
    t = int(sum(core_chunks[0][: block_id[0]]))
    spatial_chunks, spatial_ids = core_chunks[-n_spatial:], block_id[-n_spatial:]
    shape = tuple(int(sum(c)) for c in spatial_chunks)
    ext_start, core, inner, border = [], [], [], []
    for axis, (chunks, index, depth) in enumerate(
        zip(spatial_chunks, spatial_ids, halo, strict=True)
    ):
        start, stop = _core_bounds(chunks, index)
        low, high = min(depth, start), min(depth, shape[axis] - stop)
        if block.shape[lead + axis] != low + (stop - start) + high:
            raise AssertionError("overlapped block does not match the block plan")
        ext_start.append(start - low)
        core.append(slice(low, low + stop - start))
        inner.append((start - low > 0, stop + high < shape[axis]))
        border.append((start - low == 0, stop + high == shape[axis]))
    cells, distance = recipe.cells(block[0], float(frame_value.ravel()[0]), pixel_size)
    origin = tuple(c.start + e for c, e in zip(core, ext_start, strict=True))
    where = f"t={t}, block starting at {origin}"
    _check_cells_fit(
        cells, distance, tuple(core), pixel_size, inner, recipe.influence_radius_um(), where
    )
    cells = recipe.filter(cells, pixel_size, border)
    values, first = np.unique(cells.ravel(), return_index=True)
    local = np.unravel_index(first, cells.shape)
    global_coords = (
        np.full(first.shape, t),
        *(c + e for c, e in zip(local, ext_start, strict=True)),
    )
    ids = np.ravel_multi_index(global_coords, (int(sum(core_chunks[0])), *shape)).astype(dtype) + 1
    ids[values == 0] = 0
    lookup = np.zeros(int(values.max()) + 1, dtype=dtype)
    lookup[values] = ids
    return lookup[cells[tuple(core)]][np.newaxis]


def label_frames(
    frames: da.Array,
    frame_values: da.Array | None = None,
    *,
    recipe: Recipe,
    pixel_size: Sequence[float],
    halo: Sequence[int],
) -> da.Array:
    """Tiled instance segmentation of a (t, [k,] [z,] y, x) Dask array.

    Parameters
    ----------
    frames
        One channel of intensities (t, *spatial), or k maps per pixel (t, k, *spatial) such as
        the conv-net's outputs; one chunk per timepoint along t and one along k; spatial chunks
        are the blocks (see :func:`pipeline.tiling.block_chunks`), each at least as deep as
        ``halo``.
    frame_values
        A value per timepoint, shape (t,), that the recipe takes (the classical recipe's
        threshold); None gives zeros.
    recipe
        The segmentation recipe run on each block (:class:`Recipe`).
    pixel_size
        Micrometres per pixel along each spatial axis.
    halo
        Halo depth in pixels per spatial axis.

    Returns
    -------
    dask.array.Array
        Global cell ids (unsigned; 0 = background) with the chunks of ``frames``; renumber with
        :func:`relabel_consecutive`.
    """
    lead = frames.ndim - len(pixel_size)
    frames = frames.rechunk({axis: 1 if axis == 0 else -1 for axis in range(lead)})
    spatial = frames.shape[lead:]
    halo = tuple(int(min(h, n)) for h, n in zip(halo, spatial, strict=True))
    overlapped = halo_blocks(frames, halo)
    if frame_values is None:
        frame_values = da.zeros(frames.shape[0], chunks=1)
    per_frame = frame_values.rechunk(1).reshape(frame_values.shape + (1,) * (frames.ndim - 1))
    dtype = label_dtype(frames.shape[0] * int(np.prod(spatial)) + 1)
    function = partial(
        _label_block,
        core_chunks=frames.chunks,
        halo=halo,
        pixel_size=tuple(float(s) for s in pixel_size),
        recipe=recipe,
        dtype=dtype,
    )
    out_chunks = (frames.chunks[0], *frames.chunks[lead:])
    drop = tuple(range(1, lead))
    return da.map_blocks(
        function, overlapped, per_frame, chunks=out_chunks, drop_axis=drop, dtype=dtype
    )


def _unique_nonzero(block: np.ndarray) -> np.ndarray:
    values = np.unique(block)
    return values[values > 0]


def _union(*arrays: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate(arrays))


def sorted_ids(labels: da.Array, split_every: int = 16) -> dask.delayed:
    """Sorted unique non-zero ids of a label array, by a tree of small unions (lazy)."""
    parts = [dask.delayed(_unique_nonzero)(block) for block in labels.to_delayed().ravel()]
    while len(parts) > 1:
        parts = [
            dask.delayed(_union)(*parts[i : i + split_every])
            for i in range(0, len(parts), split_every)
        ]
    return parts[0] if parts else dask.delayed(np.zeros)(0, dtype=labels.dtype)


def _renumber(block: np.ndarray, ids: np.ndarray, dtype: np.dtype) -> np.ndarray:
    numbers = np.searchsorted(ids, block).astype(dtype) + 1
    return np.where(block == 0, 0, numbers).astype(dtype, copy=False)


def relabel_consecutive(labels: da.Array, ids) -> da.Array:
    """Renumber global cell ids to 1..n in the order of ``ids`` (sorted, see :func:`sorted_ids`)."""
    dtype = label_dtype(int(np.prod(labels.shape)) + 1)
    return da.map_blocks(partial(_renumber, dtype=dtype), labels, ids, dtype=dtype)
