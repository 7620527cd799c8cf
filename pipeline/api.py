"""The Python API for notebooks and napari users: numpy in, numpy out; dask in, dask out."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from distributed import futures_of

from pipeline.config import HaloConfig, SegmentationConfig, TilingConfig
from pipeline.convnet.settings import ConvNetExecution
from pipeline.convnet.weights import CELLS_MODEL
from pipeline.io.omezarr import open_plate
from pipeline.normalize import colour_to_grey
from pipeline.orchestration.runner import run
from pipeline.segmentation.cells import (
    CellParameters,
    cell_channel_levels,
    grow_cells,
    grow_cells_dask,
)
from pipeline.segmentation.parameters import with_model_postprocessing
from pipeline.segmentation.tiled import (
    raise_first_error,
    relabel_consecutive,
    sorted_ids,
    with_halo_retries,
)
from pipeline.tiling import block_chunks, halo_pixels

__all__ = ["open_plate", "run", "segment"]

_DEFAULT_DIMS = {2: "yx", 3: "zyx", 4: "tzyx"}


# ``segment`` keywords that say how the network runs, not what it finds.
_EXECUTION_PARAMETERS = tuple(ConvNetExecution.model_fields)


def _looks_like_rgb(image: Any) -> bool:
    """A 3-D array whose last axis holds 3 or 4 values (and the others many): RGB(A)."""
    return image.ndim == 3 and image.shape[-1] in (3, 4) and min(image.shape[:2]) > 4


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
    if dims is None and _looks_like_rgb(image):
        warnings.warn(
            f"image of shape {tuple(image.shape)} taken as RGB colour (channels last) and "
            "segmented on its luminance (dark nuclei on a light background are inverted); "
            "pass dims='zyx' for a stack of three-pixel-wide planes",
            UserWarning,
            stacklevel=3,
        )
        image = (
            colour_to_grey(image)
            if isinstance(image, np.ndarray)
            else da.map_blocks(colour_to_grey, image.rechunk({2: -1}), drop_axis=2, dtype="f4")
        )
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
    target: str = "nuclei",
    nuclei: Any = None,
    cell_channel: int | None = None,
    cell_method: str | None = None,
    cell_options: Mapping[str, Any] | None = None,
    **parameters: Any,
) -> Any:
    """Segment nuclei, or whole cells, into instances; tiled on Dask input, whole-image on numpy.

    Parameters
    ----------
    image
        numpy, dask or xarray image with dims a subset of (t, c, z, y, x) in that order; an
        (H, W, 3 or 4) array without ``dims`` is taken as RGB colour (histology) and
        segmented on its luminance, with a warning.
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
        Conv-net only: typical diameter of the objects (nuclei; cells for the whole-cell
        network) in pixels; None estimates it from the middle timepoint (computed at once,
        also for Dask input).
    halo_um
        Halo of the tiles, ``{"xy": ..., "z": ...}`` (Dask input only); for the conv-net at
        least six nucleus diameters are used.
    target
        ``"nuclei"``, or ``"cells"``: whole cells, either grown from the nuclei over a cell
        channel (:mod:`pipeline.segmentation.cells`), each with the id of its nucleus, or
        found by the whole-cell network in a phase-contrast channel alone.
    nuclei
        Cells only: nuclear labels to grow from (the image's dims without ``c``); default:
        the nuclei segmented from ``channel`` with ``method``.
    cell_channel
        Cells only: the channel of a cytoplasm, membrane or phase stain. Without a ``c`` axis
        the image itself is the cell channel.
    cell_method
        Cells only: ``"propagation"`` (CellProfiler's default), ``"watershed"``, ``"expand"``
        (no cell channel: grow each nucleus by ``distance_um``) or ``"convnet"`` (no nuclei:
        the shipped whole-cell network for phase contrast, ``cells_phase_unet``, or the
        ``model`` given, then the same post-processing as nuclei; ``diameter`` is then the
        cells' diameter). Default: ``"convnet"`` for an image without channels and without
        ``nuclei``, else ``"propagation"``.
    cell_options
        Cells only: the other fields of :class:`pipeline.segmentation.cells.CellParameters`
        (``distance_um``, ``threshold_correction``, ``regularization``, ``smoothing_um``).
    **parameters
        Parameters of the method: see :class:`pipeline.config.ConvNetConfig` (e.g. ``model``,
        ``tta``, ``seed_threshold``) or :class:`pipeline.config.ClassicalParameters`; and how the
        conv-net runs: :class:`pipeline.convnet.settings.ConvNetExecution`
        (``device``, ``cpu_threads``, ``batch_size``, ``tile_px``, ``frames_per_block``).

    Returns
    -------
    numpy.ndarray or dask.array.Array
        Labels 1..n unique over the whole array (all timepoints), 0 for background; the image's
        dims without ``c``. Dask input: the result is computed and persisted (in memory, or
        on the workers under a distributed client); a field whose cells do not fit in the halo
        is recomputed with a doubled halo, as ``pipeline run`` does
        (``tiling.halo_retries`` times), so tiled labels equal whole-image labels.

    Warns
    -----
    UserWarning
        The shipped conv-net is given an image that looks like brightfield (dark nuclei on a
        light background), which it inverts but segments poorly (as a run warns).
    """
    # Imported here, so that `import pipeline` (and the command) starts without torch.
    from pipeline.segmentation.methods import (
        brightfield_warnings,
        estimate_field_diameter,
        instance_ids,
        stitching_halo_um,
    )

    if target == "cells":
        return _segment_cells(
            image,
            nuclei,
            dims=dims,
            pixel_size=pixel_size,
            channel=channel,
            cell_channel=cell_channel,
            cell_method=cell_method,
            cell_options=cell_options or {},
            halo_um=halo_um,
            nuclear_options={"method": method, "diameter": diameter, **parameters},
        )
    if target != "nuclei":
        raise ValueError(f"unknown target {target!r}; use 'nuclei' or 'cells'")
    if method not in ("convnet", "classical"):
        raise ValueError(f"unknown segmentation method {method!r}; use 'convnet' or 'classical'")
    execution = {k: parameters.pop(k) for k in _EXECUTION_PARAMETERS if k in parameters}
    compute = ConvNetExecution(**execution)
    segmentation = with_model_postprocessing(
        SegmentationConfig(method=method, **{method: parameters})
    )
    array, dims, sizes = _image_layout(image, dims, pixel_size)
    if "c" in dims:
        array = _take_channel(array, dims, channel)
        dims = dims.replace("c", "")
    lazy = isinstance(array, da.Array)
    frames = array if "t" in dims else array[np.newaxis]
    spatial = dims.replace("t", "")
    lazy_frames = da.asarray(frames)
    for warning in brightfield_warnings(lazy_frames, segmentation):
        warnings.warn(warning, UserWarning, stacklevel=2)
    if method == "convnet" and diameter is None:
        diameter = estimate_field_diameter(lazy_frames, segmentation, compute)
    pixel_sizes = [sizes[d] for d in spatial]

    def attempt(halo_um: dict[str, float]) -> da.Array:
        halo = halo_pixels(halo_um, sizes, spatial) if lazy else (0,) * len(spatial)
        chunks = (
            block_chunks(frames.shape[1:], frames.chunksize[1:], halo)
            if lazy
            else tuple((n,) for n in frames.shape[1:])
        )
        blocks = da.asarray(frames).rechunk(((1,) * frames.shape[0], *chunks))
        ids = instance_ids(
            blocks,
            segmentation,
            pixel_size=pixel_sizes,
            halo=halo,
            diameter_px=diameter,
            compute=compute,
        )
        labels = relabel_consecutive(ids, sorted_ids(ids))
        return _persisted(labels, scheduler=None if lazy else "threads")

    diameter_um = None if method == "classical" else diameter * sizes[spatial[-1]]
    halo_um = stitching_halo_um(HaloConfig(**(halo_um or {})).model_dump(), diameter_um)
    labels = with_halo_retries(attempt, halo_um, TilingConfig().halo_retries)
    if "t" not in dims:
        labels = labels[0]
    return labels if lazy else labels.compute(scheduler="threads")


def _segment_cells(
    image: Any,
    nuclei: Any,
    *,
    dims: str | None,
    pixel_size: Mapping[str, float] | None,
    channel: int,
    cell_channel: int | None,
    cell_method: str | None,
    cell_options: Mapping[str, Any],
    halo_um: Mapping[str, float] | None,
    nuclear_options: dict[str, Any],
) -> Any:
    """:func:`segment` with ``target="cells"``."""
    array, dims, sizes = _image_layout(image, dims, pixel_size)
    if cell_method is None:
        cell_method = "convnet" if nuclei is None and "c" not in dims else "propagation"
    if cell_method == "convnet":
        if nuclei is not None:
            raise ValueError("cell method 'convnet' finds whole cells without nuclei; drop nuclei=")
        return _segment_cells_alone(array, dims, sizes, cell_channel, halo_um, nuclear_options)
    settings = CellParameters(method=cell_method, **cell_options)
    needs_channel = settings.method != "expand"
    if nuclei is None:
        if "c" not in dims:
            raise ValueError("target='cells' on an image without channels needs nuclei= labels")
        nuclei = segment(
            array,
            dims=dims,
            pixel_size=sizes,
            channel=channel,
            halo_um=halo_um,
            **nuclear_options,
        )
    shape = tuple(n for n, d in zip(array.shape, dims, strict=True) if d != "c")
    cell_image = array if needs_channel else None
    if "c" in dims:
        if needs_channel and cell_channel is None:
            raise ValueError(f"cell method {settings.method!r} needs cell_channel=")
        cell_image = _take_channel(array, dims, cell_channel) if needs_channel else None
        dims = dims.replace("c", "")
    if tuple(nuclei.shape) != shape:
        raise ValueError(f"nuclei of shape {tuple(nuclei.shape)} do not match the image {shape}")
    spatial = dims.replace("t", "")
    pixel_sizes = [sizes[d] for d in spatial]
    lazy = isinstance(nuclei, da.Array) or isinstance(array, da.Array)
    frames = nuclei if "t" in dims else nuclei[np.newaxis]
    channel_frames = None
    if cell_image is not None:
        channel_frames = cell_image if "t" in dims else cell_image[np.newaxis]
    if lazy:
        frames = da.asarray(frames)
        halo_um = {"xy": 3 * settings.distance_um, "z": 3 * settings.distance_um, **(halo_um or {})}

        def attempt(halo_um: dict[str, float]) -> da.Array:
            halo = halo_pixels(halo_um, sizes, spatial)
            chunks = block_chunks(frames.shape[1:], frames.chunksize[1:], halo)
            blocks = frames.rechunk(((1,) * frames.shape[0], *chunks))
            channel_blocks = None
            if channel_frames is not None:
                channel_blocks = da.asarray(channel_frames).rechunk(blocks.chunks)
            cells = grow_cells_dask(blocks, channel_blocks, settings, pixel_sizes, halo)
            return _persisted(cells, scheduler=None)

        cells = with_halo_retries(attempt, halo_um, TilingConfig().halo_retries)
    else:
        frames = np.asarray(frames)
        levels = None
        if channel_frames is not None:
            channel_frames = np.asarray(channel_frames)
            levels = cell_channel_levels(channel_frames)
        cells = np.stack(
            [
                grow_cells(
                    frames[k],
                    None if channel_frames is None else channel_frames[k],
                    None if levels is None else levels[k],
                    settings,
                    pixel_sizes,
                )
                for k in range(frames.shape[0])
            ]
        )
    return cells if "t" in dims else cells[0]


def _segment_cells_alone(
    array: Any,
    dims: str,
    sizes: dict[str, float],
    cell_channel: int | None,
    halo_um: Mapping[str, float] | None,
    options: dict[str, Any],
) -> Any:
    """Whole cells of a phase-contrast channel by the whole-cell network, without nuclei."""
    if "c" in dims:
        if cell_channel is None:
            raise ValueError("cell method 'convnet' on an image with channels needs cell_channel=")
        array = _take_channel(array, dims, cell_channel)
        dims = dims.replace("c", "")
    if options.get("method", "convnet") != "convnet":
        raise ValueError("cell method 'convnet' finds cells with the conv-net; drop method=")
    model = options.get("model") or CELLS_MODEL
    return segment(
        array, dims=dims, pixel_size=sizes, halo_um=halo_um, **{**options, "model": model}
    )


def _take_channel(array: Any, dims: str, index: int) -> Any:
    """The image without its ``c`` axis, at channel ``index``."""
    axis = dims.index("c")
    if isinstance(array, np.ndarray):
        return np.take(array, index, axis=axis)
    return array[(slice(None),) * axis + (index,)]


def _persisted(array: da.Array, scheduler: str | None) -> da.Array:
    """``array`` computed and kept (in memory, or on the cluster's workers under a
    distributed client), raising the first error of its tasks, e.g. ``HaloTooSmall``."""
    (array,) = dask.persist(array, scheduler=scheduler)
    raise_first_error(futures_of(array))
    return array
