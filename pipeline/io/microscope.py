"""Read microscope files (ND2, CZI, LIF, multi-scene OME-TIFF) through bioio and its plugins.

Every scene of a file (a stage position, a LIF series, a CZI scene, an OME image) becomes one
:class:`~pipeline.io.tiff.SourceImage`, with the pixel sizes, z step and frame interval the
file's metadata gives (bioio's ``physical_pixel_sizes`` in micrometres; the frame interval
from the reader, else from the OME metadata's ``TimeIncrement``) and its channel names. Axes
of one plane (z, t) are dropped; pixels are read lazily, one plane per task, by bioio.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da

from pipeline.errors import PipelineInputError
from pipeline.io.omezarr import _SUPPORTED_DTYPES
from pipeline.io.tiff import TIME_TO_SECOND, SourceImage, with_overrides

__all__ = ["VENDOR_SUFFIXES", "read_scenes"]

#: Suffixes read through bioio whatever their content (TIFF files go through it only when
#: they hold several OME images).
VENDOR_SUFFIXES = (".nd2", ".czi", ".lif")

_PLUGINS = {".nd2": "bioio-nd2", ".czi": "bioio-czi", ".lif": "bioio-lif"}


def read_scenes(
    path: str | Path,
    *,
    pixel_size: Mapping[str, float] | None = None,
    channel_names: Sequence[str] | None = None,
) -> list[SourceImage]:
    """Every scene of a microscope file, lazily, with its calibration.

    Parameters
    ----------
    path
        An ND2, CZI or LIF file, or an OME-TIFF (any number of images).
    pixel_size
        Step per axis (``t`` in seconds, ``z``, ``y``, ``x`` in micrometres), overriding the
        file's in every scene.
    channel_names
        One name per channel, overriding the file's in every scene.

    Returns
    -------
    list of SourceImage
        One per scene, in the file's order; dims ``tczyx`` without the axes of size 1 among
        t and z; ``source`` is ``path#scene-name``.

    Raises
    ------
    PipelineInputError
        Missing or unreadable file, no reader for its format, unsupported pixel type.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineInputError("no such file", path)
    from bioio import BioImage

    try:
        image = BioImage(path)
        scenes = list(image.scenes)
    except Exception as error:  # each plugin raises its own errors
        plugin = _PLUGINS.get(path.suffix.lower())
        hint = f"; is {plugin} installed?" if plugin else ""
        raise PipelineInputError(
            f"cannot read this file ({type(error).__name__}: {error}{hint})", path
        ) from error
    images = []
    for index, name in enumerate(scenes):
        image.set_scene(index)
        scene = _scene_image(image, index, f"{path}#{name}")
        images.append(with_overrides(scene, pixel_size, channel_names))
    return images


def _scene_image(image: Any, index: int, source: str) -> SourceImage:
    """The current scene of a bioio ``BioImage`` as a :class:`SourceImage`."""
    data: da.Array = image.dask_data  # always TCZYX
    if data.dtype not in _SUPPORTED_DTYPES:
        raise PipelineInputError(f"unsupported pixel type {data.dtype}", source)
    dims = "tczyx"
    for dim in ("z", "t"):
        if data.shape[dims.index(dim)] == 1:
            data = data.squeeze(axis=dims.index(dim))
            dims = dims.replace(dim, "")
    sizes = image.physical_pixel_sizes
    given = {"z": sizes.Z, "y": sizes.Y, "x": sizes.X, "t": _frame_interval(image, index)}
    calibrated = {d for d, v in given.items() if d in dims and _is_step(v)}
    scale = {d: float(given[d]) if d in calibrated else 1.0 for d in dims if d != "c"}
    names = tuple(str(name) for name in image.channel_names)
    if len(names) != data.shape[dims.index("c")]:
        names = None
    return SourceImage(data, dims, scale, names, source, frozenset(calibrated))


def _frame_interval(image: Any, index: int) -> float | None:
    """Seconds between frames: the reader's ``time_interval`` (seconds in bioio), else the
    OME metadata's ``TimeIncrement`` of the scene, else None."""
    interval = image.time_interval
    if interval is not None:
        return float(getattr(interval, "magnitude", interval))
    try:
        pixels = image.ome_metadata.images[index].pixels
    except Exception:  # readers without OME metadata raise their own errors
        return None
    if pixels.time_increment is None:
        return None
    unit = getattr(pixels.time_increment_unit, "value", "s")
    return float(pixels.time_increment) * TIME_TO_SECOND.get(unit, math.nan)


def _is_step(value: float | None) -> bool:
    """A usable calibration: finite and positive (readers give 0 or None when the file has
    none)."""
    return value is not None and math.isfinite(float(value)) and float(value) > 0
