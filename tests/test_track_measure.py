"""Tests of per-track measurements, growth rates and merge QC against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.measurement.tracks import growth_rates, merge_qc, track_table
from pipeline.tracking import track

FRAME_INTERVAL = 2.0


def _cells_2d() -> pd.DataFrame:
    """Four tracks, rows shuffled and with a non-default index.

    - track 1: frames 0, 1, 3 (gap at frame 2); positions (y, x) (0, 0) -> (3, 4) -> (0, 4);
      areas 100 -> 130 -> 157.3.
    - track 2: frames 0, 1, 2, divides into tracks 3 and 4; positions (10, 10) -> (10, 13)
      -> (14, 13); areas 200 -> 180 -> 240.
    - track 3: daughter of 2, frames 3, 4; positions (12, 13) -> (12, 16); areas 120 -> 150.
    - track 4: daughter of 2, frame 3 only; position (16, 13); area 120.
    """
    rows = [
        # track_id, parent_track_id, t, y, x, area
        (1, 0, 0, 0.0, 0.0, 100.0),
        (1, 0, 1, 3.0, 4.0, 130.0),
        (1, 0, 3, 0.0, 4.0, 157.3),
        (2, 0, 0, 10.0, 10.0, 200.0),
        (2, 0, 1, 10.0, 13.0, 180.0),
        (2, 0, 2, 14.0, 13.0, 240.0),
        (3, 2, 3, 12.0, 13.0, 120.0),
        (3, 2, 4, 12.0, 16.0, 150.0),
        (4, 2, 3, 16.0, 13.0, 120.0),
    ]
    cells = pd.DataFrame(rows, columns=["track_id", "parent_track_id", "t", "y", "x", "area"])
    cells["label"] = np.arange(1, len(cells) + 1)
    cells.index = pd.Index([10 * i + 7 for i in range(len(cells))])
    return cells.sample(frac=1.0, random_state=3)


def test_track_table_hand_computed_2d() -> None:
    table = track_table(_cells_2d(), frame_interval=FRAME_INTERVAL).set_index("track_id")
    assert table.index.tolist() == [1, 2, 3, 4]
    assert table["parent_track_id"].tolist() == [0, 0, 2, 2]
    assert table["start_t"].tolist() == [0, 0, 3, 3]
    assert table["end_t"].tolist() == [3, 2, 4, 3]
    assert table["n_frames"].tolist() == [3, 3, 2, 1]
    # length = end_t - start_t + 1; n_gaps = length - n_frames (track 1 misses frame 2).
    assert table["length"].tolist() == [4, 3, 2, 1]
    assert table["n_gaps"].tolist() == [1, 0, 0, 0]
    # Track 1: steps |(3, 4)| = 5 and |(-3, 0)| = 3 -> path 8; displacement |(0, 4)| = 4;
    #   speed 8 / ((3 - 0) * 2) = 4/3; straightness 4 / 8 = 0.5.
    # Track 2: steps 3 and 4 -> path 7; displacement |(4, 3)| = 5; speed 7 / (2 * 2) = 1.75;
    #   straightness 5/7.
    # Track 3: one step of 3 -> path 3, displacement 3; speed 3 / (1 * 2) = 1.5;
    #   straightness 1.
    # Track 4: one frame -> path 0, displacement 0, speed and straightness NaN.
    assert table["path_length"].tolist() == pytest.approx([8.0, 7.0, 3.0, 0.0])
    assert table["displacement"].tolist() == pytest.approx([4.0, 5.0, 3.0, 0.0])
    assert table.loc[[1, 2, 3], "mean_speed"].tolist() == pytest.approx([4 / 3, 1.75, 1.5])
    assert table.loc[[1, 2, 3], "straightness"].tolist() == pytest.approx([0.5, 5 / 7, 1.0])
    assert math.isnan(table.loc[4, "mean_speed"])
    assert math.isnan(table.loc[4, "straightness"])
    # Track 2 has the two daughters 3 and 4.
    assert table["n_children"].tolist() == [0, 2, 0, 0]
    assert table["divides"].tolist() == [False, True, False, False]


def test_track_table_dtypes_and_default_interval() -> None:
    table = track_table(_cells_2d())
    for column in ("track_id", "parent_track_id", "start_t", "end_t", "n_frames", "length"):
        assert table[column].dtype == np.int64, column
    assert table["n_gaps"].dtype == np.int64
    assert table["n_children"].dtype == np.int64
    assert table["divides"].dtype == bool
    assert table["mean_speed"].dtype == np.float64
    assert table.index.tolist() == [0, 1, 2, 3]
    # Frame interval 1: track 1 speed 8 / 3.
    assert table["mean_speed"].iloc[0] == pytest.approx(8 / 3)


def test_track_table_3d_uses_z() -> None:
    # Steps (1, 2, 2) of length 3 and (2, 3, 6) of length 7 -> path 10;
    # displacement |(3, 5, 8)| = sqrt(98); speed 10 / 2; straightness sqrt(98) / 10.
    cells = pd.DataFrame(
        {
            "track_id": [1, 1, 1],
            "parent_track_id": [0, 0, 0],
            "t": [5, 6, 7],
            "z": [0.0, 1.0, 3.0],
            "y": [0.0, 2.0, 5.0],
            "x": [0.0, 2.0, 8.0],
            "volume": [1000.0, 1100.0, 1210.0],
        }
    )
    row = track_table(cells).iloc[0]
    assert row["path_length"] == pytest.approx(10.0)
    assert row["displacement"] == pytest.approx(math.sqrt(98.0))
    assert row["mean_speed"] == pytest.approx(5.0)
    assert row["straightness"] == pytest.approx(math.sqrt(98.0) / 10.0)
    # The default size column of a 3D table is volume: growth ln(1.1) per frame.
    rates = growth_rates(cells)
    assert math.isnan(rates.iloc[0])
    assert rates.iloc[1:].tolist() == pytest.approx([math.log(1.1)] * 2)


def test_growth_rates_hand_computed() -> None:
    cells = _cells_2d()
    rates = growth_rates(cells, frame_interval=FRAME_INTERVAL)
    assert rates.name == "growth_rate"
    assert rates.index.equals(cells.index)
    by_key = dict(zip(zip(cells["track_id"], cells["t"], strict=True), rates, strict=True))
    expected = {
        # Track 1: 100 -> 130 over 1 frame; 130 -> 157.3 (= 130 * 1.21) over 2 frames (gap).
        (1, 1): math.log(1.3) / (1 * FRAME_INTERVAL),
        (1, 3): math.log(1.21) / (2 * FRAME_INTERVAL),
        # Track 2: 200 -> 180 -> 240.
        (2, 1): math.log(0.9) / FRAME_INTERVAL,
        (2, 2): math.log(240 / 180) / FRAME_INTERVAL,
        # Track 3: 120 -> 150.
        (3, 4): math.log(1.25) / FRAME_INTERVAL,
    }
    for key, rate in by_key.items():
        if key in expected:
            assert rate == pytest.approx(expected[key]), key
        else:
            # First observation of a track, daughters included (their track is new).
            assert math.isnan(rate), key


def test_growth_rates_exponential_simulation() -> None:
    rng = np.random.default_rng(0)
    rate, frame_interval = 0.07, 3.0
    tables = []
    for track_id in range(1, 21):
        frames = np.sort(rng.choice(40, size=12, replace=False))  # random gaps
        area0 = rng.uniform(50, 500)
        tables.append(
            pd.DataFrame(
                {
                    "track_id": track_id,
                    "t": frames,
                    "area": area0 * np.exp(rate * frames * frame_interval),
                }
            )
        )
    cells = pd.concat(tables, ignore_index=True).sample(frac=1.0, random_state=1)
    rates = growth_rates(cells, frame_interval=frame_interval)
    first = cells.groupby("track_id")["t"].transform("min") == cells["t"]
    assert rates[first].isna().all()
    np.testing.assert_allclose(rates[~first].to_numpy(), rate, rtol=1e-9)


def test_merge_qc_hand_computed() -> None:
    # Links (ratio): track 1 1.3 (exactly 30%: counted) and 1.21; track 2 0.9 and 4/3
    # (counted); track 3 1.25. Mother -> daughter is no link. 2 of 5 -> 0.4.
    qc = merge_qc(_cells_2d())
    assert qc == {"links": 5, "large_increase": 2, "fraction": pytest.approx(0.4)}
    # A 20% threshold also flags 1.21 and 1.25.
    assert merge_qc(_cells_2d(), threshold=0.2)["large_increase"] == 4


def test_merge_qc_skips_missing_sizes() -> None:
    cells = _cells_2d()
    cells.loc[cells["track_id"].eq(3) & cells["t"].eq(4), "area"] = np.nan
    assert merge_qc(cells)["links"] == 4


def test_empty_table() -> None:
    cells = pd.DataFrame(
        {
            "track_id": pd.Series(dtype=np.int64),
            "parent_track_id": pd.Series(dtype=np.int64),
            "t": pd.Series(dtype=np.int64),
            "y": pd.Series(dtype=float),
            "x": pd.Series(dtype=float),
            "area": pd.Series(dtype=float),
        }
    )
    table = track_table(cells)
    assert table.empty
    assert list(table.columns) == list(track_table(_cells_2d()).columns)
    assert table["divides"].dtype == bool
    rates = growth_rates(cells)
    assert rates.empty and rates.dtype == np.float64
    qc = merge_qc(cells)
    assert qc["links"] == 0 and qc["large_increase"] == 0 and math.isnan(qc["fraction"])


def test_single_frame_tracks_have_no_links() -> None:
    cells = _cells_2d().query("track_id == 4")
    assert growth_rates(cells).isna().all()
    assert math.isnan(merge_qc(cells)["fraction"])


def test_missing_columns_raise() -> None:
    cells = _cells_2d()
    with pytest.raises(ValueError, match=r"track_table needs the column\(s\) \['track_id'\]"):
        track_table(cells.drop(columns="track_id"))
    with pytest.raises(ValueError, match=r"\['x'\]"):
        track_table(cells.drop(columns="x"))
    with pytest.raises(ValueError, match=r"growth_rates needs .*\['t'\]"):
        growth_rates(cells.drop(columns="t"))
    with pytest.raises(ValueError, match="neither of 'area' and 'volume'; pass size_column"):
        growth_rates(cells.drop(columns="area"))
    with pytest.raises(ValueError, match="both of 'area' and 'volume'"):
        merge_qc(cells.assign(volume=1.0))
    with pytest.raises(ValueError, match=r"\['mass'\]"):
        merge_qc(cells, size_column="mass")
    # An explicit size column resolves the ambiguity.
    assert merge_qc(cells.assign(volume=1.0), size_column="area")["links"] == 5


def test_invalid_arguments_raise() -> None:
    cells = _cells_2d()
    with pytest.raises(ValueError, match="frame_interval"):
        track_table(cells, frame_interval=0)
    with pytest.raises(ValueError, match="frame_interval"):
        growth_rates(cells, frame_interval=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        merge_qc(cells, threshold=-0.1)
    duplicate = pd.concat([cells, cells.iloc[:1]])
    with pytest.raises(ValueError, match="more than one observation in frame"):
        track_table(duplicate)


def test_consistent_with_tracker_output() -> None:
    # Two cells moving right; the upper one divides at frame 3.
    rows = [(t, 0.0, 2.0 * t) for t in range(3)] + [(t, 50.0, 2.0 * t) for t in range(6)]
    rows += [(t, -3.0, 2.0 * t) for t in range(3, 6)] + [(t, 3.0, 2.0 * t) for t in range(3, 6)]
    objects = pd.DataFrame(rows, columns=["t", "y", "x"])
    objects["area"] = 100.0
    tracked = track(objects, max_distance=5.0)
    table = track_table(tracked)
    assert table["n_frames"].sum() == len(objects)
    assert len(table) == 4
    assert table["divides"].sum() == 1
    assert table.loc[table["divides"], "n_children"].item() == 2
    assert table["n_gaps"].eq(0).all()
    # Links: mother 2, other cell 5, daughters 2 + 2.
    assert merge_qc(tracked) == {"links": 11, "large_increase": 0, "fraction": 0.0}
