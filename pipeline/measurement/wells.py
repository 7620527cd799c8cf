"""Per-well growth curves and reporter dynamics from a plate's cell table.

The DeepCell paper (Van Valen et al. 2016) reads growth from the cells along time and the
kinase translocation reporter as a cytoplasm/nucleus ratio per cell. Per well and frame:
the number of cells, their total and mean size, and the mean and median of every ``ratio_*``
column present (the compartment ratios of :mod:`pipeline.measurement.compartments`); per well,
the doubling time of the cell count and of the total size, from a least-squares line through
``log2`` of each against time (frames where the well has cells).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["WELL_DOUBLING", "WELL_GROWTH", "doubling_times", "well_curves"]

WELL_GROWTH = "well_growth"  # the plate's tables of well_curves and doubling_times
WELL_DOUBLING = "well_doubling"


def _size_column(cells: pd.DataFrame) -> str:
    return "volume" if "volume" in cells.columns else "area"


def well_curves(cells: pd.DataFrame, *, frame_interval: float = 1.0) -> pd.DataFrame:
    """Growth curve and reporter ratios of every well, frame by frame.

    Parameters
    ----------
    cells
        The plate's cell table: ``well``, ``t``, ``area`` (or ``volume``), optional
        ``ratio_*`` columns.
    frame_interval
        Time between frames, for the ``time`` column.

    Returns
    -------
    pandas.DataFrame
        One row per well and frame: ``well``, ``t``, ``time``, ``n_cells``, ``total_size``,
        ``mean_size`` and ``<ratio>_mean``, ``<ratio>_median`` for each ratio column.
    """
    size = _size_column(cells)
    ratios = [column for column in cells.columns if column.startswith("ratio_")]
    grouped = cells.groupby(["well", "t"], observed=True, sort=True)
    curves = grouped.agg(n_cells=(size, "size"), total_size=(size, "sum"), mean_size=(size, "mean"))
    for ratio in ratios:
        finite = cells[ratio].where(np.isfinite(cells[ratio]))
        curves[f"{ratio}_mean"] = finite.groupby([cells["well"], cells["t"]]).mean()
        curves[f"{ratio}_median"] = finite.groupby([cells["well"], cells["t"]]).median()
    curves = curves.reset_index()
    curves.insert(2, "time", curves["t"] * frame_interval)
    return curves.astype({"well": str, "t": "int64", "n_cells": "int64"})


# Doublings over a well's whole time span below which it is taken not to grow.
_NO_GROWTH_DOUBLINGS = 1e-9


def _doubling_time(time: np.ndarray, amount: np.ndarray) -> float:
    """Time for ``amount`` to double, from the least-squares slope of log2(amount) vs time;
    NaN with fewer than two positive points or no growth (doublings over the whole span at or
    below round-off: a flat curve's fitted slope is ~1e-16, not exactly 0)."""
    keep = amount > 0
    span = np.ptp(time[keep]) if np.count_nonzero(keep) >= 2 else 0.0
    if span == 0:
        return float("nan")
    slope = np.polyfit(time[keep], np.log2(amount[keep]), 1)[0]
    return float(1.0 / slope) if slope * span > _NO_GROWTH_DOUBLINGS else float("nan")


def doubling_times(curves: pd.DataFrame) -> pd.DataFrame:
    """Doubling time of the cell count and of the total size of every well.

    Parameters
    ----------
    curves
        The table of :func:`well_curves`.

    Returns
    -------
    pandas.DataFrame
        One row per well: ``well``, ``frames``, ``doubling_time_count``,
        ``doubling_time_size`` (in the unit of ``time``; NaN where the well does not grow).
    """
    rows = []
    for well, curve in curves.groupby("well", sort=True):
        time = curve["time"].to_numpy(np.float64)
        rows.append(
            {
                "well": well,
                "frames": len(curve),
                "doubling_time_count": _doubling_time(time, curve["n_cells"].to_numpy(float)),
                "doubling_time_size": _doubling_time(time, curve["total_size"].to_numpy(float)),
            }
        )
    return pd.DataFrame(
        rows, columns=["well", "frames", "doubling_time_count", "doubling_time_size"]
    )
