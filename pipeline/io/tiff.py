"""Read TIFF files and stacks (plain, ImageJ, OME-TIFF) as :class:`SourceImage` for the import
(:mod:`pipeline.io.importing`).

Axes come from OME or ImageJ metadata (as tifffile reports them) or from the user; pixel sizes
from OME ``PhysicalSize*``/``TimeIncrement`` or ImageJ resolution, ``spacing`` and
``finterval``, each overridable by the user. Pixels are read lazily, a few planes per task.
"""

from __future__ import annotations

import math
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import tifffile

from pipeline.errors import InputWarning, PipelineInputError
from pipeline.io.omezarr import (
    _SUPPORTED_DTYPES,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "TIME_TO_SECOND",
    "SourceImage",
    "expand_paths",
    "natural_key",
    "read_tiff",
    "with_overrides",
]

CANONICAL_DIMS = "tczyx"
SCALED_DIMS = "tzyx"
# Files a folder given to the import contributes: TIFF and the vendor formats bioio reads.
IMAGE_SUFFIXES = (".tif", ".tiff", ".nd2", ".czi", ".lif")


# tifffile axis letters with an unambiguous meaning; 'S' (samples, e.g. RGB) is a channel axis.
_TIFFFILE_AXES = {"T": "t", "C": "c", "S": "c", "Z": "z", "Y": "y", "X": "x"}

_LENGTH_TO_MICROMETRE = {
    "m": 1e6,
    "cm": 1e4,
    "mm": 1e3,
    "µm": 1.0,  # micro sign U+00B5
    "μm": 1.0,  # Greek mu U+03BC
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "pm": 1e-6,
    "Å": 1e-4,
    "angstrom": 1e-4,
    "inch": 25400.0,
    "in": 25400.0,
}
#: Time units of OME and ImageJ metadata, in seconds.
TIME_TO_SECOND = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "ms": 1e-3,
    "µs": 1e-6,
    "μs": 1e-6,
    "us": 1e-6,
    "ns": 1e-9,
    "min": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
}
# Units meaning "not calibrated": the value is ignored and the default 1.0 kept.
_UNCALIBRATED_UNITS = {"pixel", "pixels", "px", ""}

# Target size of one lazily read block of consecutive planes.
_BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class SourceImage:
    """Pixels and physical metadata of a TIFF file or stack.

    Attributes
    ----------
    data
        Lazy pixel array, dims in canonical order (a subset of ``tczyx``).
    dims
        Dimension names, e.g. ``"tczyx"``, ``"zyx"``, ``"yx"``.
    scale
        Size of one step per non-channel dim: z, y, x in micrometres, t in seconds when known;
        1.0 where unknown.
    channel_names
        One name per channel, or None when unknown.
    source
        The file (or first file of a stack) the image was read from.
    calibrated
        The dims of ``scale`` whose step the file's metadata or the user gave (the others are
        the default 1.0).
    """

    data: da.Array
    dims: str
    scale: dict[str, float]
    channel_names: tuple[str, ...] | None
    source: str
    calibrated: frozenset[str] = frozenset()


def read_tiff(
    paths: str | Path | Sequence[str | Path],
    *,
    axes: str | None = None,
    pixel_size: Mapping[str, float] | None = None,
    stack_axis: str | None = None,
    channel_names: Sequence[str] | None = None,
) -> SourceImage:
    """Read a TIFF file, or a stack of equally shaped TIFF files, lazily.

    Parameters
    ----------
    paths
        One file, a folder (all ``.tif``/``.tiff`` files inside) or several files. Several
        files are stacked in natural-sort order (``t2`` before ``t10``).
    axes
        Axes of each file's first series in file order, e.g. ``"ZYX"`` (case-insensitive,
        letters from ``tczyx``). Overrides the OME/ImageJ metadata; required when the file
        does not say (tifffile letters ``Q``, ``I`` and others).
    pixel_size
        Step per axis (``t`` in seconds, ``z``, ``y``, ``x`` in micrometres); overrides the
        file's metadata key by key.
    stack_axis
        New axis (``"t"``, ``"z"`` or ``"c"``) along which several files are stacked; None:
        ``"t"``, with a warning (a time series is a guess).
    channel_names
        One name per channel; overrides names from OME metadata.

    Returns
    -------
    SourceImage
        The image with dims in canonical ``tczyx`` order.

    Raises
    ------
    PipelineInputError
        Missing or non-TIFF file, bad axes, files of different shapes, unsupported dtype,
        bad pixel sizes or channel names.
    """
    files = expand_paths(paths)
    user_axes = None if axes is None else _parse_user_axes(axes, files[0])
    images = [_read_one(path, user_axes) for path in files]
    if len(images) > 1 and stack_axis is None:
        warnings.warn(
            f"{len(images)} files stacked as the frames of a time series, in natural-sort order "
            "(say so with --stack-axis t, or stack_axis='t'; z and c stack them otherwise; "
            "--plate makes one field of each)",
            InputWarning,
            stacklevel=2,
        )
    image = images[0] if len(images) == 1 else _stack(images, (stack_axis or "t").lower())
    return with_overrides(image, pixel_size, channel_names)


