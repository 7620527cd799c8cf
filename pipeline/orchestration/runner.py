"""Running plates: plan what is new or stale, start a cluster only if there is work, report.

:func:`run` processes one plate into one output, resuming where an earlier run stopped;
:func:`reprocess` does the same for many plates (a list or glob patterns) on one cluster,
as a scheduled archive job does. Each run that computes something saves a Dask performance
report and a QC report (PNGs with an HTML index) in ``OUT.report/`` beside the output.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed import performance_report
from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin
from tqdm import tqdm
from upath import UPath

from pipeline.config import RunConfig, load_config
from pipeline.errors import PipelineInputError
from pipeline.io.location import local_copy_of, location
from pipeline.io.omezarr import Plate, open_plate
from pipeline.io.retries import count_store_retries, store_retries
from pipeline.orchestration.cluster import RunCluster, connect
from pipeline.orchestration.lock import output_lock
from pipeline.orchestration.outcomes import RunSummary, skipped_outcome
from pipeline.orchestration.plan import RunPlan, check_output_location, plan_run
from pipeline.segmentation.parameters import with_model_postprocessing

if TYPE_CHECKING:
    from distributed import Client, Worker

    from pipeline.classification.store import CropSettings

__all__ = [
    "ClusterOptions",
    "PlateRun",
    "expand_inputs",
    "report_folder",
    "reprocess",
    "run",
]


class _QuietWorkerLog(logging.Filter):
    """Drops two worker log records that are no news to the run's user: "Compute Failed" (the
    run retries the task or records the failure of its field, with the traceback of an
    unexpected error: ``pipeline status --traceback``), and a heartbeat cut short while the
    worker closes (a race in Distributed, dask/distributed#7891, that prints a traceback at
    the end of a run that went well). A heartbeat failing while the worker runs still shows."""

    def __init__(self, worker: Any) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Compute Failed"):
            return False
        closing = self.worker.status in (Status.closing, Status.closing_gracefully, Status.closed)
        return not (closing and message.startswith("Failed to communicate with scheduler"))


class _QuietWorkers(WorkerPlugin):
    """Installs :class:`_QuietWorkerLog` on each worker of the run's own cluster."""

    def setup(self, worker: Any) -> None:
        logging.getLogger("distributed.worker").addFilter(_QuietWorkerLog(worker))


class _CountStoreRetries(WorkerPlugin):
    """Counts the object-store requests each worker retries (:mod:`pipeline.io.retries`)."""

    name = "pipeline-store-retries"

    def setup(self, worker: Any) -> None:
        count_store_retries()


def _worker_device(setting: str, dask_worker: Worker) -> tuple[str, str | None]:
    """The conv-net's device on this worker, and why a GPU it has went unused (or None)."""
    from pipeline.convnet.inference import device_name, unusable_gpu

    device = device_name(setting)
    if setting == "cpu":  # the user's choice: a GPU left unused is no surprise
        return device, None
    problem = unusable_gpu()
    if problem is None and device == "cpu" and dask_worker.state.total_resources.get("GPU", 0):
        problem = "declared with a GPU resource, but torch sees no CUDA device"
    return device, problem


def _inference_devices(client: Client, setting: str) -> tuple[dict[str, str], list[str]]:
    """The conv-net's device on each worker alive now, and a warning for each whose GPU went
    unused (a GPU node whose torch has no CUDA runs on its CPU, slowly: said, not silent)."""
    answers = client.run(_worker_device, setting, on_error="ignore")
    devices = {address: device for address, (device, _) in sorted(answers.items())}
    warnings = [
        f"worker {address}: {problem}; the conv-net ran on its CPU"
        for address, (_, problem) in sorted(answers.items())
        if problem is not None
    ]
    return devices, warnings


def _store_retries(client: Client) -> dict[str, int]:
    """Store requests retried so far, per process of the cluster and the client's own: the
    workers alive now (an adaptive cluster's retired workers took their counts with them)."""
    return {**client.run(store_retries, on_error="ignore"), "client": store_retries()}


