"""From a plate to results: one unit of work per field of view, run on a Dask cluster.

A field (its whole time series) is processed in two graphs:

1. *segment and measure*: tiled segmentation giving global cell ids (the conv-net, or the
   classical recipe: :mod:`pipeline.segment.methods`), stored to a scratch array, and per-block
   partial statistics tree-reduced into the field's cell table. The conv-net's nucleus diameter
   is estimated per field first unless the config gives it. When the cluster has workers with a
   ``GPU`` resource, the inference tasks (and the reads feeding them) are persisted there with
   ``resources={"GPU": 1}`` and the post-processing runs on any worker (graph fusion would drop
   a ``dask.annotate`` annotation, so the restriction is given at persist time);
2. *write*: ids renumbered 1..n (in the order of the table), the label pyramid and a copy of the
   image written to the output plate.

Then the cells are tracked (one task per field), each cell gets its growth rate along its track,
the tables written (``cells``, and ``tracks`` with one row per track), and the field is marked
complete with the merge QC (share of frame-to-frame links whose size grows by 30% or more).

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
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import zarr
from distributed import Client

from pipeline import __version__
from pipeline.config import RunConfig
from pipeline.errors import PipelineInputError
from pipeline.infer import loaded_model
from pipeline.io import omezarr, tables
from pipeline.measure import measure_dask
from pipeline.segment.methods import (
    estimate_field_diameter,
    inference_settings,
    instance_ids,
    stitching_halo_um,
)
from pipeline.segment.tiled import HaloTooSmall, relabel_consecutive
from pipeline.tiling import block_chunks, halo_pixels
from pipeline.track import track
from pipeline.track_measure import growth_rates, merge_qc, track_table

__all__ = ["FieldOutcome", "RunSummary", "process_plate"]

CELLS = "cells"
TRACKS = "tracks"


@dataclass
class FieldOutcome:
    """What happened to one field of view."""

    path: str
    well: str | None
    n_frames: int
    n_pixels: int
    n_cells: int = 0
    n_tracks: int = 0
    halo_um: dict[str, float] = field(default_factory=dict)
    diameter_px: float | None = None
    error: str | None = None


@dataclass
class RunSummary:
    """What a run did, for the terminal summary and the output's provenance."""

    input_path: str
    output_path: str
    fields: list[FieldOutcome]
    wall_seconds: float

    @property
    def failed(self) -> list[FieldOutcome]:
        """Fields that did not complete."""
        return [f for f in self.fields if f.error is not None]

    def cells_per_well(self) -> dict[str, int]:
        """Cells found per well (summed over fields and timepoints)."""
        counts: dict[str, int] = {}
        for outcome in self.fields:
            key = outcome.well or "image"
            counts[key] = counts.get(key, 0) + outcome.n_cells
        return counts

    @property
    def pixels_per_second(self) -> float:
        """Segmentation-channel pixels of completed fields per second of wall time."""
        done = sum(f.n_pixels for f in self.fields if f.error is None)
        return done / self.wall_seconds if self.wall_seconds > 0 else 0.0


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

    def __init__(self, fov: omezarr.FieldOfView, root: zarr.Group, config: RunConfig) -> None:
        self.fov = fov
        self.root = root
        self.config = config
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
        estimate = _on_gpu_workers(client, estimate_field_diameter(frames, segmentation))
        return float(client.compute(estimate, sync=True))

    def _segment_and_measure(self, client: Client, halo_um: dict[str, float]):
        """Graph 1: global cell ids to the scratch array, and the merged cell table."""
        frames = self.data.data[:, self.channel]
        storage = frames.chunksize[1:]
        halo = halo_pixels(halo_um, self.pixel_size, self.spatial_dims)
        min_block = [1 if d == "z" else self.config.tiling.min_block_px for d in self.spatial_dims]
        spatial_chunks = block_chunks(frames.shape[1:], storage, halo, min_block)
        frames = frames.rechunk(((1,) * frames.shape[0], *spatial_chunks))
        ids = instance_ids(
            frames,
            self.config.segmentation,
            pixel_size=[self.pixel_size[d] for d in self.spatial_dims],
            halo=halo,
            diameter_px=self.outcome.diameter_px,
            on_maps=lambda maps: _on_gpu_workers(client, maps),
        )
        scratch = zarr.open_array(
            _scratch_path(self.root) / (self.fov.path or "image"),
            mode="w",
            shape=ids.shape,
            chunks=tuple(c[0] for c in ids.chunks),
            dtype=ids.dtype,
            fill_value=0,
        )
        stored = da.store(ids, scratch, lock=False, compute=False)
        table = measure_dask(
            ids,
            self.data.data,
            dims="t" + self.spatial_dims,
            pixel_size=self.pixel_size,
            translation=self.translation,
            channel_names=list(self.fov.channel_names),
        )
        _, cells = client.compute([stored, table], sync=True)
        return scratch, ids.chunks, cells

    def _write(self, client: Client, scratch: zarr.Array, chunks, cells: pd.DataFrame) -> None:
        """Graph 2: renumbered labels (with pyramid) and a copy of the image, to the output."""
        ids = np.sort(cells["label"].to_numpy().astype(scratch.dtype))
        labels = relabel_consecutive(da.from_zarr(scratch, chunks=chunks), ids)
        parent, name = self._parent_and_name()
        levels = [da.from_zarr(level) for level in self._input_levels()]
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

    def _model_provenance(self) -> dict[str, object]:
        if self.config.segmentation.method != "convnet":
            return {}
        settings = inference_settings(self.config.segmentation)
        _, info = loaded_model(settings.model, "cpu")
        return {"model_sha256": info.weights_sha256, "diameter_px": self.outcome.diameter_px}

    def _input_levels(self) -> list[zarr.Array]:
        group = zarr.open_group(self.fov.dataset_path, mode="r")
        image = group[self.fov.path] if self.fov.path else group
        return [image[level.path] for level in self.fov.levels]

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
        self.outcome.diameter_px = self._diameter(client, self.data.data[:, self.channel])
        diameter_um = (
            None
            if self.outcome.diameter_px is None
            else self.outcome.diameter_px * self.pixel_size["x"]
        )
        halo_um = stitching_halo_um(self.config.tiling.halo_um.model_dump(), diameter_um)
        for attempt in range(self.config.tiling.halo_retries + 1):
            try:
                scratch, chunks, cells = self._segment_and_measure(client, halo_um)
                break
            except HaloTooSmall:
                if attempt == self.config.tiling.halo_retries:
                    raise
                halo_um = {k: 2 * v for k, v in halo_um.items()}
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
        self.image_group.attrs["pipeline"] = {
            "status": "complete",
            "version": __version__,
            "config_sha256": self.config.digest(),
            "halo_um": halo_um,
            **self._model_provenance(),
            "merge_qc": merge_qc(cells),
        }
        self.outcome.n_cells = len(cells)
        self.outcome.n_tracks = int(cells["track_id"].nunique()) if len(cells) else 0
        self.outcome.halo_um = halo_um
        on_frames(self.outcome.n_frames)
        return self.outcome


