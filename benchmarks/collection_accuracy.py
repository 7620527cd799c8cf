"""Nuclear segmentation accuracy on a held-out split of an annotated collection, per group.

Usage:
    python benchmarks/collection_accuracy.py [--data ../shared/data/segmentation/dsb2018]
        [--split pipeline/convnet/recipes/dsb2018_validation.txt] [--model PATH]
        [--group gray/256x256] [--skip NAME,...] [--limit N] [--params NAME=VALUE,...]
        [--tta] [--json results.json]

Whole cells in phase contrast (the shipped whole-cell model on its held-out images):
    python benchmarks/collection_accuracy.py --data ../shared/data/segmentation/phase-cells
        --split pipeline/convnet/recipes/phase_cells_validation.txt --model cells_phase_unet

For every image of the split (never trained on; see ``pipeline.convnet.training.grouped_holdout``)
and its expert mask:

- ``convnet``: the default call a new user makes, ``pipeline.segment(image)`` (nucleus
  diameter estimated, polarity detected, the model's recommended post-processing, or
  ``--params``); colour images are segmented on their luminance
  (``pipeline.normalize.colour_to_grey``, what the API does with RGB input);
- ``convnet_given``: the same with the diameter given (the mask's median equivalent diameter);
- ``classical``: ``pipeline.segment(image, "classical")`` with its defaults;
- ``classical_given``: the classical recipe with its micrometre parameters (made for 10 um
  nuclei) applied at a pixel size of 10 um / diameter, i.e. at the known scale.

Scores: AP = TP / (TP + FP + FN) at IoU 0.5 (AP50) and its mean over IoU 0.5:0.05:0.95 (mAP),
per image, then averaged per group (``MODALITY/HEIGHTxWIDTH`` from the collection's index.csv;
without one, the folder is one group), per modality and over all. The diameter estimate is
compared with the mask's median diameter: the median of |log(estimate / truth)| and the
fraction of images within 20 %.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import tifffile

from pipeline import segment
from pipeline.convnet.inference import InferenceSettings, median_diameter
from pipeline.convnet.training import image_groups, read_name_list
from pipeline.normalize import colour_to_grey
from pipeline.qc.metrics import score_segmentation
from pipeline.segmentation.convnet import ConvNetParameters
from pipeline.segmentation.diameter import estimate_diameter
from pipeline.segmentation.parameters import SegmentationConfig, with_model_postprocessing

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "segmentation" / "dsb2018"
DEFAULT_SPLIT = ROOT / "pipeline" / "convnet" / "recipes" / "dsb2018_validation.txt"
CLASSICAL_DIAMETER_UM = 10.0
METHODS = ("convnet", "convnet_given", "classical", "classical_given")


def read_split(path: Path) -> list[str]:
    """Image ids of a split file (``folder/ID.tif`` per line, ``#`` comments)."""
    return [Path(name).stem for name in read_name_list(path)]


def _scores(truth: np.ndarray, found: np.ndarray) -> dict:
    score = score_segmentation(truth, np.asarray(found, dtype=np.int64))
    return {"ap50": float(score.ap[0]), "map": float(score.mean_ap), "n_pred": int(score.n_pred)}


def evaluate_image(
    image: np.ndarray,
    truth: np.ndarray,
    model: str | None,
    params: ConvNetParameters,
    tta: bool = False,
) -> dict:
    """Scores of the four methods on one image (the conv-net post-processed with ``params``),
    and the diameter estimate."""
    if image.ndim == 3:
        image = colour_to_grey(image)
    given = median_diameter(truth)
    chosen = params.model_dump(exclude_defaults=True) | ({"tta": True} if tta else {})
    resolved = with_model_postprocessing(  # as pipeline.segment resolves them
        SegmentationConfig(convnet={"model": model, **chosen})
    ).convnet
    started = time.perf_counter()
    estimated = estimate_diameter(image, InferenceSettings(model=model, tta=tta), resolved)
    default = segment(image, model=model, diameter=estimated, **chosen)
    seconds = time.perf_counter() - started
    step = CLASSICAL_DIAMETER_UM / given
    found = {
        "convnet": default,
        "convnet_given": segment(image, model=model, diameter=given, **chosen),
        "classical": segment(image, "classical"),
        "classical_given": segment(image, "classical", pixel_size={"y": step, "x": step}),
    }
    return {
        "n_true": int(len(np.unique(truth)) - 1),
        "diameter_true": given,
        "diameter_estimated": float(estimated),
        "convnet_seconds": seconds,
        **{method: _scores(truth, labels) for method, labels in found.items()},
    }


def summarise(results: list[dict]) -> dict:
    """Mean AP50 and mAP per method, and the diameter estimate's error, over ``results``."""
    errors = np.array(
        [abs(math.log(r["diameter_estimated"] / r["diameter_true"])) for r in results]
    )
    summary = {
        "images": len(results),
        "nuclei": int(sum(r["n_true"] for r in results)),
        "diameter_median_abs_log_error": float(np.median(errors)),
        "diameter_within_20pct": float(np.mean(errors < math.log(1.2))),
    }
    for method in METHODS:
        summary[method] = {
            key: float(np.mean([r[method][key] for r in results])) for key in ("ap50", "map")
        }
    return summary


def _row(name: str, s: dict) -> str:
    cells = " | ".join(f"{s[m]['ap50']:.3f} / {s[m]['map']:.3f}" for m in METHODS)
    return (
        f"| {name} | {s['images']} | {s['nuclei']} | {cells} | "
        f"{math.exp(s['diameter_median_abs_log_error']) - 1:.0%} | "
        f"{s['diameter_within_20pct']:.0%} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", type=Path, default=DEFAULT_SPLIT)
    parser.add_argument("--model", help="model path (default: the shipped one)")
    parser.add_argument("--group", action="append", default=[], help="only these groups")
    parser.add_argument("--skip", default="", help="comma-separated ids left out")
    parser.add_argument("--limit", type=int, help="at most this many images (a smoke test)")
    parser.add_argument(
        "--params", default="", help="conv-net post-processing, e.g. seed_threshold=0.3"
    )
    parser.add_argument(
        "--tta", action="store_true", help="the conv-net averages the 8 rotations/reflections"
    )
    parser.add_argument("--json", type=Path, help="write per-image results and summaries")
    args = parser.parse_args()
    pairs = [item.split("=") for item in args.params.split(",") if item]
    params = ConvNetParameters(**{name: float(value) for name, value in pairs})

    groups = defaultdict(lambda: args.data.name, image_groups(args.data))  # no index: one group
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    ids = [
        i
        for i in read_split(args.split)
        if i not in skip and (not args.group or groups[i] in args.group)
    ]
    if args.limit:
        ids = ids[: args.limit]
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for n, image_id in enumerate(ids, start=1):
        image = tifffile.imread(args.data / "images" / f"{image_id}.tif")
        truth = tifffile.imread(args.data / "masks" / f"{image_id}.tif")
        results[image_id] = {
            "group": groups[image_id],
            **evaluate_image(image, truth, args.model, params, args.tta),
        }
        r = results[image_id]
        print(
            f"[{n}/{len(ids)}] {image_id} {r['group']}: conv-net AP50 {r['convnet']['ap50']:.3f}"
            f" (d {r['diameter_estimated']:.1f} est. / {r['diameter_true']:.1f} true), "
            f"classical {r['classical']['ap50']:.3f}  [{time.perf_counter() - started:.0f} s]",
            flush=True,
        )

    by_group, by_modality = defaultdict(list), defaultdict(list)
    for r in results.values():
        by_group[r["group"]].append(r)
        by_modality[r["group"].split("/")[0]].append(r)
    names = " | ".join(f"{m} AP50 / mAP" for m in METHODS)
    print(f"\n| group | images | nuclei | {names} | median d error | d within 20 % |")
    print("|" + "---|" * (5 + len(METHODS)))
    summaries = {"groups": {}, "modalities": {}}
    for name in sorted(by_group):
        summaries["groups"][name] = summarise(by_group[name])
        print(_row(name, summaries["groups"][name]))
    for name in sorted(by_modality):
        summaries["modalities"][name] = summarise(by_modality[name])
        print(_row(f"**{name}**", summaries["modalities"][name]))
    summaries["all"] = summarise(list(results.values()))
    print(_row("**all**", summaries["all"]))
    if args.json:
        args.json.write_text(
            json.dumps({"model": args.model, "summaries": summaries, "images": results}, indent=1)
        )


if __name__ == "__main__":
    main()
