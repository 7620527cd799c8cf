"""The nucleus diameter of an image, estimated by segmenting it with the conv-net."""

from __future__ import annotations

import numpy as np

from pipeline.convnet.inference import (
    InferenceSettings,
    loaded_model,
    median_diameter,
    predict_maps,
    rescale_factor,
)
from pipeline.segmentation.convnet import ConvNetParameters, cells_from_maps

__all__ = ["estimate_diameter"]


def estimate_diameter(
    image: np.ndarray,
    settings: InferenceSettings | None = None,
    params: ConvNetParameters | None = None,
    *,
    max_rounds: int = 4,
    max_pixels: int = 1024 * 1024,
) -> float:
    """Estimate the typical nucleus diameter (pixels) of a 2D image by segmenting it.

    Starting at the model's own diameter, segment, measure the median equivalent diameter of the
    nuclei found, rescale to it and repeat until it changes by less than 10% (Cellpose refines
    its estimate the same way). Each round looks at the image's central crop of at most
    ``max_pixels`` at the model's scale (about a thousand nucleus areas), so the cost does not
    grow with the image or with upscaling of small nuclei.

    Returns
    -------
    float
        The estimate, or the model's diameter when no nucleus is found.
    """
    settings = settings or InferenceSettings()
    _, info = loaded_model(settings.model, settings.device)
    image = np.asarray(image)
    diameter = float(info.diameter_px)
    for _ in range(max_rounds):
        side = int(np.sqrt(max_pixels) / rescale_factor(info, diameter))
        crop = tuple(
            slice(max(0, (n - side) // 2), max(0, (n - side) // 2) + side) for n in image.shape
        )
        maps = predict_maps(image[crop], diameter=diameter, settings=settings)
        found = median_diameter(cells_from_maps(maps, diameter, params))
        if not np.isfinite(found):
            return diameter
        converged = abs(np.log(found / diameter)) < np.log(1.1)
        diameter = found
        if converged:
            break
    return diameter
