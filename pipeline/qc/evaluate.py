"""Score predicted label images against ground truth read from TIFF files or OME-Zarr labels.

Each side of :func:`evaluate` is one of

- a single TIFF file: one image (2D, or 3D for a z-stack), or, with ``axes`` holding a ``t``
  (e.g. ``tyx``, ``tzyx``), a time series whose every timepoint is one image;
- a folder of TIFF files (``.tif``/``.tiff``, other files ignored): one image per file (or per
  timepoint of each file, with a ``t`` in ``axes``);
- an OME-Zarr label image, e.g. ``out.zarr/A/1/0/labels/cells`` (OME-Zarr 0.4 or 0.5): its
  full-resolution level (the first dataset of its multiscales metadata) with axes from the
  metadata; every timepoint of a ``t`` axis is one image, a ``c`` axis must have size 1.

Two folders are paired by identical file names; otherwise images are paired in order (sorted
file names, timepoints), which needs equal counts. Every pair is scored with
:func:`pipeline.qc.metrics.score_segmentation`, and the report holds the per-image scores and
their summary (:func:`pipeline.qc.metrics.summarize`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile
import zarr

from pipeline.errors import PipelineInputError
from pipeline.io.omezarr import open_image
from pipeline.qc.metrics import (
    DEFAULT_IOU_THRESHOLDS,
    MATCHED_OBJECTS_THRESHOLD,
    ImageScores,
    check_thresholds,
    score_segmentation,
    summarize,
    threshold_key,
)

__all__ = ["EvaluationReport", "LabelImage", "evaluate", "read_label_images"]

TIFF_SUFFIXES = (".tif", ".tiff")
_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zattrs", ".zarray")
_TABLE_THRESHOLDS = (0.5, 0.75, 0.9)


@dataclass(frozen=True)
class LabelImage:
    """One label image of a set, read on demand.

    Attributes
    ----------
    name
        File name, or ``t<index>`` for a timepoint of an OME-Zarr label image (the label
        image's name when it has no t axis).
    location
        File or zarr array path, for messages.
    shape, dtype
        Shape and dtype of the image (without t and c).
    read
        Returns the pixels as a numpy array.
    """

    name: str
    location: str
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray] = field(repr=False)


@dataclass(frozen=True)
class EvaluationReport:
    """Per-image scores of a prediction set against its ground truth, and their summary.

    Attributes
    ----------
    prediction, ground_truth
        The paths given to :func:`evaluate`.
    names
        Name of each scored pair: the common name, or "ground truth name | prediction name".
    sources
        (prediction location, ground-truth location) of each pair; timepoints as ``[t=i]``.
    scores
        :class:`~pipeline.qc.metrics.ImageScores` of each pair.
    summary
        :func:`~pipeline.qc.metrics.summarize` of ``scores``.
    thresholds
        IoU thresholds scored.
    min_size
        Objects smaller than this were removed from both sides first (0: none).
    """

    prediction: str
    ground_truth: str
    names: tuple[str, ...]
    sources: tuple[tuple[str, str], ...]
    scores: tuple[ImageScores, ...]
    summary: dict[str, Any]
    thresholds: tuple[float, ...]
    min_size: int

    def table(self) -> pd.DataFrame:
        """One row per image: counts, AP at 0.5/0.75/0.9 (or at every threshold given, when
        they are not the default), mean AP over the thresholds, precision and recall at 0.5
        (or at the smallest threshold), Jaccard, Dice and ARI."""
        shown = self._shown_thresholds()
        reference = self._reference_threshold()
        rows = []
        for name, score in zip(self.names, self.scores, strict=True):
            row: dict[str, Any] = {"image": name, "n_true": score.n_true, "n_pred": score.n_pred}
            for threshold in shown:
                row[f"AP@{threshold_key(threshold)}"] = score.at(threshold)["ap"]
            row[f"AP@{self._range_label()}"] = score.mean_ap
            at_reference = score.at(reference)
            row[f"precision@{threshold_key(reference)}"] = at_reference["precision"]
            row[f"recall@{threshold_key(reference)}"] = at_reference["recall"]
            row["Jaccard"] = score.jaccard
            row["Dice"] = score.dice
            row["ARI"] = score.ari
            rows.append(row)
        return pd.DataFrame(rows)

    def format(self) -> str:
        """The per-image table and the summary as text."""
        summary = self.summary
        reference = threshold_key(self._reference_threshold())
        lines = [
            self.table().to_string(index=False, float_format="{:.3f}".format, na_rep="-"),
            "",
            f"summary over {summary['n_images']} image(s), IoU thresholds "
            f"{self._range_label()}, min size {self.min_size}:",
        ]
        entries = [
            *(
                (f"mAP@{threshold_key(t)}", summary["ap"][threshold_key(t)])
                for t in self._shown_thresholds()
            ),
            (f"mean AP {self._range_label()}", summary["mean_ap"]),
            (f"precision@{reference}", summary["precision"][reference]),
            (f"recall@{reference}", summary["recall"][reference]),
            (f"Jaccard (matched @{threshold_key(MATCHED_OBJECTS_THRESHOLD)})", summary["jaccard"]),
            (f"Dice (matched @{threshold_key(MATCHED_OBJECTS_THRESHOLD)})", summary["dice"]),
            ("ARI", summary["ari"]),
        ]
        width = max(len(label) for label, _ in entries)
        lines += [f"  {label:<{width}}  {_number(value)}" for label, value in entries]
        lines.append(
            f"  {'objects':<{width}}  {summary['n_true']} true, {summary['n_pred']} predicted"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python values (NaN as None), as written by :meth:`to_json`."""
        per_image = [
            {"name": name, "prediction": pred, "ground_truth": truth, **score.to_dict()}
            for name, (pred, truth), score in zip(
                self.names, self.sources, self.scores, strict=True
            )
        ]
        return _without_nan(
            {
                "prediction": self.prediction,
                "ground_truth": self.ground_truth,
                "thresholds": list(self.thresholds),
                "min_size": self.min_size,
                "per_image": per_image,
                "summary": self.summary,
            }
        )

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (undefined values as null); returns the path."""
        path = Path(path)
        try:
            path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        except OSError as error:
            raise PipelineInputError(
                f"cannot write the JSON report ({error.strerror or error})", path
            ) from error
        return path

    def _shown_thresholds(self) -> list[float]:
        if len(self.thresholds) <= len(_TABLE_THRESHOLDS):
            return list(self.thresholds)
        shown = [t for t in self.thresholds if any(math.isclose(t, s) for s in _TABLE_THRESHOLDS)]
        return shown or list(self.thresholds)

    def _reference_threshold(self) -> float:
        half = [t for t in self.thresholds if math.isclose(t, MATCHED_OBJECTS_THRESHOLD)]
        return half[0] if half else min(self.thresholds)

    def _range_label(self) -> str:
        if np.array_equal(np.asarray(self.thresholds), DEFAULT_IOU_THRESHOLDS):
            return "0.5:0.95"
        return ",".join(threshold_key(t) for t in self.thresholds)


def evaluate(
    prediction: str | Path,
    ground_truth: str | Path,
    *,
    min_size: int = 0,
    thresholds: Sequence[float] | np.ndarray = DEFAULT_IOU_THRESHOLDS,
    axes: str | None = None,
    truth_axes: str | None = None,
) -> EvaluationReport:
    """Score predicted label images against ground-truth label images.

    Parameters
    ----------
    prediction, ground_truth
        A TIFF file, a folder of TIFF files or an OME-Zarr label image each (see the module
        docstring for how images are paired).
    min_size
        When > 0, objects with fewer pixels are removed from both sides before scoring.
    thresholds
        IoU thresholds in (0, 1]; default 0.5, 0.55, ..., 0.95.
    axes, truth_axes
        Axes of the prediction's and the ground truth's TIFF files, letters of ``tzyx`` in
        file order (e.g. ``tyx``); a ``t`` makes each timepoint one image. None: one image per
        file. OME-Zarr labels carry their own.

    Returns
    -------
    EvaluationReport

    Raises
    ------
    PipelineInputError
        A path is missing or not a label image set, names or counts do not pair up, a pair
        differs in shape, or labels are not integers.
    """
    thresholds = check_thresholds(thresholds)
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    predicted = read_label_images(prediction, axes=axes)
    truth = read_label_images(ground_truth, axes=truth_axes)
    pairs = _pair(predicted, truth, prediction, ground_truth)
    for pred, true in pairs:
        _check_pair(pred, true)
    scores = tuple(
        score_segmentation(true.read(), pred.read(), thresholds=thresholds, min_size=min_size)
        for pred, true in pairs
    )
    return EvaluationReport(
        prediction=str(prediction),
        ground_truth=str(ground_truth),
        names=tuple(
            true.name if true.name == pred.name else f"{true.name} | {pred.name}"
            for pred, true in pairs
        ),
        sources=tuple((pred.location, true.location) for pred, true in pairs),
        scores=scores,
        summary=summarize(scores),
        thresholds=tuple(float(t) for t in thresholds),
        min_size=int(min_size),
    )


def read_label_images(path: str | Path, *, axes: str | None = None) -> list[LabelImage]:
    """The label images at ``path``: a TIFF file, a folder of TIFFs or an OME-Zarr label image.

    Pixels are read only when a :class:`LabelImage`'s ``read`` is called. ``axes`` (TIFF
    files only) as in :func:`evaluate`.

    Raises
    ------
    PipelineInputError
        The path is missing, holds no TIFF files, or is not a readable label image.
    """
    location = os.path.abspath(os.fspath(path))
    if not os.path.exists(location):
        raise PipelineInputError("path does not exist", location)
    if os.path.isdir(location):
        if any(os.path.exists(os.path.join(location, marker)) for marker in _ZARR_MARKERS):
            return _zarr_label_images(location)
        files = sorted(
            entry.name
            for entry in os.scandir(location)
            if entry.is_file()
            and not entry.name.startswith(".")
            and entry.name.lower().endswith(TIFF_SUFFIXES)
        )
        if not files:
            raise PipelineInputError(
                "folder holds no TIFF files (.tif, .tiff) and is not an OME-Zarr label image",
                location,
            )
        return [
            image
            for name in files
            for image in _tiff_label_images(os.path.join(location, name), axes)
        ]
    if location.lower().endswith(TIFF_SUFFIXES):
        return _tiff_label_images(location, axes)
    raise PipelineInputError(
        "not a TIFF file, a folder of TIFF files or an OME-Zarr label image", location
    )


def _tiff_label_images(location: str, axes: str | None) -> list[LabelImage]:
    """The image of a TIFF file, or one per timepoint when ``axes`` has a ``t``."""
    try:
        with tifffile.TiffFile(location) as tiff:
            series = tiff.series[0]
            shape, dtype = tuple(series.shape), np.dtype(series.dtype)
    except Exception as error:
        raise PipelineInputError(
            f"cannot read TIFF ({type(error).__name__}: {error})", location
        ) from error
    name = os.path.basename(location)
    time_axis = None if axes is None else _time_axis(axes, shape, location)

    def reader(t: int | None) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            try:
                pixels = np.asarray(tifffile.imread(location))
            except Exception as error:
                raise PipelineInputError(
                    f"cannot read TIFF ({type(error).__name__}: {error})", location
                ) from error
            return pixels if t is None else np.take(pixels, t, axis=time_axis)

        return read

    if time_axis is None:
        return [LabelImage(name, location, shape, dtype, reader(None))]
    image_shape = shape[:time_axis] + shape[time_axis + 1 :]
    return [
        LabelImage(f"{name} t{t}", f"{location} [t={t}]", image_shape, dtype, reader(t))
        for t in range(shape[time_axis])
    ]


def _time_axis(axes: str, shape: tuple[int, ...], location: str) -> int | None:
    """Position of ``t`` in ``axes`` (None without one), once ``axes`` fits the file."""
    letters = axes.lower()
    if (
        len(set(letters)) != len(letters)
        or not set(letters) <= set("tzyx")
        or not {"y", "x"} <= set(letters)
    ):
        raise PipelineInputError(
            f"axes {axes!r} must be distinct letters of tzyx including y and x", location
        )
    if len(letters) != len(shape):
        raise PipelineInputError(
            f"axes {axes!r} have {len(letters)} letters but the file has {len(shape)} "
            f"dimensions (shape {shape})",
            location,
        )
    return letters.index("t") if "t" in letters else None


def _zarr_label_images(location: str) -> list[LabelImage]:
    try:
        group = zarr.open_group(location, mode="r")
    except Exception as error:
        raise PipelineInputError(
            "not an OME-Zarr label image (a zarr group such as out.zarr/A/1/0/labels/cells)",
            location,
        ) from error
    attrs = group.attrs.asdict()
    metadata = attrs.get("ome", attrs)
    label_names = [str(name) for name in metadata.get("labels") or []]
    if not metadata.get("multiscales") or ("image-label" not in metadata and "labels" in group):
        if not label_names and "labels" in group:
            labels_metadata = group["labels"].attrs.asdict()
            label_names = [
                f"labels/{name}"
                for name in labels_metadata.get("ome", labels_metadata).get("labels") or []
            ]
        hint = f"; label images here: {', '.join(label_names)}" if label_names else ""
        raise PipelineInputError(
            f"not an OME-Zarr label image (give its path, e.g. IMAGE/labels/NAME){hint}",
            location,
        )
    labels = open_image(location)  # the one OME-Zarr parser: axes, datasets, dtypes
    dims = labels.data.dims
    array_location = os.path.join(location, labels.levels[0].path)
    if "c" in dims and labels.data.sizes["c"] != 1:
        raise PipelineInputError(
            f"label image has {labels.data.sizes['c']} channels; expected one", location
        )
    data = labels.levels[0].dask_array()
    if "c" in dims:
        data = data[(slice(None),) * dims.index("c") + (0,)]
    spatial = tuple(dim for dim in dims if dim != "c")
    image_shape = tuple(n for dim, n in zip(spatial, data.shape, strict=True) if dim != "t")
    dtype = np.dtype(data.dtype)

    def reader(t: int | None) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            try:
                return np.asarray(data if t is None else data[t])
            except PipelineInputError:
                raise
            except Exception as error:
                raise PipelineInputError(
                    f"cannot read labels ({type(error).__name__}: {error})", array_location
                ) from error

        return read

    if "t" not in dims:
        name = os.path.basename(location.rstrip(os.sep))
        return [LabelImage(name, array_location, image_shape, dtype, reader(None))]
    return [
        LabelImage(f"t{t}", f"{array_location} [t={t}]", image_shape, dtype, reader(t))
        for t in range(data.shape[0])
    ]


def _pair(
    predicted: list[LabelImage],
    truth: list[LabelImage],
    prediction_path: str | Path,
    truth_path: str | Path,
) -> list[tuple[LabelImage, LabelImage]]:
    """Pair by file name when both sides are TIFF folders, otherwise in order."""
    if _is_tiff_folder(prediction_path) and _is_tiff_folder(truth_path):
        by_name = {image.name: image for image in truth}
        predicted_names = {image.name for image in predicted}
        only_prediction = sorted(predicted_names - by_name.keys())
        only_truth = sorted(by_name.keys() - predicted_names)
        if only_prediction or only_truth:
            problems = []
            if only_prediction:
                problems.append(f"only in the prediction: {', '.join(only_prediction)}")
            if only_truth:
                problems.append(f"only in the ground truth: {', '.join(only_truth)}")
            raise PipelineInputError(
                f"file names do not pair up ({'; '.join(problems)})",
                os.path.abspath(os.fspath(prediction_path)),
            )
        return [(image, by_name[image.name]) for image in predicted]
    if len(predicted) != len(truth):
        raise PipelineInputError(
            f"the prediction has {len(predicted)} image(s) but the ground truth "
            f"({os.path.abspath(os.fspath(truth_path))}) has {len(truth)}",
            os.path.abspath(os.fspath(prediction_path)),
        )
    return list(zip(predicted, truth, strict=True))


def _is_tiff_folder(path: str | Path) -> bool:
    return os.path.isdir(path) and not any(
        os.path.exists(os.path.join(path, marker)) for marker in _ZARR_MARKERS
    )


def _check_pair(pred: LabelImage, true: LabelImage) -> None:
    for image in (true, pred):
        if not np.issubdtype(image.dtype, np.integer):
            raise PipelineInputError(
                f"labels must have an integer dtype, got {image.dtype}", image.location
            )
    if pred.shape != true.shape:
        raise PipelineInputError(
            f"label image shape {pred.shape} differs from the ground truth's {true.shape} "
            f"({true.location})",
            pred.location,
        )


def _number(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _without_nan(value: Any) -> Any:
    """Replace float NaN by None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(item) for item in value]
    return value
