"""The ``pipeline`` command: parse, call the API, report.

Exit codes: 0 everything done; 2 a user error (bad input, config or arguments: one line, no
traceback); 3 partial (some fields or plates failed, the others are done and recorded).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import InputWarning, PipelineInputError

__all__ = ["main"]

EXIT_USER_ERROR = 2
EXIT_PARTIAL = 3
EXIT_BROKEN_PIPE = 141  # as a shell reports a command ended by SIGPIPE


def _cluster_options(args: argparse.Namespace):
    from pipeline.orchestration.runner import ClusterOptions

    return ClusterOptions(
        cluster=args.cluster,
        scheduler=args.scheduler,
        workers=args.workers,
        cluster_config=args.cluster_config,
        max_jobs=args.max_jobs,
        scheduler_host=args.scheduler_host,
    )


def _run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pipeline.orchestration.runner import run

    summary = run(
        args.input,
        args.out,
        config=args.config,
        force=args.force,
        only_failed=args.only_failed,
        verify=args.verify,
        show_progress=True,
        **asdict(_cluster_options(args)),
    )
    return EXIT_PARTIAL if summary.failed else 0


def _crops(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pipeline.classification.store import CropSettings
    from pipeline.orchestration.cluster import connect
    from pipeline.orchestration.runner import cut_output_crops

    settings = CropSettings(
        size_um=args.size_um,
        size_px=args.size_px,
        channels=tuple(args.channels.split(",")) if args.channels else None,
        label_name=args.labels,
        block=args.block,
    )
    with connect(**asdict(_cluster_options(args))) as cluster:
        print(f"dashboard: {cluster.dashboard_link}")
        folder = cut_output_crops(args.results, settings, cluster.client)
    print(f"crops of {settings.size_um:g} um ({settings.size_px} px) written to {folder}")
    return 0


def _classify_train(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from pipeline.classification.classifier import CellClassifier
    from pipeline.classification.workflow import train_classifier, training_set

    try:
        params = json.loads(args.params)
        estimator = CellClassifier(**params)
    except (ValueError, TypeError) as error:
        raise PipelineInputError(f"--params: {error}", args.params) from None
    data = training_set(
        args.results,
        marker=args.marker,
        labels=args.labels,
        channels=args.channels.split(",") if args.channels else None,
        max_crops=args.max_crops,
    )
    counts = ", ".join(
        f"{name} {n}" for name, n in zip(*np.unique(data.labels, return_counts=True), strict=True)
    )
    print(f"{len(data.labels)} crops ({counts}); {data.left_out} cells without a class left out")
    result = train_classifier(
        data, args.out, groups=args.groups, folds=args.folds, estimator=estimator, progress=True
    )
    print(result.pooled().to_string(index=False, float_format="{:.3f}".format))
    print(
        f"model written to {args.out} (cross-validation: {args.out}.cv.csv, .summary.csv, .roc.png)"
    )
    return 0


def _reprocess(args: argparse.Namespace) -> int:
    from pipeline.orchestration.runner import reprocess

    items = reprocess(
        args.inputs,
        args.out_dir,
        config=args.config,
        cluster=_cluster_options(args),
        force=args.force,
        show_progress=True,
    )
    return EXIT_PARTIAL if any(item.failed for item in items) else 0


def _status(args: argparse.Namespace) -> int:
    from pipeline.orchestration.records import unit_states

    ledger, states = unit_states(args.output, verify=args.verify)
    counts = {state: 0 for state in ("done", "damaged", "failed", "pending")}
    if not args.verify:
        del counts["damaged"]
    for unit in states:
        counts[unit.state] += 1
    last = ledger["status"]
    if last == "running":
        last = "running, or killed (run it again to resume)"
    elif last == "interrupted":
        last = "interrupted (run it again to resume)"
    print(f"{args.output}: input {ledger['input']}, last run {last}")
    print(", ".join(f"{n} {state}" for state, n in counts.items()))
    for unit in states:
        line = f"  {unit.path or '(image)'}\t{unit.state}\t{unit.time or '-'}"
        print(f"{line}\t{unit.error}" if unit.error else line)
        if args.traceback and unit.traceback:
            print(textwrap.indent(unit.traceback.rstrip(), "    "))
    return 0 if counts["done"] == len(states) else EXIT_PARTIAL


def _report(args: argparse.Namespace) -> int:
    from pipeline.orchestration.runner import report_folder
    from pipeline.qc.report import write_qc_report

    index = write_qc_report(args.output, args.dir or report_folder(args.output))
    print(f"QC report: {index}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from pipeline.synthetic import simulate_plate

    path = simulate_plate(
        args.out,
        rows=args.rows,
        columns=args.columns,
        fields=args.fields,
        n_frames=args.frames,
        size=args.size,
        z_slices=args.z,
        seed=args.seed,
        overwrite=args.overwrite,
        cell_types=args.cell_types,
    )
    print(f"simulated plate with ground truth written to {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pipeline.orchestration.runner import run
    from pipeline.synthetic import simulate_plate

    folder = Path(args.dir or tempfile.mkdtemp(prefix="pipeline-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    plate = folder / "demo-plate.zarr"
    if not plate.exists():  # deterministic: a second demo in the same folder resumes, a no-op
        simulate_plate(plate, rows=1, columns=2, fields=2, n_frames=8, size=256, seed=0)
    print(f"demo plate: {plate}")
    out = folder / "demo-results.zarr"
    summary = run(plate, out, workers=args.workers, show_progress=True)
    print(
        "\nOpen the results:\n"
        f"  image, labels and tracks of a field in napari (pip install napari[all]): "
        f"napari {out}/A/1/0\n"
        "  per-cell table of a field: pandas.read_parquet("
        f"'{out}/A/1/0/tables/cells/table.parquet')\n"
        f"  plate-wide table: pandas.read_parquet('{out}/tables/cells')\n"
        f"  in Python: pipeline.read_cells('{out}'), pipeline.open_plate('{out}')"
    )
    return EXIT_PARTIAL if summary.failed else 0


def _import(args: argparse.Namespace) -> int:
    from pipeline.io.importing import import_images

    steps = (("x", args.pixel_size), ("y", args.pixel_size), ("z", args.z_step))
    pixel_size = {key: value for key, value in (*steps, ("t", args.time_step)) if value is not None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = import_images(
            args.tiffs,
            args.out,
            axes=args.axes,
            pixel_size=pixel_size or None,
            stack_axis=args.stack_axis,
            channel_names=args.channels.split(",") if args.channels else None,
            plate=args.plate,
            overwrite=args.overwrite,
        )
    for warning in caught:  # the guesses made on the input; not the readers' own warnings
        if issubclass(warning.category, InputWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
    print(f"OME-Zarr 0.5 written to {path}")
    return 0


def _export_anndata(args: argparse.Namespace) -> int:
    from pipeline.io.anndata import export_anndata

    print(f"AnnData written to {export_anndata(args.results, args.out)}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.qc.evaluate import evaluate

    options = {} if args.thresholds is None else {"thresholds": args.thresholds}
    report = evaluate(
        args.prediction,
        args.ground_truth,
        min_size=args.min_size,
        axes=args.axes,
        truth_axes=args.truth_axes,
        **options,
    )
    print(report.format())
    if args.json:
        path = report.to_json(args.json)
        print(f"report written to {path}")
    return 0


def _export_ctc(args: argparse.Namespace) -> int:
    from pipeline.io.ctc import export_ctc, read_track_file

    folder = export_ctc(args.output, args.field, args.dir, overwrite=args.overwrite)
    lines = read_track_file(folder / "res_track.txt")
    n_frames = len(list(folder.glob("mask*.tif")))
    print(f"CTC result written to {folder}: {len(lines)} tracks over {n_frames} frames")
    return 0


def _iou_thresholds(text: str) -> tuple[float, ...]:
    """Parse "0.5,0.75" into IoU thresholds in (0, 1]."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from None
    if not all(0 < value <= 1 for value in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"thresholds must be distinct, in (0, 1]: {text}")
    return values


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


