"""napari reader for the results of ``pipeline run``: image, label images and tracks.

``napari results.zarr/A/1/0`` (a field of a plate) or ``napari results.zarr`` (a lone image)
with this package installed opens, in the image's micrometre scale:

- the image, one layer per channel (named after it), all pyramid levels;
- every label image of ``labels/`` (``cells``, and ``nuclei`` or ``tracks`` where the run
  made them);
- a Tracks layer (``cell tracks``) from the ``cells`` table: each cell's centroid per frame,
  joined by track id, divisions drawn from ``parent_track_id``.

napari finds it through the ``napari.manifest`` entry point (``napari.yaml``). Paths without
a ``labels/`` group and a ``tables/cells`` table are left to other readers. This module does
not import napari: it returns napari's layer-data tuples.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.io.omezarr import open_image, open_labels
from pipeline.io.tables import read_table

__all__ = ["napari_get_reader", "result_layers"]

LayerData = tuple[Any, dict[str, Any], str]


def napari_get_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """napari's reader hook: :func:`result_layers` for a result's image, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        group = zarr.open_group(str(path), mode="r")
        found = "multiscales" in group.attrs.get("ome", {}) and "labels" in group
        found = found and (Path(path) / "tables" / "cells").is_dir()
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return None
    return result_layers if found else None


def result_layers(path: str | Path) -> list[LayerData]:
    """The image, label and track layers of one image of a result (a field's group or a lone
    image's root), as napari layer-data tuples, in the image's physical scale."""
    path = str(path)
    image = open_image(path)
    dims = [d for d in image.data.dims if d != "c"]
    scale = [image.levels[0].scale.get(d, 1.0) if d in "zyx" else 1.0 for d in dims]
    translate = [image.levels[0].translation.get(d, 0.0) for d in dims]
    placed = {"scale": scale, "translate": translate}
    pyramid = [level.dask_array() for level in image.levels]
    options: dict[str, Any] = {"multiscale": len(pyramid) > 1, **placed}
    if "c" in image.data.dims:
        options |= {"channel_axis": image.data.dims.index("c"), "name": list(image.channel_names)}
    else:
        options["name"] = image.channel_names[0]
    layers: list[LayerData] = [(pyramid if len(pyramid) > 1 else pyramid[0], options, "image")]
    group = zarr.open_group(path, mode="r")
    attrs = group["labels"].attrs
    for name in attrs.get("ome", attrs).get("labels", []):  # OME-Zarr 0.5, or 0.4
        levels = [level.dask_array() for level in open_labels(path, name=name).levels]
        data = levels if len(levels) > 1 else levels[0]
        layers.append((data, {"name": name, "multiscale": len(levels) > 1, **placed}, "labels"))
    cells = read_table(group, "cells")
    if "track_id" in cells and len(cells):
        layers.append(_tracks_layer(cells, dims, placed))
    return layers


def _tracks_layer(cells: Any, dims: list[str], placed: dict[str, list[float]]) -> LayerData:
    """Each cell's centroid (pixels) per frame, by track; daughters linked to their parent."""
    spatial = [d for d in dims if d in "zyx"]
    columns = ["track_id", *(["t"] if "t" in dims else []), *[f"centroid_{d}_px" for d in spatial]]
    cells = cells.sort_values(["track_id", "t"])
    data = cells[columns].to_numpy(dtype=np.float64)
    if "t" not in dims:  # one frame: napari's tracks still need a time column
        data = np.insert(data, 1, 0.0, axis=1)
    parents = cells.drop_duplicates("track_id").set_index("track_id")["parent_track_id"]
    graph = {int(track): [int(parent)] for track, parent in parents.items() if parent > 0}
    offset = 0 if "t" in dims else 1  # the time axis added above has no scale of the image's
    scale = [1.0] * offset + placed["scale"]
    translate = [0.0] * offset + placed["translate"]
    return (
        data,
        {"name": "cell tracks", "graph": graph, "scale": scale, "translate": translate},
        "tracks",
    )