@dataclass(frozen=True)
class ClusterOptions:
    """Where a run computes: see :func:`pipeline.orchestration.cluster.connect` for each option."""

    cluster: str = "local"
    scheduler: str | None = None
    workers: int | None = None
    cluster_config: str | Path | None = None
    max_jobs: int | None = None
    scheduler_host: str = "127.0.0.1"

    @contextmanager
    def connect(self) -> Iterator[RunCluster]:
        """Start (or join) the cluster for as long as the context lasts."""
        with connect(
            self.cluster,
            scheduler=self.scheduler,
            workers=self.workers,
            cluster_config=self.cluster_config,
            max_jobs=self.max_jobs,
            scheduler_host=self.scheduler_host,
        ) as running:
            if self.scheduler is None:
                running.client.register_plugin(_QuietWorkers())
            count_store_retries()
            running.client.register_plugin(_CountStoreRetries())
            yield running


@dataclass
class PlateRun:
    """One plate of a run: its input, output, plan, and (after the run) its summary."""

    input_path: str
    plate: Plate | None
    plan: RunPlan | None
    summary: RunSummary | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        """The plate could not be planned or some of its units failed."""
        return self.error is not None or bool(self.summary and self.summary.failed)


def report_folder(out: str | os.PathLike) -> UPath:
    """Where the reports of the output ``out`` go: ``OUT.report`` beside it."""
    return location(out).with_suffix(".report")


def _summary_of_done(plate: Plate, plan: RunPlan, started: float) -> RunSummary:
    fields = [skipped_outcome(fov, plan.done[fov.path]) for fov in plate.fields]
    return RunSummary(plate.path, str(plan.output), fields, time.perf_counter() - started)


def _print_summary(summary: RunSummary) -> None:
    frames = sum(f.n_frames for f in summary.fields if not f.skipped)
    print(
        f"\nfields: {len(summary.fields)} ({len(summary.skipped)} already done, "
        f"{len(summary.failed)} failed), timepoints computed: {frames}"
    )
    for well, cells in summary.cells_per_well().items():
        print(f"  well {well}: {cells} cells")
    print(
        f"wall time: {summary.wall_seconds:.1f} s, "
        f"{summary.pixels_per_second / 1e6:.2f} megapixels per second computed"
    )
    if summary.devices:
        used = Counter(summary.devices.values())
        print("conv-net on: " + ", ".join(f"{name} ({n} workers)" for name, n in used.items()))
    if summary.store_retries:
        print(f"object-store requests retried after transient errors: {summary.store_retries}")
    for warning in summary.device_warnings:
        print(f"WARNING {warning}", file=sys.stderr)
    for outcome in summary.fields:
        for warning in outcome.warnings:
            print(f"WARNING {outcome.path or 'image'}: {warning}", file=sys.stderr)
    for failure in summary.failed:
        line = f"FAILED {failure.path or 'image'}: {failure.error}"
        if failure.traceback:
            line += f" (traceback: pipeline status {summary.output_path} --traceback)"
        print(line, file=sys.stderr)
    print(f"results: {summary.output_path}")


def _compute(
    item: PlateRun, config: RunConfig, running: RunCluster, show_progress: bool
) -> RunSummary:
    """Compute the units of one planned plate on a running cluster, then its reports."""
    plan = item.plan
    destination = report_folder(plan.output)
    with local_copy_of(destination) as reports:  # a bucket's reports: uploaded when done
        return _compute_with_reports(item, config, running, show_progress, reports, destination)


def _compute_with_reports(
    item: PlateRun,
    config: RunConfig,
    running: RunCluster,
    show_progress: bool,
    reports: Path,
    destination: UPath,
) -> RunSummary:
    # Imported here: torch and matplotlib load only when there is work.
    from pipeline.orchestration.plate import process_plate
    from pipeline.qc.report import write_qc_report

    plate, plan = item.plate, item.plan
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    total = sum(fov.data.sizes.get("t", 1) for fov in plan.todo)
    retried_before = _store_retries(running.client)
    with (
        performance_report(filename=str(reports / f"dask-performance-{stamp}.html")),
        tqdm(
            total=total,
            unit="frame",
            bar_format="{l_bar}{bar}| {n:.1f}/{total} frames [{elapsed}<{remaining}]",
            disable=not show_progress,
        ) as bar,
    ):
        summary = process_plate(
            plate,
            plan,
            config,
            running.client,
            gpu_workers=running.gpu_workers,
            progress=bar.update,
        )
    if config.segmentation.method == "convnet":
        summary.devices, summary.device_warnings = _inference_devices(
            running.client, config.compute.device
        )
    retried = _store_retries(running.client)
    summary.store_retries = sum(
        max(count - retried_before.get(process, 0), 0) for process, count in retried.items()
    )
    if show_progress:
        _print_summary(summary)
    if config.crops is not None:
        _write_crops(plan.output, config, running, show_progress)
    try:
        # drawn by the workers there are now (an adaptive cluster may have retired them all:
        # then here, rather than waiting for new jobs)
        drawing = running.client if running.client.scheduler_info()["workers"] else None
        index = write_qc_report(
            plan.output, reports, channel=config.segmentation.channel, client=drawing
        )
    except Exception as error:  # the results are written; a failed picture must not hide them
        print(f"warning: no QC report ({type(error).__name__}: {error})", file=sys.stderr)
    else:
        if show_progress:
            print(f"QC report: {destination.joinpath(*index.relative_to(reports).parts)}")
    return summary


