"""Per-track measurements, growth rates and segmentation QC from a tracked cell table.

The input is the cell table of :func:`pipeline.measurement.cells.measure` after
:func:`pipeline.tracking.track`: one row per cell and frame with ``t``, the centroid ``z``
(3D only), ``y``, ``x`` in micrometres, the size ``area`` (2D, um^2) or ``volume`` (3D,
um^3), and ``track_id`` / ``parent_track_id`` (0 = no parent) with Cell Tracking Challenge
semantics: a dividing cell's track ends at the division, each daughter starts a new track
whose parent is the mother's track, and gap-closed segments share one track id (a track may
skip frames).

- :func:`track_table`: one row per track (span, gaps, displacement, path length, speed,
  straightness, children).
- :func:`growth_rates`: instantaneous relative growth rate of every cell along its track, as
  in the bacterial growth curves of the DeepCell paper (Van Valen et al. 2016).
- :func:`merge_qc`: the share of frame-to-frame links whose size jumps by 30% or more, the
  segmentation QC of the same paper (a sign of merged cells).

Everything is vectorised over rows: observations are sorted by ``(track_id, t)`` once and
each one is compared with its predecessor in the same track.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["growth_rates", "merge_qc", "track_table"]

_SPATIAL_DIMS = ("z", "y", "x")
_SIZE_COLUMNS = ("area", "volume")

_TRACK_TABLE_COLUMNS = (
    "track_id",
    "parent_track_id",
    "start_t",
    "end_t",
    "n_frames",
    "length",
    "n_gaps",
    "displacement",
    "path_length",
    "mean_speed",
    "straightness",
    "n_children",
    "divides",
)


def _require_columns(cells: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise ``ValueError`` naming the columns of ``columns`` that ``cells`` lacks."""
    missing = [column for column in columns if column not in cells.columns]
    if missing:
        raise ValueError(
            f"{what} needs the column(s) {missing} in the cell table; "
            f"it has {list(cells.columns)} (run pipeline.track first for track_id)"
        )


def _check_frame_interval(frame_interval: float) -> float:
    """Validate ``frame_interval`` (finite and positive) and return it as a float."""
    frame_interval = float(frame_interval)
    if not math.isfinite(frame_interval) or frame_interval <= 0:
        raise ValueError(f"frame_interval must be finite and positive, got {frame_interval}")
    return frame_interval


def _size_column(cells: pd.DataFrame, size_column: str | None) -> str:
    """The size column to use: ``size_column``, else ``area`` or ``volume``, whichever exists."""
    if size_column is not None:
        _require_columns(cells, [size_column], "the size measurement")
        return size_column
    present = [column for column in _SIZE_COLUMNS if column in cells.columns]
    if len(present) != 1:
        found = "both" if present else "neither"
        raise ValueError(
            f"cannot choose the size column: the cell table has {found} of 'area' and "
            "'volume'; pass size_column"
        )
    return present[0]


def _sorted_by_track(cells: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row order sorting ``cells`` by ``(track_id, t)`` and the sorted ids and frames.

    Raises ``ValueError`` if a track has two observations in one frame.
    """
    track_ids = cells["track_id"].to_numpy(dtype=np.int64)
    frames = cells["t"].to_numpy(dtype=np.int64)
    order = np.lexsort((frames, track_ids))
    track_ids, frames = track_ids[order], frames[order]
    duplicated = (track_ids[1:] == track_ids[:-1]) & (frames[1:] == frames[:-1])
    if duplicated.any():
        first = int(np.flatnonzero(duplicated)[0])
        raise ValueError(
            f"track {track_ids[first]} has more than one observation in frame {frames[first]}"
        )
    return order, track_ids, frames


def _links(cells: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame-to-frame links between consecutive observations of one track.

    Returns
    -------
    rows, previous_rows, frame_steps
        Positional row of each link's later observation, of its earlier observation, and
        the number of frames between them (> 1 across a closed gap).
    """
    order, track_ids, frames = _sorted_by_track(cells)
    linked = np.flatnonzero(track_ids[1:] == track_ids[:-1]) + 1
    return order[linked], order[linked - 1], frames[linked] - frames[linked - 1]


def _empty_track_table() -> pd.DataFrame:
    """A track table with no rows and the dtypes of a filled one."""
    dtypes = dict.fromkeys(_TRACK_TABLE_COLUMNS, "int64")
    dtypes.update(
        dict.fromkeys(("displacement", "path_length", "mean_speed", "straightness"), "float64")
    )
    dtypes["divides"] = "bool"
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in dtypes.items()})


