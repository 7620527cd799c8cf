"""Whole cells grown from their nuclei, in the manner of CellProfiler's IdentifySecondaryObjects.

Every nucleus seeds one cell, which keeps the nucleus' id. Three methods:

``propagation``
    CellProfiler's default (Jones, Carpenter and Golland 2005, as
    :func:`centrosome.propagate.propagate` implements it for CellProfiler): each pixel of the
    cell channel's foreground goes to the nucleus it is closest to along a path whose length
    adds intensity changes and ``regularization`` times the distance travelled, so borders
    follow the dim lines between touching cells. 2D; z-stacks are grown plane by plane.
``watershed``
    A seeded watershed of the cell channel's gradient (Sobel), within its foreground.
``expand``
    No cell channel: each nucleus grows by ``distance_um`` without overlapping its neighbours
    (:func:`skimage.segmentation.expand_labels`).

The foreground of the cell channel is the smoothed channel above ``threshold_correction`` times
Otsu's threshold of the whole frame; intensities are scaled by the frame's 1st and 99.9th
percentiles first. Both statistics come from the frame's histogram (contract 4 of
docs/ARCHITECTURE.md: never per tile), so tiled cells equal whole-image cells. No cell reaches
farther than ``distance_um`` from its nucleus.

Tiled (Dask) input: each block grows the cells of an extended region (core plus halo) and keeps
its core; a block raises :class:`~pipeline.segmentation.tiled.HaloTooSmall` when a cell in its
core, or one touching such a cell, reaches an inner face of the extended region.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import dask.array as da
import numpy as np
from pydantic import Field, NonNegativeFloat, PositiveFloat
from scipy import ndimage as ndi
from skimage.filters import sobel
from skimage.segmentation import expand_labels, watershed

from pipeline.normalize import (
    DEFAULT_PERCENTILES,
    frame_histogram,
    frame_statistics,
    percentiles_from_histogram,
)
from pipeline.segmentation.threshold import otsu_from_histogram
from pipeline.segmentation.tiled import HaloTooSmall
from pipeline.settings import StrictModel

__all__ = ["CELL_METHODS", "CellParameters", "cell_channel_levels", "grow_cells", "grow_cells_dask"]

CELL_METHODS = ("propagation", "watershed", "expand")


class CellParameters(StrictModel):
    """How whole cells are grown from nuclei (see the module notes)."""

    method: Literal["propagation", "watershed", "expand"] = Field(
        "propagation", description="propagation, watershed (both need a cell channel) or expand"
    )
    distance_um: PositiveFloat = Field(
        10.0, description="farthest a cell reaches from its nucleus (expand: how far it grows)"
    )
    threshold_correction: PositiveFloat = Field(
        0.35,
        description="the cell channel's foreground lies above this times Otsu's threshold "
        "(0.35: cells expressing a cytoplasmic marker several times more weakly than their "
        "neighbours grow to their edge; their reach stays bounded by distance_um)",
    )
    regularization: NonNegativeFloat = Field(
        0.05, description="propagation: weight of distance against intensity change"
    )
    smoothing_um: NonNegativeFloat = Field(
        0.0, description="Gaussian sigma applied to the cell channel before thresholding"
    )


def _levels_from_histogram(counts: np.ndarray, centres: np.ndarray) -> np.ndarray:
    low, high = percentiles_from_histogram(counts, centres, DEFAULT_PERCENTILES)
    return np.array([low, high, float(otsu_from_histogram(counts, centres))])


def cell_channel_levels(frames: np.ndarray | da.Array) -> np.ndarray | da.Array:
    """Per frame of a (t, ...spatial) cell channel: its 1st and 99.9th percentile and Otsu's
    threshold, shape (t, 3), from the whole frame's histogram (numpy in, numpy out; Dask in,
    lazy Dask out with the same values)."""
    if isinstance(frames, da.Array):
        return frame_statistics(frames, _levels_from_histogram)
    return np.stack([_levels_from_histogram(*frame_histogram(f)) for f in np.asarray(frames)])


def _foreground(
    image: np.ndarray, levels: Sequence[float], parameters: CellParameters, sigma: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """The cell channel scaled to its frame's percentiles (smoothed) and its foreground."""
    low, high, otsu = (float(v) for v in levels)
    scale = high - low if high > low else 1.0
    scaled = (np.asarray(image, np.float64) - low) / scale
    if any(s > 0 for s in sigma):
        scaled = ndi.gaussian_filter(scaled, sigma, mode="nearest")
    return scaled, scaled > parameters.threshold_correction * (otsu - low) / scale


