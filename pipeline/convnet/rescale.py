"""Rescaling of image planes to and from the conv-net's scale, whole or in Dask blocks.

Linear interpolation with pixel centres aligned and edges repeated (scipy's
``affine_transform(order=1, mode="nearest")`` with a diagonal matrix, to float rounding), done
separably: along y, then along x, each output pixel from the two input pixels nearest its
position. Each output pixel's positions and weights are computed from its index in the whole
plane, so a block computed on its own is bit for bit the same part of the whole-plane result
(the tiled == whole contract, whatever the chunks). Separable, it is 7 to 12 times faster than
scipy's general affine transform on one frame (``python benchmarks/rescale_speed.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import dask.array as da
import numpy as np
from dask.array.core import normalize_chunks

from pipeline.windows import extended_windows, map_windows

__all__ = ["rescale_planes", "rescale_planes_dask"]


def _axis_weights(
    n_in: int, n_out: int, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Output pixels ``start:stop`` of an axis of ``n_in`` pixels rescaled to ``n_out``: the
    input pixels below and above each one's position, and the weight of the one above."""
    position = (np.arange(start, stop) + 0.5) * (n_in / n_out) - 0.5
    position = np.clip(position, 0.0, n_in - 1.0)
    below = np.floor(position).astype(np.intp)
    above = np.minimum(below + 1, n_in - 1)
    return below, above, (position - below).astype(np.float32)


def _rescaled_window(
    piece: np.ndarray,
    plane_in: Sequence[int],
    plane_out: Sequence[int],
    window: Sequence[tuple[int, int]],
    origin: Sequence[int],
) -> np.ndarray:
    """Output pixels ``window`` ((start, stop) along y and x) of a plane of ``plane_in`` pixels
    rescaled to ``plane_out``, from ``piece``, the part of the input whose first pixel is at
    ``origin`` (and which holds every input pixel the window needs)."""
    out = piece if np.issubdtype(piece.dtype, np.floating) else piece.astype(np.float32)
    for axis, n_in, n_out, (start, stop), first in zip(
        (-2, -1), plane_in, plane_out, window, origin, strict=True
    ):
        below, above, weight = _axis_weights(n_in, n_out, start, stop)
        if n_in == n_out:  # positions fall on pixels: weights 0
            out = np.take(out, below - first, axis=axis)
            continue
        weight = weight.reshape((-1, 1) if axis == -2 else (-1,)).astype(out.dtype)
        # below * (1 - weight) + above * weight, in two buffers instead of five temporaries
        # (the same float operations in the same order: the same bits)
        low = np.take(out, below - first, axis=axis)
        low *= 1 - weight
        high = np.take(out, above - first, axis=axis)
        high *= weight
        low += high
        out = low
    return out


def rescale_planes(array: np.ndarray, shape_yx: Sequence[int]) -> np.ndarray:
    """Rescale the last two axes to ``shape_yx``: linear, pixel centres aligned, edges repeated.

    Training and inference rescale the same way; :func:`rescale_planes_dask` gives the same
    values. Floating arrays keep their dtype, others become float32.
    """
    shape_yx = tuple(shape_yx)
    if tuple(array.shape[-2:]) == shape_yx:
        return array
    window = tuple((0, n) for n in shape_yx)
    return _rescaled_window(np.asarray(array), array.shape[-2:], shape_yx, window, (0, 0))


def _input_span(n_in: int, n_out: int, start: int, stop: int) -> tuple[int, int]:
    """The input pixels (start, stop) that output pixels ``start:stop`` are made from."""
    below, above, _ = _axis_weights(n_in, n_out, start, stop)
    return int(below[0]), int(above[-1]) + 1


def rescale_planes_dask(
    array: da.Array,
    shape_yx: Sequence[int],
    chunks: Sequence[int | tuple[int, ...]],
    halo: int = 0,
) -> da.Array:
    """:func:`rescale_planes` on Dask, into ``chunks`` (all axes), equal to it bit for bit.

    Each output block is one task on the input chunks it needs
    (:func:`pipeline.windows.map_windows`). With a ``halo``, each block is grown by that many
    output pixels into its neighbours (not beyond the plane), as
    ``dask.array.overlap.overlap(..., boundary="none")`` of the rescaled array would give,
    without the tasks that overlap takes.
    """
    shape_yx = tuple(shape_yx)
    plane_in = tuple(array.shape[-2:])
    if plane_in == shape_yx and halo == 0:  # as rescale_planes: the array itself
        return array.rechunk(tuple(chunks))
    target = normalize_chunks(tuple(chunks), (*array.shape[:-2], *shape_yx))
    array = array.rechunk((*target[:-2], *array.chunks[-2:]))
    out_windows = [extended_windows(axis_chunks, halo) for axis_chunks in target[-2:]]
    in_windows = [
        [_input_span(n_in, n_out, *window) for window in axis]
        for n_in, n_out, axis in zip(plane_in, shape_yx, out_windows, strict=True)
    ]
    function = partial(
        _rescaled_block,
        plane_in=plane_in,
        plane_out=shape_yx,
        out_windows=out_windows,
        in_windows=in_windows,
    )
    return map_windows(
        array,
        in_windows,
        function,
        [tuple(stop - start for start, stop in axis) for axis in out_windows],
        dtype=np.result_type(array.dtype, np.float32),
        name="rescale",
    )


def _rescaled_block(
    piece: np.ndarray,
    index: tuple[int, int],
    *,
    plane_in: tuple[int, int],
    plane_out: tuple[int, int],
    out_windows: list[list[tuple[int, int]]],
    in_windows: list[list[tuple[int, int]]],
) -> np.ndarray:
    """Output window ``index`` (y, x) of :func:`rescale_planes_dask` from its input ``piece``."""
    window = tuple(axis[i] for axis, i in zip(out_windows, index, strict=True))
    origin = tuple(axis[i][0] for axis, i in zip(in_windows, index, strict=True))
    return _rescaled_window(piece, plane_in, plane_out, window, origin)
