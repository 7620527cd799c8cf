"""Import image files into OME-Zarr 0.5: one image, or an HCS plate of one field per file or
per scene.

TIFF files are read by :mod:`pipeline.io.tiff`; ND2, CZI and LIF files, and OME-TIFFs holding
several images, by :mod:`pipeline.io.microscope` (bioio), each scene a field. Each step the
files do not calibrate is written as 1.0, with a warning.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import tifffile
import zarr

from pipeline.errors import InputWarning, PipelineInputError
from pipeline.io.microscope import VENDOR_SUFFIXES, read_scenes
from pipeline.io.omezarr import create_root, write_image, write_plate_metadata, write_well
from pipeline.io.tiff import SourceImage, expand_paths, natural_key, read_tiff

__all__ = ["DEFAULT_WELL_PATTERN", "default_n_levels", "import_images"]

#: File names such as ``A01_f0.tif``, ``B3.nd2``, ``C12_s2.ome.tif`` (case-insensitive).
DEFAULT_WELL_PATTERN = (
    r"^(?P<row>[A-Za-z]{1,2})(?P<column>\d{1,3})(?:[_-][fs](?P<field>\d+))?"
    r"(?:\.ome)?\.(?:tiff?|nd2|czi|lif)$"
)


def default_n_levels(shape_yx: tuple[int, int], max_size: int = 512) -> int:
    """Number of pyramid levels (halving y and x) that brings both under ``max_size``.

    Parameters
    ----------
    shape_yx
        Size of the full-resolution image in y and x.
    max_size
        Largest y or x size wanted at the coarsest level.

    Returns
    -------
    int
        At least 1.
    """
    largest = max(shape_yx)
    return 1 + max(0, math.ceil(math.log2(largest / max_size)))


def import_images(
    paths: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    axes: str | None = None,
    pixel_size: Mapping[str, float] | None = None,
    stack_axis: str | None = None,
    channel_names: Sequence[str] | None = None,
    plate: bool = False,
    pattern: str = DEFAULT_WELL_PATTERN,
    n_levels: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write image files as one OME-Zarr 0.5 image, or as an HCS plate.

    TIFF files are read with tifffile (:func:`read_tiff`); ND2, CZI and LIF files, and
    OME-TIFFs holding several images, through bioio (:func:`pipeline.io.microscope.read_scenes`),
    each of their scenes a field.

    Parameters
    ----------
    paths
        Files or a folder of TIFF files (see `read_tiff`).
    out
        The OME-Zarr to create.
    axes, pixel_size, stack_axis, channel_names
        As in `read_tiff`; for a plate they apply to every file (``axes`` and ``stack_axis``
        to plain TIFF files only).
    plate
        If True, each file is one well (parsed from the file name with ``pattern``), each of
        its images (scenes) a field; otherwise the files make one image, or, for one file
        of several scenes, one well (``A/1``) of one field per scene.
    pattern
        Regular expression with named groups ``row``, ``column`` and optionally ``field``,
        searched in each file name.
    n_levels
        Pyramid levels; default `default_n_levels` of the image.
    overwrite
        Replace an existing ``out``.

    Returns
    -------
    Path
        ``out``.

    Warns
    -----
    UserWarning
        For each step neither the files nor ``pixel_size`` give (1.0 is written), and when
        several files are stacked along a guessed axis.
    """
    files = expand_paths(paths)
    overrides = {"pixel_size": pixel_size, "channel_names": channel_names}
    by_scene = {path for path in files if _has_scenes(path)}  # each file opened once for this

    def images_of(path: Path) -> list[SourceImage]:
        if path not in by_scene:
            return [read_tiff(path, axes=axes, **overrides)]
        if axes is not None:
            raise PipelineInputError("--axes applies to plain TIFF files only", path)
        return read_scenes(path, **overrides)

    if plate:
        wells = {
            well: [image for path in well_files for image in images_of(path)]
            for well, well_files in _files_by_well(files, pattern).items()
        }
    else:
        if not by_scene:
            images = [read_tiff(files, axes=axes, stack_axis=stack_axis, **overrides)]
        elif len(files) == 1:
            images = images_of(files[0])
        else:
            raise PipelineInputError(
                f"{len(files)} files given, and some are read by scene: import them as a plate "
                "(--plate: one well per file, named like A01.nd2) or one by one",
                files[0],
            )
        wells = {("A", "1"): images}
    if not plate and len(wells[("A", "1")]) == 1:  # a lone image
        (image,) = wells[("A", "1")]
        _warn_uncalibrated([image])
        root = create_root(out, overwrite=overwrite)
        _write_field(root, "", image, n_levels)
        return Path(out)
    _warn_uncalibrated([image for fields in wells.values() for image in fields])
    root = create_root(out, overwrite=overwrite)
    write_plate_metadata(
        root,
        name=Path(out).name.removesuffix(".zarr").removesuffix(".ome"),
        rows=sorted({row for row, _ in wells}, key=_row_order),
        columns=sorted({column for _, column in wells}, key=natural_key),
        wells=list(wells),
        field_count=max(len(fields) for fields in wells.values()),
    )
    for (row, column), fields in wells.items():
        well = write_well(root, row, column, [str(i) for i in range(len(fields))])
        for index, image in enumerate(fields):
            _write_field(well, str(index), image, n_levels)
    return Path(out)


