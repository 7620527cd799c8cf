"""From a plate to results: one unit of work per field of view, run on a Dask cluster.

A field (its whole time series) is processed in two graphs:

1. *segment and measure*: tiled segmentation giving global cell ids (the conv-net, or the
   classical recipe: :mod:`pipeline.segmentation.methods`), stored to a scratch array, and per-block
   partial statistics tree-reduced into the field's cell table. The conv-net's nucleus diameter
   is estimated per field first unless the config gives it. When the cluster has workers with a
   ``GPU`` resource, the inference tasks (and the reads feeding them) are persisted there with
   ``resources={"GPU": 1}`` and the post-processing runs on any worker (graph fusion would drop
   a ``dask.annotate`` annotation, so the restriction is given at persist time);
2. *write*: ids renumbered 1..n (in the order of the table), the label pyramid and a copy of the
   image written to the output plate.

Then the cells are tracked (one task per field), each cell gets its growth rate along its track,
the tables written (``cells``, and ``tracks`` with one row per track), and last the field gets
its completion record: provenance (:mod:`pipeline.resume`), timestamps, counts and the merge QC
(share of frame-to-frame links whose size grows by 30% or more). Only the fields the run's plan
lists are computed; the others are done already and kept.

At most ``compute.fields_in_flight`` fields are on the scheduler at once, so a 384-well
plate never puts millions of tasks on it. A field whose cells do not fit in the halo is recomputed
with a doubled halo; a field that fails is recorded and the others go on.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import zarr
from distributed import Client

from pipeline._version import __version__
from pipeline.config import RunConfig
from pipeline.errors import PipelineInputError
from pipeline.io import omezarr, tables
from pipeline.measurement.cells import measure_dask
from pipeline.measurement.tracks import growth_rates, merge_qc, track_table
from pipeline.outcomes import FieldOutcome, RunSummary, failed_outcome, skipped_outcome
from pipeline.plausibility import segmentation_warnings
from pipeline.resume import ATTRIBUTE, Ledger, RunPlan, clear_unit, now
from pipeline.segmentation.methods import estimate_field_diameter, instance_ids, stitching_halo_um
from pipeline.segmentation.tiled import label_dtype, relabel_consecutive, with_halo_retries
from pipeline.tiling import block_chunks, halo_pixels
from pipeline.tracking import track

__all__ = ["process_plate"]

CELLS = "cells"
TRACKS = "tracks"


def _canonical(fov: omezarr.FieldOfView):
    """The field's data with a t and a c axis, whatever the file had."""
    data = fov.data
    for dim in ("c", "t"):
        if dim not in data.dims:
            data = data.expand_dims(dim)
    spatial = tuple(d for d in ("z", "y", "x") if d in data.dims)
    return data.transpose("t", "c", *spatial), "".join(spatial)


def _channel_index(fov: omezarr.FieldOfView, channel: str | int) -> int:
    names = list(fov.channel_names)
    if isinstance(channel, int):
        if not 0 <= channel < len(names):
            raise PipelineInputError(
                f"segmentation channel {channel} does not exist ({len(names)} channels)",
                Path(fov.dataset_path) / fov.path,
            )
        return channel
    if channel not in names:
        raise PipelineInputError(
            f"segmentation channel '{channel}' not found (channels: {', '.join(names)})",
            Path(fov.dataset_path) / fov.path,
        )
    return names.index(channel)


