"""Cell classification: crops, the scikit-learn classifier and labels from a marker."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.draw import disk
from skimage.transform import resize
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, GroupKFold, cross_val_predict

import pipeline
from pipeline.classification.classifier import CellClassifier
from pipeline.classification.crops import cut_crops
from pipeline.classification.marker import label_by_marker

# A small, quick network for the tests; the defaults are measured in BENCHMARKS.md.
FAST = {
    "input_size": 32,
    "widths": (8, 8, 16, 16),
    "kernel_size": 5,
    "dense": 32,
    "learning_rate": 2e-3,
    "max_epochs": 8,
}


def simulated_cells(
    n: int, seed: int, size: int = 40, kinds: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Crops of discs whose sizes overlap; kind 0 is smooth, 1 grainy, 2 ring-shaped."""
    rng = np.random.default_rng(seed)
    crops = np.empty((n, size, size), dtype=np.uint16)
    kind = np.arange(n) % kinds
    for i in range(n):
        plane = rng.normal(100, 5, (size, size))
        centre = size / 2 + rng.uniform(-3, 3, 2)
        radius = rng.uniform(7, 11)
        rr, cc = disk(centre, radius, shape=plane.shape)
        plane[rr, cc] += 300 * rng.uniform(0.8, 1.25)
        if kind[i] == 1:
            plane[rr, cc] += rng.normal(0, 120, len(rr))
        if kind[i] == 2:
            inner_r, inner_c = disk(centre, radius * 0.6, shape=plane.shape)
            plane[inner_r, inner_c] -= 200
        crops[i] = np.clip(plane, 0, None)
    return crops, kind


def test_cut_crops_without_resampling_equal_the_image_around_the_centroid():
    image = np.arange(60 * 70, dtype=np.float32).reshape(60, 70)
    labels = np.zeros((60, 70), dtype=np.int32)
    labels[20:31, 30:41] = 7  # centroid (25, 35)
    labels[0:5, 60:70] = 9  # cut by the border
    crops, index = cut_crops(image, labels, size=11)
    assert crops.shape == (2, 2, 11, 11)
    assert index["label"].tolist() == [7, 9]
    np.testing.assert_array_equal(crops[0, 0], image[20:31, 30:41])
    np.testing.assert_array_equal(crops[0, 1], 1.0)  # the cell fills its crop
    assert index["border"].tolist() == [False, True]
    assert index["area"].tolist() == [121, 50]
    # the part of the border cell's crop outside the image is zero, not a copy of the edge
    assert np.all(crops[1, 0, :3] == 0)


def test_cut_crops_resampled_match_scikit_image_resize():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (120, 120)).astype(np.float32)
    labels = np.zeros((120, 120), dtype=np.int32)
    labels[50:70, 40:60] = 1  # centroid (59.5, 49.5): a 40 px window is rows 40-79, cols 30-69
    crops, index = cut_crops(image, labels, size=20, window=40)
    reference = resize(image[40:80, 30:70], (20, 20), order=1, anti_aliasing=True)
    # skimage blurs the cut window (edges reflected), cut_crops the image around it
    np.testing.assert_allclose(crops[0, 0, 2:-2, 2:-2], reference[2:-2, 2:-2], atol=1e-5)
    np.testing.assert_array_equal(crops[0, 1, 5:15, 5:15], 1.0)
    assert crops[0, 1].sum() == 100  # 20 x 20 px of cell -> 10 x 10 px at half the scale
    assert not index["border"].iloc[0]


def test_cut_crops_rejects_mismatched_planes():
    with pytest.raises(ValueError, match="same plane"):
        cut_crops(np.zeros((3, 10, 10)), np.zeros((10, 12), dtype=int), size=8)


def test_classifier_learns_texture_and_generalises():
    crops, kind = simulated_cells(240, seed=1)
    test_crops, test_kind = simulated_cells(80, seed=2)
    model = CellClassifier(**FAST).fit(crops, np.where(kind == 1, "grainy", "smooth"))
    assert list(model.classes_) == ["grainy", "smooth"]
    probability = model.predict_proba(test_crops)
    assert probability.shape == (80, 2)
    np.testing.assert_allclose(probability.sum(axis=1), 1.0)
    assert roc_auc_score(test_kind == 1, probability[:, 0]) > 0.95
    assert np.mean(model.predict(test_crops) == np.where(test_kind == 1, "grainy", "smooth")) > 0.9