def with_overrides(
    image: SourceImage,
    pixel_size: Mapping[str, float] | None,
    channel_names: Sequence[str] | None,
) -> SourceImage:
    """``image`` with the user's pixel sizes (per axis, overriding the file's) and channel
    names, checked against its axes and channels."""
    scale = _apply_pixel_size(image, pixel_size)
    names = _apply_channel_names(image, channel_names)
    calibrated = image.calibrated | {key.lower() for key in pixel_size or {}}
    return SourceImage(image.data, image.dims, scale, names, image.source, frozenset(calibrated))


def natural_key(text: str) -> list[int | str]:
    """Sort key of natural order: ``t2`` before ``t10``."""
    """Sort key that orders digit runs by value: "t2" before "t10"."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def expand_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files given, a folder standing for its image files, in natural order."""
    given = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    if not given:
        raise PipelineInputError("no image files given")
    files: list[Path] = []
    for path in given:
        if path.is_dir():
            inside = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            if not inside:
                raise PipelineInputError(
                    f"folder holds no image files ({', '.join(IMAGE_SUFFIXES)})", path
                )
            files.extend(inside)
        elif path.is_file():
            files.append(path)
        else:
            raise PipelineInputError("file not found", path)
    return sorted(files, key=lambda path: natural_key(path.name))


def _parse_user_axes(axes: str, path: Path) -> str:
    dims = axes.lower()
    unknown = sorted(set(dims) - set(CANONICAL_DIMS))
    if unknown:
        raise PipelineInputError(
            f"axes {axes!r} has unknown letter(s) {', '.join(unknown)}; use letters of TCZYX", path
        )
    _check_axes(dims, axes, path)
    return dims


def _check_axes(dims: str, shown: str, path: Path) -> None:
    repeated = sorted({d for d in dims if dims.count(d) > 1})
    if repeated:
        raise PipelineInputError(f"axes {shown!r} repeat {', '.join(repeated)}", path)
    if "y" not in dims or "x" not in dims:
        raise PipelineInputError(f"axes {shown!r} lack Y or X", path)


def _map_tifffile_axes(
    tiff_axes: str, shape: tuple[int, ...], path: Path
) -> tuple[str, tuple[int, ...]]:
    """Canonical letters for tifffile's axes; singleton axes of unknown meaning are dropped."""
    keep = [
        i
        for i, (a, n) in enumerate(zip(tiff_axes, shape, strict=True))
        if a in _TIFFFILE_AXES or n > 1
    ]
    unknown = [tiff_axes[i] for i in keep if tiff_axes[i] not in _TIFFFILE_AXES]
    if unknown:
        raise PipelineInputError(
            f"the file's axes {tiff_axes!r} (shape {shape}) are ambiguous ({''.join(unknown)}); "
            "give the axes explicitly, e.g. axes='TYX'",
            path,
        )
    dims = "".join(_TIFFFILE_AXES[tiff_axes[i]] for i in keep)
    _check_axes(dims, tiff_axes, path)
    return dims, tuple(i for i in range(len(shape)) if i not in keep)


