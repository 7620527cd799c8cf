"""Tests of ``pipeline.qc.evaluate`` and the ``pipeline evaluate`` command.

Label sets are written as TIFF files and OME-Zarr label images holding hand-drawn images whose
scores are counted by hand (the same 6x6 case as in test_metrics.py), and a simulated plate
whose ground truth is scored against itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pipeline.cli import main
from pipeline.errors import PipelineInputError
from pipeline.io.omezarr import create_root, write_image, write_labels
from pipeline.qc.evaluate import evaluate, read_label_images
from pipeline.synthetic import simulate_plate


def _six_by_six() -> tuple[np.ndarray, np.ndarray]:
    """Ground truth 1, 2, 3 and prediction 10, 20, 30 (drawn in test_metrics.py).

    1 vs 10: IoU 3/5; 2 vs 20: IoU 1; 3 missed (FN); 30 overlaps nothing (FP).
    AP: 2/4 at IoU 0.5-0.6, 1/5 at 0.65-0.95; mean AP 0.29. Precision = recall: 2/3, then
    1/3. Jaccard (3/5 + 1) / 2 = 0.8, Dice (6/8 + 1) / 2 = 0.875.
    """
    truth = np.zeros((6, 6), dtype=np.uint16)
    truth[0:2, 0:2] = 1
    truth[4:6, 0:3] = 2
    truth[3:6, 5] = 3
    prediction = np.zeros((6, 6), dtype=np.uint16)
    prediction[0, 0:3] = 10
    prediction[1, 0] = 10
    prediction[4:6, 0:3] = 20
    prediction[2, 3:5] = 30
    return truth, prediction


def _tiff_folders(tmp_path: Path) -> tuple[Path, Path]:
    """pred/ and gt/ with a.tif (the 6x6 case) and b.tif (both empty), plus a non-TIFF file."""
    truth, prediction = _six_by_six()
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for folder, image in ((pred, prediction), (gt, truth)):
        folder.mkdir()
        tifffile.imwrite(folder / "a.tif", image)
        tifffile.imwrite(folder / "b.tif", np.zeros((4, 5), dtype=np.uint8))
        (folder / "notes.txt").write_text("not an image")
    return pred, gt


def _label_zarr(path: Path, labels: np.ndarray, name: str = "cells") -> Path:
    """An OME-Zarr 0.5 image (t, c, y, x) with the (t, y, x) label image ``name``."""
    root = create_root(path)
    image = write_image(
        root, "image", np.zeros((labels.shape[0], 1, *labels.shape[1:]), np.uint16), "tcyx", {}
    )
    write_labels(image, name, labels)
    return path / "image" / "labels" / name


def test_tiff_folders_are_paired_by_name_and_scored_by_hand(tmp_path: Path) -> None:
    pred, gt = _tiff_folders(tmp_path)
    report = evaluate(pred, gt)
    assert report.names == ("a.tif", "b.tif")
    assert report.sources[0] == (str(pred / "a.tif"), str(gt / "a.tif"))
    first, second = report.scores
    np.testing.assert_allclose(first.ap, [0.5] * 3 + [0.2] * 7)
    assert second.ap.tolist() == [1.0] * 10

    table = report.table()
    assert list(table.columns) == [
        "image",
        "n_true",
        "n_pred",
        "AP@0.5",
        "AP@0.75",
        "AP@0.9",
        "AP@0.5:0.95",
        "precision@0.5",
        "recall@0.5",
        "Jaccard",
        "Dice",
        "ARI",
    ]
    row = table.iloc[0]
    assert (row["image"], row["n_true"], row["n_pred"]) == ("a.tif", 3, 3)
    assert row["AP@0.5"] == pytest.approx(0.5)
    assert row["AP@0.75"] == pytest.approx(0.2)
    assert row["AP@0.5:0.95"] == pytest.approx(0.29)
    assert row["precision@0.5"] == pytest.approx(2 / 3)
    assert row["recall@0.5"] == pytest.approx(2 / 3)
    assert row["Jaccard"] == pytest.approx(0.8)
    assert row["Dice"] == pytest.approx(0.875)
    assert np.isnan(table.iloc[1]["Jaccard"])

    # mAP@0.5 = (0.5 + 1) / 2; mean AP = (0.29 + 1) / 2; Jaccard only from a.tif.
    assert report.summary["ap"]["0.5"] == pytest.approx(0.75)
    assert report.summary["mean_ap"] == pytest.approx(0.645)
    assert report.summary["jaccard"] == pytest.approx(0.8)

    text = report.format()
    assert "a.tif" in text and "b.tif" in text
    assert "mAP@0.5" in text and "0.750" in text
    assert "mean AP 0.5:0.95" in text and "0.645" in text


def test_json_report_has_per_image_rows_summary_and_null_for_undefined(tmp_path: Path) -> None:
    pred, gt = _tiff_folders(tmp_path)
    report = evaluate(pred, gt, thresholds=[0.5, 0.75], min_size=1)
    written = json.loads(report.to_json(tmp_path / "report.json").read_text())
    assert written["thresholds"] == [0.5, 0.75]
    assert written["min_size"] == 1
    assert [row["name"] for row in written["per_image"]] == ["a.tif", "b.tif"]
    first = written["per_image"][0]
    assert first["ap"] == {"0.5": pytest.approx(0.5), "0.75": pytest.approx(0.2)}
    assert (first["tp"], first["fp"], first["fn"]) == (
        {"0.5": 2, "0.75": 1},
        {"0.5": 1, "0.75": 2},
        {"0.5": 1, "0.75": 2},
    )
    assert first["mean_ap"] == pytest.approx(0.35)
    assert first["ground_truth"] == str(gt / "a.tif")
    assert written["per_image"][1]["jaccard"] is None
    assert written["summary"]["ap"]["0.75"] == pytest.approx(0.6)
    assert written["summary"]["n_images"] == 2


def test_single_tiffs_and_min_size(tmp_path: Path) -> None:
    truth, prediction = _six_by_six()
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    tifffile.imwrite(tmp_path / "prediction.tiff", prediction)
    report = evaluate(tmp_path / "prediction.tiff", tmp_path / "truth.tif")
    assert report.names == ("truth.tif | prediction.tiff",)
    assert report.summary["ap"]["0.5"] == pytest.approx(0.5)
    # min_size 3 drops 30 (2 px); 3 (3 px) stays: TP 2, FP 0, FN 1 at 0.5, AP 2/3.
    report = evaluate(tmp_path / "prediction.tiff", tmp_path / "truth.tif", min_size=3)
    assert report.scores[0].n_pred == 2
    assert report.summary["ap"]["0.5"] == pytest.approx(2 / 3)


def test_simulated_ground_truth_against_itself_is_perfect(tmp_path: Path) -> None:
    plate = simulate_plate(
        tmp_path / "plate.zarr", rows=1, columns=1, fields=1, n_frames=2, size=64, seed=0
    )
    labels = plate / "A" / "1" / "0" / "labels" / "ground_truth"
    report = evaluate(labels, labels)
    assert report.names == ("t0", "t1")
    assert report.sources[1][0].endswith("[t=1]")
    for score in report.scores:
        assert score.n_true > 0
        assert score.ap.tolist() == [1.0] * 10
        assert (score.jaccard, score.dice, score.ari) == (1.0, 1.0, 1.0)
    assert report.summary["mean_ap"] == 1.0


def test_omezarr_frames_pair_with_sorted_tiffs(tmp_path: Path) -> None:
    truth, prediction = _six_by_six()
    labels = _label_zarr(tmp_path / "pred.zarr", np.stack([prediction, np.zeros_like(truth)]))
    gt = tmp_path / "gt"
    gt.mkdir()
    tifffile.imwrite(gt / "2.tif", np.zeros_like(truth))  # sorted second: pairs with t1
    tifffile.imwrite(gt / "1.tif", truth)
    report = evaluate(labels, gt)
    assert report.names == ("1.tif | t0", "2.tif | t1")
    np.testing.assert_allclose(report.scores[0].ap, [0.5] * 3 + [0.2] * 7)
    assert report.scores[1].ap.tolist() == [1.0] * 10


def test_a_tyx_tiff_is_a_time_series_with_axes_and_pairs_with_frames(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--axes tyx: each timepoint of one TIFF is an image, scored as the same frames saved
    one per file (the hand-scored 6x6 case, then an empty frame), and as OME-Zarr labels."""
    truth, prediction = _six_by_six()
    movie = tmp_path / "pred.tif"
    tifffile.imwrite(movie, np.stack([prediction, np.zeros_like(truth)]))
    gt = tmp_path / "gt"
    gt.mkdir()
    tifffile.imwrite(gt / "man_seg000.tif", truth)
    tifffile.imwrite(gt / "man_seg001.tif", np.zeros_like(truth))
    report = evaluate(movie, gt, axes="tyx")
    assert report.names == ("man_seg000.tif | pred.tif t0", "man_seg001.tif | pred.tif t1")
    assert report.sources[1][0].endswith("pred.tif [t=1]")
    np.testing.assert_allclose(report.scores[0].ap, [0.5] * 3 + [0.2] * 7)
    assert report.scores[1].ap.tolist() == [1.0] * 10
    as_zarr = evaluate(_label_zarr(tmp_path / "p.zarr", np.stack([prediction, truth * 0])), gt)
    assert report.summary == as_zarr.summary
    args = ["evaluate", str(movie), str(gt)]  # --axes: the prediction's
    assert main([*args, "--axes", "TYX"]) == 0
    assert "pred.tif t1" in capsys.readouterr().out
    assert main(args) == 2  # without axes: one 3-D image against two
    assert "has 1 image(s) but the ground truth" in capsys.readouterr().err
    assert main([*args, "--axes", "tzyx"]) == 2
    assert "have 4 letters but the file has 3 dimensions" in capsys.readouterr().err
    assert main([*args, "--axes", "tcx"]) == 2
    assert "distinct letters of tzyx including y and x" in capsys.readouterr().err
    assert main(["evaluate", str(gt / "man_seg000.tif"), str(movie), "--truth-axes", "tyx"]) == 2
    assert "has 1 image(s) but the ground truth" in capsys.readouterr().err  # 1 against 2