def test_classifier_is_seeded_and_survives_save_and_load(tmp_path):
    crops, kind = simulated_cells(96, seed=3, kinds=3)
    first = CellClassifier(**FAST | {"max_epochs": 3}).fit(crops, kind)
    second = CellClassifier(**FAST | {"max_epochs": 3}).fit(crops, kind)
    np.testing.assert_array_equal(first.predict_proba(crops), second.predict_proba(crops))
    loaded = CellClassifier.load(first.save(tmp_path / "classifier.pt"))
    np.testing.assert_array_equal(loaded.predict_proba(crops), first.predict_proba(crops))
    assert loaded.classes_.tolist() == [0, 1, 2]
    assert loaded.get_params() == first.get_params()
    other = CellClassifier(**FAST | {"max_epochs": 3}, random_state=1).fit(crops, kind)
    assert not np.array_equal(other.predict_proba(crops), first.predict_proba(crops))


def test_load_refuses_files_that_are_not_classifiers(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a saved CellClassifier"):
        CellClassifier.load(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a saved CellClassifier"):
        CellClassifier.load(tmp_path / "garbage.pt")


def test_classifier_takes_channels_sizes_and_dtypes():
    crops, kind = simulated_cells(64, seed=4, size=50)
    two_channels = np.stack([crops, crops[:, ::-1]], axis=1).astype(np.float64)
    model = CellClassifier(**FAST | {"max_epochs": 2}).fit(two_channels, kind)
    assert model.n_channels_ == 2
    assert model.predict_proba(two_channels[:, :, :20, :30].astype(np.uint8)).shape == (64, 2)
    with pytest.raises(ValueError, match="fitted on 2"):
        model.predict(crops)
    with pytest.raises(ValueError, match="at least two classes"):
        CellClassifier(**FAST).fit(crops, np.zeros(64))
    with pytest.raises(ValueError, match="NaN"):
        CellClassifier(**FAST).fit(np.full((4, 8, 8), np.nan), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="one label per crop"):
        CellClassifier(**FAST).fit(crops, kind[:10])


def test_classifier_works_inside_scikit_learn_model_selection():
    crops, kind = simulated_cells(120, seed=5)
    dishes = np.arange(120) // 24  # five dishes, both kinds in each
    probability = cross_val_predict(
        CellClassifier(**FAST),
        crops,
        kind,
        groups=dishes,
        cv=GroupKFold(5),
        method="predict_proba",
    )
    assert probability.shape == (120, 2)
    assert roc_auc_score(kind, probability[:, 1]) > 0.9
    search = GridSearchCV(
        CellClassifier(**FAST | {"max_epochs": 2}), {"dropout": [0.0, 0.2]}, cv=GroupKFold(2)
    )
    search.fit(crops, kind, groups=dishes)
    assert search.best_params_["dropout"] in (0.0, 0.2)
    copy = clone(CellClassifier(dropout=0.3))
    assert copy.get_params()["dropout"] == 0.3 and not hasattr(copy, "classes_")


def test_public_api_names_the_classifier():
    assert pipeline.CellClassifier is CellClassifier
    assert pipeline.label_by_marker is label_by_marker


def test_label_by_marker_recovers_simulated_populations():
    rng = np.random.default_rng(6)
    positive = rng.random(2000) < 0.3
    intensity = np.where(
        positive, rng.lognormal(np.log(400), 0.3, 2000), rng.lognormal(np.log(60), 0.3, 2000)
    )
    table = pd.DataFrame({"label": np.arange(2000), "intensity_mean_marker": intensity})
    table.loc[5, "intensity_mean_marker"] = 0.0  # no logarithm: left out
    result = label_by_marker(table, "intensity_mean_marker")
    labelled = ~result.left_out
    assert result.left_out[5]
    assert labelled.mean() > 0.95  # the populations are 6.3 standard deviations apart
    truth = np.where(positive, "positive", "negative")
    assert np.mean(result.labels[labelled].astype(str) == truth[labelled.to_numpy()]) > 0.995
    assert result.means[0] == pytest.approx(60, rel=0.05)
    assert result.means[1] == pytest.approx(400, rel=0.05)
    between = (result.posterior > 0.2) & (result.posterior < 0.8)
    assert (result.left_out == (between | result.posterior.isna())).all()


def test_label_by_marker_names_the_problem():
    table = pd.DataFrame({"intensity_mean_dna": np.ones(50)})
    with pytest.raises(ValueError, match="'intensity_mean_gfp' not in the table"):
        label_by_marker(table, "intensity_mean_gfp")
    with pytest.raises(ValueError, match="at least 10"):
        label_by_marker(table.iloc[:5], "intensity_mean_dna")


def _results_with_cells(path, n_frames: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A lone-image output as a run writes it: image (t, c, y, x), labels/cells, tables/cells."""
    from pipeline.io.omezarr import create_root, write_image, write_labels
    from pipeline.io.tables import write_table

    rng = np.random.default_rng(7)
    image = rng.integers(0, 4000, (n_frames, 2, 60, 80), dtype=np.uint16)
    labels = np.zeros((n_frames, 60, 80), dtype=np.uint32)
    rows = []
    for t in range(n_frames):
        for label, (y, x) in enumerate([(10, 12), (30, 40 + 5 * t), (52, 75)], start=1):
            rr, cc = disk((y, x), 5, shape=(60, 80))
            labels[t, rr, cc] = label + 10 * t
            rows.append({"t": t, "label": label + 10 * t, "track_id": label, "area": len(rr)})
    root = write_image(
        create_root(path), "", image, "tcyx", {"y": 0.5, "x": 0.5}, channel_names=["dna", "gfp"]
    )
    write_labels(root, "cells", labels)
    write_table(root, "cells", pd.DataFrame(rows), table_type="feature_table", instance_key="label")
    return image, labels


def test_write_crops_cuts_every_cell_of_an_output_in_blocks(tmp_path):
    from pipeline.classification.store import CropSettings, read_crops, write_crops

    image, labels = _results_with_cells(tmp_path / "out.zarr")
    done = []
    write_crops(
        tmp_path / "out.zarr",
        CropSettings(size_um=10.0, size_px=10, channels=("gfp",), block=4),
        progress=lambda n, total: done.append((n, total)),
    )
    crops, index = read_crops(tmp_path / "out.zarr")
    assert crops.shape == (6, 2, 10, 10) and crops.chunks[0] == 4
    assert done == [(4, 6), (6, 6)]
    assert index[["t", "label", "track_id"]].values.tolist() == [
        [0, 1, 1],
        [0, 2, 2],
        [0, 3, 3],
        [1, 11, 1],
        [1, 12, 2],
        [1, 13, 3],
    ]
    assert index["border"].tolist() == [False, False, True] * 2
    # 10 um at 0.5 um per pixel = a 20 px window, resampled to 10 px
    for n, (t, label) in enumerate(index[["t", "label"]].values):
        expected, _ = cut_crops(image[t, 1], labels[t], 10, window=20, cells=[label])
        np.testing.assert_array_equal(crops[n], expected[0])


def test_write_crops_names_a_missing_channel(tmp_path):
    from pipeline.classification.store import CropSettings, write_crops
    from pipeline.errors import PipelineInputError

    _results_with_cells(tmp_path / "out.zarr")
    with pytest.raises(PipelineInputError, match="no channel actin"):
        write_crops(tmp_path / "out.zarr", CropSettings(size_um=10.0, channels=("actin",)))


def _coculture_crops(seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Crops (nuclear channel, 20 um at 32 px) and measured cells of a simulated co-culture."""
    from pipeline.synthetic import simulate_field

    field = simulate_field(n_frames=2, size=320, seed=seed, cell_types=2)
    cells = pipeline.measure(
        field.labels, field.image, dims="tyx", channel_names=field.channel_names
    ).merge(field.types, on="label")
    crops = []
    for t in range(2):
        rows = cells[cells["t"] == t]
        cut, _ = cut_crops(field.image[t, 0], field.labels[t], 32, 20 / 0.5, rows["label"])
        crops.append(cut[:, :1])
    return np.concatenate(crops), cells.sort_values(["t", "label"], ignore_index=True)


def test_simulated_coculture_from_marker_labels_to_auc():
    """The paper's path on a simulated co-culture with known types: marker -> labels ->
    CNN on the nuclear channel -> AUC on another dish, against the size baseline."""
    from sklearn.linear_model import LogisticRegression

    crops, cells = _coculture_crops(seed=11)
    marker = label_by_marker(cells, "intensity_mean_marker")
    labelled = ~marker.left_out.to_numpy()
    truth = cells["cell_type"].to_numpy()
    names = marker.labels[labelled].astype(str).to_numpy()
    assert np.mean((names == "positive") == (truth[labelled] == 1)) > 0.95
    assert 0.5 < labelled.mean() < 1.0  # the 0.8 rule leaves the ambiguous cells out

    model = CellClassifier(**FAST | {"max_epochs": 15}).fit(crops[labelled], names)
    test_crops, test_cells = _coculture_crops(seed=12)
    test_truth = test_cells["cell_type"].to_numpy() == 1
    cnn_auc = roc_auc_score(test_truth, model.predict_proba(test_crops)[:, 1])
    size = LogisticRegression().fit(np.log(cells[["area"]][labelled]), names)
    size_auc = roc_auc_score(test_truth, size.predict_proba(np.log(test_cells[["area"]]))[:, 1])
    assert cnn_auc > 0.95
    assert size_auc < 0.75 < cnn_auc  # the types' sizes overlap


def test_auc_by_hand_and_cross_validation_keeps_groups_apart():
    from pipeline.classification.evaluation import auc, cross_validate

    classes = np.array(["a", "b"])
    # positives score 0.9 and 0.4, negatives 0.5 and 0.1: 3 of the 4 pairs ordered -> 0.75
    probability = np.array([[0.1, 0.9], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])
    assert auc(classes, np.array(["b", "b", "a", "a"]), probability) == 0.75
    assert np.isnan(auc(classes, np.array(["b", "b", "b", "b"]), probability))

    crops, kind = simulated_cells(90, seed=8)
    masks = np.stack([crops, crops > 200], axis=1).astype(np.float32)
    dishes = np.repeat(["d1", "d2", "d3"], 30)
    result = cross_validate(
        masks, kind, dishes, folds=5, estimator=CellClassifier(**FAST | {"max_epochs": 3})
    )
    assert sorted(result.folds["fold"].unique()) == [0, 1, 2]  # no more folds than dishes
    assert (result.folds["groups"] == 1).all() and set(result.probabilities) == {
        "cnn",
        "contour",
        "size",
    }
    np.testing.assert_allclose(result.probabilities["size"].sum(axis=1), 1.0)
    assert set(result.pooled()["method"]) == {"cnn", "contour", "size"}
    with pytest.raises(ValueError, match="at least two groups"):
        cross_validate(masks, kind, np.zeros(90))


def test_run_config_names_the_classifier_and_its_weights_enter_the_digest(tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import PipelineInputError

    config = tmp_path / "run.yaml"
    config.write_text("classification:\n  model: missing.pt\n")
    with pytest.raises(PipelineInputError, match="classifier model not found"):
        load_config(config)
    crops, kind = simulated_cells(40, seed=9)
    model = CellClassifier(**FAST | {"max_epochs": 1}).fit(crops, kind)
    model.save(tmp_path / "a.pt", metadata={"crops": {"size_um": 20.0}})
    config.write_text(f"classification:\n  model: {tmp_path / 'a.pt'}\n")
    first = load_config(config).digest()
    assert first != load_config(None).digest()
    CellClassifier(**FAST | {"max_epochs": 1, "random_state": 3}).fit(crops, kind).save(
        tmp_path / "a.pt"
    )
    assert load_config(config).digest() != first  # new weights: results are stale
    second = load_config(config).digest()
    config.write_text(config.read_text() + "crops:\n  size_um: 20\n")
    assert load_config(config).crops.size_px == 64
    assert load_config(config).digest() == second  # crops are derived: no field is stale


def test_training_set_from_a_labels_table(tmp_path):
    from pipeline.classification.store import CropSettings, write_crops
    from pipeline.classification.workflow import training_set
    from pipeline.errors import PipelineInputError

    _results_with_cells(tmp_path / "out.zarr")
    write_crops(tmp_path / "out.zarr", CropSettings(size_um=10.0, size_px=8))
    table = tmp_path / "labels.csv"
    # the lone image's cells: 1-3 at t 0, 11-13 at t 1; cell 12 is not annotated
    pd.DataFrame({"t": [0, 0, 0, 1, 1], "label": [1, 2, 3, 11, 13], "class": list("ABABA")}).to_csv(
        table, index=False
    )
    data = training_set(tmp_path / "out.zarr", labels=table, channels=["gfp"])
    assert data.labels.tolist() == ["A", "B", "A", "B", "A"]
    assert data.index["label"].tolist() == [1, 2, 3, 11, 13] and data.left_out == 1
    assert data.crops.shape == (5, 2, 8, 8)  # gfp and the mask
    assert data.crop_settings["channels"] == ["gfp"] and data.crop_settings["size_um"] == 10.0
    pd.DataFrame({"cell": [1], "kind": ["A"]}).to_csv(table, index=False)
    with pytest.raises(PipelineInputError, match="needs columns label and class"):
        training_set(tmp_path / "out.zarr", labels=table)
