"""The paper's comparison on simulated co-cultures: CNN vs cell size vs cell contour, by AUC.

Usage:
    python benchmarks/coculture_classification.py [--dir DIR] [--rows 2] [--columns 3]
        [--frames 4] [--size 384] [--cell-types 2] [--seed 0] [--folds 6] [--params JSON]

The whole product path, as a user runs it: a simulated plate of a co-culture (two or three
cell types whose sizes overlap, differing in the look of their nuclei; a marker channel for
type 1) -> ``pipeline.run`` (the shipped conv-net's nuclei, tracked and measured) -> crops of
20 um at 64 px of the nuclear and cytoplasm channels (``pipeline crops``) -> labels from the
marker by the two-component mixture and the 0.8 posterior rule -> cross-validation with the
well as the unit (``pipeline classify train``): the CNN on the image crops, the contour CNN on
the masks and the size SVM. AUC is reported against the marker labels (what the user trains
and scores on) and against the simulated truth (cells matched to the true nuclei at their
centroid), with the seconds each step took.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

import pipeline
from pipeline.classification.classifier import CellClassifier
from pipeline.classification.evaluation import auc
from pipeline.classification.store import CropSettings, write_crops
from pipeline.classification.workflow import train_classifier, training_set
from pipeline.synthetic import GROUND_TRUTH_LABELS, GROUND_TRUTH_TYPES, simulate_plate


def true_types(plate: Path, results: Path, index: pd.DataFrame) -> np.ndarray:
    """The simulated type of each crop's cell (-1 where its centroid is on no true nucleus)."""
    types = np.full(len(index), -1)
    cells = pd.concat(
        pd.read_parquet(results / field / "tables" / "cells" / "table.parquet").assign(field=field)
        for field in index["field"].unique()
    )
    rows = index.merge(cells, on=["field", "t", "label"], how="left")
    for field, chosen in rows.groupby("field"):
        truth = zarr.open_group(plate / field / "labels" / GROUND_TRUTH_LABELS, mode="r")["0"][:]
        table = pd.read_parquet(plate / field / "tables" / GROUND_TRUTH_TYPES / "table.parquet")
        kind = dict(zip(table["label"], table["cell_type"], strict=True))
        found = truth[
            chosen["t"].to_numpy(),
            chosen["centroid_y_px"].round().astype(int).to_numpy(),
            chosen["centroid_x_px"].round().astype(int).to_numpy(),
        ]
        types[chosen.index] = [kind.get(int(label), -1) if label else -1 for label in found]
    return types


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--columns", type=int, default=3)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--cell-types", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=6)
    parser.add_argument("--params", type=json.loads, default={})
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="coculture-"))
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in args.params.items()}
    seconds = {}

    started = time.perf_counter()
    plate = simulate_plate(
        folder / "coculture.zarr",
        rows=args.rows,
        columns=args.columns,
        fields=1,
        n_frames=args.frames,
        size=args.size,
        seed=args.seed,
        overwrite=True,
        cell_types=args.cell_types,
    )
    results = folder / "results.zarr"
    pipeline.run(plate, results, force=True)
    seconds["simulate + run"] = time.perf_counter() - started
    started = time.perf_counter()
    write_crops(results, CropSettings(size_um=20.0, size_px=64))
    seconds["crops"] = time.perf_counter() - started
    data = training_set(results, marker="marker")
    started = time.perf_counter()
    result = train_classifier(
        data, folder / "types.pt", folds=args.folds, estimator=CellClassifier(**params)
    )
    seconds["cross-validation + final model"] = time.perf_counter() - started

    truth = true_types(plate, results, data.index)
    matched = truth >= 0
    positive = result.classes[-1]
    print(
        f"{len(data.labels)} labelled crops ({data.left_out} cells left out by the 0.8 rule), "
        f"{len(np.unique(data.index['well']))} wells; marker labels agree with the truth for "
        f"{np.mean((data.labels[matched] == positive) == (truth[matched] == 1)):.1%} of the "
        f"{matched.sum()} crops matched to a true nucleus"
    )
    print(
        "\n| method | AUC vs marker labels (pooled) | per-well folds, mean +- sd | AUC vs truth |"
    )
    print("|---|---|---|---|")
    pooled = result.pooled().set_index("method")
    for method, probability in result.probabilities.items():
        versus_truth = auc(
            np.array([0, 1]), (truth[matched] == 1).astype(int), probability[matched]
        )
        row = pooled.loc[method]
        print(
            f"| {method} | {row['auc']:.3f} | {row['fold_auc_mean']:.3f} +- "
            f"{row['fold_auc_sd']:.3f} | {versus_truth:.3f} |"
        )
    print("\n" + ", ".join(f"{step} {s:.0f} s" for step, s in seconds.items()))
    print(f"outputs in {folder}")


if __name__ == "__main__":
    main()
