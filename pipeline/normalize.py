"""Intensity statistics of whole frames and the normalisation the conv-net expects.

Contract 4 of docs/ARCHITECTURE.md: statistics are global per (t, c), never per tile. A frame's
histogram is built the same way in numpy and in Dask (exact integer counts for 8/16-bit images,
4096 equal bins between the frame's min and max otherwise; Dask sums it over blocks in a tree),
so thresholds and percentiles agree between a whole image and its tiled version.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import dask
import dask.array as da
import numpy as np

__all__ = [
    "DEFAULT_PERCENTILES",
    "POLARITIES",
    "colour_to_grey",
    "frame_histogram",
    "frame_percentiles",
    "frame_statistics",
    "is_dark_on_light",
    "limits_from_histogram",
    "normalize",
    "percentiles_from_histogram",
]

FLOAT_BINS = 4096
DEFAULT_PERCENTILES = (1.0, 99.9)
POLARITIES = ("auto", "bright", "dark")
DARK_MEDIAN_POSITION = 0.5


def _exact_counts(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) and np.dtype(dtype).itemsize <= 2


def frame_histogram(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts and bin centres of one frame (one timepoint and channel, any spatial dims)."""
    frame = np.asarray(frame)
    if _exact_counts(frame.dtype):
        offset = int(np.iinfo(frame.dtype).min)
        counts = np.bincount(frame.ravel().astype(np.int64) - offset)
        return counts, np.arange(counts.size, dtype=np.float64) + offset
    low, high = _finite_range(frame.min(), frame.max())
    counts, edges = np.histogram(frame, bins=FLOAT_BINS, range=(low, high))
    return counts, _centres(edges)


def _finite_range(low: float, high: float) -> np.ndarray:
    """A frame's [min, max], refused when the frame holds NaN or infinite pixels."""
    low, high = float(low), float(high)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(
            "the image has NaN or infinite pixels; replace them first (e.g. numpy.nan_to_num), "
            "or in a run set input.non_finite: zero"
        )
    return np.array([low, high])


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
            limits = da.from_delayed(
                dask.delayed(_finite_range)(frame.min(), frame.max()), shape=(2,), dtype=float
            )
            counts, edges = da.histogram(frame, bins=FLOAT_BINS, range=[limits[0], limits[1]])
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


def limits_from_histogram(
    counts: np.ndarray,
    centres: np.ndarray,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    polarity: str = "bright",
) -> np.ndarray:
    """The values :func:`normalize` maps to 0 and 1 for objects of the given polarity.

    ``"bright"`` objects on a dark background (fluorescence): the low and high percentiles.
    ``"dark"`` objects on a light background (brightfield): the mirrored percentiles in reverse
    order (``100 - low`` then ``100 - high``), so the normalised image is the inverted one, with
    nuclei near 1 and background near 0. ``"auto"``: dark when the frame's median lies above
    the middle of its low..high range (most pixels are bright background). On the 2018 Data
    Science Bowl nuclei the median sits at 0.00-0.18 of the range in every fluorescence image,
    at 0.82-0.93 in every grey brightfield one and at 0.36-0.94 in the colour ones (luminance;
    2 of 94, dense tissue, below 0.5 and not inverted).
    """
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {POLARITIES}, got {polarity!r}")
    low, high = (float(p) for p in percentiles)
    values = percentiles_from_histogram(counts, centres, (low, high, 50.0, 100 - low, 100 - high))
    dark = polarity == "dark" or (polarity == "auto" and _median_above_middle(*values[:3]))
    return values[3:5] if dark else values[0:2]


def is_dark_on_light(
    counts: np.ndarray, centres: np.ndarray, percentiles: Sequence[float] = DEFAULT_PERCENTILES
) -> bool:
    """Whether a frame's histogram looks like dark objects on a light background (brightfield):
    its median above the middle of its low..high percentile range, the rule by which polarity
    ``"auto"`` inverts a frame (:func:`limits_from_histogram`)."""
    low, high = (float(p) for p in percentiles)
    return _median_above_middle(*percentiles_from_histogram(counts, centres, (low, high, 50.0)))


def _median_above_middle(low: float, high: float, median: float) -> bool:
    return bool(high > low and (median - low) / (high - low) > DARK_MEDIAN_POSITION)


def frame_percentiles(
    frames: np.ndarray | da.Array,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    polarity: str = "bright",
) -> np.ndarray | da.Array:
    """Normalisation limits of every frame of a (t, ...spatial) array, shape (t, 2).

    With ``polarity="bright"`` the low and high percentiles; otherwise as
    :func:`limits_from_histogram` (dark-on-light frames get reversed, mirrored limits).
    numpy in, numpy out; Dask in, lazy Dask out with identical values.
    """
    low_high = tuple(float(p) for p in percentiles)
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {POLARITIES}, got {polarity!r}")

    def statistic(counts: np.ndarray, centres: np.ndarray) -> np.ndarray:
        return limits_from_histogram(counts, centres, low_high, polarity)

    if isinstance(frames, da.Array):
        return frame_statistics(frames, statistic)
    return np.stack([statistic(*frame_histogram(frame)) for frame in np.asarray(frames)])


def normalize(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low`` to 0 and ``high`` to 1 (float32, not clipped); a flat frame maps to 0.

    ``high < low`` inverts the image (dark objects become bright; see
    :func:`limits_from_histogram`).
    """
    scale = float(high) - float(low)
    scale = 1.0 / scale if scale != 0 else 0.0
    return ((np.asarray(image, dtype=np.float32) - np.float32(low)) * np.float32(scale)).astype(
        np.float32, copy=False
    )


def colour_to_grey(image: np.ndarray) -> np.ndarray:
    """Luminance (float32, the image's own units) of an RGB(A) image with channels last.

    Colour brightfield (histology) nuclei are dark on a light background in it; the conv-net
    inverts such images (polarity ``"auto"``, :func:`limits_from_histogram`).
    """
    image = np.asarray(image)
    if image.ndim < 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB(A) image with channels last, got shape {image.shape}")
    weights = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)  # ITU-R BT.709, as skimage
    return np.asarray(image[..., :3], dtype=np.float32) @ weights
