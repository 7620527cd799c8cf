"""CellProfiler's per-object features, computed by cp-measure (the CellProfiler measurements as
a library), per cell and exact under tiling.

Feature sets (names of :func:`cp_measure.bulk.get_core_measurements`):

- shape, independent of the channels: ``sizeshape`` (area, perimeter, eccentricity, solidity,
  moments, ...), ``zernike`` (shape Zernike moments), ``feret`` (min and max Feret diameter);
  columns ``AreaShape_<feature>``, in pixels as CellProfiler gives them;
- per pair of channels: ``colocalization`` (Pearson's correlation and slope, Manders' and
  rank-weighted coefficients; columns ``Correlation_<feature>_<channel>_<channel>``);
- ``neighbors``: cells touching each cell and the share of its outline they touch
  (CellProfiler's MeasureObjectNeighbors, "Adjacent"), and the distances to the nearest and
  second-nearest cell centres, which :func:`pipeline.measure` and runs add from the whole
  field's table (:mod:`pipeline.measurement.neighbours`);
- per channel: ``intensity`` (integrated, mean, std, quartiles, MAD, edge intensities, mass
  displacement, ...), ``texture`` (Haralick features at scale 3 in four directions),
  ``radial_distribution`` and ``radial_zernikes`` (intensity from the centre to the edge);
  columns ``<feature>_<channel>``; ``granularity`` (the granular spectrum, 16 steps:
  ``Granularity_<k>_<channel>``, the percentage of the cell's mean intensity in structures that
  vanish at the k-th erosion).

Zernike moments (``zernike``, ``radial_zernikes``) are computed per cell on its bounding box
grown by one pixel: cp-measure's values change by up to 1 % with where a cell lies in the
array, which would make tiled and whole-image values differ. Granularity is computed the same
way, on the cell's own pixels (the rest of its crop set to 0) subsampled by 1/2: CellProfiler
measures it on the whole image, with a background removed by an opening ~320 px across and a
morphological reconstruction that reaches arbitrarily far, and subsamples by 1/4, which leaves
a nucleus of 20 px only two or three steps. Per cell, the spectrum depends on the cell alone
and is the same in any tiling; the background opening sees the zeros around the cell, so only
cells wider than ~160 px keep any background to remove.

Intensities enter as CellProfiler reads images: integer images divided by their type's largest
value (uint16 / 65535), float images as they are (texture expects them within [0, 1]). Every
feature here depends on a cell's own pixels only (touching: and the one-pixel ring around
them), so measuring each cell whole in the block that owns it
(:mod:`pipeline.measurement.owned`) gives the whole-image value. Absolute positions
(``Center_*``, ``BoundingBoxMinimum_*``, ``Location_*``) are left out: the table's ``x``,
``y``, ``centroid_*_px`` and ``bbox_*`` columns hold them for the whole field. z-stacks:
``sizeshape``, ``intensity`` and ``texture``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache, partial
from itertools import combinations
from typing import Literal, get_args

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd

from pipeline.measurement.neighbours import TOUCHING_COLUMNS, touching
from pipeline.measurement.owned import cell_windows, owned_cell_table, zero_padded_crop

__all__ = [
    "FEATURE_SETS",
    "SHAPE_SETS",
    "FeatureSet",
    "feature_columns",
    "feature_table",
    "feature_table_dask",
]

FeatureSet = Literal[
    "sizeshape",
    "zernike",
    "feret",
    "intensity",
    "texture",
    "radial_distribution",
    "radial_zernikes",
    "granularity",
    "colocalization",
    "neighbors",
]
FEATURE_SETS: tuple[str, ...] = get_args(FeatureSet)
SHAPE_SETS = frozenset({"sizeshape", "zernike", "feret"})
_CHANNEL_FREE = SHAPE_SETS | {"neighbors"}
# cp-measure's touching percentages are wrong on z-stacks (one of two touching cubes gets 0 %).
_SETS_3D = frozenset({"sizeshape", "intensity", "texture"})
# Positions in the pixels of the array measured: left out (the table's x, y, centroid and bbox
# columns give them for the whole field), so a block's features equal the whole image's.
_POSITION = re.compile(r"^(Center_|BoundingBoxM(inimum|aximum)_|Location_)")
# cp-measure's Zernike moments change (by up to 1 %) with where the cell lies in the array, and
# its granularity with the whole image: these sets are measured per cell on a canonical crop
# (:func:`_per_cell`), of at least this many pixels per axis. Granularity's background step
# works on 1/8 of its crop with a radius-10 disc, and scipy's reflect-mode min/max filters
# (1.17) read memory outside an axis of 2 pixels when the footprint is that much larger: a
# crop of 10-17 pixels gave a random spectrum. 24 pixels leave the background image 3.
_PER_CELL = {"zernike": 0, "radial_zernikes": 0, "granularity": 24}
# Granularity per cell: subsampled by 1/2 (CellProfiler's 1/4 suits whole images), 16 steps.
GRANULARITY_SUBSAMPLE = 0.5
GRANULARITY_STEPS = 16


def _check(features: Sequence[str], ndim: int) -> None:
    unknown = [name for name in features if name not in FEATURE_SETS]
    if unknown:
        raise ValueError(f"unknown feature sets {unknown}; choose from {list(FEATURE_SETS)}")
    if ndim == 3 and not set(features) <= _SETS_3D:
        raise ValueError(f"on z-stacks only {sorted(_SETS_3D)} are available")


def _functions(ndim: int) -> dict:
    from cp_measure.bulk import get_core_measurements, get_core_measurements_3d

    core = get_core_measurements_3d() if ndim == 3 else get_core_measurements()
    return {**core, "colocalization": _colocalization, "granularity": _cell_granularity}


def _cell_granularity(masks: np.ndarray, pixels: np.ndarray) -> dict:
    """CellProfiler's MeasureGranularity (cp-measure) of the labelled cells alone: pixels
    outside them are 0, so nothing beyond a cell enters its spectrum."""
    from cp_measure.bulk import get_core_measurements

    return get_core_measurements()["granularity"](
        masks,
        np.where(masks > 0, pixels, 0.0),
        subsample_size=GRANULARITY_SUBSAMPLE,
        granular_spectrum_length=GRANULARITY_STEPS,
    )


def _colocalization(masks: np.ndarray, first: np.ndarray, second: np.ndarray) -> dict:
    """CellProfiler's MeasureColocalization of two channels per cell (cp-measure): Pearson's
    correlation and slope, Manders' and rank-weighted coefficients (thresholds at 15 % of each
    cell's maximum). Costes' automatic thresholds are left out (slow, and they need the
    channels' full scale)."""
    from cp_measure.bulk import get_correlation_measurements

    functions = get_correlation_measurements()
    values: dict = {}
    for name in ("pearson", "manders_fold", "rwc"):
        values.update(functions[name](first, second, masks))
    return values


def _channel_groups(
    feature_set: str, channel_names: Sequence[str]
) -> list[tuple[str | None, tuple[int, ...]]]:
    """The column suffix and the channels of each measurement of a feature set: one for a
    shape set (None), one per channel, or one per pair of channels (``colocalization``)."""
    if feature_set in _CHANNEL_FREE:
        return [(None, (0,))]
    if feature_set == "colocalization":
        return [
            (f"{a}_{b}", (i, j)) for (i, a), (j, b) in combinations(enumerate(channel_names), 2)
        ]
    return [(name, (i,)) for i, name in enumerate(channel_names)]


def scale_intensities(image: np.ndarray) -> np.ndarray:
    """Intensities as CellProfiler reads them: integers / their type's maximum, floats as is."""
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float64) / float(np.iinfo(image.dtype).max)
    return image.astype(np.float64)


