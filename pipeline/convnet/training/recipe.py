"""A training run's hyper-parameters (:class:`TrainingConfig`) and its recipe file (YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineInputError


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of a training run (all recorded in the model's training record).

    Attributes
    ----------
    diameter_px
        Median nucleus diameter every image is rescaled to; stored as ``ModelInfo.diameter_px``.
    scale_range
        Scale augmentation: each crop is rescaled by a further factor log-uniform in this range
        (0.7-1.4: a diameter estimate off by 30 % is inside what the network has seen).
    crop, batch_size
        Training crop size (a multiple of the network's stride) and crops per step.
    steps_per_epoch, max_epochs, patience
        Steps between validations, most epochs, epochs without improvement before stopping.
    learning_rate, weight_decay, warmup_steps
        AdamW with a linear warm-up and cosine decay to 1/50 of the rate over the epochs
        before the averaged ones.
    average_epochs
        Stochastic weight averaging (Izmailov et al. 2018): the last ``average_epochs`` epochs
        train at the constant rate ``learning_rate`` (after the warm-up, if they are all the
        epochs), the weights at the end of each are averaged, and the average, with batch-norm
        statistics measured again on training crops, is the model saved. 0: no averaging;
        the weights with the lowest validation loss are saved. Early stopping does not apply
        to averaged epochs.
    distance_weight
        Weight of the distance-map loss relative to the cross-entropy.
    class_weight_power
        Class weights are ``frequency ** -power`` (0: no balancing, 1: inverse frequency).
    validation_fraction
        Fraction of every image's rows (at the bottom) used for validation only.
    validation_per_source, validation_crop
        Validation crops per source (group) and their largest edge at the training scale.
    polarity
        ``"auto"``, ``"bright"`` or ``"dark"`` nuclei (:func:`pipeline.normalize.frame_percentiles`;
        the same rule as inference).
    ignore_unannotated
        Give no loss weight to bright unannotated blobs of real masks (:func:`unannotated_mask`).
    base_channels, depth
        U-Net width and number of poolings.
    seed
        Seed of weights, crops, augmentation and simulated fields.
    simulated_frames, simulated_size
        Frames per simulated field and its size in pixels (before rescaling).
    device
        ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available).
    threads
        CPU threads for torch (``None``: leave as is).
    loader_workers
        Processes that cut training crops while the network trains (0: cut them in the
        training process, between steps). A GPU trains faster than one CPU core cuts 256 px
        crops; each worker draws its own crop stream, so results depend on this number.
    """

    diameter_px: float = 30.0
    scale_range: tuple[float, float] = (0.7, 1.4)
    crop: int = 128
    batch_size: int = 16
    steps_per_epoch: int = 100
    max_epochs: int = 20
    patience: int = 5
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    distance_weight: float = 8.0
    class_weight_power: float = 0.5
    validation_fraction: float = 0.2
    validation_per_source: int = 4
    validation_crop: int = 256
    polarity: str = "auto"
    ignore_unannotated: bool = True
    base_channels: int = 16
    depth: int = 3
    seed: int = 0
    simulated_frames: tuple[int, ...] = (0, 3, 7)
    simulated_size: int = 256
    device: str | None = None
    threads: int | None = None
    loader_workers: int = 0
    time_budget_s: float | None = None
    average_epochs: int = 0


def read_name_list(path: str | Path) -> list[str]:
    """Image names listed in a text file, one per line; ``#`` starts a comment."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise PipelineInputError(f"cannot read the list of images ({error})", path) from None
    return [name for name in (line.split("#")[0].strip() for line in lines) if name]


def read_training_recipe(path: str | Path) -> dict[str, Any]:
    """A training recipe from YAML: ``data`` (folders), ``simulated`` (fields), ``init``,
    ``exclude`` (names) and ``exclude_file`` (one name per line, ``#`` comments; relative to
    the recipe), ``training`` (:class:`TrainingConfig` fields). Returns the keyword arguments
    of :func:`train` with ``config`` built."""
    import yaml

    path = Path(path)
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise PipelineInputError(f"cannot read training recipe ({error})", path) from None
    known = {"data", "simulated", "init", "exclude", "exclude_file", "training"}
    unknown = set(recipe) - known
    fields = TrainingConfig.__dataclass_fields__
    unknown |= {f"training.{k}" for k in recipe.get("training") or {} if k not in fields}
    if unknown:
        raise PipelineInputError(f"unknown keys {sorted(unknown)} in training recipe", path)
    settings = dict(recipe.get("training") or {})
    if "scale_range" in settings:
        settings["scale_range"] = tuple(settings["scale_range"])
    exclude = list(recipe.get("exclude") or [])
    if recipe.get("exclude_file"):
        exclude += read_name_list(path.parent / recipe["exclude_file"])
    result: dict[str, Any] = {"config": TrainingConfig(**settings), "exclude": exclude}
    for key in ("data", "simulated", "init"):
        if key in recipe:
            result[key] = recipe[key]
    return result
