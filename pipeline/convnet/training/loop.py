"""The training loop: loss, validation, learning-rate schedule and :func:`train`.

Training
    Groups drawn with probability ~ sqrt(images in the group), images within a group by
    training area, rotations by 90 degrees and reflections, intensity augmentation (blur,
    gamma on the [0, 1] range, gain and offset, Gaussian noise), loss = class-weighted
    cross-entropy + ``distance_weight`` times a masked mean squared error on the distance map
    (weight 1 on nuclei, 0.1 on background). Class weights are ``frequency ** -power``
    (measured on 256 random crops) normalised so that the mean weight per pixel is 1 (power
    0.5: the boundary class, about 2 % of the pixels, counts about five times more than
    background, not thirty times as with inverse frequencies, which would thicken predicted
    boundaries and shrink masks). AdamW with a warm-up and cosine decay; validation loss after
    every epoch; early stopping keeps the best weights, or, with ``average_epochs``, the
    average of the last epochs' weights is kept (stochastic weight averaging). ``init``
    fine-tunes an existing model.
    Deterministic for a seed on CPU (``torch.manual_seed``, a numpy ``Generator`` and
    ``torch.use_deterministic_algorithms``); on CUDA bf16 autocast is used and determinism is
    requested but not enforced (some CUDA kernels have no deterministic version).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.convnet.memory import keep_freed_memory
from pipeline.convnet.receptive_field import measure_receptive_field_radius, measure_stride
from pipeline.convnet.training.crops import (
    AUGMENTATIONS,
    CropSampler,
    PreparedImage,
    prepare_image,
    render_crop,
)
from pipeline.convnet.training.data import (
    LabelledImage,
    load_image_folder,
    load_simulated,
    load_zarr,
    matching_pattern,
    simulated_seeds,
)
from pipeline.convnet.training.recipe import TrainingConfig
from pipeline.convnet.unet import CLASS_NAMES, UNet
from pipeline.convnet.weights import ModelInfo, load_model, save_model
from pipeline.errors import PipelineInputError
from pipeline.normalize import DEFAULT_PERCENTILES

_BACKGROUND_DISTANCE_WEIGHT = 0.1
_BATCH_NORM_BATCHES = 32  # training batches that measure an averaged model's statistics


def class_weights(counts: np.ndarray, power: float) -> tuple[np.ndarray, np.ndarray]:
    """Class frequencies from pixel counts per class and weights ``f ** -power`` normalised
    to a mean weight of 1 per pixel."""
    counts = np.asarray(counts, dtype=np.float64)
    frequency = counts / counts.sum()
    weights = np.where(frequency > 0, np.maximum(frequency, 1e-12) ** -power, 0.0)
    weights /= float(np.sum(frequency * weights))
    return frequency, weights


def _loss(
    output: torch.Tensor,
    classes: torch.Tensor,
    distance: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    distance_weight: float,
) -> torch.Tensor:
    """Class-weighted cross-entropy (weighted mean over the pixels that count) plus
    ``distance_weight`` times the masked mean squared error of the distance map."""
    output = output.float()
    valid = valid.float()
    pixel_weight = weights[classes] * valid
    cross_entropy = F.cross_entropy(output[:, :3], classes, reduction="none")
    cross_entropy = (cross_entropy * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-6)
    mask = torch.where(classes > 0, 1.0, _BACKGROUND_DISTANCE_WEIGHT) * valid
    squared = (output[:, 3] - distance) ** 2
    return cross_entropy + distance_weight * (squared * mask).sum() / mask.sum().clamp_min(1e-6)


def _validation_sets(
    prepared: Sequence[PreparedImage], stride: int, per_source: int, size: int, margin: float
) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]:
    """Per source, up to ``per_source`` validation crops (the middle of the validation rows
    of evenly spaced images, at most ``size`` pixels square at the training scale, trimmed to
    multiples of the stride)."""
    sets = []
    for source in sorted({item.source for item in prepared}):
        items = [p for p in prepared if p.source == source]
        picks = np.unique(np.linspace(0, len(items) - 1, min(per_source, len(items))).round())
        strips = []
        for item in (items[int(i)] for i in picks):
            height, width = item.image.shape
            rows = (height - item.train_rows) * item.factor
            shape = tuple(min(size, int(n) // stride * stride) for n in (rows, width * item.factor))
            if min(shape) == 0:
                continue
            centre = ((item.train_rows + height) / 2, width / 2)
            strips.append(render_crop(item, 1.0, centre, shape, (item.train_rows, height), margin))
        if strips:
            sets.append(strips)
    return sets


def _validate(model, sets, weights, config, device, autocast) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for strips in sets:
            source = []
            for image, classes, distance, valid in strips:
                x = torch.from_numpy(image)[None, None].to(device)
                with autocast():
                    output = model(x)
                loss = _loss(
                    output,
                    torch.from_numpy(classes.astype(np.int64))[None].to(device),
                    torch.from_numpy(distance)[None].to(device),
                    torch.from_numpy(np.ascontiguousarray(valid))[None].to(device),
                    weights,
                    config.distance_weight,
                )
                source.append(float(loss))
            losses.append(float(np.mean(source)))
    model.train()
    return float(np.mean(losses))


class _CropStream(torch.utils.data.IterableDataset):
    """Endless training batches; each loader worker draws its own stream (seed, worker)."""

    def __init__(self, prepared: list, config: TrainingConfig, margin: float) -> None:
        self.prepared, self.config, self.margin = prepared, config, margin

    def __iter__(self) -> Iterator[tuple[np.ndarray, ...]]:
        info = torch.utils.data.get_worker_info()
        seed = self.config.seed if info is None else [self.config.seed, info.id]
        sampler = CropSampler(
            self.prepared, self.config.crop, seed, self.config.scale_range, self.margin
        )
        while True:
            yield sampler.batch(self.config.batch_size)


def _training_batches(
    prepared: list, config: TrainingConfig, margin: float, device: torch.device
) -> Iterator[tuple[np.ndarray, ...]]:
    """Batches (images, classes, distance, valid), cut here or by ``loader_workers`` processes."""
    stream = _CropStream(prepared, config, margin)
    if config.loader_workers <= 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=config.loader_workers,
        prefetch_factor=4,
        pin_memory=device.type == "cuda",
    )
    return iter(loader)


def _fit_epochs(config: TrainingConfig, elapsed: float, epoch_seconds: float) -> TrainingConfig:
    """``config`` with as many epochs as fit in its time budget, at the first epoch's pace."""
    fitting = 1 + int((config.time_budget_s - elapsed) / max(epoch_seconds, 1e-9))
    epochs = max(1, min(config.max_epochs, fitting))
    return replace(config, max_epochs=epochs, average_epochs=min(config.average_epochs, epochs))


