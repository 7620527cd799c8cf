"""Per-well growth curves, reporter ratios and doubling times against hand-computed values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.measurement.wells import doubling_times, well_curves


def _cells() -> pd.DataFrame:
    """Well A/1: 1, 2, 4 cells at t = 0, 1, 2, each 10 um^2 (count and size double every
    frame); well B/2: 3 cells of 5 um^2 at every frame (no growth). Ratios: one NaN and one
    inf, which do not count."""
    rows = []
    for t, n in enumerate([1, 2, 4]):
        rows += [("A/1", t, 10.0, 1.0 + t + k) for k in range(n)]
    for t in range(3):
        rows += [("B/2", t, 5.0, r) for r in (2.0, np.nan, np.inf)]
    return pd.DataFrame(rows, columns=["well", "t", "area", "ratio_cytoring_nucleus_ktr"])


def test_curves_count_sum_and_average_per_well_and_frame() -> None:
    curves = well_curves(_cells(), frame_interval=0.5).set_index(["well", "t"])
    assert curves.loc[("A/1", 2), "n_cells"] == 4
    assert curves.loc[("A/1", 2), "total_size"] == 40.0
    assert curves.loc[("A/1", 2), "time"] == 1.0
    # A/1 at t = 2: ratios 3, 4, 5, 6
    assert curves.loc[("A/1", 2), "ratio_cytoring_nucleus_ktr_mean"] == 4.5
    assert curves.loc[("A/1", 2), "ratio_cytoring_nucleus_ktr_median"] == 4.5
    assert curves.loc[("B/2", 1), "ratio_cytoring_nucleus_ktr_mean"] == 2.0  # NaN, inf left out
    assert curves.loc[("B/2", 1), "mean_size"] == 5.0


def test_doubling_time_of_an_exponential_well_and_none_for_a_flat_one() -> None:
    times = doubling_times(well_curves(_cells(), frame_interval=0.5)).set_index("well")
    assert times.loc["A/1", "doubling_time_count"] == pytest.approx(0.5)
    assert times.loc["A/1", "doubling_time_size"] == pytest.approx(0.5)
    assert np.isnan(times.loc["B/2", "doubling_time_count"])
    assert times.loc["B/2", "frames"] == 3


def test_doubling_time_is_the_least_squares_fit_through_noisy_counts() -> None:
    counts = [100, 130, 190, 260, 400]
    cells = pd.DataFrame(
        [("C/3", t, 1.0) for t, n in enumerate(counts) for _ in range(n)],
        columns=["well", "t", "area"],
    )
    slope = np.polyfit(np.arange(5) * 2.0, np.log2(counts), 1)[0]
    times = doubling_times(well_curves(cells, frame_interval=2.0))
    assert times["doubling_time_count"][0] == pytest.approx(1 / slope)


@pytest.mark.cluster
def test_a_plate_run_writes_growth_curves_and_doubling_times(tmp_path, shared_scheduler):
    """tables/well_growth counts each well's cells per frame as the plate's cells table does,
    and tables/well_doubling has one row per well."""
    from pipeline.config import RunConfig
    from pipeline.orchestration.runner import run
    from pipeline.synthetic import simulate_plate

    plate = simulate_plate(
        tmp_path / "plate.zarr", rows=1, columns=2, fields=1, n_frames=3, size=128, seed=9
    )
    config = RunConfig.model_validate({"segmentation": {"method": "classical"}})
    out = tmp_path / "out.zarr"
    assert not run(plate, out, config=config, scheduler=shared_scheduler).failed
    cells = pd.read_parquet(out / "tables" / "cells", partitioning="hive")
    growth = pd.read_parquet(out / "tables" / "well_growth" / "table.parquet")
    expected = cells.groupby(["well", "t"], observed=True).size()
    got = growth.set_index(["well", "t"])["n_cells"]
    assert got.to_dict() == {(str(w), t): n for (w, t), n in expected.items()}
    doubling = pd.read_parquet(out / "tables" / "well_doubling" / "table.parquet")
    assert sorted(doubling["well"]) == ["A1", "A2"]  # as the plate table names wells