def _gpu_workers(client: Client) -> bool:
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return any(w.get("resources", {}).get("GPU", 0) > 0 for w in workers)


def _on_gpu_workers(client: Client, collection):
    """Persist ``collection`` on workers with a ``GPU`` resource, if the cluster has any."""
    if not _gpu_workers(client):
        return collection
    return client.persist(collection, resources={"GPU": 1})


def _scratch_path(root: zarr.Group) -> Path:
    """Scratch space for a run's intermediate ids, beside (not inside) the output dataset."""
    output = Path(root.store.root)
    return output.parent / f".{output.name}.scratch"


def _plate_table_path(root: zarr.Group) -> Path:
    return Path(root.store.root) / "tables" / CELLS


def _describe_failure(error: BaseException) -> str:
    if isinstance(error, PipelineInputError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def process_plate(
    plate: omezarr.Plate,
    out: str | Path,
    config: RunConfig,
    client: Client,
    *,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> RunSummary:
    """Run every field of ``plate`` and write the results to a new OME-Zarr 0.5 dataset at ``out``.

    Parameters
    ----------
    plate
        The input, from :func:`pipeline.io.omezarr.open_plate` (never modified).
    out
        Output path; must not exist unless ``overwrite``.
    config
        Run configuration.
    client
        Dask client of the cluster to run on.
    overwrite
        Replace an existing output.
    progress
        Called with a number of frame-steps done (each frame counts twice: segmented, written).

    Returns
    -------
    RunSummary
        Per-field outcomes, including failures; the output's root attributes record the same.
    """
    if Path(out).resolve() == Path(plate.path).resolve():
        raise PipelineInputError("output must differ from the input", out)
    started = time.perf_counter()
    root = omezarr.create_root(out, overwrite=overwrite)
    root.attrs["pipeline"] = {"status": "running", "version": __version__, "input": plate.path}
    wells: dict[tuple[str, str], list[str]] = {}
    for fov in plate.fields:
        if fov.well is not None:
            wells.setdefault((fov.row, fov.column), []).append(fov.field)
    for (row, column), fields in wells.items():
        omezarr.write_well(root, row, column, fields)
    lock = threading.Lock()

    def advance(n: int) -> None:
        if progress is not None:
            with lock:
                progress(n)

    outcomes: list[FieldOutcome] = []
    with ThreadPoolExecutor(max_workers=config.compute.fields_in_flight) as pool:
        futures = {}
        for fov in plate.fields:
            try:
                unit = _FieldRun(fov, root, config)
            except PipelineInputError as error:
                outcomes.append(_failed(fov, error))
                continue
            futures[pool.submit(unit.run, client, advance)] = fov
        for future in as_completed(futures):
            fov = futures[future]
            try:
                outcomes.append(future.result())
            except Exception as error:  # a failed field is recorded; the others go on
                outcomes.append(_failed(fov, error))
    summary = RunSummary(plate.path, str(out), _in_plate_order(plate, outcomes), 0.0)
    summary.wall_seconds = time.perf_counter() - started
    _finish_output(root, plate, summary)
    return summary


def _failed(fov: omezarr.FieldOfView, error: BaseException) -> FieldOutcome:
    shape = fov.data.shape
    return FieldOutcome(
        path=fov.path,
        well=fov.well,
        n_frames=fov.data.sizes.get("t", 1),
        n_pixels=int(np.prod(shape)),
        error=_describe_failure(error),
    )


def _in_plate_order(plate: omezarr.Plate, outcomes: list[FieldOutcome]) -> list[FieldOutcome]:
    order = {fov.path: i for i, fov in enumerate(plate.fields)}
    return sorted(outcomes, key=lambda o: order[o.path])


def _finish_output(root: zarr.Group, plate: omezarr.Plate, summary: RunSummary) -> None:
    """Write the plate metadata (completed fields only) and the run's status, last."""
    done = [o for o in summary.fields if o.error is None]
    shutil.rmtree(_scratch_path(root), ignore_errors=True)
    root = zarr.open_group(root.store.root, mode="r+")  # a lone image rewrote the root group
    if plate.is_plate:
        wells: dict[tuple[str, str], list[str]] = {}
        for outcome in done:
            row, column, name = outcome.path.split("/")
            wells.setdefault((row, column), []).append(name)
        for (row, column), fields in wells.items():
            omezarr.write_well(root, row, column, fields)
        for fov in plate.fields:  # a well none of whose fields completed must not list them
            if (fov.row, fov.column) not in wells:
                shutil.rmtree(Path(root.store.root) / fov.row / fov.column, ignore_errors=True)
        if wells:
            omezarr.write_plate_metadata(
                root,
                name=plate.name or Path(plate.path).stem,
                rows=plate.rows,
                columns=plate.columns,
                wells=list(wells),
                field_count=max(len(f) for f in wells.values()),
            )
    root.attrs["pipeline"] = {
        "status": "complete" if not summary.failed else "partial",
        "version": __version__,
        "input": plate.path,
        "wall_seconds": round(summary.wall_seconds, 3),
        "fields_done": len(done),
        "failures": [{"field": o.path, "error": o.error} for o in summary.failed],
    }
