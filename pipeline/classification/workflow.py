"""Train a cell classifier on a run's output: crops, labels, grouped cross-validation, model.

Labels come from a marker channel (:func:`pipeline.classification.marker.label_by_marker` on
the cells' mean marker intensity) or from a table of annotations (CSV or Parquet with
``label``, ``class`` and any of ``well``, ``field``, ``t`` to pin the cell). The crops are those
of ``pipeline crops`` (``RESULTS/crops``), the channels chosen by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from pipeline.classification.classifier import CellClassifier
from pipeline.classification.evaluation import CrossValidation, cross_validate, write_roc_figure
from pipeline.classification.marker import label_by_marker
from pipeline.classification.store import read_crops
from pipeline.errors import PipelineInputError
from pipeline.io import tables
from pipeline.io.omezarr import open_plate

__all__ = ["TrainingSet", "train_classifier", "training_set"]

_KEYS = ["well", "field", "t", "label"]


@dataclass(frozen=True)
class TrainingSet:
    """Crops (chosen channels, then the mask), their classes and their index rows."""

    crops: np.ndarray
    labels: np.ndarray
    index: pd.DataFrame
    left_out: int
    crop_settings: dict


def _annotations(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise PipelineInputError("labels table not found", str(path))
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if not {"label", "class"} <= set(table.columns):
        raise PipelineInputError(
            f"a labels table needs columns label and class (and well, field, t as needed); "
            f"it has {', '.join(map(str, table.columns))}",
            str(path),
        )
    return table


def training_set(
    results: str | Path,
    *,
    marker: str | None = None,
    labels: str | Path | None = None,
    channels: Sequence[str] | None = None,
    min_posterior: float = 0.8,
    max_crops: int | None = None,
    seed: int = 0,
) -> TrainingSet:
    """Crops and classes for training, from a marker channel or a labels table.

    Parameters
    ----------
    results
        An output with crops (``pipeline crops``) and cells tables.
    marker
        Name of the marker channel (its ``intensity_mean_<marker>`` column is used).
    labels
        Path of a labels table (CSV or Parquet: ``label``, ``class``, and any of ``well``,
        ``field``, ``t``); exactly one of ``marker`` and ``labels``.
    channels
        Crop channels to train on (default: all but the marker); the mask is always kept last.
    min_posterior
        The mixture posterior a cell needs for a marker label.
    max_crops
        At most this many crops, drawn at random (stratified by class) when there are more.
    seed
        Seed of that draw.
    """
    results = Path(results)
    if (marker is None) == (labels is None):
        raise PipelineInputError("give either a marker channel or a labels table", str(results))
    array, index = read_crops(results)
    cut = dict(zarr.open_group(str(results / "crops"), mode="r").attrs["crops"])
    names = list(cut["channels"])
    image_channels = names[:-1]
    if channels is None:
        channels = [name for name in image_channels if name != marker]
    missing = [name for name in channels if name not in image_channels]
    if missing:
        raise PipelineInputError(
            f"the crops have no channel {', '.join(missing)} ({', '.join(image_channels)})",
            str(results / "crops"),
        )
    if marker is not None:
        every_field = [tables.field_cells(results, field) for field in open_plate(results).fields]
        cells = index[_KEYS].merge(pd.concat(every_field), on=_KEYS, how="left")
        found = label_by_marker(cells, f"intensity_mean_{marker}", min_posterior=min_posterior)
        classes = found.labels.astype(object).where(~found.left_out, None).to_numpy()
    else:
        annotations = _annotations(Path(labels))
        keys = [key for key in _KEYS if key in annotations.columns]
        merged = index[_KEYS].merge(
            annotations[[*keys, "class"]].drop_duplicates(keys), on=keys, how="left"
        )
        classes = merged["class"].astype(object).where(merged["class"].notna(), None).to_numpy()
    chosen = np.flatnonzero(pd.notna(classes))
    if max_crops is not None and len(chosen) > max_crops:
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(chosen, max_crops, replace=False))
    if len(chosen) == 0:
        raise PipelineInputError("no crop has a class", str(results))
    keep = [names.index(name) for name in channels] + [len(names) - 1]
    crops = array.oindex[chosen, keep, :, :]
    return TrainingSet(
        crops=crops,
        labels=classes[chosen],
        index=index.iloc[chosen].reset_index(drop=True),
        left_out=int(len(index) - np.count_nonzero(pd.notna(classes))),
        crop_settings={**cut, "channels": list(channels)},
    )


def train_classifier(
    data: TrainingSet,
    out: str | Path,
    *,
    groups: str = "well",
    folds: int = 5,
    estimator: CellClassifier | None = None,
    progress: bool = False,
) -> CrossValidation:
    """Cross-validate by ``groups`` (with the baselines), then fit on everything and save.

    Writes ``OUT`` (the model), ``OUT.cv.csv`` (per-fold AUC), ``OUT.summary.csv`` (pooled
    AUC and accuracy per method) and ``OUT.roc.png`` (ROC curves).
    """
    if groups not in data.index.columns:
        raise PipelineInputError(f"unknown group column {groups!r} (well or field)", str(out))
    estimator = estimator if estimator is not None else CellClassifier()
    result = cross_validate(
        data.crops,
        data.labels,
        data.index[groups].to_numpy(),
        folds=folds,
        estimator=estimator,
        progress=progress,
    )
    out = Path(out)
    result.folds.to_csv(f"{out}.cv.csv", index=False)
    result.pooled().to_csv(f"{out}.summary.csv", index=False)
    write_roc_figure(result, f"{out}.roc.png")
    final = CellClassifier(**estimator.get_params()).fit(data.crops[:, :-1], data.labels)
    final.save(out, metadata={"crops": data.crop_settings})
    return result
