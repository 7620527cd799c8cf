"""Simulated high-content screening plates with exact ground truth.

Cells are ellipses (2D) or ellipsoids (3D) of random orientation that move (a persistent random
walk with soft repulsion, so they touch without piling up), grow exponentially and divide into two
daughters when they reach twice their birth size. Every frame is rendered to a label image in which
each pixel belongs to at most one cell: the cell with the smallest normalised ellipse distance
below 1. Ids are track-consistent as in the Cell Tracking Challenge (a cell keeps its id in every
frame, a daughter gets a new id), and the lineage table is in the CTC ``man_track`` form.

Images are formed from the labels: a nuclear channel (per-cell brightness, a dome profile and
texture) and a cytoplasm channel (a per-cell reporter on a ring around the nucleus and, inside
the nucleus, a third to three times the ring's level), both blurred by a Gaussian PSF,
multiplied by an uneven illumination field, with a background, shot noise, camera offset and
read noise, stored as uint16.

Co-cultures (``cell_types`` 2 or 3): every cell has a type, inherited by its daughters. The
types' sizes are drawn alike (they overlap completely); they differ in the nucleus' look. Type
0 is round with a smooth texture, type 1 elongated (axis ratio about 2) with a coarse, grainy
chromatin texture, type 2 round with a bright rim and a dim centre. A third channel, "marker",
labels type 1 over the whole cell (log-normal levels, eight times higher on average than the
other types' and overlapping in the tails), as a fluorescent marker of one line of a
co-culture does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import dask.array as da
import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial.transform import Rotation
from skimage.segmentation import expand_labels

from pipeline.errors import PipelineInputError

if TYPE_CHECKING:
    import zarr

__all__ = [
    "CHANNEL_NAMES",
    "GROUND_TRUTH_TYPES",
    "LINEAGE_COLUMNS",
    "MARKER_CHANNEL",
    "SimulatedField",
    "field_seed",
    "read_ground_truth",
    "simulate_field",
    "simulate_plate",
]

CHANNEL_NAMES = ("nuclei", "cytoplasm")
MARKER_CHANNEL = "marker"
GROUND_TRUTH_TYPES = "ground_truth_types"
_TYPE_ELONGATION = (0.15, 0.35, 0.15)  # standard deviation of the log semi-axis ratios
_MARKER_LEVELS = (20.0, 160.0, 20.0)  # mean marker photo-electrons per type
_MARKER_LOG_SD = 0.6
LINEAGE_COLUMNS = ("label", "first", "last", "parent")
GROUND_TRUTH_LABELS = "ground_truth"
GROUND_TRUTH_LINEAGE = "ground_truth_lineage"

_CONTACT_FACTOR = 0.9  # centres repel below this fraction of the summed equivalent radii
_RELAX_ITERATIONS = 4
_DOME = 0.3  # nuclear brightness falls by this fraction from the centre to the rim
# Reporter level inside the nucleus relative to the ring: a cell's base level is log-uniform
# within a factor of 2 either way, and it pulses over time by up to a factor of 1.5 either way
# (period 8 frames, phase set by the cell's id): cytoplasm/nucleus ratios of 1/3 to 3, as kinase
# translocation reporters show (Regot et al. 2014, ~0.3-3).
_LOG_RATIO_RANGE = float(np.log(2.0))
_PULSE_LOG_DEPTH = float(np.log(1.5))
_PULSE_FRAMES = 8.0
_GOLDEN = 0.6180339887498949


def _nuclear_fraction_at(cell: _Cell, t: int) -> float:
    """The cell's reporter level inside its nucleus at frame ``t``, relative to its ring (no
    random draw: the same seed gives the same images as without the pulses' truth)."""
    phase = 2.0 * np.pi * ((cell.label * _GOLDEN) % 1.0)
    pulse = np.sin(2.0 * np.pi * t / _PULSE_FRAMES + phase)
    return float(cell.nuclear_fraction * np.exp(_PULSE_LOG_DEPTH * pulse))


_MEAN_SIZE_OVER_BIRTH = 1.4  # mean size of an exponentially growing cell relative to its birth size


