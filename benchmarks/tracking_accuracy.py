"""Tracking accuracy of ``pipeline.track`` against Cell Tracking Challenge style ground truth.

Usage:
    python benchmarks/tracking_accuracy.py [--data ../shared/data/tracking]
        [--sequences sparse1,epidermis_area1] [--sim-seeds 2] [--sim-frames 20]
        [--max-distance 15] [--max-gap 2] [--splitting-max-distance D] [--alternative-cost C]
        [--no-divisions] [--threads 2] [--laptrack] [--repeats 3]

Issue 4 figures: ``--splitting-max-distance 18.5 --laptrack`` (tuned on sparse1).

Sections
    real        Each ground-truth sequence (a folder holding ``TRA``): the objects of the
                ground-truth masks (centroids in pixels, read with ``read_ctc``) lose their
                track columns, are tracked with ``pipeline.track.track`` in pixel coordinates,
                and the result is written with ``write_ctc`` over the ground-truth masks, so
                only the linking is scored.
    simulated   Simulated fields (``simulate_field``, seeds 0..sim-seeds-1): objects measured
                from the true masks in micrometres, tracked with ``--sim-max-distance``; the
                ground truth is the simulator's lineage.

    laptrack    With ``--laptrack``: the same objects of each real sequence are also tracked by
                laptrack (``LapTrack.predict_dataframe``, laptrack 0.17) with equivalent
                parameters: squared-distance metrics and cutoffs the squares of ours
                (``cutoff = max_distance**2``, ``gap_closing_cutoff =
                gap_closing_max_distance**2``, ``splitting_cutoff =
                splitting_max_distance**2``, ``gap_closing_max_frame_count = max_gap``) and
                its default alternative costs. Each laptrack ``track_id`` is a CTC segment;
                its ``split_df`` gives the parents. Both trackers are timed as the best of
                ``--repeats`` calls of the tracking function only, and a side-by-side table
                is printed.

A track closed across a gap (the cell missing for some frames) is written as in the CTC
ground truth: the part after the gap becomes a new track whose parent is the part before it
(:func:`pipeline.io.ctc.split_at_gaps`, applied by ``write_ctc``); the CTC format has no
other way to express a gap.

Scores come from py-ctcmetrics (``pip install py-ctcmetrics==1.3.3``): TRA, DET, LNK and
BC(0), the F1 score of division events matched in their exact frame (tp, fp, fn shown).
Tracking time covers ``track`` (or laptrack's ``predict_dataframe``) only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.io.ctc import read_ctc, write_ctc
from pipeline.tracking import track

_METRICS = ["TRA", "DET", "LNK", "BC"]


def _score(result: Path, ground_truth: Path, threads: int) -> dict[str, float]:
    from ctc_metrics import evaluate_sequence

    with contextlib.redirect_stdout(io.StringIO()):
        return evaluate_sequence(str(result), str(ground_truth), _METRICS, threads=threads)


def _write_ground_truth(labels: np.ndarray, lineage: pd.DataFrame, objects: pd.DataFrame, gt: Path):
    """Write the simulator's truth as a CTC ``TRA`` folder (``man_track*.tif``)."""
    parents = lineage.set_index("label")["parent"]
    truth = objects.assign(
        track_id=objects["label"], parent_track_id=objects["label"].map(parents).fillna(0)
    )
    folder = write_ctc(labels, truth, gt / "TRA")
    for mask in folder.glob("mask*.tif"):
        mask.rename(folder / mask.name.replace("mask", "man_track"))
    (folder / "res_track.txt").rename(folder / "man_track.txt")


def _row(name: str, n_tracks: int, seconds: float, scores: dict[str, float]) -> dict:
    return {
        "sequence": name,
        "gt_tracks": n_tracks,
        "TRA": scores["TRA"],
        "DET": scores["DET"],
        "LNK": scores["LNK"],
        "BC(0)": scores["BC(0)"],
        "div tp/fp/fn": f"{scores['tp_div(0)']}/{scores['fp_div(0)']}/{scores['fn_div(0)']}",
        "track s": round(seconds, 3),
    }


