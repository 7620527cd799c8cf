"""One field of view, from its image to its results, as a sequence of explicit stages.

:func:`process_field` runs the stages in order on a Dask cluster; each takes and returns plain
typed values, so a reader (or a test) can follow one field's data:

1. :func:`start_image_copy`: the copy of the image to the output, started first and at low
   priority (it needs nothing the other stages compute, so it fills the workers' idle moments);
2. :func:`field_diameter`: the conv-net's nucleus diameter, from the config or estimated on the
   field (``None`` for the classical recipe);
3. :func:`segment_and_measure`: tiled segmentation giving global cell ids, stored to a scratch
   array, and per-block partial statistics merged into the field's cell table, which stays on
   the workers (:class:`Segmented`); a field whose cells do not fit in the halo is retried with
   a doubled halo (:func:`pipeline.segmentation.tiled.with_halo_retries`). When the cluster has
   workers with a ``GPU`` resource, the inference tasks (and the reads feeding them) are
   persisted there and the post-processing runs on any worker;
4. :func:`renumber_cells` (on a worker): ids become 1..n, one mapping for the label image and
   the table, so the two agree by construction;
5. :func:`write_images`: the renumbered label pyramid, to the output (the copy done too);
6. :func:`tabulate_field` (on a worker): tracking, growth rates, the ``cells`` and ``tracks``
   tables and the plate table's part, written there; only counts and QC come back;
7. :func:`write_track_labels`: ``labels/tracks`` (each cell painted with its track id);
8. the completion record, last (:mod:`pipeline.orchestration.records`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from dask.delayed import Delayed
from distributed import Client, Future, wait
from upath import UPath

from pipeline._version import __version__
from pipeline.classification.apply import classify_cells
from pipeline.config import ComputeConfig, RunConfig
from pipeline.errors import PipelineInputError
from pipeline.io import omezarr, tables
from pipeline.io.location import remove_tree
from pipeline.measurement.cells import measure_dask
from pipeline.measurement.compartments import Geometry, compartment_table_dask
from pipeline.measurement.features import feature_table_dask
from pipeline.measurement.neighbours import nearest_distances
from pipeline.measurement.tracks import growth_rates, merge_qc, track_table
from pipeline.orchestration.layout import (
    CELLS,
    NUCLEI,
    TRACKS,
    clear_unit,
    field_parent,
    plate_table_path,
    scratch_folder,
)
from pipeline.orchestration.outcomes import FieldOutcome
from pipeline.orchestration.progress import chunk_progress
from pipeline.orchestration.records import ATTRIBUTE, Ledger, now, unit_manifest
from pipeline.qc.plausibility import segmentation_warnings
from pipeline.segmentation.cells import grow_cells_dask
from pipeline.segmentation.methods import (
    brightfield_warnings,
    estimate_field_diameter,
    instance_ids,
    stitching_halo_um,
)
from pipeline.segmentation.tiled import (
    label_dtype,
    raise_first_error,
    relabel_consecutive,
    with_halo_retries,
)
from pipeline.tiling import block_chunks, halo_pixels, smallest_blocks
from pipeline.tracking import track

__all__ = [
    "FieldData",
    "FieldTables",
    "ImageCopy",
    "Placement",
    "Segmented",
    "field_diameter",
    "persist_on_gpu_workers",
    "process_field",
    "renumber_cells",
    "segment_and_measure",
    "start_image_copy",
    "tabulate_field",
    "write_images",
    "write_track_labels",
]


def persist_on_gpu_workers(client: Client, collection):
    """Persist a Dask collection on workers with a ``GPU`` resource.

    The restriction is given at persist time: graph fusion drops ``dask.annotate``.
    """
    return client.persist(collection, resources={"GPU": 1})


@dataclass(frozen=True)
class Placement:
    """Where a field's graphs run: the cluster's client, and whether it has GPU workers."""

    client: Client
    gpu_workers: bool = False

    def execution(self, compute: ComputeConfig) -> ComputeConfig:
        """``compute`` as this cluster runs inference: a GPU's frames per task on GPU workers
        (elsewhere the process that builds the graph decides from the devices it sees)."""
        if not self.gpu_workers or compute.frames_per_block is not None:
            return compute
        return compute.model_copy(update={"frames_per_block": compute.frames_per_task(gpu=True)})

    def on_gpu_workers(self, collection):
        """``collection`` persisted on the GPU workers if the cluster has them, else as is."""
        if not self.gpu_workers:
            return collection
        return persist_on_gpu_workers(self.client, collection)


@dataclass(frozen=True)
class FieldData:
    """A field of view as its stages read it: (t, c, [z,] y, x) data and its geometry."""

    fov: omezarr.FieldOfView
    data: xr.DataArray
    spatial_dims: str
    channel: int
    pixel_size: dict[str, float]
    translation: dict[str, float]
    cell_channel: int | None = None

    @classmethod
    def open(
        cls, fov: omezarr.FieldOfView, channel: str | int, cell_channel: str | int | None = None
    ) -> FieldData:
        """The field's data with a t and a c axis, whatever the file had, and its channels
        (the nuclear one, and the one whole cells grow over, if any)."""
        data = fov.data
        for dim in ("c", "t"):
            if dim not in data.dims:
                data = data.expand_dims(dim)
        spatial = "".join(d for d in ("z", "y", "x") if d in data.dims)
        return cls(
            fov=fov,
            data=data.transpose("t", "c", *spatial),
            spatial_dims=spatial,
            channel=_channel_index(fov, channel),
            pixel_size={d: fov.pixel_size.get(d, 1.0) for d in spatial},
            translation={d: fov.levels[0].translation.get(d, 0.0) for d in spatial},
            cell_channel=None if cell_channel is None else _channel_index(fov, cell_channel),
        )

    @property
    def segmentation_channel(self) -> da.Array:
        """(t, [z,] y, x) frames of the channel that is segmented."""
        return self.data.data[:, self.channel]

    @property
    def n_frames(self) -> int:
        """Timepoints."""
        return self.data.shape[0]

    @property
    def frame_pixels(self) -> int:
        """Pixels (voxels) of one channel of one timepoint."""
        return int(np.prod(self.data.shape[2:]))

    @property
    def label_shape(self) -> tuple[int, ...]:
        """Shape of the label image: the image's, without its channel axis, in its axis order."""
        dims, shape = self.fov.data.dims, self.fov.data.shape
        return tuple(n for d, n in zip(dims, shape, strict=True) if d != "c")