def test_omezarr_04_labels_with_a_channel_axis(tmp_path: Path) -> None:
    truth, prediction = _six_by_six()
    group = zarr.open_group(tmp_path / "labels.zarr", mode="w", zarr_format=2)
    group.create_array("0", data=prediction[np.newaxis].astype(np.int32))
    group.attrs.update(
        {
            "multiscales": [
                {
                    "version": "0.4",
                    "axes": [
                        {"name": "c", "type": "channel"},
                        {"name": "y", "type": "space"},
                        {"name": "x", "type": "space"},
                    ],
                    "datasets": [
                        {
                            "path": "0",
                            "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1]}],
                        }
                    ],
                }
            ],
            "image-label": {"version": "0.4"},
        }
    )
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    (image,) = read_label_images(tmp_path / "labels.zarr")
    assert (image.name, image.shape) == ("labels.zarr", (6, 6))
    report = evaluate(tmp_path / "labels.zarr", tmp_path / "truth.tif")
    assert report.scores[0].mean_ap == pytest.approx(0.29)


def test_names_present_on_one_side_only_are_named(tmp_path: Path) -> None:
    pred, gt = _tiff_folders(tmp_path)
    (pred / "b.tif").rename(pred / "c.tif")
    with pytest.raises(PipelineInputError, match=r"only in the prediction: c\.tif.*b\.tif"):
        evaluate(pred, gt)


