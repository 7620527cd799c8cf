"""The Python API for notebooks and napari users: numpy in, numpy out; dask in, dask out."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from distributed.diagnostics.plugin import WorkerPlugin
from tqdm import tqdm

from pipeline.cluster import connect
from pipeline.config import HaloConfig, RunConfig, SegmentationConfig, load_config
from pipeline.errors import CorruptChunkError, PipelineInputError
from pipeline.graph import RunSummary, process_plate
from pipeline.io.omezarr import Plate, open_plate
from pipeline.segment.methods import (
    estimate_field_diameter,
    instance_ids,
    stitching_halo_um,
)
from pipeline.segment.tiled import HaloTooSmall, relabel_consecutive, sorted_ids
from pipeline.tiling import block_chunks, halo_pixels

__all__ = ["open_plate", "run", "segment"]

_DEFAULT_DIMS = {2: "yx", 3: "zyx", 4: "tzyx"}


def _image_layout(
    image: Any, dims: str | None, pixel_size: Mapping[str, float] | None
) -> tuple[Any, str, dict[str, float]]:
    """The raw array, its dims and the spatial pixel size, from an array or a DataArray."""
    if isinstance(image, xr.DataArray):
        dims = dims or "".join(str(d) for d in image.dims)
        spacing = {}
        for dim in "zyx":
            if dim in image.coords and image.sizes[dim] > 1:
                spacing[dim] = float(image.coords[dim][1] - image.coords[dim][0])
        pixel_size = {**spacing, **(pixel_size or {})}
        image = image.data
    dims = dims or _DEFAULT_DIMS.get(image.ndim)
    if dims is None or len(dims) != image.ndim or not set(dims) <= set("tczyx"):
        raise ValueError(f"cannot use dims {dims!r} for a {image.ndim}-D image; pass dims=")
    spatial = "".join(d for d in dims if d in "zyx")
    pixel_size = {d: float((pixel_size or {}).get(d, 1.0)) for d in spatial}
    return image, dims, pixel_size


def segment(
    image: Any,
    method: str = "convnet",
    *,
    dims: str | None = None,
    pixel_size: Mapping[str, float] | None = None,
    channel: int = 0,
    diameter: float | None = None,
    halo_um: Mapping[str, float] | None = None,
    **parameters: Any,
) -> Any:
    """Segment nuclei into instances; tiled on Dask input, whole-image on numpy input.

    Parameters
    ----------
    image
        numpy, dask or xarray image with dims a subset of (t, c, z, y, x) in that order.
    method
        ``"convnet"`` (the shipped U-Net, then seeds and watershed on its maps) or
        ``"classical"`` (Otsu, closing, hole filling, distance transform, watershed).
    dims
        Dims of ``image`` (default from a DataArray, else ``yx``/``zyx``/``tzyx`` by ndim).
    pixel_size
        Micrometres per pixel per spatial dim (default: from DataArray coords, else 1).
    channel
        Channel to segment when the image has a ``c`` axis.
    diameter
        Conv-net only: typical nucleus diameter in pixels; None estimates it from the middle
        timepoint (computed at once, also for Dask input).
    halo_um
        Halo of the tiles, ``{"xy": ..., "z": ...}`` (Dask input only); for the conv-net at
        least six nucleus diameters are used.
    **parameters
        Parameters of the method: see :class:`pipeline.config.ConvNetConfig` (e.g. ``model``,
        ``tta``, ``seed_threshold``) or :class:`pipeline.config.ClassicalConfig`.

    Returns
    -------
    numpy.ndarray or dask.array.Array
        Labels 1..n unique over the whole array (all timepoints), 0 for background; the image's
        dims without ``c``. A Dask result raises ``HaloTooSmall`` on compute if a cell does not
        fit in the halo.
    """
    if method not in ("convnet", "classical"):
        raise ValueError(f"unknown segmentation method {method!r}; use 'convnet' or 'classical'")
    segmentation = SegmentationConfig(method=method, **{method: parameters})
    array, dims, sizes = _image_layout(image, dims, pixel_size)
    if "c" in dims:
        array = (
            np.take(array, channel, axis=dims.index("c"))
            if isinstance(array, np.ndarray)
            else array[(slice(None),) * dims.index("c") + (channel,)]
        )
        dims = dims.replace("c", "")
    lazy = isinstance(array, da.Array)
    frames = array if "t" in dims else array[np.newaxis]
    spatial = dims.replace("t", "")
    if method == "convnet" and diameter is None:
        estimate = estimate_field_diameter(da.asarray(frames), segmentation)
        diameter = estimate.compute(scheduler="threads")
    if lazy:
        diameter_um = None if method == "classical" else diameter * sizes[spatial[-1]]
        halo_um = stitching_halo_um(HaloConfig(**(halo_um or {})).model_dump(), diameter_um)
        halo = halo_pixels(halo_um, sizes, spatial)
        chunks = block_chunks(frames.shape[1:], frames.chunksize[1:], halo)
    else:
        halo = (0,) * len(spatial)
        chunks = tuple((n,) for n in frames.shape[1:])
    frames = da.asarray(frames).rechunk(((1,) * frames.shape[0], *chunks))
    ids = instance_ids(
        frames,
        segmentation,
        pixel_size=[sizes[d] for d in spatial],
        halo=halo,
        diameter_px=diameter,
    )
    labels = relabel_consecutive(ids, sorted_ids(ids))
    if "t" not in dims:
        labels = labels[0]
    return labels if lazy else labels.compute(scheduler="threads")


_HANDLED_ERRORS = tuple(
    f"{error.__name__}(" for error in (PipelineInputError, CorruptChunkError, HaloTooSmall)
)


class _DropHandledFailures(logging.Filter):
    """Drops a worker's "Compute Failed" traceback of errors the run reports or retries."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("Compute Failed")
            and any(error in message for error in _HANDLED_ERRORS)
        )


