"""Neighbours of each cell: the cells it touches and the distances to the nearest cells.

Touching is CellProfiler's MeasureObjectNeighbors with the "Adjacent" method, computed by
cp-measure: ``Neighbors_NumberOfNeighbors_Adjacent`` (cells touching it) and
``Neighbors_PercentTouching_Adjacent`` (the percentage of its outline that touches them). Both
depend on the cell's own pixels and the one-pixel ring around them only, so the block that owns
a cell (:mod:`pipeline.measurement.owned`) gives the whole-image value: each cell is measured on
its bounding box grown by two pixels, with every other cell in it.

Distances are centre to centre in micrometres, to the nearest and second-nearest cell of the
same frame (``Neighbors_FirstClosestDistance_um``, ``Neighbors_SecondClosestDistance_um``;
NaN where the frame has too few cells). They are computed on the whole field's table (a k-d
tree of the cell positions), so they hold across blocks by construction; CellProfiler's own
closest distances count only the objects of the image it is given, which a block is not.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree
from skimage.segmentation import relabel_sequential

from pipeline.measurement.owned import cell_windows, zero_padded_crop

__all__ = ["DISTANCE_COLUMNS", "TOUCHING_COLUMNS", "nearest_distances", "touching"]

TOUCHING_COLUMNS = ("Neighbors_NumberOfNeighbors_Adjacent", "Neighbors_PercentTouching_Adjacent")
DISTANCE_COLUMNS = ("Neighbors_FirstClosestDistance_um", "Neighbors_SecondClosestDistance_um")
_MARGIN = 2  # pixels around a cell's bounding box: its outline and the ring touching it


def touching(cells: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The touching columns (:data:`TOUCHING_COLUMNS`) of the cells ``ids`` of a label image.

    Parameters
    ----------
    cells
        Labels of one frame (2D or 3D), every cell in it (neighbours included).
    ids
        The cells to measure, each present in ``cells``.
    """
    from cp_measure.bulk import get_multimask_measurements

    adjacent = get_multimask_measurements()["neighbors"]
    values = {name: np.zeros(len(ids)) for name in TOUCHING_COLUMNS}
    for row, (label, origin, shape) in enumerate(cell_windows(cells, ids, _MARGIN)):
        crop, crop_forward, _ = relabel_sequential(zero_padded_crop(cells, origin, shape))
        if crop.max() < 2:  # alone (cp-measure fails on a single object): touches nothing
            continue
        measured = adjacent(crop, crop, distance_method="Adjacent")
        index = crop_forward[label] - 1
        for name in TOUCHING_COLUMNS:
            values[name][row] = float(np.asarray(measured[name])[index])
    return values


def nearest_distances(table: pd.DataFrame, spatial_dims: str) -> pd.DataFrame:
    """``table`` with :data:`DISTANCE_COLUMNS`: per frame (``t``, if any), the distance from
    each row's position (columns named after ``spatial_dims``, micrometres) to the nearest and
    second-nearest other rows."""
    positions = table[list(spatial_dims)].to_numpy(np.float64)
    frames = table["t"].to_numpy() if "t" in table else np.zeros(len(table), np.int64)
    closest = np.full((len(table), 2), np.nan)
    for frame in np.unique(frames):
        rows = np.flatnonzero(frames == frame)
        k = min(3, rows.size)
        if k < 2:
            continue
        distances, _ = cKDTree(positions[rows]).query(positions[rows], k=k)
        closest[rows, : k - 1] = distances[:, 1:]
    return table.assign(**{name: closest[:, i] for i, name in enumerate(DISTANCE_COLUMNS)})
