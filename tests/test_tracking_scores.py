"""Tracking scored with the Cell Tracking Challenge measures (py-ctcmetrics, issue 4).

Objects come from ground-truth masks, so only the linking is scored: TRA (the CTC tracking
accuracy, here driven by links since detection is perfect), LNK and BC(0), the F1 score of
division events matched in their exact frame. The real sequences (``../shared/data``) are
skipped with a reason when absent. The full tables come from
``benchmarks/tracking_accuracy.py``.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest

from pipeline import measure, track
from pipeline.io.ctc import read_ctc, write_ctc
from pipeline.synthetic import simulate_field

pytest.importorskip("ctc_metrics", reason="py-ctcmetrics (test extra) is not installed")

_ROOT = Path(__file__).resolve().parents[1]
_DATA_CANDIDATES = [Path("/work/shared/data"), _ROOT.parent / "shared" / "data"]
_METRICS = ["TRA", "DET", "LNK", "BC"]

# sparse1: parameters tuned by benchmarks/tracking_accuracy.py (pixels; cells move < 15 px a
# frame, daughters appear up to ~18 px from their mother).
SPARSE1_PARAMETERS = {"max_distance": 15.0, "splitting_max_distance": 18.5, "max_gap": 2}


def _tracking_data(name: str) -> Path:
    for root in _DATA_CANDIDATES:
        if (root / "tracking" / name / "TRA" / "man_track.txt").is_file():
            return root / "tracking" / name
    pytest.skip(
        f"tracking ground truth {name!r} not found under "
        f"{' or '.join(str(p) for p in _DATA_CANDIDATES)} (shared data absent)"
    )


def _score(labels, tracked: pd.DataFrame, ground_truth: Path, scratch: Path) -> dict:
    from ctc_metrics import evaluate_sequence

    result = write_ctc(labels, tracked, scratch / "RES")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = evaluate_sequence(str(result), str(ground_truth), _METRICS, threads=2)
    assert scores["TRA"] is not None, "py-ctcmetrics rejected the result folder"
    return scores


def _report(name: str, scores: dict, seconds: float | None = None) -> None:
    divisions = f"{scores['tp_div(0)']}/{scores['fp_div(0)']}/{scores['fn_div(0)']}"
    timing = "" if seconds is None else f" (scoring {seconds:.1f} s)"
    print(
        f"\n{name}: TRA {scores['TRA']:.5f} DET {scores['DET']:.5f} LNK {scores['LNK']:.5f} "
        f"BC(0) {scores['BC(0)']:.4f} div tp/fp/fn {divisions}{timing}"
    )


def _write_simulated_truth(field, objects: pd.DataFrame, gt: Path) -> None:
    """The simulator's labels and lineage as a CTC ground-truth ``TRA`` folder."""
    parents = field.lineage.set_index("label")["parent"]
    truth = objects.assign(
        track_id=objects["label"], parent_track_id=objects["label"].map(parents).fillna(0)
    )
    folder = write_ctc(field.labels, truth, gt / "TRA")
    for mask in folder.glob("mask*.tif"):
        mask.rename(folder / mask.name.replace("mask", "man_track"))
    (folder / "res_track.txt").rename(folder / "man_track.txt")


@pytest.mark.parametrize("seed", [0, 1])
def test_simulated_field_tra(seed, tmp_path):
    field = simulate_field(n_frames=10, size=192, seed=seed)
    objects = measure(field.labels, dims="tyx", pixel_size=field.pixel_size)  # micrometres
    # The simulator moves a cell at most 0.25 x its 10 um diameter a frame (2.5 um) and places
    # daughters near their mother: 5 um links every move and division with a wide margin while
    # staying under the ~10 um spacing of neighbours. No cell is missed, so gaps are moot.
    tracked = track(objects, max_distance=5.0, max_gap=2, divisions=True)
    _write_simulated_truth(field, objects, tmp_path / "GT")
    scores = _score(field.labels, tracked, tmp_path / "GT", tmp_path)
    _report(f"simulated seed {seed}", scores)
    assert scores["TRA"] >= 0.99
    assert scores["DET"] == pytest.approx(1.0)


@pytest.mark.slow
def test_sparse1_tra_and_divisions(tmp_path):
    directory = _tracking_data("sparse1")
    labels, objects = read_ctc(directory / "TRA")
    tracked = track(objects.drop(columns=["track_id", "parent_track_id"]), **SPARSE1_PARAMETERS)
    began = time.perf_counter()
    scores = _score(labels, tracked, directory, tmp_path)
    _report("sparse1", scores, time.perf_counter() - began)
    assert scores["TRA"] >= 0.9994
    assert scores["BC(0)"] >= 0.9


@pytest.mark.slow
def test_epidermis_area1_sanity(tmp_path):
    """Dense, dividing epidermis: reported, with only a sanity floor (parameters not tuned)."""
    directory = _tracking_data("epidermis_area1")
    labels, objects = read_ctc(directory / "TRA")
    tracked = track(objects.drop(columns=["track_id", "parent_track_id"]), **SPARSE1_PARAMETERS)
    scores = _score(labels, tracked, directory, tmp_path)
    _report("epidermis_area1", scores)
    assert scores["TRA"] > 0.9
