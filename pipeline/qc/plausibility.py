"""Does a field's segmentation look like nuclei the segmenter knows? Warnings, not errors.

A conv-net given images unlike its training data (phase contrast of bacteria, a cytoplasm
channel, an empty well) returns labels all the same: often the background cut into polygons,
or thousands of specks. These checks use only the cells table (sizes per cell), so they cost
nothing on the workers; their warnings go to the run summary, the field's completion record
and the QC report.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BRIGHTFIELD_WARNING",
    "MAX_FOREGROUND_FRACTION",
    "MAX_SIZE_RATIO",
    "segmentation_warnings",
]

MAX_FOREGROUND_FRACTION = 0.7
"""Nuclei cover at most 41 % of any fluorescence image of the 2018 Data Science Bowl
collection (59 % of a colour histology one); more suggests background taken for cells."""

MAX_SIZE_RATIO = 2.0
"""Median cell diameter more than this factor away from the diameter segmented at."""

BRIGHTFIELD_WARNING = (
    "the segmentation channel looks like brightfield (dark objects on a light background): the "
    "shipped nuclear model inverts it but segments such images poorly (AP50 0.00-0.53 on the "
    "brightfield images of its validation data, where cytoplasm is often taken for nuclei; see "
    "its model card): check the overlays, and fine-tune on a few annotated images of yours "
    "(pipeline train --init shipped) or segment a fluorescence nuclear channel"
)
"""Said of a field whose diameter-sample plane the shipped conv-net would invert."""


def segmentation_warnings(
    n_pixels: np.ndarray,
    *,
    frame_pixels: int,
    n_frames: int,
    diameter_px: float | None,
    spatial_ndim: int = 2,
) -> list[str]:
    """Warnings about a field's cells that suggest an input unlike what the segmenter knows.

    Parameters
    ----------
    n_pixels
        Pixels (voxels) of every cell of the field, all timepoints.
    frame_pixels
        Pixels (voxels) of one timepoint.
    n_frames
        Timepoints of the field.
    diameter_px
        Nucleus diameter (pixels) the conv-net segmented at; None for the classical recipe.
    spatial_ndim
        2 or 3; the size check runs on 2D fields only.

    Returns
    -------
    list of str
        One sentence per finding; empty when the result looks plausible.
    """
    n_pixels = np.asarray(n_pixels, dtype=np.float64)
    if n_pixels.size == 0:
        return ["no cells found in any timepoint"]
    warnings = []
    foreground = float(n_pixels.sum()) / (frame_pixels * n_frames)
    if foreground > MAX_FOREGROUND_FRACTION:
        warnings.append(
            f"cells cover {foreground:.0%} of the image (nuclei rarely cover more than "
            f"{MAX_FOREGROUND_FRACTION:.0%}): the background may have been segmented; check "
            "that the channel holds nuclei and that the model suits this kind of image"
        )
    if diameter_px and spatial_ndim == 2:
        found = float(np.median(2.0 * np.sqrt(n_pixels / np.pi)))
        ratio = found / diameter_px
        if not 1 / MAX_SIZE_RATIO <= ratio <= MAX_SIZE_RATIO:
            warnings.append(
                f"cells are {found:.1f} px across (median) but the field was segmented for "
                f"nuclei of {diameter_px:.1f} px: the diameter or the input may be wrong "
                "(set segmentation.convnet.diameter_px)"
            )
    return warnings
