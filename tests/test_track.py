"""Tests of frame-to-frame linear-assignment tracking against hand-built and simulated truth."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from pipeline.tracking import NO_LINK_COST_FACTOR, track


def _objects(rows: list[tuple[int, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["t", "y", "x"])


def _same_track(tracked: pd.DataFrame, first: int, second: int) -> bool:
    return tracked["track_id"].iloc[first] == tracked["track_id"].iloc[second]


def test_two_cells_moving_right_are_linked() -> None:
    objects = _objects([(0, 0, 0), (0, 50, 0), (1, 0, 4), (1, 50, 4), (2, 0, 8), (2, 50, 8)])
    tracked = track(objects, max_distance=10)
    assert tracked["track_id"].tolist() == [1, 2, 1, 2, 1, 2]
    assert tracked["parent_track_id"].tolist() == [0] * 6
    assert tracked["track_id"].dtype == np.int64
    assert tracked["parent_track_id"].dtype == np.int64


def test_global_optimum_beats_nearest_neighbour_within_range() -> None:
    # Greedy takes the closest pair B-X (1) then A-Y (5.5): 1 + 30.25 = 31.25.
    # The optimum is A-X (2) and B-Y (2.5): 4 + 6.25 = 10.25.
    objects = _objects([(0, 0, 0), (0, 0, 3), (1, 0, 2), (1, 0, 5.5)])
    tracked = track(objects, max_distance=10)
    assert _same_track(tracked, 0, 2)
    assert _same_track(tracked, 1, 3)


def test_global_optimum_beats_nearest_neighbour_at_range_limit() -> None:
    # Greedy links B-X (4), leaving A 16 from Y, beyond range: one death and one birth.
    # The optimum links A-X (6) and B-Y (6).
    objects = _objects([(0, 0, 0), (0, 0, 10), (1, 0, 6), (1, 0, 16)])
    tracked = track(objects, max_distance=15)
    assert _same_track(tracked, 0, 2)
    assert _same_track(tracked, 1, 3)
    assert tracked["track_id"].nunique() == 2


def test_birth_starts_a_new_track() -> None:
    objects = _objects([(0, 0, 0), (1, 0, 1), (1, 40, 40)])
    tracked = track(objects, max_distance=10)
    assert tracked["track_id"].tolist() == [1, 1, 2]


def test_death_ends_a_track() -> None:
    objects = _objects([(0, 0, 0), (0, 40, 40), (1, 0, 1), (2, 0, 2)])
    tracked = track(objects, max_distance=10)
    assert tracked["track_id"].tolist() == [1, 2, 1, 1]


def test_jump_beyond_max_distance_starts_a_new_track() -> None:
    objects = _objects([(0, 0, 0), (1, 0, 10.5)])
    assert track(objects, max_distance=10)["track_id"].tolist() == [1, 2]
    assert track(objects, max_distance=11)["track_id"].tolist() == [1, 1]


def test_identical_positions_link() -> None:
    objects = _objects([(0, 3, 3), (1, 3, 3)])
    assert track(objects)["track_id"].tolist() == [1, 1]


def test_three_dimensional_links_use_z() -> None:
    # In y/x alone the cells swap; z (12 apart) keeps them on their own tracks.
    objects = pd.DataFrame(
        {
            "t": [0, 0, 1, 1],
            "z": [0.0, 12.0, 0.0, 12.0],
            "y": [0.0, 0.0, 0.0, 0.0],
            "x": [0.0, 3.0, 3.0, 0.0],
        }
    )
    tracked = track(objects, max_distance=10)
    assert _same_track(tracked, 0, 2)
    assert _same_track(tracked, 1, 3)
    yx_only = track(objects, max_distance=10, coordinate_columns=["y", "x"])
    assert _same_track(yx_only, 0, 3)
    assert _same_track(yx_only, 1, 2)


def test_no_link_across_an_empty_frame_without_gap_closing() -> None:
    objects = _objects([(0, 0, 0), (1, 0, 1), (3, 0, 1), (4, 0, 1)])
    assert track(objects, max_gap=0)["track_id"].tolist() == [1, 1, 2, 2]
    assert track(objects)["track_id"].tolist() == [1, 1, 1, 1]


def test_gap_of_one_missed_frame_is_closed() -> None:
    # Cell A is missed at t=2; cell B (far away) is seen throughout.
    objects = _objects(
        [(0, 0, 0), (0, 50, 0), (1, 0, 2), (1, 50, 2), (2, 50, 4), (3, 0, 6), (3, 50, 6)]
    )
    tracked = track(objects, max_distance=5)
    assert tracked["track_id"].tolist() == [1, 2, 1, 2, 2, 1, 2]
    assert tracked["parent_track_id"].tolist() == [0] * 7


def test_gap_longer_than_max_gap_is_not_closed() -> None:
    # Missed at t=1, 2 and 3: three frames.
    objects = _objects([(0, 0, 0), (4, 0, 1)])
    assert track(objects, max_gap=2)["track_id"].tolist() == [1, 2]
    assert track(objects, max_gap=3)["track_id"].tolist() == [1, 1]


def test_gap_closing_respects_its_distance() -> None:
    objects = _objects([(0, 0, 0), (2, 0, 8)])
    assert track(objects, max_distance=5)["track_id"].tolist() == [1, 2]
    tracked = track(objects, max_distance=5, gap_closing_max_distance=10)
    assert tracked["track_id"].tolist() == [1, 1]


def test_division_gives_a_mother_and_two_daughter_tracks() -> None:
    # Mother at x=0 for t=0..2 divides; daughters at y=-3 and y=+3 from t=3.
    objects = _objects(
        [(0, 0, 0), (1, 0, 0), (2, 0, 0), (3, -3, 0), (3, 3, 0), (4, -5, 0), (4, 5, 0)]
    )
    tracked = track(objects, max_distance=5)
    assert tracked["track_id"].tolist() == [1, 1, 1, 2, 3, 2, 3]
    assert tracked["parent_track_id"].tolist() == [0, 0, 0, 1, 1, 1, 1]
    undivided = track(objects, max_distance=5, divisions=False)
    assert undivided["parent_track_id"].tolist() == [0] * 7
    assert undivided["track_id"].nunique() == 2


def test_division_of_a_daughter_track_is_nested() -> None:
    objects = _objects(
        [(0, 0, 0), (1, -3, 0), (1, 3, 0), (2, -3, 0), (2, 3, 0), (3, -3, 0), (3, 7, 0), (3, 1, 0)]
    )
    tracked = track(objects, max_distance=5)
    # 1 divides into 2 (y=-3) and 3 (y=3); 3 divides into 4 (y=1) and 5 (y=7) at t=3.
    assert tracked["track_id"].tolist() == [1, 2, 3, 2, 3, 2, 4, 5]
    assert tracked["parent_track_id"].tolist() == [0, 1, 1, 1, 1, 1, 3, 3]


def test_splitting_respects_its_distance() -> None:
    objects = _objects([(0, 0, 0), (1, 0, 0), (1, 8, 0)])
    assert track(objects, max_distance=5)["parent_track_id"].tolist() == [0, 0, 0]
    tracked = track(objects, max_distance=5, splitting_max_distance=10)
    assert tracked["track_id"].tolist() == [1, 2, 3]
    assert tracked["parent_track_id"].tolist() == [0, 1, 1]


def test_birth_far_from_any_cell_is_not_a_division() -> None:
    objects = _objects([(0, 0, 0), (1, 0, 1), (2, 0, 2), (2, 40, 40), (3, 0, 3), (3, 40, 41)])
    tracked = track(objects, max_distance=10)
    assert tracked["track_id"].tolist() == [1, 1, 1, 2, 1, 2]
    assert tracked["parent_track_id"].tolist() == [0] * 6


def test_death_is_not_gap_closed_to_a_distant_start() -> None:
    objects = _objects([(0, 0, 0), (1, 0, 1), (3, 40, 40), (4, 40, 41)])
    tracked = track(objects, max_distance=10)
    assert tracked["track_id"].tolist() == [1, 1, 2, 2]
    assert tracked["parent_track_id"].tolist() == [0] * 4


def test_crossing_pair_keeps_identities() -> None:
    # A moves right, B moves left, 2 apart in y: they pass 2 apart at t=2.
    rows = [(t, 0, 4.0 * t) for t in range(5)]
    rows += [(t, 2, 16.0 - 4.0 * t) for t in range(5)]
    tracked = track(_objects(rows), max_distance=5)
    assert tracked["track_id"].tolist() == [1] * 5 + [2] * 5
    assert tracked["parent_track_id"].tolist() == [0] * 10


def test_three_dimensional_division_uses_z() -> None:
    # Daughters split along z only; a distant cell in z at the same y/x is not a candidate.
    objects = pd.DataFrame(
        {
            "t": [0, 1, 2, 2, 0, 1, 2],
            "z": [0.0, 0.0, -3.0, 3.0, 30.0, 30.0, 30.0],
            "y": [0.0] * 7,
            "x": [0.0] * 7,
        }
    )
    tracked = track(objects, max_distance=5)
    assert tracked["track_id"].tolist() == [1, 1, 3, 4, 2, 2, 2]
    assert tracked["parent_track_id"].tolist() == [0, 0, 1, 1, 0, 0, 0]


def test_single_row_and_no_rows() -> None:
    tracked = track(_objects([(5, 1, 2)]))
    assert tracked["track_id"].tolist() == [1]
    assert tracked["parent_track_id"].tolist() == [0]
    assert track(_objects([])).empty


def test_row_order_index_and_other_columns_are_kept() -> None:
    objects = pd.DataFrame(
        {
            "t": [1, 0, 1, 0],
            "y": [50.0, 0.0, 0.0, 50.0],
            "x": [1.0, 0.0, 1.0, 0.0],
            "label": [7, 8, 9, 10],
        },
        index=[30, 10, 40, 20],
    )
    tracked = track(objects, max_distance=5)
    pd.testing.assert_frame_equal(tracked[objects.columns], objects)
    # Numbered in order of first appearance: frame 0, then row order.
    assert tracked["track_id"].tolist() == [2, 1, 1, 2]


def test_same_result_whatever_the_row_order() -> None:
    rng = np.random.default_rng(0)
    objects = pd.DataFrame(
        {
            "t": np.repeat(np.arange(5), 30),
            "y": rng.uniform(0, 100, 150),
            "x": rng.uniform(0, 100, 150),
        }
    )
    tracked = track(objects, max_distance=12)
    shuffled = track(objects.sample(frac=1, random_state=1), max_distance=12).loc[objects.index]
    # Track ids differ by numbering only: the same rows share a track.
    pairs = set(zip(tracked["track_id"], shuffled["track_id"], strict=True))
    assert len(pairs) == tracked["track_id"].nunique() == shuffled["track_id"].nunique()


def test_simulated_random_walks_are_recovered() -> None:
    rng = np.random.default_rng(42)
    spacing, n_frames = 20.0, 20
    grid = np.stack(np.meshgrid(np.arange(10), np.arange(20), indexing="ij"), -1).reshape(-1, 2)
    start = grid * spacing + rng.uniform(-2, 2, grid.shape)
    steps = rng.normal(0, 1.0, (n_frames - 1, len(start), 2))
    positions = np.concatenate([start[None], start + np.cumsum(steps, axis=0)])
    cell = np.tile(np.arange(len(start)), n_frames)
    objects = pd.DataFrame(
        {
            "t": np.repeat(np.arange(n_frames), len(start)),
            "cell": cell,
            "y": positions[..., 0].ravel(),
            "x": positions[..., 1].ravel(),
        }
    ).sample(frac=1, random_state=3)
    tracked = track(objects, max_distance=8).sort_values(["cell", "t"])
    track_ids = tracked["track_id"].to_numpy().reshape(len(start), n_frames)
    recovered = np.mean(track_ids[:, 1:] == track_ids[:, :-1])
    assert recovered >= 0.99


def test_twenty_thousand_cells_link_fast_and_sparse() -> None:
    rng = np.random.default_rng(7)
    n_cells = 20_000
    start = rng.uniform(0, 3000, (n_cells, 2))
    moved = start + rng.normal(0, 1.0, start.shape)
    objects = pd.DataFrame(
        {
            "t": np.repeat([0, 1], n_cells),
            "y": np.r_[start[:, 0], moved[:, 0]],
            "x": np.r_[start[:, 1], moved[:, 1]],
        }
    )
    tracemalloc.start()
    began = time.perf_counter()
    tracked = track(objects, max_distance=15)
    elapsed = time.perf_counter() - began
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # A dense (40,000 x 40,000) float matrix would need 12.8 GB.
    assert peak_bytes < 100e6
    assert elapsed < 10
    track_ids = tracked["track_id"].to_numpy()
    assert np.mean(track_ids[:n_cells] == track_ids[n_cells:]) > 0.99


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        (pd.DataFrame({"y": [0.0], "x": [0.0]}), "'t'"),
        (pd.DataFrame({"t": [0], "label": [1]}), "coordinate columns"),
        (pd.DataFrame({"t": [0, 1], "y": [0.0, np.nan], "x": [0.0, 0.0]}), "NaN"),
        (pd.DataFrame({"t": [0.5], "y": [0.0], "x": [0.0]}), "integer"),
    ],
)
def test_invalid_input_raises_value_error(objects: pd.DataFrame, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        track(objects)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_distance": 0}, "max_distance"),
        ({"gap_closing_max_distance": -1}, "gap_closing_max_distance"),
        ({"splitting_max_distance": 0}, "splitting_max_distance"),
        ({"alternative_cost": 0}, "alternative_cost"),
        ({"max_gap": -1}, "max_gap"),
        ({"max_gap": 1.5}, "max_gap"),
    ],
)
def test_invalid_parameters_raise_value_error(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        track(_objects([(0, 0, 0)]), **options)


def test_missing_explicit_coordinate_column_raises() -> None:
    with pytest.raises(ValueError, match="'z'"):
        track(_objects([(0, 0, 0)]), coordinate_columns=["z", "y", "x"])


def test_feature_weights_prefer_links_that_keep_the_size():
    # A (small) and B (large) swap nearest neighbours between the frames. By distance alone
    # A->P and B->Q cost 16 + 16 = 32 < 36 + 36. With weight 10 on ln(area), A->P costs
    # 16 * (1 + 10 ln 4) = 237.8, so A->Q and B->P (36 + 36) win.
    objects = pd.DataFrame(
        {
            "t": [0, 0, 1, 1],
            "y": [0.0, 10.0, 4.0, 6.0],
            "x": [0.0, 0.0, 0.0, 0.0],
            "area": [100.0, 400.0, 400.0, 100.0],
        },
        index=["A", "B", "P", "Q"],
    )
    plain = track(objects, max_distance=10.0, max_gap=0, divisions=False)
    assert plain.loc["A", "track_id"] == plain.loc["P", "track_id"]
    weighted = track(
        objects, max_distance=10.0, max_gap=0, divisions=False, feature_weights={"area": 10.0}
    )
    assert weighted.loc["A", "track_id"] == weighted.loc["Q", "track_id"]
    assert weighted.loc["B", "track_id"] == weighted.loc["P", "track_id"]
    with pytest.raises(ValueError, match="feature 'volume'"):
        track(objects, feature_weights={"volume": 1.0})


def test_frame_linking_equals_laptrack_on_dense_random_walkers() -> None:
    """The same frame-to-frame problem given to laptrack (an independent implementation of
    Jaqaman's linear assignment): identical tracks, births and deaths included."""
    laptrack = pytest.importorskip("laptrack")
    rng = np.random.default_rng(7)
    rows, position = [], rng.uniform(0, 80, size=(60, 2))
    for t in range(8):
        position = position + rng.normal(0, 2.5, size=position.shape)  # ~ nearest neighbour / 2
        alive = rng.random(len(position)) > 0.05  # some cells vanish, new ones appear
        position = np.vstack([position[alive], rng.uniform(0, 80, size=(3, 2))])
        rows += [(t, y, x) for y, x in position]
    objects = pd.DataFrame(rows, columns=["t", "y", "x"])
    max_distance = 8.0
    ours = track(objects, max_distance=max_distance, max_gap=0, divisions=False)

    no_link = NO_LINK_COST_FACTOR * max_distance**2
    tracker = laptrack.LapTrack(
        metric="sqeuclidean",
        cutoff=max_distance**2,
        gap_closing_cutoff=False,
        splitting_cutoff=False,
        track_start_cost=no_link,
        track_end_cost=no_link,
    )
    theirs, _, _ = tracker.predict_dataframe(
        objects.rename(columns={"t": "frame"}), ["y", "x"], frame_col="frame"
    )
    # Same partition of the objects into tracks: the ids correspond one to one.
    pairs = pd.DataFrame({"ours": ours["track_id"].to_numpy(), "theirs": theirs["track_id"]})
    assert pairs.drop_duplicates().shape[0] == pairs["ours"].nunique() == pairs["theirs"].nunique()
    assert 60 < pairs["ours"].nunique() < len(objects)  # links and new tracks both occur
