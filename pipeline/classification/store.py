"""Single-cell crops of a whole run's output, cut on the Dask workers into a chunked store.

``RESULTS/crops`` is a zarr group beside the plate's wells: the array ``data`` (N x C+1 x S x S,
float32, the channels asked for then the cell's mask) and the Parquet table ``index.parquet``
(one row per crop: ``well``, ``field``, ``t``, ``label``, ``track_id`` where the run tracked,
``centroid_y``, ``centroid_x``, ``area``, ``border``), which joins the cells tables on
``(well, field, t, label)``. The crops are numbered in plate order (fields, then frames, then
labels) from the cells tables before any image is read, so block ``k`` of the array is exactly
crops ``k * block`` to ``(k + 1) * block - 1``: every task writes whole chunks of its own, and
holds at most one block of crops and the frames they come from, however large the plate.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from pipeline.classification.crops import cut_crops
from pipeline.errors import PipelineInputError
from pipeline.io import tables
from pipeline.io.omezarr import FieldOfView, Plate, open_image, open_labels, open_plate

__all__ = ["CropSettings", "plan_crops", "read_crops", "write_crops"]

CROPS = "crops"
INDEX_FILE = "index.parquet"
_KEYS = ["well", "field", "t", "label"]


@dataclass(frozen=True)
class CropSettings:
    """What to cut: channels (names; None = all), physical edge, pixels, label image, block."""

    size_um: float
    size_px: int = 64
    channels: tuple[str, ...] | None = None
    label_name: str = "cells"
    block: int = 512

    def __post_init__(self) -> None:
        if not self.size_um > 0 or self.size_px < 1 or self.block < 1:
            raise ValueError(
                f"crop size {self.size_um} um / {self.size_px} px and block {self.block} must be "
                "positive"
            )


def plan_crops(results: str | Path, plate: Plate | None = None) -> pd.DataFrame:
    """One row per cell of every field and frame of a run's output, in plate order.

    Raises
    ------
    PipelineInputError
        The output cannot be opened, or a field has no cells table.
    """
    results = Path(results)
    plate = plate or open_plate(results)
    parts = [
        tables.field_cells(results, field, ["t", "label", "track_id"]) for field in plate.fields
    ]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=_KEYS)


def _channel_indices(field: FieldOfView, channels: Sequence[str] | None) -> list[int]:
    names = list(field.channel_names)
    if channels is None:
        return list(range(len(names)))
    missing = [name for name in channels if name not in names]
    if missing:
        raise PipelineInputError(
            f"no channel {', '.join(missing)} (the image has {', '.join(names)})",
            field.dataset_path + ("/" + field.path if field.path else ""),
        )
    return [names.index(name) for name in channels]


def _plane(data: xr.DataArray, t: int, location: str) -> xr.DataArray:
    """Frame ``t`` of an image or label image (dims a subset of t, c, z, y, x), one plane."""
    if "z" in data.dims and data.sizes["z"] > 1:
        raise PipelineInputError(
            f"crops are cut from 2D fields; this field has {data.sizes['z']} planes", location
        )
    selection = {"t": t} if "t" in data.dims else {}
    if "z" in data.dims:
        selection["z"] = 0
    return data.isel(selection)


def cut_field_cells(
    field: FieldOfView, labels: xr.DataArray, rows: pd.DataFrame, settings: CropSettings
) -> tuple[np.ndarray, pd.DataFrame]:
    """Crops of the cells ``rows`` (columns ``t``, ``label``) of one field, frame by frame.

    ``labels`` is the field's label image (dims a subset of t, z, y, x); ``rows`` needs a
    unique index. Returns the crops in the order of ``rows`` and ``rows`` joined with the
    crops' index columns.
    """
    location = os.path.join(field.dataset_path, field.path)
    channels = _channel_indices(field, settings.channels)
    step = settings.size_um / field.pixel_size["y"]
    pieces, indices = [], []
    for t, cells in rows.groupby("t", sort=False):
        image = _plane(field.data, int(t), location)
        image = image.isel(c=channels).values if "c" in image.dims else image.values[np.newaxis]
        frame = _plane(labels, int(t), location).values
        try:
            cut, index = cut_crops(image, frame, settings.size_px, step, cells["label"].to_numpy())
        except ValueError as error:  # the cells table and the label image disagree
            raise PipelineInputError(f"frame {t}: {error}", location) from None
        index = index.drop(columns="label")
        index.index = cells.index
        pieces.append(cut)
        indices.append(pd.concat([cells, index], axis=1))
    joined = pd.concat(indices)
    crops = np.empty((len(rows), *pieces[0].shape[1:]), dtype=np.float32)
    crops[rows.index.get_indexer(joined.index)] = np.concatenate(pieces)
    return crops, joined.loc[rows.index]


def cut_block(
    results: str | Path, rows: pd.DataFrame, settings: CropSettings
) -> tuple[np.ndarray, pd.DataFrame]:
    """Crops of the cells in ``rows`` (a slice of :func:`plan_crops`), read frame by frame."""
    results = Path(results)
    pieces, indices = [], []
    for path, cells in rows.groupby("field", sort=False):  # only the fields of this block
        field = open_image(results, image_path=path)
        labels = open_labels(results, image_path=path, name=settings.label_name).data
        cut, index = cut_field_cells(field, labels, cells, settings)
        pieces.append(cut)
        indices.append(index)
    return np.concatenate(pieces), pd.concat(indices)


def write_crops(
    results: str | Path,
    settings: CropSettings,
    *,
    submit: Callable | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Cut a crop around every cell of a run's output into ``RESULTS/crops``.

    Parameters
    ----------
    results
        The output of ``pipeline run`` (a plate or a lone image, with cells tables).
    settings
        Crop size, channels, label image and block length.
    submit
        ``client.submit`` of a Dask client to cut blocks on its workers (default: in turn, here).
    progress
        Called after each block with the crops done so far and the total.

    Returns
    -------
    Path
        The crop group ``RESULTS/crops``.
    """
    results = Path(results)
    plate = open_plate(results)
    plan = plan_crops(results, plate)
    if plan.empty:
        raise PipelineInputError("the output has no cells to crop", str(results))
    first = plate.fields[0]
    channels = [first.channel_names[i] for i in _channel_indices(first, settings.channels)]
    root = zarr.open_group(str(results), mode="r+")
    group = root.require_group(CROPS)
    Path(results, CROPS, INDEX_FILE).unlink(missing_ok=True)  # complete crops have an index
    array = group.create_array(
        "data",
        shape=(len(plan), len(channels) + 1, settings.size_px, settings.size_px),
        chunks=(settings.block, len(channels) + 1, settings.size_px, settings.size_px),
        dtype="float32",
        overwrite=True,
    )
    group.attrs.update(
        {
            "crops": {
                "channels": [*channels, "mask"],
                "size_um": settings.size_um,
                "size_px": settings.size_px,
                "label_image": settings.label_name,
            }
        }
    )
    blocks = [
        plan.iloc[start : start + settings.block] for start in range(0, len(plan), settings.block)
    ]
    indices, done = [], 0
    for index in _cut_blocks(str(results), blocks, settings, submit):
        indices.append(index)
        done += len(index)
        if progress:
            progress(done, len(plan))
    index = pd.concat(indices)
    index.to_parquet(Path(results, CROPS, INDEX_FILE), index=False)
    del array
    return Path(results, CROPS)


