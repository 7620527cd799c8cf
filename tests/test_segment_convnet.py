"""The conv-net segmenter: tiled instances equal whole-image instances, and it finds nuclei."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from dask.utils import key_split
from test_segment import same_up_to_renumbering

from pipeline import segment
from pipeline.convnet.inference import (
    InferenceSettings,
    loaded_model,
    median_diameter,
    predict_maps,
    rescale_factor,
)
from pipeline.qc.metrics import average_precision
from pipeline.segmentation.convnet import (
    RECIPE_MAPS,
    ConvNetParameters,
    ConvNetRecipe,
    cells_from_maps,
)
from pipeline.segmentation.diameter import estimate_diameter
from pipeline.segmentation.tiled import HaloTooSmall, label_frames
from pipeline.synthetic import simulate_field


@pytest.fixture(scope="module")
def field_2d():
    # nuclei ~20 px across at 0.5 um per pixel
    return simulate_field(n_frames=2, size=(300, 270), seed=11)


@pytest.mark.parametrize("chunk", [(64, 64), (100, 90), (77, 53), (150, 270)])
def test_tiled_equals_whole_image(field_2d, chunk):
    frames = field_2d.image[:, 0]
    sizes = field_2d.pixel_size
    expected = [segment(frame, pixel_size=sizes, diameter=20.0) for frame in frames]
    tiled = segment(
        da.from_array(frames, chunks=(1, *chunk)),
        dims="tyx",
        pixel_size=sizes,
        diameter=20.0,
        halo_um={"xy": 60.0},
        tile_px=64,
    ).compute()
    for reference, labels in zip(expected, tiled, strict=True):
        assert reference.max() > 20
        assert same_up_to_renumbering(labels, reference)


def test_tiled_3d_equals_whole_stack():
    field = simulate_field(n_frames=1, size=(96, 90), z_slices=10, seed=5)
    volume = field.image[0, 0]
    sizes = field.pixel_size
    reference = segment(volume, pixel_size=sizes, diameter=20.0)
    tiled = segment(
        da.from_array(volume, chunks=(4, 40, 45)),
        pixel_size=sizes,
        diameter=20.0,
        halo_um={"xy": 40.0, "z": 30.0},
        tile_px=64,
    ).compute()
    assert reference.max() > 3
    assert same_up_to_renumbering(tiled, reference)


def test_too_small_halo_is_detected(field_2d):
    maps = predict_maps(field_2d.image[0, 0], diameter=20.0)
    lazy = da.from_array(maps[np.newaxis, list(RECIPE_MAPS)], chunks=(1, 2, 64, 64))
    recipe = ConvNetRecipe(ConvNetParameters(), diameter_um=10.0)
    labels = label_frames(lazy, recipe=recipe, pixel_size=(0.5, 0.5), halo=(4, 4))
    with pytest.raises(HaloTooSmall):
        labels.compute()


def test_finds_simulated_nuclei_better_than_chance(field_2d):
    """A floor for the shipped model; the reported figures are in BENCHMARKS.md."""
    labels = segment(field_2d.image[0, 0], diameter=20.0)
    assert average_precision(field_2d.labels[0], labels) > 0.8


def test_diameter_is_estimated_within_20_percent(field_2d):
    truth = median_diameter(field_2d.labels[0])
    # the same nuclei shown at twice the magnification must be estimated twice as large
    image = np.kron(field_2d.image[0, 0], np.ones((2, 2), dtype=field_2d.image.dtype))
    for picture, expected in ((field_2d.image[0, 0], truth), (image, 2 * truth)):
        assert estimate_diameter(picture) == pytest.approx(expected, rel=0.2)


@pytest.mark.cluster
def test_diameter_rounds_are_one_task_each_and_the_same_on_a_cluster(field_2d, shared_scheduler):
    """A round segments its crop in one task, with the median diameter of whole-image
    inference; read lazily or computed on a cluster, the estimate is the same."""
    from distributed import Client

    image = field_2d.image[0, 0]
    _, info = loaded_model()
    # one round at the model's own scale looks at the whole 300 x 270 image
    whole_image_round = median_diameter(cells_from_maps(predict_maps(image), info.diameter_px))
    round_tasks = []

    def threads_counting_tasks(graph):
        round_tasks.append(sum(key_split(key) == "median_of_cells" for key in graph.dask))
        return graph.compute(scheduler="threads")

    assert estimate_diameter(image, max_rounds=1, evaluate=threads_counting_tasks) == (
        whole_image_round
    )
    assert round_tasks == [1]
    expected = estimate_diameter(image)
    assert estimate_diameter(da.from_array(image, chunks=64)) == expected
    with Client(shared_scheduler) as client:
        on_cluster = estimate_diameter(image, evaluate=lambda graph: client.compute(graph).result())
    assert on_cluster == expected


def test_diameter_rounds_grow_their_crop_only_where_it_holds_too_few_nuclei(field_2d, monkeypatch):
    """Rounds look at the smaller central crop (its side at the model's scale) where it holds
    enough nuclei; else the round is done again on the larger crop, as are the rounds after
    it, and the estimate is that of rounds on the larger crop alone."""
    from pipeline.segmentation import diameter as diameter_module

    image = np.tile(field_2d.image[0, 0], (3, 3))  # 900 x 810, nuclei ~20 px
    _, info = loaded_model()
    rounds: list[tuple[int, float]] = []
    found_diameter = diameter_module._found_diameter

    def spy(crop, diameter, *args):
        rounds.append((crop.shape[0], diameter))
        return found_diameter(crop, diameter, *args)

    monkeypatch.setattr(diameter_module, "_found_diameter", spy)

    def side(pixels: int, diameter: float) -> int:
        return int(np.sqrt(pixels) / rescale_factor(info, diameter))

    dense = estimate_diameter(image, min_pixels=512 * 512, min_cells=20)
    assert len(rounds) >= 2 and dense == pytest.approx(20, rel=0.2)
    assert all(crop == side(512 * 512, diameter) for crop, diameter in rounds)
    assert max(crop for crop, _ in rounds) < min(image.shape)  # smaller than the image

    rounds.clear()
    sparse = estimate_diameter(image, min_pixels=512 * 512, min_cells=10**6)
    pixels = [512 * 512] + [1024 * 1024] * (len(rounds) - 1)
    expected = [min(side(p, d), len(image)) for p, (_, d) in zip(pixels, rounds, strict=True)]
    assert [crop for crop, _ in rounds] == expected
    assert rounds[0][1] == rounds[1][1]  # the first round again, on the larger crop
    assert sparse == estimate_diameter(image, min_pixels=1024 * 1024)


def test_cells_from_maps_separates_two_touching_seeds():
    """Hand-made maps: one foreground blob with two distance peaks gives two cells."""
    yy, xx = np.mgrid[:40, :60]
    left = np.clip(1 - np.hypot(yy - 20, xx - 20) / 10, 0, None)
    right = np.clip(1 - np.hypot(yy - 20, xx - 38) / 10, 0, None)
    distance = np.maximum(left, right)
    foreground = distance > 0
    maps = np.stack([~foreground, np.zeros_like(distance), foreground, distance]).astype(np.float32)
    labels = cells_from_maps(maps, diameter_px=20.0)
    assert len(np.unique(labels[labels > 0])) == 2
    assert labels[20, 20] != labels[20, 38]
    assert np.array_equal(labels > 0, foreground)


def test_settings_reach_the_model():
    with pytest.raises(Exception, match="model file not found"):
        predict_maps(np.zeros((16, 16)), settings=InferenceSettings(model="/nonexistent/m"))


def test_axial_half_maximum_bounds_nuclei_along_z():
    """Hand-made maps: the 2D maps say "nucleus" on all 15 planes, the intensity falls off
    along z as a Gaussian (sigma 2 planes); only the planes within its half maximum stay."""
    z = np.arange(15)[:, None, None]
    yy, xx = np.mgrid[:40, :40]
    disc = np.hypot(yy - 20, xx - 20) < 8
    distance = np.clip(1 - np.hypot(yy - 20, xx - 20) / 8, 0, None)
    profile = np.exp(-((z - 7) ** 2) / (2 * 2.0**2))
    maps = np.stack(
        [
            np.broadcast_to(~disc, (15, 40, 40)),
            np.zeros((15, 40, 40)),
            np.broadcast_to(disc, (15, 40, 40)),
            np.broadcast_to(distance, (15, 40, 40)),
            profile * disc,
        ]
    ).astype(np.float32)
    params = ConvNetParameters(smoothing=0.0)  # no blur: the profile is used as given
    labels = cells_from_maps(maps, diameter_px=16.0, params=params, pixel_size=(1.0, 1.0, 1.0))
    planes = np.flatnonzero(labels.any(axis=(1, 2)))
    half_width = 2.0 * np.sqrt(2 * np.log(2))  # |z - 7| <= 2.35 planes
    assert planes.tolist() == [z for z in range(15) if abs(z - 7) <= half_width]
    assert len(np.unique(labels[labels > 0])) == 1  # one seed at the 3D centre, one nucleus
    # Without the intensity (four maps) or with the gate off, every plane is kept.
    for kept in (
        cells_from_maps(maps[:4], 16.0, params, pixel_size=(1.0, 1.0, 1.0)),
        cells_from_maps(
            maps, 16.0, params.model_copy(update={"axial_fraction": 0.0}), (1.0, 1.0, 1.0)
        ),
    ):
        assert kept.any(axis=(1, 2)).all()