def _has_scenes(path: Path) -> bool:
    """Read through bioio: a vendor format, or an OME-TIFF of several images."""
    if path.suffix.lower() in VENDOR_SUFFIXES:
        return True
    try:
        with tifffile.TiffFile(path) as tif:
            return tif.is_ome and len(tif.series) > 1
    except (tifffile.TiffFileError, ValueError, OSError):
        return False  # read_tiff says what is wrong with it


_DEFAULT_STEP = {
    "x": "pixel size 1.0 um written (give --pixel-size, or pixel_size={'x': ..., 'y': ...})",
    "z": "z step 1.0 um written (give --z-step, or pixel_size={'z': ...})",
    "t": "frame interval 1 s written (give --time-step, or pixel_size={'t': ...}, in seconds)",
}


def _warn_uncalibrated(images: list[SourceImage]) -> None:
    """One warning per step that some of ``images`` lack, naming the first such file."""
    for dims in (("x", "y"), ("z",), ("t",)):
        lacking = [
            image
            for image in images
            if any(d in image.scale and d not in image.calibrated for d in dims)
        ]
        if lacking:
            more = f" (and {len(lacking) - 1} more files)" if len(lacking) > 1 else ""
            warnings.warn(
                f"no {'/'.join(dims)} calibration in {lacking[0].source}{more}: "
                f"{_DEFAULT_STEP[dims[0]]}",
                InputWarning,
                stacklevel=3,
            )


def _write_field(parent: zarr.Group, name: str, image: SourceImage, n_levels: int | None) -> None:
    levels = default_n_levels(image.data.shape[-2:]) if n_levels is None else n_levels
    write_image(
        parent,
        name,
        image.data,
        image.dims,
        image.scale,
        channel_names=image.channel_names,
        n_levels=levels,
    )


def _row_order(row: str) -> tuple[int, str]:
    """Plate row order: A..Z, then AA..AF."""
    return len(row), row


def _files_by_well(files: list[Path], pattern: str) -> dict[tuple[str, str], list[Path]]:
    """Files per well (row, column), wells in plate order, fields in field-number order."""
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise PipelineInputError(f"invalid well pattern {pattern!r} ({error})") from error
    if not {"row", "column"} <= set(regex.groupindex):
        raise PipelineInputError(f"well pattern {pattern!r} needs groups 'row' and 'column'")
    fields: dict[tuple[str, str], list[tuple[list[int | str], Path]]] = {}
    for path in files:
        match = regex.search(path.name)
        if match is None:
            raise PipelineInputError(f"file name does not match the well pattern {pattern!r}", path)
        column = match["column"]
        well = (match["row"].upper(), str(int(column)) if column.isdigit() else column)
        field = match.groupdict().get("field") or ""
        fields.setdefault(well, []).append((natural_key(field), path))
    by_well = {}
    for well in sorted(fields, key=lambda w: (_row_order(w[0]), natural_key(w[1]))):
        numbered = sorted(fields[well], key=lambda item: (item[0], natural_key(item[1].name)))
        if any(a[0] == b[0] for a, b in itertools.pairwise(numbered)):
            raise PipelineInputError(
                f"well {well[0]}{well[1]} has two files for the same field "
                f"({', '.join(path.name for _, path in numbered)})",
                numbered[0][1].parent,
            )
        by_well[well] = [path for _, path in numbered]
    return by_well
