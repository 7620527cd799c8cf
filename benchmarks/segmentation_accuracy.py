"""Segmentation accuracy: classical recipe and conv-net, on simulated fields and real images.

Usage:
    python benchmarks/segmentation_accuracy.py [--sections classical,heldout,simulated,zstack]
        [--seeds 4] [--frames 8] [--size 256] [--z Z] [--data ../shared/data/segmentation]
        [--model PATH] [--tta] [--sim-fields 4] [--json results.json]

Sections
    classical   The classical segmenter with its default parameters on simulated fields (seeds
                0..seeds-1), through the public ``pipeline.segment`` (2D, or 3D with ``--z``).
    heldout     The held-out real images (never used to train the shipped model): GOWT1 t21,
                t72 and HeLa t52, t79 (Cell Tracking Challenge). Per image, AP@0.5 and mean AP
                0.5:0.95 of the conv-net (``predict_maps`` + ``cells_from_maps``) with the
                diameter given (the ground truth's median) and estimated
                (``estimate_diameter``), and of the classical recipe given the same known
                diameter (its micrometre parameters, made for 10 um nuclei, are applied with a
                pixel size of 10 um / diameter, which is the same as rescaling the image).
    simulated   The same comparison on simulated fields whose seeds (1000, 1001, ...) are not
                among the training seeds recorded in the model.
    zstack      Simulated anisotropic z-stacks (0.5 um pixels, 1.5 um planes, 10 um nuclei):
                the conv-net through ``pipeline.segment`` with the diameter off by -20 % .. +20 %
                and estimated, against the classical recipe; two kinds of stack: "anisotropic"
                (16 planes, axial PSF sigma 1.5 um) and "out-of-focus" (24 planes, nuclei in the
                middle, dim blurred planes above and below them, axial PSF sigma 3 um). Also
                the mean number of planes a true / predicted nucleus spans.

Scoring protocols for the real images
    strict      The masks as given, every object.
    adjusted    The Cell Tracking Challenge masks follow two conventions that ``strict`` counts
                against any segmenter: nearly every nucleus cut by the image border is left out
                (0-2 border objects per mask, against dozens of cut nuclei in the dense HeLa
                frames), and a few labels cover two or three separate nuclei (11 in HeLa t79,
                e.g. daughters sharing their mother's id). ``adjusted`` splits mask labels into
                connected components and removes objects touching the image border from both
                the mask and the prediction before matching. Unannotated nuclei away from the
                border still count as false positives.

AP = TP / (TP + FP + FN) at an IoU threshold, one-to-one matching (:mod:`pipeline.qc.metrics`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tifffile
from skimage.measure import label as label_components
from skimage.segmentation import clear_border

from pipeline import segment
from pipeline.convnet.inference import InferenceSettings, median_diameter, predict_maps
from pipeline.convnet.weights import load_model
from pipeline.qc.metrics import average_precision, score_segmentation
from pipeline.segmentation.classical import ClassicalParameters, segment_region
from pipeline.segmentation.convnet import ConvNetParameters, cells_from_maps
from pipeline.segmentation.diameter import estimate_diameter
from pipeline.segmentation.threshold import frame_threshold
from pipeline.synthetic import simulate_field

HELD_OUT = {"gowt1": ("t21.tif", "t72.tif"), "hela": ("t52.tif", "t79.tif")}
SIMULATED_SEED_START = 1000
CLASSICAL_DIAMETER_UM = 10.0  # nucleus diameter the classical defaults are made for
DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "segmentation"


# --------------------------------------------------------------------------------------------
# Classical recipe on simulated fields (the original benchmark)
# --------------------------------------------------------------------------------------------


def classical_simulated(args: argparse.Namespace) -> dict:
    """Both segmenters with their defaults through ``pipeline.segment`` (conv-net: diameter
    estimated), on simulated fields of seeds 0.. (2D, or 3D with ``--z``)."""
    print("\n## Default segmenters through pipeline.segment, simulated fields\n")
    print("seed  frames  cells  classical AP@0.5  conv-net AP@0.5 (first / last frame)")
    all_ap: dict[str, list[float]] = {"classical": [], "convnet": []}
    for seed in range(args.seeds):
        field = simulate_field(n_frames=args.frames, size=args.size, z_slices=args.z, seed=seed)
        ap = {}
        for method in all_ap:
            labels = segment(
                field.image[:, 0],
                method,
                dims="tzyx" if args.z else "tyx",
                pixel_size=field.pixel_size,
            )
            ap[method] = [
                average_precision(truth, found)
                for truth, found in zip(field.labels, labels, strict=True)
            ]
            all_ap[method].extend(ap[method])
        n_cells = sum(len(np.unique(f)) - 1 for f in field.labels)
        print(
            f"{seed:4d}  {args.frames:6d}  {n_cells:5d}  {np.mean(ap['classical']):16.3f}  "
            f"{np.mean(ap['convnet']):15.3f} ({ap['convnet'][0]:.3f} / {ap['convnet'][-1]:.3f})"
        )
    means = {method: float(np.mean(values)) for method, values in all_ap.items()}
    print(
        f"mean AP@0.5 over {len(all_ap['classical'])} frames: classical {means['classical']:.3f}, "
        f"conv-net {means['convnet']:.3f}"
    )
    return {"frames": len(all_ap["classical"]), "mean_ap50": means}


# --------------------------------------------------------------------------------------------
# Conv-net against classical
# --------------------------------------------------------------------------------------------


def _scores(truth: np.ndarray, found: np.ndarray, adjusted: bool) -> dict:
    found = found.astype(np.int64, copy=False)
    score = score_segmentation(truth, found)
    result = {"ap50": float(score.ap[0]), "map": float(score.mean_ap), "n_pred": score.n_pred}
    if adjusted:
        truth = clear_border(label_components(truth, connectivity=1))
        score = score_segmentation(truth, clear_border(found))
        result["adjusted"] = {
            "ap50": float(score.ap[0]),
            "map": float(score.mean_ap),
            "n_true": score.n_true,
            "n_pred": score.n_pred,
        }
    return result


def classical_known_diameter(image: np.ndarray, diameter: float) -> np.ndarray:
    """The classical recipe with its micrometre parameters scaled to a known diameter."""
    step = CLASSICAL_DIAMETER_UM / diameter
    return segment_region(image, frame_threshold(image), (step, step), ClassicalParameters())


def compare(
    image: np.ndarray,
    truth: np.ndarray,
    settings: InferenceSettings,
    post: ConvNetParameters,
    adjusted: bool = False,
) -> dict:
    """Scores of the conv-net (diameter given and estimated) and of the classical recipe."""
    given = median_diameter(truth)
    started = time.perf_counter()
    maps = predict_maps(image, diameter=given, settings=settings)
    convnet_given = cells_from_maps(maps, given, post)
    seconds = time.perf_counter() - started
    estimated = estimate_diameter(image, settings, post)
    maps = predict_maps(image, diameter=estimated, settings=settings)
    convnet_estimated = cells_from_maps(maps, estimated, post)
    classical = classical_known_diameter(image, given)
    return {
        "n_true": int(len(np.unique(truth)) - 1),
        "diameter_given": given,
        "diameter_estimated": estimated,
        "convnet_given": _scores(truth, convnet_given, adjusted),
        "convnet_estimated": _scores(truth, convnet_estimated, adjusted),
        "classical": _scores(truth, classical, adjusted),
        "convnet_seconds": seconds,
    }


_METHODS = (
    ("convnet_given", "conv-net (d given)"),
    ("convnet_estimated", "conv-net (d est.)"),
    ("classical", "classical (d given)"),
)


def _print_header(first: str) -> None:
    names = " | ".join(f"{label} AP50 / mAP" for _, label in _METHODS)
    print(f"| {first} | cells | d given | d est. | {names} |")
    print("|" + "---|" * (4 + len(_METHODS)))


def _print_row(name: str, result: dict, protocol: str = "strict") -> None:
    def pick(key: str) -> dict:
        return result[key] if protocol == "strict" else result[key]["adjusted"]

    cells = " | ".join(f"{pick(key)['ap50']:.3f} / {pick(key)['map']:.3f}" for key, _ in _METHODS)
    print(
        f"| {name} | {result['n_true']} | {result['diameter_given']:.1f} | "
        f"{result['diameter_estimated']:.1f} | {cells} |"
    )


def _mean_scores(scores: list[dict]) -> dict:
    mean = {name: float(np.mean([s[name] for s in scores])) for name in ("ap50", "map")}
    if all("adjusted" in s for s in scores):
        mean["adjusted"] = _mean_scores([s["adjusted"] for s in scores])
    return mean


def _mean(results: list[dict]) -> dict:
    mean = {key: _mean_scores([r[key] for r in results]) for key, _ in _METHODS}
    mean["n_true"] = int(sum(r["n_true"] for r in results))
    mean["diameter_given"] = float(np.mean([r["diameter_given"] for r in results]))
    mean["diameter_estimated"] = float(np.mean([r["diameter_estimated"] for r in results]))
    return mean


def heldout(
    args: argparse.Namespace,
    settings: InferenceSettings,
    post: ConvNetParameters,
    trained_on: set[str],
) -> dict:
    data = Path(args.data)
    if not data.is_dir():
        print(f"\nheld-out section skipped: no real data at {data}")
        return {}
    results: dict[str, dict] = {}
    for dataset, names in HELD_OUT.items():
        for name in names:
            key = f"{dataset}/{name}"
            if key in trained_on:
                raise SystemExit(f"{key} was used to train this model: not a held-out image")
            image = tifffile.imread(data / dataset / "images" / name)
            truth = tifffile.imread(data / dataset / "masks" / name).astype(np.int64)
            results[key] = compare(image, truth, settings, post, adjusted=True)
    means = {
        dataset: _mean([r for k, r in results.items() if k.startswith(dataset + "/")])
        for dataset in HELD_OUT
    }
    means["all"] = _mean(list(results.values()))
    for protocol in ("adjusted", "strict"):
        print(
            f"\n## Held-out real images, {protocol} scoring: conv-net vs classical "
            "(AP@0.5 / mean AP 0.5:0.95)\n"
        )
        _print_header("image")
        for key, result in results.items():
            _print_row(key, result, protocol)
        for dataset in HELD_OUT:
            _print_row(f"**{dataset} mean**", means[dataset], protocol)
        _print_row("**all held-out**", means["all"], protocol)
    return {"images": results, "means": means}


def simulated(
    args: argparse.Namespace,
    settings: InferenceSettings,
    post: ConvNetParameters,
    seeds_used: set[int],
) -> dict:
    print("\n## Simulated fields not used in training (mean over frames)\n")
    _print_header("field seed")
    results = {}
    for seed in range(SIMULATED_SEED_START, SIMULATED_SEED_START + args.sim_fields):
        if seed in seeds_used:
            raise SystemExit(f"simulated seed {seed} was used in training")
        field = simulate_field(n_frames=args.frames, size=args.size, seed=seed)
        frames = [
            compare(field.image[t, 0], field.labels[t].astype(np.int64), settings, post)
            for t in range(args.frames)
        ]
        results[str(seed)] = _mean(frames)
        _print_row(str(seed), results[str(seed)])
    mean = _mean(list(results.values()))
    _print_row("**mean**", mean)
    return {"fields": results, "mean": mean}


ZSTACKS = {
    "anisotropic": {"z_slices": 16},
    "out-of-focus": {"z_slices": 24, "psf_sigma_z_um": 3.0},
}
DIAMETER_ERRORS = (0.8, 0.9, 1.0, 1.1, 1.2)


def _planes_spanned(labels: np.ndarray) -> float:
    """Mean number of z planes an object of a (z, y, x) label image spans."""
    ids = np.unique(labels[labels > 0])
    if ids.size == 0:
        return 0.0
    return float(np.mean([np.any(labels == i, axis=(1, 2)).sum() for i in ids]))


def zstack(args: argparse.Namespace) -> dict:
    """Conv-net at diameter errors of +-20 % against the classical recipe on simulated stacks."""
    print("\n## Simulated z-stacks: conv-net at a wrong diameter vs classical (AP50 / mAP)\n")
    columns = [f"conv-net d x{k:g}" for k in DIAMETER_ERRORS] + ["conv-net d est.", "classical"]
    print("| stack | " + " | ".join(columns) + " | planes true / conv-net d x1 |")
    print("|" + "---|" * (len(columns) + 2))
    results = {}
    for name, options in ZSTACKS.items():
        scores: dict[str, list] = {column: [] for column in columns}
        planes = []
        for seed in range(args.seeds):
            field = simulate_field(n_frames=2, size=160, seed=seed, **options)
            true_d = 10.0 / field.pixel_size["x"]
            for image, truth in zip(field.image[:, 0], field.labels, strict=True):
                runs = {f"conv-net d x{k:g}": {"diameter": true_d * k} for k in DIAMETER_ERRORS}
                runs["conv-net d est."] = {}
                for column, extra in runs.items():
                    found = segment(image, dims="zyx", pixel_size=field.pixel_size, **extra)
                    scores[column].append(_scores(truth, found, adjusted=False))
                    if extra.get("diameter") == true_d:
                        planes.append((_planes_spanned(truth), _planes_spanned(found)))
                found = segment(image, "classical", dims="zyx", pixel_size=field.pixel_size)
                scores["classical"].append(_scores(truth, found, adjusted=False))
        means = {column: _mean_scores(values) for column, values in scores.items()}
        true_planes, found_planes = np.mean(planes, axis=0)
        cells = " | ".join(f"{m['ap50']:.3f} / {m['map']:.3f}" for m in means.values())
        print(f"| {name} | {cells} | {true_planes:.1f} / {found_planes:.1f} |")
        results[name] = {"scores": means, "planes_true": true_planes, "planes": found_planes}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="classical,heldout,simulated")
    parser.add_argument("--seeds", type=int, default=4, help="classical section: fields")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--z", type=int, default=None, help="z slices (classical section, 3D)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="real segmentation data")
    parser.add_argument("--model", help="model path (default: the shipped model)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation")
    parser.add_argument("--sim-fields", type=int, default=4, help="simulated section: fields")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--post",
        default="",
        help="conv-net post-processing overrides, e.g. seed_radius=0.5,smoothing=0.08",
    )
    parser.add_argument("--json", help="write all results to this JSON file")
    args = parser.parse_args()
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    results: dict = {}
    if "classical" in sections:
        results["classical_simulated"] = classical_simulated(args)
    if "zstack" in sections:
        results["zstack"] = zstack(args)
    if sections & {"heldout", "simulated"}:
        settings = InferenceSettings(model=args.model, cpu_threads=args.threads, tta=args.tta)
        overrides = dict(item.split("=") for item in args.post.split(",") if item.strip())
        post = ConvNetParameters(**{key: float(value) for key, value in overrides.items()})
        _, info = load_model(args.model)
        record = info.training
        trained_on = {item["name"] for item in record.get("images", [])}
        seeds_used = set(record.get("simulated", {}).get("seeds", []))
        results["model"] = {"path": args.model or "shipped", "sha256": info.weights_sha256}
        results["post_processing"] = post.__dict__
        if "heldout" in sections:
            results["heldout"] = heldout(args, settings, post, trained_on)
        if "simulated" in sections:
            results["simulated"] = simulated(args, settings, post, seeds_used)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
