"""napari opens a run's results headless (issue 16): image channels, label images and tracks,
checked against the zarr arrays and scikit-image's centroids of the written labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from skimage.measure import regionprops

from pipeline.config import RunConfig
from pipeline.io.napari_reader import napari_get_reader
from pipeline.orchestration.runner import run
from pipeline.synthetic import simulate_plate

napari = pytest.importorskip("napari")


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory, shared_scheduler: str) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("napari")
    plate = simulate_plate(
        tmp / "plate.zarr", rows=1, columns=1, fields=1, n_frames=4, size=128, seed=5
    )
    config = RunConfig.model_validate(
        {"segmentation": {"method": "classical"}, "tracking": {"write_track_labels": True}}
    )
    summary = run(plate, tmp / "out.zarr", config=config, scheduler=shared_scheduler)
    assert not summary.failed
    return {"input": plate / "A/1/0", "field": tmp / "out.zarr/A/1/0"}


def _full_resolution(layer) -> np.ndarray:
    return np.asarray(layer.data[0] if layer.multiscale else layer.data)


def _open(path: Path) -> list:
    import npe2
    from napari.components import ViewerModel  # napari's viewer without a window

    npe2.PluginManager.instance().discover()  # what `napari PATH` does on start
    viewer = ViewerModel()
    viewer.open(str(path), plugin="pipeline")
    return list(viewer.layers)


@pytest.mark.cluster
def test_napari_opens_the_image_labels_and_tracks_of_a_field(result):
    field = result["field"]
    layers = {layer.name: layer for layer in _open(field)}
    assert set(layers) == {"nuclei", "cytoplasm", "cells", "tracks", "cell tracks"}
    assert type(layers["tracks"]).__name__ == "Labels"  # labels/tracks: cells by track id
    group = zarr.open_group(field, mode="r")
    image = group["0"][:]
    for index, name in enumerate(("nuclei", "cytoplasm")):
        assert type(layers[name]).__name__ == "Image"
        np.testing.assert_array_equal(_full_resolution(layers[name]), image[:, index])
        np.testing.assert_allclose(layers[name].scale, [1.0, 0.5, 0.5])
    labels = group["labels/cells/0"][:]
    np.testing.assert_array_equal(_full_resolution(layers["cells"]), labels)
    cells = pd.read_parquet(field / "tables/cells/table.parquet")
    tracks = layers["cell tracks"]
    points = pd.DataFrame(tracks.data, columns=["track_id", "t", "y", "x"])
    assert len(points) == len(cells) > 20
    for t in range(labels.shape[0]):
        for region in regionprops(labels[t]):
            row = cells[(cells["t"] == t) & (cells["label"] == region.label)].iloc[0]
            point = points[(points["t"] == t) & (points["track_id"] == row["track_id"])]
            np.testing.assert_allclose(point[["y", "x"]].to_numpy()[0], region.centroid)
    daughters = cells.drop_duplicates("track_id").query("parent_track_id > 0")
    assert tracks.graph == {
        int(track): [int(parent)]
        for track, parent in zip(daughters["track_id"], daughters["parent_track_id"], strict=True)
    }


def test_images_without_results_are_left_to_other_readers(result, tmp_path):
    assert napari_get_reader(str(result["input"])) is None  # an input field: no labels
    assert napari_get_reader(str(tmp_path / "missing.zarr")) is None
    assert napari_get_reader(str(result["field"])) is not None
