"""Warnings for segmentations that do not look like nuclei (hand-computed cases), and the
brightfield rule on the real collection's modality labels."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from pipeline.normalize import colour_to_grey, frame_histogram, is_dark_on_light
from pipeline.qc.plausibility import segmentation_warnings


def _discs(diameter: float, count: int) -> np.ndarray:
    return np.full(count, np.pi * (diameter / 2) ** 2)


def test_plausible_nuclei_give_no_warning():
    # 50 nuclei of 20 px in two 256 x 256 frames: 12 % foreground, sizes as segmented.
    sizes = _discs(20.0, 50)
    assert segmentation_warnings(sizes, frame_pixels=256**2, n_frames=2, diameter_px=20.0) == []


def test_background_cut_into_cells_is_flagged():
    # 8,000 polygons of 9 px each covering 0.9 of a 400 x 200 frame.
    sizes = np.full(8000, 9.0)
    warnings = segmentation_warnings(sizes, frame_pixels=80_000, n_frames=1, diameter_px=None)
    assert len(warnings) == 1 and "cover 90%" in warnings[0]


def test_sizes_far_from_the_diameter_are_flagged_in_2d_only():
    sizes = _discs(8.0, 40)  # 8 px cells segmented for 20 px nuclei: ratio 0.4 < 1/2
    warnings = segmentation_warnings(sizes, frame_pixels=256**2, n_frames=1, diameter_px=20.0)
    assert len(warnings) == 1 and "8.0 px across" in warnings[0] and "20.0 px" in warnings[0]
    # A ratio of 0.55 is within the factor of two.
    assert not segmentation_warnings(
        _discs(11.0, 40), frame_pixels=256**2, n_frames=1, diameter_px=20.0
    )
    assert not segmentation_warnings(
        sizes, frame_pixels=256**2, n_frames=1, diameter_px=20.0, spatial_ndim=3
    )


def test_nothing_found_is_said():
    assert segmentation_warnings(np.array([]), frame_pixels=100, n_frames=3, diameter_px=10.0) == [
        "no cells found in any timepoint"
    ]


DSB2018 = next(
    (
        root / "data/segmentation/dsb2018"
        for root in (Path(__file__).resolve().parents[1] / "../shared", Path("/work/shared"))
        if (root / "data/segmentation/dsb2018/index.csv").is_file()
    ),
    None,
)


@pytest.mark.skipif(DSB2018 is None, reason="shared data ../shared/data/segmentation absent")
def test_brightfield_is_told_from_fluorescence_on_the_collection():
    """The rule that inverts a frame for the conv-net and flags a field as brightfield, against
    the collection's modality labels (judged from the images by its curators): no grey
    fluorescence image of 475 is taken for brightfield; every grey brightfield image is; all
    colour histology images but two (dense tissue whose luminance median lies at 0.36 and 0.44
    of its 1-99.9 percentile range) are."""
    index = pd.read_csv(DSB2018 / "index.csv")
    missed = {"gray": [], "gray-brightfield": [], "color-brightfield": []}
    for image_id, modality in zip(index["id"], index["modality"], strict=True):
        image = tifffile.imread(DSB2018 / "images" / f"{image_id}.tif")
        plane = colour_to_grey(image) if image.ndim == 3 else image
        if is_dark_on_light(*frame_histogram(plane)) != (modality != "gray"):
            missed[modality].append(image_id)
    assert index["modality"].value_counts().to_dict() == {
        "gray": 475,
        "color-brightfield": 94,
        "gray-brightfield": 14,
    }
    assert missed == {
        "gray": [],
        "gray-brightfield": [],
        "color-brightfield": ["13f2bec0a24c7034", "4193474b2f1c72f7"],
    }


def test_segment_warns_when_the_shipped_model_is_given_brightfield():
    """The same rule in the Python API: dark nuclei on a light background warn, the same
    nuclei bright on dark do not, nor do dark ones declared bright (polarity="bright")."""
    import pipeline
    from pipeline.synthetic import simulate_field

    bright = simulate_field(n_frames=1, size=96, seed=4).image[0, 0]
    dark = (bright.max() - bright).astype(bright.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pipeline.segment(bright, diameter=20.0)
    with pytest.warns(UserWarning, match="looks like brightfield"):
        pipeline.segment(dark, diameter=20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pipeline.segment(dark, diameter=20.0, polarity="bright")
