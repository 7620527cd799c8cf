"""Tracking accuracy of ``pipeline.track`` against Cell Tracking Challenge style ground truth.

Usage:
    python benchmarks/tracking_accuracy.py [--data ../shared/data/tracking] [--sequences sparse1]
        [--sim-seeds 2] [--sim-frames 20] [--max-distance 15] [--max-gap 2]
        [--splitting-max-distance D] [--alternative-cost C] [--no-divisions] [--threads 2]

Sections
    real        Each ground-truth sequence (a folder holding ``TRA``): the objects of the
                ground-truth masks (centroids in pixels, read with ``read_ctc``) lose their
                track columns, are tracked with ``pipeline.track.track`` in pixel coordinates,
                and the result is written with ``write_ctc`` over the ground-truth masks, so
                only the linking is scored.
    simulated   Simulated fields (``simulate_field``, seeds 0..sim-seeds-1): objects measured
                from the true masks in micrometres, tracked with ``--sim-max-distance``; the
                ground truth is the simulator's lineage.

Scores come from py-ctcmetrics (``pip install py-ctcmetrics==1.3.3``): TRA, DET, LNK and
BC(0), the F1 score of division events matched in their exact frame (tp, fp, fn shown).
Tracking time covers ``track`` only.
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
from pipeline.track import track

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


def real_sequence(directory: Path, options: argparse.Namespace) -> dict:
    labels, objects = read_ctc(directory / "TRA")
    truth_tracks = objects["track_id"].nunique()
    began = time.perf_counter()
    tracked = track(
        objects.drop(columns=["track_id", "parent_track_id"]),
        max_distance=options.max_distance,
        max_gap=options.max_gap,
        gap_closing_max_distance=options.gap_closing_max_distance,
        divisions=not options.no_divisions,
        splitting_max_distance=options.splitting_max_distance,
        alternative_cost=options.alternative_cost,
    )
    seconds = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as scratch:
        result = write_ctc(labels, tracked, Path(scratch) / "RES")
        scores = _score(result, directory, options.threads)
    return _row(directory.name, truth_tracks, seconds, scores)


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
    parser.add_argument("--sequences", default="sparse1")
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
    options = parser.parse_args()
    rows = [
        real_sequence(options.data / name, options) for name in options.sequences.split(",") if name
    ]
    rows += [simulated_field(seed, options) for seed in range(options.sim_seeds)]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
