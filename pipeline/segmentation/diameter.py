"""The nucleus diameter of an image, estimated by segmenting it with the conv-net."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from pipeline.convnet.inference import (
    InferenceSettings,
    equivalent_diameters,
    loaded_model,
    predict_maps,
    rescale_factor,
)
from pipeline.segmentation.convnet import ConvNetParameters, cells_from_maps

__all__ = ["estimate_diameter"]


def _threads(graph: Delayed) -> Any:
    return graph.compute(scheduler="threads")


def estimate_diameter(
    image: np.ndarray | da.Array,
    settings: InferenceSettings | None = None,
    params: ConvNetParameters | None = None,
    *,
    max_rounds: int = 4,
    min_pixels: int = 512 * 512,
    max_pixels: int = 1024 * 1024,
    min_cells: int = 50,
    evaluate: Callable[[Delayed], Any] | None = None,
) -> float:
    """Estimate the typical nucleus diameter (pixels) of a 2D image by segmenting it.

    Starting at the model's own diameter, segment, measure the median equivalent diameter of the
    nuclei found, rescale to it and repeat until it changes by less than 10% (Cellpose refines
    its estimate the same way). Each round looks at the image's central crop of ``min_pixels``
    at the model's scale; where that holds fewer than ``min_cells`` nuclei and the image is
    larger, the round is done again on ``max_pixels`` (about a thousand nucleus areas), and so
    are the rounds after it. The cost does not grow with the image or with upscaling of small
    nuclei, and a dense field pays a quarter of what the larger crop costs; a median of 50
    nuclei is within a few per cent of the image's, well inside the scales the model was
    trained on. A round is one task: its crop is small, and as tiles (which would give the same
    maps) its pieces all went to the worker holding the crop, one after the other, with the
    scheduling of a dozen tasks between the rounds.

    Parameters
    ----------
    image
        The (y, x) plane, in memory or lazy (only its central crops are read).
    settings, params
        Inference settings and post-processing.
    max_rounds, min_pixels, max_pixels, min_cells
        Rounds at most; the crops' areas at the model's scale, and the nuclei the smaller one
        must hold.
    evaluate
        Computes a round's graph (a Dask ``Delayed``) to its value, the median diameter found
        and the number of nuclei (default: with Dask's threads; a run computes it on its
        cluster).

    Returns
    -------
    float
        The estimate, or the model's diameter when no nucleus is found.
    """
    settings = settings or InferenceSettings()
    _, info = loaded_model(settings.model, "cpu")  # its scale; the network runs in the graph
    plane = da.asarray(image)
    if plane.ndim != 2:
        raise ValueError(f"the diameter is estimated on one (y, x) plane, got shape {plane.shape}")
    diameter = float(info.diameter_px)
    pixels = min(min_pixels, max_pixels)

    def segmented_crop(pixels: int, diameter: float) -> tuple[float, int, bool]:
        """Median diameter and number of the nuclei in the central crop of ``pixels`` at the
        model's scale for ``diameter``, and whether the crop is the whole image."""
        side = int(np.sqrt(pixels) / rescale_factor(info, diameter))
        crop = tuple(
            slice(max(0, (n - side) // 2), max(0, (n - side) // 2) + side) for n in plane.shape
        )
        graph = _found_diameter(plane[crop], diameter, settings, params)
        found, cells = (evaluate or _threads)(graph)
        return found, cells, side >= max(plane.shape)

    for _ in range(max_rounds):
        found, cells, whole = segmented_crop(pixels, diameter)
        if cells < min_cells and not whole and pixels < max_pixels:
            pixels = max_pixels
            found, cells, _ = segmented_crop(pixels, diameter)
        if not np.isfinite(found):
            return diameter
        converged = abs(np.log(found / diameter)) < np.log(1.1)
        diameter = found
        if converged:
            break
    return diameter


def _found_diameter(
    crop: da.Array,
    diameter: float,
    settings: InferenceSettings,
    params: ConvNetParameters | None,
) -> Delayed:
    """The median diameter and the number of the nuclei segmented in ``crop`` at ``diameter``
    (lazy: one task)."""
    return dask.delayed(_median_of_cells, pure=True)(crop, diameter, settings, params)


def _median_of_cells(
    crop: np.ndarray,
    diameter: float,
    settings: InferenceSettings,
    params: ConvNetParameters | None,
) -> tuple[float, int]:
    maps = predict_maps(crop, diameter=diameter, settings=settings)
    diameters = equivalent_diameters(cells_from_maps(maps, diameter, params))
    return (float(np.median(diameters)) if diameters.size else float("nan")), diameters.size
