"""Tiled classical segmentation equals whole-image segmentation (DESIGN contract 2)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from pipeline import segment
from pipeline.qc.metrics import average_precision
from pipeline.segmentation import classical
from pipeline.segmentation.classical import (
    ClassicalParameters,
    ClassicalRecipe,
    ellipsoid_footprint,
    footprint_maxima,
    segment_region,
)
from pipeline.segmentation.threshold import frame_threshold, frame_thresholds
from pipeline.segmentation.tiled import HaloTooSmall, label_frames
from pipeline.synthetic import simulate_field
from pipeline.tiling import axis_blocks, halo_pixels, smallest_blocks, tile_blocks


def same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a one-to-one map of non-zero ids turns ``a`` into ``b``."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def whole_image_labels(frames: np.ndarray, pixel_size, params) -> list[np.ndarray]:
    """The untiled reference: the recipe on each whole frame, with its own Otsu threshold."""
    return [segment_region(f, frame_threshold(f), pixel_size, params) for f in frames]


@pytest.fixture(scope="module")
def field_2d():
    return simulate_field(n_frames=2, size=(300, 270), seed=3)


@pytest.fixture(scope="module")
def field_3d():
    return simulate_field(n_frames=1, size=(128, 120), z_slices=16, seed=5)


def test_threshold_matches_skimage_otsu_on_8bit_and_dask_equals_numpy():
    rng = np.random.default_rng(0)
    image = np.concatenate([rng.normal(60, 10, 3000), rng.normal(180, 15, 1000)])
    image = np.clip(image, 0, 255).astype(np.uint8).reshape(40, 100)
    # skimage bins an 8-bit image by integer value too: the two must agree exactly
    assert frame_threshold(image) == pytest.approx(threshold_otsu(image))
    lazy = frame_thresholds(da.from_array(image[None], chunks=(1, 13, 29))).compute()
    assert lazy[0] == frame_threshold(image)
    floats = image.astype(np.float32) / 7.0
    lazy = frame_thresholds(da.from_array(floats[None], chunks=(1, 17, 31))).compute()
    assert lazy[0] == frame_threshold(floats)


def test_halo_conversion_is_per_axis():
    assert halo_pixels({"xy": 10.0, "z": 6.0}, {"z": 2.0, "y": 0.5, "x": 0.25}, "zyx") == (
        3,
        20,
        40,
    )


@pytest.mark.parametrize(
    ("size", "chunk", "halo", "expected"),
    [
        (100, 32, 10, (32, 32, 36)),
        (100, 16, 40, (48, 52)),
        (50, 64, 10, (50,)),
        (96, 32, 5, (32,) * 3),
    ],
)
def test_axis_blocks(size, chunk, halo, expected):
    assert axis_blocks(size, chunk, halo) == expected
    assert sum(expected) == size


@pytest.mark.parametrize(
    ("size", "largest", "halo", "expected"),
    [
        (1501, 1024, 56, (752, 749)),  # not (1024, 477): equal work per tile
        (2048, 1024, 56, (1024, 1024)),
        (1000, 256, 0, (256, 248, 248, 248)),
        (100, 1024, 56, (100,)),
        (130, 64, 60, (130,)),  # two tiles would leave one of 58 < 60 pixels
    ],
)
def test_tile_blocks_are_the_fewest_and_as_equal_as_the_stride_allows(
    size, largest, halo, expected
):
    tiles = tile_blocks(size, largest, 8, halo)
    assert tiles == expected
    assert all(tile % 8 == 0 for tile in tiles[:-1])


@pytest.mark.parametrize("every_pixel", [False, True])
def test_footprint_maxima_equal_scipys_maximum_filter(monkeypatch, every_pixel):
    """Smooth fields with ties (values rounded) and integer plateaus, 1-3D, anisotropic
    footprints up to the image's size: the same maxima as scipy's filter of every pixel, by the
    candidates' path (``every_pixel`` False: never the fallback) and by the fallback."""
    monkeypatch.setattr(classical, "MAX_CANDIDATE_SHARE", 0.0 if every_pixel else 2.0)
    rng = np.random.default_rng(3)
    for trial in range(120):
        ndim = int(rng.integers(1, 4))
        shape = tuple(int(n) for n in rng.integers(1, 30, size=ndim))
        if trial % 2:
            values = rng.integers(0, 4, size=shape).astype(np.float64)
        else:
            values = np.round(ndi.gaussian_filter(rng.random(shape), 1.5), 2)
        allowed = rng.random(shape) < 0.7
        pixel_size = tuple(rng.uniform(0.3, 2.0, size=ndim))
        footprint = ellipsoid_footprint(float(rng.uniform(0.2, 4.0)), pixel_size)
        expected = allowed & (
            ndi.maximum_filter(values, footprint=footprint, mode="nearest") == values
        )
        np.testing.assert_array_equal(footprint_maxima(values, allowed, footprint), expected)


def test_blocks_in_the_image_plane_are_several_halos_long():
    # 120-pixel halos (20-pixel nuclei): 480-pixel blocks, read as 720 = 1.5 x 480 per axis
    assert smallest_blocks("yx", (120, 120), 256, 4) == [480, 480]
    assert axis_blocks(1024, 256, 120, 480) == (512, 512)
    # small halos keep the configured minimum; z blocks only need the halo's depth
    assert smallest_blocks("zyx", (3, 20, 20), 256, 4) == [1, 256, 256]
    assert smallest_blocks("yx", (33, 10), 64, 2.5) == [83, 64]


