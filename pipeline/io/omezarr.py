"""Read OME-Zarr 0.4 (zarr v2) and 0.5 (zarr v3) images and HCS plates; write OME-Zarr 0.5.

Reading gives one :class:`FieldOfView` per image: an ``xarray.DataArray`` on a lazy dask array
whose chunks are the zarr chunks, with physical coordinates taken from the
``coordinateTransformations``. Every chunk read goes through :class:`ChunkReader`, which turns
any read or decode failure into a :class:`~pipeline.errors.CorruptChunkError` naming the chunk's
storage key and the array path.

Writing always produces OME-Zarr 0.5 on zarr v3 (default zstd compression) that passes
``ome-zarr-models validate``:

- :func:`create_root` makes the output group;
- :func:`write_image` writes a multiscale image (levels by 2x2 block mean in y/x, z kept);
- :func:`write_labels` writes a label image with exactly the image's levels and transforms;
- :func:`write_well` and :func:`write_plate_metadata` add the HCS metadata.

Default chunks when writing: t=1, c=1, z=min(Z, 16), y=min(Y, 256), x=min(X, 256).
Every written level keeps the full-resolution translation, so that label levels (sampled at
``floor(i * factor)``) and image levels share the exact same coordinateTransformations.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize
from zarr.core.sync import sync

from pipeline.errors import CorruptChunkError, PipelineInputError
from pipeline.io.location import is_remote, is_url, is_web_url, location, remove_tree

__all__ = [
    "ChunkReader",
    "FieldOfView",
    "Plate",
    "PyramidLevel",
    "create_root",
    "open_image",
    "open_labels",
    "open_plate",
    "write_image",
    "write_labels",
    "write_plate_metadata",
    "write_well",
]

AXIS_ORDER = ("t", "c", "z", "y", "x")
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
_AXIS_UNITS = {"t": "second", "z": "micrometer", "y": "micrometer", "x": "micrometer"}
# OME-NGFF axis units (UDUNITS-2 names) in the units the product works in (_AXIS_UNITS): an
# image in nanometres or minutes is read in micrometres and seconds; other units stay as given.
_TO_WORKING_UNIT = {
    "angstrom": 1e-4,
    "picometer": 1e-6,
    "nanometer": 1e-3,
    "micrometer": 1.0,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
    "nanosecond": 1e-9,
    "microsecond": 1e-6,
    "millisecond": 1e-3,
    "second": 1.0,
    "minute": 60.0,
    "hour": 3600.0,
    "day": 86400.0,
}
_DEFAULT_CHUNKS = {"t": 1, "c": 1, "z": 16, "y": 256, "x": 256}
# Store chunks equal to the fill value too (zarr-python skips them by default), so that a
# missing chunk in an output is always a loss that readers report, never an empty region.
_EVERY_CHUNK = {"write_empty_chunks": True}
MissingChunks = Literal["auto", "error", "fill"]
NonFinite = Literal["error", "zero"]

#: Arrays of more chunks than this are checked for how many they store (ChunkReader.check_extent).
SPARSE_CHECK_CHUNKS = 10_000
#: ... and refused when fewer than this fraction of their chunks exist.
SPARSE_STORED_FRACTION = 0.01
_SUPPORTED_DTYPES = frozenset(
    np.dtype(name)
    for name in "uint8 uint16 uint32 uint64 int8 int16 int32 int64 float32 float64".split()
)
_WRITE_VERSION = "0.5"


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PyramidLevel:
    """One resolution level of a multiscale image.

    ``scale`` and ``translation`` are per dim name and already combine the dataset's
    transforms with any multiscale-level transform.
    """

    path: str
    shape: tuple[int, ...]
    scale: dict[str, float]
    translation: dict[str, float]
    reader: ChunkReader = field(repr=False, compare=False)

    def dask_array(self) -> da.Array:
        """The level as a Dask array on its storage chunks, read through :attr:`reader`."""
        reader = self.reader
        return da.from_array(
            reader,
            chunks=reader.chunks,
            asarray=False,
            fancy=False,
            meta=np.empty((0,) * reader.ndim, dtype=reader.dtype),
            name=f"read-{tokenize(reader.location, reader.shape, reader.chunks, reader.missing)}",
        )


@dataclass(frozen=True)
class FieldOfView:
    """One image (a field of a well, or a lone image) with its full-resolution data.

    ``data`` has dims a subset of (t, c, z, y, x) in that order, coordinate ``c`` holds the
    channel names and t/z/y/x hold physical coordinates, in micrometres and seconds wherever
    the file names a length or time unit (nanometres, minutes, ... are converted);
    ``data.attrs["units"]`` maps dims to units. An image without a ``c`` axis has one channel,
    named by omero metadata or "c0".
    """

    dataset_path: str
    path: str
    row: str | None
    column: str | None
    field: str | None
    data: xr.DataArray
    levels: tuple[PyramidLevel, ...]
    channel_names: tuple[str, ...]

    @property
    def well(self) -> str | None:
        """Well path "row/column" (e.g. "B/3"), None for a lone image."""
        if self.row is None or self.column is None:
            return None
        return f"{self.row}/{self.column}"

    @property
    def pixel_size(self) -> dict[str, float]:
        """Full-resolution voxel size for the spatial dims present (z, y, x)."""
        return {
            dim: size for dim, size in self.levels[0].scale.items() if _AXIS_TYPES[dim] == "space"
        }


@dataclass(frozen=True)
class Plate:
    """An HCS plate, or a lone multiscale image seen as a plate with one field."""

    path: str
    version: str
    name: str | None
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    fields: tuple[FieldOfView, ...]
    is_plate: bool


# --------------------------------------------------------------------------------------------
# Chunk reader
# --------------------------------------------------------------------------------------------


class ChunkReader:
    """Picklable array-like over one zarr array that reports unreadable chunks.

    Used with ``da.from_array(reader, chunks=reader.chunks, asarray=False)``. The zarr array
    is opened lazily in each process. Any exception while reading is re-raised as
    :class:`~pipeline.errors.CorruptChunkError` naming the chunk's storage key (from zarr's
    own chunk key encoding) and the array path.

    Parameters
    ----------
    store_root
        Filesystem path of the zarr hierarchy root.
    array_path
        Path of the array inside the hierarchy, e.g. "B/3/0/0".
    missing
        A chunk absent from the store: ``"error"``: raises :class:`CorruptChunkError` (a lost
        file must not read as an empty image); ``"fill"``: reads as the fill value, as zarr
        does (for writers that skip empty chunks); ``"auto"``: reads as the fill value where
        it lies in an empty region, else raises. A region of absent chunks (connected along
        ``spatial_axes``) is empty when it borders at least one stored chunk and every pixel
        of the stored chunks along its faces equals the fill value: zarr-python, which does not
        store chunks equal to the fill value, leaves exactly such regions, while a lost file in
        an image of cells borders on signal.
    spatial_axes
        The axes along which absent chunks neighbour each other (``"auto"``).
    non_finite
        Floating-point arrays: ``"error"``: a chunk holding NaN or infinite values raises
        :class:`~pipeline.errors.PipelineInputError` naming it and how many; ``"zero"``: they
        read as 0 (e.g. NaN padding of registered or deskewed images).
    """

    def __init__(
        self,
        store_root: str,
        array_path: str,
        missing: MissingChunks = "fill",
        non_finite: NonFinite = "error",
        spatial_axes: tuple[int, ...] = (),
    ) -> None:
        self.store_root = store_root
        self.array_path = array_path
        self.missing = missing
        self.non_finite = non_finite
        self.spatial_axes = spatial_axes
        array = self._array()
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.chunks: tuple[int, ...] = tuple(array.chunks)
        self._stored_chunks: tuple[int, ...] = tuple(array.shards or array.chunks)
        self._metadata = array.metadata

    @property
    def location(self) -> str:
        """Filesystem path (or URL) of the array."""
        return os.path.join(self.store_root, self.array_path)

    def _array(self) -> zarr.Array:
        cached = self.__dict__.get("_cached_array")
        if cached is None:
            cached = zarr.open_array(self.store_root, path=self.array_path, mode="r")
            self.__dict__["_cached_array"] = cached
        return cached

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_cached_array", None)
        state.pop("_empty_cells", None)
        return state

    def __getitem__(self, key: Any) -> np.ndarray:
        if self.missing != "fill":
            for cell in self._grid_cells(key):
                if self._stored(cell) or (self.missing == "auto" and self._in_empty_region(cell)):
                    continue
                reason = " inside the image (a lost file?)" if self.missing == "auto" else ""
                raise CorruptChunkError(
                    f"chunk {self._metadata.encode_chunk_key(cell)} is missing{reason} (if "
                    "the writer skips empty chunks, set input.missing_chunks: fill, or "
                    "missing_chunks='fill' in Python)",
                    self.location,
                )
        try:
            values = np.asarray(self._array()[key])
        except Exception as error:
            chunk_key = self._failing_chunk_key(key)
            raise CorruptChunkError(
                f"cannot read chunk {chunk_key} ({type(error).__name__}: {error})", self.location
            ) from error
        if values.dtype.kind == "f":
            values = self._finite(values, key)
        return values

    def check_extent(self) -> None:
        """Refuse an array that declares far more than it stores, before any graph of it is
        built: more than :data:`SPARSE_CHECK_CHUNKS` chunks of which under
        :data:`SPARSE_STORED_FRACTION` exist. Planning such a field (a truncated write, or a
        huge declared canvas with data in one corner) takes the client minutes and gigabytes.
        Not checked over HTTP, where the stored chunks cannot be listed.

        Raises
        ------
        PipelineInputError
            Naming the declared shape, the chunks stored and what to do.
        """
        array = self._array()
        declared = array.nchunks
        if declared <= SPARSE_CHECK_CHUNKS or is_web_url(self.store_root):
            return
        stored = array.nchunks_initialized
        if stored < SPARSE_STORED_FRACTION * declared:
            raise PipelineInputError(
                f"the image declares shape {self.shape} in {declared:,} chunks but stores only "
                f"{stored:,} of them ({100 * stored / declared:.2g} %): a truncated write, or a "
                "canvas far larger than its data; crop it to where the data is",
                self.location,
            )

    def filled_chunks(self) -> list[str]:
        """Storage keys of the absent chunks that read as the fill value (none with
        ``"error"``; every absent one with ``"fill"``; those in empty regions with ``"auto"``)."""
        if self.missing == "error":
            return []
        grid = [range(-(-n // s)) for n, s in zip(self.shape, self._stored_chunks, strict=True)]
        absent = [cell for cell in itertools.product(*grid) if not self._stored(cell)]
        if self.missing == "auto":
            absent = [cell for cell in absent if self._in_empty_region(cell)]
        return [self._metadata.encode_chunk_key(cell) for cell in absent]

    def _stored(self, cell: tuple[int, ...]) -> bool:
        key = self._metadata.encode_chunk_key(cell)
        if is_url(self.store_root):  # one request to the store (HTTP: a HEAD)
            store_key = f"{self.array_path}/{key}" if self.array_path else key
            try:
                return bool(sync(self._array().store.exists(store_key)))
            except Exception as error:  # refused (403), or still failing after the retries
                raise CorruptChunkError(
                    f"cannot read chunk {key} ({type(error).__name__}: {error})", self.location
                ) from error
        return os.path.exists(os.path.join(self.location, key))

    def _in_empty_region(self, cell: tuple[int, ...]) -> bool:
        """Whether the absent chunk ``cell`` lies in an empty region (see the class notes)."""
        verdicts = self.__dict__.setdefault("_empty_cells", {})
        if cell not in verdicts:
            region, empty = self._absent_region(cell)
            verdicts.update(dict.fromkeys(region, empty))
        return verdicts[cell]

    def _absent_region(self, start: tuple[int, ...]) -> tuple[set[tuple[int, ...]], bool]:
        """The absent chunks connected to ``start`` and whether the stored chunks around them
        hold only the fill value along the shared faces (and there is at least one)."""
        fill = self._array().fill_value
        fill = 0 if fill is None else fill
        grid = [-(-n // s) for n, s in zip(self.shape, self._stored_chunks, strict=True)]
        region, queue, bordered = {start}, [start], False
        while queue:
            cell = queue.pop()
            for axis in self.spatial_axes:
                for step in (-1, 1):
                    other = cell[axis] + step
                    if not 0 <= other < grid[axis]:
                        continue
                    neighbour = (*cell[:axis], other, *cell[axis + 1 :])
                    if neighbour in region:
                        continue
                    if not self._stored(neighbour):
                        region.add(neighbour)
                        queue.append(neighbour)
                        continue
                    bordered = True
                    if np.any(self._face(neighbour, axis, step) != fill):
                        return region, False
        return region, bordered

    def _face(self, cell: tuple[int, ...], axis: int, step: int) -> np.ndarray:
        """The pixels of stored chunk ``cell`` on its face towards ``-step`` along ``axis``."""
        region = [
            slice(c * s, min((c + 1) * s, n))
            for c, s, n in zip(cell, self._stored_chunks, self.shape, strict=True)
        ]
        edge = region[axis].start if step > 0 else region[axis].stop - 1
        region[axis] = slice(edge, edge + 1)
        return np.asarray(self._array()[tuple(region)])

    def _finite(self, values: np.ndarray, key: Any) -> np.ndarray:
        """``values`` checked for NaN and infinities: refused, or those read as 0."""
        bad = ~np.isfinite(values)
        if not bad.any():
            return values
        if self.non_finite == "zero":
            return np.where(bad, values.dtype.type(0), values)
        region = self._metadata.encode_chunk_key(self._grid_cells(key)[0])
        raise PipelineInputError(
            f"{int(bad.sum())} NaN or infinite pixel(s) in chunk {region} (to read them as 0, "
            "set input.non_finite: zero, or non_finite='zero' in Python)",
            self.location,
        )

    def _failing_chunk_key(self, key: Any) -> str:
        """Storage key of the first chunk in ``key`` that cannot be read."""
        grid_cells = self._grid_cells(key)
        for cell in grid_cells:
            region = tuple(
                slice(c * stored, min((c + 1) * stored, size))
                for c, stored, size in zip(cell, self._stored_chunks, self.shape, strict=True)
            )
            try:
                self._array()[region]
            except Exception:
                return self._metadata.encode_chunk_key(cell)
        return self._metadata.encode_chunk_key(grid_cells[0])

    def _grid_cells(self, key: Any) -> list[tuple[int, ...]]:
        """Grid positions of the stored chunks (or shards) that ``key`` touches."""
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        index_ranges = []
        for index, size, stored in zip(key, self.shape, self._stored_chunks, strict=True):
            if isinstance(index, slice):
                start, stop, _ = index.indices(size)
            elif isinstance(index, int | np.integer):
                start = int(index) % size
                stop = start + 1
            else:
                start, stop = 0, size
            index_ranges.append(range(start // stored, max(start, stop - 1) // stored + 1))
        return list(itertools.product(*index_ranges))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def open_plate(
    path: str | Path, *, missing_chunks: MissingChunks = "auto", non_finite: NonFinite = "error"
) -> Plate:
    """Open an OME-Zarr HCS plate, or a lone multiscale image as a one-field plate.

    Parameters
    ----------
    path
        Root of an OME-Zarr 0.4 (zarr v2) or 0.5 (zarr v3) plate or image.
    missing_chunks
        A chunk absent from the store: ``"auto"``: reads as the fill value where it lies in
        an empty region (every stored pixel around it equals the fill value: zarr-python does
        not store such chunks), else raises :class:`~pipeline.errors.CorruptChunkError` naming
        it; ``"error"``: always raises; ``"fill"``: always reads as the fill value (for writers
        that skip chunks equal to it). The product's own outputs store every chunk.
    non_finite
        Floating-point images: ``"error"``: reading NaN or infinite pixels raises
        :class:`~pipeline.errors.PipelineInputError` naming the chunk; ``"zero"``: they read
        as 0.

    Returns
    -------
    Plate
        Plate metadata and every field of every well, wells in row-major plate order.

    Raises
    ------
    PipelineInputError
        The path is missing, not a zarr group, not OME-Zarr, or its metadata is unsupported.
    """
    root_path, root = _open_root(path)
    metadata, version = _ome_metadata(root)
    if "plate" in metadata:
        return _read_plate(root_path, root, metadata["plate"], version, missing_chunks, non_finite)
    if "multiscales" in metadata:
        field = _read_field(
            root_path, root, "", missing_chunks=missing_chunks, non_finite=non_finite
        )
        return Plate(
            path=root_path,
            version=version,
            name=metadata["multiscales"][0].get("name"),
            rows=(),
            columns=(),
            fields=(field,),
            is_plate=False,
        )
    raise PipelineInputError("not an OME-Zarr image or plate", root_path)


def open_image(
    path: str | Path,
    *,
    image_path: str = "",
    missing_chunks: MissingChunks = "auto",
    non_finite: NonFinite = "error",
) -> FieldOfView:
    """Open one OME-Zarr multiscale image.

    Parameters
    ----------
    path
        Root of the zarr hierarchy (a plate or a lone image).
    image_path
        Path of the image group inside the root, e.g. "B/3/0"; "" for a lone image. A path
        of three parts is read as row/column/field.
    missing_chunks, non_finite
        As for :func:`open_plate`.

    Returns
    -------
    FieldOfView
        The image with lazy level-0 data.
    """
    root_path, root = _open_root(path)
    image_path = image_path.strip("/")
    parts = image_path.split("/") if image_path else []
    row, column, field = parts if len(parts) == 3 else (None, None, None)
    return _read_field(
        root_path,
        root,
        image_path,
        row=row,
        column=column,
        field=field,
        missing_chunks=missing_chunks,
        non_finite=non_finite,
    )


def open_labels(
    path: str | Path, *, image_path: str = "", name: str, missing_chunks: MissingChunks = "error"
) -> FieldOfView:
    """Open the label image ``labels/NAME`` of an image, parsed like any multiscale image.

    Parameters
    ----------
    path
        Root of the zarr hierarchy (a plate or a lone image).
    image_path
        Path of the image group inside the root; "" for a lone image.
    name
        The label image's name, e.g. "cells".
    missing_chunks
        As for :func:`open_plate`.

    Raises
    ------
    PipelineInputError
        The image has no label image of that name, or its metadata is not valid.
    """
    image_path = image_path.strip("/")
    label_path = f"{image_path}/labels/{name}" if image_path else f"labels/{name}"
    root_path, root = _open_root(path)
    try:
        node = root[label_path]
    except KeyError:
        node = None
    if not isinstance(node, zarr.Group):
        location = os.path.join(root_path, image_path) if image_path else root_path
        raise PipelineInputError(f"image has no label image labels/{name}", location)
    return _read_field(root_path, root, label_path, missing_chunks=missing_chunks)


def _open_root(path: str | os.PathLike) -> tuple[str, zarr.Group]:
    if is_url(path):
        root_path = str(path).rstrip("/")
        try:
            return root_path, zarr.open_group(root_path, mode="r")
        except Exception as error:
            hint = ""
            if type(error).__name__ == "NoCredentialsError":
                hint = "; a public bucket is read without them when FSSPEC_S3_ANON=true is set"
            raise PipelineInputError(
                f"cannot open a zarr group here ({type(error).__name__}: {error}{hint})", root_path
            ) from error
    root_path = os.path.abspath(os.fspath(path))
    if not os.path.exists(root_path):
        raise PipelineInputError("path does not exist", root_path)
    try:
        group = zarr.open_group(root_path, mode="r")
    except Exception as error:
        raise PipelineInputError("not a zarr group", root_path) from error
    return root_path, group


def _ome_metadata(group: zarr.Group) -> tuple[dict[str, Any], str]:
    """OME metadata of a group (0.5: under "ome"; 0.4: top level) and its version."""
    attrs = group.attrs.asdict()
    if "ome" in attrs:
        metadata = attrs["ome"]
        return metadata, str(metadata.get("version", _WRITE_VERSION))
    version = None
    if attrs.get("multiscales"):
        version = attrs["multiscales"][0].get("version")
    for key in ("plate", "well"):
        if key in attrs:
            version = attrs[key].get("version", version)
    return attrs, str(version or "0.4")


def _child_group(root: zarr.Group, root_path: str, child: str, what: str) -> zarr.Group:
    if not child:
        return root
    if any(part in (".", "..", "") for part in child.split("/")):
        raise PipelineInputError(
            f"{what} path '{child}' in the metadata leaves its plate or is not a plain path",
            root_path,
        )
    try:
        node = root[child]
    except KeyError:
        node = None
    if not isinstance(node, zarr.Group):
        raise PipelineInputError(
            f"{what} '{child}' listed in the metadata is missing", os.path.join(root_path, child)
        )
    return node


def _read_plate(
    root_path: str,
    root: zarr.Group,
    plate: dict[str, Any],
    version: str,
    missing_chunks: MissingChunks,
    non_finite: NonFinite,
) -> Plate:
    rows = tuple(str(row["name"]) for row in plate.get("rows", []))
    columns = tuple(str(column["name"]) for column in plate.get("columns", []))
    wells = sorted(
        plate.get("wells", []),
        key=lambda well: (well.get("rowIndex", 0), well.get("columnIndex", 0)),
    )
    fields = []
    for well in wells:
        well_path = str(well["path"]).strip("/")
        if well_path.count("/") != 1:
            raise PipelineInputError(
                f"well path '{well_path}' is not 'row/column'", os.path.join(root_path, well_path)
            )
        row, column = well_path.split("/")
        well_group = _child_group(root, root_path, well_path, "well")
        well_metadata, _ = _ome_metadata(well_group)
        if "well" not in well_metadata:
            raise PipelineInputError(
                "well group has no OME-Zarr well metadata", os.path.join(root_path, well_path)
            )
        for image in well_metadata["well"].get("images", []):
            field = str(image["path"]).strip("/")
            fields.append(
                _read_field(
                    root_path,
                    root,
                    f"{well_path}/{field}",
                    row=row,
                    column=column,
                    field=field,
                    missing_chunks=missing_chunks,
                    non_finite=non_finite,
                )
            )
    return Plate(
        path=root_path,
        version=version,
        name=plate.get("name"),
        rows=rows,
        columns=columns,
        fields=tuple(fields),
        is_plate=True,
    )


def _read_field(
    root_path: str,
    root: zarr.Group,
    image_path: str,
    *,
    row: str | None = None,
    column: str | None = None,
    field: str | None = None,
    missing_chunks: MissingChunks,
    non_finite: NonFinite = "error",
) -> FieldOfView:
    group = _child_group(root, root_path, image_path, "image")
    location = os.path.join(root_path, image_path) if image_path else root_path
    metadata, _ = _ome_metadata(group)
    if not metadata.get("multiscales"):
        raise PipelineInputError("not an OME-Zarr image or plate", location)
    multiscale = metadata["multiscales"][0]
    dims = _parse_axes(multiscale.get("axes", []), location)
    units = {
        axis["name"]: axis["unit"]
        for axis in multiscale.get("axes", [])
        if isinstance(axis, dict) and axis.get("unit")
    }
    factors = [_TO_WORKING_UNIT.get(units.get(dim, ""), 1.0) for dim in dims]
    for dim in dims:
        if units.get(dim) in _TO_WORKING_UNIT and dim in _AXIS_UNITS:
            units[dim] = _AXIS_UNITS[dim]
    global_transforms = multiscale.get("coordinateTransformations") or []

    levels = []
    for dataset in multiscale.get("datasets", []):
        dataset_path = str(dataset["path"]).strip("/")
        array_path = f"{image_path}/{dataset_path}" if image_path else dataset_path
        try:
            reader = ChunkReader(
                root_path,
                array_path,
                missing_chunks,
                non_finite,
                tuple(i for i, dim in enumerate(dims) if dim in "zyx"),
            )
        except Exception as error:
            raise PipelineInputError(
                f"cannot open multiscale level '{dataset_path}' ({type(error).__name__})",
                os.path.join(location, dataset_path),
            ) from error
        if reader.ndim != len(dims):
            raise PipelineInputError(
                f"array has {reader.ndim} dims but the axes are {list(dims)}", reader.location
            )
        if reader.dtype not in _SUPPORTED_DTYPES:
            raise PipelineInputError(
                f"unsupported dtype {reader.dtype}; expected one of "
                f"{', '.join(sorted(str(dtype) for dtype in _SUPPORTED_DTYPES))}",
                reader.location,
            )
        scale, translation = _compose_transforms(
            [*(dataset.get("coordinateTransformations") or []), *global_transforms],
            len(dims),
            location,
        )
        scale = [value * factor for value, factor in zip(scale, factors, strict=True)]
        translation = [value * factor for value, factor in zip(translation, factors, strict=True)]
        levels.append(
            PyramidLevel(
                path=dataset_path,
                shape=reader.shape,
                scale=dict(zip(dims, scale, strict=True)),
                translation=dict(zip(dims, translation, strict=True)),
                reader=reader,
            )
        )
    if not levels:
        raise PipelineInputError("multiscale image has no datasets", location)

    n_channels = levels[0].shape[dims.index("c")] if "c" in dims else 1
    channel_names = _channel_names(metadata.get("omero"), n_channels)
    array = levels[0].dask_array()
    coords: dict[str, Any] = {}
    for dim, size in zip(dims, levels[0].shape, strict=True):
        if dim == "c":
            coords[dim] = list(channel_names)
        else:
            coords[dim] = np.arange(size) * levels[0].scale[dim] + levels[0].translation[dim]
    data = xr.DataArray(array, dims=dims, coords=coords, attrs={"units": units})
    return FieldOfView(
        dataset_path=root_path,
        path=image_path,
        row=row,
        column=column,
        field=field,
        data=data,
        levels=tuple(levels),
        channel_names=channel_names,
    )


def _parse_axes(axes: Sequence[Any], location: str) -> tuple[str, ...]:
    names = [axis.get("name") if isinstance(axis, dict) else axis for axis in axes]
    positions = [AXIS_ORDER.index(name) if name in AXIS_ORDER else -1 for name in names]
    ordered = all(a < b for a, b in itertools.pairwise(positions))
    if not names or -1 in positions or not ordered:
        raise PipelineInputError(
            f"unsupported axes {names}; expected a subset of t, c, z, y, x in that order",
            location,
        )
    return tuple(names)


def _compose_transforms(
    transforms: Sequence[dict[str, Any]], ndim: int, location: str
) -> tuple[list[float], list[float]]:
    """Combine a chain of scale/translation transforms (applied in order) into one."""
    scale = [1.0] * ndim
    translation = [0.0] * ndim
    for transform in transforms:
        kind = transform.get("type")
        if kind == "identity":
            continue
        values = transform.get(kind)
        if kind not in ("scale", "translation") or values is None or len(values) != ndim:
            raise PipelineInputError(f"unsupported coordinate transformation {transform}", location)
        for axis, value in enumerate(values):
            if kind == "scale":
                scale[axis] *= float(value)
                translation[axis] *= float(value)
            else:
                translation[axis] += float(value)
    return scale, translation


def _channel_names(omero: dict[str, Any] | None, n_channels: int) -> tuple[str, ...]:
    channels = (omero or {}).get("channels") or []
    labels = [channel.get("label") for channel in channels]
    if len(labels) == n_channels and all(labels):
        return tuple(str(label) for label in labels)
    return tuple(f"c{index}" for index in range(n_channels))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def create_root(path: str | Path, *, overwrite: bool = False) -> zarr.Group:
    """Create the root zarr v3 group of an output dataset.

    Parameters
    ----------
    path
        Where to create it.
    overwrite
        Replace an existing dataset at ``path``; otherwise an existing path is an error.

    Returns
    -------
    zarr.Group
        The new, empty group.
    """
    where = location(path)
    if not overwrite and where.exists():
        raise PipelineInputError("output already exists", str(where))
    if overwrite and is_remote(where):  # zarr's "w" on a bucket leaves the old keys
        remove_tree(where)
    return zarr.open_group(str(where), mode="w", zarr_format=3)


def write_image(
    parent: zarr.Group,
    name: str,
    data: Any,
    dims: str | Sequence[str],
    scale: Mapping[str, float],
    *,
    translation: Mapping[str, float] | None = None,
    channel_names: Sequence[str] | None = None,
    n_levels: int = 1,
    chunks: Mapping[str, int] | None = None,
    shard_px: int | None = None,
    level_shapes: Sequence[tuple[int, ...]] | None = None,
    compute: bool = True,
) -> zarr.Group | tuple[zarr.Group, list]:
    """Write a multiscale OME-Zarr 0.5 image as ``parent/name``.

    Parameters
    ----------
    parent
        Group to write into (the root, or a well group).
    name
        Name (or path) of the new image group; an existing group there is replaced.
    data
        Full-resolution numpy, dask or xarray array, or a list of arrays, one per level, that
        are written as they are (to copy a pyramid made by another tool).
    dims
        Dim names of ``data``, a subset of "tczyx" in that order, e.g. "tcyx".
    scale
        Full-resolution pixel size per dim (micrometres, seconds); missing dims get 1.0.
    translation
        Physical origin per dim; missing dims get 0.0. Omitted from metadata when None.
    channel_names
        One label per channel; written as omero metadata with a window from the dtype.
    n_levels
        Number of levels to build from a single array: y and x are halved per level (size
        rounded up, 2x2 block mean over the pixels present, rounded and cast back to the
        dtype), z and the rest are kept.
    chunks
        Zarr chunk size per dim; defaults t=1, c=1, z=16, y=256, x=256, clipped to the shape.
    shard_px
        Zarr v3 sharding: each file (shard) holds the chunks of up to this many pixels in y
        and x (a multiple of the chunk size; one chunk in t, c and z), so a plane of 2048 x
        2048 in 256 x 256 chunks is one file instead of 64. None: one file per chunk.
    level_shapes
        Exact shape of every level. With a single array, each level must halve y/x of the
        level above (rounded up or down) or keep them; it overrides ``n_levels``. With a
        sequence of arrays, the arrays must have these shapes.
    compute
        Write now; when False, return the group and a list of dask Delayed store tasks.

    Returns
    -------
    zarr.Group or tuple of (zarr.Group, list of Delayed)
        The image group (and the pending writes when ``compute=False``).
    """
    dims = _check_dims(dims)
    if isinstance(data, list | tuple):
        levels = _given_levels(data, dims, level_shapes)
    else:
        levels = _built_levels(_as_dask(data), dims, n_levels, level_shapes)
    if levels[0].dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {levels[0].dtype}")
    if channel_names is not None:
        n_channels = levels[0].shape[dims.index("c")] if "c" in dims else 1
        if len(channel_names) != n_channels:
            raise ValueError(f"{len(channel_names)} channel names for {n_channels} channels")

    level_scales = _level_scales([level.shape for level in levels], dims, scale)
    group = parent.create_group(name, overwrite=True)
    chunk_sizes = {**_DEFAULT_CHUNKS, **(chunks or {})}
    sources, targets, datasets = [], [], []
    for index, (level, level_scale) in enumerate(zip(levels, level_scales, strict=True)):
        level_chunks = tuple(
            max(1, min(chunk_sizes[dim], size)) for dim, size in zip(dims, level.shape, strict=True)
        )
        level_shards = _shards(level.shape, level_chunks, dims, shard_px)
        targets.append(
            group.create_array(
                str(index),
                shape=level.shape,
                dtype=level.dtype,
                chunks=level_chunks,
                shards=level_shards,
                dimension_names=dims,
                fill_value=0,
                config=_EVERY_CHUNK,
            )
        )
        sources.append(level.rechunk(level_shards or level_chunks))  # a task writes whole files
        transforms = _transforms(level_scale, dims, translation)
        datasets.append({"path": str(index), "coordinateTransformations": transforms})
    metadata: dict[str, Any] = {
        "version": _WRITE_VERSION,
        "multiscales": [{"name": name, "axes": _axes(dims), "datasets": datasets}],
    }
    if channel_names is not None:
        metadata["omero"] = _omero(channel_names, levels[0].dtype)
    group.attrs["ome"] = metadata
    return _store(group, sources, targets, compute)


def write_labels(
    image_group: zarr.Group, name: str, labels: Any, *, compute: bool = True
) -> zarr.Group | tuple[zarr.Group, list]:
    """Write a label image as ``image_group/labels/name`` matching the image's pyramid.

    The label image has the image's dims without "c", exactly the image's number of levels,
    level shapes and coordinateTransformations, and the image's chunks. Lower levels sample
    the full-resolution labels at index ``floor(i * factor)`` per axis, where factor is the
    level's scale over the full-resolution scale.

    Parameters
    ----------
    image_group
        An OME-Zarr 0.5 image group (as written by :func:`write_image`).
    name
        Name of the label image, added to the ``labels`` group metadata.
    labels
        Full-resolution integer numpy or dask array, shaped like level 0 without "c".
    compute
        Write now; when False, return the group and a list of dask Delayed store tasks.

    Returns
    -------
    zarr.Group or tuple of (zarr.Group, list of Delayed)
        The label image group (and the pending writes when ``compute=False``).
    """
    multiscale = image_group.attrs["ome"]["multiscales"][0]
    dims = tuple(axis["name"] for axis in multiscale["axes"])
    keep = [axis for axis, dim in enumerate(dims) if dim != "c"]
    label_dims = tuple(dims[axis] for axis in keep)
    image_arrays = [image_group[dataset["path"]] for dataset in multiscale["datasets"]]
    full = _as_dask(labels)
    expected = tuple(image_arrays[0].shape[axis] for axis in keep)
    if full.shape != expected:
        raise ValueError(f"labels shape {full.shape} does not match the image shape {expected}")
    if full.dtype not in _SUPPORTED_DTYPES or full.dtype.kind not in "iu":
        raise ValueError(f"labels must have an integer dtype, got {full.dtype}")

    labels_group = image_group.require_group("labels")
    names = list(labels_group.attrs.get("ome", {}).get("labels", []))
    if name not in names:
        names.append(name)
    labels_group.attrs["ome"] = {"version": _WRITE_VERSION, "labels": names}

    label_group = labels_group.create_group(name, overwrite=True)
    base_scale = _scale_of(multiscale["datasets"][0], len(dims), keep)
    sources, targets, datasets = [], [], []
    for dataset, image_array in zip(multiscale["datasets"], image_arrays, strict=True):
        shape = tuple(image_array.shape[axis] for axis in keep)
        level_chunks = tuple(image_array.chunks[axis] for axis in keep)
        level_shards = image_array.shards and tuple(image_array.shards[axis] for axis in keep)
        level_scale = _scale_of(dataset, len(dims), keep)
        factors = [s / s0 for s, s0 in zip(level_scale, base_scale, strict=True)]
        level = _nearest_level(full, shape, factors)
        sources.append(level.rechunk(level_shards or level_chunks))
        targets.append(
            label_group.create_array(
                dataset["path"],
                shape=shape,
                dtype=full.dtype,
                chunks=level_chunks,
                shards=level_shards,
                dimension_names=label_dims,
                fill_value=0,
                config=_EVERY_CHUNK,
            )
        )
        datasets.append(
            {
                "path": dataset["path"],
                "coordinateTransformations": [
                    {"type": t["type"], t["type"]: [t[t["type"]][axis] for axis in keep]}
                    for t in dataset["coordinateTransformations"]
                ],
            }
        )
    label_multiscale: dict[str, Any] = {
        "name": name,
        "axes": [multiscale["axes"][axis] for axis in keep],
        "datasets": datasets,
    }
    label_group.attrs["ome"] = {
        "version": _WRITE_VERSION,
        "multiscales": [label_multiscale],
        "image-label": {"version": _WRITE_VERSION, "source": {"image": "../../"}},
    }
    return _store(label_group, sources, targets, compute)


def write_well(root: zarr.Group, row: str, column: str, fields: Sequence[str]) -> zarr.Group:
    """Create (or update) the well group ``root/row/column`` listing its field images.

    Parameters
    ----------
    root
        Plate root group.
    row, column
        Well row and column names, e.g. "B" and "3".
    fields
        Paths of the field image groups inside the well, e.g. ["0", "1"].

    Returns
    -------
    zarr.Group
        The well group; write each field with ``write_image(well, field, ...)``.
    """
    well = root.require_group(f"{row}/{column}")
    well.attrs["ome"] = {
        "version": _WRITE_VERSION,
        "well": {"images": [{"path": str(field)} for field in fields]},
    }
    return well


def write_plate_metadata(
    root: zarr.Group,
    *,
    name: str,
    rows: Sequence[str],
    columns: Sequence[str],
    wells: Sequence[tuple[str, str]],
    field_count: int,
) -> None:
    """Write OME-Zarr 0.5 plate metadata on the root group.

    Parameters
    ----------
    root
        Plate root group.
    name
        Plate name.
    rows, columns
        Row and column names of the plate layout, in order.
    wells
        (row, column) of every well that holds images.
    field_count
        Maximum number of fields per well.
    """
    rows = [str(row) for row in rows]
    columns = [str(column) for column in columns]
    root.attrs["ome"] = {
        "version": _WRITE_VERSION,
        "plate": {
            "version": _WRITE_VERSION,
            "name": name,
            "rows": [{"name": row} for row in rows],
            "columns": [{"name": column} for column in columns],
            "wells": [
                {
                    "path": f"{row}/{column}",
                    "rowIndex": rows.index(str(row)),
                    "columnIndex": columns.index(str(column)),
                }
                for row, column in wells
            ],
            "field_count": int(field_count),
        },
    }


def _check_dims(dims: str | Sequence[str]) -> tuple[str, ...]:
    dims = tuple(dims)
    positions = [AXIS_ORDER.index(dim) if dim in AXIS_ORDER else -1 for dim in dims]
    if not dims or -1 in positions or any(a >= b for a, b in itertools.pairwise(positions)):
        raise ValueError(f"dims {dims} must be a subset of t, c, z, y, x in that order")
    return dims


def _as_dask(data: Any) -> da.Array:
    """Dask view of a numpy, dask or xarray array (xarray is unwrapped, never loaded)."""
    if isinstance(data, xr.DataArray):
        data = data.data
    return data if isinstance(data, da.Array) else da.from_array(np.asarray(data))


def _given_levels(
    data: Sequence[Any], dims: tuple[str, ...], level_shapes: Sequence[tuple[int, ...]] | None
) -> list[da.Array]:
    levels = [_as_dask(level) for level in data]
    shapes = [level.shape for level in levels]
    if level_shapes is not None and [tuple(shape) for shape in level_shapes] != shapes:
        raise ValueError(f"level shapes {shapes} differ from level_shapes {list(level_shapes)}")
    if any(len(shape) != len(dims) for shape in shapes):
        raise ValueError(f"every level must have the {len(dims)} dims {dims}")
    return [level.astype(levels[0].dtype, copy=False) for level in levels]


def _built_levels(
    full: da.Array,
    dims: tuple[str, ...],
    n_levels: int,
    level_shapes: Sequence[tuple[int, ...]] | None,
) -> list[da.Array]:
    if full.ndim != len(dims):
        raise ValueError(f"data has {full.ndim} dims but dims is {dims}")
    if level_shapes is None:
        level_shapes = [full.shape]
        for _ in range(n_levels - 1):
            level_shapes.append(
                tuple(
                    math.ceil(size / 2) if dim in "yx" else size
                    for dim, size in zip(dims, level_shapes[-1], strict=True)
                )
            )
    level_shapes = [tuple(shape) for shape in level_shapes]
    if level_shapes[0] != full.shape:
        raise ValueError(f"level_shapes[0] {level_shapes[0]} differs from data {full.shape}")
    levels = [full]
    for shape in level_shapes[1:]:
        levels.append(_block_mean_level(levels[-1], dims, shape))
    return levels


def _block_mean_level(array: da.Array, dims: tuple[str, ...], shape: tuple[int, ...]) -> da.Array:
    """Halve y/x of ``array`` to ``shape`` by 2x2 block mean (edge pixels repeat when odd)."""
    pad_width, factors = [], {}
    for axis, (dim, size, target) in enumerate(zip(dims, array.shape, shape, strict=True)):
        if target == size:
            pad_width.append((0, 0))
        elif dim in "yx" and target in (size // 2, math.ceil(size / 2)):
            factors[axis] = 2
            pad_width.append((0, max(0, 2 * target - size)))
        else:
            raise ValueError(f"cannot make level shape {shape} from {array.shape}")
    if not factors:
        return array
    padded = da.pad(array, pad_width, mode="edge") if any(p for _, p in pad_width) else array
    block_chunks = tuple(
        2 * max(1, chunk[0] // 2) if axis in factors else chunk[0]
        for axis, chunk in enumerate(padded.chunks)
    )
    mean = da.coarsen(np.mean, padded.rechunk(block_chunks), factors, trim_excess=True)
    if np.issubdtype(array.dtype, np.integer):
        mean = da.round(mean)
    return mean.astype(array.dtype)


def _level_scales(
    shapes: Sequence[tuple[int, ...]], dims: tuple[str, ...], scale: Mapping[str, float]
) -> list[dict[str, float]]:
    """Per-level scale: an axis halved (rounded either way) doubles, otherwise scales by ratio."""
    current = {dim: float(scale.get(dim, 1.0)) for dim in dims}
    scales = [dict(current)]
    for previous, shape in itertools.pairwise(shapes):
        for dim, before, after in zip(dims, previous, shape, strict=True):
            if after in (before // 2, math.ceil(before / 2)) and after != before:
                current[dim] *= 2.0
            else:
                current[dim] *= before / after
        scales.append(dict(current))
    return scales


def _transforms(
    scale: Mapping[str, float], dims: tuple[str, ...], translation: Mapping[str, float] | None
) -> list[dict[str, Any]]:
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [scale[dim] for dim in dims]}]
    if translation is not None:
        transforms.append(
            {"type": "translation", "translation": [float(translation.get(d, 0.0)) for d in dims]}
        )
    return transforms


def _axes(dims: tuple[str, ...]) -> list[dict[str, str]]:
    axes = []
    for dim in dims:
        axis = {"name": dim, "type": _AXIS_TYPES[dim]}
        if dim in _AXIS_UNITS:
            axis["unit"] = _AXIS_UNITS[dim]
        axes.append(axis)
    return axes


def _omero(channel_names: Sequence[str], dtype: np.dtype) -> dict[str, Any]:
    if np.issubdtype(dtype, np.integer):
        low, high = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
    else:
        low, high = 0.0, 1.0
    window = {"min": low, "max": high, "start": low, "end": high}
    return {
        "channels": [
            {"label": str(label), "color": "FFFFFF", "active": True, "window": dict(window)}
            for label in channel_names
        ]
    }


def _scale_of(dataset: Mapping[str, Any], ndim: int, axes: Sequence[int]) -> list[float]:
    scale, _ = _compose_transforms(dataset["coordinateTransformations"], ndim, dataset["path"])
    return [scale[axis] for axis in axes]


def _nearest_level(full: da.Array, shape: tuple[int, ...], factors: Sequence[float]) -> da.Array:
    """Sample ``full`` at index floor(i * factor) per axis to get ``shape``."""
    level = full
    for axis, (size, full_size, factor) in enumerate(zip(shape, full.shape, factors, strict=True)):
        if size == full_size and factor == 1.0:
            continue
        index = np.minimum(np.floor(np.arange(size) * factor + 1e-9).astype(np.intp), full_size - 1)
        level = da.take(level, index, axis=axis)
    return level


def _shards(
    shape: tuple[int, ...], chunks: tuple[int, ...], dims: Sequence[str], shard_px: int | None
) -> tuple[int, ...] | None:
    """Shard shape: whole chunks up to ``shard_px`` pixels (at most the array) in y and x, one
    chunk along the other axes; None without sharding or where a shard would be one chunk."""
    if shard_px is None:
        return None
    shards = tuple(
        chunk * max(1, min(shard_px // chunk, -(-size // chunk))) if dim in "yx" else chunk
        for dim, size, chunk in zip(dims, shape, chunks, strict=True)
    )
    return None if shards == tuple(chunks) else shards


def _store(
    group: zarr.Group, sources: list[da.Array], targets: list[zarr.Array], compute: bool
) -> zarr.Group | tuple[zarr.Group, list]:
    if compute:
        da.store(sources, targets, lock=False)
        return group
    return group, [da.store(sources, targets, lock=False, compute=False)]