def _channel_index(fov: omezarr.FieldOfView, channel: str | int) -> int:
    names = list(fov.channel_names)
    if isinstance(channel, int):
        if not 0 <= channel < len(names):
            raise PipelineInputError(
                f"segmentation channel {channel} does not exist ({len(names)} channels)",
                os.path.join(fov.dataset_path, fov.path),
            )
        return channel
    if channel not in names:
        raise PipelineInputError(
            f"segmentation channel '{channel}' not found (channels: {', '.join(names)})",
            os.path.join(fov.dataset_path, fov.path),
        )
    return names.index(channel)


def field_diameter(field: FieldData, config: RunConfig, placement: Placement) -> float | None:
    """The conv-net's nucleus diameter in pixels: from the config, or estimated on the field.

    ``None`` for the classical recipe, whose sizes are in micrometres.
    """
    segmentation = config.segmentation
    if segmentation.method != "convnet":
        return None
    if segmentation.convnet.diameter_px is not None:
        return segmentation.convnet.diameter_px

    def on_the_cluster(graph: Delayed) -> Any:
        return placement.client.compute(placement.on_gpu_workers(graph), sync=True)

    return estimate_field_diameter(
        field.segmentation_channel, segmentation, config.compute, evaluate=on_the_cluster
    )


@dataclass
class Segmented:
    """A field's global cell ids (in a scratch array) and its cell table (on the workers).

    ``tables`` holds one future per block of timepoints, each a cell table whose ``t`` counts
    from the block's first timepoint ``starts[i]``; ``halo_um`` is the halo that sufficed.
    With ``segmentation.cells``, ``scratch`` holds the nuclei and ``cell_scratch`` the whole
    cells grown from them (same ids).
    """

    scratch: zarr.Array
    chunks: tuple[tuple[int, ...], ...]
    tables: list[Future]
    starts: list[int]
    halo_um: dict[str, float]
    cell_scratch: zarr.Array | None = None