class _QuietHandledFailures(WorkerPlugin):
    """Installs :class:`_DropHandledFailures` on each worker of the run's own local cluster."""

    def setup(self, worker: Any) -> None:
        logging.getLogger("distributed.worker").addFilter(_DropHandledFailures())


def _print_summary(summary: RunSummary) -> None:
    frames = sum(f.n_frames for f in summary.fields)
    print(f"\nfields: {len(summary.fields)} ({len(summary.failed)} failed), timepoints: {frames}")
    for well, cells in summary.cells_per_well().items():
        print(f"  well {well}: {cells} cells")
    print(
        f"wall time: {summary.wall_seconds:.1f} s, "
        f"{summary.pixels_per_second / 1e6:.2f} megapixels per second"
    )
    for failure in summary.failed:
        print(f"FAILED {failure.path}: {failure.error}", file=sys.stderr)
    print(f"results: {summary.output_path}")


def run(
    input_path: str | Path | Plate,
    out: str | Path,
    *,
    config: RunConfig | str | Path | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
) -> RunSummary:
    """Process a whole plate (or image): segment, measure and track every field, on Dask.

    Parameters
    ----------
    input_path
        OME-Zarr 0.4/0.5 plate or image (path or an opened :class:`Plate`).
    out
        New OME-Zarr 0.5 output (labels ``cells`` per field, tables ``cells``).
    config
        A :class:`RunConfig`, a YAML path, or None for the defaults.
    workers
        Local worker processes when no ``scheduler`` is given.
    scheduler
        Address of an existing Dask scheduler.
    overwrite
        Replace an existing output.
    show_progress
        Print the dashboard link, a progress bar and a summary.

    Returns
    -------
    RunSummary
        Per-field outcomes (failures included), wall time and throughput.
    """
    if not isinstance(config, RunConfig):
        config = load_config(config)
    plate = input_path if isinstance(input_path, Plate) else open_plate(input_path)
    if Path(out).exists() and not overwrite:  # before a cluster is started for nothing
        raise PipelineInputError("output already exists", Path(out).absolute())
    total = 2 * sum(f.data.sizes.get("t", 1) for f in plate.fields)
    with connect(scheduler, workers) as client:
        if scheduler is None:
            client.register_plugin(_QuietHandledFailures())
        if show_progress:
            print(f"Dask dashboard: {client.dashboard_link}")
        with tqdm(total=total, unit="frame-step", disable=not show_progress) as bar:
            summary = process_plate(
                plate, out, config, client, overwrite=overwrite, progress=bar.update
            )
    if show_progress:
        _print_summary(summary)
    return summary
