"""Quality-control report of a run's output: outline overlays, track plots, a plate heat map.

:func:`write_qc_report` reads an output written by :func:`pipeline.run` (a plate or a lone
image) and writes, into a report folder, one PNG of label outlines over the image per field
(a few timepoints; z stacks as maximum projections), one PNG of the tracks per field (centroid
paths coloured by time over the last timepoint, divisions marked), a heat map of the cells per
well (plates only), and an ``index.html`` that lists every field, failed ones with their error.
Images are read from the finest pyramid level that fits in ``max_pixels`` on a side (labels from
the same level), so a large field is never loaded whole. Figures are drawn with matplotlib's Agg
canvas (no screen, no pyplot state).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import zarr
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from skimage.segmentation import find_boundaries

from pipeline.errors import CorruptChunkError, PipelineInputError
from pipeline.io import tables
from pipeline.io.omezarr import FieldOfView, Plate, open_image, open_plate
from pipeline.orchestration.records import ATTRIBUTE, RUN_ATTRIBUTE

__all__ = [
    "choose_level",
    "outline_overlay",
    "safe_name",
    "stretch_contrast",
    "well_cell_counts",
    "write_qc_report",
]

CELLS = "cells"
HEATMAP_FILE = "plate_heatmap.png"
INDEX_FILE = "index.html"
_OUTLINE_COLOR = (255, 40, 40)
_TRACK_COLUMNS = frozenset({"t", "x", "y", "track_id", "parent_track_id"})
_COUNT_COLUMNS = ["row", "column", "well", "fields", "cells_first", "cells_last"]


# --------------------------------------------------------------------------------------------
# Small public helpers
# --------------------------------------------------------------------------------------------


def stretch_contrast(
    image: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.8)
) -> np.ndarray:
    """Map an image linearly to [0, 1] between two of its percentiles, clipping outside.

    Parameters
    ----------
    image
        Any real-valued array.
    percentiles
        Low and high percentiles mapped to 0 and 1.

    Returns
    -------
    numpy.ndarray
        float64 array of the image's shape; all zeros when the two percentiles are equal.
    """
    values = np.asarray(image, dtype=np.float64)
    if values.size == 0:
        return values
    low, high = np.percentile(values, percentiles)
    if high <= low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def outline_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    color: tuple[int, int, int] = _OUTLINE_COLOR,
    percentiles: tuple[float, float] = (1.0, 99.8),
    mode: str = "inner",
) -> np.ndarray:
    """Draw label outlines in colour over a grey, contrast-stretched 2D image.

    Parameters
    ----------
    image
        2D intensity image.
    labels
        2D label image of the same shape (0 = background).
    color
        RGB colour of the outline pixels.
    percentiles
        Contrast stretch of the image (see :func:`stretch_contrast`).
    mode
        Boundary mode of :func:`skimage.segmentation.find_boundaries`; ``"inner"`` keeps the
        outlines on the cells' own pixels.

    Returns
    -------
    numpy.ndarray
        ``(Y, X, 3)`` uint8 RGB: the stretched image as grey, and exactly the pixels that
        ``find_boundaries(labels, mode=mode)`` marks in ``color``.

    Raises
    ------
    ValueError
        ``image`` and ``labels`` are not 2D arrays of one shape.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim != 2 or image.shape != labels.shape:
        raise ValueError(
            f"image {image.shape} and labels {labels.shape} must be 2D arrays of one shape"
        )
    grey = np.round(stretch_contrast(image, percentiles) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=-1)
    rgb[find_boundaries(labels, mode=mode)] = np.asarray(color, dtype=np.uint8)
    return rgb


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