def segment_and_measure(
    field: FieldData,
    config: RunConfig,
    placement: Placement,
    scratch_path: UPath,
    diameter_px: float | None,
    on_frames: Callable[[float], None],
    halo_um: dict[str, float],
) -> Segmented:
    """Global cell ids to a scratch array, and the cell table, computed on the workers;
    ``on_frames`` is told of the frames done as their label chunks arrive.

    The field's timepoints go through in blocks of ``compute.frames_in_flight``, one after
    the other, so the conv-net maps held on GPU workers are bounded by a block. Ids are those
    of the whole field (offset by the block's first pixel index), so the blocks give what one
    graph over all timepoints would.

    Raises
    ------
    HaloTooSmall
        A cell does not fit in the halo (the caller retries with a larger one).
    """
    frames = field.segmentation_channel
    dims = field.spatial_dims
    halo = halo_pixels(halo_um, field.pixel_size, dims)
    cells_config = config.segmentation.cells
    cell_halo = halo
    if cells_config is not None:  # cells reach distance_um beyond nuclei that fit the halo
        cell_halo = tuple(
            h + math.ceil(2 * cells_config.distance_um / field.pixel_size[d])
            for h, d in zip(halo, dims, strict=True)
        )
    min_block = smallest_blocks(
        dims, cell_halo, config.tiling.min_block_px, config.compute.block_halos
    )
    spatial_chunks = block_chunks(frames.shape[1:], frames.chunksize[1:], cell_halo, min_block)
    frames = frames.rechunk(((1,) * frames.shape[0], *spatial_chunks))

    def scratch_array(path: UPath) -> zarr.Array:
        return zarr.open_array(
            str(path),
            mode="w",
            shape=frames.shape,
            chunks=tuple(c[0] for c in frames.chunks),
            dtype=label_dtype(field.n_frames * field.frame_pixels + 1),
            fill_value=0,
            config={"write_empty_chunks": True},  # every chunk a file: counted for progress
        )

    scratch = scratch_array(scratch_path)
    cell_scratch = None
    if cells_config is not None:
        cell_scratch = scratch_array(_cell_scratch_path(scratch_path))
        cell_channel = field.data.data[:, field.cell_channel].rechunk(frames.chunks)
    block_tables, starts = [], []
    step = config.compute.frames_in_flight
    n_chunks = math.prod(len(c) for c in frames.chunks)
    with chunk_progress(scratch_path, n_chunks, field.n_frames, on_frames):
        for start in range(0, field.n_frames, step):
            stop = min(start + step, field.n_frames)
            ids = instance_ids(
                frames[start:stop],
                config.segmentation,
                pixel_size=[field.pixel_size[d] for d in dims],
                halo=halo,
                diameter_px=diameter_px,
                compute=placement.execution(config.compute),
                on_maps=placement.on_gpu_workers,
            ).astype(scratch.dtype)
            ids = da.where(ids > 0, ids + start * field.frame_pixels, 0).astype(scratch.dtype)
            stored = [
                da.store(ids, scratch, regions=(slice(start, stop),), lock=False, compute=False)
            ]
            table = measure_dask(
                ids,
                field.data.data[start:stop],
                dims="t" + dims,
                pixel_size=field.pixel_size,
                translation=field.translation,
                channel_names=list(field.fov.channel_names),
            )
            if cells_config is not None:
                cells = grow_cells_dask(
                    ids,
                    None if cells_config.method == "expand" else cell_channel[start:stop],
                    cells_config,
                    [field.pixel_size[d] for d in dims],
                    cell_halo,
                )
                stored.append(
                    da.store(
                        cells,
                        cell_scratch,
                        regions=(slice(start, stop),),
                        lock=False,
                        compute=False,
                    )
                )
            if cells_config is not None or config.measurement.features:
                table = _with_per_cell_tables(
                    table,
                    ids,
                    None if cells_config is None else cells,
                    field,
                    config,
                    start,
                    stop,
                    cell_halo,
                )
            # Unoptimised: the store, the measurement and the whole cells share each block's
            # labelling; optimised, each fuses it into its own tasks and labels every block twice.
            futures = placement.client.compute([*stored, table], optimize_graph=False)
            raise_first_error(futures)
            block_tables.append(futures[-1])
            starts.append(start)
            del ids, stored, table, futures  # releases the block's persisted maps before the next
    return Segmented(scratch, frames.chunks, block_tables, starts, halo_um, cell_scratch)