def _read_one(path: Path, user_axes: str | None) -> SourceImage:
    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, OSError) as error:
        raise PipelineInputError(f"not a readable TIFF file ({error})", path) from error
    with tif:
        series = tif.series[0]
        shape = tuple(series.shape)
        dtype = np.dtype(series.dtype)
        if dtype.kind != "b" and dtype not in _SUPPORTED_DTYPES:
            raise PipelineInputError(f"unsupported pixel type {dtype}", path)
        data = _lazy_series(str(path), series)
        if user_axes is None:
            file_dims, dropped = _map_tifffile_axes(series.axes, shape, path)
            data = data.squeeze(axis=dropped) if dropped else data
        else:
            if len(user_axes) != len(shape):
                raise PipelineInputError(
                    f"axes {user_axes.upper()!r} have {len(user_axes)} letters but the image has "
                    f"{len(shape)} dimensions (shape {shape})",
                    path,
                )
            file_dims = user_axes
        metadata_scale, metadata_names = _metadata(tif, path)
    if dtype.kind == "b":
        data = data.astype(np.uint8)
    dims = "".join(d for d in CANONICAL_DIMS if d in file_dims)
    data = data.transpose([file_dims.index(d) for d in dims])
    scale = {d: metadata_scale.get(d, 1.0) for d in dims if d in SCALED_DIMS}
    n_channels = data.shape[dims.index("c")] if "c" in dims else 0
    names = metadata_names if metadata_names and len(metadata_names) == n_channels else None
    calibrated = frozenset(d for d in scale if d in metadata_scale)
    return SourceImage(data, dims, scale, names, str(path), calibrated)


