"""CellProfiler features through cp-measure: equal to cp-measure on the whole image, sane against
numpy, neighbour distances against scipy's pairwise distances, tiled (odd chunks) == whole image
for every column, and clear errors."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from cp_measure.bulk import (
    get_core_measurements,
    get_correlation_measurements,
    get_multimask_measurements,
)
from scipy.spatial.distance import cdist
from skimage.segmentation import relabel_sequential

import pipeline
from pipeline.measurement.features import FEATURE_SETS
from pipeline.synthetic import simulate_field


@pytest.fixture(scope="module")
def field():
    simulated = simulate_field(n_frames=2, size=160, seed=6)
    return simulated.labels, simulated.image


@pytest.fixture(scope="module")
def whole_cells():
    """Touching whole cells (nucleus plus a 3 um ring) and their image."""
    simulated = simulate_field(n_frames=2, size=160, seed=6)
    return simulated.cells, simulated.image


def test_touching_neighbours_equal_cp_measure_on_the_whole_frame(whole_cells):
    cells, image = whole_cells
    table = pipeline.measure(cells[0], image[0], dims="yx", features=["neighbors"])
    sequential, _, inverse = relabel_sequential(cells[0].astype(np.int32))
    reference = get_multimask_measurements()["neighbors"](
        sequential, sequential, distance_method="Adjacent"
    )
    assert table["label"].tolist() == inverse[1:].tolist()
    assert table["Neighbors_NumberOfNeighbors_Adjacent"].max() >= 3  # cells do touch
    for column in ("Neighbors_NumberOfNeighbors_Adjacent", "Neighbors_PercentTouching_Adjacent"):
        np.testing.assert_allclose(table[column], reference[column])


def test_nearest_distances_are_between_the_centres_of_each_frame():
    labels = np.zeros((2, 40, 60), np.int32)
    labels[0, 2:6, 2:6] = 1  # centre (3.5, 3.5)
    labels[0, 2:6, 12:16] = 2  # centre (3.5, 13.5): 10 px from 1
    labels[0, 30:34, 2:6] = 3  # centre (31.5, 3.5): 28 px from 1
    labels[1, 10:12, 10:12] = 4  # alone in its frame
    table = pipeline.measure(
        labels,
        dims="tyx",
        image=np.zeros((2, 1, 40, 60)),
        features=["neighbors"],
        pixel_size={"y": 0.5, "x": 0.5},
    )
    centres = table.loc[table["t"] == 0, ["y", "x"]].to_numpy()
    pairwise = np.sort(cdist(centres, centres), axis=1)
    np.testing.assert_allclose(table["Neighbors_FirstClosestDistance_um"][:3], pairwise[:, 1])
    np.testing.assert_allclose(table["Neighbors_SecondClosestDistance_um"][:3], pairwise[:, 2])
    assert table["Neighbors_FirstClosestDistance_um"][0] == pytest.approx(5.0)  # 10 px x 0.5 um
    assert table.iloc[3][["Neighbors_FirstClosestDistance_um"]].isna().all()
    assert table["Neighbors_NumberOfNeighbors_Adjacent"].tolist() == [0, 0, 0, 0]


def test_features_equal_cp_measure_on_the_whole_frame(field):
    labels, image = field
    table = pipeline.measure(
        labels[0], image[0], dims="yx", channel_names=["dna", "ktr"], features=FEATURE_SETS
    ).set_index("label")
    core = get_core_measurements()
    scaled = image[0] / 65535.0
    shape = core["sizeshape"](labels[0].astype(np.int32), scaled[0])
    np.testing.assert_allclose(table["AreaShape_Area"], shape["Area"])
    np.testing.assert_allclose(table["AreaShape_Area"], table["n_pixels"])  # pixel count
    texture = core["texture"](labels[0].astype(np.int32), scaled[1])
    np.testing.assert_allclose(table["Texture_Contrast_3_00_256_ktr"], texture["Contrast_3_00_256"])
    intensity = core["intensity"](labels[0].astype(np.int32), scaled[0])
    np.testing.assert_allclose(
        table["Intensity_MeanIntensity_dna"], intensity["Intensity_MeanIntensity"]
    )
    np.testing.assert_allclose(  # and the mean of the raw pixels, scaled
        table["Intensity_MeanIntensity_dna"], table["intensity_mean_dna"] / 65535.0
    )
    pearson = get_correlation_measurements()["pearson"](scaled[0], scaled[1], labels[0])
    np.testing.assert_allclose(
        table["Correlation_Pearson_dna_ktr"], pearson["Correlation_Pearson"], rtol=1e-12
    )
    for label in table.index[:5]:  # and numpy's correlation of the cell's pixels
        inside = labels[0] == label
        want = np.corrcoef(scaled[0][inside], scaled[1][inside])[0, 1]
        assert table.loc[label, "Correlation_Pearson_dna_ktr"] == pytest.approx(want, rel=1e-9)
    # Zernike moments: cp-measure on each cell's bounding box grown by one pixel (zero-padded)
    padded_labels = np.pad(labels[0].astype(np.int32), 1)
    padded = np.pad(scaled[0], 1)
    for label in table.index[:5]:
        ys, xs = np.nonzero(padded_labels == label)
        box = (slice(ys.min() - 1, ys.max() + 2), slice(xs.min() - 1, xs.max() + 2))
        alone = (padded_labels[box] == label).astype(np.int32)
        want = core["zernike"](alone, padded[box])["Zernike_2_0"][0]
        assert table.loc[label, "AreaShape_Zernike_2_0"] == pytest.approx(want, rel=1e-12)
        # granularity: cp-measure on the box grown (centred) to at least 24 px, the pixels
        # outside the cell set to 0
        big = np.pad(padded_labels, 24)
        grown = []
        for piece in box:
            extra = max(24 - (piece.stop - piece.start), 0)
            start = piece.start + 24 - extra // 2
            grown.append(slice(start, start + max(piece.stop - piece.start, 24)))
        alone = (big[tuple(grown)] == label).astype(np.int32)
        alone_pixels = np.where(alone > 0, np.pad(padded, 24)[tuple(grown)], 0.0)
        spectrum = core["granularity"](alone, alone_pixels, subsample_size=0.5)
        for step in (1, 2, 5):
            assert table.loc[label, f"Granularity_{step}_dna"] == pytest.approx(
                spectrum[f"Granularity_{step}"][0], rel=1e-9, abs=1e-12
            )


def test_granularity_puts_fine_granules_in_the_first_steps_and_a_plain_cell_in_later_ones():
    """Two discs of radius 24 px and the same mean 0.3: one uniform, one of 2 px granules
    holding 0.2 on a base of 0.1. At half resolution the granules are one pixel: the first
    step removes them, 2/3 of the mean, and nothing of the uniform disc; the discs (radius 12
    there) vanish at the 13th erosion."""
    grid = np.indices((64, 128))
    labels = np.zeros((64, 128), np.int32)
    labels[np.hypot(grid[0] - 32, grid[1] - 32) < 24] = 1
    labels[np.hypot(grid[0] - 32, grid[1] - 96) < 24] = 2
    image = np.zeros((1, 64, 128))
    image[0][labels == 1] = 0.3
    granules = (grid[0] % 8 < 2) & (grid[1] % 8 < 2) & (labels == 2)
    image[0][labels == 2] = 0.1
    image[0][granules] = 0.1 + 0.2 * (labels == 2).sum() / granules.sum()
    table = pipeline.measure(labels, image, dims="yx", features=["granularity"])
    spectrum = table[[f"Granularity_{k}_0" for k in range(1, 17)]].to_numpy()
    uniform, granular = spectrum
    assert granular[0] == pytest.approx(200 / 3, abs=2)  # % of the mean gone at step 1
    assert uniform[0] < 3  # the disc's outline, resampled
    assert np.argmax(uniform) == np.argmax(granular[1:]) + 1 == 12
    np.testing.assert_allclose(spectrum.sum(axis=1), 100, atol=1)  # all gone in the end


def _small_squares() -> np.ndarray:
    """Squares 10-17 px wide, one per size: the cells whose bounding box grown by a pixel gives
    a 1/8-scale background image 2 px across, where scipy's reflect-mode filters read outside
    the array (with a footprint that much larger; scipy 1.17)."""
    labels = np.zeros((40, 8 * 40), np.int32)
    for k, width in enumerate(range(10, 18)):
        labels[5 : 5 + width, 40 * k + 5 : 40 * k + 5 + width] = k + 1
    return labels


def test_granularity_of_small_uniform_cells_has_no_fine_texture():
    """Nothing of a uniform cell is fine texture: step 1 takes at most its resampled outline,
    and all of it is gone by the last step."""
    labels = _small_squares()
    image = np.where(labels > 0, 0.5, 0.0)[None]
    table = pipeline.measure(labels, image, dims="yx", features=["granularity"])
    spectrum = table[[f"Granularity_{k}_0" for k in range(1, 17)]].to_numpy()
    assert (spectrum[:, 0] < 50).all()
    np.testing.assert_allclose(spectrum.sum(axis=1), 100, atol=1)


def test_granularity_never_gets_a_crop_whose_background_image_is_2_px(monkeypatch):
    """The crops of small cells are grown to 24 px, so the background image (1/2 x 1/4 of the
    crop) has at least 3 px per axis and scipy never reads outside it (a random spectrum,
    about one run in ten, before)."""
    import cp_measure.bulk

    real = cp_measure.bulk.get_core_measurements()
    shapes = []

    def recording(mask, pixels, **options):
        shapes.append(mask.shape)
        return real["granularity"](mask, pixels, **options)

    monkeypatch.setattr(
        cp_measure.bulk, "get_core_measurements", lambda: {**real, "granularity": recording}
    )
    labels = _small_squares()
    pipeline.measure(labels, labels[None] * 0.01, dims="yx", features=["granularity"])
    assert len(shapes) == 8
    background = [math.ceil(int(n * 0.5) * 0.25) for shape in shapes for n in shape]
    assert min(background) >= 3


@pytest.mark.parametrize("objects", ["nuclei", "touching cells"])
def test_tiled_features_equal_whole_image_features(field, whole_cells, objects):
    labels, image = field if objects == "nuclei" else whole_cells
    options = {"dims": "tyx", "features": FEATURE_SETS, "pixel_size": {"y": 0.5, "x": 0.5}}
    whole = pipeline.measure(labels, image, **options)
    tiled = pipeline.measure(
        da.from_array(labels, chunks=(1, 45, 70)),
        da.from_array(image, chunks=(1, 2, 45, 70)),
        **options,
    ).compute()
    tiled = tiled.sort_values(["t", "label"], ignore_index=True)[whole.columns]
    assert len(whole) > 20 and whole.shape[1] > 300
    pd.testing.assert_frame_equal(tiled, whole, check_dtype=False)


def test_features_of_whole_cells_come_with_their_compartments(field):
    labels, image = field
    cells = pipeline.segment(image, dims="tcyx", target="cells", nuclei=labels, cell_channel=1)
    table = pipeline.measure(labels, image, dims="tyx", cells=cells, features=["sizeshape"])
    keys = list(zip(table["t"], table["label"], strict=True))
    assert table["AreaShape_Area"].tolist() == [int(np.sum(cells[t] == k)) for t, k in keys]
    assert (table["AreaShape_Area"] > table["n_pixels"]).all()  # cells, not nuclei


def test_unknown_or_unavailable_feature_sets_are_refused(field):
    labels, image = field
    with pytest.raises(ValueError, match="unknown feature sets"):
        pipeline.measure(labels[0], image[0], dims="yx", features=["haralick"])
    stack = np.zeros((4, 16, 16), np.int32)
    stack[1:3, 4:9, 4:9] = 1
    with pytest.raises(ValueError, match="z-stacks"):
        pipeline.measure(stack, np.ones((1, 4, 16, 16)), dims="zyx", features=["zernike"])


@pytest.mark.cluster
def test_a_run_adds_the_configured_features_of_its_nuclei(tmp_path, shared_scheduler):
    """measurement.features in a run: the cells table has them, equal to pipeline.measure on
    the written labels (the run's labels are global raster ids before renumbering)."""
    import zarr

    from pipeline.config import RunConfig
    from pipeline.orchestration.runner import run
    from pipeline.synthetic import simulate_plate

    plate = simulate_plate(
        tmp_path / "plate.zarr", rows=1, columns=1, fields=1, n_frames=2, size=128, seed=8
    )
    config = RunConfig.model_validate(
        {
            "segmentation": {"method": "classical"},
            "measurement": {"features": ["sizeshape", "zernike", "texture", "neighbors"]},
        }
    )
    summary = run(plate, tmp_path / "out.zarr", config=config, scheduler=shared_scheduler)
    assert not summary.failed
    labels = zarr.open_group(tmp_path / "out.zarr/A/1/0", mode="r")["labels/cells/0"][:]
    image = zarr.open_group(plate / "A/1/0", mode="r")["0"][:]
    table = pd.read_parquet(tmp_path / "out.zarr/A/1/0/tables/cells/table.parquet")
    expected = pipeline.measure(
        labels,
        image,
        dims="tyx",
        channel_names=["nuclei", "cytoplasm"],
        features=["sizeshape", "zernike", "texture", "neighbors"],
        pixel_size={"y": 0.5, "x": 0.5},  # the simulated plate's
    )
    columns = [c for c in expected.columns if c.startswith(("AreaShape_", "Texture_", "Neigh"))]
    assert len(columns) > 100
    pd.testing.assert_frame_equal(
        table.sort_values(["t", "label"], ignore_index=True)[columns],
        expected[columns],
        check_dtype=False,
    )
