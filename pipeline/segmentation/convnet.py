"""Conv-net probabilities to nucleus instances (one image region; tiled by :mod:`.tiled`).

The network gives, per pixel, p(background), p(boundary), p(interior) and a distance map that is
1 at a nucleus' centre and falls to 0 at its boundary (:mod:`pipeline.convnet.unet`). Foreground is
``1 - p(background) > foreground_threshold``; seeds are local maxima of the smoothed distance map
above ``seed_threshold`` (one seed per nucleus, even where touching nuclei share foreground);
a watershed of the inverted distance inside the foreground grows the seeds into cells; small
cells are dropped.

Lengths are fractions of the nucleus diameter, so the recipe fits any magnification; the
diameter is the one inference rescaled to (given or estimated). Every step looks a bounded
distance around each pixel (:meth:`ConvNetRecipe.influence_radius_um`), which the exact
stitching of :mod:`pipeline.segmentation.tiled` relies on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, partial

import numpy as np
from pydantic import Field, PositiveFloat
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from pipeline.segmentation.classical import ellipsoid_footprint, local_maxima_markers, remove_cells
from pipeline.settings import StrictModel

__all__ = ["RECIPE_MAPS", "ConvNetParameters", "ConvNetRecipe", "cells_from_maps"]

RECIPE_MAPS = (0, 3)
"""The network's maps the recipe reads, in this order: p(background) and the distance map
(tiled runs keep only these; :func:`pipeline.convnet.inference.maps_from_normalised`)."""


class ConvNetParameters(StrictModel):
    """Post-processing of the network's maps; lengths in nucleus diameters.

    The defaults were chosen by ``benchmarks/postprocessing_grid.py`` on 60 grey fluorescence
    training images of the DSB 2018 collection (never on the validation split). A run's
    ``segmentation.convnet`` section (:class:`pipeline.segmentation.parameters.ConvNetConfig`)
    is one of these, with the model and its scale besides.

    Attributes
    ----------
    foreground_threshold
        A pixel is foreground when ``1 - p(background)`` exceeds this.
    seed_threshold
        Smallest (smoothed) distance-map value of a seed.
    seed_radius
        A seed must be the distance map's maximum within this radius.
    smoothing
        Gaussian sigma applied to the distance map.
    min_size
        Cells smaller than this fraction of a disc (ball in 3D) of one diameter are dropped.
    clear_border
        Drop cells that touch the border of the image.
    axial_fraction
        z-stacks: a voxel stays foreground only where its (smoothed, normalised) intensity is
        at least this fraction of the brightest within one diameter along z, i.e. inside the
        axial half maximum of its nucleus; out-of-focus planes above and below a nucleus,
        which a 2D network still calls nucleus, are cut. 0 turns it off.
    """

    foreground_threshold: float = Field(0.8, gt=0, lt=1)
    seed_threshold: float = Field(0.1, ge=0)
    seed_radius: PositiveFloat = Field(0.5, description="in nucleus diameters")
    smoothing: float = Field(0.15, ge=0, description="Gaussian sigma in nucleus diameters")
    min_size: float = Field(0.1, ge=0, description="fraction of a one-diameter disc or ball")
    clear_border: bool = False
    axial_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="z-stacks: keep voxels above this fraction of the axial intensity peak",
    )


@dataclass(frozen=True)
class ConvNetRecipe:
    """The post-processing recipe bound to a nucleus diameter in micrometres.

    It reads the maps :data:`RECIPE_MAPS` of the network's four, p(background) and the
    distance map; ``volumetric`` recipes take (3, z, y, x) regions, those two and the normalised
    intensity, which bounds each nucleus along z (:attr:`ConvNetParameters.axial_fraction`).
    In 3D, seeds are the maxima of the distance map weighted by the depth in the foreground.
    """

    params: ConvNetParameters
    diameter_um: float
    volumetric: bool = False

    def influence_radius_um(self) -> float:
        """Reach of the Gaussian (4 sigma, counted twice) and of the seed neighbourhood, plus
        the axial window of one diameter for z-stacks."""
        axial = 1.0 if self.volumetric and self.params.axial_fraction > 0 else 0.0
        return (8.0 * self.params.smoothing + self.params.seed_radius + axial) * self.diameter_um

    def cells(
        self, maps: np.ndarray, frame_value: float, pixel_size: Sequence[float]
    ) -> tuple[np.ndarray, Callable[[], np.ndarray]]:
        """Cells of one region before filtering, and a function that gives the foreground's
        distance transform (um), computed in 3D anyway and in 2D only when asked.

        ``maps`` is (2, y, x), p(background) and the distance map (:data:`RECIPE_MAPS`), or
        (3, z, y, x) with the normalised intensity for a volumetric recipe; ``frame_value`` is
        unused (the maps are already normalised).
        """
        del frame_value
        pixel_size = tuple(float(s) for s in pixel_size)
        background, distance = maps[0], maps[1]
        foreground = (1.0 - background) > self.params.foreground_threshold
        sigma = [self.params.smoothing * self.diameter_um / step for step in pixel_size]
        if self.volumetric and self.params.axial_fraction > 0:
            foreground &= self._in_focus(maps[2], sigma, pixel_size[0])
        smoothed = ndi.gaussian_filter(
            distance.astype(np.float64), sigma=sigma, mode="nearest", truncate=4.0
        )
        allowed = foreground & (smoothed > self.params.seed_threshold)
        depth = cache(partial(ndi.distance_transform_edt, foreground, sampling=pixel_size))
        if maps.ndim == 4:
            # Slice-wise maps peak at the centre of every cross-section, so a nucleus is a ridge
            # along z; weighting by the depth in the 3D foreground (um) puts one peak at its
            # 3D centre.
            smoothed = smoothed * depth() / (0.5 * self.diameter_um)
        footprint = ellipsoid_footprint(self.params.seed_radius * self.diameter_um, pixel_size)
        markers = local_maxima_markers(smoothed, allowed, footprint)
        cells = watershed(-smoothed, markers, mask=foreground).astype(np.int32, copy=False)
        return cells, depth

    def _in_focus(self, intensity: np.ndarray, sigma: Sequence[float], z_step: float) -> np.ndarray:
        """Voxels within the axial half maximum (``axial_fraction``) of their nucleus."""
        smooth = ndi.gaussian_filter(
            intensity.astype(np.float64), sigma=sigma, mode="nearest", truncate=4.0
        )
        reach = max(1, round(self.diameter_um / z_step))
        peak = ndi.maximum_filter1d(smooth, size=2 * reach + 1, axis=0, mode="nearest")
        return smooth >= self.params.axial_fraction * peak

    def filter(
        self,
        cells: np.ndarray,
        pixel_size: Sequence[float],
        border_faces: Sequence[tuple[bool, bool]] | None = None,
    ) -> np.ndarray:
        """Drop cells below the minimum size and, if asked, those touching the image border."""
        radius = self.diameter_um / 2.0
        unit = np.pi * radius**2 if cells.ndim == 2 else 4.0 / 3.0 * np.pi * radius**3
        return remove_cells(
            cells,
            pixel_size,
            min_size=self.params.min_size * unit,
            clear_border=self.params.clear_border,
            border_faces=border_faces,
        )


def cells_from_maps(
    maps: np.ndarray,
    diameter_px: float,
    params: ConvNetParameters | None = None,
    pixel_size: Sequence[float] | None = None,
) -> np.ndarray:
    """Nucleus instances of a whole image from its network maps.

    Parameters
    ----------
    maps
        (4, [z,] y, x): p(background), p(boundary), p(interior), distance (see
        :func:`pipeline.convnet.inference.predict_maps`); for z-stacks optionally a fifth map, the
        normalised intensity, which bounds nuclei along z.
    diameter_px
        Typical nucleus diameter in pixels of the image plane.
    params
        Post-processing parameters (default: :class:`ConvNetParameters`).
    pixel_size
        Micrometres per pixel per spatial axis (default: 1; z may differ from y and x).

    Returns
    -------
    numpy.ndarray
        int32 labels, 0 for background; not necessarily consecutive.
    """
    spatial = maps.ndim - 1
    pixel_size = tuple(pixel_size or (1.0,) * spatial)
    recipe = ConvNetRecipe(
        params or ConvNetParameters(), diameter_px * pixel_size[-1], volumetric=len(maps) > 4
    )
    cells, _ = recipe.cells(maps[[*RECIPE_MAPS, *range(4, len(maps))]], 0.0, pixel_size)
    return recipe.filter(cells, pixel_size)
