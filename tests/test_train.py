"""Training: targets, rescaling, data sources, split, determinism and the ``train`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy.ndimage import label as ndimage_label
from skimage.draw import disk

from pipeline.cli import main
from pipeline.convnet.inference import median_diameter
from pipeline.convnet.training import (
    CropSampler,
    LabelledImage,
    TrainingConfig,
    class_weights,
    grouped_holdout,
    image_groups,
    load_image_folder,
    load_zarr,
    prepare_image,
    read_training_recipe,
    render_crop,
    rescale_labels,
    targets_from_labels,
    train,
    unannotated_mask,
)
from pipeline.convnet.weights import load_model
from pipeline.errors import PipelineInputError

TINY = TrainingConfig(
    diameter_px=12.0,
    scale_range=(0.8, 1.25),
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


def test_prepare_image_normalises_whole_image_and_finds_the_factor():
    image, labels = _discs(1)
    prepared = prepare_image(LabelledImage("x", "s", image, labels), 18.0)
    assert prepared.factor == pytest.approx(18.0 / median_diameter(labels))
    assert median_diameter(rescale_labels(labels, prepared.factor)) == pytest.approx(18.0, rel=0.1)
    assert prepared.image.dtype == np.float32 and prepared.image.shape == image.shape
    # Robust percentiles of the whole image map the background near 0 and nuclei near 1.
    assert np.median(prepared.image[labels == 0]) == pytest.approx(0.06, abs=0.1)
    assert np.median(prepared.image[labels > 0]) == pytest.approx(0.9, abs=0.1)
    assert prepared.train_rows == round(image.shape[0] * 0.8)


def test_dark_nuclei_are_inverted_like_inference_does():
    image, labels = _discs(1)
    bright = prepare_image(LabelledImage("x", "s", image, labels), 18.0)
    dark = prepare_image(LabelledImage("x", "s", 65535 - image, labels), 18.0)
    assert np.median(dark.image[labels == 0]) == pytest.approx(0.06, abs=0.1)
    assert np.median(dark.image[labels > 0]) == pytest.approx(0.9, abs=0.1)
    np.testing.assert_allclose(dark.image, bright.image, atol=0.05)


def test_unannotated_nuclei_are_ignored_not_taught_as_background():
    image, labels = _discs(4)
    partial = np.where(labels == 4, 0, labels)  # nucleus 4 left out of the mask
    ignored = unannotated_mask(image.astype(np.float32), partial, median_diameter(partial))
    assert ignored[labels == 4].mean() > 0.95
    assert not ignored[partial > 0].any()
    assert ignored.sum() < 2 * (labels == 4).sum()
    assert not unannotated_mask(image.astype(np.float32), labels, median_diameter(labels)).any()
    prepared = prepare_image(LabelledImage("x", "s", image, partial), 12.0)
    assert 0 < (~prepared.valid).mean() < 0.1
    complete = prepare_image(LabelledImage("x", "s", image, partial, complete=True), 12.0)
    assert complete.valid.all()


def test_masks_are_split_into_connected_components():
    from scipy import ndimage as ndi

    image, labels = _discs(5)
    small = ndi.binary_erosion(labels == 5, iterations=3)
    labels[(labels == 5) & ~small] = 0
    shared = np.where(labels == 5, 1, labels)  # two separate nuclei share label 1
    prepared = prepare_image(LabelledImage("x", "s", image, shared), 12.0)
    classes, distance = targets_from_labels(prepared.labels)
    interior, _ = ndi.label(classes == 2)
    peaks = ndi.maximum(distance, interior, np.arange(1, interior.max() + 1))
    np.testing.assert_allclose(peaks, 1.0)  # each separate nucleus peaks at 1
    assert interior.max() == 5


@pytest.mark.parametrize("scale", [0.7, 1.0, 1.4])
def test_crops_are_rendered_at_the_training_scale_times_the_jitter(scale):
    labels = np.zeros((128, 128), dtype=np.uint16)
    for label, (y, x) in enumerate([(40, 40), (40, 88), (88, 64)], start=1):
        rr, cc = disk((y, x), 8, shape=labels.shape)
        labels[rr, cc] = label
    image = (100 + 400 * (labels > 0)).astype(np.uint16)
    prepared = prepare_image(LabelledImage("x", "s", image, labels), 24.0, 0.0)
    size = 8 * round(96 * prepared.factor * scale / 8)  # the middle 96 source pixels
    crop, classes, distance, valid = render_crop(
        prepared, scale, (64.0, 64.0), (size, size), (0, 128), 24.0
    )
    assert crop.shape == classes.shape == (size, size) and valid.all()
    nuclei, count = ndimage_label(classes > 0)
    assert count == 3
    assert median_diameter(nuclei) == pytest.approx(24.0 * scale, rel=0.08)
    # Targets are those of whole nuclei: each nucleus' distance map peaks at 1.
    assert distance.max() == pytest.approx(1.0)


def test_class_weights_balance_rare_classes():
    counts = np.array([790.0, 27.0, 183.0])
    frequency, weights = class_weights(counts, 0.5)
    assert frequency.sum() == pytest.approx(1.0)
    assert np.sum(frequency * weights) == pytest.approx(1.0)
    assert weights[1] > weights[0]  # the rare boundary class weighs more than background
    np.testing.assert_allclose(weights / weights[0], (frequency / frequency[0]) ** -0.5)


def test_training_crops_never_reach_the_validation_rows():
    image, labels = _discs(3)
    prepared = prepare_image(LabelledImage("x", "s", image, labels), 12.0, 0.25)
    prepared.image[prepared.train_rows :] = np.nan  # any crop touching them would carry NaN
    sampler = CropSampler([prepared], crop=16, seed=0, scale_range=(0.7, 1.4), margin=12)
    for _ in range(200):
        crop, _, _, _ = sampler.sample()
        assert np.isfinite(crop).all()


def test_groups_from_the_index_and_a_grouped_holdout(tmp_path):
    folder = tmp_path / "collection"
    folder.mkdir()
    rows = ["id,height,width,modality,objects,median_diameter_px"]
    rows += [f"a{i},256,256,gray,10,12" for i in range(20)]
    rows += [f"b{i},520,696,gray,10,20" for i in range(7)]
    rows += [f"c{i},256,320,color-brightfield,10,20" for i in range(2)]
    (folder / "index.csv").write_text("\n".join(rows) + "\n")
    groups = image_groups(folder)
    assert groups["a3"] == "gray/256x256" and groups["c1"] == "color-brightfield/256x320"
    held = grouped_holdout(groups, fraction=0.15, seed=0)
    assert held == grouped_holdout(groups, fraction=0.15, seed=0)
    assert sum(h.startswith("a") for h in held) == 3  # round(0.15 * 20)
    assert sum(h.startswith("b") for h in held) == 1  # round(1.05), at least one
    assert not any(h.startswith("c") for h in held)  # a group of two is too small to split
    assert image_groups(tmp_path) == {}


def test_training_recipe_file(tmp_path, tiny_folder):
    (tmp_path / "held_out.txt").write_text("# validation\ntiny/t02.tif  # one image\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"data: [{tiny_folder}]\nexclude_file: held_out.txt\n"
        "training: {crop: 32, scale_range: [0.8, 1.25]}\n"
    )
    read = read_training_recipe(recipe)
    assert read["exclude"] == ["tiny/t02.tif"] and read["data"] == [str(tiny_folder)]
    assert read["config"].crop == 32 and read["config"].scale_range == (0.8, 1.25)
    recipe.write_text("training: {crops: 32}\n")
    with pytest.raises(PipelineInputError, match="unknown keys"):
        read_training_recipe(recipe)


@pytest.mark.slow
def test_exclusion_by_name_and_path_end(tiny_folder):
    excluded: list[str] = []
    kept = load_image_folder(tiny_folder, ["tiny/t00.tif", "t02.tif"], excluded)
    assert [item.name for item in kept] == ["tiny/t01.tif"]
    assert excluded == ["tiny/t00.tif", "tiny/t02.tif"]
    with pytest.raises(PipelineInputError, match="--exclude names no image"):
        train(out=None, data=[tiny_folder], exclude=["other/t00.tif"], config=TINY)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


@pytest.mark.slow
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

    epochs = [line for line in lines if line.startswith("epoch")]
    assert len(epochs) == TINY.max_epochs and all("val" in line for line in epochs)
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


def test_a_stopped_run_leaves_its_best_weights(tiny_folder, tmp_path):
    """A run killed after its first epoch (of two) has written the best weights so far and
    a record saying it did not finish; they load and fine-tune."""

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch   1"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            out=tmp_path / "stopped",
            data=[tiny_folder],
            config=TINY,
            log=stop_after_first_epoch,
        )
    _, info = load_model(tmp_path / "stopped")
    record = info.training
    assert record["finished"] is False and record["best_epoch"] == 1
    assert [h["epoch"] for h in record["history"]] == [1]
    assert info.receptive_field_radius_px == 23 and info.stride == 4
    _, resumed = train(
        out=None, data=[tiny_folder], config=TINY, init=tmp_path / "stopped", log=print
    )
    assert resumed.training["finished"] is True
    assert resumed.training["init_weights_sha256"] == info.weights_sha256


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_fine_tuning_starts_from_the_given_model(tiny_folder, tmp_path):
    base, _ = train(out=tmp_path / "base", data=[tiny_folder], config=TINY, log=print)
    still = replace(TINY, learning_rate=0.0, diameter_px=20.0, base_channels=8)
    tuned, info = train(
        out=tmp_path / "tuned", data=[tiny_folder], config=still, init=tmp_path / "base"
    )
    # Architecture and training scale come from the initial model; with a zero learning rate
    # its convolution weights are kept (batch-norm running statistics still adapt).
    assert tuned.config == base.config and info.diameter_px == TINY.diameter_px
    before, after = base.state_dict(), tuned.state_dict()
    convolutions = [name for name in before if name.endswith("weight") and before[name].ndim == 4]
    assert convolutions and all(torch.equal(before[n], after[n]) for n in convolutions)
    assert info.training["init"] == str(tmp_path / "base")
    assert info.training["init_weights_sha256"] == load_model(tmp_path / "base")[1].weights_sha256


def test_loader_workers_draw_one_seeded_crop_stream_each():
    """With two loader workers the batches alternate between the streams of CropSamplers
    seeded (seed, 0) and (seed, 1); without workers they are the stream seeded ``seed``."""
    from pipeline.convnet.training.loop import _training_batches

    prepared = [prepare_image(LabelledImage(f"d{i}", "s", *_discs(i)), 12.0, 0.25) for i in (0, 1)]
    config = replace(TINY, seed=7)
    expected = {
        key: CropSampler(prepared, TINY.crop, seed, TINY.scale_range, 12.0)
        for key, seed in (("here", 7), (0, [7, 0]), (1, [7, 1]))
    }
    cpu = torch.device("cpu")
    in_process = _training_batches(prepared, config, 12.0, cpu)
    workers = _training_batches(prepared, replace(config, loader_workers=2), 12.0, cpu)
    for source, stream in (("here", in_process), (0, workers), (1, workers), (0, workers)):
        got = next(stream)
        want = expected[source].batch(TINY.batch_size)
        for got_array, want_array in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(got_array), want_array)


def test_time_budget_keeps_the_epochs_that_fit(tiny_folder):
    from pipeline.convnet.training.loop import _fit_epochs

    budget = replace(TINY, max_epochs=100, time_budget_s=100.0)
    # 30 s gone, 10 s per epoch: the first epoch plus the 7 that fit in the 70 s left
    assert _fit_epochs(budget, elapsed=30.0, epoch_seconds=10.0).max_epochs == 8
    assert _fit_epochs(replace(budget, max_epochs=5), 30.0, 10.0).max_epochs == 5
    assert _fit_epochs(budget, elapsed=120.0, epoch_seconds=10.0).max_epochs == 1
    lines = []
    _, info = train(
        out=None,
        data=[tiny_folder],
        config=replace(TINY, max_epochs=50, time_budget_s=0.0),
        log=lines.append,
    )
    assert len(info.training["history"]) == 1
    assert info.training["config"]["max_epochs"] == 1
    assert "time budget 0 s: 1 epochs" in lines


def test_weight_averaging_means_the_weights_and_measures_batch_norm_again():
    """The average of two models' weights is their arithmetic mean; the batch-norm
    statistics of the average are those of the batches it saw (the first layer's running
    mean is the mean of its convolution's output over all of them)."""
    from pipeline.convnet.training.loop import _BATCH_NORM_BATCHES, _averaged
    from pipeline.convnet.unet import UNet

    torch.manual_seed(0)
    first, second = UNet(base_channels=4, depth=2), UNet(base_channels=4, depth=2)
    generator = np.random.default_rng(0)
    images = [generator.random((2, 1, 16, 16), dtype=np.float32) for _ in range(64)]
    batches = iter([(image,) for image in images])
    averaged = _averaged(None, first, batches, torch.device("cpu"))
    averaged = _averaged(averaged, second, batches, torch.device("cpu"))
    for name, parameter in averaged.module.named_parameters():
        expected = dict(first.named_parameters())[name] + dict(second.named_parameters())[name]
        torch.testing.assert_close(parameter, expected / 2)
    seen = torch.from_numpy(np.concatenate(images[_BATCH_NORM_BATCHES : 2 * _BATCH_NORM_BATCHES]))
    convolution, norm = [m for m in averaged.module.modules() if hasattr(m, "weight")][:2]
    with torch.no_grad():
        torch.testing.assert_close(norm.running_mean, convolution(seen).mean(dim=(0, 2, 3)))
    assert int(norm.num_batches_tracked) == _BATCH_NORM_BATCHES


def test_averaged_epochs_train_at_a_constant_rate_and_make_the_saved_model(tiny_folder, tmp_path):
    from pipeline.convnet.training.loop import _learning_rate

    config = replace(TINY, max_epochs=3, average_epochs=2, steps_per_epoch=3, warmup_steps=1)
    rates = [_learning_rate(step, config) for step in range(9)]
    # warm-up (step 0), cosine over epoch 1 (halfway at step 2: the mean of the rate and
    # its 1/50 floor), then the constant rate over the averaged epochs 2 and 3
    peak = config.learning_rate
    assert rates[2] == pytest.approx((peak + peak / 50) / 2)
    assert rates[:2] + rates[3:] == [peak] * 8
    model, info = train(out=tmp_path / "swa", data=[tiny_folder], config=config, log=print)
    history = info.training["history"]
    assert [h.get("averaged_epochs") for h in history] == [None, 1, 2]
    assert info.training["best_epoch"] == 3 and info.training["finished"] is True
    saved = load_model(tmp_path / "swa")[0].state_dict()
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())
    with pytest.raises(PipelineInputError, match="average_epochs"):
        train(out=None, data=[tiny_folder], config=replace(TINY, average_epochs=3))


PAGE_FAULTS_OF_FOUR_STEPS = """
import resource, sys, torch
from pipeline.convnet.memory import keep_freed_memory
from pipeline.convnet.unet import UNet
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
model = UNet(base_channels=16, depth=3)
optimiser = torch.optim.Adam(model.parameters())
batch = torch.rand(4, 1, 256, 256)
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    optimiser.zero_grad()
    model(batch).pow(2).mean().backward()
    optimiser.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_training_steps_reuse_freed_memory():
    """With glibc's defaults every training step maps its large activations afresh, each page
    a fault (the kernel maps and zeroes it); once the process keeps freed memory, the steps
    after the first two (which also allocate the optimiser's state) reuse them (``train`` does
    so on a CPU)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def faults(mode: str) -> list[int]:
        output = subprocess.run(
            [sys.executable, "-c", PAGE_FAULTS_OF_FOUR_STEPS, mode],
            env=inherited,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [int(n) for n in output.split()]

    # steps 3 and 4: about 90,000-150,000 faults by default, 0-16,000 kept (4 runs each)
    default_later = sum(faults("default")[2:])
    kept_later = sum(faults("keep")[2:])
    assert default_later > 4 * max(kept_later, 1000)
