"""Warnings for segmentations that do not look like nuclei (hand-computed cases)."""

from __future__ import annotations

import numpy as np

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