@dataclass(frozen=True)
class SimulatedField:
    """One simulated field of view with its ground truth.

    Attributes
    ----------
    image
        ``(t, c, y, x)`` or ``(t, c, z, y, x)`` uint16; channel 0 "nuclei", channel 1 "cytoplasm".
    labels
        ``(t, y, x)`` or ``(t, z, y, x)`` uint32 nuclei with track-consistent ids.
    lineage
        CTC ``man_track`` table: int64 columns ``label, first, last, parent`` (0 = no parent).
    pixel_size
        Micrometres per pixel along ``"y"``, ``"x"`` and, in 3D, ``"z"``.
    cells
        Whole cells, like ``labels``: each nucleus and the ring of ``ring_width_um`` around it
        on which the cytoplasm channel's reporter lies (a cell shares its nucleus' id).
    reporter
        Truth of the reporter per cell and frame: ``t``, ``label``, ``reporter`` (expected
        signal on the ring), ``nuclear_fraction`` (level inside the nucleus relative to the
        ring at that frame: a per-cell base level that pulses over time) and
        ``ratio_cytoplasm_nucleus`` (= 1 / nuclear_fraction, before blur, background and
        illumination).
    types
        Truth of the co-culture: ``label``, ``cell_type`` (0, 1, 2) and ``marker`` (expected
        marker signal) per cell; every cell type 0 when only one type was simulated.
    """

    image: np.ndarray
    labels: np.ndarray
    lineage: pd.DataFrame
    pixel_size: dict[str, float]
    cells: np.ndarray
    reporter: pd.DataFrame
    types: pd.DataFrame

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Names of the image's channels."""
        return CHANNEL_NAMES + ((MARKER_CHANNEL,) if self.image.shape[1] > 2 else ())


@dataclass
class _Cell:
    """Mutable state of one simulated cell; lengths in micrometres, axes ordered ``(z,) y, x``."""

    label: int
    parent: int
    centre: np.ndarray
    velocity: np.ndarray
    rotation: np.ndarray  # columns are the body axes in image coordinates
    axis_ratios: np.ndarray  # product 1; semi-axes are ratios times the equivalent radius
    size: float  # area (2D, um^2) or volume (3D, um^3)
    birth_size: float
    growth_rate: float  # log size increase per frame
    brightness: float  # expected nuclear photo-electrons at full illumination
    reporter: float  # expected cytoplasmic reporter photo-electrons at full illumination
    nuclear_fraction: float  # base reporter level inside the nucleus relative to the ring
    previous_centre: np.ndarray | None = None
    cell_type: int = 0
    marker: float = 0.0  # expected marker photo-electrons at full illumination

    @property
    def radius(self) -> float:
        """Radius of the disc or sphere of the same size."""
        if len(self.centre) == 2:
            return float(np.sqrt(self.size / np.pi))
        return float(np.cbrt(self.size * 3.0 / (4.0 * np.pi)))

    @property
    def semi_axes(self) -> np.ndarray:
        return self.axis_ratios * self.radius


@dataclass(frozen=True)
class _Knobs:
    """Validated simulation parameters shared by the dynamics and the image formation."""

    diameter: float
    step_fraction: float
    persistence: float
    max_step_fraction: float
    doubling_frames: float
    brightness: float
    brightness_cv: float
    texture: float
    reporter: float
    ring_width_um: float
    background: float
    camera_offset: float
    read_noise: float
    illumination_falloff: float
    psf_sigma_um: float
    psf_sigma_z_um: float


def field_seed(seed: int, row: int, column: int, field_index: int) -> int:
    """Seed of one field of a simulated plate, derived from the plate seed and its position.

    Parameters
    ----------
    seed
        Plate seed given to :func:`simulate_plate`.
    row, column, field_index
        Zero-based row, column and field indices.

    Returns
    -------
    int
        The seed to give :func:`simulate_field` to reproduce that field.
    """
    sequence = np.random.SeedSequence([seed, row, column, field_index])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])


