"""Read what the report shows from a run's output: records, tables, the level of each field."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import zarr

from pipeline.errors import PipelineInputError
from pipeline.io import tables
from pipeline.io.location import location
from pipeline.io.omezarr import FieldOfView, Plate, open_image, open_plate
from pipeline.orchestration.records import ATTRIBUTE, RUN_ATTRIBUTE

CELLS = "cells"


TRACK_COLUMNS = frozenset({"t", "x", "y", "track_id", "parent_track_id"})


COUNT_COLUMNS = ["row", "column", "well", "fields", "cells_first", "cells_last"]


def choose_level(
    shapes: Sequence[Sequence[int]], dims: Sequence[str], max_pixels: int
) -> tuple[int, int]:
    """Pick the pyramid level (and a y/x stride) to show an image at most ``max_pixels`` wide.

    Parameters
    ----------
    shapes
        Shapes of the pyramid levels, finest first.
    dims
        Dim names of the level shapes (containing ``y`` and ``x``).
    max_pixels
        Largest size in y and x to read.

    Returns
    -------
    tuple of (int, int)
        Index of the finest level whose y and x sizes are both at most ``max_pixels``, and
        stride 1; when none is that small, the coarsest level and the smallest stride that
        brings it within ``max_pixels``.

    Raises
    ------
    ValueError
        ``max_pixels`` is below 1.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    y, x = list(dims).index("y"), list(dims).index("x")
    for index, shape in enumerate(shapes):
        if max(shape[y], shape[x]) <= max_pixels:
            return index, 1
    coarsest = shapes[-1]
    return len(shapes) - 1, math.ceil(max(coarsest[y], coarsest[x]) / max_pixels)


def open_output(output: str | os.PathLike) -> tuple[zarr.Group, Plate | None]:
    """The output's root group and its plate (None when no field completed, so none is listed)."""
    try:
        plate = open_plate(output)
    except PipelineInputError:  # a pipeline output none of whose fields completed lists none
        if not (location(output) / "zarr.json").is_file():
            raise
        root = zarr.open_group(str(output), mode="r")
        if not run_record(root):
            raise
        return root, None
    return zarr.open_group(plate.path, mode="r"), plate


def run_record(root: zarr.Group) -> dict[str, Any]:
    """The run's ledger on the output's root (empty when there is none)."""
    record = root.attrs.get(RUN_ATTRIBUTE)
    return dict(record) if isinstance(record, dict) and "input" in record else {}