def _learning_rate(step: int, config: TrainingConfig) -> float:
    """Linear warm-up, then cosine decay to 1/50 of the rate over the epochs before the
    averaged ones, then the constant rate of the averaged epochs."""
    total = config.steps_per_epoch * (config.max_epochs - config.average_epochs)
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if step >= total:
        return config.learning_rate
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    floor = config.learning_rate / 50
    return floor + (config.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class _Determinism:
    """Seed everything and request deterministic algorithms; restore the global state after."""

    def __init__(self, seed: int, device: torch.device, threads: int | None) -> None:
        self.seed, self.device, self.threads = seed, device, threads

    def __enter__(self) -> _Determinism:
        self.previous = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.get_num_threads(),
        )
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=self.device.type != "cpu")
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc: object) -> None:
        enabled, warn_only, threads = self.previous
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.set_num_threads(threads)


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineInputError("CUDA requested but not available", name)
    return device


def _averaged(
    averaged: torch.optim.swa_utils.AveragedModel | None,
    model: UNet,
    batches: Iterator[tuple[np.ndarray, ...]],
    device: torch.device,
) -> torch.optim.swa_utils.AveragedModel:
    """``model``'s weights added to the running average (started here when ``None``), with
    the average's batch-norm statistics measured again on ``_BATCH_NORM_BATCHES`` batches."""
    if averaged is None:
        averaged = torch.optim.swa_utils.AveragedModel(model)
    averaged.update_parameters(model)
    images = (torch.as_tensor(next(batches)[0]).to(device) for _ in range(_BATCH_NORM_BATCHES))
    torch.optim.swa_utils.update_bn(images, averaged)
    return averaged


