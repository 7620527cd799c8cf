"""Cell classification from single-cell crops: grouped cross-validation on real nuclei.

Usage:
    python benchmarks/classification_accuracy.py [--data ../shared/data/segmentation/dsb2018]
        [--classes 8] [--per-class 125] [--size 64] [--folds 5] [--seed 0] [--json out.json]

A real multi-class task with the conventions of the paper's evaluation: crops of 64 x 64 px
around every annotated nucleus of the 2018 Data Science Bowl collection (the image as recorded,
colour images on their luminance; the expert mask as the cell), the class of a crop is the
collection group its image belongs to (``MODALITY/HEIGHTxWIDTH``: one kind of sample,
microscope and magnification each), the largest groups with at least five images, up to
``--per-class`` crops per class drawn evenly over its images. Cross-validation is grouped by
image (no image is in both the training and the test folds), exactly as a user calls it:

    cross_val_predict(CellClassifier(), crops, labels, groups=images, cv=GroupKFold(5),
                      method="predict_proba")

with default parameters (or ``--params``), beside the paper's two baselines: the cell's size
alone (``size``: an SVM on log area) and its contour alone (``contour``: the same CNN on the
binary mask). Reported: pooled one-vs-rest
macro ROC AUC, accuracy, and the wall time of each cross-validation, side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import tifffile
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict

from pipeline.classification.classifier import CellClassifier
from pipeline.classification.crops import cut_crops
from pipeline.classification.evaluation import size_baseline
from pipeline.convnet.training import image_groups
from pipeline.normalize import colour_to_grey

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "segmentation" / "dsb2018"


def collect(data: Path, n_classes: int, per_class: int, size: int, seed: int) -> dict:
    """Crops (image channel, mask channel), areas, classes and image ids of the chosen groups."""
    rng = np.random.default_rng(seed)
    by_group: dict[str, list[str]] = defaultdict(list)
    for image_id, group in sorted(image_groups(data).items()):
        by_group[group].append(image_id)
    chosen = sorted((g for g in by_group if len(by_group[g]) >= 5), key=lambda g: -len(by_group[g]))
    chosen = sorted(chosen[:n_classes])
    crops, areas, classes, images = [], [], [], []
    for group in chosen:
        ids = list(rng.permutation(by_group[group]))
        quota = per_class
        for n, image_id in enumerate(ids):
            share = -(-quota // (len(ids) - n))  # ceil: spread what is left over what is left
            image = tifffile.imread(data / "images" / f"{image_id}.tif")
            labels = tifffile.imread(data / "masks" / f"{image_id}.tif")
            if image.ndim == 3:
                image = colour_to_grey(image)
            cut, index = cut_crops(image, labels, size)
            pick = rng.permutation(len(index))[:share]
            crops.append(cut[pick])
            areas.append(index["area"].to_numpy()[pick])
            classes += [group] * len(pick)
            images += [image_id] * len(pick)
            quota -= len(pick)
    return {
        "crops": np.concatenate(crops),
        "areas": np.concatenate(areas).astype(np.float64),
        "classes": np.asarray(classes),
        "images": np.asarray(images),
    }


def _scores(classes: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> dict:
    if len(classes) == 2:
        auc = roc_auc_score(labels == classes[1], probabilities[:, 1])
    else:
        auc = roc_auc_score(
            labels, probabilities, multi_class="ovr", average="macro", labels=classes
        )
    accuracy = accuracy_score(labels, classes[np.argmax(probabilities, axis=1)])
    return {"auc": float(auc), "accuracy": float(accuracy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=125)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--params",
        type=json.loads,
        default={},
        help="CellClassifier parameters as JSON, e.g. '{\"kernel_size\": 3}'",
    )
    parser.add_argument(
        "--methods", default="cnn,contour,size", help="rows to run (comma-separated)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in args.params.items()}

    started = time.perf_counter()
    data = collect(args.data, args.classes, args.per_class, args.size, args.seed)
    classes = np.unique(data["classes"])
    print(
        f"{len(data['classes'])} crops of {args.size} px, {len(classes)} classes, "
        f"{len(np.unique(data['images']))} images [{time.perf_counter() - started:.0f} s]",
        flush=True,
    )
    for group in classes:
        chosen = data["classes"] == group
        print(
            f"  {group}: {chosen.sum()} crops from {len(np.unique(data['images'][chosen]))} images"
        )
    cv = GroupKFold(args.folds)
    inputs = {
        "cnn": (CellClassifier(**params), data["crops"][:, :1]),
        "contour": (CellClassifier(**params), data["crops"][:, 1:]),
        "size": (
            size_baseline(),
            np.log(data["areas"])[:, np.newaxis],
        ),
    }
    results = {}
    print("\n| classifier | ROC AUC (macro, one-vs-rest) | accuracy | seconds |")
    print("|---|---|---|---|")
    for name in args.methods.split(","):
        estimator, features = inputs[name]
        started = time.perf_counter()
        probabilities = cross_val_predict(
            estimator,
            features,
            data["classes"],
            groups=data["images"],
            cv=cv,
            method="predict_proba",
        )
        seconds = time.perf_counter() - started
        results[name] = {**_scores(classes, data["classes"], probabilities), "seconds": seconds}
        r = results[name]
        print(f"| {name} | {r['auc']:.3f} | {r['accuracy']:.3f} | {seconds:.0f} |", flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"data": str(args.data)}, "results": results}, indent=1
            )
        )


if __name__ == "__main__":
    main()