def _cut_blocks(
    results: str, blocks: list[pd.DataFrame], settings: CropSettings, submit: Callable | None
) -> Iterator[pd.DataFrame]:
    """The index rows of each block once it is cut and written, in block order."""
    if submit is None:
        for rows in blocks:
            yield _cut_and_write(results, rows, settings)
        return
    pending = [submit(_cut_and_write, results, rows, settings, pure=False) for rows in blocks]
    while pending:  # each result released once collected: the workers hold none for long
        yield pending.pop(0).result()


def _cut_and_write(results: str, rows: pd.DataFrame, settings: CropSettings) -> pd.DataFrame:
    crops, index = cut_block(results, rows, settings)
    start = int(rows.index[0])
    array = zarr.open_array(str(Path(results, CROPS, "data")), mode="r+")
    array[start : start + len(crops)] = crops
    return index


def read_crops(results: str | Path) -> tuple[zarr.Array, pd.DataFrame]:
    """The crop array of ``RESULTS/crops`` (lazy, zarr) and its index table."""
    folder = Path(results, CROPS)
    if not Path(folder, INDEX_FILE).is_file():
        raise PipelineInputError(
            "no crops in this output (run `pipeline crops` first)", str(results)
        )
    return zarr.open_array(str(folder / "data"), mode="r"), pd.read_parquet(folder / INDEX_FILE)
