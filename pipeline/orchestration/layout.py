"""Where a run puts things: each field's group in the output, the tables, the scratch space.

The output mirrors the input plate (``ROW/COLUMN/FIELD``; a lone image is the root itself).
Each field's group holds a copy of the image, ``labels/cells`` (and ``labels/tracks``) and
``tables/cells`` and ``tables/tracks``; a plate's cells of all fields are also in the
Hive-partitioned Parquet dataset ``tables/cells`` at the root. Intermediate global ids go to a
scratch folder beside (not inside) the output, removed when the field is written. Paths are
:func:`pipeline.io.location.location` paths: a local folder or a bucket's key prefix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import zarr
from upath import UPath

from pipeline.io.location import location, remove_tree
from pipeline.io.omezarr import FieldOfView
from pipeline.measurement.wells import WELL_DOUBLING, WELL_GROWTH
from pipeline.orchestration.records import UNIT_OUTPUT_FOLDERS

__all__ = [
    "CELLS",
    "NUCLEI",
    "TRACKS",
    "WELL_DOUBLING",
    "WELL_GROWTH",
    "clear_unit",
    "field_parent",
    "plate_table_path",
    "scratch_folder",
    "wells",
]

CELLS = "cells"
NUCLEI = "nuclei"  # with whole cells, labels/nuclei holds the nuclei and labels/cells the cells
TRACKS = "tracks"


def field_parent(root: zarr.Group, path: str) -> tuple[zarr.Group, str]:
    """The group a field's image group is written into, and its name there ("" at the root)."""
    if not path:
        return root, ""
    well_path, name = path.rsplit("/", 1)
    return root[well_path], name


def clear_unit(output: str | os.PathLike, path: str) -> None:
    """Remove what an earlier, stale or interrupted computation of a unit left behind."""
    folder = location(output) / path if path else location(output)
    if path:
        remove_tree(folder)
        return
    for name in UNIT_OUTPUT_FOLDERS:  # a lone image's output is the root itself
        remove_tree(folder / name)


def scratch_folder(output: str | os.PathLike) -> UPath:
    """Scratch space for a run's intermediate ids, beside (not inside) the output dataset."""
    output = location(output)
    return output.parent / f".{output.name}.scratch"


def plate_table_path(output: str | os.PathLike) -> UPath:
    """The plate-wide cells table (Parquet, partitioned by well)."""
    return location(output) / "tables" / CELLS


def wells(fields: Iterable[FieldOfView]) -> dict[tuple[str, str], list[str]]:
    """Field names per (row, column) of the fields of a plate."""
    found: dict[tuple[str, str], list[str]] = {}
    for fov in fields:
        if fov.well is not None:
            found.setdefault((fov.row, fov.column), []).append(fov.field)
    return found
