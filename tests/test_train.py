"""Training: targets, rescaling, data sources, split, determinism and the ``train`` command."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from skimage.draw import disk

from pipeline.cli import main
from pipeline.errors import PipelineInputError
from pipeline.infer import median_diameter
from pipeline.models import load_model
from pipeline.models.train import (
    LabelledImage,
    TrainingConfig,
    _Sampler,
    class_weights,
    load_image_folder,
    load_zarr,
    prepare_image,
    rescale_labels,
    targets_from_labels,
    train,
    unannotated_mask,
)

TINY = TrainingConfig(
    diameter_px=12.0,
    scales=(0.8, 1.0),
    crop=32,
    batch_size=2,
    steps_per_epoch=2,
    max_epochs=2,
    patience=5,
    warmup_steps=1,
    base_channels=4,
    depth=2,
    validation_fraction=0.25,
    simulated_frames=(0,),
    simulated_size=64,
    threads=2,
    device="cpu",
)


def _discs(seed: int, size: int = 64, radius: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """An image of bright discs (two of them touching) and its instance mask."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), dtype=np.uint16)
    centres = [(14, 14), (14, 26), (40, 20), (30, 48), (52, 50)]
    for label, (y, x) in enumerate(centres, start=1):
        rr, cc = disk((y + rng.integers(-2, 3), x), radius, shape=labels.shape)
        labels[rr, cc] = label
    image = 100 + 400 * (labels > 0) + rng.normal(0, 20, labels.shape)
    return image.clip(0, 65535).astype(np.uint16), labels


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for index in range(3):
        image, labels = _discs(index)
        tifffile.imwrite(folder / "images" / f"t{index:02d}.tif", image)
        tifffile.imwrite(folder / "masks" / f"t{index:02d}.tif", labels)
    return folder


def test_targets_separate_touching_nuclei():
    labels = np.zeros((20, 30), dtype=np.int32)
    labels[4:15, 3:14] = 1
    labels[4:15, 14:25] = 2  # touches nucleus 1 along a column
    classes, distance = targets_from_labels(labels)
    assert set(np.unique(classes)) == {0, 1, 2}
    assert (classes[labels == 0] == 0).all()
    # Both sides of the contact are boundary: the interiors never touch.
    assert (classes[4:15, 13] == 1).all() and (classes[4:15, 14] == 1).all()
    for label in (1, 2):
        inside = labels == label
        assert distance[inside].max() == pytest.approx(1.0)
        assert (distance[inside & (classes == 1)] == 0).all()
        assert (distance[inside & (classes == 2)] > 0).all()
    assert (distance[labels == 0] == 0).all()
    assert distance[9, 8] == pytest.approx(1.0)  # the centre of nucleus 1


def test_rescale_labels_is_nearest_and_reaches_the_diameter():
    _, labels = _discs(0)
    scaled = rescale_labels(labels, 2.0)
    assert scaled.shape == (128, 128)
    assert set(np.unique(scaled)) == set(np.unique(labels))
    assert median_diameter(scaled) == pytest.approx(2 * median_diameter(labels), rel=0.05)


def test_prepare_image_normalises_whole_image_then_rescales():
    image, labels = _discs(1)
    prepared = prepare_image(LabelledImage("x", "s", image, labels), 18.0, (0.8, 1.0))
    k = prepared.scales.index(1.0)
    assert prepared.factor == pytest.approx(18.0 / median_diameter(labels))
    assert median_diameter(rescale_labels(labels, prepared.factor)) == pytest.approx(18.0, rel=0.1)
    assert prepared.images[k].dtype == np.float32
    # Robust percentiles of the whole image map the background near 0 and nuclei near 1.
    assert np.median(prepared.images[k][prepared.classes[k] == 0]) == pytest.approx(0.06, abs=0.1)
    assert np.median(prepared.images[k][prepared.classes[k] == 2]) == pytest.approx(0.9, abs=0.1)
    assert prepared.train_rows[k] == round(prepared.images[k].shape[0] * 0.8)


def test_unannotated_nuclei_are_ignored_not_taught_as_background():
    image, labels = _discs(4)
    partial = np.where(labels == 4, 0, labels)  # nucleus 4 left out of the mask
    ignored = unannotated_mask(image.astype(np.float32), partial, median_diameter(partial))
    assert ignored[labels == 4].mean() > 0.95
    assert not ignored[partial > 0].any()
    assert ignored.sum() < 2 * (labels == 4).sum()
    assert not unannotated_mask(image.astype(np.float32), labels, median_diameter(labels)).any()
    prepared = prepare_image(LabelledImage("x", "s", image, partial), 12.0)
    assert 0 < (~prepared.valid[0]).mean() < 0.1
    complete = prepare_image(LabelledImage("x", "s", image, partial, complete=True), 12.0)
    assert complete.valid[0].all()


def test_masks_are_split_into_connected_components():
    from scipy import ndimage as ndi

    image, labels = _discs(5)
    small = ndi.binary_erosion(labels == 5, iterations=3)
    labels[(labels == 5) & ~small] = 0
    shared = np.where(labels == 5, 1, labels)  # two separate nuclei share label 1
    prepared = prepare_image(LabelledImage("x", "s", image, shared), 12.0, (1.0,))
    interior, _ = ndi.label(prepared.classes[0] == 2)
    peaks = ndi.maximum(prepared.distance[0], interior, np.arange(1, interior.max() + 1))
    np.testing.assert_allclose(peaks, 1.0)  # each separate nucleus peaks at 1
    assert interior.max() == 5