def cut_output_crops(
    output: str | Path, settings: CropSettings, client: Client, show_progress: bool = True
) -> Path:
    """Cut the crops of every cell of an output on the cluster, with a progress bar."""
    from pipeline.classification.store import write_crops

    with tqdm(unit="crop", disable=not show_progress) as bar:

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return write_crops(output, settings, submit=client.submit, progress=advance)


def _write_crops(output: Path, config: RunConfig, running: RunCluster, show_progress: bool) -> None:
    """The ``crops`` section: crops of every cell after the fields; a failure is a warning."""
    from pipeline.classification.store import CropSettings

    crops = config.crops
    settings = CropSettings(
        size_um=crops.size_um,
        size_px=crops.size_px,
        channels=None if crops.channels is None else tuple(crops.channels),
        block=crops.block,
    )
    try:
        folder = cut_output_crops(output, settings, running.client, show_progress)
    except (PipelineInputError, OSError) as error:
        print(f"warning: no crops ({error})", file=sys.stderr)
        return
    if show_progress:
        print(f"crops: {folder}")


def _with_model_defaults(config: RunConfig | str | Path | None) -> RunConfig:
    """The run's configuration (loaded if a path), with the post-processing settings its
    conv-net recommends where the configuration sets none: the settings digest then holds the
    values used."""
    if not isinstance(config, RunConfig):
        config = load_config(config)
    segmentation = with_model_postprocessing(config.segmentation)
    return config.model_copy(update={"segmentation": segmentation})


def _plan(
    input_path: str | Path | Plate,
    out: str | Path,
    config: RunConfig,
    force: bool,
    only_failed: bool,
    locks: ExitStack,
    verify: bool = False,
) -> PlateRun:
    """Open the input, take the output's lock (held until ``locks`` closes) and plan."""
    plate = (
        input_path
        if isinstance(input_path, Plate)
        else open_plate(
            input_path,
            missing_chunks=config.input.missing_chunks,
            non_finite=config.input.non_finite,
        )
    )
    check_output_location(location(out), plate.path)  # before the lock file is written
    locks.enter_context(output_lock(out))
    plan = plan_run(plate, out, config, force=force, only_failed=only_failed, verify=verify)
    return PlateRun(plate.path, plate, plan)


def _run_planned(
    items: Sequence[PlateRun],
    config: RunConfig,
    cluster: ClusterOptions,
    show_progress: bool,
) -> None:
    """Compute every planned plate that has work, all on one cluster started here."""
    work = [item for item in items if item.plan is not None and not item.plan.nothing_to_do]
    if not work:
        return
    with cluster.connect() as running:
        if show_progress:
            print(f"Dask dashboard: {running.dashboard_link}")
            if running.tunnel_command:
                print(f"  from your computer: {running.tunnel_command}")
                print("  then open http://localhost:8787/status")
        for item in work:
            if show_progress and len(items) > 1:
                print(f"\n{item.input_path} -> {item.plan.output}")
            item.summary = _compute(item, config, running, show_progress)