class _FieldRun:
    """The graphs and writes of one field of view."""

    def __init__(
        self,
        fov: omezarr.FieldOfView,
        root: zarr.Group,
        config: RunConfig,
        provenance: dict[str, object],
        gpu_workers: bool,
        ledger: Ledger,
    ) -> None:
        self.fov = fov
        self.root = root
        self.config = config
        self.provenance = provenance
        self.gpu_workers = gpu_workers
        self.ledger = ledger
        self.data, self.spatial_dims = _canonical(fov)
        self.channel = _channel_index(fov, config.segmentation.channel)
        self.pixel_size = {d: fov.pixel_size.get(d, 1.0) for d in self.spatial_dims}
        self.translation = {d: fov.levels[0].translation.get(d, 0.0) for d in self.spatial_dims}
        shape = self.data.shape
        self.outcome = FieldOutcome(
            path=fov.path,
            well=fov.well,
            n_frames=shape[0],
            n_pixels=int(np.prod(shape)) // shape[1],
        )

    def _diameter(self, client: Client, frames: da.Array) -> float | None:
        """The conv-net's nucleus diameter: from the config, or estimated on the field."""
        segmentation = self.config.segmentation
        if segmentation.method != "convnet":
            return None
        if segmentation.convnet.diameter_px is not None:
            return segmentation.convnet.diameter_px
        estimate = self._on_gpu_workers(
            client, estimate_field_diameter(frames, segmentation, self.config.compute)
        )
        return float(client.compute(estimate, sync=True))

    def _segment_and_measure(self, client: Client, halo_um: dict[str, float]):
        """Graph 1: global cell ids to the scratch array, and the merged cell table.

        The field's timepoints go through in blocks of ``compute.frames_in_flight``, one after
        the other, so the conv-net maps held on GPU workers are bounded by a block. Ids are
        those of the whole field (offset by the block's first pixel index), so the blocks give
        what one graph over all timepoints would.
        """
        frames = self.data.data[:, self.channel]
        storage = frames.chunksize[1:]
        halo = halo_pixels(halo_um, self.pixel_size, self.spatial_dims)
        min_block = [1 if d == "z" else self.config.tiling.min_block_px for d in self.spatial_dims]
        spatial_chunks = block_chunks(frames.shape[1:], storage, halo, min_block)
        frames = frames.rechunk(((1,) * frames.shape[0], *spatial_chunks))
        frame_pixels = int(np.prod(frames.shape[1:]))
        scratch = zarr.open_array(
            _scratch_path(self.root) / (self.fov.path or "image"),
            mode="w",
            shape=frames.shape,
            chunks=tuple(c[0] for c in frames.chunks),
            dtype=label_dtype(frames.shape[0] * frame_pixels + 1),
            fill_value=0,
        )
        tables = []
        step = self.config.compute.frames_in_flight
        for start in range(0, frames.shape[0], step):
            stop = min(start + step, frames.shape[0])
            ids = instance_ids(
                frames[start:stop],
                self.config.segmentation,
                pixel_size=[self.pixel_size[d] for d in self.spatial_dims],
                halo=halo,
                diameter_px=self.outcome.diameter_px,
                compute=self.config.compute,
                on_maps=lambda maps: self._on_gpu_workers(client, maps),
            ).astype(scratch.dtype)
            ids = da.where(ids > 0, ids + start * frame_pixels, 0).astype(scratch.dtype)
            stored = da.store(
                ids, scratch, regions=(slice(start, stop),), lock=False, compute=False
            )
            table = measure_dask(
                ids,
                self.data.data[start:stop],
                dims="t" + self.spatial_dims,
                pixel_size=self.pixel_size,
                translation=self.translation,
                channel_names=list(self.fov.channel_names),
            )
            _, cells = client.compute([stored, table], sync=True)
            tables.append(cells.assign(t=cells["t"] + start))
            del ids, stored, table  # releases the block's persisted maps before the next
        cells = pd.concat(tables, ignore_index=True)
        return scratch, frames.chunks, cells

    def _write(self, client: Client, scratch: zarr.Array, chunks, cells: pd.DataFrame) -> None:
        """Graph 2: renumbered labels (with pyramid) and a copy of the image, to the output."""
        ids = np.sort(cells["label"].to_numpy().astype(scratch.dtype))
        labels = relabel_consecutive(da.from_zarr(scratch, chunks=chunks), ids)
        parent, name = self._parent_and_name()
        levels = [level.dask_array() for level in self.fov.levels]
        image_group, image_writes = omezarr.write_image(
            parent,
            name,
            levels,
            self.fov.data.dims,
            self.fov.levels[0].scale,
            translation=self.fov.levels[0].translation or None,
            channel_names=list(self.fov.channel_names),
            level_shapes=[level.shape for level in self.fov.levels],
            compute=False,
        )
        if not self.fov.path:  # a lone image's group is the root: its ledger was just dropped
            self.ledger.rewrite()
        labels = labels.reshape(self._label_shape())
        _, label_writes = omezarr.write_labels(image_group, CELLS, labels, compute=False)
        client.compute([*image_writes, *label_writes], sync=True)
        self.image_group = image_group

    def _write_track_labels(self, client: Client, cells: pd.DataFrame) -> None:
        """``labels/tracks``: the cell labels with each cell's track id (as CTC expects)."""
        group = self.image_group["labels"][CELLS]
        level0 = group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"]
        labels = da.from_zarr(group[level0])
        lookup = np.zeros(len(cells) + 1, dtype=labels.dtype)
        lookup[cells["label"].to_numpy()] = cells["track_id"].to_numpy()
        tracks = da.map_blocks(np.take, lookup, labels, dtype=labels.dtype)
        _, writes = omezarr.write_labels(self.image_group, TRACKS, tracks, compute=False)
        client.compute(writes, sync=True)

    def _on_gpu_workers(self, client: Client, collection):
        """``collection`` persisted on the GPU workers if the cluster has them, else as is."""
        return persist_on_gpu_workers(client, collection) if self.gpu_workers else collection

    def _label_shape(self) -> tuple[int, ...]:
        return tuple(
            n for d, n in zip(self.fov.data.dims, self.fov.data.shape, strict=True) if d != "c"
        )

    def _parent_and_name(self) -> tuple[zarr.Group, str]:
        if not self.fov.path:
            return self.root, ""
        well_path, name = self.fov.path.rsplit("/", 1)
        return self.root[well_path], name

    def run(self, client: Client, on_frames: Callable[[int], None]) -> FieldOutcome:
        """Process the field, retrying with a larger halo when a cell does not fit."""
        started = now()
        clear_unit(self.root, self.fov.path)
        self.outcome.diameter_px = self._diameter(client, self.data.data[:, self.channel])
        diameter_um = (
            None
            if self.outcome.diameter_px is None
            else self.outcome.diameter_px * self.pixel_size["x"]
        )
        halo_um = stitching_halo_um(self.config.tiling.halo_um.model_dump(), diameter_um)
        scratch, chunks, cells = with_halo_retries(
            partial(self._segment_and_measure, client), halo_um, self.config.tiling.halo_retries
        )
        on_frames(self.outcome.n_frames)
        self._write(client, scratch, chunks, cells)
        ids = np.sort(cells["label"].to_numpy())
        cells = cells.assign(label=np.searchsorted(ids, cells["label"].to_numpy()) + 1)
        cells = client.submit(
            track, cells, **self.config.tracking.parameters(), pure=False
        ).result()
        if self.config.tracking.write_track_labels:
            self._write_track_labels(client, cells)
        frame_interval = float(self.fov.levels[0].scale.get("t", 1.0))
        cells = cells.assign(growth_rate=growth_rates(cells, frame_interval=frame_interval))
        tables.write_table(
            self.image_group,
            TRACKS,
            track_table(cells, frame_interval=frame_interval),
            table_type="generic_table",
        )
        tables.write_table(
            self.image_group,
            CELLS,
            cells,
            table_type="feature_table",
            region=f"../../labels/{CELLS}",
            instance_key="label",
        )
        if self.fov.well is not None:
            tables.write_plate_table_part(
                _plate_table_path(self.root),
                self.fov.row + self.fov.column,
                self.fov.field,
                cells.assign(field=self.fov.field),
            )
        shutil.rmtree(_scratch_path(self.root) / (self.fov.path or "image"))
        self.outcome.n_cells = len(cells)
        self.outcome.n_tracks = int(cells["track_id"].nunique()) if len(cells) else 0
        self.outcome.halo_um = halo_um
        self.outcome.warnings = segmentation_warnings(
            cells["n_pixels"].to_numpy(),
            frame_pixels=self.outcome.n_pixels // self.outcome.n_frames,
            n_frames=self.outcome.n_frames,
            diameter_px=self.outcome.diameter_px,
            spatial_ndim=len(self.spatial_dims),
        )
        self.image_group.attrs[ATTRIBUTE] = {  # last: the unit is done once this is written
            "status": "complete",
            "version": __version__,
            **self.provenance,
            "started": started,
            "finished": now(),
            "halo_um": halo_um,
            "diameter_px": self.outcome.diameter_px,
            "n_cells": self.outcome.n_cells,
            "n_tracks": self.outcome.n_tracks,
            "merge_qc": merge_qc(cells),
            "warnings": self.outcome.warnings,
        }
        on_frames(self.outcome.n_frames)
        return self.outcome