def _column(feature_set: str, key: str, channel: str | None) -> str:
    if feature_set == "neighbors":
        return key
    if feature_set in SHAPE_SETS:
        return f"AreaShape_{key}"
    if feature_set == "texture":
        return f"Texture_{key}_{channel}"
    return f"{key}_{channel}"


def feature_table(
    cells: np.ndarray,
    image: np.ndarray,
    *,
    channel_names: Sequence[str],
    features: Sequence[str],
    ids: np.ndarray | None = None,
) -> pd.DataFrame:
    """The chosen feature sets of the cells ``ids`` (default: all) of one frame.

    Parameters
    ----------
    cells
        Labels of one frame (2D or 3D).
    image
        Its intensities, (c, ...spatial).
    channel_names
        One name per channel, used in the column names.
    features
        Names from :data:`FEATURE_SETS`.
    ids
        The cells to measure (sorted); default every label.

    Returns
    -------
    pandas.DataFrame
        ``label`` and the feature columns (:func:`feature_columns`), one row per cell.
    """
    cells = np.asarray(cells)
    _check(features, cells.ndim)
    ids = np.unique(cells[cells > 0]) if ids is None else np.asarray(ids)
    names = feature_columns(features, channel_names, cells.ndim)
    if ids.size == 0:
        return pd.DataFrame(columns=["label", *names])
    masks = np.where(np.isin(cells, ids), cells, 0)
    functions = _functions(cells.ndim)
    scaled = [scale_intensities(channel) for channel in image]  # once, for every set
    columns: dict[str, np.ndarray] = {"label": ids.astype(np.int64)}
    for feature_set in features:
        if feature_set == "neighbors":  # the other cells in the region count
            columns.update(touching(cells, ids))
            continue
        measure = functions[feature_set]
        if feature_set in _PER_CELL:
            measure = partial(_per_cell, measure, ids=ids, min_size=_PER_CELL[feature_set])
        for suffix, indices in _channel_groups(feature_set, channel_names):
            pixels = [scaled[index] for index in indices]
            with np.errstate(divide="ignore", invalid="ignore"):
                values = measure(masks, *pixels)
            for key, column in values.items():
                columns[_column(feature_set, key, suffix)] = np.asarray(column, np.float64)
    return pd.DataFrame(columns)[["label", *names]]