def grow_cells(
    nuclei: np.ndarray,
    cell_image: np.ndarray | None,
    levels: Sequence[float] | None,
    parameters: CellParameters,
    pixel_size: Sequence[float],
) -> np.ndarray:
    """Whole cells of one region (2D or 3D), each with the id of the nucleus it grew from.

    Parameters
    ----------
    nuclei
        Nuclear labels of the region (0 background).
    cell_image
        The cell channel over the same region (None for ``expand``).
    levels
        The frame's low and high percentiles and Otsu's threshold (:func:`cell_channel_levels`).
    parameters
        Method and its parameters.
    pixel_size
        Micrometres per pixel along each axis of the region.

    Returns
    -------
    numpy.ndarray
        Cell labels of ``nuclei``'s shape and dtype; every nucleus lies inside its cell.
    """
    nuclei = np.asarray(nuclei)
    spacing = np.asarray(pixel_size, dtype=np.float64)
    if parameters.method == "expand":
        if len(set(spacing.tolist())) == 1:
            return expand_labels(nuclei, parameters.distance_um / spacing[0])
        return expand_labels(nuclei, parameters.distance_um, spacing=spacing)
    if cell_image is None or levels is None:
        raise ValueError(f"cell method {parameters.method!r} needs a cell channel")
    if not nuclei.any():
        return np.zeros_like(nuclei)
    reach = ndi.distance_transform_edt(nuclei == 0, sampling=spacing) <= parameters.distance_um
    sigma = [parameters.smoothing_um / s for s in spacing]
    scaled, foreground = _foreground(cell_image, levels, parameters, sigma)
    mask = (foreground & reach) | (nuclei > 0)
    if parameters.method == "watershed":
        return watershed(sobel(scaled), markers=nuclei, mask=mask).astype(nuclei.dtype)
    from centrosome.propagate import propagate

    if nuclei.ndim == 2:
        return propagate(scaled, nuclei, mask, parameters.regularization)[0].astype(nuclei.dtype)
    planes = [
        propagate(s, n, m, parameters.regularization)[0]
        for s, n, m in zip(scaled, nuclei, mask, strict=True)
    ]
    return np.stack(planes).astype(nuclei.dtype)


def _inner_face_labels(cells: np.ndarray, inner: Sequence[tuple[bool, bool]]) -> np.ndarray:
    faces = []
    for axis, (low, high) in enumerate(inner):
        if low:
            faces.append(np.take(cells, 0, axis=axis).ravel())
        if high:
            faces.append(np.take(cells, -1, axis=axis).ravel())
    labels = np.unique(np.concatenate(faces)) if faces else np.zeros(0, cells.dtype)
    return labels[labels > 0]


def _check_cells_fit(
    cells: np.ndarray, core: tuple[slice, ...], inner: Sequence[tuple[bool, bool]]
) -> None:
    """Raise :class:`HaloTooSmall` when a cell of the core, or a cell touching one, reaches an
    inner face of the extended region."""
    cut = _inner_face_labels(cells, inner)
    if cut.size == 0:
        return
    in_core = np.unique(cells[core])
    in_core = in_core[in_core > 0]
    grown = ndi.grey_dilation(np.isin(cells, in_core).astype(np.uint8), size=(3,) * cells.ndim)
    near_core = np.unique(cells[grown > 0])
    if np.isin(cut, near_core).any():
        raise HaloTooSmall("a whole cell does not fit in the halo; increase tiling.halo_um")


def _grow_block(
    nuclei: np.ndarray,
    image: np.ndarray | None,
    *,
    levels: np.ndarray | None,
    parameters: CellParameters,
    pixel_size: Sequence[float],
    halo: Sequence[int],
    block_info: dict | None = None,
) -> np.ndarray:
    """One extended (t, ...spatial) block of :func:`grow_cells_dask`, trimmed by dask after."""
    info = block_info[0]
    t = info["array-location"][0][0]
    location, count = info["chunk-location"][1:], info["num-chunks"][1:]
    inner = [(i > 0, i < n - 1) for i, n in zip(location, count, strict=True)]
    core = tuple(
        slice(h if low else 0, -h if high and h else None)
        for h, (low, high) in zip(halo, inner, strict=True)
    )
    out = np.empty_like(nuclei)
    for k in range(nuclei.shape[0]):
        cells = grow_cells(
            nuclei[k],
            None if image is None else image[k],
            None if levels is None else levels[t + k],
            parameters,
            pixel_size,
        )
        _check_cells_fit(cells, core, inner)
        out[k] = cells
    return out


def grow_cells_dask(
    nuclei: da.Array,
    cell_image: da.Array | None,
    parameters: CellParameters,
    pixel_size: Sequence[float],
    halo: Sequence[int],
) -> da.Array:
    """:func:`grow_cells` over (t, ...spatial) Dask arrays block by block, with a halo of
    ``halo`` pixels per spatial axis (blocks must be at least that large); lazy.

    Raises (when computed)
    ----------------------
    HaloTooSmall
        A block's cells do not fit in its halo.
    """
    levels = None
    arrays = [nuclei]
    if parameters.method != "expand":
        if cell_image is None:
            raise ValueError(f"cell method {parameters.method!r} needs a cell channel")
        levels = np.asarray(cell_channel_levels(cell_image).compute())
        arrays.append(cell_image.rechunk(nuclei.chunks))
    depth = {0: 0, **{axis + 1: int(h) for axis, h in enumerate(halo)}}

    def grow(nuclei_block, image_block=None, block_info=None):
        return _grow_block(
            nuclei_block,
            image_block,
            levels=levels,
            parameters=parameters,
            pixel_size=pixel_size,
            halo=[int(h) for h in halo],
            block_info=block_info,
        )

    return da.map_overlap(
        grow,
        *arrays,
        depth=depth,
        boundary="none",
        trim=True,
        dtype=nuclei.dtype,
        meta=np.empty((0,) * nuclei.ndim, nuclei.dtype),
    )