def safe_name(field_path: str) -> str:
    """File-name stem of a field: ``"A/1/0"`` gives ``"A1_0"``, a lone image (``""``) ``"image"``.

    Parameters
    ----------
    field_path
        Path of the field inside the output (``row/column/field``), or ``""``.

    Returns
    -------
    str
        Letters, digits, ``_`` and ``-`` only.
    """
    parts = [part for part in field_path.strip("/").split("/") if part]
    if not parts:
        return "image"
    stem = "".join(parts[:-1]) + "_" + parts[-1] if len(parts) > 1 else parts[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


# --------------------------------------------------------------------------------------------
# Reading the output
# --------------------------------------------------------------------------------------------


def _open_output(output: str | Path) -> tuple[zarr.Group, Plate | None]:
    """The output's root group and its plate (None when no field completed, so none is listed)."""
    try:
        plate = open_plate(output)
    except PipelineInputError:  # a pipeline output none of whose fields completed lists none
        if not Path(output, "zarr.json").is_file():
            raise
        root = zarr.open_group(str(output), mode="r")
        if not _run_record(root):
            raise
        return root, None
    return zarr.open_group(plate.path, mode="r"), plate


def _run_record(root: zarr.Group) -> dict[str, Any]:
    """The run's ledger on the output's root (empty when there is none)."""
    record = root.attrs.get(RUN_ATTRIBUTE)
    return dict(record) if isinstance(record, dict) and "input" in record else {}


def _unfinished_units(run: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """State and error of each unit the ledger does not give as done, by field path."""
    return {
        str(path): (str(unit.get("state")), unit.get("error"))
        for path, unit in dict(run.get("units", {})).items()
        if isinstance(unit, dict) and unit.get("state") != "done"
    }


def _field_group(root: zarr.Group, fov: FieldOfView) -> zarr.Group:
    return root[fov.path] if fov.path else root


def _cells_table(root: zarr.Group, fov: FieldOfView) -> pd.DataFrame | None:
    """The field's ``tables/cells``, or None when the field has none."""
    folder = Path(fov.dataset_path, fov.path, "tables", CELLS)
    if not (folder / tables.TABLE_FILE).is_file():
        return None
    return tables.read_table(_field_group(root, fov), CELLS)


def _record(group: zarr.Group) -> dict[str, Any]:
    """A field's completion record (empty when there is none)."""
    record = group.attrs.get(ATTRIBUTE)
    return dict(record) if isinstance(record, dict) else {}


def _frame_counts(cells: pd.DataFrame, n_frames: int) -> tuple[int, int]:
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
    root, plate = _open_output(output)
    if plate is None or not plate.is_plate:
        return pd.DataFrame(columns=_COUNT_COLUMNS)
    return _well_counts(root, plate)


def _well_counts(root: zarr.Group, plate: Plate) -> pd.DataFrame:
    """:func:`well_cell_counts` of an opened plate."""
    totals: dict[str, list[int]] = {}
    for fov in plate.fields:
        complete = _record(_field_group(root, fov)).get("status") == "complete"
        cells = _cells_table(root, fov) if complete else None
        if cells is None:
            continue
        first, last = _frame_counts(cells, fov.data.sizes.get("t", 1))
        total = totals.setdefault(str(fov.well), [0, 0, 0])
        total[0] += 1
        total[1] += first
        total[2] += last
    records = []
    for row in plate.rows:
        for column in plate.columns:
            fields, first, last = totals.get(f"{row}/{column}", [0, pd.NA, pd.NA])
            records.append((row, column, f"{row}/{column}", fields, first, last))
    counts = pd.DataFrame.from_records(records, columns=_COUNT_COLUMNS)
    return counts.astype({"fields": "int64", "cells_first": "Int64", "cells_last": "Int64"})


def _resolve_channel(fov: FieldOfView, channel: int | str) -> int:
    names = list(fov.channel_names)
    if isinstance(channel, str):
        if channel not in names:
            raise ValueError(f"no channel {channel!r} in {fov.path or 'the image'}: {names}")
        return names.index(channel)
    if not -len(names) <= channel < len(names):
        raise ValueError(f"channel {channel} out of range for {len(names)} channels")
    return channel % len(names)


@dataclass(frozen=True)
class _View:
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


def _view(fov: FieldOfView, channel: int, max_pixels: int) -> _View:
    """The level (and stride) of ``fov`` to show, with its labels ``cells`` at the same level."""
    dims = tuple(str(dim) for dim in fov.data.dims)
    index, stride = choose_level([level.shape for level in fov.levels], dims, max_pixels)
    level = fov.levels[index]
    sizes = dict(zip(dims, level.shape, strict=True))
    labels, labels_dims = None, tuple(dim for dim in dims if dim != "c")
    if Path(fov.dataset_path, fov.path, "labels", CELLS).is_dir():
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
    return _View(level.dask_array(), dims, labels, labels_dims, channel, stride, extent)


def _timepoints(n_frames: int, count: int) -> list[int]:
    """``count`` frames spread evenly from the first to the last (fewer when there are fewer)."""
    return sorted({int(t) for t in np.round(np.linspace(0, n_frames - 1, max(1, count)))})


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _new_figure(width_in: float, height_in: float, dpi: float = 100) -> Figure:
    figure = Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _panel_inches(image: np.ndarray) -> tuple[float, float, float]:
    """Panel width and height in inches and a dpi that shows about one pixel per image pixel."""
    height, width = image.shape
    scale = 5.0 / max(height, width)
    dpi = float(np.clip(max(height, width) / 5.0, 100, 220))
    return width * scale, height * scale, dpi


def _write_overlay(
    view: _View, frames: list[int], title: str, path: Path, cells: pd.DataFrame | None
) -> None:
    """Outlines over the image at each of ``frames``, titled with the table's cell counts."""
    per_frame = {} if cells is None else cells["t"].value_counts().to_dict()
    planes = [(t, view.image_plane(t), view.labels_plane(t)) for t in frames]
    width, height, dpi = _panel_inches(planes[0][1])
    figure = _new_figure(width * len(planes) + 0.3, height + 0.6, dpi)
    panels = figure.subplots(1, len(planes), squeeze=False)[0]
    for axes, (t, image, labels) in zip(panels, planes, strict=True):
        axes.imshow(outline_overlay(image, labels), extent=view.extent, interpolation="nearest")
        count = "" if cells is None else f", {per_frame.get(t, 0)} cells"
        axes.set_title(f"t = {t}{count}", fontsize=9)
        axes.set_xlabel("x (µm)", fontsize=8)
        axes.tick_params(labelsize=7)
    figure.axes[0].set_ylabel("y (µm)", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.savefig(path)


def _track_segments(cells: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Line segments (N, 2, 2) between consecutive points of each track, and their end times."""
    ordered = cells.sort_values(["track_id", "t"], kind="stable")
    xy = ordered[["x", "y"]].to_numpy(dtype=np.float64)
    track = ordered["track_id"].to_numpy()
    same = track[1:] == track[:-1]
    segments = np.stack([xy[:-1][same], xy[1:][same]], axis=1)
    return segments, ordered["t"].to_numpy()[1:][same]


def _division_links(cells: pd.DataFrame) -> np.ndarray:
    """Segments (N, 2, 2) from each parent track's last point to its daughters' first points."""
    ordered = cells.sort_values(["track_id", "t"], kind="stable")
    last = ordered.groupby("track_id")[["x", "y"]].last()
    first = ordered.groupby("track_id")[["x", "y", "parent_track_id"]].first()
    daughters = first[(first["parent_track_id"] != 0) & first["parent_track_id"].isin(last.index)]
    parents = last.loc[daughters["parent_track_id"]].to_numpy(dtype=np.float64)
    return np.stack([parents, daughters[["x", "y"]].to_numpy(dtype=np.float64)], axis=1)


def _write_tracks(
    view: _View, cells: pd.DataFrame, last_frame: int, title: str, path: Path
) -> None:
    image = stretch_contrast(view.image_plane(last_frame))
    width, height, dpi = _panel_inches(image)
    figure = _new_figure(width + 1.2, height + 0.6, dpi)
    axes = figure.subplots()
    axes.imshow(image, cmap="gray", extent=view.extent, interpolation="nearest")
    segments, times = _track_segments(cells)
    norm = Normalize(0, max(last_frame, 1))
    paths = LineCollection(segments, cmap="viridis", norm=norm, linewidths=1.2)
    paths.set_array(times)
    axes.add_collection(paths)
    links = _division_links(cells)
    axes.add_collection(
        LineCollection(links, colors="#ff7f0e", linewidths=1.5, linestyles="dotted")
    )
    if len(links):
        axes.scatter(
            links[:, 0, 0],
            links[:, 0, 1],
            s=18,
            marker="*",
            color="#ff7f0e",
            zorder=3,
            label=f"division ({len(links)} daughters)",
        )
        axes.legend(loc="upper right", fontsize=7, framealpha=0.7)
    axes.set_xlim(view.extent[0], view.extent[1])
    axes.set_ylim(view.extent[2], view.extent[3])
    axes.set_xlabel("x (µm)", fontsize=8)
    axes.set_ylabel("y (µm)", fontsize=8)
    axes.tick_params(labelsize=7)
    figure.colorbar(paths, ax=axes, label="t (frame)", shrink=0.8)
    axes.set_title(f"{title}: {cells['track_id'].nunique()} tracks on t = {last_frame}", fontsize=9)
    figure.savefig(path)


def _write_heatmap(
    counts: pd.DataFrame, rows: Sequence[str], columns: Sequence[str], path: Path
) -> None:
    """Two plate grids (first and last timepoint) of cells per well, numbers written in."""
    grids = [
        np.ma.masked_invalid(
            counts[column].to_numpy(dtype=np.float64, na_value=np.nan).reshape(len(rows), -1)
        )
        for column in ("cells_first", "cells_last")
    ]
    high = max([float(grid.max()) for grid in grids if grid.count()], default=1.0)
    norm = Normalize(0.0, max(high, 1.0))
    colormap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    figure = _new_figure(max(3.0, 1.6 + 0.5 * len(columns)), 0.4 + 2 * (0.7 + 0.5 * len(rows)))
    panels = figure.subplots(2, 1, squeeze=False)[:, 0]
    for axes, grid, when in zip(panels, grids, ("first", "last"), strict=True):
        shown = axes.imshow(grid, cmap=colormap, norm=norm, aspect="equal")
        for (i, j), value in np.ndenumerate(grid.filled(np.nan)):
            missing = bool(np.isnan(value))
            axes.text(
                j,
                i,
                "–" if missing else str(int(value)),
                ha="center",
                va="center",
                fontsize=7,
                color="black" if missing or norm(value) > 0.5 else "white",
            )
        axes.set_xticks(range(len(columns)), labels=list(columns), fontsize=7)
        axes.set_yticks(range(len(rows)), labels=list(rows), fontsize=7)
        axes.tick_params(top=True, labeltop=True, bottom=False, labelbottom=False)
        axes.set_title(f"{when} timepoint", fontsize=9)
        figure.colorbar(shown, ax=axes, shrink=0.9)
    figure.suptitle("cells per well (grey: no results)", fontsize=10)
    figure.savefig(path)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """One row of the report's table of fields."""

    path: str
    status: str
    error: str | None = None
    note: str | None = None
    cells: str = "–"
    tracks: str = "–"
    daughters: str = "–"
    merge_qc: str = "–"
    images: list[tuple[str, str]] = field(default_factory=list)

    @property
    def well_name(self) -> str:
        parts = self.path.split("/")
        return "/".join(parts[:2]) if len(parts) == 3 else "–"

    @property
    def field_name(self) -> str:
        parts = self.path.split("/")
        return parts[2] if len(parts) == 3 else (self.path or "image")


def _merge_qc_text(attrs: dict[str, Any]) -> str:
    qc = attrs.get("merge_qc")
    if not isinstance(qc, dict) or "fraction" not in qc:
        return "–"
    return f"{qc['fraction']:.1%} ({qc.get('large_increase', '?')}/{qc.get('links', '?')} links)"


def _unique_name(path: str, taken: set[str]) -> str:
    name, number = safe_name(path), 1
    while name in taken:
        number += 1
        name = f"{safe_name(path)}-{number}"
    taken.add(name)
    return name


def _field_entry(
    root: zarr.Group,
    fov: FieldOfView,
    report: Path,
    name: str,
    *,
    channel: int | str,
    timepoints: int,
    max_pixels: int,
    unfinished: tuple[str, str | None] | None,
) -> _Entry:
    """Draw a field's figures into ``report`` and describe it for the index."""
    record = _record(_field_group(root, fov))
    entry = _Entry(fov.path, str(record.get("status", "missing")), merge_qc=_merge_qc_text(record))
    if entry.status != "complete":
        if unfinished is not None:
            entry.status, entry.error = unfinished
        entry.error = entry.error or f"the field has no completion record ({entry.status})"
        return entry
    n_frames = fov.data.sizes.get("t", 1)
    title = fov.path or "image"
    cells = _cells_table(root, fov)
    notes = [f"warning: {warning}" for warning in record.get("warnings") or []]
    try:
        view = _view(fov, _resolve_channel(fov, channel), max_pixels)
        if view.labels is None:
            notes.append(f"no labels/{CELLS} at a level of the image's shape")
        else:
            overlay = f"{name}_outlines.png"
            frames = _timepoints(n_frames, timepoints)
            _write_overlay(view, frames, title, report / overlay, cells)
            entry.images.append((overlay, f"{title}: label outlines"))
        if cells is not None and len(cells) and _TRACK_COLUMNS <= set(cells.columns):
            track_file = f"{name}_tracks.png"
            _write_tracks(view, cells, n_frames - 1, title, report / track_file)
            entry.images.append((track_file, f"{title}: tracks"))
    except CorruptChunkError as error:
        notes.append(f"cannot draw: {error}")
    if cells is None:
        notes.append(f"no tables/{CELLS}")
    else:
        first, last = _frame_counts(cells, n_frames)
        entry.cells = f"{first} → {last}"
        if _TRACK_COLUMNS <= set(cells.columns):
            entry.tracks = str(cells["track_id"].nunique())
            parents = cells.groupby("track_id")["parent_track_id"].first()
            entry.daughters = str(int((parents != 0).sum()))
    entry.note = "; ".join(notes) or None
    return entry


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f0f0f0; }
td.num { text-align: right; white-space: nowrap; }
.failed { color: #b00020; }
.note { color: #8a6d00; }
img.field { max-width: 640px; height: auto; display: block; margin-bottom: 4px; }
img.heatmap { max-width: 100%; height: auto; }
code { white-space: pre-wrap; }
"""


def _row_html(entry: _Entry) -> str:
    ok = entry.status == "complete" and entry.error is None
    status = html.escape(entry.status)
    if entry.error:
        status += f"<br><code>{html.escape(entry.error)}</code>"
    if entry.note:
        status += f'<br><span class="note">{html.escape(entry.note)}</span>'
    images = "".join(
        f'<a href="{html.escape(file)}"><img class="field" src="{html.escape(file)}" '
        f'alt="{html.escape(alt)}"></a>'
        for file, alt in entry.images
    )
    cells = [
        f"<td>{html.escape(entry.well_name)}</td>",
        f"<td>{html.escape(entry.field_name)}</td>",
        f'<td class="num">{html.escape(entry.cells)}</td>',
        f'<td class="num">{html.escape(entry.tracks)}</td>',
        f'<td class="num">{html.escape(entry.daughters)}</td>',
        f'<td class="num">{html.escape(entry.merge_qc)}</td>',
        f'<td class="{"ok" if ok else "failed"}">{status}</td>',
        f"<td>{images}</td>",
    ]
    return "<tr>" + "".join(cells) + "</tr>"


def _index_html(
    output: str, run: dict[str, Any], entries: list[_Entry], heatmap: str | None
) -> str:
    failed = sum(entry.status != "complete" or entry.error is not None for entry in entries)
    facts = [
        ("output", output),
        ("run status", str(run.get("status", "unknown"))),
        ("fields", f"{len(entries)} ({failed} failed)"),
    ]
    if "wall_seconds" in run:
        facts.append(("wall time", f"{run['wall_seconds']} s"))
    if "version" in run:
        facts.append(("pipeline version", str(run["version"])))
    summary = "".join(
        f"<li><b>{html.escape(key)}</b>: {html.escape(value)}</li>" for key, value in facts
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>QC report: {html.escape(Path(output).name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>QC report: {html.escape(Path(output).name)}</h1>",
        f"<ul>{summary}</ul>",
    ]
    if heatmap is not None:
        parts.append(
            f'<h2>Cells per well</h2><a href="{heatmap}">'
            f'<img class="heatmap" src="{heatmap}" alt="cells per well"></a>'
        )
    header = "".join(
        f"<th>{name}</th>"
        for name in (
            "well",
            "field",
            "cells (first → last t)",
            "tracks",
            "daughters",
            "merge QC",
            "status",
            "images",
        )
    )
    parts += [
        "<h2>Fields</h2>",
        f"<table><thead><tr>{header}</tr></thead><tbody>",
        *(_row_html(entry) for entry in entries),
        "</tbody></table>",
        "<p>Outlines: label boundaries (red) over the contrast-stretched image, z as a maximum "
        "projection. Tracks: centroid paths coloured by frame over the last frame; dotted "
        "orange lines link a dividing track's last point (star) to its daughters. Merge QC: "
        "share of frame-to-frame links whose size grows by 30% or more.</p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_qc_report(
    output: str | Path,
    report_dir: str | Path,
    *,
    channel: int | str = 0,
    timepoints: int = 3,
    max_pixels: int = 1024,
) -> Path:
    """Write a quality-control report (PNG figures and ``index.html``) of a run's output.

    Parameters
    ----------
    output
        A plate or lone image written by :func:`pipeline.run`.
    report_dir
        Folder for the report (created if needed; files of the same names are replaced).
    channel
        Channel shown, by index or name.
    timepoints
        Number of timepoints in each outline figure, spread from the first to the last.
    max_pixels
        Largest y/x size read per field: the finest pyramid level within it is used (labels
        from the same level), or the coarsest level read with a stride.

    Returns
    -------
    Path
        The report's ``index.html``. Figures lie beside it: ``ROWCOL_FIELD_outlines.png`` and
        ``ROWCOL_FIELD_tracks.png`` per field (``image_*`` for a lone image) and, for a plate,
        ``plate_heatmap.png``; all links in the HTML are relative.

    Raises
    ------
    PipelineInputError
        ``output`` is not an OME-Zarr output of the pipeline.
    ValueError
        ``channel`` is not a channel of a field.

    Notes
    -----
    Fields are listed in plate order, then the units the run record gives as failed, running
    or pending that the plate does not list. A complete field without ``tables/cells`` gets its
    outline figure only; one whose chunks cannot be read gets a note instead of figures.
    """
    root, plate = _open_output(output)
    report = Path(report_dir)
    report.mkdir(parents=True, exist_ok=True)
    run = _run_record(root)
    unfinished = _unfinished_units(run)
    fields = plate.fields if plate is not None else ()
    taken: set[str] = set()
    entries = [
        _field_entry(
            root,
            fov,
            report,
            _unique_name(fov.path, taken),
            channel=channel,
            timepoints=timepoints,
            max_pixels=max_pixels,
            unfinished=unfinished.get(fov.path),
        )
        for fov in fields
    ]
    listed = {fov.path for fov in fields}
    entries += [
        _Entry(path, state, error=error)
        for path, (state, error) in unfinished.items()
        if path not in listed
    ]
    heatmap = None
    if plate is not None and plate.is_plate and plate.rows and plate.columns:
        heatmap = HEATMAP_FILE
        _write_heatmap(_well_counts(root, plate), plate.rows, plate.columns, report / heatmap)
    index = report / INDEX_FILE
    index.write_text(_index_html(str(output), run, entries, heatmap), encoding="utf-8")
    return index
