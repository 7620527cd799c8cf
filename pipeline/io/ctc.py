"""Cell Tracking Challenge (CTC) export and import of tracked label images.

The CTC format (Maška et al., Nature Methods 2023; celltrackingchallenge.net) stores a
tracking result as a folder of label images, ``maskTTT.tif`` (one uint16 image per frame,
``TTT`` the zero-padded frame number), and a track file ``res_track.txt`` with one line
``L B E P`` per track: the track label ``L`` (the pixel value of that track in every mask),
its first and last frames ``B`` and ``E``, and its parent track ``P`` (0 = none). A track
that divides ends; its daughters start new tracks whose ``P`` is the mother. Ground truth
uses the same layout with ``man_trackTTT.tif`` and ``man_track.txt``.

:func:`write_ctc` turns a label time series plus a tracked cell table (as returned by
:func:`pipeline.tracking.track`) into a result folder, :func:`read_ctc` reads a result or
ground-truth folder back into labels and the same kind of cell table, and
:func:`export_ctc` exports one field of a ``pipeline run`` output.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import tifffile

from pipeline.errors import PipelineInputError

__all__ = ["export_ctc", "read_ctc", "read_track_file", "split_at_gaps", "write_ctc"]

RESULT_TRACK_FILE = "res_track.txt"
GROUND_TRUTH_TRACK_FILE = "man_track.txt"
_MASK_PATTERN = re.compile(r"^(mask|man_track)(\d+)\.tiff?$")
_TRACK_COLUMNS = ("track_id", "first", "last", "parent_track_id")
_REQUIRED_COLUMNS = ("t", "label", "track_id", "parent_track_id")
_MAX_TRACK_ID = np.iinfo(np.uint16).max


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_ctc(
    labels: Any,
    tracks: pd.DataFrame,
    directory: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a tracked label time series as a CTC result folder.

    Each frame's labels are replaced by their track ids and written as ``maskTTT.tif``
    (uint16; ``TTT`` is the frame index, 3 digits, more when there are over 1000 frames),
    then ``res_track.txt`` lists every track sorted by id. Frames are processed one at a
    time, so a dask array is never loaded whole.

    Parameters
    ----------
    labels
        Integer array ``(t, y, x)`` or ``(t, z, y, x)`` (numpy or dask) of cell labels,
        0 = background. Frame ``i`` is the table's ``t == i``.
    tracks
        One row per object with columns ``t``, ``label``, ``track_id`` and
        ``parent_track_id`` (0 or NaN = no parent), e.g. the output of
        :func:`pipeline.tracking.track` or the cell table of a ``pipeline run``. Rows whose
        label is not in their frame are ignored: they count neither for the track's first
        and last frame nor as a track; a parent that ends up with no pixels is written as 0.
    directory
        Result folder; created if needed.
    overwrite
        Allow a non-empty ``directory``: its ``mask*.tif`` files and ``res_track.txt`` are
        replaced, nothing else is touched.

    Returns
    -------
    Path
        The result folder.

    Raises
    ------
    PipelineInputError
        A column is missing, a track id is not in 1..65535 (the uint16 limit of the
        format), an object of the image is not in the table (the frame is named), two
        objects of one frame share a track id, or ``directory`` is non-empty without
        ``overwrite``.
    """
    folder = Path(directory)
    labels = labels if isinstance(labels, da.Array) else np.asarray(labels)
    if labels.ndim not in (3, 4) or not np.issubdtype(labels.dtype, np.integer):
        raise PipelineInputError(
            f"labels must be an integer (t, [z,] y, x) array, got {labels.ndim}D {labels.dtype}",
            folder,
        )
    n_frames = labels.shape[0]
    table = split_at_gaps(_validated_tracks(tracks, n_frames, folder))
    if len(table) and table["track_id"].max() > _MAX_TRACK_ID:
        raise PipelineInputError(
            f"splitting tracks at their gaps needs ids up to {table['track_id'].max()}: CTC "
            "masks are uint16, so track ids must be renumbered below 65536 first",
            folder,
        )
    _prepare_folder(folder, overwrite)

    width = max(3, len(str(n_frames - 1)))
    rows_by_frame = {t: rows for t, rows in table.groupby("t", sort=True)}
    present: list[pd.DataFrame] = []
    for t in range(n_frames):
        frame = np.asarray(labels[t])
        rows = rows_by_frame.get(t, table.iloc[:0])
        mask, found = _relabel_frame(frame, rows, t, folder)
        tifffile.imwrite(
            folder / f"mask{t:0{width}d}.tif", mask, photometric="minisblack", compression="zlib"
        )
        present.append(rows[found])
    written = pd.concat(present, ignore_index=True)
    _track_lines(written).to_csv(folder / RESULT_TRACK_FILE, sep=" ", header=False, index=False)
    return folder


