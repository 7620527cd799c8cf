"""Otsu's threshold of a whole frame, from its histogram (see :mod:`pipeline.normalize`).

Contract 4 of docs/ARCHITECTURE.md: statistics that set the foreground are global per (t, c),
never per tile; the numpy and the Dask paths build the same histogram, so they give the same
threshold.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
from skimage.filters import threshold_otsu

from pipeline.normalize import frame_histogram, frame_statistics

__all__ = ["frame_threshold", "frame_thresholds", "otsu_from_histogram"]


def otsu_from_histogram(counts: np.ndarray, centres: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts)
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return np.asarray(0.0)
    counts = counts[nonzero[0] : nonzero[-1] + 1]
    centres = np.asarray(centres)[nonzero[0] : nonzero[-1] + 1]
    if counts.size == 1:
        return np.asarray(float(centres[0]))
    return np.asarray(float(threshold_otsu(hist=(counts, centres))))


def frame_threshold(frame: np.ndarray) -> float:
    """Otsu's threshold of one frame (one timepoint and channel, any number of spatial dims)."""
    return float(otsu_from_histogram(*frame_histogram(frame)))


def frame_thresholds(frames: da.Array) -> da.Array:
    """Otsu's threshold of every frame of a (t, ...spatial) Dask array, as a lazy (t,) array.

    Each frame's histogram is summed over its blocks (a tree reduction); pixels stay on workers.
    """
    if frames.shape[0] == 0:
        return da.zeros((0,), chunks=1)
    return frame_statistics(frames, otsu_from_histogram)
