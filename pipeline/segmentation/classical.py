"""The classical nucleus segmentation recipe (Ogawa et al.), on one image region.

Otsu threshold (once per frame over the whole image, see :mod:`pipeline.segmentation.threshold`),
binary closing, hole filling, Euclidean distance transform (in micrometres, so anisotropic voxels
work) smoothed by a Gaussian, local maxima as markers, watershed of the inverted smoothed distance
inside the foreground, a size filter and optional removal of cells cut by the image border.

Every step only looks a bounded distance around each pixel; :func:`influence_radius_um` says how
far. That is what makes tiled results equal whole-image results (see
:mod:`pipeline.segmentation.tiled`).
Border clearing is applied to the final instances (cells touching the image border), not to the
foreground mask, because a foreground component can be arbitrarily large.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field, PositiveFloat
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from pipeline.settings import StrictModel

__all__ = [
    "ClassicalParameters",
    "ClassicalRecipe",
    "ellipsoid_footprint",
    "filter_cells",
    "footprint_maxima",
    "influence_radius_um",
    "local_maxima_markers",
    "remove_cells",
    "segment_region",
    "watershed_cells_with_distance",
]


class ClassicalParameters(StrictModel):
    """Parameters of the classical recipe, in micrometres (the ``segmentation.classical``
    section of a run's configuration, and what the recipe takes).

    Attributes
    ----------
    closing_radius_um
        Radius of the binary closing.
    max_hole_size_um
        Holes (enclosed background) up to this area (2D, um^2) or volume (3D, um^3) are filled.
    smoothing_sigma_um
        Gaussian sigma applied to the distance transform.
    min_distance_um
        Radius of the neighbourhood in which a marker must be the maximum.
    min_size_um
        Cells smaller than this area (2D, um^2) or volume (3D, um^3) are dropped.
    max_size_um
        Cells larger than this are dropped (``None``: no limit).
    clear_border
        Drop cells that touch the border of the image.
    """

    closing_radius_um: float = Field(1.0, ge=0)
    max_hole_size_um: float = Field(100.0, ge=0)
    smoothing_sigma_um: float = Field(1.0, ge=0)
    min_distance_um: PositiveFloat = 3.0
    min_size_um: float = Field(10.0, ge=0)
    max_size_um: PositiveFloat | None = None
    clear_border: bool = False


def ellipsoid_footprint(radius_um: float, pixel_size: Sequence[float]) -> np.ndarray:
    """Boolean ellipsoid (ellipse in 2D) of ``radius_um`` on a grid of anisotropic pixels."""
    radii = [int(np.floor(radius_um / step + 1e-9)) for step in pixel_size]
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    distance2 = sum((g * step) ** 2 for g, step in zip(grids, pixel_size, strict=True))
    return np.asarray(distance2 <= radius_um**2 + 1e-9)


def influence_radius_um(params: ClassicalParameters) -> float:
    """How far (um) a pixel's result depends on its surroundings, beyond the cell it belongs to.

    The closing, the Gaussian (truncated at 4 sigma, counted twice: the distance values it smooths
    must themselves be exact) and the marker neighbourhood each reach this far.
    """
    return params.closing_radius_um + 8.0 * params.smoothing_sigma_um + params.min_distance_um


def _closing(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Binary closing that treats the outside as a copy of the edge (no erosion at the border)."""
    pad = [(r, r) for r in (np.array(footprint.shape) // 2)]
    closed = ndi.binary_closing(np.pad(mask, pad, mode="edge"), structure=footprint)
    return closed[tuple(slice(lo, lo + n) for (lo, _), n in zip(pad, mask.shape, strict=True))]


def _fill_small_holes(foreground: np.ndarray, max_hole_pixels: float) -> np.ndarray:
    """Fill enclosed background components (not touching the region's border) up to a size."""
    holes = ~foreground & ndi.binary_fill_holes(foreground)
    hole_labels, n_holes = ndi.label(holes)
    if n_holes == 0:
        return foreground
    sizes = np.bincount(hole_labels.ravel())
    small = sizes <= max_hole_pixels
    small[0] = False
    return foreground | small[hole_labels]


MAX_CANDIDATE_SHARE = 1 / 16  # beyond it, footprint_maxima filters every pixel


def footprint_maxima(values: np.ndarray, allowed: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Where ``allowed`` and ``values`` is the maximum of its ``footprint`` (centred; the image's
    edges extended), i.e. ``allowed & (maximum_filter(values, footprint=footprint,
    mode="nearest") == values)``, computed faster for large footprints.

    Only pixels that are maxima of the footprint's nearest neighbours (its part within one pixel
    of the centre) can be maxima of the whole footprint; those few candidates are compared with
    the rest of the footprint, offset by offset. The result is the same, bit for bit.
    """
    centre = tuple(n // 2 for n in footprint.shape)
    box = tuple(slice(max(c - 1, 0), c + 2) for c in centre)
    near = np.zeros_like(footprint)
    near[box] = footprint[box]
    maxima = allowed & (ndi.maximum_filter(values, footprint=near, mode="nearest") == values)
    where = np.nonzero(maxima)
    if where[0].size > values.size * MAX_CANDIDATE_SHARE:  # plateaus: filter the whole image
        return allowed & (ndi.maximum_filter(values, footprint=footprint, mode="nearest") == values)
    peak = values[where]
    for offset in np.argwhere(footprint & ~near) - np.array(centre):
        neighbour = tuple(
            np.clip(index + step, 0, n - 1)
            for index, step, n in zip(where, offset, values.shape, strict=True)
        )
        keep = values[neighbour] <= peak
        where, peak = tuple(index[keep] for index in where), peak[keep]
    maxima = np.zeros(values.shape, dtype=bool)
    maxima[where] = True
    return maxima


def local_maxima_markers(
    values: np.ndarray, allowed: np.ndarray, footprint: np.ndarray
) -> np.ndarray:
    """Label the local maxima of ``values`` (within ``footprint``) where ``allowed``.

    A plateau of equal maxima becomes one marker (full connectivity).
    """
    peaks = footprint_maxima(values, allowed, footprint)
    structure = ndi.generate_binary_structure(values.ndim, values.ndim)
    markers, _ = ndi.label(peaks, structure=structure)
    return markers


def watershed_cells_with_distance(
    image: np.ndarray, threshold: float, pixel_size: Sequence[float], params: ClassicalParameters
) -> tuple[np.ndarray, np.ndarray]:
    """Cells of one region before the size and border filters (threshold ... watershed).

    Parameters
    ----------
    image
        2D (y, x) or 3D (z, y, x) intensities of one channel and one timepoint.
    threshold
        Foreground is ``image > threshold`` (Otsu's value of the whole frame).
    pixel_size
        Pixel size per axis in micrometres.
    params
        Recipe parameters.

    Returns
    -------
    labels : numpy.ndarray
        int32 labels 1..n in raster order of their markers, 0 for background.
    distance : numpy.ndarray
        The foreground's Euclidean distance transform in micrometres.
    """
    pixel_size = tuple(float(s) for s in pixel_size)
    voxel = float(np.prod(pixel_size))
    foreground = image > threshold
    if params.closing_radius_um > 0:
        foreground = _closing(foreground, ellipsoid_footprint(params.closing_radius_um, pixel_size))
    foreground = _fill_small_holes(foreground, params.max_hole_size_um / voxel)
    distance = ndi.distance_transform_edt(foreground, sampling=pixel_size)
    sigma = [params.smoothing_sigma_um / step for step in pixel_size]
    smoothed = ndi.gaussian_filter(distance, sigma=sigma, mode="nearest", truncate=4.0)
    markers = local_maxima_markers(
        smoothed,
        foreground & (smoothed > 0),
        ellipsoid_footprint(params.min_distance_um, pixel_size),
    )
    labels = watershed(-smoothed, markers, mask=foreground).astype(np.int32, copy=False)
    return labels, distance


def segment_region(
    image: np.ndarray,
    threshold: float,
    pixel_size: Sequence[float],
    params: ClassicalParameters,
    *,
    border_faces: Sequence[tuple[bool, bool]] | None = None,
) -> np.ndarray:
    """Segment nuclei in one whole image with the classical recipe.

    Parameters are those of :func:`watershed_cells` and :func:`filter_cells`.

    Returns
    -------
    numpy.ndarray
        int32 labels, 0 for background; not necessarily consecutive after filtering.
    """
    cells, _ = watershed_cells_with_distance(image, threshold, pixel_size, params)
    return filter_cells(cells, pixel_size, params, border_faces)


def remove_cells(
    labels: np.ndarray,
    pixel_size: Sequence[float],
    *,
    min_size: float = 0.0,
    max_size: float | None = None,
    clear_border: bool = False,
    border_faces: Sequence[tuple[bool, bool]] | None = None,
) -> np.ndarray:
    """Drop cells outside a size range (um^2 or um^3) and, optionally, cells touching the border.

    ``border_faces`` gives, per axis, whether the region's low and high faces are borders of the
    whole image (default: all are).
    """
    sizes = np.bincount(labels.ravel()) * float(np.prod(pixel_size))
    drop = sizes < min_size
    if max_size is not None:
        drop |= sizes > max_size
    if clear_border:
        faces = border_faces or [(True, True)] * labels.ndim
        for axis, (low, high) in enumerate(faces):
            if low:
                drop[np.unique(np.take(labels, 0, axis=axis))] = True
            if high:
                drop[np.unique(np.take(labels, -1, axis=axis))] = True
    drop[0] = True
    return np.where(drop[labels], 0, labels)


def filter_cells(
    labels: np.ndarray,
    pixel_size: Sequence[float],
    params: ClassicalParameters,
    border_faces: Sequence[tuple[bool, bool]] | None = None,
) -> np.ndarray:
    """The classical recipe's size and border filters (see :func:`remove_cells`)."""
    return remove_cells(
        labels,
        pixel_size,
        min_size=params.min_size_um,
        max_size=params.max_size_um,
        clear_border=params.clear_border,
        border_faces=border_faces,
    )


@dataclass(frozen=True)
class ClassicalRecipe:
    """The classical recipe in the form :func:`pipeline.segmentation.tiled.label_frames` takes."""

    params: ClassicalParameters

    def influence_radius_um(self) -> float:
        """See :func:`influence_radius_um`."""
        return influence_radius_um(self.params)

    def cells(
        self, image: np.ndarray, threshold: float, pixel_size: Sequence[float]
    ) -> tuple[np.ndarray, Callable[[], np.ndarray]]:
        """See :func:`watershed_cells_with_distance` (its distance transform, computed anyway)."""
        cells, distance = watershed_cells_with_distance(image, threshold, pixel_size, self.params)
        return cells, lambda: distance

    def filter(
        self,
        cells: np.ndarray,
        pixel_size: Sequence[float],
        border_faces: Sequence[tuple[bool, bool]] | None = None,
    ) -> np.ndarray:
        """See :func:`filter_cells`."""
        return filter_cells(cells, pixel_size, self.params, border_faces)