@pytest.mark.parametrize("chunk", [(64, 64), (100, 90), (77, 53), (150, 270)])
def test_tiled_equals_whole_image_2d(field_2d, chunk):
    frames = field_2d.image[:, 0]
    pixel = (field_2d.pixel_size["y"], field_2d.pixel_size["x"])
    params = ClassicalParameters()
    expected = whole_image_labels(frames, pixel, params)
    tiled = segment(
        da.from_array(field_2d.image[:, 0], chunks=(1, *chunk)),
        "classical",
        dims="tyx",
        pixel_size=field_2d.pixel_size,
        halo_um={"xy": 60.0},
    ).compute()
    for t, reference in enumerate(expected):
        assert reference.max() > 20
        assert same_up_to_renumbering(tiled[t], reference)
    # labels unique over the whole time series and consecutive
    assert np.array_equal(np.unique(tiled), np.arange(tiled.max() + 1))


@pytest.mark.parametrize("chunk", [(16, 40, 40), (5, 48, 45), (7, 33, 120)])
def test_tiled_equals_whole_image_3d_anisotropic(field_3d, chunk):
    volume = field_3d.image[0, 0]
    sizes = field_3d.pixel_size
    pixel = (sizes["z"], sizes["y"], sizes["x"])
    params = ClassicalParameters(min_size_um=50.0, max_hole_size_um=500.0)
    (reference,) = whole_image_labels(volume[None], pixel, params)
    tiled = segment(
        da.from_array(volume, chunks=chunk),
        "classical",
        dims="zyx",
        pixel_size=sizes,
        halo_um={"xy": 40.0, "z": 30.0},
        min_size_um=50.0,
        max_hole_size_um=500.0,
    ).compute()
    assert len(np.unique(reference)) > 8
    assert same_up_to_renumbering(tiled, reference)


def test_too_small_halo_is_detected_not_silently_cut(field_2d):
    frames = da.from_array(field_2d.image[:1, 0], chunks=(1, 64, 64))
    labels = label_frames(
        frames,
        frame_thresholds(frames),
        recipe=ClassicalRecipe(ClassicalParameters()),
        pixel_size=(0.5, 0.5),
        halo=(4, 4),
    )
    with pytest.raises(HaloTooSmall, match="does not fit in the halo"):
        labels.compute()


def test_numpy_in_numpy_out_and_border_clearing(field_2d):
    image = field_2d.image[0, 0, 7:203, 11:191]  # a crop, so cells are cut by its border
    labels = segment(image, "classical", pixel_size=field_2d.pixel_size, clear_border=True)
    assert isinstance(labels, np.ndarray)
    edges = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    assert not edges.any()
    kept = segment(image, "classical", pixel_size=field_2d.pixel_size)
    assert kept.max() > labels.max()


def test_classical_accuracy_on_simulated_field(field_2d):
    """A floor, not the figure reported: the simulator is meant to be realistic, not easy."""
    labels = segment(field_2d.image[0, 0], "classical", pixel_size=field_2d.pixel_size)
    assert average_precision(field_2d.labels[0], labels) > 0.6


def test_unknown_parameter_is_rejected():
    with pytest.raises(ValueError, match="min_sise_um"):
        segment(np.zeros((10, 10), np.uint8), "classical", min_sise_um=3)


def test_dask_input_retries_with_a_larger_halo_like_a_run(field_2d, monkeypatch):
    """Small chunks and a halo too small for the cells: the API recomputes with a doubled halo
    (the rule ``pipeline run`` uses) and returns the whole-image labels, not an error."""
    import pipeline.api

    halos: list[float] = []
    retry = pipeline.api.with_halo_retries

    def recording(attempt, halo_um, retries):
        def recorded(halo):
            halos.append(halo["xy"])
            return attempt(halo)

        return retry(recorded, halo_um, retries)

    image = field_2d.image[0, 0]
    whole = segment(image, "classical")
    monkeypatch.setattr(pipeline.api, "with_halo_retries", recording)
    tiled = segment(da.from_array(image, chunks=100), "classical", halo_um={"xy": 16.0})
    assert isinstance(tiled, da.Array)
    assert halos[0] == 16.0 and len(halos) > 1 and halos[1] == 32.0
    assert same_up_to_renumbering(whole, tiled.compute())
    assert whole.max() > 20


def test_colour_image_is_segmented_on_its_luminance_with_a_warning(field_2d):
    from pipeline.normalize import colour_to_grey

    grey = field_2d.image[0, 0].astype(np.float32)
    rgb = np.stack([grey, grey * 0.5, grey * 0.25], axis=-1)  # a tinted copy
    with pytest.warns(UserWarning, match="taken as RGB colour"):
        labels = segment(rgb, "classical")
    assert np.array_equal(labels, segment(colour_to_grey(rgb), "classical"))
    with pytest.warns(UserWarning, match="taken as RGB colour"):
        lazy = segment(da.from_array(rgb, chunks=(100, 100, 1)), "classical")
    assert same_up_to_renumbering(lazy.compute(), labels)
    # Luminance weights: BT.709, as skimage.color.rgb2gray.
    from skimage.color import rgb2gray

    pixel = np.array([[[200, 100, 50]]], dtype=np.float32)
    assert colour_to_grey(pixel)[0, 0] == pytest.approx(255 * rgb2gray(pixel / 255)[0, 0], rel=1e-4)


@pytest.mark.parametrize("method", ["classical", "convnet"])
def test_nan_or_infinite_pixels_are_refused_in_words_on_numpy_and_dask(field_2d, method):
    image = field_2d.image[0, 0].astype(np.float32)
    image[3, 4] = np.nan
    for given in (image, da.from_array(image, chunks=40)):
        with pytest.raises(ValueError, match="NaN or infinite pixels; replace them first"):
            labels = segment(given, method, diameter=20.0 if method == "convnet" else None)
            labels.compute() if isinstance(labels, da.Array) else labels
