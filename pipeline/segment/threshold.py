"""Otsu's threshold of a whole frame, from a histogram that Dask builds block by block.

DESIGN contract 4: statistics that set the foreground are global per (t, c), never per tile. The
numpy and the Dask paths build the same histogram (exact integer counts for 8/16-bit images,
4096 equal bins between the frame's min and max otherwise), so they give the same threshold.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
from skimage.filters import threshold_otsu

__all__ = ["frame_threshold", "frame_thresholds"]

FLOAT_BINS = 4096


def _exact_counts(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) and np.dtype(dtype).itemsize <= 2


def _otsu_from_histogram(counts: np.ndarray, edges_or_offset: np.ndarray | int) -> float:
    counts = np.asarray(counts)
    if isinstance(edges_or_offset, np.ndarray):
        centres = (edges_or_offset[:-1] + edges_or_offset[1:]) / 2.0
    else:
        centres = np.arange(counts.size, dtype=np.float64) + edges_or_offset
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return 0.0
    counts = counts[nonzero[0] : nonzero[-1] + 1]
    centres = centres[nonzero[0] : nonzero[-1] + 1]
    if counts.size == 1:
        return float(centres[0])
    return float(threshold_otsu(hist=(counts, centres)))


def _otsu_array(counts: np.ndarray, edges_or_offset: np.ndarray | int) -> np.ndarray:
    return np.asarray(_otsu_from_histogram(counts, edges_or_offset))


def frame_threshold(frame: np.ndarray) -> float:
    """Otsu's threshold of one frame (one timepoint and channel, any number of spatial dims)."""
    frame = np.asarray(frame)
    if _exact_counts(frame.dtype):
        offset = int(np.iinfo(frame.dtype).min)
        counts = np.bincount(frame.ravel().astype(np.int64) - offset)
        return _otsu_from_histogram(counts, offset)
    low, high = float(frame.min()), float(frame.max())
    counts, edges = np.histogram(frame, bins=FLOAT_BINS, range=(low, high))
    return _otsu_from_histogram(counts, edges)


def frame_thresholds(frames: da.Array) -> da.Array:
    """Otsu's threshold of every frame of a (t, ...spatial) Dask array, as a lazy (t,) array.

    Each frame's histogram is summed over its blocks (a tree reduction); pixels stay on workers.
    """
    values = []
    for t in range(frames.shape[0]):
        frame = frames[t]
        if _exact_counts(frame.dtype):
            offset = int(np.iinfo(frame.dtype).min)
            size = int(np.iinfo(frame.dtype).max) - offset + 1
            counts = da.bincount((frame.ravel().astype(np.int64) - offset), minlength=size)
            value = dask.delayed(_otsu_array)(counts, offset)
        else:
            counts, edges = da.histogram(frame, bins=FLOAT_BINS, range=[frame.min(), frame.max()])
            value = dask.delayed(_otsu_array)(counts, edges)
        values.append(da.from_delayed(value, shape=(), dtype=np.float64))
    return da.stack(values) if values else da.zeros((0,), chunks=1)
