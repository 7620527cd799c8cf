"""Quality-control report of a run's output: outline overlays, track plots, a plate heat map.

:func:`write_qc_report` reads an output written by :func:`pipeline.run` (a plate or a lone
image) and writes, into a report folder, one PNG of label outlines over the image per field
(a few timepoints; z stacks as maximum projections), one PNG of the tracks per field (centroid
paths coloured by time over the last timepoint, divisions marked), a heat map of the cells per
well, the share of each class per well where cells were classified, and the wells' growth
curves and reporter ratios over time (plates only), and an
``index.html`` that lists every field, failed ones with their error.
Images are read from the finest pyramid level that fits in ``max_pixels`` on a side (labels from
the same level), so a large field is never loaded whole. Figures are drawn with matplotlib's Agg
canvas (no screen, no pyplot state).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import zarr
from distributed import Client
from upath import UPath

from pipeline.errors import CorruptChunkError
from pipeline.io import tables
from pipeline.io.location import local_copy_of, location
from pipeline.io.omezarr import FieldOfView, Plate
from pipeline.io.tables import TABLE_FILE
from pipeline.measurement.wells import WELL_GROWTH
from pipeline.qc.report.figures import (
    CLASSES_FILE,
    GROWTH_FILE,
    HEATMAP_FILE,
    outline_overlay,
    stretch_contrast,
    write_class_fractions,
    write_growth_curves,
    write_heatmap,
    write_overlay,
    write_tracks,
)
from pipeline.qc.report.page import (
    INDEX_FILE,
    FieldEntry,
    index_html,
    merge_qc_text,
    safe_name,
    unique_name,
)
from pipeline.qc.report.reading import (
    CELLS,
    TRACK_COLUMNS,
    cells_table,
    channel_index,
    choose_level,
    completion_record,
    field_group,
    field_view,
    frame_counts,
    open_output,
    plate_class_fractions,
    plate_well_counts,
    run_record,
    spread_timepoints,
    unfinished_units,
    well_cell_counts,
)

__all__ = [
    "choose_level",
    "outline_overlay",
    "safe_name",
    "stretch_contrast",
    "well_cell_counts",
    "write_qc_report",
]


def _field_entry(
    root: zarr.Group,
    fov: FieldOfView,
    name: str,
    *,
    channel: int | str,
    timepoints: int,
    max_pixels: int,
    unfinished: tuple[str, str | None] | None,
) -> tuple[FieldEntry, dict[str, bytes]]:
    """Describe a field for the index and draw its figures (PNG bytes by file name); runs
    here or on a worker, which need not see the report's folder."""
    figures: dict[str, bytes] = {}
    record = completion_record(field_group(root, fov))
    entry = FieldEntry(
        fov.path, str(record.get("status", "missing")), merge_qc=merge_qc_text(record)
    )
    if entry.status != "complete":
        if unfinished is not None:
            entry.status, entry.error = unfinished
        entry.error = entry.error or f"the field has no completion record ({entry.status})"
        return entry, figures
    n_frames = fov.data.sizes.get("t", 1)
    title = fov.path or "image"
    cells = cells_table(root, fov)
    notes = [f"warning: {warning}" for warning in record.get("warnings") or []]
    try:
        view = field_view(fov, channel_index(fov, channel), max_pixels)
        if view.labels is None:
            notes.append(f"no labels/{CELLS} at a level of the image's shape")
        else:
            overlay = f"{name}_outlines.png"
            frames = spread_timepoints(n_frames, timepoints)
            with io.BytesIO() as png:
                write_overlay(view, frames, title, png, cells)
                figures[overlay] = png.getvalue()
            entry.images.append((overlay, f"{title}: label outlines"))
        if cells is not None and len(cells) and TRACK_COLUMNS <= set(cells.columns):
            track_file = f"{name}_tracks.png"
            with io.BytesIO() as png:
                write_tracks(view, cells, n_frames - 1, title, png)
                figures[track_file] = png.getvalue()
            entry.images.append((track_file, f"{title}: tracks"))
    except CorruptChunkError as error:
        notes.append(f"cannot draw: {error}")
    if cells is None:
        notes.append(f"no tables/{CELLS}")
    else:
        first, last = frame_counts(cells, n_frames)
        entry.cells = f"{first} → {last}"
        if TRACK_COLUMNS <= set(cells.columns):
            entry.tracks = str(cells["track_id"].nunique())
            parents = cells.groupby("track_id")["parent_track_id"].first()
            entry.daughters = str(int((parents != 0).sum()))
    entry.note = "; ".join(notes) or None
    return entry, figures


