"""The cells of a run's output as an AnnData table, for the scverse stack (scanpy, squidpy).

One row (observation) per cell per frame, in plate order (well, field, ``t``, ``label``):

- ``obs``: where the cell is and who it is: well and field as the plate-wide table names them
  (``A1``, ``0``; empty for a lone image), frame, label, track and parent track, position
  (micrometres and pixels), bounding box, and any text column (e.g. a predicted ``class``);
  its index ``WELL/FIELD/tT/LABEL`` (``image/tT/LABEL`` for a lone image);
- ``X`` (float32): every other numeric column: size, intensities, compartments and ratios,
  CellProfiler features, growth rate, class probabilities;
- ``var["unit"]``: the unit of each measurement (:func:`pipeline.io.tables.unit_of`: ``um^2``,
  ``1/s``, ``px``, ``intensity`` for the image's own grey values, ``1`` for ratios and
  fractions; empty where the name does not say);
- ``uns["pipeline"]``: the output it came from and the package version.

A plate and a lone image give the same layout. ``.h5ad`` files are written with
``AnnData.write_h5ad``, ``.zarr`` folders with ``AnnData.write_zarr``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline._version import __version__
from pipeline.errors import PipelineInputError
from pipeline.io.tables import read_cells, unit_of

__all__ = ["OBS_COLUMNS", "cells_anndata", "export_anndata"]

#: Columns that say where a cell is and which it is (the rest of the numbers are measurements).
OBS_COLUMNS = (
    "well",
    "field",
    "t",
    "label",
    "track_id",
    "parent_track_id",
    "z",
    "y",
    "x",
    "centroid_z_px",
    "centroid_y_px",
    "centroid_x_px",
    "bbox_min_z",
    "bbox_min_y",
    "bbox_min_x",
    "bbox_max_z",
    "bbox_max_y",
    "bbox_max_x",
)


def cells_anndata(results: str | Path):
    """The cells of every field of a run's output ``results`` as an :class:`anndata.AnnData`.

    Raises
    ------
    PipelineInputError
        ``results`` is not an output of ``pipeline run``, or has no cells table.
    """
    import anndata

    table = read_cells(results)
    numeric = [
        c for c in table.columns if c not in OBS_COLUMNS and pd.api.types.is_numeric_dtype(table[c])
    ]
    obs = table.drop(columns=numeric)
    obs = obs.astype({c: "category" for c in ("well", "field") if c in obs})
    obs.index = pd.Index(
        [
            f"{well}/{field}/t{t}/{label}" if well else f"image/t{t}/{label}"
            for well, field, t, label in zip(
                table["well"], table["field"], table["t"], table["label"], strict=True
            )
        ],
        dtype=str,
    )
    var = pd.DataFrame({"unit": [unit_of(c) for c in numeric]}, index=pd.Index(numeric, dtype=str))
    matrix = table[numeric].to_numpy(dtype=np.float32)
    return anndata.AnnData(
        X=matrix,
        obs=obs,
        var=var,
        uns={"pipeline": {"output": str(results), "version": __version__}},
    )


def export_anndata(results: str | Path, out: str | Path) -> Path:
    """Write :func:`cells_anndata` of ``results`` to ``out`` (``.h5ad`` or ``.zarr``).

    Raises
    ------
    PipelineInputError
        ``out`` has another suffix or exists, or ``results`` cannot be read.
    """
    out = Path(out)
    if out.suffix not in (".h5ad", ".zarr"):
        raise PipelineInputError("the export must end in .h5ad or .zarr", out)
    if out.exists():
        raise PipelineInputError("export exists (remove it first)", out)
    table = cells_anndata(results)
    if out.suffix == ".h5ad":
        table.write_h5ad(out)
    else:
        table.write_zarr(out)
    return out
