"""A plate on a Dask cluster: its fields in flight a few at a time, then the plate metadata
and the per-well growth curves (``tables/well_growth``, ``tables/well_doubling``).

At most ``compute.fields_in_flight`` fields (:func:`pipeline.orchestration.field.process_field`)
are on the scheduler at once, so a 384-well plate never puts millions of tasks on it. A field
that fails is recorded in the run's ledger and the others go on. Only the fields the run's plan
lists are computed; the others are done already and kept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow.parquet as pq
import zarr
from distributed import Client
from upath import UPath

from pipeline.config import RunConfig
from pipeline.io import omezarr, tables
from pipeline.io.location import remove_tree
from pipeline.measurement.wells import doubling_times, well_curves
from pipeline.orchestration.field import Placement, process_field
from pipeline.orchestration.layout import (
    WELL_DOUBLING,
    WELL_GROWTH,
    plate_table_path,
    scratch_folder,
    wells,
)
from pipeline.orchestration.outcomes import (
    FieldOutcome,
    RunSummary,
    failed_outcome,
    skipped_outcome,
)
from pipeline.orchestration.plan import RunPlan
from pipeline.orchestration.records import Ledger

__all__ = ["process_plate"]


def process_plate(
    plate: omezarr.Plate,
    plan: RunPlan,
    config: RunConfig,
    client: Client,
    *,
    gpu_workers: bool = False,
    progress: Callable[[int], None] | None = None,
) -> RunSummary:
    """Compute the units of ``plan`` and finish the output: plate metadata, the run's ledger.

    Parameters
    ----------
    plate
        The input, from :func:`pipeline.io.omezarr.open_plate` (never modified).
    plan
        What to compute and what is done, from :func:`pipeline.orchestration.plan.plan_run`; a
        new output is created, an existing one is updated.
    config
        Run configuration.
    client
        Dask client of the cluster to run on.
    gpu_workers
        Restrict inference to workers with a ``GPU`` resource.
    progress
        Called with the frames done, in fractions: half a frame as its labels are segmented
        (block by block), the other half once the field is written.

    Returns
    -------
    RunSummary
        Per-field outcomes (computed, skipped or failed); the output's ledger records the same.
    """
    started = time.perf_counter()
    if plan.exists and plan.done:
        root = zarr.open_group(str(plan.output), mode="r+")
    else:
        root = omezarr.create_root(plan.output, overwrite=plan.exists)
    ledger = Ledger(plan.output, plate.path, [fov.path for fov in plate.fields], done=plan.done)
    for (row, column), fields in wells(plate.fields).items():
        omezarr.write_well(root, row, column, fields)
    placement = Placement(client, gpu_workers)
    lock = threading.Lock()

    def advance(n: int) -> None:
        if progress is not None:
            with lock:
                progress(n)

    def run_unit(fov: omezarr.FieldOfView) -> FieldOutcome:
        ledger.set(fov.path, "running")
        outcome = process_field(
            fov, plan.output, root, config, plan.provenance[fov.path], placement, ledger, advance
        )
        ledger.set(fov.path, "done")
        return outcome

    outcomes = [
        skipped_outcome(fov, plan.done[fov.path]) for fov in plate.fields if fov.path in plan.done
    ]
    pool = ThreadPoolExecutor(max_workers=config.compute.fields_in_flight)
    futures = {pool.submit(run_unit, fov): fov for fov in plan.todo}
    try:
        for future in as_completed(futures):
            fov = futures[future]
            try:
                outcomes.append(future.result())
            except Exception as error:  # a failed field is recorded; the others go on
                outcome = failed_outcome(fov, error)
                ledger.set(fov.path, "failed", outcome.error, outcome.traceback)
                outcomes.append(outcome)
    except BaseException:  # Ctrl-C: start no more fields, and do not wait for those running
        pool.shutdown(wait=False, cancel_futures=True)
        ledger.interrupt(time.perf_counter() - started)
        raise
    pool.shutdown()
    summary = RunSummary(plate.path, str(plan.output), _in_plate_order(plate, outcomes), 0.0)
    summary.wall_seconds = time.perf_counter() - started
    _finish_output(plan.output, plate, summary)
    ledger.finish(summary.wall_seconds)
    return summary


def _in_plate_order(plate: omezarr.Plate, outcomes: list[FieldOutcome]) -> list[FieldOutcome]:
    order = {fov.path: i for i, fov in enumerate(plate.fields)}
    return sorted(outcomes, key=lambda o: order[o.path])


def _finish_output(output: UPath, plate: omezarr.Plate, summary: RunSummary) -> None:
    """Write the plate metadata, listing the fields that are done (now or before)."""
    root = zarr.open_group(str(output), mode="r+")  # a lone image rewrote the root group
    remove_tree(scratch_folder(output))
    if not plate.is_plate:
        return
    done = [fov for fov, o in zip(plate.fields, summary.fields, strict=True) if o.error is None]
    done_wells = wells(done)
    for (row, column), fields in done_wells.items():
        omezarr.write_well(root, row, column, fields)
    for fov in plate.fields:  # a well none of whose fields is done must not list them
        if (fov.row, fov.column) not in done_wells:
            remove_tree(output / fov.row / fov.column)
    if done_wells:
        _write_well_curves(root, output, plate)
        omezarr.write_plate_metadata(
            root,
            name=plate.name or UPath(plate.path).stem,
            rows=plate.rows,
            columns=plate.columns,
            wells=list(done_wells),
            field_count=max(len(f) for f in done_wells.values()),
        )


def _write_well_curves(root: zarr.Group, output: UPath, plate: omezarr.Plate) -> None:
    """``tables/well_growth`` (count, size and reporter ratios per well and frame) and
    ``tables/well_doubling`` (doubling times) from the plate's cells table."""
    dataset = plate_table_path(output)
    if not dataset.is_dir():
        return
    names = pq.ParquetDataset(dataset.path, filesystem=dataset.fs, partitioning="hive").schema.names
    wanted = [n for n in names if n in ("well", "t", "area", "volume") or n.startswith("ratio_")]
    cells = tables.read_plate_table(dataset, columns=wanted)
    frame_interval = float(plate.fields[0].levels[0].scale.get("t", 1.0))
    curves = well_curves(cells, frame_interval=frame_interval)
    tables.write_table(root, WELL_GROWTH, curves, table_type="generic_table")
    tables.write_table(root, WELL_DOUBLING, doubling_times(curves), table_type="generic_table")
