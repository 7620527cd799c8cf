"""Frame-to-frame tracking of segmented cells by linear assignment (Jaqaman et al. 2008).

The work is split as in laptrack: candidate link costs (:func:`_link_costs`), the augmented
assignment matrix with birth and death alternatives (:func:`_augmented_cost_matrix`), its
solution (:func:`_solve_assignment`) and the assembly of links into tracks
(:func:`_assemble_tracks`). Everything is sparse: only pairs closer than ``max_distance`` are
ever stored, so frames with tens of thousands of cells link in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

__all__ = ["NO_LINK_COST_FACTOR", "track"]

NO_LINK_COST_FACTOR = 1.05
"""Birth and death cost as a multiple of the largest allowed link cost, ``max_distance**2``."""

_SPATIAL_DIMS = ("z", "y", "x")


def track(
    objects: pd.DataFrame,
    *,
    max_distance: float = 15.0,
    frame_column: str = "t",
    coordinate_columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Link objects between consecutive frames into tracks by linear assignment.

    Each pair of consecutive frames is solved as one global assignment problem (Jaqaman et
    al. 2008): linking two objects costs their squared distance, pairs farther apart than
    ``max_distance`` are never linked, and an object may instead end (death) or start
    (birth) a track at a cost of ``NO_LINK_COST_FACTOR * max_distance**2`` each.
    Frames with no rows break every track: nothing is linked across a missing frame.
    Divisions are not detected, so ``parent_track_id`` is always 0 in this version.

    Parameters
    ----------
    objects
        One row per object, with an integer frame column and coordinate columns in
        micrometres. Other columns are kept.
    max_distance
        Largest distance, in micrometres, an object may move between two frames.
    frame_column
        Name of the column holding the integer frame number.
    coordinate_columns
        Columns holding the position. Default: those of ``z``, ``y``, ``x`` present.

    Returns
    -------
    pandas.DataFrame
        A copy of ``objects`` with the same rows, order and index, plus ``track_id``
        (int64, numbered from 1 in order of first appearance) and ``parent_track_id``
        (int64, 0 = no parent).

    Raises
    ------
    ValueError
        If a column is missing, a coordinate is not finite, a frame is not an integer or
        ``max_distance`` is not positive.
    """
    if not max_distance > 0:
        raise ValueError(f"max_distance must be positive, got {max_distance}")
    frames, coordinates = _validated_positions(objects, frame_column, coordinate_columns)
    edges = _link_consecutive_frames(frames, coordinates, max_distance)
    track_ids, parent_track_ids = _assemble_tracks(frames, edges)
    tracked = objects.copy()
    tracked["track_id"] = track_ids
    tracked["parent_track_id"] = parent_track_ids
    return tracked