def _lazy_series(path: str, series: tifffile.TiffPageSeries) -> da.Array:
    """Dask array over a series, one block of consecutive pages per task when possible."""
    shape = tuple(series.shape)
    dtype = np.dtype(series.dtype)
    page_shape = tuple(series.keyframe.shape)
    n_leading = len(shape) - len(page_shape)
    leading = shape[:n_leading]
    pages_align = (
        n_leading > 0 and shape[n_leading:] == page_shape and math.prod(leading) == len(series)
    )
    if not pages_align:
        return da.map_blocks(
            _read_block,
            path=path,
            leading_shape=(),
            chunks=tuple((n,) for n in shape),
            dtype=dtype,
            meta=np.empty((0,) * len(shape), dtype),
        )
    plane_bytes = math.prod(page_shape) * dtype.itemsize
    per_block = max(1, min(leading[-1], _BLOCK_BYTES // max(plane_bytes, 1)))
    chunks = (
        *((1,) * n for n in leading[:-1]),
        _even_chunks(leading[-1], per_block),
        *((n,) for n in page_shape),
    )
    return da.map_blocks(
        _read_block,
        path=path,
        leading_shape=leading,
        chunks=chunks,
        dtype=dtype,
        meta=np.empty((0,) * len(shape), dtype),
    )


def _even_chunks(size: int, per_block: int) -> tuple[int, ...]:
    full, rest = divmod(size, per_block)
    return (per_block,) * full + ((rest,) if rest else ())


def _read_block(
    path: str, leading_shape: tuple[int, ...], block_info: dict | None = None
) -> np.ndarray:
    """Read one block of a series; ``leading_shape`` () means the whole series."""
    info = block_info[None]
    if not leading_shape:
        return tifffile.imread(path, series=0).reshape(info["chunk-shape"])
    location = info["array-location"]
    start = tuple(lo for lo, _ in location[: len(leading_shape)])
    first_page = int(np.ravel_multi_index(start, leading_shape))
    n_pages = location[len(leading_shape) - 1][1] - location[len(leading_shape) - 1][0]
    pages = tifffile.imread(path, series=0, key=slice(first_page, first_page + n_pages))
    return pages.reshape(info["chunk-shape"])


def _metadata(
    tif: tifffile.TiffFile, path: Path
) -> tuple[dict[str, float], tuple[str, ...] | None]:
    """Physical step per dim and channel names from OME or ImageJ metadata."""
    if tif.is_ome and tif.ome_metadata:
        return _ome_metadata(tif.ome_metadata, path)
    if tif.is_imagej and tif.imagej_metadata is not None:
        return _imagej_metadata(tif.imagej_metadata, tif.pages.first, path), None
    return {}, None


def _ome_metadata(xml: str, path: Path) -> tuple[dict[str, float], tuple[str, ...] | None]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as error:
        raise PipelineInputError(f"OME-XML metadata cannot be parsed ({error})", path) from error
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return {}, None
    scale: dict[str, float] = {}
    for dim, key in (("x", "PhysicalSizeX"), ("y", "PhysicalSizeY"), ("z", "PhysicalSizeZ")):
        if key in pixels.attrib:
            unit = pixels.get(f"{key}Unit", "µm")
            _set_scale(scale, dim, pixels.get(key), unit, _LENGTH_TO_MICROMETRE, key, path)
    if "TimeIncrement" in pixels.attrib:
        unit = pixels.get("TimeIncrementUnit", "s")
        value = pixels.get("TimeIncrement")
        _set_scale(scale, "t", value, unit, TIME_TO_SECOND, "TimeIncrement", path)
    channels = [e for e in pixels if e.tag.rsplit("}", 1)[-1] == "Channel"]
    names = tuple(c.get("Name", "") for c in channels)
    return scale, names if names and all(names) else None


def _imagej_metadata(metadata: dict, page: tifffile.TiffPage, path: Path) -> dict[str, float]:
    scale: dict[str, float] = {}
    unit = str(metadata.get("unit", "")).replace("\\u00B5", "µ")
    x_per_unit, y_per_unit = page.resolution
    for dim, per_unit in (("x", x_per_unit), ("y", y_per_unit)):
        if per_unit > 0:
            _set_scale(scale, dim, 1.0 / per_unit, unit, _LENGTH_TO_MICROMETRE, "resolution", path)
    if "spacing" in metadata:
        _set_scale(scale, "z", metadata["spacing"], unit, _LENGTH_TO_MICROMETRE, "spacing", path)
    if "finterval" in metadata:
        time_unit = str(metadata.get("tunit", "s"))
        value = metadata["finterval"]
        _set_scale(scale, "t", value, time_unit, TIME_TO_SECOND, "finterval", path)
    return scale


def _set_scale(
    scale: dict[str, float],
    dim: str,
    value: object,
    unit: str,
    factors: Mapping[str, float],
    key: str,
    path: Path,
) -> None:
    """Store ``value`` converted by ``unit``; unknown or uncalibrated units keep the default."""
    if unit.strip().lower() in _UNCALIBRATED_UNITS:
        return
    factor = factors.get(unit.strip()) or factors.get(unit.strip().lower())
    try:
        step = float(value) * factor  # factor None (unknown unit) raises TypeError
    except (TypeError, ValueError):
        warnings.warn(
            f"{path}: cannot read {key}={value!r} {unit}; the {dim} step is left at 1.0, "
            "give the pixel size explicitly",
            InputWarning,
            stacklevel=2,
        )
        return
    if math.isfinite(step) and step > 0:
        scale[dim] = step


def _stack(images: list[SourceImage], stack_axis: str) -> SourceImage:
    first = images[0]
    if stack_axis not in "tzc" or len(stack_axis) != 1:
        raise PipelineInputError(f"stack axis must be t, z or c, not {stack_axis!r}", first.source)
    if stack_axis in first.dims:
        raise PipelineInputError(
            f"cannot stack files along {stack_axis!r}: each file already has axes {first.dims!r}",
            first.source,
        )
    for image in images[1:]:
        if image.dims != first.dims or image.data.shape != first.data.shape:
            raise PipelineInputError(
                f"files differ in shape: {first.dims} {first.data.shape} in {first.source} but "
                f"{image.dims} {image.data.shape}",
                image.source,
            )
        if image.data.dtype != first.data.dtype:
            raise PipelineInputError(
                f"files differ in pixel type: {first.data.dtype} in {first.source} but "
                f"{image.data.dtype}",
                image.source,
            )
    dims = "".join(d for d in CANONICAL_DIMS if d in first.dims or d == stack_axis)
    data = da.stack([image.data for image in images], axis=dims.index(stack_axis))
    scale = {d: first.scale.get(d, 1.0) for d in dims if d in SCALED_DIMS}
    names = None if stack_axis == "c" else first.channel_names
    return SourceImage(data, dims, scale, names, first.source, first.calibrated)


def _apply_pixel_size(
    image: SourceImage, pixel_size: Mapping[str, float] | None
) -> dict[str, float]:
    scale = dict(image.scale)
    for key, value in (pixel_size or {}).items():
        dim = key.lower()
        if dim not in scale:
            raise PipelineInputError(
                f"pixel size given for axis {key!r} but the image has axes {image.dims!r}",
                image.source,
            )
        if not (math.isfinite(value) and value > 0):
            raise PipelineInputError(
                f"pixel size for axis {key!r} must be a positive number, not {value!r}",
                image.source,
            )
        scale[dim] = float(value)
    return scale


def _apply_channel_names(
    image: SourceImage, channel_names: Sequence[str] | None
) -> tuple[str, ...] | None:
    if channel_names is None:
        return image.channel_names
    n_channels = image.data.shape[image.dims.index("c")] if "c" in image.dims else 1
    if len(channel_names) != n_channels:
        raise PipelineInputError(
            f"{len(channel_names)} channel names given for {n_channels} channel(s)", image.source
        )
    return tuple(channel_names)
