"""Cell Tracking Challenge export and import, against hand-written and simulated truth."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from scipy import ndimage

from pipeline.cli import main
from pipeline.errors import PipelineInputError
from pipeline.io import omezarr
from pipeline.io.ctc import read_ctc, read_track_file, split_at_gaps, write_ctc
from pipeline.io.tables import write_table
from pipeline.synthetic import simulate_field, simulate_plate

SPARSE1 = next(
    (
        root / "data/tracking/sparse1/TRA"
        for root in (Path(__file__).resolve().parents[1] / "../shared", Path("/work/shared"))
        if (root / "data/tracking/sparse1/TRA").is_dir()
    ),
    None,
)

# Three frames: cell A (labels 1, 3) divides at frame 2 into labels 5 and 6; cell B is 2, 4, 7.
LABELS = np.array(
    [
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 2, 2, 0],
            [0, 0, 0, 0, 0, 2, 2, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ],
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 3, 3, 0, 0, 0, 0],
            [0, 0, 3, 3, 0, 0, 4, 4],
            [0, 0, 0, 0, 0, 0, 4, 4],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ],
        [
            [5, 5, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 6, 0, 0, 0, 0],
            [0, 0, 0, 6, 0, 0, 7, 7],
            [0, 0, 0, 0, 0, 0, 7, 7],
        ],
    ],
    dtype=np.uint32,
)
TRACKS = pd.DataFrame(
    [
        *[(0, 1, 1, 0), (0, 2, 2, 0), (1, 3, 1, 0), (1, 4, 2, 0)],
        *[(2, 5, 3, 1), (2, 6, 4, 1), (2, 7, 2, 0)],
        (1, 99, 9, 0),  # label 99 is not in the image: ignored
    ],
    columns=["t", "label", "track_id", "parent_track_id"],
)
EXPECTED_MASKS = np.array(
    [
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 2, 2, 0],
            [0, 0, 0, 0, 0, 2, 2, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ],
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 0, 0, 2, 2],
            [0, 0, 0, 0, 0, 0, 2, 2],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ],
        [
            [3, 3, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 4, 0, 0, 0, 0],
            [0, 0, 0, 4, 0, 0, 2, 2],
            [0, 0, 0, 0, 0, 0, 2, 2],
        ],
    ],
    dtype=np.uint16,
)
EXPECTED_TRACK_FILE = "1 0 1 0\n2 0 2 0\n3 2 2 1\n4 2 2 1\n"


def _objects_of(labels: np.ndarray) -> pd.DataFrame:
    """One row (t, label) per object of a label time series."""
    rows = [(t, int(label)) for t, frame in enumerate(labels) for label in np.unique(frame)[1:]]
    return pd.DataFrame(rows, columns=["t", "label"])


@pytest.mark.parametrize("lazy", [False, True])
def test_write_hand_built_division(tmp_path: Path, lazy: bool) -> None:
    labels = da.from_array(LABELS, chunks=(1, 5, 8)) if lazy else LABELS
    folder = write_ctc(labels, TRACKS, tmp_path / "res")

    assert sorted(path.name for path in folder.iterdir()) == [
        "mask000.tif",
        "mask001.tif",
        "mask002.tif",
        "res_track.txt",
    ]
    for t in range(3):
        mask = tifffile.imread(folder / f"mask{t:03d}.tif")
        assert mask.dtype == np.uint16
        np.testing.assert_array_equal(mask, EXPECTED_MASKS[t])
    assert (folder / "res_track.txt").read_text() == EXPECTED_TRACK_FILE

    stack, objects = read_ctc(folder)
    np.testing.assert_array_equal(stack.compute(), EXPECTED_MASKS)
    expected = pd.DataFrame(
        {
            "t": [0, 0, 1, 1, 2, 2, 2],
            "label": [1, 2, 1, 2, 2, 3, 4],
            "y": [1.5, 2.5, 1.5, 2.5, 3.5, 0.0, 2.5],
            "x": [1.5, 5.5, 2.5, 6.5, 6.5, 0.5, 3.0],
            "area": [4, 4, 4, 4, 4, 2, 2],
            "track_id": [1, 2, 1, 2, 2, 3, 4],
            "parent_track_id": [0, 0, 0, 0, 0, 1, 1],
        }
    )
    pd.testing.assert_frame_equal(objects, expected, check_dtype=False)


def test_round_trip_simulated_ground_truth(tmp_path: Path) -> None:
    field = simulate_field(n_frames=5, size=96, seed=1)
    lineage = field.lineage
    assert (lineage["parent"] > 0).any(), "the simulation should hold a division"
    tracks = _objects_of(field.labels)
    parents = dict(zip(lineage["label"], lineage["parent"], strict=True))
    tracks["track_id"] = tracks["label"]
    tracks["parent_track_id"] = tracks["label"].map(parents)

    folder = write_ctc(field.labels, tracks, tmp_path / "res")
    written = read_track_file(folder / "res_track.txt")
    expected = lineage.set_axis(list(written.columns), axis=1)
    pd.testing.assert_frame_equal(written, expected, check_dtype=False)

    stack, objects = read_ctc(folder)
    np.testing.assert_array_equal(stack.compute(), field.labels)
    for t, frame in enumerate(field.labels):
        rows = objects[objects["t"] == t]
        ids = np.unique(frame)[1:]
        np.testing.assert_array_equal(rows["label"], ids)
        centres = np.array(ndimage.center_of_mass(frame > 0, frame, ids))
        np.testing.assert_allclose(rows[["y", "x"]].to_numpy(), centres, atol=1e-9)
        np.testing.assert_array_equal(rows["area"], ndimage.sum_labels(frame > 0, frame, ids))
    np.testing.assert_array_equal(
        objects["parent_track_id"], objects["label"].map(parents).to_numpy()
    )


def test_round_trip_3d(tmp_path: Path) -> None:
    labels = np.zeros((2, 3, 4, 5), dtype=np.uint16)
    labels[0, 0:2, 1:3, 1:3] = 1
    labels[1, 1:3, 1:3, 2:4] = 2
    tracks = pd.DataFrame({"t": [0, 1], "label": [1, 2], "track_id": [7, 7]})
    tracks["parent_track_id"] = np.nan
    folder = write_ctc(labels, tracks, tmp_path / "res")
    assert (folder / "res_track.txt").read_text() == "7 0 1 0\n"
    _, objects = read_ctc(folder)
    assert list(objects.columns) == [
        "t",
        "label",
        "z",
        "y",
        "x",
        "area",
        "track_id",
        "parent_track_id",
    ]
    np.testing.assert_allclose(objects[["z", "y", "x"]], [[0.5, 1.5, 1.5], [1.5, 1.5, 2.5]])


def test_write_errors(tmp_path: Path) -> None:
    with pytest.raises(PipelineInputError, match="parent_track_id"):
        write_ctc(LABELS, TRACKS.drop(columns="parent_track_id"), tmp_path / "a")
    with pytest.raises(PipelineInputError, match=r"frame 2 has 1 label\(s\) not in the track"):
        write_ctc(LABELS, TRACKS[TRACKS["label"] != 6], tmp_path / "b")
    with pytest.raises(PipelineInputError, match="65535"):
        write_ctc(LABELS, TRACKS.assign(track_id=TRACKS["track_id"] + 70000), tmp_path / "c")
    with pytest.raises(PipelineInputError, match="two objects in frame 2"):
        write_ctc(LABELS, TRACKS.replace({"track_id": {4: 3}}), tmp_path / "d")
    write_ctc(LABELS, TRACKS, tmp_path / "e")
    with pytest.raises(PipelineInputError, match="not empty"):
        write_ctc(LABELS, TRACKS, tmp_path / "e")
    (tmp_path / "e" / "notes.txt").write_text("keep")
    write_ctc(LABELS[:2], TRACKS, tmp_path / "e", overwrite=True)
    names = sorted(path.name for path in (tmp_path / "e").iterdir())
    assert names == ["mask000.tif", "mask001.tif", "notes.txt", "res_track.txt"]
    assert (tmp_path / "e" / "res_track.txt").read_text() == "1 0 1 0\n2 0 1 0\n"


def test_read_errors_and_warnings(tmp_path: Path) -> None:
    with pytest.raises(PipelineInputError, match="CTC folder not found"):
        read_ctc(tmp_path / "missing")
    with pytest.raises(PipelineInputError, match="no CTC masks"):
        read_ctc(tmp_path)
    folder = write_ctc(LABELS, TRACKS, tmp_path / "res")
    track_file = folder / "res_track.txt"
    track_file.write_text(EXPECTED_TRACK_FILE + "5 1 x 0\n")
    with pytest.raises(PipelineInputError, match="line 5 is not 'L B E P'"):
        read_ctc(folder)
    track_file.write_text("1 0 1 0\n3 2 2 1\n4 2 2 1\n")
    with pytest.raises(PipelineInputError, match=r"frame 0 holds 1 label\(s\) not in the track"):
        read_ctc(folder)
    track_file.write_text(EXPECTED_TRACK_FILE + "8 1 1 0\n")
    with pytest.warns(UserWarning, match=r"1 track\(s\) listed but in no mask"):
        _, objects = read_ctc(folder)
    assert 8 not in set(objects["label"])
    track_file.unlink()
    with pytest.raises(PipelineInputError, match="track file not found"):
        read_ctc(folder)


@pytest.mark.skipif(SPARSE1 is None, reason="shared data ../shared/data/tracking absent")
def test_read_sparse1_ground_truth() -> None:
    lines = read_track_file(SPARSE1 / "man_track.txt")
    assert len(list(SPARSE1.glob("man_track*.tif"))) == 86
    assert len(lines) == 571
    mothers = lines.loc[lines["parent_track_id"] > 0, "parent_track_id"]
    assert mothers.nunique() == 101  # divisions = mothers (one has three daughters)
    assert len(mothers) == 203

    labels, objects = read_ctc(SPARSE1, frames=[0, 85])
    assert labels.shape == (2, 1024, 1024) and labels.dtype == np.uint16
    for frame in (0, 85):
        alive = lines[(lines["first"] <= frame) & (lines["last"] >= frame)]["track_id"]
        rows = objects[objects["t"] == frame]
        assert sorted(rows["label"]) == sorted(alive)  # no gaps in sparse1
    image = labels[1].compute()
    some = objects[objects["t"] == 85].iloc[[0, len(alive) // 2, -1]]
    for row in some.itertuples():
        centre = ndimage.center_of_mass(image == row.label)
        np.testing.assert_allclose([row.y, row.x], centre, atol=1e-9)
        assert row.parent_track_id == lines.set_index("track_id").loc[row.label, "parent_track_id"]


@pytest.mark.slow
def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plate = simulate_plate(
        tmp_path / "plate.zarr", rows=1, columns=1, fields=1, n_frames=3, size=64, seed=0
    )
    image = zarr.open_group(str(plate / "A/1/0"), mode="r+")
    truth = image["labels/ground_truth/0"][:]
    lineage = pd.read_parquet(plate / "A/1/0/tables/ground_truth_lineage/table.parquet")
    # A pipeline-like output: ids unique over the time series, tracks in the table.
    cells = _objects_of(truth).rename(columns={"label": "track_id"})
    cells["label"] = np.arange(1, len(cells) + 1) + 100
    cells["parent_track_id"] = cells["track_id"].map(dict(lineage[["label", "parent"]].values))
    ids = np.zeros_like(truth)
    for row in cells.itertuples():
        ids[row.t][truth[row.t] == row.track_id] = row.label
    omezarr.write_labels(image, "cells", ids)
    write_table(image, "cells", cells.sample(frac=1, random_state=0), table_type="feature_table")

    out = tmp_path / "ctc"
    assert main(["export-ctc", str(plate), "A/1/0", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{len(lineage)} tracks over 3 frames" in printed
    written = read_track_file(out / "res_track.txt")
    np.testing.assert_array_equal(written.to_numpy(), lineage.to_numpy())
    for t in range(3):
        np.testing.assert_array_equal(tifffile.imread(out / f"mask{t:03d}.tif"), truth[t])

    assert main(["export-ctc", str(plate), "A/1/0", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export-ctc", str(plate), "A/1/0", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["export-ctc", str(plate), "B/7/0", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    # a lone image (here the field group opened as the root) exports with field ""
    assert main(["export-ctc", str(plate / "A/1/0"), "", str(tmp_path / "y")]) == 0
    assert (tmp_path / "y" / "res_track.txt").read_text() == (out / "res_track.txt").read_text()


def test_a_track_closed_across_a_gap_becomes_two_ctc_tracks():
    # track 4 is seen at t = 0, 1, then missed at t = 2, and seen again at t = 3, 4; track 7
    # is a daughter of 4 starting at t = 5. Expected by hand: the run after the gap gets the
    # new id 8 (max id 7 + 1) with parent 4, and the daughter points to the last run, 8.
    tracks = pd.DataFrame(
        {
            "t": [0, 1, 3, 4, 5, 0],
            "label": [1, 2, 3, 4, 5, 6],
            "track_id": [4, 4, 4, 4, 7, 2],
            "parent_track_id": [0, 0, 0, 0, 4, 0],
        }
    )
    split = split_at_gaps(tracks)
    assert split["track_id"].tolist() == [4, 4, 8, 8, 7, 2]
    assert split["parent_track_id"].tolist() == [0, 0, 4, 4, 8, 0]
    assert split[["t", "label"]].equals(tracks[["t", "label"]])
    # tracks without gaps are unchanged
    no_gap = pd.DataFrame(
        {
            "t": [0, 1, 2, 3],
            "label": [1, 2, 3, 4],
            "track_id": [4, 4, 7, 7],
            "parent_track_id": [0, 0, 4, 4],
        }
    )
    assert split_at_gaps(no_gap).equals(no_gap)