def test_class_weights_balance_rare_classes():
    image, labels = _discs(2)
    prepared = [prepare_image(LabelledImage("x", "s", image, labels), 12.0)]
    frequency, weights = class_weights(prepared, 0.5)
    assert frequency.sum() == pytest.approx(1.0)
    assert np.sum(frequency * weights) == pytest.approx(1.0)
    assert weights[1] > weights[0]  # the rare boundary class weighs more than background
    np.testing.assert_allclose(weights / weights[0], (frequency / frequency[0]) ** -0.5)


def test_training_crops_never_reach_the_validation_rows():
    image, labels = _discs(3)
    prepared = prepare_image(LabelledImage("x", "s", image, labels), 12.0, (0.8, 1.0), 0.25)
    for k, rows in enumerate(prepared.train_rows):
        # Mark every pixel with its row; crops keep the values (no intensity change on targets).
        height, width = prepared.distance[k].shape
        prepared.distance[k] = np.repeat(np.arange(height, dtype=np.float32), width).reshape(
            height, width
        )
        prepared.distance[k][rows:] = -1.0
    sampler = _Sampler([prepared], crop=16, seed=0)
    for _ in range(200):
        _, _, distance, _ = sampler.sample()
        assert distance.min() >= 0


def test_exclusion_by_name_and_path_end(tiny_folder):
    excluded: list[str] = []
    kept = load_image_folder(tiny_folder, ["tiny/t00.tif", "t02.tif"], excluded)
    assert [item.name for item in kept] == ["tiny/t01.tif"]
    assert excluded == ["tiny/t00.tif", "tiny/t02.tif"]
    with pytest.raises(PipelineInputError, match="--exclude names no image"):
        train(out=None, data=[tiny_folder], exclude=["other/t00.tif"], config=TINY)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_training_is_deterministic_and_records_itself(tiny_folder, tmp_path):
    lines: list[str] = []
    model_a, info = train(
        out=tmp_path / "a",
        data=[tiny_folder],
        simulated=1,
        exclude=["t02.tif"],
        config=TINY,
        command="pipeline train ...",
        log=lines.append,
    )
    model_b, _ = train(
        out=None, data=[tiny_folder], simulated=1, exclude=["t02.tif"], config=TINY, log=print
    )
    a, b = _weights(model_a), _weights(model_b)
    assert all(torch.equal(a[name], b[name]) for name in a)
    model_c, _ = train(
        out=None,
        data=[tiny_folder],
        simulated=1,
        exclude=["t02.tif"],
        config=replace(TINY, seed=1),
        log=print,
    )
    c = _weights(model_c)
    assert not all(torch.equal(a[name], c[name]) for name in a)

    assert len(lines) == TINY.max_epochs and all("val" in line for line in lines)
    assert info.stride == 4 and info.receptive_field_radius_px == 23  # depth 2, measured
    assert info.diameter_px == 12.0 and info.percentiles == (1.0, 99.9)
    record = info.training
    assert record["excluded"] == ["tiny/t02.tif"]
    assert [item["name"] for item in record["images"]] == ["tiny/t00.tif", "tiny/t01.tif"]
    assert record["command"] == "pipeline train ..."
    assert record["seed"] == 0 and record["steps"] == 4 and len(record["simulated"]["seeds"]) == 1
    assert record["best_val_loss"] == min(h["val_loss"] for h in record["history"])
    loaded, loaded_info = load_model(tmp_path / "a")
    assert loaded_info.receptive_field_radius_px == 23
    reloaded = loaded.state_dict()
    assert all(torch.equal(a[name], reloaded[name]) for name in a)


def test_zarr_source_reads_every_frame(tmp_path):
    from pipeline.synthetic import simulate_plate

    plate = simulate_plate(
        tmp_path / "plate.zarr", rows=1, columns=1, fields=1, n_frames=2, size=64, seed=2
    )
    samples = load_zarr(plate, "ground_truth", "nuclei", exclude=["A/1/0/t1"])
    assert [s.name for s in samples] == ["plate.zarr/A/1/0/t0"]
    assert samples[0].image.shape == samples[0].labels.shape == (64, 64)
    assert samples[0].labels.max() > 0
    with pytest.raises(PipelineInputError, match="no channel"):
        load_zarr(plate, "ground_truth", "dapi")


def test_train_command(tiny_folder, tmp_path, capsys):
    out = tmp_path / "model"
    argv = [
        "train",
        "--out",
        str(out),
        "--data",
        str(tiny_folder),
        "--exclude",
        "tiny/t02.tif",
        "--diameter",
        "12",
        "--crop",
        "32",
        "--batch-size",
        "2",
        "--steps-per-epoch",
        "2",
        "--epochs",
        "1",
        "--base-channels",
        "4",
        "--depth",
        "2",
        "--threads",
        "2",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "epoch   1/1" in printed and "stride 4" in printed
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["training"]["command"].startswith("pipeline train --out")
    assert record["training"]["excluded"] == ["tiny/t02.tif"]
    assert main([*argv[:2], str(tmp_path / "m2"), "--data", str(tmp_path / "missing")]) == 2
