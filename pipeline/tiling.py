"""Block plans: which blocks of a field are processed together, and how much halo each one reads.

Blocks follow the storage chunks of the input (so every read is whole chunks), grown to a multiple
of the chunk where a chunk is smaller than the halo, and the last, ragged block of an axis is merged
into its neighbour when it is thinner than the halo (a block must be at least as deep as the halo
that its neighbours borrow from it). A run also makes blocks in y and x several halos long
(:func:`smallest_blocks`), so that the halo read around each block stays a small share of its
work. Halos are given in micrometres and converted per axis, so
anisotropic voxels (z step larger than the xy pixel) get fewer z pixels of halo. Time is never
overlapped: every block holds one timepoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["axis_blocks", "block_chunks", "halo_pixels", "smallest_blocks", "tile_blocks"]


def halo_pixels(
    halo_um: Mapping[str, float], pixel_size: Mapping[str, float], spatial_dims: Sequence[str]
) -> tuple[int, ...]:
    """Convert a halo in micrometres to whole pixels per spatial axis.

    Parameters
    ----------
    halo_um
        ``{"z": ..., "xy": ...}``: halo depth along z and within the image plane, in micrometres.
    pixel_size
        Pixel size per spatial dim in micrometres, e.g. ``{"z": 2.0, "y": 0.5, "x": 0.5}``.
    spatial_dims
        The spatial dims present, ``"yx"`` or ``"zyx"``.

    Returns
    -------
    tuple of int
        Halo in pixels per spatial dim (rounded up).

    Examples
    --------
    >>> halo_pixels({"z": 6.0, "xy": 10.0}, {"z": 2.0, "y": 0.5, "x": 0.5}, "zyx")
    (3, 20, 20)
    """
    return tuple(
        math.ceil(halo_um["z" if dim == "z" else "xy"] / pixel_size[dim] - 1e-9)
        for dim in spatial_dims
    )


def axis_blocks(size: int, storage_chunk: int, halo: int, min_block: int = 1) -> tuple[int, ...]:
    """Block sizes along one axis: whole storage chunks, each block at least as deep as the halo.

    Parameters
    ----------
    size
        Length of the axis in pixels.
    storage_chunk
        The input's chunk length along the axis.
    halo
        Halo depth in pixels along the axis.
    min_block
        Smallest block wanted (e.g. for efficiency); rounded up to whole storage chunks.

    Returns
    -------
    tuple of int
        Block lengths summing to ``size``; all but possibly the last are equal multiples of
        ``storage_chunk`` and every block, if there are several, is at least ``halo`` long.

    Examples
    --------
    >>> axis_blocks(100, 32, 10)
    (32, 32, 36)
    >>> axis_blocks(100, 16, 40)
    (48, 52)
    """
    if size <= 0:
        raise ValueError(f"axis length must be positive, got {size}")
    chunk = max(1, min(storage_chunk, size))
    factor = max(1, math.ceil(max(halo, min_block) / chunk))
    block = chunk * factor
    if block >= size:
        return (size,)
    sizes = [block] * (size // block)
    remainder = size - block * len(sizes)
    if remainder:
        if remainder < halo:
            sizes[-1] += remainder
        else:
            sizes.append(remainder)
    return tuple(sizes)


def tile_blocks(size: int, largest: int, multiple: int, halo: int = 0) -> tuple[int, ...]:
    """Tile sizes along one axis: the fewest tiles of at most ``largest`` pixels, as equal as
    whole multiples of ``multiple`` allow.

    Every tile but the last is a multiple of ``multiple`` (a network's stride, so that every
    tile starts on the stride's grid); the last takes what is left. Equal tiles share the work
    of a frame evenly among workers, where the largest tiles and a thin remainder would leave
    some idle. A tile is never thinner than ``halo`` (that many pixels are borrowed from it by
    its neighbours): there are fewer, larger tiles where needed.

    Examples
    --------
    >>> tile_blocks(1501, 1024, 8)
    (752, 749)
    >>> tile_blocks(2048, 1024, 8)
    (1024, 1024)
    >>> tile_blocks(100, 1024, 8)
    (100,)
    """
    if size <= 0:
        raise ValueError(f"axis length must be positive, got {size}")
    units = math.ceil(size / multiple)
    trim = units * multiple - size  # taken off the last tile
    count = math.ceil(units / max(1, largest // multiple))
    while count > 1 and (units // count) * multiple - trim < halo:
        count -= 1
    quotient, remainder = divmod(units, count)
    sizes = [(quotient + 1) * multiple] * remainder + [quotient * multiple] * (count - remainder)
    sizes[-1] -= trim
    return tuple(sizes)


def smallest_blocks(
    spatial_dims: Sequence[str], halo: Sequence[int], min_block_px: int, block_halos: float
) -> list[int]:
    """The smallest block edge per spatial axis of a run's block plan.

    In y and x a block is at least ``min_block_px`` and at least ``block_halos`` halos long, so
    the halo read around it stays a bounded share of its work: a block of ``k`` halos is read
    with ``(1 + 2 / k)`` times its length along each axis (2.25x its area for ``k = 4``, 3.75x
    for a 256-pixel block in a 120-pixel halo). Along z, where stacks are short, blocks only
    need to be as deep as the halo.

    Examples
    --------
    >>> smallest_blocks("zyx", (3, 120, 120), 256, 4)
    [1, 480, 480]
    >>> smallest_blocks("yx", (20, 20), 256, 4)
    [256, 256]
    """
    return [
        1 if dim == "z" else max(min_block_px, math.ceil(block_halos * h))
        for dim, h in zip(spatial_dims, halo, strict=True)
    ]


def block_chunks(
    shape: Sequence[int],
    storage_chunks: Sequence[int],
    halo: Sequence[int],
    min_block: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], ...]:
    """Dask chunks for the spatial axes of a field: :func:`axis_blocks` applied per axis."""
    min_block = min_block or [1] * len(shape)
    return tuple(
        axis_blocks(n, c, h, m)
        for n, c, h, m in zip(shape, storage_chunks, halo, min_block, strict=True)
    )
