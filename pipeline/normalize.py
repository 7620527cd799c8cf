"""Intensity statistics of whole frames and the normalisation the conv-net expects.

DESIGN contract 4: statistics are global per (t, c), never per tile. A frame's histogram is built
the same way in numpy and in Dask (exact integer counts for 8/16-bit images, 4096 equal bins
between the frame's min and max otherwise; Dask sums it over blocks in a tree), so thresholds and
percentiles agree between a whole image and its tiled version.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import dask
import dask.array as da
import numpy as np

__all__ = [
    "DEFAULT_PERCENTILES",
    "frame_histogram",
    "frame_percentiles",
    "frame_statistics",
    "normalize",
    "percentiles_from_histogram",
]

FLOAT_BINS = 4096
DEFAULT_PERCENTILES = (1.0, 99.9)


def _exact_counts(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) and np.dtype(dtype).itemsize <= 2


def frame_histogram(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts and bin centres of one frame (one timepoint and channel, any spatial dims)."""
    frame = np.asarray(frame)
    if _exact_counts(frame.dtype):
        offset = int(np.iinfo(frame.dtype).min)
        counts = np.bincount(frame.ravel().astype(np.int64) - offset)
        return counts, np.arange(counts.size, dtype=np.float64) + offset
    low, high = float(frame.min()), float(frame.max())
    counts, edges = np.histogram(frame, bins=FLOAT_BINS, range=(low, high))
    return counts, _centres(edges)


def _centres(edges: np.ndarray) -> np.ndarray:
    return (edges[:-1] + edges[1:]) / 2.0


def frame_statistics(
    frames: da.Array, statistic: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> da.Array:
    """Apply ``statistic(counts, centres)`` to each frame's histogram of a (t, ...) Dask array.

    Returns a lazy array of shape (t, *statistic's output shape); the pixels stay on the workers.
    """
    values = []
    for t in range(frames.shape[0]):
        frame = frames[t]
        if _exact_counts(frame.dtype):
            offset = int(np.iinfo(frame.dtype).min)
            size = int(np.iinfo(frame.dtype).max) - offset + 1
            counts = da.bincount(frame.ravel().astype(np.int64) - offset, minlength=size)
            centres = np.arange(size, dtype=np.float64) + offset
            value = dask.delayed(statistic)(counts, centres)
        else:
            counts, edges = da.histogram(frame, bins=FLOAT_BINS, range=[frame.min(), frame.max()])
            value = dask.delayed(statistic)(counts, dask.delayed(_centres)(edges))
        sample = np.asarray(statistic(np.ones(2), np.arange(2.0)))
        values.append(da.from_delayed(value, shape=sample.shape, dtype=np.float64))
    return da.stack(values)


def percentiles_from_histogram(
    counts: np.ndarray, centres: np.ndarray, percentiles: Sequence[float] = DEFAULT_PERCENTILES
) -> np.ndarray:
    """Percentiles (0-100) of the values a histogram counts: the first bin whose cumulative count
    reaches each fraction, as float64."""
    counts = np.asarray(counts, dtype=np.float64)
    cumulative = np.cumsum(counts)
    if cumulative.size == 0 or cumulative[-1] == 0:
        return np.zeros(len(percentiles))
    targets = np.asarray(percentiles, dtype=np.float64) / 100.0 * cumulative[-1]
    index = np.searchsorted(cumulative, targets, side="left")
    return np.asarray(centres, dtype=np.float64)[np.minimum(index, cumulative.size - 1)]


def frame_percentiles(
    frames: np.ndarray | da.Array, percentiles: Sequence[float] = DEFAULT_PERCENTILES
) -> np.ndarray | da.Array:
    """Low and high percentiles of every frame of a (t, ...spatial) array, shape (t, 2).

    numpy in, numpy out; Dask in, lazy Dask out with identical values.
    """
    low_high = tuple(float(p) for p in percentiles)

    def statistic(counts: np.ndarray, centres: np.ndarray) -> np.ndarray:
        return percentiles_from_histogram(counts, centres, low_high)

    if isinstance(frames, da.Array):
        return frame_statistics(frames, statistic)
    return np.stack([statistic(*frame_histogram(frame)) for frame in np.asarray(frames)])


def normalize(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low`` to 0 and ``high`` to 1 (float32, not clipped); a flat frame maps to 0."""
    scale = float(high) - float(low)
    scale = 1.0 / scale if scale > 0 else 0.0
    return ((np.asarray(image, dtype=np.float32) - np.float32(low)) * np.float32(scale)).astype(
        np.float32, copy=False
    )
