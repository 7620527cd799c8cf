"""Compare two outputs of ``pipeline run``: every label array and every Parquet table, exactly.

Usage:
    python benchmarks/compare_outputs.py BEFORE.zarr AFTER.zarr

Used to show that a refactoring changes no result: run the same plate (e.g. ``pipeline demo
--dir DIR``) with the code before and after, then compare. Every array under a ``labels``
group must have the same shape, dtype and values, and every ``*.parquet`` file the same rows,
columns, dtypes and values. Exits 1 at the first difference, naming it.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import zarr


def label_arrays(root: zarr.Group) -> dict[str, zarr.Array]:
    """Every array below a ``labels`` group of an output, by path."""
    with warnings.catch_warnings():  # Parquet folders are not zarr nodes
        warnings.simplefilter("ignore")
        members = dict(root.members(max_depth=None))
    return {
        path: node
        for path, node in members.items()
        if isinstance(node, zarr.Array) and "labels" in path.split("/")
    }


def differences(before: Path, after: Path) -> tuple[list[str], int, int]:
    """What differs between two outputs, and how many label arrays and tables were compared."""
    found = []
    arrays_before = label_arrays(zarr.open_group(before, mode="r"))
    arrays_after = label_arrays(zarr.open_group(after, mode="r"))
    if arrays_before.keys() != arrays_after.keys():
        found.append(f"label arrays differ: {sorted(arrays_before.keys() ^ arrays_after.keys())}")
    for path in sorted(arrays_before.keys() & arrays_after.keys()):
        a, b = arrays_before[path], arrays_after[path]
        if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a[...], b[...]):
            found.append(f"labels differ: {path}")
    tables_before = {p.relative_to(before) for p in before.rglob("*.parquet")}
    tables_after = {p.relative_to(after) for p in after.rglob("*.parquet")}
    if tables_before != tables_after:
        found.append(f"tables differ: {sorted(map(str, tables_before ^ tables_after))}")
    for relative in sorted(tables_before & tables_after):
        try:
            pd.testing.assert_frame_equal(
                pd.read_parquet(before / relative), pd.read_parquet(after / relative)
            )
        except AssertionError as error:
            found.append(f"table differs: {relative}: {str(error).splitlines()[0]}")
    return found, len(arrays_before), len(tables_before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    found, n_arrays, n_tables = differences(args.before, args.after)
    for line in found:
        print(line)
    if found:
        sys.exit(1)
    print(f"identical: {n_arrays} label arrays, {n_tables} Parquet tables")


if __name__ == "__main__":
    main()
