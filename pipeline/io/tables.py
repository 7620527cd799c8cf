"""Per-cell tables as Parquet inside OME-Zarr image groups, referenced the way Fractal/ngio do.

A table ``NAME`` of an image lives in the zarr group ``IMAGE/tables/NAME`` whose attributes say what
it is (``type``, ``region``, ``instance_key``, ``backend``); the rows are in ``table.parquet`` in
that group's folder. The ``tables`` group lists its tables in its ``tables`` attribute.
A plate-wide dataset holds the same rows for every field, partitioned by well (Hive layout
``well=B03/``) so that ``pandas.read_parquet(path)`` or pyarrow datasets read it whole.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import pandas as pd
import zarr
from upath import UPath

from pipeline.errors import PipelineInputError
from pipeline.io.location import is_remote, location, store_location
from pipeline.io.omezarr import FieldOfView, open_plate

__all__ = [
    "field_cells",
    "read_cells",
    "read_plate_table",
    "read_table",
    "unit_of",
    "write_plate_table_part",
    "write_table",
]

TABLE_FILE = "table.parquet"

# Units of the table columns, from their names. Positions and sizes are in micrometres and times
# in seconds because images are read in those units (pipeline.io.omezarr); t counts frames.
_UNITS = (
    (r"^(t|start_t|end_t|n_frames|length|n_gaps)$", "frame"),
    (r"^[zyx]$", "um"),
    (r"^(displacement|path_length)$", "um"),
    (r"^mean_speed$", "um/s"),
    (r"^area$", "um^2"),
    (r"^volume$", "um^3"),
    (r"^(n_pixels|centroid_[zyx]_px|bbox_(min|max)_[zyx])$", "px"),
    (r"^growth_rate$", "1/s"),
    (r"^(ratio_|class_probability_|straightness$)", "1"),
    (r"^intensity_", "intensity"),
    (r"^AreaShape_(Area|Perimeter|.*Diameter|.*Radius|.*AxisLength|.*Feret.*)$", "px"),
    (r"^Neighbors_.*Distance_um$", "um"),
    (r"^Neighbors_PercentTouching", "%"),
    (r"^Granularity_", "%"),
)


def unit_of(column: str) -> str:
    """The unit of a column of the cells or tracks table, from its name ('' if unknown)."""
    return next((unit for pattern, unit in _UNITS if re.search(pattern, column)), "")


def write_table(
    image_group: zarr.Group,
    name: str,
    table: pd.DataFrame,
    *,
    table_type: str,
    region: str | None = None,
    instance_key: str | None = None,
) -> UPath:
    """Write ``table`` as ``IMAGE/tables/NAME`` (Parquet), replacing an existing table of that name;
    the group's attribute ``units`` gives the unit of each column whose name says it
    (:func:`unit_of`).

    Parameters
    ----------
    image_group
        The OME-Zarr image group the table belongs to.
    name
        Table name, e.g. ``"cells"``.
    table
        The rows; the index is not stored.
    table_type
        ``"feature_table"`` for per-object measurements, or another type name.
    region
        Path of the label image the rows describe, relative to the table group
        (``"../../labels/cells"``).
    instance_key
        Column holding the label id of each row.

    Returns
    -------
    UPath
        The Parquet file written (in a local folder or a bucket).
    """
    tables = image_group.require_group("tables")
    listed = list(tables.attrs.get("tables", []))
    group = tables.require_group(name)
    attrs: dict = {"type": table_type, "table_version": "1", "backend": "parquet"}
    if region is not None:
        attrs["region"] = {"path": region}
    if instance_key is not None:
        attrs["instance_key"] = instance_key
        attrs["index_key"] = instance_key
    attrs["units"] = {column: unit for column in table.columns if (unit := unit_of(column))}
    group.attrs.update(attrs)
    path = store_location(group) / TABLE_FILE
    _write_parquet(table, path)
    if name not in listed:
        tables.attrs["tables"] = [*listed, name]
    return path


def read_table(image_group: zarr.Group, name: str) -> pd.DataFrame:
    """Read the table ``NAME`` written by :func:`write_table`."""
    path = store_location(image_group) / "tables" / name / TABLE_FILE
    with path.open("rb") as handle:
        return pd.read_parquet(handle)


def _write_parquet(table: pd.DataFrame, path: UPath) -> None:
    if not is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        table.to_parquet(handle, index=False)


def write_plate_table_part(dataset: UPath, well: str, field: str, table: pd.DataFrame) -> UPath:
    """Write one field's rows into the plate-wide dataset at ``dataset/well=WELL/FIELD.parquet``."""
    path = location(dataset) / f"well={well}" / f"field_{field}.parquet"
    _write_parquet(table.drop(columns=["well"], errors="ignore"), path)
    return path


def read_plate_table(dataset: UPath, columns: list[str] | None = None) -> pd.DataFrame:
    """Read the plate-wide dataset (only ``columns`` if given, ``well`` included); the
    ``well`` column comes from the partition names."""
    dataset = location(dataset)
    return pd.read_parquet(
        dataset.path, filesystem=dataset.fs, partitioning="hive", columns=columns
    )


def field_cells(
    results: str | os.PathLike, field: FieldOfView, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """A field's cells table (all columns, or ``columns`` where present), with ``well`` and
    ``field`` first, sorted by ``t`` and ``label``.

    Raises
    ------
    PipelineInputError
        The field has no cells table.
    """
    root = zarr.open_group(str(results), mode="r")
    try:
        cells = read_table(root[field.path] if field.path else root, "cells")
    except (KeyError, FileNotFoundError):
        raise PipelineInputError(
            "field has no cells table", str(location(results) / field.path)
        ) from None
    if columns is not None:
        cells = cells[[column for column in columns if column in cells.columns]]
    cells = cells.sort_values(["t", "label"], ignore_index=True)
    return cells.assign(well=field.well or "", field=field.path)[["well", "field", *cells.columns]]


def read_cells(results: str | os.PathLike) -> pd.DataFrame:
    """Every cell of a run's output as one table, the same for a plate and a lone image:
    ``well`` (e.g. ``A1``; empty for a lone image) and ``field`` (``0``; empty) first, then
    the cells table's columns, in plate order and by ``t`` and ``label`` within a field.

    Raises
    ------
    PipelineInputError
        ``results`` is not an output of ``pipeline run``, or a field has no cells table.
    """
    results = location(results)
    return pd.concat(
        [
            field_cells(results, fov).assign(
                well=(fov.row or "") + (fov.column or ""), field=fov.field or ""
            )
            for fov in open_plate(str(results)).fields
        ],
        ignore_index=True,
    )
