"""Frame-to-frame tracking of segmented cells by linear assignment (Jaqaman et al. 2008).

The work is split as in laptrack: candidate link costs (:func:`_link_costs`), the augmented
assignment matrix with birth and death alternatives (:func:`_augmented_cost_matrix`), its
solution (:func:`_solve_assignment`) and the assembly of links into tracks
(:func:`_assemble_tracks`). Everything is sparse: only pairs closer than ``max_distance`` are
ever stored, so frames with tens of thousands of cells link in seconds. A second assignment
over the resulting segments (:func:`_close_gaps_and_split`) closes gaps of missed frames and
detects divisions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
    max_gap: int = 2,
    gap_closing_max_distance: float | None = None,
    divisions: bool = True,
    splitting_max_distance: float | None = None,
    alternative_cost: float | None = None,
    feature_weights: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Link objects into tracks by the two-step linear assignment of Jaqaman et al. (2008).

    Step 1 solves each pair of consecutive frames as one global assignment problem: linking
    two objects costs their squared distance, pairs farther apart than ``max_distance`` are
    never linked, and an object may instead end (death) or start (birth) a track at a cost of
    ``NO_LINK_COST_FACTOR * max_distance**2`` each. The resulting track segments are then
    joined by one more global assignment (step 2) over all segments at once:

    - gap closing: the end of a segment at frame ``f`` may link to the start of another at
      frame ``f + 2`` .. ``f + 1 + max_gap`` (the cell was missed in between), at most
      ``gap_closing_max_distance`` away;
    - splitting (division, when ``divisions``): the start of a segment at frame ``f`` may link
      to an object of another segment at frame ``f - 1`` that the other segment continues
      from, at most ``splitting_max_distance`` away: that object divides.

    Each candidate costs the squared distance; leaving a segment end, start or dividing
    object unlinked costs ``alternative_cost`` (by default ``NO_LINK_COST_FACTOR`` times the
    90th percentile of the candidate costs, as laptrack does). Only candidates are stored, so
    both steps stay sparse.

    Track ids follow the Cell Tracking Challenge: a track ends where its cell divides, each
    daughter starts a new track whose ``parent_track_id`` is the mother's track, and
    segments joined across a gap share one track id.

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
    max_gap
        Largest number of consecutive frames a cell may be missed and its track closed
        across; 0 disables gap closing.
    gap_closing_max_distance
        Largest distance between the two ends of a closed gap. Default: ``max_distance``.
    divisions
        Detect divisions (splitting). False leaves ``parent_track_id`` 0 everywhere.
    splitting_max_distance
        Largest distance between a dividing object and the daughter that starts a new
        segment. Default: ``max_distance``.
    alternative_cost
        Cost of leaving a segment end, start or candidate division unlinked in step 2.
        Default: from the data, see above.
    feature_weights
        ``{column: weight}`` of positive features (e.g. ``area``, ``intensity_mean_nuclei``):
        a frame-to-frame or gap-closing link costs its squared distance times
        ``1 + sum(weight * |ln(feature_a / feature_b)|)``, so cells that change size or
        brightness abruptly link less readily. Distance cutoffs are unchanged; divisions
        (where the size halves by nature) are not weighted.

    Returns
    -------
    pandas.DataFrame
        A copy of ``objects`` with the same rows, order and index, plus ``track_id``
        (int64, numbered from 1 in order of first appearance) and ``parent_track_id``
        (int64, 0 = no parent).

    Raises
    ------
    ValueError
        If a column is missing, a coordinate is not finite, a frame is not an integer, a
        distance or ``alternative_cost`` is not positive or ``max_gap`` is negative.
    """
    gap_closing_max_distance = (
        max_distance if gap_closing_max_distance is None else gap_closing_max_distance
    )
    splitting_max_distance = (
        max_distance if splitting_max_distance is None else splitting_max_distance
    )
    for name, value in [
        ("max_distance", max_distance),
        ("gap_closing_max_distance", gap_closing_max_distance),
        ("splitting_max_distance", splitting_max_distance),
    ]:
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if alternative_cost is not None and not alternative_cost > 0:
        raise ValueError(f"alternative_cost must be positive, got {alternative_cost}")
    if int(max_gap) != max_gap or max_gap < 0:
        raise ValueError(f"max_gap must be a non-negative integer, got {max_gap}")
    frames, coordinates = _validated_positions(objects, frame_column, coordinate_columns)
    features = _weighted_log_features(objects, feature_weights or {})
    edges = _link_consecutive_frames(frames, coordinates, max_distance, features)
    if len(frames) and (max_gap > 0 or divisions):
        edges = _close_gaps_and_split(
            frames,
            coordinates,
            features,
            edges,
            max_gap=int(max_gap),
            gap_closing_max_distance=gap_closing_max_distance,
            splitting_max_distance=splitting_max_distance if divisions else None,
            alternative_cost=alternative_cost,
        )
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