def persist_on_gpu_workers(client: Client, collection):
    """Persist a Dask collection on workers with a ``GPU`` resource.

    The restriction is given at persist time: graph fusion drops ``dask.annotate``.
    """
    return client.persist(collection, resources={"GPU": 1})


def _scratch_path(root: zarr.Group) -> Path:
    """Scratch space for a run's intermediate ids, beside (not inside) the output dataset."""
    output = Path(root.store.root)
    return output.parent / f".{output.name}.scratch"


def _plate_table_path(root: zarr.Group) -> Path:
    return Path(root.store.root) / "tables" / CELLS


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
        What to compute and what is done, from :func:`pipeline.resume.plan_run`; a new
        output is created, an existing one is updated.
    config
        Run configuration.
    client
        Dask client of the cluster to run on.
    gpu_workers
        Restrict inference to workers with a ``GPU`` resource.
    progress
        Called with a number of frame-steps done (each frame counts twice: segmented, written).

    Returns
    -------
    RunSummary
        Per-field outcomes (computed, skipped or failed); the output's ledger records the same.
    """
    started = time.perf_counter()
    if plan.exists and plan.done:
        root = zarr.open_group(plan.output, mode="r+")
    else:
        root = omezarr.create_root(plan.output, overwrite=plan.exists)
    ledger = Ledger(plan.output, plate.path, [fov.path for fov in plate.fields])
    for (row, column), fields in _wells(plate.fields).items():
        omezarr.write_well(root, row, column, fields)
    lock = threading.Lock()

    def advance(n: int) -> None:
        if progress is not None:
            with lock:
                progress(n)

    def run_unit(fov: omezarr.FieldOfView) -> FieldOutcome:
        ledger.set(fov.path, "running")
        unit = _FieldRun(fov, root, config, plan.provenance[fov.path], gpu_workers, ledger)
        outcome = unit.run(client, advance)
        ledger.set(fov.path, "done")
        return outcome

    outcomes = [
        skipped_outcome(fov, plan.done[fov.path]) for fov in plate.fields if fov.path in plan.done
    ]
    with ThreadPoolExecutor(max_workers=config.compute.fields_in_flight) as pool:
        futures = {pool.submit(run_unit, fov): fov for fov in plan.todo}
        for future in as_completed(futures):
            fov = futures[future]
            try:
                outcomes.append(future.result())
            except Exception as error:  # a failed field is recorded; the others go on
                outcome = failed_outcome(fov, error)
                ledger.set(fov.path, "failed", outcome.error)
                outcomes.append(outcome)
    summary = RunSummary(plate.path, str(plan.output), _in_plate_order(plate, outcomes), 0.0)
    summary.wall_seconds = time.perf_counter() - started
    _finish_output(plan.output, plate, summary)
    ledger.finish(summary.wall_seconds)
    return summary


def _wells(fields) -> dict[tuple[str, str], list[str]]:
    """Field names per (row, column) of the fields of a plate."""
    wells: dict[tuple[str, str], list[str]] = {}
    for fov in fields:
        if fov.well is not None:
            wells.setdefault((fov.row, fov.column), []).append(fov.field)
    return wells


def _in_plate_order(plate: omezarr.Plate, outcomes: list[FieldOutcome]) -> list[FieldOutcome]:
    order = {fov.path: i for i, fov in enumerate(plate.fields)}
    return sorted(outcomes, key=lambda o: order[o.path])


def _finish_output(output: Path, plate: omezarr.Plate, summary: RunSummary) -> None:
    """Write the plate metadata, listing the fields that are done (now or before)."""
    root = zarr.open_group(output, mode="r+")  # a lone image rewrote the root group
    shutil.rmtree(_scratch_path(root), ignore_errors=True)
    if not plate.is_plate:
        return
    done = [fov for fov, o in zip(plate.fields, summary.fields, strict=True) if o.error is None]
    wells = _wells(done)
    for (row, column), fields in wells.items():
        omezarr.write_well(root, row, column, fields)
    for fov in plate.fields:  # a well none of whose fields is done must not list them
        if (fov.row, fov.column) not in wells:
            shutil.rmtree(Path(output) / fov.row / fov.column, ignore_errors=True)
    if wells:
        omezarr.write_plate_metadata(
            root,
            name=plate.name or Path(plate.path).stem,
            rows=plate.rows,
            columns=plate.columns,
            wells=list(wells),
            field_count=max(len(f) for f in wells.values()),
        )