def simulate_field(
    *,
    n_frames: int = 8,
    size: int | tuple[int, int] = 256,
    z_slices: int | None = None,
    cell_diameter_um: float = 10.0,
    pixel_size_um: float = 0.5,
    z_step_um: float = 1.5,
    density: float = 30.0,
    seed: int = 0,
    step_fraction: float = 0.08,
    persistence: float = 0.6,
    max_step_fraction: float = 0.25,
    doubling_frames: float = 12.0,
    brightness: float = 200.0,
    brightness_cv: float = 0.35,
    texture: float = 0.2,
    reporter: float = 80.0,
    ring_width_um: float = 3.0,
    background: float = 15.0,
    camera_offset: float = 100.0,
    read_noise: float = 4.0,
    illumination_falloff: float = 0.4,
    psf_sigma_um: float = 0.5,
    psf_sigma_z_um: float = 1.5,
    cell_types: int = 1,
) -> SimulatedField:
    """Simulate one time-lapse field of view of growing, moving, dividing cells.

    Parameters
    ----------
    n_frames
        Number of time points.
    size
        Field size in pixels, ``(y, x)`` or one number for a square.
    z_slices
        Number of z planes for a 3D field; ``None`` for 2D.
    cell_diameter_um
        Mean nucleus diameter (equivalent disc or sphere) over the cell cycle.
    pixel_size_um, z_step_um
        Pixel size in y and x, and z spacing (3D only), in micrometres.
    density
        Cells at the first frame per 100 x 100 um^2 of field area; the default covers about a
        quarter of the area at first and a third after 8 frames, so many cells touch.
    seed
        Random seed; the same seed gives identical arrays.
    step_fraction
        Root-mean-square random step per frame and axis, as a fraction of the diameter.
    persistence
        Velocity memory in ``[0, 1)``: 0 is a pure random walk.
    max_step_fraction
        Largest displacement of a cell centre in one frame, as a fraction of the diameter.
    doubling_frames
        Mean number of frames a cell takes to double its size and divide.
    brightness, brightness_cv
        Mean and coefficient of variation of the per-cell nuclear signal (photo-electrons).
    texture
        Relative amplitude of the smooth intra-nuclear texture.
    reporter
        Mean per-cell cytoplasmic reporter signal (photo-electrons).
    ring_width_um
        Width of the cytoplasm ring around each nucleus.
    background
        Background fluorescence (photo-electrons) under full illumination.
    camera_offset, read_noise
        Camera offset and Gaussian read-noise standard deviation (counts).
    illumination_falloff
        Relative illumination loss from the optical centre to the farthest field corner.
    psf_sigma_um, psf_sigma_z_um
        Standard deviations of the Gaussian PSF in y/x and in z.
    cell_types
        1, or 2-3 for a co-culture with a marker channel (see the module's description).

    Returns
    -------
    SimulatedField
        Images, track-consistent labels, lineage and pixel size.
    """
    shape_yx = (int(size),) * 2 if np.ndim(size) == 0 else tuple(size)
    shape = shape_yx if z_slices is None else (z_slices, *shape_yx)
    spacing = np.array(
        [pixel_size_um, pixel_size_um] if z_slices is None else [z_step_um, *[pixel_size_um] * 2]
    )
    knobs = _Knobs(
        diameter=cell_diameter_um,
        step_fraction=step_fraction,
        persistence=persistence,
        max_step_fraction=max_step_fraction,
        doubling_frames=doubling_frames,
        brightness=brightness,
        brightness_cv=brightness_cv,
        texture=texture,
        reporter=reporter,
        ring_width_um=ring_width_um,
        background=background,
        camera_offset=camera_offset,
        read_noise=read_noise,
        illumination_falloff=illumination_falloff,
        psf_sigma_um=psf_sigma_um,
        psf_sigma_z_um=psf_sigma_z_um,
    )
    _check_arguments(n_frames, shape, density, knobs)
    if cell_types not in (1, 2, 3):
        raise ValueError(f"cell_types must be 1, 2 or 3, got {cell_types}")
    rng = np.random.default_rng(seed)  # the cells: placement, growth, motion, division
    # The images' texture and noise draw from their own stream, so that how the cells move does
    # not depend on what the images look like (Poisson sampling takes a varying number of draws).
    imaging = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])
    extent = np.array(shape) * spacing
    area_um2 = extent[-2] * extent[-1]
    count = round(density * area_um2 / 1e4)
    cells = _initial_cells(rng, count, extent, knobs)
    if cell_types > 1:  # from a stream of their own: one-type fields stay as they were
        _assign_types(
            cells, np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0]), cell_types
        )
    _relax(cells, extent, knobs, iterations=30)
    for cell in cells:
        cell.centre[-2:] = np.clip(cell.centre[-2:], 0, np.nextafter(extent[-2:], 0))
    next_label = len(cells) + 1
    illumination = _illumination(rng, shape, knobs.illumination_falloff)

    labels = np.zeros((n_frames, *shape), dtype=np.uint32)
    whole_cells = np.zeros((n_frames, *shape), dtype=np.uint32)
    reporter_rows: list[tuple[int, int, float, float]] = []
    n_channels = len(CHANNEL_NAMES) + (cell_types > 1)
    image = np.zeros((n_frames, n_channels, *shape), dtype=np.uint16)
    tracks: dict[int, list[int]] = {}  # label -> [first, last, parent]
    types: dict[int, tuple[int, float]] = {}
    for t in range(n_frames):
        if t > 0:
            cells, next_label = _advance(cells, rng, extent, knobs, next_label)
        cells = [cell for cell in cells if _in_field(cell, extent)]
        frame_labels, distance2 = _render(cells, shape, spacing)
        present = set(np.unique(frame_labels).tolist())
        cells = [cell for cell in cells if cell.label in present]
        for cell in cells:
            tracks.setdefault(cell.label, [t, t, cell.parent])[1] = t
            types[cell.label] = (cell.cell_type, cell.marker)
        labels[t] = frame_labels
        whole_cells[t] = expand_labels(frame_labels, distance=knobs.ring_width_um, spacing=spacing)
        fractions = {cell.label: _nuclear_fraction_at(cell, t) for cell in cells}
        reporter_rows += [(t, cell.label, cell.reporter, fractions[cell.label]) for cell in cells]
        image[t] = _form_image(
            imaging,
            frame_labels,
            whole_cells[t],
            distance2,
            cells,
            fractions,
            illumination,
            spacing,
            knobs,
            marker=cell_types > 1,
        )

    lineage = pd.DataFrame(
        [(label, *track) for label, track in sorted(tracks.items())],
        columns=list(LINEAGE_COLUMNS),
        dtype=np.int64,
    )
    names = ("y", "x") if z_slices is None else ("z", "y", "x")
    pixel_size = {name: float(step) for name, step in zip(names, spacing, strict=True)}
    reporter = pd.DataFrame(
        reporter_rows, columns=["t", "label", "reporter", "nuclear_fraction"]
    ).astype({"t": "int64", "label": "int64"})
    reporter["ratio_cytoplasm_nucleus"] = 1.0 / reporter["nuclear_fraction"]
    return SimulatedField(
        image=image,
        labels=labels,
        lineage=lineage,
        pixel_size=pixel_size,
        cells=whole_cells,
        reporter=reporter.sort_values(["t", "label"], ignore_index=True),
        types=pd.DataFrame(
            [(label, *types[label]) for label in sorted(types)],
            columns=["label", "cell_type", "marker"],
        ).astype({"label": "int64", "cell_type": "int64", "marker": "float64"}),
    )


