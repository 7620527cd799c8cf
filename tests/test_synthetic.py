"""The simulator: determinism, exact lineage, bounded motion, growth, image formation, OME-Zarr."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import regionprops

from pipeline.errors import PipelineInputError
from pipeline.io.omezarr import open_plate
from pipeline.synthetic import (
    CHANNEL_NAMES,
    field_seed,
    read_ground_truth,
    simulate_field,
    simulate_plate,
)

DIAMETER_UM = 10.0
PIXEL_UM = 0.5


@pytest.fixture(scope="module")
def default_field():
    return simulate_field(seed=3)


def presence_frames(labels: np.ndarray) -> dict[int, list[int]]:
    """Frames in which each label has pixels, computed from the arrays alone."""
    frames: dict[int, list[int]] = {}
    for t, frame in enumerate(labels):
        for label in np.unique(frame[frame > 0]).tolist():
            frames.setdefault(label, []).append(t)
    return frames


def centroids(frame: np.ndarray) -> dict[int, np.ndarray]:
    return {region.label: np.array(region.centroid) for region in regionprops(frame)}


def assert_lineage_matches(labels: np.ndarray, lineage) -> None:
    frames = presence_frames(labels)
    assert sorted(frames) == sorted(lineage["label"].tolist())
    assert list(lineage.columns) == ["label", "first", "last", "parent"]
    assert all(dtype == np.int64 for dtype in lineage.dtypes)
    rows = lineage.set_index("label")
    for label, present in frames.items():
        assert present == list(range(present[0], present[-1] + 1)), f"label {label} has a gap"
        assert (rows.at[label, "first"], rows.at[label, "last"]) == (present[0], present[-1])
    for label, parent in rows["parent"].items():
        if parent:
            assert parent in rows.index
            assert rows.at[parent, "last"] == rows.at[label, "first"] - 1
    assert (rows["parent"][rows["parent"] > 0].value_counts() <= 2).all()


def test_same_seed_is_identical_and_seeds_differ():
    first = simulate_field(n_frames=3, size=96, seed=7)
    again = simulate_field(n_frames=3, size=96, seed=7)
    other = simulate_field(n_frames=3, size=96, seed=8)
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert first.lineage.equals(again.lineage)
    assert not np.array_equal(first.labels, other.labels)
    assert not np.array_equal(first.image, other.image)


def test_shapes_dtypes_and_pixel_size(default_field):
    assert default_field.image.shape == (8, 2, 256, 256)
    assert default_field.image.dtype == np.uint16
    assert default_field.labels.shape == (8, 256, 256)
    assert default_field.labels.dtype == np.uint32
    assert default_field.pixel_size == {"y": PIXEL_UM, "x": PIXEL_UM}


def test_lineage_is_exact_and_has_divisions(default_field):
    assert_lineage_matches(default_field.labels, default_field.lineage)
    assert (default_field.lineage["parent"] > 0).sum() >= 2


def test_daughters_appear_next_to_their_mother(default_field):
    lineage = default_field.lineage
    daughters = lineage[lineage["parent"] > 0]
    last = lineage.set_index("label")["last"]
    for label, first, parent in daughters[["label", "first", "parent"]].itertuples(index=False):
        mother = centroids(default_field.labels[last[parent]])[parent]
        daughter = centroids(default_field.labels[first])[label]
        assert np.linalg.norm(daughter - mother) * PIXEL_UM < DIAMETER_UM


def test_each_cell_is_one_connected_region_and_many_touch(default_field):
    frame = default_field.labels[-1]
    for region in regionprops(frame):
        assert ndimage.label(region.image)[1] == 1
    touching = set()
    for a, b in ((frame[1:], frame[:-1]), (frame[:, 1:], frame[:, :-1])):
        boundary = (a != b) & (a > 0) & (b > 0)
        touching |= set(a[boundary].tolist()) | set(b[boundary].tolist())
    assert len(touching) >= 0.3 * (len(np.unique(frame)) - 1)


@pytest.mark.parametrize("step_fraction", [0.08, 0.3])
def test_continuing_tracks_move_less_than_half_a_diameter(step_fraction):
    simulated = simulate_field(n_frames=6, size=192, seed=1, step_fraction=step_fraction)
    steps = []
    for before, after in zip(simulated.labels[:-1], simulated.labels[1:], strict=True):
        start, end = centroids(before), centroids(after)
        steps += [np.linalg.norm(end[k] - start[k]) * PIXEL_UM for k in start.keys() & end.keys()]
    assert len(steps) > 100
    assert max(steps) < 0.5 * DIAMETER_UM
    assert np.median(steps) > 0.02 * DIAMETER_UM  # they do move


def test_cells_are_about_the_requested_size_and_grow(default_field):
    labels = default_field.labels
    areas = np.bincount(labels[0].ravel())[1:]
    diameters = 2 * np.sqrt(areas[areas > 0] / np.pi) * PIXEL_UM
    assert 0.8 * DIAMETER_UM < np.median(diameters) < 1.2 * DIAMETER_UM
    lineage = default_field.lineage
    long_tracks = lineage[(lineage["last"] - lineage["first"] >= 4)]
    grew = [
        (labels[last] == label).sum() > (labels[first] == label).sum()
        for label, first, last in long_tracks[["label", "first", "last"]].itertuples(index=False)
    ]
    assert len(grew) >= 10 and np.mean(grew) > 0.7


def test_channels_show_nuclei_and_cytoplasm_rings(default_field):
    labels = default_field.labels[0]
    nuclei, cytoplasm = default_field.image[0].astype(float)
    inside = labels > 0
    distance = ndimage.distance_transform_edt(~inside) * PIXEL_UM
    ring = (distance > 0.5) & (distance < 2.5)
    far = distance > 6
    background = nuclei[far]
    assert nuclei[inside].mean() > background.mean() + 10 * background.std()
    assert cytoplasm[ring].mean() > cytoplasm[far].mean() + 5 * cytoplasm[far].std()
    assert background.std() > 0  # noisy
    foreground = nuclei > threshold_otsu(ndimage.gaussian_filter(nuclei, 1))
    dice = 2 * (foreground & inside).sum() / (foreground.sum() + inside.sum())
    assert dice > 0.85


def test_illumination_is_uneven():
    simulated = simulate_field(n_frames=1, size=128, density=1e-3, seed=2, read_noise=0)
    background = ndimage.uniform_filter(simulated.image[0, 0].astype(float) - 100.0, 16)
    assert background.min() < 0.75 * background.max()


def test_3d_field_has_anisotropic_ellipsoids_and_exact_lineage():
    simulated = simulate_field(n_frames=3, size=96, z_slices=16, seed=4)
    assert simulated.image.shape == (3, 2, 16, 96, 96)
    assert simulated.labels.shape == (3, 16, 96, 96)
    assert simulated.pixel_size == {"z": 1.5, "y": PIXEL_UM, "x": PIXEL_UM}
    assert_lineage_matches(simulated.labels, simulated.lineage)
    boxes = [region.bbox for region in regionprops(simulated.labels[0])]
    z_extent = np.median([box[3] - box[0] for box in boxes])
    y_extent = np.median([box[4] - box[1] for box in boxes])
    # about the same physical size in z as in y, so about a third as many voxels
    assert 0.6 < (z_extent * 1.5) / (y_extent * PIXEL_UM) < 1.6
    assert z_extent < 0.5 * y_extent


def test_plate_round_trip_matches_in_memory_fields(tmp_path):
    path = simulate_plate(
        tmp_path / "plate.zarr", rows=1, columns=2, fields=2, n_frames=3, size=64, seed=5
    )
    plate = open_plate(path)
    assert (plate.rows, plate.columns) == (("A",), ("1", "2"))
    assert [(f.row, f.column, f.field) for f in plate.fields] == [
        ("A", "1", "0"),
        ("A", "1", "1"),
        ("A", "2", "0"),
        ("A", "2", "1"),
    ]
    images = []
    for view in plate.fields:
        expected = simulate_field(
            n_frames=3, size=64, seed=field_seed(5, 0, int(view.column) - 1, int(view.field))
        )
        assert view.channel_names == CHANNEL_NAMES
        assert view.pixel_size == expected.pixel_size
        np.testing.assert_array_equal(view.data.values, expected.image)
        labels, lineage = read_ground_truth(path / view.path)
        np.testing.assert_array_equal(labels.compute(), expected.labels)
        assert lineage.equals(expected.lineage)
        images.append(expected.image)
    assert not np.array_equal(images[0], images[1])
    with pytest.raises(PipelineInputError):
        simulate_plate(path, rows=1, columns=1, fields=1, n_frames=1, size=32)


def test_large_fields_get_two_pyramid_levels(tmp_path):
    path = simulate_plate(tmp_path / "p.zarr", rows=1, columns=1, fields=1, n_frames=1)
    (view,) = open_plate(path).fields
    assert [level.shape for level in view.levels] == [(1, 2, 256, 256), (1, 2, 128, 128)]


def test_reading_ground_truth_of_a_plain_folder_is_an_input_error(tmp_path):
    with pytest.raises(PipelineInputError, match="no OME-Zarr field"):
        read_ground_truth(tmp_path / "missing")


def test_whole_cells_and_reporter_truth_describe_the_cytoplasm_channel(default_field):
    """The whole-cell truth is each nucleus with its ring, and the reporter table lists every
    cell of every frame with the ratio the cytoplasm channel was drawn with."""
    from skimage.segmentation import expand_labels

    field = default_field
    ring_px = 3.0 / field.pixel_size["x"]  # the default ring width, 3 um
    for t, frame in enumerate(field.labels):
        np.testing.assert_array_equal(field.cells[t], expand_labels(frame, ring_px))
    present = {
        (t, int(label))
        for t, frame in enumerate(field.labels)
        for label in np.unique(frame)
        if label
    }
    truth = field.reporter
    assert set(zip(truth["t"], truth["label"], strict=True)) == present
    np.testing.assert_allclose(truth["ratio_cytoplasm_nucleus"], 1 / truth["nuclear_fraction"])
    # a cell's ring is brighter than its nucleus in the cytoplasm channel by about that ratio
    first = truth[truth["t"] == 0].set_index("label")
    cytoplasm = field.image[0, 1].astype(float) - 100  # camera offset
    ring = (field.cells[0] > 0) & (field.labels[0] == 0)
    means = {
        label: (
            cytoplasm[ring & (field.cells[0] == label)].mean(),
            cytoplasm[field.labels[0] == label].mean(),
        )
        for label in first.index
    }
    measured = np.array([ring_mean / nucleus_mean for ring_mean, nucleus_mean in means.values()])
    assert np.corrcoef(measured, first["ratio_cytoplasm_nucleus"])[0, 1] > 0.8