def test_shape_mismatch_names_the_path(tmp_path: Path) -> None:
    pred, gt = _tiff_folders(tmp_path)
    tifffile.imwrite(pred / "b.tif", np.zeros((5, 4), dtype=np.uint8))
    with pytest.raises(PipelineInputError, match="shape") as error:
        evaluate(pred, gt)
    assert error.value.path == str(pred / "b.tif")


def test_frame_count_mismatch(tmp_path: Path) -> None:
    truth, _ = _six_by_six()
    labels = _label_zarr(tmp_path / "pred.zarr", np.stack([truth, truth]))
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    with pytest.raises(PipelineInputError, match="2 image"):
        evaluate(labels, tmp_path / "truth.tif")


def test_non_integer_labels_are_rejected(tmp_path: Path) -> None:
    truth, _ = _six_by_six()
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    tifffile.imwrite(tmp_path / "float.tif", truth.astype(np.float32))
    with pytest.raises(PipelineInputError, match="integer") as error:
        evaluate(tmp_path / "float.tif", tmp_path / "truth.tif")
    assert error.value.path == str(tmp_path / "float.tif")


def test_missing_and_unusable_paths(tmp_path: Path) -> None:
    truth, _ = _six_by_six()
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    with pytest.raises(PipelineInputError, match="does not exist"):
        evaluate(tmp_path / "missing", tmp_path / "truth.tif")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineInputError, match="no TIFF files"):
        evaluate(tmp_path / "empty", tmp_path / "truth.tif")
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(PipelineInputError, match="not a TIFF"):
        evaluate(tmp_path / "table.csv", tmp_path / "truth.tif")
    labels = _label_zarr(tmp_path / "pred.zarr", truth[np.newaxis])
    image = labels.parent.parent
    with pytest.raises(PipelineInputError, match="label images here: labels/cells"):
        evaluate(image, tmp_path / "truth.tif")


def test_cli_prints_the_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred, gt = _tiff_folders(tmp_path)
    out = tmp_path / "scores.json"
    code = main(["evaluate", str(pred), str(gt), "--json", str(out), "--thresholds", "0.5,0.75"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "a.tif" in printed and "AP@0.75" in printed
    assert "mAP@0.5" in printed and "0.750" in printed  # (0.5 + 1) / 2
    assert "ARI" in printed
    assert f"report written to {out}" in printed
    written = json.loads(out.read_text())
    assert written["thresholds"] == [0.5, 0.75]
    assert written["summary"]["ap"]["0.75"] == pytest.approx(0.6)  # (0.2 + 1) / 2


def test_cli_min_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred, gt = _tiff_folders(tmp_path)
    out = tmp_path / "scores.json"
    assert main(["evaluate", str(pred), str(gt), "--min-size", "3", "--json", str(out)]) == 0
    assert "min size 3" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["min_size"] == 3
    assert written["per_image"][0]["ap"]["0.5"] == pytest.approx(2 / 3)


def test_cli_bad_path_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred, _ = _tiff_folders(tmp_path)
    assert main(["evaluate", str(pred), str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().count("\n") == 0
    assert captured.err.startswith("error: path does not exist")


@pytest.mark.parametrize(
    "option", [["--thresholds", "0.5,x"], ["--thresholds", "0,0.5"], ["--min-size", "-1"]]
)
def test_cli_rejects_bad_options(tmp_path: Path, option: list[str]) -> None:
    pred, gt = _tiff_folders(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(pred), str(gt), *option])
    assert exit_info.value.code == 2