def simulate_plate(
    path: str | Path,
    *,
    rows: int = 1,
    columns: int = 2,
    fields: int = 2,
    n_frames: int = 8,
    size: int = 256,
    z_slices: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    frame_interval_s: float = 600.0,
    **field_options: float,
) -> Path:
    """Write a simulated HCS plate as OME-Zarr 0.5, with ground truth in every field.

    Wells are named by row letters ``A, B, ...`` and column numbers ``1, 2, ...``; fields
    ``"0", "1", ...``. Each field holds the image (channels "nuclei" and "cytoplasm"; two pyramid
    levels when ``size >= 256``), the label image ``labels/ground_truth`` and the lineage table
    ``tables/ground_truth_lineage``. Field ``f`` of the well at zero-based ``(r, c)`` is
    ``simulate_field(seed=field_seed(seed, r, c, f), ...)``.

    Parameters
    ----------
    path
        Where to write the plate (a ``.zarr`` folder).
    rows, columns, fields
        Plate layout: number of rows (at most 26), columns and fields per well.
    n_frames, size, z_slices
        Time points, field size in pixels and z planes (``None`` for 2D), as in
        :func:`simulate_field`.
    seed
        Plate seed from which every field's seed is derived.
    overwrite
        Replace an existing dataset at ``path``.
    frame_interval_s
        Time between frames, written as the t scale.
    **field_options
        Further keyword arguments of :func:`simulate_field` (``density``, ``brightness``, ...).

    Returns
    -------
    Path
        The plate root.
    """
    if not 1 <= rows <= 26 or columns < 1 or fields < 1:
        raise ValueError(
            f"need 1-26 rows and at least one column and field, got {rows=}, {columns=}, {fields=}"
        )
    from pipeline.io import omezarr  # zarr only where a plate is written: simulate_field needs none

    root = omezarr.create_root(path, overwrite=overwrite)
    row_names = [chr(ord("A") + index) for index in range(rows)]
    column_names = [str(index + 1) for index in range(columns)]
    field_names = [str(index) for index in range(fields)]
    for row_index, row in enumerate(row_names):
        for column_index, column in enumerate(column_names):
            well = omezarr.write_well(root, row, column, field_names)
            for field_index, field_name in enumerate(field_names):
                simulated = simulate_field(
                    n_frames=n_frames,
                    size=size,
                    z_slices=z_slices,
                    seed=field_seed(seed, row_index, column_index, field_index),
                    **field_options,
                )
                _write_field(well, field_name, simulated, frame_interval_s)
    omezarr.write_plate_metadata(
        root,
        name=Path(path).stem,
        rows=row_names,
        columns=column_names,
        wells=[(row, column) for row in row_names for column in column_names],
        field_count=fields,
    )
    return Path(path)