def _best_of(repeats: int, function):
    """(result of the last call, shortest wall time in seconds) of ``repeats`` calls."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        began = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - began)
    return result, best


def track_ours(objects: pd.DataFrame, options: argparse.Namespace) -> pd.DataFrame:
    return track(
        objects,
        max_distance=options.max_distance,
        max_gap=options.max_gap,
        gap_closing_max_distance=options.gap_closing_max_distance,
        divisions=not options.no_divisions,
        splitting_max_distance=options.splitting_max_distance,
        alternative_cost=options.alternative_cost,
    )


def laptrack_tracker(options: argparse.Namespace):
    """A ``LapTrack`` with the parameters equivalent to ours (squared distances)."""
    from laptrack import LapTrack

    gap_distance = options.gap_closing_max_distance or options.max_distance
    splitting_distance = options.splitting_max_distance or options.max_distance
    return LapTrack(
        metric="sqeuclidean",
        cutoff=options.max_distance**2,
        gap_closing_metric="sqeuclidean",
        gap_closing_cutoff=gap_distance**2 if options.max_gap > 0 else False,
        gap_closing_max_frame_count=max(options.max_gap, 1),
        splitting_metric="sqeuclidean",
        splitting_cutoff=False if options.no_divisions else splitting_distance**2,
    )


def track_laptrack(objects: pd.DataFrame, tracker) -> pd.DataFrame:
    """Track with laptrack; return ``objects`` plus CTC ``track_id``/``parent_track_id``.

    Each laptrack ``track_id`` (0-based, one per segment between divisions) becomes CTC
    track ``track_id + 1``; ``split_df`` maps each daughter segment to its mother.
    """
    frames = objects.rename(columns={"t": "frame"})
    track_df, split_df, _ = tracker.predict_dataframe(
        frames, ["y", "x"], frame_col="frame", only_coordinate_cols=False
    )
    parents = split_df.set_index("child_track_id")["parent_track_id"] + 1
    track_ids = track_df["track_id"].to_numpy() + 1
    parent_ids = track_df["track_id"].map(parents).fillna(0).astype(np.int64).to_numpy()
    # predict_dataframe keeps the rows in the order of its input
    return objects.assign(track_id=track_ids, parent_track_id=parent_ids)


def _scored(labels, tracked: pd.DataFrame, directory: Path, threads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        result = write_ctc(labels, tracked, Path(scratch) / "RES")
        return _score(result, directory, threads)


def real_sequence(directory: Path, options: argparse.Namespace) -> list[dict]:
    """Rows for our tracker and, with ``--laptrack``, for laptrack on the same objects."""
    labels, objects = read_ctc(directory / "TRA")
    truth_tracks = objects["track_id"].nunique()
    objects = objects.drop(columns=["track_id", "parent_track_id"])
    tracked, seconds = _best_of(options.repeats, lambda: track_ours(objects, options))
    rows = [
        _row(
            directory.name,
            truth_tracks,
            seconds,
            _scored(labels, tracked, directory, options.threads),
        )
        | {"tracker": "pipeline"}
    ]
    if options.laptrack:
        tracker = laptrack_tracker(options)
        tracked, seconds = _best_of(options.repeats, lambda: track_laptrack(objects, tracker))
        scores = _scored(labels, tracked, directory, options.threads)
        rows.append(_row(directory.name, truth_tracks, seconds, scores) | {"tracker": "laptrack"})
    return rows


def simulated_field(seed: int, options: argparse.Namespace) -> dict:
    from pipeline import measure
    from pipeline.synthetic import simulate_field

    field = simulate_field(n_frames=options.sim_frames, size=256, seed=seed)
    objects = measure(field.labels, dims="tyx", pixel_size=field.pixel_size)
    began = time.perf_counter()
    tracked = track(
        objects,
        max_distance=options.sim_max_distance,
        max_gap=options.max_gap,
        divisions=not options.no_divisions,
    )
    seconds = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as scratch:
        gt = Path(scratch) / "GT"
        _write_ground_truth(field.labels, field.lineage, objects, gt)
        result = write_ctc(field.labels, tracked, Path(scratch) / "RES")
        scores = _score(result, gt, options.threads)
    return _row(f"simulated seed {seed}", len(field.lineage), seconds, scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/tracking"))
    parser.add_argument("--sequences", default="sparse1,epidermis_area1")
    parser.add_argument("--sim-seeds", type=int, default=2)
    parser.add_argument("--sim-frames", type=int, default=20)
    parser.add_argument("--sim-max-distance", type=float, default=5.0)
    parser.add_argument("--max-distance", type=float, default=15.0)
    parser.add_argument("--max-gap", type=int, default=2)
    parser.add_argument("--gap-closing-max-distance", type=float, default=None)
    parser.add_argument("--splitting-max-distance", type=float, default=None)
    parser.add_argument("--alternative-cost", type=float, default=None)
    parser.add_argument("--no-divisions", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--laptrack", action="store_true", help="also run laptrack")
    parser.add_argument("--repeats", type=int, default=3, help="timing: best of this many")
    options = parser.parse_args()
    rows = []
    for name in filter(None, options.sequences.split(",")):
        rows += real_sequence(options.data / name, options)
    rows += [
        simulated_field(seed, options) | {"tracker": "pipeline"}
        for seed in range(options.sim_seeds)
    ]
    table = pd.DataFrame(rows)
    table = table[["tracker", *[c for c in table.columns if c != "tracker"]]]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.5f}"))
        if options.laptrack:
            print("\nSide by side (same objects, same distances; time = best of tracking calls)")
            side = table[table["tracker"] == "laptrack"].merge(
                table[table["tracker"] == "pipeline"], on="sequence", suffixes=(" laptrack", "")
            )
            side["speed-up"] = side["track s laptrack"] / side["track s"]
            columns = [
                f"{metric}{suffix}"
                for metric in ["TRA", "LNK", "BC(0)", "track s"]
                for suffix in ("", " laptrack")
            ]
            print(
                side[["sequence", *columns, "speed-up"]].to_string(
                    index=False, float_format=lambda v: f"{v:.5f}"
                )
            )


if __name__ == "__main__":
    main()