def track_table(cells: pd.DataFrame, *, frame_interval: float = 1.0) -> pd.DataFrame:
    """Summarise every track of a tracked cell table in one row.

    Parameters
    ----------
    cells
        Tracked cell table: ``track_id``, ``parent_track_id``, integer frame ``t`` and the
        centroid columns of ``z``, ``y``, ``x`` that are present (``y`` and ``x`` are
        required; ``z`` is used when present), in micrometres.
    frame_interval
        Time between two consecutive frames, in the unit wanted for ``mean_speed``.

    Returns
    -------
    pandas.DataFrame
        One row per track, sorted by ``track_id``, with a default index and the columns

        - ``track_id``, ``parent_track_id`` (0 = none; taken from the first observation),
        - ``start_t``, ``end_t``: first and last frame,
        - ``n_frames``: number of observations,
        - ``length``: frames spanned, ``end_t - start_t + 1``, gaps included,
        - ``n_gaps``: frames missing inside the span, ``length - n_frames``,
        - ``displacement``: straight distance from the first to the last position (um),
        - ``path_length``: sum of the distances between consecutive observations (um),
        - ``mean_speed``: ``path_length / ((end_t - start_t) * frame_interval)``; NaN for a
          one-frame track,
        - ``straightness``: ``displacement / path_length`` in [0, 1]; NaN when the path
          length is 0 (one-frame or motionless track),
        - ``n_children``: number of tracks whose parent is this one,
        - ``divides``: ``n_children > 0``.

    Raises
    ------
    ValueError
        If a required column is missing, ``frame_interval`` is not positive, or a track has
        two observations in one frame.
    """
    frame_interval = _check_frame_interval(frame_interval)
    _require_columns(cells, ["track_id", "parent_track_id", "t", "y", "x"], "track_table")
    if cells.empty:
        return _empty_track_table()
    dims = [dim for dim in _SPATIAL_DIMS if dim in cells.columns]

    order, track_ids, frames = _sorted_by_track(cells)
    positions = cells[dims].to_numpy(dtype=np.float64)[order]
    same_track = track_ids[1:] == track_ids[:-1]
    steps = np.zeros(len(order))
    steps[1:] = np.where(same_track, np.linalg.norm(positions[1:] - positions[:-1], axis=1), 0.0)

    starts = np.flatnonzero(np.r_[True, ~same_track])
    ends = np.r_[starts[1:], len(order)] - 1
    ids = track_ids[starts]
    start_t = frames[starts]
    end_t = frames[ends]
    n_frames = ends - starts + 1
    length = end_t - start_t + 1
    path_length = np.add.reduceat(steps, starts)
    displacement = np.linalg.norm(positions[ends] - positions[starts], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        duration = (end_t - start_t) * frame_interval
        mean_speed = np.where(duration > 0, path_length / duration, np.nan)
        straightness = np.where(path_length > 0, displacement / path_length, np.nan)

    parents = cells["parent_track_id"].to_numpy(dtype=np.int64)[order][starts]
    child_parents = parents[parents > 0]
    n_children = (
        pd.Series(child_parents).value_counts().reindex(ids, fill_value=0).to_numpy(np.int64)
    )
    return pd.DataFrame(
        {
            "track_id": ids,
            "parent_track_id": parents,
            "start_t": start_t,
            "end_t": end_t,
            "n_frames": n_frames.astype(np.int64),
            "length": length,
            "n_gaps": length - n_frames,
            "displacement": displacement,
            "path_length": path_length,
            "mean_speed": mean_speed,
            "straightness": straightness,
            "n_children": n_children,
            "divides": n_children > 0,
        }
    )


def growth_rates(
    cells: pd.DataFrame, *, size_column: str | None = None, frame_interval: float = 1.0
) -> pd.Series:
    """Instantaneous relative growth rate of every cell along its track.

    For an observation at frame ``t`` whose track was last observed at frame ``t_prev``
    (``t - t_prev > 1`` across a closed gap), the rate is
    ``(ln(size_t) - ln(size_prev)) / ((t - t_prev) * frame_interval)``, as in the bacterial
    growth curves of the DeepCell paper (Van Valen et al. 2016): an exponentially growing
    cell, ``size = A0 * exp(r * time)``, has rate ``r`` everywhere.

    Parameters
    ----------
    cells
        Tracked cell table with ``track_id``, integer frame ``t`` and a size column.
    size_column
        Column holding the cell size. Default: ``area`` or ``volume``, whichever is present.
    frame_interval
        Time between two consecutive frames; the rate is per this time unit.

    Returns
    -------
    pandas.Series
        float64, named ``growth_rate``, with the index and row order of ``cells``. NaN for
        the first observation of each track (a daughter's first frame included: its track
        is new) and where either size is not positive or missing.

    Raises
    ------
    ValueError
        If a required column is missing, the size column is ambiguous, ``frame_interval`` is
        not positive, or a track has two observations in one frame.
    """
    frame_interval = _check_frame_interval(frame_interval)
    _require_columns(cells, ["track_id", "t"], "growth_rates")
    size_column = _size_column(cells, size_column)
    rates = np.full(len(cells), np.nan)
    if len(cells):
        rows, previous, frame_steps = _links(cells)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_size = np.log(cells[size_column].to_numpy(dtype=np.float64))
        log_size[~np.isfinite(log_size)] = np.nan
        rates[rows] = (log_size[rows] - log_size[previous]) / (frame_steps * frame_interval)
    return pd.Series(rates, index=cells.index, name="growth_rate", dtype=np.float64)


def merge_qc(
    cells: pd.DataFrame, *, threshold: float = 0.3, size_column: str | None = None
) -> dict[str, float]:
    """Share of frame-to-frame links whose cell size jumps up, a sign of merged cells.

    The segmentation QC of the DeepCell paper (Van Valen et al. 2016): among all links
    between consecutive observations of one track (across a closed gap too; not from a
    mother to its daughters, which start new tracks), count those whose size grows by
    ``threshold`` or more, ``size_t >= (1 + threshold) * size_prev`` (up to float rounding).
    Links where either size is missing are not counted.

    Parameters
    ----------
    cells
        Tracked cell table with ``track_id``, integer frame ``t`` and a size column.
    threshold
        Relative size increase flagging a link; 0.3 = 30%.
    size_column
        Column holding the cell size. Default: ``area`` or ``volume``, whichever is present.

    Returns
    -------
    dict
        ``{"links": n, "large_increase": k, "fraction": k / n}``; ``fraction`` is NaN when
        there are no links.

    Raises
    ------
    ValueError
        If a required column is missing, the size column is ambiguous, ``threshold`` is
        negative or not finite, or a track has two observations in one frame.
    """
    threshold = float(threshold)
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be finite and non-negative, got {threshold}")
    _require_columns(cells, ["track_id", "t"], "merge_qc")
    size_column = _size_column(cells, size_column)
    n_links = n_large = 0
    if len(cells):
        rows, previous, _ = _links(cells)
        sizes = cells[size_column].to_numpy(dtype=np.float64)
        size, size_prev = sizes[rows], sizes[previous]
        valid = ~(np.isnan(size) | np.isnan(size_prev))
        size, size_prev = size[valid], size_prev[valid]
        limit = (1.0 + threshold) * size_prev
        large = (size >= limit) | np.isclose(size, limit, rtol=1e-12, atol=0.0)
        n_links, n_large = int(valid.sum()), int(large.sum())
    fraction = n_large / n_links if n_links else math.nan
    return {"links": n_links, "large_increase": n_large, "fraction": fraction}