def unfinished_units(run: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """State and error of each unit the ledger does not give as done, by field path."""
    return {
        str(path): (str(unit.get("state")), unit.get("error"))
        for path, unit in dict(run.get("units", {})).items()
        if isinstance(unit, dict) and unit.get("state") != "done"
    }


def field_group(root: zarr.Group, fov: FieldOfView) -> zarr.Group:
    return root[fov.path] if fov.path else root


def cells_table(root: zarr.Group, fov: FieldOfView) -> pd.DataFrame | None:
    """The field's ``tables/cells``, or None when the field has none."""
    folder = location(fov.dataset_path) / fov.path / "tables" / CELLS
    if not (folder / tables.TABLE_FILE).is_file():
        return None
    return tables.read_table(field_group(root, fov), CELLS)


def completion_record(group: zarr.Group) -> dict[str, Any]:
    """A field's completion record (empty when there is none)."""
    record = group.attrs.get(ATTRIBUTE)
    return dict(record) if isinstance(record, dict) else {}


def frame_counts(cells: pd.DataFrame, n_frames: int) -> tuple[int, int]:
    """Cells at the first and at the last timepoint of a field."""
    t = cells["t"].to_numpy()
    return int(np.count_nonzero(t == 0)), int(np.count_nonzero(t == n_frames - 1))


def well_cell_counts(output: str | Path) -> pd.DataFrame:
    """Cells per well at the first and the last timepoint, for every position of the plate.

    Only fields whose ``pipeline`` status is ``complete`` and that have a ``tables/cells`` count.

    Parameters
    ----------
    output
        A plate written by :func:`pipeline.run`.

    Returns
    -------
    pandas.DataFrame
        One row per plate position (rows x columns, row-major): ``row``, ``column``, ``well``
        (``"A/1"``), ``fields`` (fields counted), ``cells_first`` and ``cells_last`` (nullable
        integers, missing where the well has no results). Empty for a lone image.

    Raises
    ------
    PipelineInputError
        ``output`` is not an OME-Zarr output of the pipeline.
    """
    root, plate = open_output(output)
    if plate is None or not plate.is_plate:
        return pd.DataFrame(columns=COUNT_COLUMNS)
    return plate_well_counts(root, plate)


def _completed_cells(root: zarr.Group, plate: Plate) -> Iterator[tuple[FieldOfView, pd.DataFrame]]:
    """Each complete field of the plate with its cells table (fields without one left out)."""
    for fov in plate.fields:
        if completion_record(field_group(root, fov)).get("status") != "complete":
            continue
        cells = cells_table(root, fov)
        if cells is not None:
            yield fov, cells


def plate_well_counts(root: zarr.Group, plate: Plate) -> pd.DataFrame:
    """:func:`well_cell_counts` of an opened plate."""
    totals: dict[str, list[int]] = {}
    for fov, cells in _completed_cells(root, plate):
        first, last = frame_counts(cells, fov.data.sizes.get("t", 1))
        total = totals.setdefault(str(fov.well), [0, 0, 0])
        total[0] += 1
        total[1] += first
        total[2] += last
    records = []
    for row in plate.rows:
        for column in plate.columns:
            fields, first, last = totals.get(f"{row}/{column}", [0, pd.NA, pd.NA])
            records.append((row, column, f"{row}/{column}", fields, first, last))
    counts = pd.DataFrame.from_records(records, columns=COUNT_COLUMNS)
    return counts.astype({"fields": "int64", "cells_first": "Int64", "cells_last": "Int64"})


def plate_class_fractions(root: zarr.Group, plate: Plate) -> pd.DataFrame | None:
    """Share of each well's cells (all timepoints) in each class, one column per class and a
    row per well in plate order (NaN where no results); None when no cell was classified."""
    counts: dict[str, pd.Series] = {}
    for fov, cells in _completed_cells(root, plate):
        if "class" not in cells.columns:
            continue
        found = cells["class"].astype(str).value_counts()
        counts[str(fov.well)] = counts.get(str(fov.well), pd.Series(dtype="int64")).add(
            found, fill_value=0
        )
    if not counts:
        return None
    wells = [f"{row}/{column}" for row in plate.rows for column in plate.columns]
    table = pd.DataFrame(counts).T.fillna(0.0).reindex(wells)  # wells without results: NaN
    totals = table.sum(axis=1, min_count=1)
    fractions = table.div(totals.where(totals > 0), axis=0)
    return fractions[sorted(fractions.columns)]


def channel_index(fov: FieldOfView, channel: int | str) -> int:
    names = list(fov.channel_names)
    if isinstance(channel, str):
        if channel not in names:
            raise ValueError(f"no channel {channel!r} in {fov.path or 'the image'}: {names}")
        return names.index(channel)
    if not -len(names) <= channel < len(names):
        raise ValueError(f"channel {channel} out of range for {len(names)} channels")
    return channel % len(names)


@dataclass(frozen=True)
class FieldView:
    """How a field is shown: its image and label arrays at one level, with a y/x stride."""

    image: da.Array
    image_dims: tuple[str, ...]
    labels: da.Array | None
    labels_dims: tuple[str, ...]
    channel: int
    stride: int
    extent: tuple[float, float, float, float]

    def image_plane(self, t: int) -> np.ndarray:
        """The 2D image at frame ``t`` (maximum projection over z)."""
        return _plane(self.image, self.image_dims, t, self.channel, self.stride)

    def labels_plane(self, t: int) -> np.ndarray:
        """The 2D labels at frame ``t`` (maximum projection over z)."""
        if self.labels is None:
            raise ValueError("the field has no labels at the level shown")
        return _plane(self.labels, self.labels_dims, t, 0, self.stride)


def _plane(array: da.Array, dims: Sequence[str], t: int, channel: int, stride: int) -> np.ndarray:
    """One frame and channel of a level array, y/x strided, projected over z chunk by chunk."""
    index = tuple(
        t
        if dim == "t"
        else channel
        if dim == "c"
        else slice(None, None, stride)
        if dim in "yx"
        else slice(None)
        for dim in dims
    )
    plane = array[index]
    if "z" in dims:
        plane = plane.max(axis=0)
    return plane.compute(scheduler="threads")


def field_view(fov: FieldOfView, channel: int, max_pixels: int) -> FieldView:
    """The level (and stride) of ``fov`` to show, with its labels ``cells`` at the same level."""
    dims = tuple(str(dim) for dim in fov.data.dims)
    index, stride = choose_level([level.shape for level in fov.levels], dims, max_pixels)
    level = fov.levels[index]
    sizes = dict(zip(dims, level.shape, strict=True))
    labels, labels_dims = None, tuple(dim for dim in dims if dim != "c")
    if (location(fov.dataset_path) / fov.path / "labels" / CELLS).is_dir():
        prefix = f"{fov.path}/" if fov.path else ""
        cells = open_image(fov.dataset_path, image_path=f"{prefix}labels/{CELLS}")
        labels_dims = tuple(str(dim) for dim in cells.data.dims)
        for label_level in cells.levels:
            label_sizes = dict(zip(labels_dims, label_level.shape, strict=True))
            if all(label_sizes[dim] == sizes[dim] for dim in "yx"):
                labels = label_level.dask_array()
                break
    step = {dim: level.scale.get(dim, 1.0) * stride for dim in "yx"}
    origin = {dim: level.translation.get(dim, 0.0) for dim in "yx"}
    n = {dim: math.ceil(sizes[dim] / stride) for dim in "yx"}
    extent = (
        origin["x"] - step["x"] / 2,
        origin["x"] + (n["x"] - 0.5) * step["x"],
        origin["y"] + (n["y"] - 0.5) * step["y"],
        origin["y"] - step["y"] / 2,
    )
    return FieldView(level.dask_array(), dims, labels, labels_dims, channel, stride, extent)


def spread_timepoints(n_frames: int, count: int) -> list[int]:
    """``count`` frames spread evenly from the first to the last (fewer when there are fewer)."""
    return sorted({int(t) for t in np.round(np.linspace(0, n_frames - 1, max(1, count)))})