def _hardware(device: torch.device) -> str:
    """The device a run trained on, in words (GPU name, or CPU threads)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores visible"


def _model_info(
    model: UNet, config: TrainingConfig, radius: int, stride: int, record: dict[str, Any]
) -> ModelInfo:
    return ModelInfo(
        architecture=dict(model.config),
        diameter_px=float(config.diameter_px),
        percentiles=tuple(float(p) for p in DEFAULT_PERCENTILES),
        receptive_field_radius_px=int(radius),
        stride=int(stride),
        training=record,
    )


def train(
    *,
    out: str | Path | None,
    data: Iterable[str | Path] = (),
    zarr: Iterable[tuple[str | Path, str, str | int]] = (),
    simulated: int = 0,
    exclude: Sequence[str] = (),
    config: TrainingConfig | None = None,
    init: str | Path | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[UNet, ModelInfo]:
    """Train a :class:`UNet` and save it (``OUT.pt`` and ``OUT.json``) with its training record.

    Parameters
    ----------
    out
        Where to save the model (``None``: do not save). The best weights so far are written
        there after every epoch that improves the validation loss (record ``finished:
        false``), so a run stopped part-way leaves a usable model and its history.
    data
        Folders with ``images/`` and ``masks/`` TIFFs.
    zarr
        ``(path, label name, channel)`` of OME-Zarr images or plates with a label image.
    simulated
        Number of simulated fields added (frames ``config.simulated_frames`` of each).
    exclude
        Held-out images: names or path ends (``gowt1/t21.tif``); each must match an image.
    config
        Hyper-parameters (default :class:`TrainingConfig`).
    init
        Fine-tune: start from this model's weights (``"shipped"``: the shipped model); its
        architecture and training diameter replace those of ``config``.
    command
        The command line to record (default: none recorded).
    log
        Receives one line per epoch (default: ``print``).

    Returns
    -------
    model, info
        The best model (lowest validation loss) in evaluation mode on the CPU, and its info.
    """
    config = config or TrainingConfig()
    log = log or (lambda line: print(line, flush=True))
    low, high = config.scale_range
    if not 0 < low <= 1.0 <= high:
        raise PipelineInputError("scale_range must hold 1.0", str(config.scale_range))
    if not 0 <= config.average_epochs <= config.max_epochs:
        raise PipelineInputError(
            "average_epochs must be between 0 and the number of epochs",
            str(config.average_epochs),
        )
    initial = None
    if init is not None:
        initial = load_model(None if str(init) == "shipped" else init)
        config = replace(
            config,
            diameter_px=initial[1].diameter_px,
            base_channels=initial[0].config["base_channels"],
            depth=initial[0].config["depth"],
        )
    started = time.perf_counter()
    device = _device(config.device)
    data = [Path(folder) for folder in data]
    zarr = list(zarr)
    excluded: list[str] = []
    samples: list[LabelledImage] = []
    for folder in data:
        samples += load_image_folder(folder, exclude, excluded)
    for path, label, channel in zarr:
        samples += load_zarr(path, label, channel, exclude, excluded)
    unused = [
        p for p in exclude if p.strip() and not any(matching_pattern(n, [p]) for n in excluded)
    ]
    if unused:
        raise PipelineInputError("--exclude names no image", ", ".join(unused))
    if simulated:
        samples += load_simulated(
            simulated, config.seed, config.simulated_frames, config.simulated_size
        )
    if not samples:
        raise PipelineInputError("no training images", "give --data, --zarr or --simulated")
    log(f"preparing {len(samples)} images")
    prepared = [
        prepare_image(
            s,
            config.diameter_px,
            config.validation_fraction,
            ignore_unannotated=config.ignore_unannotated,
            polarity=config.polarity,
        )
        for s in samples
    ]
    margin = config.diameter_px
    counter = CropSampler(prepared, config.crop, config.seed + 1, config.scale_range, margin)
    counts = np.zeros(3)
    for _ in range(256):
        classes, valid = (counter.sample()[i] for i in (1, 3))
        counts += np.bincount(classes[valid].ravel(), minlength=3)[:3]
    frequency, weights = class_weights(counts, config.class_weight_power)

    def describe(
        step: int, history: list[dict], best_epoch: int, best_loss: float, finished: bool
    ) -> dict[str, Any]:
        """The training record: what made the weights, and how far training got."""
        return {
            "command": command,
            "init": None if init is None else str(init),
            "init_weights_sha256": None if initial is None else initial[1].weights_sha256,
            "seed": config.seed,
            "config": asdict(config),
            "data": [str(folder) for folder in data],
            "zarr": [{"path": str(p), "label": lbl, "channel": ch} for p, lbl, ch in zarr],
            "simulated": {
                "fields": simulated,
                "seeds": simulated_seeds(simulated, config.seed) if simulated else [],
                "frames": list(config.simulated_frames),
                "size": config.simulated_size,
            },
            "excluded": sorted(excluded),
            "images": [
                {
                    "name": item.name,
                    "group": item.source,
                    "median_diameter_px": round(item.median_diameter, 2),
                    "factor": round(item.factor, 4),
                    "ignored_fraction": round(1.0 - float(np.mean(item.valid)), 4),
                }
                for item in prepared
                if item.source != "simulated"
            ],
            "finished": finished,
            "steps": step,
            "epochs": len(history),
            "best_epoch": best_epoch,
            "best_val_loss": best_loss,
            "history": list(history),
            "validation": (
                f"last {config.validation_fraction:.0%} of the rows of every image; loss on up "
                f"to {config.validation_per_source} crops of <= {config.validation_crop} px "
                "per group"
            ),
            "hardware": _hardware(device),
            "augmentations": AUGMENTATIONS,
            "class_frequencies": dict(zip(CLASS_NAMES, frequency.tolist(), strict=True)),
            "class_weights": dict(zip(CLASS_NAMES, weights.tolist(), strict=True)),
            "loss": (
                f"class-weighted cross-entropy + {config.distance_weight} x masked MSE of the "
                f"distance map (weight 1 on nuclei, {_BACKGROUND_DISTANCE_WEIGHT} on background)"
            ),
            "device": str(device),
            "torch": torch.__version__,
            "wall_time_s": round(time.perf_counter() - started, 1),
        }

    if device.type == "cpu":  # the activations' memory reused from step to step
        keep_freed_memory()
    with _Determinism(config.seed, device, config.threads):
        model = UNet(in_channels=1, base_channels=config.base_channels, depth=config.depth)
        if initial is not None:
            model.load_state_dict(initial[0].state_dict())
        stride = model.stride
        if config.crop % stride:
            raise PipelineInputError(f"crop must be a multiple of the stride {stride}", "")
        model.to(device).train()
        batches = _training_batches(prepared, config, margin, device)
        validation = _validation_sets(
            prepared, stride, config.validation_per_source, config.validation_crop, margin
        )
        if not validation:
            raise PipelineInputError("validation split is empty", "raise validation_fraction")
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        weight_tensor = torch.tensor(weights, dtype=torch.float32, device=device)

        def autocast():
            return torch.autocast(
                device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
            )

        checkpoint_geometry = measure_receptive_field_radius(model), model.stride
        best_loss, best_epoch, best_state = math.inf, 0, None
        averaged = None
        history = []
        step = 0
        epoch = 0
        while epoch < config.max_epochs:
            epoch += 1
            epoch_started = time.perf_counter()
            running = []
            for _ in range(config.steps_per_epoch):
                for group in optimizer.param_groups:
                    group["lr"] = _learning_rate(step, config)
                images, classes, distance, valid = (
                    torch.as_tensor(array).to(device, non_blocking=True) for array in next(batches)
                )
                with autocast():
                    output = model(images)
                loss = _loss(
                    output,
                    classes,
                    distance,
                    valid,
                    weight_tensor,
                    config.distance_weight,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running.append(float(loss.detach()))
                step += 1
            if epoch == 1 and config.time_budget_s is not None:
                now = time.perf_counter()
                config = _fit_epochs(config, now - started, now - epoch_started)
                log(f"time budget {config.time_budget_s:.0f} s: {config.max_epochs} epochs")
            averaging = epoch > config.max_epochs - config.average_epochs
            if averaging:
                averaged = _averaged(averaged, model, batches, device)
            kept = averaged.module if averaging else model
            val_loss = _validate(kept, validation, weight_tensor, config, device, autocast)
            train_loss = float(np.mean(running))
            improved = averaging or val_loss < best_loss
            if improved:
                best_loss, best_epoch = val_loss, epoch
                best_state = copy.deepcopy(kept.state_dict())
            history.append(
                {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}
                | ({"averaged_epochs": int(averaged.n_averaged)} if averaging else {})
            )
            if improved and out is not None:
                checkpoint = copy.deepcopy(kept).cpu().float().eval()
                record = describe(step, history, best_epoch, best_loss, finished=False)
                save_model(
                    checkpoint, _model_info(checkpoint, config, *checkpoint_geometry, record), out
                )
            elapsed = time.perf_counter() - started
            log(
                f"epoch {epoch:3d}/{config.max_epochs}  train {train_loss:.4f}  "
                f"val {val_loss:.4f}{' *' if improved else '  '}"
                f"{f' (average of {averaged.n_averaged} epochs)' if averaging else ''}  "
                f"lr {optimizer.param_groups[0]['lr']:.1e}  "
                f"elapsed {elapsed:6.0f} s  "
                f"left at most {elapsed / epoch * (config.max_epochs - epoch):6.0f} s"
            )
            if not averaging and epoch - best_epoch >= config.patience:
                log(f"early stop: no improvement for {config.patience} epochs")
                break
        model.load_state_dict(best_state)
        model = model.cpu().float().eval()
        radius = measure_receptive_field_radius(model)
        measured_stride = measure_stride(model, radius=radius)

    record = describe(step, history, best_epoch, best_loss, finished=True)
    info = _model_info(model, config, radius, measured_stride, record)
    if out is not None:
        save_model(model, info, out)
    return model, info