def split_at_gaps(tracks: pd.DataFrame) -> pd.DataFrame:
    """Give each run of consecutive frames of a track its own id, as the CTC format requires.

    A track closed across a gap (missing frames) becomes one CTC track per run: the first run
    keeps the track id, each later run gets a new id (above every id in the table) whose
    parent is the run before the gap; daughters of a track point to its last run. Tracks
    without gaps are unchanged. Rows keep their order; only ``track_id`` and
    ``parent_track_id`` change.
    """
    if tracks.empty:
        return tracks.copy()
    track_ids = tracks["track_id"].to_numpy(dtype=np.int64)
    frames = tracks["t"].to_numpy(dtype=np.int64)
    order = np.lexsort((frames, track_ids))
    ids, times = track_ids[order], frames[order]
    new_track = np.r_[True, ids[1:] != ids[:-1]]
    new_run = new_track | np.r_[True, times[1:] != times[:-1] + 1]
    run_of_row = np.cumsum(new_run) - 1
    run_starts = np.flatnonzero(new_run)
    run_ids = ids[run_starts].copy()
    continuations = np.flatnonzero(~new_track[run_starts])
    run_ids[continuations] = ids.max() + 1 + np.arange(len(continuations))
    last_run_of_track = pd.Series(run_ids, index=ids[run_starts]).groupby(level=0).last()
    parents = tracks["parent_track_id"].fillna(0).to_numpy(dtype=np.int64)[order][run_starts]
    run_parents = pd.Series(parents).map(last_run_of_track).fillna(0).to_numpy(dtype=np.int64)
    run_parents[continuations] = run_ids[continuations - 1]
    result = tracks.copy()
    new_ids, new_parents = np.empty_like(track_ids), np.empty_like(track_ids)
    new_ids[order] = run_ids[run_of_row]
    new_parents[order] = run_parents[run_of_row]
    result["track_id"] = new_ids
    result["parent_track_id"] = new_parents
    return result


def _validated_tracks(tracks: pd.DataFrame, n_frames: int, folder: Path) -> pd.DataFrame:
    """Check the columns and ids of the track table; return ``t, label, track_id, parent``."""
    missing = [column for column in _REQUIRED_COLUMNS if column not in tracks.columns]
    if missing:
        raise PipelineInputError(
            f"the track table lacks the column(s) {missing}; columns are {list(tracks.columns)}",
            folder,
        )
    table = tracks[list(_REQUIRED_COLUMNS)].copy()
    table["parent_track_id"] = table["parent_track_id"].fillna(0)
    for column in _REQUIRED_COLUMNS:
        values = table[column].to_numpy(dtype=np.float64)
        if not (np.isfinite(values) & (values == np.round(values))).all():
            raise PipelineInputError(f"column {column!r} must hold integers", folder)
        table[column] = values.astype(np.int64)
    for column in ("track_id", "parent_track_id"):
        low = 1 if column == "track_id" else 0
        bad = table[column][(table[column] < low) | (table[column] > _MAX_TRACK_ID)]
        if len(bad):
            raise PipelineInputError(
                f"{column} {int(bad.iloc[0])} is outside {low}..{_MAX_TRACK_ID}: CTC masks are "
                "uint16, so track ids must be renumbered below 65536 first",
                folder,
            )
    table = table[(table["t"] >= 0) & (table["t"] < n_frames)]
    duplicated = table.duplicated(["t", "track_id"])
    if duplicated.any():
        row = table[duplicated].iloc[0]
        raise PipelineInputError(
            f"track {row['track_id']} has two objects in frame {row['t']}; a CTC track has at "
            "most one object per frame",
            folder,
        )
    return table.drop_duplicates(["t", "label"]).reset_index(drop=True)