def read_ground_truth(field: zarr.Group | str | Path) -> tuple[da.Array, pd.DataFrame]:
    """Ground-truth labels and lineage of a field written by :func:`simulate_plate`.

    Parameters
    ----------
    field
        The field's image group, or its folder (e.g. ``"plate.zarr/A/1/0"``).

    Returns
    -------
    labels : dask.array.Array
        Full-resolution labels, ``(t, y, x)`` or ``(t, z, y, x)``.
    lineage : pandas.DataFrame
        CTC ``man_track`` table: ``label, first, last, parent``.
    """
    import zarr

    from pipeline.io.tables import read_table

    if isinstance(field, zarr.Group):
        group, location = field, str(field.store_path)
    else:
        location = str(field)
        try:
            group = zarr.open_group(Path(field), mode="r")
        except FileNotFoundError as error:
            raise PipelineInputError("no OME-Zarr field image here", location) from error
    if GROUND_TRUTH_LABELS not in group.get("labels", {}):
        raise PipelineInputError(
            f"field has no simulated ground truth (labels/{GROUND_TRUTH_LABELS})", location
        )
    labels = da.from_zarr(group[f"labels/{GROUND_TRUTH_LABELS}/0"])
    return labels, read_table(group, GROUND_TRUTH_LINEAGE)


def _write_field(
    well: zarr.Group, name: str, simulated: SimulatedField, frame_interval_s: float
) -> None:
    """Write one simulated field (image, ground-truth labels, lineage) into its well."""
    from pipeline.io import omezarr
    from pipeline.io.tables import write_table

    spatial = tuple(simulated.pixel_size)
    image = omezarr.write_image(
        well,
        name,
        simulated.image,
        ("t", "c", *spatial),
        {"t": frame_interval_s, **simulated.pixel_size},
        channel_names=simulated.channel_names,
        n_levels=2 if min(simulated.image.shape[-2:]) >= 256 else 1,
    )
    omezarr.write_labels(image, GROUND_TRUTH_LABELS, simulated.labels)
    write_table(
        image,
        GROUND_TRUTH_LINEAGE,
        simulated.lineage,
        table_type="lineage",
        region=f"../../labels/{GROUND_TRUTH_LABELS}",
        instance_key="label",
    )
    if len(simulated.channel_names) > len(CHANNEL_NAMES):
        write_table(
            image,
            GROUND_TRUTH_TYPES,
            simulated.types,
            table_type="ground_truth_types",
            region=f"../../labels/{GROUND_TRUTH_LABELS}",
            instance_key="label",
        )


def _check_arguments(n_frames: int, shape: tuple[int, ...], density: float, knobs: _Knobs) -> None:
    if n_frames < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_frames}")
    if min(shape) < 1:
        raise ValueError(f"field shape must be positive, got {shape}")
    if density <= 0 or knobs.diameter <= 0:
        raise ValueError("density and cell_diameter_um must be positive")
    if not 0 <= knobs.persistence < 1:
        raise ValueError(f"persistence must be in [0, 1), got {knobs.persistence}")
    if knobs.doubling_frames <= 0:
        raise ValueError(f"doubling_frames must be positive, got {knobs.doubling_frames}")


def _random_rotation(
    rng: np.random.Generator, ndim: int, angle_sd: float | None = None
) -> np.ndarray:
    """A uniformly random rotation, or a small one of ``angle_sd`` radians per axis."""
    if ndim == 2:
        angle = rng.uniform(0, 2 * np.pi) if angle_sd is None else rng.normal(0, angle_sd)
        cos, sin = np.cos(angle), np.sin(angle)
        return np.array([[cos, -sin], [sin, cos]])
    if angle_sd is None:
        return Rotation.random(random_state=rng).as_matrix()
    return Rotation.from_rotvec(rng.normal(0, angle_sd, 3)).as_matrix()