def _drawn_fields(
    draw: Callable[..., tuple[FieldEntry, dict[str, bytes]]],
    fields: Sequence[FieldOfView],
    names: Sequence[str],
    unfinished: dict[str, tuple[str, str | None]],
    client: Client | None,
) -> Iterator[tuple[FieldEntry, dict[str, bytes]]]:
    """``draw`` of every field in order: here, or on ``client``'s workers all at once."""
    if client is None:
        for fov, name in zip(fields, names, strict=True):
            yield draw(fov, name, unfinished=unfinished.get(fov.path))
        return
    futures = [
        client.submit(draw, fov, name, unfinished=unfinished.get(fov.path), pure=False)
        for fov, name in zip(fields, names, strict=True)
    ]
    for future in futures:  # in order, each released once its figures are written
        yield future.result()
        future.release()


def write_qc_report(
    output: str | os.PathLike,
    report_dir: str | os.PathLike,
    *,
    channel: int | str = 0,
    timepoints: int = 3,
    max_pixels: int = 1024,
    client: Client | None = None,
) -> UPath:
    """Write a quality-control report (PNG figures and ``index.html``) of a run's output.

    Parameters
    ----------
    output
        A plate or lone image written by :func:`pipeline.run`.
    report_dir
        Folder for the report (created if needed; files of the same names are replaced), local
        or in a bucket (``s3://``: written locally, then uploaded).
    channel
        Channel shown, by index or name.
    timepoints
        Number of timepoints in each outline figure, spread from the first to the last.
    max_pixels
        Largest y/x size read per field: the finest pyramid level within it is used (labels
        from the same level), or the coarsest level read with a stride.
    client
        A Dask cluster's client: the fields' figures are drawn on its workers, in parallel
        (they come back as PNG bytes, so the workers need not see ``report_dir``); None: here.

    Returns
    -------
    UPath
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
    root, plate = open_output(output)
    destination = location(report_dir)
    with local_copy_of(destination) as report:
        _write_report(output, root, plate, report, channel, timepoints, max_pixels, client)
    return destination / INDEX_FILE


def _write_report(
    output: str | os.PathLike,
    root: zarr.Group,
    plate: Plate | None,
    report: Path,
    channel: int | str,
    timepoints: int,
    max_pixels: int,
    client: Client | None,
) -> None:
    run = run_record(root)
    unfinished = unfinished_units(run)
    fields = plate.fields if plate is not None else ()
    taken: set[str] = set()
    names = [unique_name(fov.path, taken) for fov in fields]
    draw = partial(
        _field_entry, root, channel=channel, timepoints=timepoints, max_pixels=max_pixels
    )
    entries = []
    for entry, figures in _drawn_fields(draw, fields, names, unfinished, client):
        for file_name, png in figures.items():
            (report / file_name).write_bytes(png)
        entries.append(entry)
    listed = {fov.path for fov in fields}
    entries += [
        FieldEntry(path, state, error=error)
        for path, (state, error) in unfinished.items()
        if path not in listed
    ]
    plate_figures = []
    if plate is not None and plate.is_plate and plate.rows and plate.columns:
        write_heatmap(
            plate_well_counts(root, plate), plate.rows, plate.columns, report / HEATMAP_FILE
        )
        plate_figures.append(("Cells per well", HEATMAP_FILE))
        fractions = plate_class_fractions(root, plate)
        if fractions is not None:
            write_class_fractions(fractions, plate.rows, plate.columns, report / CLASSES_FILE)
            plate_figures.append(("Cell classes per well", CLASSES_FILE))
        growth = location(output) / "tables" / WELL_GROWTH / TABLE_FILE
        if growth.is_file():
            write_growth_curves(tables.read_table(root, WELL_GROWTH), report / GROWTH_FILE)
            plate_figures.append(("Growth and reporter per well", GROWTH_FILE))
    index = report / INDEX_FILE
    index.write_text(index_html(str(output), run, entries, plate_figures), encoding="utf-8")