def run(
    input_path: str | Path | Plate,
    out: str | Path,
    *,
    config: RunConfig | str | Path | None = None,
    cluster: str = "local",
    cluster_config: str | Path | None = None,
    max_jobs: int | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    scheduler_host: str = "127.0.0.1",
    force: bool = False,
    only_failed: bool = False,
    verify: bool = False,
    show_progress: bool = False,
) -> RunSummary:
    """Process a plate (or image): segment, measure and track every field not yet done.

    A field whose completion record in ``out`` matches this run's settings digest, model and
    input fingerprint is skipped; the others are computed. With nothing to do, no cluster is
    started.

    Parameters
    ----------
    input_path
        OME-Zarr 0.4/0.5 plate or image (path or an opened :class:`Plate`).
    out
        OME-Zarr 0.5 output (labels ``cells`` per field, tables ``cells`` and ``tracks``): new,
        or one an earlier run of this input wrote. Reports go to ``OUT.report/``.
    config
        A :class:`RunConfig`, a YAML path, or None for the defaults.
    cluster
        ``"local"``, ``"slurm"`` or ``"slurm-gpu"`` (dask-jobqueue, from ``cluster_config``).
    cluster_config
        dask-jobqueue YAML (e.g. ``deploy/slurm/jobqueue.yaml``) for SLURM clusters.
    max_jobs
        Most SLURM jobs the adaptive cluster grows to.
    workers
        Local worker processes.
    scheduler
        Address of an existing Dask scheduler (instead of starting a cluster).
    scheduler_host
        Interface the local cluster's scheduler listens on (public ones need TLS).
    force
        Recompute every field.
    only_failed
        Compute only the fields the last run recorded as failed.
    verify
        Also recompute done fields whose label or table files are not those their run wrote.
    show_progress
        Print the dashboard link, a progress bar and a summary.

    Returns
    -------
    RunSummary
        Per-field outcomes (computed, skipped, failed), wall time and throughput.
    """
    started = time.perf_counter()
    config = _with_model_defaults(config)
    with ExitStack() as locks:
        item = _plan(input_path, out, config, force, only_failed, locks, verify)
        if item.plan.nothing_to_do:
            summary = _summary_of_done(item.plate, item.plan, started)
            if show_progress:
                print(
                    f"nothing to do: all {len(summary.fields)} fields of {out} are done with "
                    "these settings, model and input (--force recomputes them)"
                )
            return summary
        options = ClusterOptions(
            cluster, scheduler, workers, cluster_config, max_jobs, scheduler_host
        )
        _run_planned([item], config, options, show_progress)
    return item.summary


def expand_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """Plate paths from paths and glob patterns, sorted, without repeats.

    Raises
    ------
    PipelineInputError
        If a pattern matches nothing.
    """
    found: dict[Path, None] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern))) if glob.has_magic(str(pattern)) else [pattern]
        matches = [Path(m) for m in matches if Path(m).exists()]
        if not matches:
            raise PipelineInputError("no plate matches", pattern)
        found.update(dict.fromkeys(matches))
    return list(found)


def reprocess(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    config: RunConfig | str | Path | None = None,
    cluster: ClusterOptions | None = None,
    force: bool = False,
    show_progress: bool = False,
) -> list[PlateRun]:
    """Bring the results of many plates up to date: compute what is new or stale, skip the rest.

    Each plate ``NAME.zarr`` gets the output ``OUT_DIR/NAME.zarr``. A plate that cannot be
    opened or planned is recorded (one line) and the others go on.

    Parameters
    ----------
    inputs
        Plate paths or glob patterns (e.g. ``/archive/*.zarr``).
    out_dir
        Folder of the outputs (created if missing).
    config
        A :class:`RunConfig`, a YAML path, or None for the defaults.
    cluster
        Where to compute (one cluster for all plates); default a local cluster.
    force
        Recompute every field of every plate.
    show_progress
        Print what is done, the dashboard link, progress and summaries.

    Returns
    -------
    list of PlateRun
        Per plate: its plan, its summary when something was computed, or its error.
    """
    started = time.perf_counter()
    config = _with_model_defaults(config)
    out_dir = location(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = []
    with ExitStack() as locks:
        for path in expand_inputs(inputs):
            try:
                items.append(_plan(path, out_dir / path.name, config, force, False, locks))
            except PipelineInputError as error:
                items.append(PlateRun(str(path), None, None, error=str(error)))
        _run_planned(items, config, cluster or ClusterOptions(), show_progress)
    for item in items:
        if item.plan is not None and item.summary is None:
            item.summary = _summary_of_done(item.plate, item.plan, started)
    if show_progress:
        _print_reprocess_table(items)
    return items


def _print_reprocess_table(items: Sequence[PlateRun]) -> None:
    print("\nplate\tcomputed\tskipped\tfailed")
    for item in items:
        if item.error is not None:
            print(f"{item.input_path}\t-\t-\tFAILED: {item.error}")
            continue
        summary = item.summary
        computed = len(summary.fields) - len(summary.skipped) - len(summary.failed)
        print(f"{item.input_path}\t{computed}\t{len(summary.skipped)}\t{len(summary.failed)}")