def _random_axis_ratios(rng: np.random.Generator, ndim: int, cell_type: int = 0) -> np.ndarray:
    """Semi-axis ratios with product 1: mildly elongated ellipses or ellipsoids (type 1: more)."""
    log_ratios = rng.normal(0, 1.0, ndim) * _TYPE_ELONGATION[cell_type]
    return np.exp(log_ratios - log_ratios.mean())


def _assign_types(cells: list[_Cell], rng: np.random.Generator, cell_types: int) -> None:
    """Give the first cells of a field their types, shapes and marker levels."""
    for cell in cells:
        cell.cell_type = int(rng.integers(cell_types))
        cell.axis_ratios = _random_axis_ratios(rng, len(cell.centre), cell.cell_type)
        cell.marker = _MARKER_LEVELS[cell.cell_type] * float(rng.lognormal(0, _MARKER_LOG_SD))


def _cell_size(diameter: float, ndim: int) -> float:
    """Area or volume of a disc or sphere of this diameter."""
    radius = diameter / 2
    return np.pi * radius**2 if ndim == 2 else 4.0 / 3.0 * np.pi * radius**3


def _initial_cells(
    rng: np.random.Generator, count: int, extent: np.ndarray, knobs: _Knobs
) -> list[_Cell]:
    """Cells at random positions and random phases of their cycle."""
    ndim = len(extent)
    mean_birth_size = _cell_size(knobs.diameter, ndim) / _MEAN_SIZE_OVER_BIRTH
    cells = []
    for label in range(1, count + 1):
        centre = rng.uniform(0, 1, ndim) * extent
        if ndim == 3:
            centre[0] = _clamp_z(extent[0] / 2 + rng.normal(0, 0.1 * knobs.diameter), extent, knobs)
        birth_size = mean_birth_size * rng.lognormal(0, 0.1)
        cells.append(
            _Cell(
                label=label,
                parent=0,
                centre=centre,
                velocity=np.zeros(ndim),
                rotation=_random_rotation(rng, ndim),
                axis_ratios=_random_axis_ratios(rng, ndim),
                size=birth_size * 2 ** rng.uniform(0, 1),
                birth_size=birth_size,
                growth_rate=np.log(2) / (knobs.doubling_frames * rng.lognormal(0, 0.15)),
                brightness=knobs.brightness * _lognormal_unit(rng, knobs.brightness_cv),
                reporter=knobs.reporter * _lognormal_unit(rng, 0.5),
                nuclear_fraction=float(np.exp(rng.uniform(-_LOG_RATIO_RANGE, _LOG_RATIO_RANGE))),
            )
        )
    return cells


def _lognormal_unit(rng: np.random.Generator, cv: float) -> float:
    """A log-normal factor of mean 1 and coefficient of variation ``cv``."""
    sigma = np.sqrt(np.log1p(cv**2))
    return float(rng.lognormal(-(sigma**2) / 2, sigma))


def _clamp_z(z: float, extent: np.ndarray, knobs: _Knobs) -> float:
    """Keep a 3D centre inside the stack, at least a radius from its ends when it fits."""
    margin = min(knobs.diameter / 2, extent[0] / 2)
    return float(np.clip(z, margin, extent[0] - margin))


def _divide(mother: _Cell, rng: np.random.Generator, first_label: int) -> list[_Cell]:
    """Two daughters at +-half the major semi-axis along the mother's major axis."""
    major = mother.rotation[:, int(np.argmax(mother.axis_ratios))]
    offset = 0.5 * mother.semi_axes.max() * major
    ndim = len(mother.centre)
    daughters = []
    for index, sign in enumerate((1.0, -1.0)):
        size = mother.size / 2 * rng.lognormal(0, 0.05)
        daughters.append(
            _Cell(
                label=first_label + index,
                parent=mother.label,
                centre=mother.centre + sign * offset,
                velocity=np.zeros(ndim),
                rotation=_random_rotation(rng, ndim),
                axis_ratios=_random_axis_ratios(rng, ndim, mother.cell_type),
                size=size,
                birth_size=size,
                growth_rate=mother.growth_rate * rng.lognormal(0, 0.1),
                brightness=mother.brightness * rng.lognormal(0, 0.1),
                reporter=mother.reporter * rng.lognormal(0, 0.1),
                nuclear_fraction=float(
                    np.clip(
                        mother.nuclear_fraction * np.exp(rng.normal(0, 0.1)),
                        np.exp(-_LOG_RATIO_RANGE),
                        np.exp(_LOG_RATIO_RANGE),
                    )
                ),
                cell_type=mother.cell_type,
                marker=mother.marker,
            )
        )
    return daughters


