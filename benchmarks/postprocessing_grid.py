"""Tune the conv-net's post-processing on training images of an annotated collection.

Usage:
    python benchmarks/postprocessing_grid.py [--data ../shared/data/segmentation/dsb2018]
        [--split pipeline/convnet/recipes/dsb2018_validation.txt] [--model PATH]
        [--modality gray] [--images 60] [--rounds 2] [--tta] [--start NAME=VALUE,...]
        [--only NAME,...] [--json results.json]

Whole cells in phase contrast (a folder without an index.csv is one group):
    python benchmarks/postprocessing_grid.py --data ../shared/data/segmentation/phase-cells
        --split pipeline/convnet/recipes/phase_cells_validation.txt --model cells_phase_unet
        --images 36

The network's maps are computed once per image, at the mask's median diameter (so that the
diameter estimate does not enter), on images of the chosen modality that are *not* in the
validation split (the split stays untouched for reporting). Each parameter of
:class:`pipeline.segmentation.convnet.ConvNetParameters` is then varied in turn over its candidate
values, the others held at their current best (coordinate ascent, ``--rounds`` passes), scoring
mean AP@0.5 (ties broken by mAP) over the images. The printed table is the path of the search;
the last line is the best setting found.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collection_accuracy import DEFAULT_DATA, DEFAULT_SPLIT, read_split

from pipeline.convnet.inference import InferenceSettings, median_diameter, predict_maps
from pipeline.convnet.training import image_groups
from pipeline.normalize import colour_to_grey
from pipeline.qc.metrics import score_segmentation
from pipeline.segmentation.convnet import ConvNetParameters, cells_from_maps

CANDIDATES = {
    "foreground_threshold": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85),
    "seed_threshold": (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
    "seed_radius": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2),
    "smoothing": (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3),
    "min_size": (0.05, 0.1, 0.2, 0.3),
}


def training_images(data: Path, split: Path, modality: str, count: int, seed: int) -> list[str]:
    """``count`` ids of ``modality`` outside the validation split, drawn evenly over groups."""
    held_out = set(read_split(split))
    groups = image_groups(data)
    if not groups:  # a folder without an index is one group, of the modality asked for
        groups = {path.stem: modality for path in sorted((data / "images").glob("*.tif"))}
    by_group: dict[str, list[str]] = {}
    for image_id, group in sorted(groups.items()):
        if group.split("/")[0] == modality and image_id not in held_out:
            by_group.setdefault(group, []).append(image_id)
    rng = np.random.default_rng(seed)
    for ids in by_group.values():
        rng.shuffle(ids)
    chosen: list[str] = []
    while len(chosen) < count and any(by_group.values()):
        for ids in by_group.values():
            if ids and len(chosen) < count:
                chosen.append(ids.pop())
    return chosen


def score(
    cases: list[tuple[np.ndarray, np.ndarray, float]], params: ConvNetParameters
) -> tuple[float, float]:
    """Mean AP@0.5 and mAP of ``params`` over (maps, truth, diameter) cases."""
    ap50, mean_ap = [], []
    for maps, truth, diameter in cases:
        found = cells_from_maps(maps, diameter, params)
        result = score_segmentation(truth, found.astype(np.int64))
        ap50.append(float(result.ap[0]))
        mean_ap.append(float(result.mean_ap))
    return float(np.mean(ap50)), float(np.mean(mean_ap))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", type=Path, default=DEFAULT_SPLIT)
    parser.add_argument("--model", help="model path (default: the shipped one)")
    parser.add_argument("--modality", default="gray")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tta", action="store_true", help="maps averaged over 8 rotations")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--start", default="", help="starting point, e.g. seed_radius=0.5,smoothing=0.15"
    )
    parser.add_argument("--only", default="", help="search only these parameters, e.g. smoothing")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    only = [name for name in args.only.split(",") if name]
    if unknown := set(only) - set(CANDIDATES):
        parser.error(
            f"--only: unknown parameters {sorted(unknown)}; choose from {list(CANDIDATES)}"
        )
    searched = {name: CANDIDATES[name] for name in only} or CANDIDATES

    settings = InferenceSettings(model=args.model, tta=args.tta, cpu_threads=args.threads)
    ids = training_images(args.data, args.split, args.modality, args.images, args.seed)
    cases = []
    started = time.perf_counter()
    for image_id in ids:
        image = tifffile.imread(args.data / "images" / f"{image_id}.tif")
        truth = tifffile.imread(args.data / "masks" / f"{image_id}.tif")
        if image.ndim == 3:
            image = colour_to_grey(image)
        diameter = median_diameter(truth)
        cases.append((predict_maps(image, diameter=diameter, settings=settings), truth, diameter))
    print(f"maps of {len(cases)} images in {time.perf_counter() - started:.0f} s", flush=True)

    start = dict(item.split("=") for item in args.start.split(",") if item)
    best = ConvNetParameters(**{name: float(value) for name, value in start.items()})
    best_score = score(cases, best)
    path = [{"changed": "start", **best.model_dump(), "ap50": best_score[0], "map": best_score[1]}]
    print(f"start {best}: AP50 {best_score[0]:.4f}  mAP {best_score[1]:.4f}", flush=True)
    for round_number in range(1, args.rounds + 1):
        for name, values in searched.items():
            for value in values:
                if getattr(best, name) == value:
                    continue
                candidate = best.model_copy(update={name: value})
                result = score(cases, candidate)
                print(
                    f"round {round_number} {name}={value}: AP50 {result[0]:.4f}  "
                    f"mAP {result[1]:.4f}",
                    flush=True,
                )
                if result > best_score:
                    best, best_score = candidate, result
                    path.append(
                        {"changed": name, **best.model_dump(), "ap50": result[0], "map": result[1]}
                    )
    print(f"best: {best}  AP50 {best_score[0]:.4f}  mAP {best_score[1]:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"images": ids, "tta": args.tta, "path": path}, indent=1))


if __name__ == "__main__":
    main()