def _cell_scratch_path(scratch_path: UPath) -> UPath:
    return scratch_path.with_name(scratch_path.name + "-cells")


def _with_per_cell_tables(
    table: Any,
    nuclei: da.Array,
    cells: da.Array | None,
    field: FieldData,
    config: RunConfig,
    start: int,
    stop: int,
    halo: tuple[int, ...],
) -> Any:
    """The block's cell table (a delayed DataFrame) joined with what is measured per cell
    whole, by the block owning it over ``halo``: the compartments (with ``cells``) and the
    configured feature sets (of the cells, else of the nuclei)."""
    measurement = config.measurement
    image = field.data.data[start:stop]
    channels = list(field.fov.channel_names)
    extras = []
    if cells is not None:
        geometry = Geometry(
            tuple(field.pixel_size[d] for d in field.spatial_dims),
            measurement.ring_um,
            measurement.compartment_margin_um,
        )
        extras.append(
            compartment_table_dask(
                nuclei, cells, image, channels, geometry, halo, measurement.cytoplasm_mixture
            )
        )
    if measurement.features:
        objects = nuclei if cells is None else cells
        extras.append(feature_table_dask(objects, image, channels, measurement.features, halo))
    for extra in extras:
        table = dask.delayed(_join_parts)(table, extra.to_delayed())
    return table


def _join_parts(table: pd.DataFrame, parts: list[pd.DataFrame]) -> pd.DataFrame:
    """``table`` joined with the rows of a per-cell table's partitions."""
    return table.merge(pd.concat(parts, ignore_index=True), on=["t", "label"], how="left")


def renumber_cells(
    block_tables: list[pd.DataFrame], starts: list[int]
) -> tuple[np.ndarray, pd.DataFrame]:
    """One field's cell table, with global ids renumbered 1..n, and the ids it renumbered.

    The one renumbering of a field: ``ids`` (sorted global ids) give each cell its new number
    ``searchsorted(ids, id) + 1``, in the label image (:func:`relabel_consecutive`) as in the
    returned table.
    """
    cells = pd.concat(
        [
            table.assign(t=table["t"] + start)
            for table, start in zip(block_tables, starts, strict=True)
        ],
        ignore_index=True,
    )
    ids = np.sort(cells["label"].to_numpy())
    return ids, cells.assign(label=np.searchsorted(ids, cells["label"].to_numpy()) + 1)


@dataclass
class ImageCopy:
    """The field's image group in the output, and the writes of its image copy (futures)."""

    group: zarr.Group
    writes: list[Future]


def start_image_copy(
    field: FieldData, root: zarr.Group, ledger: Ledger, client: Client, shard_px: int | None
) -> ImageCopy:
    """The field's image group in the output, and its copy of the image started on the workers,
    in shards of ``shard_px`` (``output.shard_px``).

    The copy needs nothing the segmentation computes, so it starts first, at low priority: it
    fills the workers' idle moments (between the estimate's rounds, while graphs are built).
    """
    fov = field.fov
    parent, name = field_parent(root, fov.path)
    image_group, image_writes = omezarr.write_image(
        parent,
        name,
        [level.dask_array() for level in fov.levels],
        fov.data.dims,
        fov.levels[0].scale,
        translation=fov.levels[0].translation or None,
        channel_names=list(fov.channel_names),
        shard_px=shard_px,
        level_shapes=[level.shape for level in fov.levels],
        compute=False,
    )
    if not fov.path:  # a lone image's group is the root: its ledger was just dropped
        ledger.rewrite()
    return ImageCopy(image_group, client.compute(image_writes, priority=-1))


def write_images(
    field: FieldData,
    segmented: Segmented,
    ids: Future,
    copy: ImageCopy,
    client: Client,
) -> None:
    """The renumbered label pyramids, to the output: ``labels/cells`` (the nuclei, or with
    ``segmentation.cells`` the whole cells and ``labels/nuclei``), chunked and sharded as the
    image; returns once they and the image ``copy`` are written.

    ``ids`` (the field's sorted global ids, :func:`renumber_cells`) stay on the workers: a
    movie of a million cells would otherwise put 8 MB into every graph that uses them.
    """
    scratch = segmented.scratch
    ids = dask.delayed(client.submit(np.asarray, ids, dtype=scratch.dtype))
    labels = relabel_consecutive(da.from_zarr(scratch, chunks=segmented.chunks), ids)
    labels = labels.reshape(field.label_shape)
    label_images = {CELLS: labels}
    if segmented.cell_scratch is not None:
        cells = relabel_consecutive(
            da.from_zarr(segmented.cell_scratch, chunks=segmented.chunks), ids
        )
        label_images = {NUCLEI: labels, CELLS: cells.reshape(field.label_shape)}
    label_writes = []
    for name, image in label_images.items():
        label_writes += omezarr.write_labels(copy.group, name, image, compute=False)[1]
    client.gather([*copy.writes, *client.compute(label_writes)])


