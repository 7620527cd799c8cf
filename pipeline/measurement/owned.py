"""Per-cell tables over Dask blocks, each cell measured whole by the one block that owns it.

Medians, mixtures, shape and texture features do not merge across blocks. So every cell is
measured by the block whose core holds the cell's first pixel in raster order, over the block's
core plus a halo: the block sees the whole cell, and any measurement of it equals the
whole-image value. A block raises :class:`~pipeline.errors.HaloTooSmall` when a cell it owns
reaches an inner face of its extended region (its halo is too small for the cell).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from pipeline.errors import HaloTooSmall
from pipeline.windows import halo_blocks

__all__ = ["cell_windows", "owned_cell_table", "owned_ids", "zero_padded_crop"]

FrameTable = Callable[..., pd.DataFrame]


def owned_ids(
    cells: np.ndarray, core: Sequence[slice], inner: Sequence[tuple[bool, bool]]
) -> np.ndarray:
    """Ids of the cells of an extended block whose first pixel lies in its ``core``.

    Raises
    ------
    HaloTooSmall
        One of them touches an inner face of the extended block (``inner``: per axis, whether
        the low and the high face border another block).
    """
    ids, first = np.unique(cells.ravel(), return_index=True)
    keep = ids > 0
    ids, first = ids[keep], first[keep]
    coordinates = np.unravel_index(first, cells.shape)
    owned = np.ones(ids.size, dtype=bool)
    for axis, piece in enumerate(core):
        start, stop, _ = piece.indices(cells.shape[axis])
        owned &= (coordinates[axis] >= start) & (coordinates[axis] < stop)
    ids = ids[owned]
    for axis, (low, high) in enumerate(inner):
        for face, borders in ((0, low), (-1, high)):
            if borders and np.isin(ids, np.take(cells, face, axis=axis)).any():
                raise HaloTooSmall("a cell does not fit in the halo; increase tiling.halo_um")
    return ids


def _block_table(
    cells: np.ndarray,
    *others: np.ndarray,
    t: int,
    core: tuple[slice, ...],
    inner: list[tuple[bool, bool]],
    frame_table: FrameTable,
) -> pd.DataFrame:
    """``frame_table(cells, *others, ids=owned)`` of one extended block of one frame."""
    ids = owned_ids(cells, core, inner)
    return frame_table(cells, *others, ids=ids).assign(t=t)


def owned_cell_table(
    cells: da.Array,
    others: Sequence[da.Array],
    frame_table: FrameTable,
    halo: Sequence[int],
    meta: pd.DataFrame,
) -> dd.DataFrame:
    """A per-cell table of (t, ...spatial) Dask labels, each cell measured whole (module notes).

    Parameters
    ----------
    cells
        Labels (t, ...spatial); spatial chunks at least ``halo``.
    others
        Arrays read alongside, (t, ...spatial) or (t, c, ...spatial), rechunked like ``cells``.
    frame_table
        ``frame_table(cells, *others, ids=ids)`` -> one row per id (a ``label`` column), on one
        frame's extended block; the ``t`` column is added.
    halo
        Pixels per spatial axis.
    meta
        An empty frame of the result's columns and dtypes.

    Returns
    -------
    dask.dataframe.DataFrame
        Lazy; computing it raises :class:`~pipeline.errors.HaloTooSmall` where a cell does not
        fit in the halo.
    """
    spatial_chunks = cells.chunks[1:]
    frames = (1,) * cells.shape[0]
    cells = cells.rechunk((frames, *spatial_chunks))
    halo = tuple(int(h) for h in halo)
    extended = [halo_blocks(cells, halo).to_delayed()]
    for array in others:
        leading = array.ndim - cells.ndim  # a channel axis after t
        chunks = (frames, *array.shape[1 : 1 + leading], *spatial_chunks)
        overlapped = halo_blocks(array.rechunk(chunks), halo)
        extended.append(overlapped.to_delayed().reshape(cells.numblocks))
    counts = [len(c) for c in spatial_chunks]
    tables = []
    for index in np.ndindex(cells.numblocks):
        location = index[1:]
        inner = [(i > 0, i < n - 1) for i, n in zip(location, counts, strict=True)]
        core = tuple(
            slice(h if low else 0, -h if high and h else None)
            for h, (low, high) in zip(halo, inner, strict=True)
        )
        blocks = [dask.delayed(itemgetter(0))(blocks[index]) for blocks in extended]
        tables.append(
            dask.delayed(_block_table)(
                *blocks, t=index[0], core=core, inner=inner, frame_table=frame_table
            )
        )
    return dd.from_delayed(tables, meta=meta, verify_meta=False)


def zero_padded_crop(array: np.ndarray, origin: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """``array[origin : origin + shape]``, zero where that reaches outside the array."""
    out = np.zeros(tuple(shape), dtype=array.dtype)
    source = tuple(
        slice(max(o, 0), min(o + n, size))
        for o, n, size in zip(origin, shape, array.shape, strict=True)
    )
    target = tuple(slice(s.start - o, s.stop - o) for s, o in zip(source, origin, strict=True))
    out[target] = array[source]
    return out


def cell_windows(
    labels: np.ndarray, ids: np.ndarray, margin: int
) -> Iterator[tuple[int, list[int], list[int]]]:
    """Each cell of ``ids`` with the origin and shape of its window: its bounding box in
    ``labels`` grown by ``margin`` pixels on every side (it may reach beyond the array: cut it
    with :func:`zero_padded_crop`). A measurement of such a crop does not depend on where the
    cell lies in the array, or in a block of it."""
    sequential, forward, _ = relabel_sequential(labels)  # ids may be large (global raster ids)
    boxes = ndi.find_objects(sequential)
    for label in ids:
        box = boxes[forward[label] - 1]
        origin = [piece.start - margin for piece in box]
        yield label, origin, [piece.stop - piece.start + 2 * margin for piece in box]