def _advance(
    cells: list[_Cell], rng: np.random.Generator, extent: np.ndarray, knobs: _Knobs, next_label: int
) -> tuple[list[_Cell], int]:
    """One frame of dynamics: divide, grow, turn and move, then resolve crowding."""
    moved: list[_Cell] = []
    noise_scale = knobs.step_fraction * knobs.diameter * np.sqrt(1 - knobs.persistence**2)
    for cell in cells:
        if cell.size >= 2 * cell.birth_size:
            moved.extend(_divide(cell, rng, next_label))
            next_label += 2
            continue
        ndim = len(cell.centre)
        cell.size *= np.exp(cell.growth_rate)
        cell.rotation = _random_rotation(rng, ndim, angle_sd=0.08) @ cell.rotation
        cell.velocity = knobs.persistence * cell.velocity + rng.normal(0, noise_scale, ndim)
        if ndim == 3:
            cell.velocity[0] *= 0.3
        cell.previous_centre = cell.centre.copy()
        cell.centre = cell.centre + cell.velocity
        moved.append(cell)
    _relax(moved, extent, knobs, iterations=_RELAX_ITERATIONS)
    max_step = knobs.max_step_fraction * knobs.diameter
    for cell in moved:
        if cell.previous_centre is None:
            continue
        step = cell.centre - cell.previous_centre
        length = float(np.linalg.norm(step))
        if length > max_step:
            cell.centre = cell.previous_centre + step * (max_step / length)
        cell.previous_centre = None
    return moved, next_label


def _relax(cells: list[_Cell], extent: np.ndarray, knobs: _Knobs, iterations: int) -> None:
    """Soft pairwise repulsion: push apart centres closer than the contact distance."""
    if len(cells) < 2:
        return
    centres = np.array([cell.centre for cell in cells])
    radii = np.array([cell.radius for cell in cells])
    contact = _CONTACT_FACTOR * (radii[:, None] + radii[None, :])
    for _ in range(iterations):
        difference = centres[:, None, :] - centres[None, :, :]
        distance = np.linalg.norm(difference, axis=-1)
        np.fill_diagonal(distance, np.inf)
        overlap = np.clip(contact - distance, 0, None)
        push = 0.25 * overlap / np.maximum(distance, 1e-6)
        centres += (push[:, :, None] * difference).sum(axis=1)
    for cell, centre in zip(cells, centres, strict=True):
        cell.centre = centre
        if len(extent) == 3:
            cell.centre[0] = _clamp_z(centre[0], extent, knobs)