_TRAINING_FLAGS = {
    "diameter": "diameter_px",
    "crop": "crop",
    "batch_size": "batch_size",
    "steps_per_epoch": "steps_per_epoch",
    "epochs": "max_epochs",
    "patience": "patience",
    "lr": "learning_rate",
    "distance_weight": "distance_weight",
    "polarity": "polarity",
    "base_channels": "base_channels",
    "depth": "depth",
    "seed": "seed",
    "device": "device",
    "threads": "threads",
    "loader_workers": "loader_workers",
    "time_budget": "time_budget_s",
    "average_epochs": "average_epochs",
}


def _train(args: argparse.Namespace) -> int:
    import shlex
    from dataclasses import replace

    from pipeline.convnet.training import TrainingConfig, read_training_recipe, train

    recipe = read_training_recipe(args.config) if args.config else {}
    config = recipe.pop("config", TrainingConfig())
    given = vars(args)
    config = replace(
        config, **{field: given[flag] for flag, field in _TRAINING_FLAGS.items() if flag in given}
    )
    if "keep_unannotated" in given:
        config = replace(config, ignore_unannotated=False)
    zarr = [(path, args.label, args.channel) for path in args.zarr]
    if zarr and not args.label:
        raise PipelineInputError("--zarr needs --label (the label image's name)", args.zarr[0])
    exclude = [name for item in args.exclude for name in item.split(",") if name.strip()]
    command = shlex.join(["pipeline", *args.argv])
    _, info = train(
        out=args.out,
        data=[*recipe.get("data", []), *args.data],
        zarr=zarr,
        simulated=args.simulated if args.simulated is not None else recipe.get("simulated", 0),
        exclude=[*recipe.get("exclude", []), *exclude],
        config=config,
        init=args.init if args.init is not None else recipe.get("init"),
        command=command,
    )
    print(
        f"model written to {args.out}.pt/.json: best validation loss "
        f"{info.training['best_val_loss']:.4f} (epoch {info.training['best_epoch']}), "
        f"receptive field {info.receptive_field_radius_px} px, stride {info.stride}"
    )
    return 0


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cluster",
        default="local",
        choices=["local", "slurm", "slurm-gpu"],
        help="where workers run: this machine, or SLURM jobs via dask-jobqueue (default: local)",
    )
    parser.add_argument(
        "--cluster-config", help="dask-jobqueue YAML for SLURM (e.g. deploy/slurm/jobqueue.yaml)"
    )
    parser.add_argument("--max-jobs", type=int, help="most SLURM jobs the cluster scales to")
    parser.add_argument("--workers", type=int, help="local worker processes (default: cores, ≤4)")
    parser.add_argument("--scheduler", help="address of an existing Dask scheduler")
    parser.add_argument(
        "--scheduler-host",
        default="127.0.0.1",
        help="interface of the local scheduler (default: localhost; others need TLS)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Tiled segmentation, measurement and tracking of OME-Zarr plates on Dask.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="process a plate (or image): the fields not yet done, or stale"
    )
    run.add_argument("input", help="input OME-Zarr plate or image (0.4 or 0.5)")
    run.add_argument(
        "--out", required=True, help="output OME-Zarr 0.5 (new, or resumed if it exists)"
    )
    run.add_argument("--config", help="run configuration (YAML)")
    _add_cluster_arguments(run)
    redo = run.add_mutually_exclusive_group()
    redo.add_argument("--force", action="store_true", help="recompute every field")
    redo.add_argument(
        "--only-failed", action="store_true", help="retry only the fields that failed last time"
    )
    run.add_argument(
        "--verify",
        action="store_true",
        help="also recompute done fields whose label or table files changed since their run",
    )
    run.set_defaults(handler=_run)

    crops = commands.add_parser(
        "crops", help="cut a fixed-size crop around every cell of a run's output (for classifiers)"
    )
    crops.add_argument("results", help="output of pipeline run")
    crops.add_argument("--size-um", type=float, required=True, help="crop edge in micrometres")
    crops.add_argument("--size-px", type=int, default=64, help="crop edge in pixels (default 64)")
    crops.add_argument("--channels", help="comma-separated channel names (default: all)")
    crops.add_argument("--labels", default="cells", help="label image of the cells (default cells)")
    crops.add_argument("--block", type=int, default=512, help="crops per task and chunk")
    _add_cluster_arguments(crops)
    crops.set_defaults(handler=_crops)

    classify = commands.add_parser("classify", help="train cell classifiers on single-cell crops")
    actions = classify.add_subparsers(dest="action", required=True)
    learn = actions.add_parser(
        "train",
        help="labels from a marker or a table, grouped cross-validation with baselines, a model",
    )
    learn.add_argument("results", help="output of pipeline run with crops (pipeline crops)")
    source = learn.add_mutually_exclusive_group(required=True)
    source.add_argument("--marker", help="marker channel: labels by a two-component mixture")
    source.add_argument("--labels", help="labels table (CSV/Parquet: label, class, well, field, t)")
    learn.add_argument(
        "--channels", help="crop channels to learn from (default: all but the marker)"
    )
    learn.add_argument("--groups", default="well", help="unit of cross-validation (well or field)")
    learn.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    learn.add_argument("--max-crops", type=int, help="at most this many crops (a random draw)")
    learn.add_argument("--params", default="{}", help="CellClassifier parameters as JSON")
    learn.add_argument("--out", required=True, help="model file to write (.pt)")
    learn.set_defaults(handler=_classify_train)

    again = commands.add_parser(
        "reprocess", help="bring many plates' results up to date (new or stale fields only)"
    )
    again.add_argument("inputs", nargs="+", help="plates or quoted glob patterns ('/data/*.zarr')")
    again.add_argument("--out-dir", required=True, help="folder of the outputs (OUT_DIR/NAME)")
    again.add_argument("--config", help="run configuration (YAML)")
    _add_cluster_arguments(again)
    again.add_argument("--force", action="store_true", help="recompute every field")
    again.set_defaults(handler=_reprocess)

    export = commands.add_parser(
        "export-anndata",
        help="the cells of a run's output as an AnnData table (.h5ad or .zarr) for scverse",
    )
    export.add_argument("results", help="output of pipeline run")
    export.add_argument("--out", required=True, help="the AnnData file to write (.h5ad or .zarr)")
    export.set_defaults(handler=_export_anndata)

    status = commands.add_parser(
        "status", help="done / failed / pending fields of an output, with errors"
    )
    status.add_argument("output", help="OME-Zarr written by pipeline run")
    status.add_argument(
        "--verify",
        action="store_true",
        help="check that each done field's label and table files are those its run wrote "
        "(names and sizes); damaged ones are listed, and 'pipeline run --verify' redoes them",
    )
    status.add_argument(
        "--traceback",
        action="store_true",
        help="also the traceback of each field that failed with an unexpected error",
    )
    status.set_defaults(handler=_status)

    report = commands.add_parser("report", help="(re)write the QC report of an output")
    report.add_argument("output", help="OME-Zarr written by pipeline run")
    report.add_argument("--dir", help="report folder (default: OUTPUT.report beside it)")
    report.set_defaults(handler=_report)

    simulate = commands.add_parser("simulate", help="write a simulated plate with ground truth")
    simulate.add_argument("out")
    simulate.add_argument("--rows", type=int, default=1)
    simulate.add_argument("--columns", type=int, default=2)
    simulate.add_argument("--fields", type=int, default=2)
    simulate.add_argument("--frames", type=int, default=8)
    simulate.add_argument("--size", type=int, default=256)
    simulate.add_argument("--z", type=int, default=None, help="z slices (default: 2D)")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument(
        "--cell-types",
        type=int,
        default=1,
        choices=(1, 2, 3),
        help="2 or 3: a co-culture with a marker channel for type 1 (default 1)",
    )
    simulate.add_argument("--overwrite", action="store_true")
    simulate.set_defaults(handler=_simulate)

    demo = commands.add_parser("demo", help="simulate a small plate and run it end to end")
    demo.add_argument("--dir", help="where to put the demo plate and results (default: temp)")
    demo.add_argument("--workers", type=int, default=2)
    demo.set_defaults(handler=_demo)

    tiff = commands.add_parser(
        "import", help="convert TIFF, OME-TIFF, ND2, CZI or LIF files to OME-Zarr 0.5"
    )
    tiff.add_argument(
        "tiffs", nargs="+", help="image files (TIFF, OME-TIFF, ND2, CZI, LIF) or folders"
    )
    tiff.add_argument("--out", required=True)
    tiff.add_argument("--axes", help="axes of each file, e.g. ZYX or TCYX (default: from metadata)")
    tiff.add_argument("--pixel-size", type=float, help="xy pixel size in micrometres")
    tiff.add_argument("--z-step", type=float, help="z step in micrometres")
    tiff.add_argument(
        "--time-step", type=float, help="frame interval in seconds (overrides the file's)"
    )
    tiff.add_argument(
        "--stack-axis",
        choices=["t", "z", "c"],
        help="axis along which several files are stacked (default t, with a warning)",
    )
    tiff.add_argument("--channels", help="comma-separated channel names")
    tiff.add_argument(
        "--plate",
        action="store_true",
        help="one well per file, named like A01_f0.tif or B3.nd2; a file's scenes are its fields "
        "(without --plate, one file of several scenes becomes well A/1)",
    )
    tiff.add_argument("--overwrite", action="store_true")
    tiff.set_defaults(handler=_import)

    score = commands.add_parser(
        "evaluate", help="score predicted labels against ground truth (AP, Jaccard, Dice, ARI)"
    )
    score.add_argument(
        "prediction", help="predicted labels: a TIFF, a folder of TIFFs or an OME-Zarr label image"
    )
    score.add_argument(
        "ground_truth", help="ground-truth labels: a TIFF, a folder of TIFFs or OME-Zarr labels"
    )
    score.add_argument(
        "--min-size",
        type=_non_negative_int,
        default=0,
        help="drop objects with fewer pixels from both sides first (default: 0, keep all)",
    )
    score.add_argument(
        "--axes",
        help="axes of the prediction's TIFF files in file order, e.g. tyx: each timepoint of a "
        "t axis is one image (default: one image per file)",
    )
    score.add_argument("--truth-axes", help="the same for the ground truth's TIFF files")
    score.add_argument("--json", help="also write the report as JSON to this file")
    score.add_argument(
        "--thresholds",
        type=_iou_thresholds,
        help="comma-separated IoU thresholds (default: 0.5,0.55,...,0.95)",
    )
    score.set_defaults(handler=_evaluate)

    ctc = commands.add_parser(
        "export-ctc", help="export one field's tracked cells in Cell Tracking Challenge format"
    )
    ctc.add_argument("output", help="OME-Zarr written by pipeline run")
    ctc.add_argument("field", help='field path, e.g. A/1/0 ("" for a lone image)')
    ctc.add_argument("dir", help="result folder for maskTTT.tif and res_track.txt")
    ctc.add_argument("--overwrite", action="store_true", help="replace an existing result")
    ctc.set_defaults(handler=_export_ctc)

    fit = commands.add_parser(
        "train",
        help="train the nuclear segmentation conv-net (or fine-tune one with --init)",
        argument_default=argparse.SUPPRESS,
    )
    fit.add_argument("--out", required=True, help="model path without suffix (writes .pt, .json)")
    fit.add_argument(
        "--config",
        default=None,
        help="training recipe (YAML: data, exclude_file, simulated, init, training: {...}); "
        "flags given on the command line override it",
    )
    fit.add_argument(
        "--init",
        default=None,
        help="fine-tune: start from this model ('shipped' for the shipped one)",
    )
    fit.add_argument(
        "--data", action="append", default=[], help="folder with images/ and masks/ TIFFs"
    )
    fit.add_argument("--zarr", action="append", default=[], help="OME-Zarr image or plate")
    fit.add_argument("--label", default=None, help="label image name in the OME-Zarr")
    fit.add_argument("--channel", default="0", help="nuclear channel name or index (OME-Zarr)")
    fit.add_argument("--simulated", type=int, default=None, help="simulated fields to add")
    fit.add_argument(
        "--exclude",
        action="append",
        default=[],
        help="held-out images, comma-separated names or path ends (e.g. gowt1/t21.tif)",
    )
    fit.add_argument("--diameter", type=float, help="training nucleus diameter (px, default 30)")
    fit.add_argument("--crop", type=int, help="crop edge (px, default 128)")
    fit.add_argument("--batch-size", type=int, help="crops per step (default 16)")
    fit.add_argument("--steps-per-epoch", type=int, help="default 100")
    fit.add_argument("--epochs", type=int, help="most epochs (default 20)")
    fit.add_argument("--patience", type=int, help="early-stopping patience (epochs, default 5)")
    fit.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    fit.add_argument("--distance-weight", type=float, help="default 8")
    fit.add_argument(
        "--polarity", choices=("auto", "bright", "dark"), help="nuclei bright or dark (auto)"
    )
    fit.add_argument(
        "--keep-unannotated",
        action="store_true",
        help="teach bright unannotated blobs of real masks as background (default: ignore them)",
    )
    fit.add_argument("--base-channels", type=int, help="U-Net width (default 16)")
    fit.add_argument("--depth", type=int, help="U-Net poolings (default 3)")
    fit.add_argument("--seed", type=int)
    fit.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    fit.add_argument("--threads", type=int, help="CPU threads for torch")
    fit.add_argument(
        "--loader-workers",
        type=int,
        help="processes cutting training crops in parallel (default 0: in the training process)",
    )
    fit.add_argument(
        "--time-budget",
        type=float,
        help="seconds the run may take: fewer epochs where the first one shows they do not fit",
    )
    fit.add_argument(
        "--average-epochs",
        type=int,
        help="average the weights of the last N epochs, trained at a constant rate (default 0)",
    )
    fit.set_defaults(handler=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pipeline`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = args.handler(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below
        return code
    except PipelineInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `pipeline status OUT | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
