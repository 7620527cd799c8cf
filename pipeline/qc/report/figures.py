"""The report's figures: outline overlays, track plots, the plate heat map (matplotlib Agg)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter
from skimage.segmentation import find_boundaries

from pipeline.qc.report.reading import FieldView

_OUTLINE_COLOR = (255, 40, 40)


HEATMAP_FILE = "plate_heatmap.png"
GROWTH_FILE = "plate_growth.png"
CLASSES_FILE = "plate_classes.png"


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


def _new_figure(width_in: float, height_in: float, dpi: float = 100) -> Figure:
    figure = Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: Path | BinaryIO) -> None:
    """Write ``figure`` as a PNG with fast compression: the field figures are megapixel images
    that compress no smaller at zlib's default level, which took a third of their drawing
    time."""
    figure.savefig(path, format="png", pil_kwargs={"compress_level": 1})


def _panel_inches(image: np.ndarray) -> tuple[float, float, float]:
    """Panel width and height in inches and a dpi that shows about one pixel per image pixel."""
    height, width = image.shape
    scale = 5.0 / max(height, width)
    dpi = float(np.clip(max(height, width) / 5.0, 100, 220))
    return width * scale, height * scale, dpi


def write_overlay(
    view: FieldView,
    frames: list[int],
    title: str,
    path: Path | BinaryIO,
    cells: pd.DataFrame | None,
) -> None:
    """Outlines over the image at each of ``frames``, titled with the table's cell counts, as
    a PNG (a file, or a binary buffer)."""
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
    save_png(figure, path)


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


def write_tracks(
    view: FieldView, cells: pd.DataFrame, last_frame: int, title: str, path: Path | BinaryIO
) -> None:
    """Track paths coloured by time over the image at ``last_frame``, divisions marked, as a
    PNG (a file, or a binary buffer)."""
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
    save_png(figure, path)


def write_heatmap(
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
    figure = _new_figure(max(3.0, 1.6 + 0.5 * len(columns)), 0.4 + 2 * (0.7 + 0.5 * len(rows)))
    panels = figure.subplots(2, 1, squeeze=False)[:, 0]
    for axes, grid, when in zip(panels, grids, ("first", "last"), strict=True):
        _plate_panel(figure, axes, grid, norm, rows, columns, lambda value: str(int(value)))
        axes.set_title(f"{when} timepoint", fontsize=9)
    figure.suptitle("cells per well (grey: no results)", fontsize=10)
    save_png(figure, path)


def write_class_fractions(
    fractions: pd.DataFrame, rows: Sequence[str], columns: Sequence[str], path: Path
) -> None:
    """One plate grid per class: the share of each well's cells (all timepoints) in it."""
    classes = list(fractions.columns)
    norm = Normalize(0.0, 1.0)
    figure = _new_figure(
        max(3.0, 1.6 + 0.5 * len(columns)), 0.4 + len(classes) * (0.7 + 0.5 * len(rows))
    )
    panels = figure.subplots(len(classes), 1, squeeze=False)[:, 0]
    for axes, name in zip(panels, classes, strict=True):
        grid = np.ma.masked_invalid(
            fractions[name].to_numpy(dtype=np.float64, na_value=np.nan).reshape(len(rows), -1)
        )
        _plate_panel(figure, axes, grid, norm, rows, columns, lambda value: f"{value:.0%}")
        axes.set_title(f"class {name}", fontsize=9)
    figure.suptitle("share of cells per class (grey: no results)", fontsize=10)
    save_png(figure, path)


def _plate_panel(
    figure: Figure,
    axes: Any,
    grid: np.ma.MaskedArray,
    norm: Normalize,
    rows: Sequence[str],
    columns: Sequence[str],
    text: Callable[[float], str],
) -> None:
    """A plate grid of well values on ``axes``, each value written in its well."""
    colormap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    shown = axes.imshow(grid, cmap=colormap, norm=norm, aspect="equal")
    for (i, j), value in np.ndenumerate(grid.filled(np.nan)):
        missing = bool(np.isnan(value))
        axes.text(
            j,
            i,
            "–" if missing else text(value),
            ha="center",
            va="center",
            fontsize=7,
            color="black" if missing or norm(value) > 0.5 else "white",
        )
    axes.set_xticks(range(len(columns)), labels=list(columns), fontsize=7)
    axes.set_yticks(range(len(rows)), labels=list(rows), fontsize=7)
    axes.tick_params(top=True, labeltop=True, bottom=False, labelbottom=False)
    figure.colorbar(shown, ax=axes, shrink=0.9)


def write_growth_curves(curves: pd.DataFrame, path: Path) -> None:
    """Cells per well over time (log axis) and, where the table has them, each well's mean
    cytoring/nucleus reporter ratio over time, one panel per channel (at most three), one line
    per well."""
    ratios = [
        c for c in curves.columns if c.startswith("ratio_cytoring_nucleus_") and c.endswith("_mean")
    ][:3]
    figure = _new_figure(3.6 * (1 + len(ratios)) + 1.2, 3.2)
    panels = figure.subplots(1, 1 + len(ratios), squeeze=False)[0]
    wells = sorted(curves["well"].unique())
    colours = colormaps["viridis"](np.linspace(0, 0.9, max(len(wells), 2)))
    for colour, well in zip(colours, wells, strict=False):
        curve = curves[curves["well"] == well]
        panels[0].plot(curve["time"], curve["n_cells"], color=colour, marker=".", label=well)
        for axes, ratio in zip(panels[1:], ratios, strict=True):
            axes.plot(curve["time"], curve[ratio], color=colour, marker=".")
    panels[0].set_yscale("log")
    panels[0].yaxis.set_major_formatter(ScalarFormatter())
    panels[0].yaxis.set_minor_formatter(ScalarFormatter())
    panels[0].set_ylabel("cells", fontsize=8)
    panels[0].set_title("cells per well", fontsize=9)
    for axes, ratio in zip(panels[1:], ratios, strict=True):
        channel = ratio.removeprefix("ratio_cytoring_nucleus_").removesuffix("_mean")
        axes.set_ylabel("cytoring / nucleus", fontsize=8)
        axes.set_title(f"mean reporter ratio, {channel}", fontsize=9)
    for axes in panels:
        axes.set_xlabel("time (unit of the t axis)", fontsize=8)
        axes.tick_params(labelsize=7)
    if len(wells) <= 24:
        figure.legend(loc="outside right upper", fontsize=7, title="well", title_fontsize=7)
    save_png(figure, path)
