"""Fine-tuning the shipped nuclear model on k images of one group: AP before and after.

Usage:
    python benchmarks/fine_tuning.py --group color-brightfield/256x320 [--k 5 --k 20]
        [--data ../shared/data/segmentation/dsb2018] [--epochs 10] [--steps-per-epoch 30]
        [--lr 5e-4] [--seed 0] [--patience P] [--score-on validation|rest]
        [--work build/fine-tuning] [--json results.json]

For each k, k training images of the group (never its validation images; drawn with the seed)
are linked into a folder and the shipped model is fine-tuned on them with the command a user
runs::

    pipeline train --init shipped --data FOLDER --out MODEL --epochs E --steps-per-epoch S \\
        --lr LR --seed SEED

Then the shipped model and every fine-tuned one are scored, with the default call
(``pipeline.segment(image, model=...)``, diameter estimated) and with the masks' median diameter
given (``benchmarks/collection_accuracy.py``'s protocol): mean AP@0.5 and mAP, on the group's
validation images (``--score-on validation``) or on every image of the group the model was not
fine-tuned on (``--score-on rest``: the validation images and the unused training images, for
groups with few validation images; the shipped model was trained on those training images, so
this favours it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collection_accuracy import DEFAULT_DATA, DEFAULT_SPLIT, evaluate_image, read_split

from pipeline.convnet.training import image_groups
from pipeline.segmentation.convnet import ConvNetParameters


def _score(model: str | None, data: Path, ids: list[str]) -> dict:
    """Mean AP50 and mAP of ``model`` on ``ids``: the default call (diameter estimated) and with
    the masks' median diameter given."""
    results = []
    for image_id in ids:
        image = tifffile.imread(data / "images" / f"{image_id}.tif")
        truth = tifffile.imread(data / "masks" / f"{image_id}.tif")
        results.append(evaluate_image(image, truth, model, ConvNetParameters()))
    return {
        f"{key}{suffix}": float(np.mean([r[method][key] for r in results]))
        for method, suffix in (("convnet", ""), ("convnet_given", "_given"))
        for key in ("ap50", "map")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", required=True)
    parser.add_argument("--k", type=int, action="append", default=[])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", type=Path, default=DEFAULT_SPLIT)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patience", type=int, help="epochs without improvement before stopping")
    parser.add_argument("--work", type=Path, default=Path("build/fine-tuning"))
    parser.add_argument("--score-on", choices=("validation", "rest"), default="validation")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ks = args.k or [5, 20]

    groups = image_groups(args.data)
    held_out = set(read_split(args.split))
    members = sorted(i for i, g in groups.items() if g == args.group)
    validation = [i for i in members if i in held_out]
    training = [i for i in members if i not in held_out]
    if not validation or len(training) < max(ks):
        raise SystemExit(
            f"group {args.group}: {len(validation)} validation and {len(training)} training "
            f"images; need validation images and at least {max(ks)} training images"
        )
    order = np.random.default_rng(args.seed).permutation(len(training))
    results = {"group": args.group, "score_on": args.score_on}
    started = time.perf_counter()
    if args.score_on == "validation":
        results["shipped"] = _score(None, args.data, validation)
        print(f"shipped model on {len(validation)} validation images: {results['shipped']}")
    for k in ks:
        chosen = [training[i] for i in order[:k]]
        scored = validation if args.score_on == "validation" else sorted(set(members) - set(chosen))
        if args.score_on == "rest":
            results[f"shipped_k{k}"] = {**_score(None, args.data, scored), "scored_on": scored}
            print(f"shipped model on the {len(scored)} others: {results[f'shipped_k{k}']}")
        folder = args.work / f"k{k}" / "data"
        for sub in ("images", "masks"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            for image_id in chosen:
                link = folder / sub / f"{image_id}.tif"
                if not link.exists():
                    link.symlink_to((args.data / sub / f"{image_id}.tif").resolve())
        model = args.work / f"k{k}" / "model"
        command = [
            "pipeline", "train", "--init", "shipped", "--data", str(folder),
            "--out", str(model), "--epochs", str(args.epochs),
            "--steps-per-epoch", str(args.steps_per_epoch), "--lr", str(args.lr),
            "--seed", str(args.seed), "--threads", "2",
        ]  # fmt: skip
        if args.patience is not None:
            command += ["--patience", str(args.patience)]
        print(" ".join(command), flush=True)
        tuned = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - tuned
        results[f"k{k}"] = {
            **_score(str(model), args.data, scored),
            "images": chosen,
            "scored_on": scored,
            "train_seconds": round(seconds, 1),
            "command": " ".join(command),
        }
        print(f"fine-tuned on k={k}: {results[f'k{k}']}", flush=True)
    print(f"\n| model ({args.group}) | AP50 / mAP | d given: AP50 / mAP |\n|---|---|---|")
    for key, r in results.items():
        if not isinstance(r, dict):
            continue
        images = len(r.get("scored_on", validation))
        print(
            f"| {key} ({images} images) | {r['ap50']:.3f} / {r['map']:.3f} "
            f"| {r['ap50_given']:.3f} / {r['map_given']:.3f} |"
        )
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