def _prepare_folder(folder: Path, overwrite: bool) -> None:
    """Create ``folder``; refuse a non-empty one unless ``overwrite`` (then clear old output)."""
    if folder.exists() and not folder.is_dir():
        raise PipelineInputError("CTC output is not a folder", folder)
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise PipelineInputError("CTC output folder exists and is not empty", folder)
        for path in folder.iterdir():
            match = _MASK_PATTERN.match(path.name)
            if (match and match.group(1) == "mask") or path.name == RESULT_TRACK_FILE:
                path.unlink()
    folder.mkdir(parents=True, exist_ok=True)


def _relabel_frame(
    frame: np.ndarray, rows: pd.DataFrame, t: int, folder: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Map one frame's labels to track ids; also return which rows were found in the frame."""
    order = np.argsort(rows["label"].to_numpy(), kind="stable")
    keys = rows["label"].to_numpy()[order]
    values = rows["track_id"].to_numpy()[order]
    flat = frame.ravel()
    foreground = flat != 0
    pixels = flat[foreground].astype(np.int64)
    position = np.searchsorted(keys, pixels)
    if len(keys):
        known = keys[np.minimum(position, len(keys) - 1)] == pixels
    else:
        known = np.zeros(len(pixels), dtype=bool)
    if not known.all():
        unknown = np.unique(pixels[~known])
        raise PipelineInputError(
            f"frame {t} has {len(unknown)} label(s) not in the track table "
            f"(first: {unknown[:5].tolist()})",
            folder,
        )
    mask = np.zeros(flat.shape, dtype=np.uint16)
    mask[foreground] = values[position]
    found_sorted = np.zeros(len(keys), dtype=bool)
    found_sorted[np.unique(position)] = True
    found = np.empty(len(keys), dtype=bool)
    found[order] = found_sorted
    return mask.reshape(frame.shape), found


def _track_lines(objects: pd.DataFrame) -> pd.DataFrame:
    """``L B E P`` per track, sorted by ``L``; parents that were not written become 0."""
    if objects.empty:
        return pd.DataFrame(columns=list(_TRACK_COLUMNS), dtype=np.int64)
    grouped = objects.groupby("track_id", sort=True)
    lines = pd.DataFrame(
        {
            "track_id": grouped["t"].min().index.to_numpy(),
            "first": grouped["t"].min().to_numpy(),
            "last": grouped["t"].max().to_numpy(),
            "parent_track_id": grouped["parent_track_id"].max().to_numpy(),
        }
    )
    dangling = (lines["parent_track_id"] != 0) & ~lines["parent_track_id"].isin(lines["track_id"])
    lines.loc[dangling, "parent_track_id"] = 0
    return lines.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_track_file(path: str | Path) -> pd.DataFrame:
    """Read a CTC track file (``res_track.txt`` or ``man_track.txt``).

    Parameters
    ----------
    path
        The track file: lines ``L B E P`` (label, first frame, last frame, parent label).

    Returns
    -------
    pandas.DataFrame
        Columns ``track_id``, ``first``, ``last``, ``parent_track_id`` (int64), in file order.

    Raises
    ------
    PipelineInputError
        The file is missing, a line is not four non-negative integers with ``L > 0`` and
        ``B <= E``, or a label is listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineInputError("CTC track file not found", path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            values = [int(part) for part in parts]
        except ValueError:
            values = []
        if len(values) != 4 or values[0] < 1 or min(values) < 0 or values[1] > values[2]:
            raise PipelineInputError(
                f"line {number} is not 'L B E P' (label > 0, first <= last, parent >= 0): "
                f"{line.strip()!r}",
                path,
            )
        rows.append(values)
    lines = pd.DataFrame(rows, columns=list(_TRACK_COLUMNS), dtype=np.int64)
    repeated = lines["track_id"][lines["track_id"].duplicated()]
    if len(repeated):
        raise PipelineInputError(f"track {int(repeated.iloc[0])} is listed twice", path)
    return lines


def read_ctc(
    directory: str | Path, *, frames: Sequence[int] | None = None
) -> tuple[da.Array, pd.DataFrame]:
    """Read a CTC result or ground-truth folder into labels and a tracked cell table.

    The layout is detected: ``maskTTT.tif`` + ``res_track.txt`` (a result) or
    ``man_trackTTT.tif`` + ``man_track.txt`` (ground truth, e.g. a ``TRA`` folder).

    Parameters
    ----------
    directory
        The folder holding the masks and the track file.
    frames
        Frame numbers (from the file names) to read; default all. With a subset, labels
        that the track file lists but no read frame holds are not reported.

    Returns
    -------
    labels : dask.array.Array
        The masks stacked lazily, ``(t, [z,] y, x)``, in increasing frame number. Index
        ``i`` along the first axis is the ``i``-th frame read (its number is the table's
        ``t``; frame numbers need not start at 0).
    objects : pandas.DataFrame
        One row per object (label present in a frame): ``t`` (frame number), ``label``,
        ``z`` (3D only), ``y``, ``x`` (centroid in pixels), ``area`` (pixel count),
        ``track_id`` (= label) and ``parent_track_id`` (from the track file, 0 = none),
        sorted by ``t`` then ``label``: the columns :func:`pipeline.tracking.track` adds.

    Raises
    ------
    PipelineInputError
        The folder is missing, holds no masks or both layouts, lacks its track file, the
        track file is malformed, a requested frame is missing, or a mask holds a label the
        track file does not list (the frame file is named).

    Warns
    -----
    UserWarning
        When all frames are read and the track file lists labels found in no mask (CTC
        ground truth may hold such entries); they are left out of ``objects``.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise PipelineInputError("CTC folder not found", folder)
    prefix, mask_files = _mask_files(folder)
    track_path = folder / (GROUND_TRUTH_TRACK_FILE if prefix == "man_track" else RESULT_TRACK_FILE)
    lines = read_track_file(track_path)
    if frames is not None:
        wanted = sorted({int(frame) for frame in frames})
        missing = [frame for frame in wanted if frame not in mask_files]
        if missing:
            raise PipelineInputError(f"no mask file for frame(s) {missing[:5]}", folder)
        mask_files = {frame: mask_files[frame] for frame in wanted}

    numbers = sorted(mask_files)
    with tifffile.TiffFile(mask_files[numbers[0]]) as tiff:
        shape, dtype = tiff.series[0].shape, tiff.series[0].dtype
    labels = da.stack(
        [
            da.from_delayed(
                dask.delayed(_read_mask)(mask_files[frame], shape), shape=shape, dtype=dtype
            )
            for frame in numbers
        ]
    )
    parents = dict(zip(lines["track_id"], lines["parent_track_id"], strict=True))
    tables = [
        _frame_objects(np.asarray(labels[index]), frame, parents, mask_files[frame])
        for index, frame in enumerate(numbers)
    ]
    objects = pd.concat(tables, ignore_index=True)
    if frames is None:
        absent = sorted(set(lines["track_id"]) - set(objects["label"]))
        if absent:
            warnings.warn(
                f"{track_path}: {len(absent)} track(s) listed but in no mask, left out: "
                f"{absent[:10]}",
                stacklevel=2,
            )
    return labels, objects


def _mask_files(folder: Path) -> tuple[str, dict[int, Path]]:
    """The layout (``mask`` or ``man_track``) and its mask file per frame number."""
    found: dict[str, dict[int, Path]] = {"mask": {}, "man_track": {}}
    for path in folder.iterdir():
        match = _MASK_PATTERN.match(path.name)
        if match:
            found[match.group(1)][int(match.group(2))] = path
    layouts = [prefix for prefix, files in found.items() if files]
    if not layouts:
        raise PipelineInputError("no CTC masks (maskTTT.tif or man_trackTTT.tif) in folder", folder)
    if len(layouts) == 2:
        raise PipelineInputError(
            "folder holds both result masks (mask*.tif) and ground truth (man_track*.tif)", folder
        )
    return layouts[0], found[layouts[0]]


def _read_mask(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """One mask image, checked to have the shape of the first frame."""
    image = tifffile.imread(path)
    if image.shape != tuple(shape):
        raise PipelineInputError(f"mask shape {image.shape} differs from {tuple(shape)}", path)
    return image


def _frame_objects(frame: np.ndarray, t: int, parents: dict[int, int], path: Path) -> pd.DataFrame:
    """Centroid (pixels) and area of every label of one frame, with its track and parent."""
    flat = frame.ravel().astype(np.int64)
    if flat.size and flat.min() < 0:
        raise PipelineInputError("mask holds negative labels", path)
    size = int(flat.max()) + 1 if flat.size else 1
    counts = np.bincount(flat, minlength=size)
    present = np.flatnonzero(counts)
    present = present[present != 0]
    dims = ("y", "x") if frame.ndim == 2 else ("z", "y", "x")
    columns: dict[str, Any] = {
        "t": np.full(len(present), t, dtype=np.int64),
        "label": present.astype(np.int64),
    }
    for axis, dim in enumerate(dims):
        grid = np.arange(frame.shape[axis], dtype=np.float64).reshape(
            [-1 if a == axis else 1 for a in range(frame.ndim)]
        )
        weights = np.broadcast_to(grid, frame.shape).ravel()
        columns[dim] = np.bincount(flat, weights=weights, minlength=size)[present] / counts[present]
    columns["area"] = counts[present].astype(np.int64)
    unknown = [label for label in present.tolist() if label not in parents]
    if unknown:
        raise PipelineInputError(
            f"frame {t} holds {len(unknown)} label(s) not in the track file (first: {unknown[:5]})",
            path,
        )
    columns["track_id"] = present.astype(np.int64)
    columns["parent_track_id"] = np.array([parents[label] for label in present], dtype=np.int64)
    return pd.DataFrame(columns)


# --------------------------------------------------------------------------------------------
# Export of a pipeline output
# --------------------------------------------------------------------------------------------


def export_ctc(
    output_zarr: str | Path, field: str, directory: str | Path, *, overwrite: bool = False
) -> Path:
    """Export the tracked cells of one field of a ``pipeline run`` output in CTC format.

    Parameters
    ----------
    output_zarr
        The OME-Zarr written by ``pipeline run``.
    field
        Field path such as ``"A/1/0"``, or ``""`` for a lone image.
    directory
        Result folder to write (see :func:`write_ctc`).
    overwrite
        Replace the masks and track file of a non-empty ``directory``.

    Returns
    -------
    Path
        The result folder.

    Raises
    ------
    PipelineInputError
        The output or field is missing, it has no ``labels/cells`` or no ``cells`` table, or
        :func:`write_ctc` refuses the data.
    """
    import zarr

    from pipeline.io.omezarr import open_image, open_labels
    from pipeline.io.tables import read_table

    field = field.strip("/")
    location = f"{Path(output_zarr).resolve()}/{field}".rstrip("/")
    open_image(output_zarr, image_path=field)  # checks the output and the field exist
    cells = open_labels(output_zarr, image_path=field, name="cells")
    group = zarr.open_group(str(output_zarr), mode="r")
    try:
        table = read_table(group[field] if field else group, "cells")
    except FileNotFoundError:
        raise PipelineInputError("field has no cell table tables/cells", location) from None
    labels = cells.levels[0].dask_array()
    if "t" not in cells.data.dims:
        labels = labels[None]
        table = table.assign(t=0) if "t" not in table.columns else table
    return write_ctc(labels, table, directory, overwrite=overwrite)