def _weighted_log_features(objects: pd.DataFrame, weights: Mapping[str, float]) -> np.ndarray:
    """``weight * ln(feature)`` per object and weighted feature, shape (n_objects, n_features)."""
    columns = []
    for name, weight in weights.items():
        if name not in objects.columns:
            raise ValueError(f"feature {name!r} is not a column of objects")
        if not weight >= 0:
            raise ValueError(f"feature weight of {name!r} must be >= 0, got {weight}")
        values = objects[name].to_numpy(dtype=np.float64)
        if not (np.isfinite(values) & (values > 0)).all():
            raise ValueError(f"feature {name!r} must be positive and finite to be weighted")
        columns.append(weight * np.log(values))
    return np.column_stack(columns) if columns else np.zeros((len(objects), 0))


def _link_consecutive_frames(
    frames: np.ndarray, coordinates: np.ndarray, max_distance: float, features: np.ndarray
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
        cost = cost * _feature_factor(features, source_rows[source], target_rows[target])
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


def _feature_factor(features: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``1 + sum |weighted log feature difference|`` of each candidate link (1 without features)."""
    return 1.0 + np.abs(features[source] - features[target]).sum(axis=1)


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


def _close_gaps_and_split(
    frames: np.ndarray,
    coordinates: np.ndarray,
    features: np.ndarray,
    edges: np.ndarray,
    *,
    max_gap: int,
    gap_closing_max_distance: float,
    splitting_max_distance: float | None,
    alternative_cost: float | None,
) -> np.ndarray:
    """Step 2: join the segments of the frame-to-frame ``edges`` by gap closing and splitting.

    Returns the edges with the chosen gap-closing (segment end -> segment start) and
    splitting (dividing object -> segment start) links appended.
    """
    n_rows = len(frames)
    successor = np.full(n_rows, -1, dtype=np.int64)
    successor[edges[:, 0]] = edges[:, 1]
    has_predecessor = np.zeros(n_rows, dtype=bool)
    has_predecessor[edges[:, 1]] = True
    starts = np.flatnonzero(~has_predecessor)  # one per segment
    ends = np.flatnonzero(successor < 0)  # one per segment
    starts_by_frame = _rows_by_frame(frames, starts)
    ends_by_frame = _rows_by_frame(frames, ends)
    continuing_by_frame = _rows_by_frame(frames, np.flatnonzero(successor >= 0))
    start_column = np.full(n_rows, -1, dtype=np.int64)
    start_column[starts] = np.arange(len(starts))

    gap_sources, gap_targets, gap_costs = [], [], []
    for frame, end_rows in ends_by_frame.items():
        for gap in range(2, max_gap + 2):
            start_rows = starts_by_frame.get(frame + gap)
            if start_rows is None:
                continue
            i, j, cost = _link_costs(
                coordinates[end_rows], coordinates[start_rows], gap_closing_max_distance
            )
            gap_sources.append(end_rows[i])
            gap_targets.append(start_rows[j])
            gap_costs.append(cost * _feature_factor(features, end_rows[i], start_rows[j]))
    split_sources, split_targets, split_costs = [], [], []
    if splitting_max_distance is not None:
        for frame, start_rows in starts_by_frame.items():
            mother_rows = continuing_by_frame.get(frame - 1)
            if mother_rows is None:
                continue
            i, j, cost = _link_costs(
                coordinates[mother_rows], coordinates[start_rows], splitting_max_distance
            )
            split_sources.append(mother_rows[i])
            split_targets.append(start_rows[j])
            split_costs.append(cost)
    empty = [np.empty(0, dtype=np.int64)]
    gap_sources = np.concatenate(empty + gap_sources)
    gap_targets = np.concatenate(empty + gap_targets)
    split_sources = np.concatenate(empty + split_sources)
    split_targets = np.concatenate(empty + split_targets)
    costs = np.concatenate([np.empty(0), *gap_costs, *split_costs])
    if len(costs) == 0:
        return edges

    # Source rows of the matrix: every segment end, then each candidate dividing object.
    mothers, mother_index = np.unique(split_sources, return_inverse=True)
    end_index = np.full(n_rows, -1, dtype=np.int64)
    end_index[ends] = np.arange(len(ends))
    source_rows = np.concatenate([ends, mothers])
    source = np.concatenate([end_index[gap_sources], len(ends) + mother_index])
    target = start_column[np.concatenate([gap_targets, split_targets])]
    if alternative_cost is None:
        alternative_cost = NO_LINK_COST_FACTOR * float(np.percentile(costs, 90))
        if not alternative_cost > 0:
            alternative_cost = 1.0
    matrix = _augmented_cost_matrix(
        len(source_rows), len(starts), source, target, costs, alternative_cost
    )
    linked_source, linked_target = _solve_assignment(matrix, len(source_rows), len(starts))
    return np.concatenate(
        [edges, np.column_stack([source_rows[linked_source], starts[linked_target]])]
    )


def _rows_by_frame(frames: np.ndarray, rows: np.ndarray) -> dict[int, np.ndarray]:
    """Group ``rows`` by their frame number."""
    if len(rows) == 0:
        return {}
    order = rows[np.argsort(frames[rows], kind="stable")]
    present, first = np.unique(frames[order], return_index=True)
    return dict(zip(present.tolist(), np.split(order, first[1:]), strict=True))


def _assemble_tracks(frames: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Turn links between rows into track ids and parent track ids.

    A row continues the track of its predecessor when that link is the only one out of the
    predecessor and the only one into the row; otherwise it starts a new track whose parent
    is the predecessor's track (a division). Tracks are numbered from 1 in order of frame, then row.
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
