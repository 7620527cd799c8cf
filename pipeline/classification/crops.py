"""Fixed-size single-cell crops around every cell of a labelled frame.

Each crop is centred on the cell's centroid and covers ``window`` pixels of the input on each
side, resampled to ``size`` x ``size`` pixels (linear interpolation for intensities, nearest
for the mask, Gaussian anti-aliasing when shrinking, as ``skimage.transform.resize`` does). The
last channel of a crop is the cell's own mask (1 inside the cell, 0 elsewhere, neighbours
included). Where the window reaches past the image border the crop is filled with zeros there
and the cell is flagged (``border``), never silently padded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

__all__ = ["cut_crops"]


def cut_crops(
    image: np.ndarray,
    labels: np.ndarray,
    size: int,
    window: float | None = None,
    cells: Sequence[int] | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Crops of every cell of one 2D frame, each with its mask as the last channel.

    Parameters
    ----------
    image
        (C, Y, X) intensities, or (Y, X) for one channel.
    labels
        (Y, X) integer cell labels, 0 = background.
    size
        Edge of the crops in pixels.
    window
        Edge of the region cut around each centroid, in input pixels (default ``size``: no
        resampling). Giving it in micrometres / pixel size fixes the crops' physical size.
    cells
        Labels of the cells to cut, in this order (default: every cell, in increasing order).

    Returns
    -------
    crops : numpy.ndarray
        (N, C + 1, size, size) float32, one per cell.
    index : pandas.DataFrame
        One row per crop: ``label``, ``centroid_y``, ``centroid_x`` (input pixels), ``area``
        (pixels) and ``border`` (the window reaches past the image).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[np.newaxis]
    labels = np.asarray(labels)
    if image.ndim != 3 or labels.ndim != 2 or image.shape[1:] != labels.shape:
        raise ValueError(
            f"image (C, Y, X) and labels (Y, X) must cover the same plane, got {image.shape} "
            f"and {labels.shape}"
        )
    if size < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    window = float(size if window is None else window)
    if cells is None:
        ids = np.unique(labels)
        ids = ids[ids > 0]
    else:
        ids = np.asarray(cells, dtype=np.int64).reshape(-1)
    n_channels = image.shape[0]
    crops = np.zeros((len(ids), n_channels + 1, size, size), dtype=np.float32)
    if len(ids) == 0:
        return crops, pd.DataFrame(
            {
                "label": pd.Series(dtype=np.int64),
                "centroid_y": pd.Series(dtype=np.float64),
                "centroid_x": pd.Series(dtype=np.float64),
                "area": pd.Series(dtype=np.int64),
                "border": pd.Series(dtype=bool),
            }
        )
    areas = ndi.sum_labels(np.ones(labels.shape), labels, ids).astype(np.int64)
    if not areas.all():
        raise ValueError(f"cells not in the label image: {ids[areas == 0].tolist()[:10]}")
    centroids = np.asarray(ndi.center_of_mass(np.ones(labels.shape), labels, ids)).reshape(-1, 2)
    step = window / size
    offsets = (np.arange(size) - (size - 1) / 2.0) * step
    reach = window / 2.0 + 2.0 + 2.0 * step  # the window plus the interpolation and blur margin
    sigma = max(0.0, (step - 1.0) / 2.0)
    border = np.zeros(len(ids), dtype=bool)
    for i, (label, (cy, cx)) in enumerate(zip(ids, centroids, strict=True)):
        y0, x0 = max(0, int(np.floor(cy - reach))), max(0, int(np.floor(cx - reach)))
        y1 = min(labels.shape[0], int(np.ceil(cy + reach)) + 1)
        x1 = min(labels.shape[1], int(np.ceil(cx + reach)) + 1)
        rows, cols = cy + offsets - y0, cx + offsets - x0
        grid = np.meshgrid(rows, cols, indexing="ij")
        inside = (
            (cy + offsets[0] >= -0.5)
            & (cy + offsets[-1] <= labels.shape[0] - 0.5)
            & (cx + offsets[0] >= -0.5)
            & (cx + offsets[-1] <= labels.shape[1] - 0.5)
        )
        border[i] = not inside
        for c in range(n_channels):
            region = image[c, y0:y1, x0:x1].astype(np.float32)
            if sigma > 0:
                region = ndi.gaussian_filter(region, sigma, mode="nearest")
            crops[i, c] = ndi.map_coordinates(region, grid, order=1, mode="constant", cval=0.0)
        mask = (labels[y0:y1, x0:x1] == label).astype(np.float32)
        crops[i, n_channels] = ndi.map_coordinates(mask, grid, order=0, mode="constant", cval=0.0)
    index = pd.DataFrame(
        {
            "label": ids.astype(np.int64),
            "centroid_y": centroids[:, 0],
            "centroid_x": centroids[:, 1],
            "area": areas,
            "border": border,
        }
    )
    return crops, index