@dataclass(frozen=True)
class FieldTables:
    """What :func:`tabulate_field` wrote, in numbers: counts, QC, and the track of each label."""

    n_cells: int
    n_tracks: int
    merge_qc: dict[str, float]
    warnings: list[str]
    track_of_label: np.ndarray | None


def tabulate_field(
    cells: pd.DataFrame,
    output: str,
    fov: omezarr.FieldOfView,
    config: RunConfig,
    *,
    frame_pixels: int,
    n_frames: int,
    spatial_ndim: int,
    diameter_px: float | None,
) -> FieldTables:
    """Track the cells, add growth rates (and the distances to the nearest cells, with the
    ``neighbors`` features; each cell's class, with ``classification``) and write the field's
    tables (runs on a worker).

    Writes ``tables/cells`` and ``tables/tracks`` in the field's group of ``output`` and, for
    plates, the field's part of the plate-wide cells table.
    """
    frame_interval = float(fov.levels[0].scale.get("t", 1.0))
    cells = track(cells, **config.tracking.parameters())
    cells = cells.assign(growth_rate=growth_rates(cells, frame_interval=frame_interval))
    if "neighbors" in config.measurement.features:  # distances need the whole field
        cells = nearest_distances(cells, "zyx"[3 - spatial_ndim :])
    if config.classification is not None:  # from the image and labels written already
        cells = classify_cells(
            cells,
            omezarr.open_image(output, image_path=fov.path),
            omezarr.open_labels(output, image_path=fov.path, name=CELLS).data,
            config.classification.model,
        )
    image_group = zarr.open_group(store=output, path=fov.path, mode="r+")
    tables.write_table(
        image_group,
        TRACKS,
        track_table(cells, frame_interval=frame_interval),
        table_type="generic_table",
    )
    tables.write_table(
        image_group,
        CELLS,
        cells,
        table_type="feature_table",
        region=f"../../labels/{CELLS}",
        instance_key="label",
    )
    if fov.well is not None:
        tables.write_plate_table_part(
            plate_table_path(output), fov.row + fov.column, fov.field, cells.assign(field=fov.field)
        )
    track_of_label = None
    if config.tracking.write_track_labels:
        track_of_label = np.zeros(len(cells) + 1, dtype=np.int64)
        track_of_label[cells["label"].to_numpy()] = cells["track_id"].to_numpy()
    return FieldTables(
        n_cells=len(cells),
        n_tracks=int(cells["track_id"].nunique()) if len(cells) else 0,
        merge_qc=merge_qc(cells),
        warnings=segmentation_warnings(
            cells["n_pixels"].to_numpy(),
            frame_pixels=frame_pixels,
            n_frames=n_frames,
            diameter_px=diameter_px,
            spatial_ndim=spatial_ndim,
        ),
        track_of_label=track_of_label,
    )


def write_track_labels(
    image_group: zarr.Group,
    output: str,
    fov: omezarr.FieldOfView,
    track_of_label: np.ndarray,
    client: Client,
) -> None:
    """``labels/tracks``: the cell labels with each cell's track id (as CTC expects).

    The lookup (one entry per cell) goes to the workers by itself, not inside the graph."""
    labels = omezarr.open_labels(output, image_path=fov.path, name=CELLS).levels[0].dask_array()
    lookup = dask.delayed(client.scatter(track_of_label.astype(labels.dtype)))
    meta = np.empty((0,) * labels.ndim, labels.dtype)  # the lookup is not there to try on
    tracks = da.map_blocks(_track_ids, labels, lookup, dtype=labels.dtype, meta=meta)
    _, writes = omezarr.write_labels(image_group, TRACKS, tracks, compute=False)
    client.compute(writes, sync=True)