def _per_cell(
    function, masks: np.ndarray, pixels: np.ndarray, *, ids: np.ndarray, min_size: int = 0
) -> dict:
    """``function`` applied to each cell alone on its canonical crop: its bounding box grown
    by one pixel, then to ``min_size`` pixels per axis (centred), zero outside the array, so
    the values do not depend on where the cell lies in the array measured (cp-measure's
    Zernike moments do, by up to 1 %)."""
    results: dict[str, list[float]] = {}
    for label, origin, shape in cell_windows(masks, ids, margin=1):
        grow = [max(min_size - n, 0) for n in shape]
        origin = [o - g // 2 for o, g in zip(origin, grow, strict=True)]
        shape = [n + g for n, g in zip(shape, grow, strict=True)]
        crop_mask = (zero_padded_crop(masks, origin, shape) == label).astype(np.int32)
        values = function(crop_mask, zero_padded_crop(pixels, origin, shape))
        for key, value in values.items():
            results.setdefault(key, []).append(float(np.asarray(value)[0]))
    return results


@cache
def _keys(feature_set: str, ndim: int) -> tuple[str, ...]:
    """The keys cp-measure returns for a feature set, read off a small disc."""
    if feature_set == "neighbors":
        return TOUCHING_COLUMNS
    shape = (9, 24, 24) if ndim == 3 else (24, 24)
    grid = np.indices(shape)
    disc = sum(((g - (n - 1) / 2) / (n / 3)) ** 2 for g, n in zip(grid, shape, strict=True)) < 1
    pixels = np.linspace(0.1, 0.9, disc.size).reshape(shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        channels = (pixels, pixels[::-1]) if feature_set == "colocalization" else (pixels,)
        values = _functions(ndim)[feature_set](disc.astype(np.int32), *channels)
    return tuple(key for key in values if not _POSITION.match(key))


def feature_columns(features: Sequence[str], channel_names: Sequence[str], ndim: int) -> list[str]:
    """The columns :func:`feature_table` gives, in order."""
    _check(features, ndim)
    names = []
    for feature_set in features:
        for suffix, _ in _channel_groups(feature_set, channel_names):
            names += [_column(feature_set, key, suffix) for key in _keys(feature_set, ndim)]
    return names


def feature_table_dask(
    cells: da.Array,
    image: da.Array,
    channel_names: Sequence[str],
    features: Sequence[str],
    halo: Sequence[int],
) -> dd.DataFrame:
    """:func:`feature_table` of every frame of (t, ...spatial) Dask labels and (t, c, ...)
    intensities, each cell measured whole by the block owning it, with ``halo`` pixels."""
    names = feature_columns(features, channel_names, cells.ndim - 1)
    meta = pd.DataFrame(columns=["t", "label", *names]).astype(float)
    meta = meta.astype({"t": "int64", "label": "int64"})
    frame_table = partial(feature_table, channel_names=list(channel_names), features=list(features))
    return owned_cell_table(cells, [image], frame_table, halo, meta)
