"""Classify the cells of a field with a trained :class:`CellClassifier`, as a run does.

The model carries how its training crops were cut (channels, physical size, pixels: written
by ``pipeline classify train``); the same crops are cut around every cell of the field, one frame
at a time, and the cells table gains one probability column per class,
``class_probability_<class>``, and the most probable class, ``class``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from pipeline.classification.classifier import CellClassifier
from pipeline.classification.store import CropSettings, cut_field_cells
from pipeline.errors import PipelineInputError
from pipeline.io.omezarr import FieldOfView

__all__ = ["classify_cells", "crop_settings_of", "load_classifier"]


@lru_cache(maxsize=4)
def load_classifier(path: str) -> CellClassifier:
    """A saved classifier, loaded once per process."""
    if not Path(path).is_file():
        raise PipelineInputError("classifier model not found", path)
    try:
        return CellClassifier.load(path)
    except ValueError as error:
        raise PipelineInputError(str(error).split(": ", 1)[-1], path) from None


def crop_settings_of(model: CellClassifier, path: str) -> CropSettings:
    """How the model's training crops were cut (from its metadata)."""
    crops = getattr(model, "metadata_", {}).get("crops")
    if not crops:
        raise PipelineInputError(
            "the classifier does not say how its crops were cut (train it with "
            "`pipeline classify train`, or save it with metadata={'crops': {...}})",
            path,
        )
    return CropSettings(
        size_um=float(crops["size_um"]),
        size_px=int(crops["size_px"]),
        channels=tuple(crops["channels"]),
        label_name=str(crops.get("label_image", "cells")),
    )


def classify_cells(
    cells: pd.DataFrame, field: FieldOfView, labels: xr.DataArray, model_path: str
) -> pd.DataFrame:
    """``cells`` with ``class_probability_<class>`` columns and ``class``, from their crops.

    Parameters
    ----------
    cells
        The field's cells table (``t``, ``label``, ...).
    field
        The field's image (the channels the model was trained on, by name).
    labels
        The field's label image.
    model_path
        A classifier saved by ``pipeline classify train``.
    """
    model = load_classifier(model_path)
    settings = crop_settings_of(model, model_path)
    rows = cells[["t", "label"]].reset_index(drop=True)
    probability = np.zeros((len(rows), len(model.classes_)))
    for _, frame in rows.groupby("t"):  # each frame read once, its crops only in memory
        crops, _ = cut_field_cells(field, labels, frame, settings)
        probability[frame.index] = model.predict_proba(crops[:, :-1])
    columns = {
        f"class_probability_{name}": probability[:, index]
        for index, name in enumerate(model.classes_.tolist())
    }
    predicted = model.classes_[np.argmax(probability, axis=1)] if len(rows) else []
    return cells.assign(**columns, **{"class": np.asarray(predicted, dtype=object)})