def _render(
    cells: list[_Cell], shape: tuple[int, ...], spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Label image and squared normalised ellipse distance (1 outside cells) of one frame."""
    labels = np.zeros(shape, dtype=np.uint32)
    distance2 = np.ones(shape, dtype=np.float32)
    for cell in cells:
        reach = cell.semi_axes.max()
        low = np.maximum(np.floor((cell.centre - reach) / spacing), 0).astype(int)
        high = np.minimum(np.ceil((cell.centre + reach) / spacing) + 1, shape).astype(int)
        if np.any(high <= low):
            continue
        box = tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))
        axes = np.meshgrid(
            *[
                np.arange(lo, hi) * step - c
                for lo, hi, step, c in zip(low, high, spacing, cell.centre, strict=True)
            ],
            indexing="ij",
            sparse=True,
        )
        body = [
            sum(axes[k] * cell.rotation[k, j] for k in range(len(axes))) for j in range(len(axes))
        ]
        cell_distance2 = sum((u / a) ** 2 for u, a in zip(body, cell.semi_axes, strict=True))
        closer = cell_distance2 < distance2[box]
        distance2[box][closer] = cell_distance2[closer]
        labels[box][closer] = cell.label
    _keep_largest_components(labels, distance2)
    return labels, distance2


def _keep_largest_components(labels: np.ndarray, distance2: np.ndarray) -> None:
    """Clear every piece of a label but its largest connected component, in place."""
    for index, box in enumerate(ndimage.find_objects(labels)):
        if box is None:
            continue
        mask = labels[box] == index + 1
        components, count = ndimage.label(mask)
        if count < 2:
            continue
        largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
        stray = mask & (components != largest)
        labels[box][stray] = 0
        distance2[box][stray] = 1.0


def _in_field(cell: _Cell, extent: np.ndarray) -> bool:
    """Whether the cell centre lies in the field in y and x; a cell leaving it ends its track."""
    return bool(np.all(cell.centre[-2:] >= 0) and np.all(cell.centre[-2:] < extent[-2:]))


def _illumination(rng: np.random.Generator, shape: tuple[int, ...], falloff: float) -> np.ndarray:
    """Smooth quadratic vignetting around a random optical centre, 1 - falloff at the far corner."""
    height, width = shape[-2:]
    centre = np.array([height, width]) * (0.5 + rng.uniform(-0.15, 0.15, 2))
    y, x = np.ogrid[:height, :width]
    radius2 = (y - centre[0]) ** 2 + (x - centre[1]) ** 2
    corners = np.array([[0, 0], [0, width], [height, 0], [height, width]])
    farthest2 = ((corners - centre) ** 2).sum(axis=1).max()
    return (1.0 - falloff * radius2 / farthest2).astype(np.float32)


def _form_image(
    rng: np.random.Generator,
    labels: np.ndarray,
    grown: np.ndarray,
    distance2: np.ndarray,
    cells: list[_Cell],
    nuclear_fractions: dict[int, float],
    illumination: np.ndarray,
    spacing: np.ndarray,
    knobs: _Knobs,
    marker: bool = False,
) -> np.ndarray:
    """The channels of one frame, ``(c, (z,) y, x)`` uint16, from the nuclei, the whole cells
    (``grown``: nucleus plus ring), the cells' properties and their nuclear reporter levels;
    with ``marker``, the cell types' looks and the marker channel."""
    lookup_size = int(labels.max()) + 1
    brightness, reporter, nuclear_fraction, marker_level = (
        np.zeros(lookup_size, np.float32) for _ in range(4)
    )
    cell_type = np.zeros(lookup_size, np.int64)
    for cell in cells:
        brightness[cell.label] = cell.brightness
        reporter[cell.label] = cell.reporter
        nuclear_fraction[cell.label] = nuclear_fractions[cell.label]
        marker_level[cell.label] = cell.marker
        cell_type[cell.label] = cell.cell_type
    profile = 1.0 - _DOME * distance2
    texture = _texture(rng, labels.shape, spacing, knobs)
    if marker:  # type 1: coarse grainy chromatin; type 2: a bright rim around a dim centre
        types = cell_type[labels]
        grainy = _texture(rng, labels.shape, spacing, knobs, amplitude=0.6, grain_um=0.5)
        texture = np.where(types == 1, grainy, texture)
        profile = np.where(types == 2, 0.45 + 0.55 * distance2, profile)
    nuclei = brightness[labels] * profile * texture
    ring = (labels == 0) & (grown > 0)
    cytoplasm = np.where(ring, reporter[grown], reporter[labels] * nuclear_fraction[labels])
    cytoplasm *= _texture(rng, labels.shape, spacing, knobs)
    signals = [nuclei, cytoplasm]
    if marker:
        signals.append(marker_level[grown] * _texture(rng, labels.shape, spacing, knobs))
    psf_sigma = np.array(
        [knobs.psf_sigma_um] * 2
        if labels.ndim == 2
        else [knobs.psf_sigma_z_um] + [knobs.psf_sigma_um] * 2
    )
    channels = []
    for signal in signals:
        expected = (
            ndimage.gaussian_filter(signal, psf_sigma / spacing) + knobs.background
        ) * illumination
        counts = (
            rng.poisson(expected)
            + knobs.camera_offset
            + rng.normal(0, knobs.read_noise, labels.shape)
        )
        channels.append(np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16))
    return np.stack(channels)


def _texture(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    spacing: np.ndarray,
    knobs: _Knobs,
    amplitude: float | None = None,
    grain_um: float = 1.0,
) -> np.ndarray:
    """Smooth multiplicative texture of mean 1 (amplitude ``knobs.texture`` unless given) with
    about ``grain_um`` grain."""
    noise = ndimage.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32), grain_um / spacing
    )
    noise /= max(float(noise.std()), 1e-12)
    return np.clip(1.0 + (knobs.texture if amplitude is None else amplitude) * noise, 0.0, None)