def _track_ids(labels: np.ndarray, track_of_label: np.ndarray) -> np.ndarray:
    return track_of_label[labels]


def _filled_warning(filled: list[str]) -> list[str]:
    """The warning of a field some of whose input chunks were absent and read as 0."""
    if not filled:
        return []
    shown = ", ".join(filled[:3]) + (", ..." if len(filled) > 3 else "")
    return [
        f"{len(filled)} chunk(s) absent from the input read as the fill value ({shown}; all "
        "listed in the field's record as filled_chunks)"
    ]


def process_field(
    fov: omezarr.FieldOfView,
    output: UPath,
    root: zarr.Group,
    config: RunConfig,
    provenance: dict[str, Any],
    placement: Placement,
    ledger: Ledger,
    on_frames: Callable[[float], None],
) -> FieldOutcome:
    """Run every stage of one field into the output ``output`` (opened: ``root``); its
    completion record last.

    ``on_frames`` is told of half of each timepoint as it is segmented (block by block), and
    of the other half once the field is written.
    """
    started = now()
    client = placement.client
    cells_config = config.segmentation.cells
    field = FieldData.open(
        fov, config.segmentation.channel, None if cells_config is None else cells_config.channel
    )
    outcome = FieldOutcome(
        path=fov.path,
        well=fov.well,
        n_frames=field.n_frames,
        n_pixels=field.n_frames * field.frame_pixels,
    )
    fov.levels[0].reader.check_extent()  # in seconds, before any graph of the field
    clear_unit(output, fov.path)
    copy = start_image_copy(field, root, ledger, client, config.output.shard_px)
    try:
        outcome.diameter_px = field_diameter(field, config, placement)
        unlike_training = brightfield_warnings(
            field.segmentation_channel,
            config.segmentation,
            lambda verdict: client.compute(verdict, sync=True),
        )
        diameter_um = (
            None if outcome.diameter_px is None else outcome.diameter_px * field.pixel_size["x"]
        )
        halo_um = stitching_halo_um(config.tiling.halo_um.model_dump(), diameter_um)
        scratch_path = scratch_folder(output) / (fov.path or "image")
        segmented = with_halo_retries(
            partial(
                segment_and_measure,
                field,
                config,
                placement,
                scratch_path,
                outcome.diameter_px,
                lambda frames: on_frames(frames / 2),
            ),
            halo_um,
            config.tiling.halo_retries,
        )
        outcome.halo_um = segmented.halo_um
        renumbered = client.submit(renumber_cells, segmented.tables, segmented.starts, pure=False)
        ids = client.submit(itemgetter(0), renumbered)  # stays on the cluster: one id per cell
        write_images(field, segmented, ids, copy, client)
        written = client.submit(
            tabulate_field,
            client.submit(itemgetter(1), renumbered),
            str(output),
            fov,
            config,
            frame_pixels=field.frame_pixels,
            n_frames=field.n_frames,
            spatial_ndim=len(field.spatial_dims),
            diameter_px=outcome.diameter_px,
            pure=False,
        ).result()
        del renumbered, segmented
        if written.track_of_label is not None:
            write_track_labels(copy.group, str(output), fov, written.track_of_label, client)
        remove_tree(scratch_path)
        if cells_config is not None:
            remove_tree(_cell_scratch_path(scratch_path))
        outcome.n_cells = written.n_cells
        outcome.n_tracks = written.n_tracks
        filled = fov.levels[0].reader.filled_chunks()
        outcome.warnings = [*_filled_warning(filled), *unlike_training, *written.warnings]
        copy.group.attrs[ATTRIBUTE] = {  # last: the unit is done once this is written
            "status": "complete",
            "version": __version__,
            **provenance,
            "started": started,
            "finished": now(),
            "halo_um": outcome.halo_um,
            "diameter_px": outcome.diameter_px,
            "n_cells": outcome.n_cells,
            "n_tracks": outcome.n_tracks,
            "merge_qc": written.merge_qc,
            "warnings": outcome.warnings,
            "filled_chunks": filled,
            "manifest": unit_manifest(output, fov.path),
        }
    except Exception:  # a failed field's partial output goes (a lone image's copy stays)
        wait(copy.writes)  # so that no chunk of the copy lands after the clean-up
        clear_unit(output, fov.path)
        raise
    on_frames(field.n_frames / 2)
    return outcome