def _validated_positions(
    objects: pd.DataFrame, frame_column: str, coordinate_columns: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Return the frame numbers (int64) and coordinates (float, rows x dims) of ``objects``."""
    if coordinate_columns is None:
        coordinate_columns = [dim for dim in _SPATIAL_DIMS if dim in objects.columns]
        if not coordinate_columns:
            raise ValueError(
                f"objects have none of the coordinate columns {list(_SPATIAL_DIMS)}; "
                f"columns are {list(objects.columns)}"
            )
    missing = [c for c in [frame_column, *coordinate_columns] if c not in objects.columns]
    if missing:
        raise ValueError(
            f"objects lack the column(s) {missing} needed for tracking; "
            f"columns are {list(objects.columns)}"
        )
    coordinates = objects[list(coordinate_columns)].to_numpy(dtype=np.float64)
    not_finite = ~np.isfinite(coordinates).all(axis=1)
    if not_finite.any():
        raise ValueError(
            f"{int(not_finite.sum())} object(s) have NaN or infinite coordinates in "
            f"{list(coordinate_columns)}, first at index {objects.index[not_finite][0]!r}"
        )
    frame_values = objects[frame_column].to_numpy(dtype=np.float64)
    if not (np.isfinite(frame_values) & (frame_values == np.round(frame_values))).all():
        raise ValueError(f"column {frame_column!r} must hold integer frame numbers")
    return frame_values.astype(np.int64), coordinates


def _link_consecutive_frames(
    frames: np.ndarray, coordinates: np.ndarray, max_distance: float
) -> np.ndarray:
    """Solve one assignment per pair of consecutive frames; return links as (source, target)
    row positions, shape (n_links, 2)."""
    order = np.argsort(frames, kind="stable")
    present_frames, starts = np.unique(frames[order], return_index=True)
    rows_per_frame = np.split(order, starts[1:])
    no_link_cost = NO_LINK_COST_FACTOR * max_distance**2
    edges = [np.empty((0, 2), dtype=np.int64)]
    for index in range(len(present_frames) - 1):
        if present_frames[index + 1] != present_frames[index] + 1:
            continue
        source_rows, target_rows = rows_per_frame[index], rows_per_frame[index + 1]
        source, target, cost = _link_costs(
            coordinates[source_rows], coordinates[target_rows], max_distance
        )
        matrix = _augmented_cost_matrix(
            len(source_rows), len(target_rows), source, target, cost, no_link_cost
        )
        linked_source, linked_target = _solve_assignment(matrix, len(source_rows), len(target_rows))
        edges.append(np.column_stack([source_rows[linked_source], target_rows[linked_target]]))
    return np.concatenate(edges)


def _link_costs(
    source_points: np.ndarray, target_points: np.ndarray, max_distance: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate links within ``max_distance``: source index, target index, squared distance."""
    pairs = cKDTree(source_points).sparse_distance_matrix(
        cKDTree(target_points), max_distance, output_type="ndarray"
    )
    return pairs["i"], pairs["j"], pairs["v"] ** 2


def _augmented_cost_matrix(
    n_source: int,
    n_target: int,
    source: np.ndarray,
    target: np.ndarray,
    link_cost: np.ndarray,
    no_link_cost: float,
) -> sparse.csr_array:
    """Sparse Jaqaman block matrix ``[[links, deaths], [births, links.T]]``.

    Rows are the source objects then one birth row per target object; columns are the target
    objects then one death column per source object. Deaths and births are diagonal blocks
    of ``no_link_cost``; the lower-right block (the transpose of the candidate links, cost 0)
    absorbs the birth rows and death columns left over when links are chosen. Every full
    matching uses exactly ``n_source + n_target`` entries, so the same offset is added to all
    of them: the optimum is unchanged and no stored cost is zero (the sparse solver drops
    explicit zeros).
    """
    source_range, target_range = np.arange(n_source), np.arange(n_target)
    rows = np.concatenate([source, source_range, n_source + target_range, n_source + target])
    cols = np.concatenate([target, n_target + source_range, target_range, n_target + source])
    costs = np.concatenate(
        [link_cost, np.full(n_source + n_target, no_link_cost), np.zeros(len(source))]
    )
    size = n_source + n_target
    return sparse.csr_array((costs + no_link_cost, (rows, cols)), shape=(size, size))


def _solve_assignment(
    matrix: sparse.csr_array, n_source: int, n_target: int
) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost full matching of the augmented matrix; return the chosen links."""
    if n_source == 0 or n_target == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    rows, cols = min_weight_full_bipartite_matching(matrix)
    is_link = (rows < n_source) & (cols < n_target)
    return rows[is_link], cols[is_link]


def _assemble_tracks(frames: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Turn links between rows into track ids and parent track ids.

    A row continues the track of its predecessor when that link is the only one out of the
    predecessor and the only one into the row; otherwise it starts a new track whose parent
    is the predecessor's track (a division, once a later solver yields two links out of one
    row). Tracks are numbered from 1 in order of frame, then row.
    """
    n_rows = len(frames)
    predecessor = np.full(n_rows, -1, dtype=np.int64)
    n_successors = np.bincount(edges[:, 0], minlength=n_rows)
    n_predecessors = np.bincount(edges[:, 1], minlength=n_rows)
    single = n_predecessors[edges[:, 1]] == 1
    predecessor[edges[single, 1]] = edges[single, 0]
    track_ids = np.zeros(n_rows, dtype=np.int64)
    parent_track_ids = np.zeros(n_rows, dtype=np.int64)
    next_track_id = 1
    for row in np.argsort(frames, kind="stable"):
        previous = predecessor[row]
        if previous >= 0 and n_successors[previous] == 1:
            track_ids[row] = track_ids[previous]
            parent_track_ids[row] = parent_track_ids[previous]
            continue
        track_ids[row] = next_track_id
        next_track_id += 1
        if previous >= 0:
            parent_track_ids[row] = track_ids[previous]
    return track_ids, parent_track_ids
