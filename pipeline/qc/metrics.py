"""Segmentation scores: instance matching by IoU, average precision and the adjusted Rand index.

The dense-cell benchmark scores a segmentation by AP = TP / (TP + FP + FN) at IoU >= 0.5,
where a true positive is a one-to-one match between a ground-truth and a predicted instance.
:func:`score_segmentation` gives AP, precision and recall at several IoU thresholds (0.5 to
0.95 by default), the Jaccard index and Dice coefficient of the matched objects and the
adjusted Rand index of the pixel labelling; :func:`summarize` averages them over images.
Label images hold arbitrary integer ids, 0 is background; 2D and 3D work alike. Overlaps are
counted sparsely (only pairs that touch), so large images with many cells stay cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

__all__ = [
    "DEFAULT_IOU_THRESHOLDS",
    "MATCHED_OBJECTS_THRESHOLD",
    "ImageScores",
    "MatchResult",
    "adjusted_rand_index",
    "average_precision",
    "check_thresholds",
    "intersection_over_union",
    "match_instances",
    "remove_small_objects",
    "score_segmentation",
    "summarize",
    "threshold_key",
]

#: IoU thresholds 0.5, 0.55, ..., 0.95 of the "AP 0.5:0.95" score.
DEFAULT_IOU_THRESHOLDS: np.ndarray = np.round(np.arange(0.5, 1.0, 0.05), 2)

#: IoU threshold at which the Jaccard index and Dice coefficient of matched objects are taken.
MATCHED_OBJECTS_THRESHOLD = 0.5


@dataclass(frozen=True)
class MatchResult:
    """One-to-one matching between ground-truth and predicted instances.

    Attributes
    ----------
    tp, fp, fn
        Matched pairs, unmatched predictions, unmatched ground-truth instances.
    n_true, n_pred
        Number of ground-truth and predicted instances.
    true_labels, pred_labels, iou
        The matched pairs (label ids) and their IoU, sorted by ground-truth label.
    """

    tp: int
    fp: int
    fn: int
    n_true: int
    n_pred: int
    true_labels: np.ndarray
    pred_labels: np.ndarray
    iou: np.ndarray


def intersection_over_union(
    ground_truth: np.ndarray, prediction: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """IoU of every pair of overlapping instances.

    Parameters
    ----------
    ground_truth, prediction
        Integer label images of the same shape; 0 is background.

    Returns
    -------
    pairs : numpy.ndarray
        Shape (n_pairs, 2): ground-truth label, predicted label; sorted, only pairs sharing
        at least one pixel.
    iou : numpy.ndarray
        Shape (n_pairs,): intersection over union of each pair.
    """
    overlaps = _overlaps(ground_truth, prediction)
    return overlaps.pairs, overlaps.iou


def match_instances(
    ground_truth: np.ndarray, prediction: np.ndarray, *, iou_threshold: float = 0.5
) -> MatchResult:
    """Match ground-truth and predicted instances one to one.

    A pair may match when its IoU >= ``iou_threshold``. Above 0.5 such pairs are unique by
    construction (an instance cannot overlap two disjoint instances by more than half its
    union). At 0.5 and below, an optimal assignment (``linear_sum_assignment``, solved
    separately on each connected group of candidate pairs, never on a dense all-by-all
    matrix) picks the matching with the most pairs, ties broken by the largest total IoU.

    Parameters
    ----------
    ground_truth, prediction
        Integer label images of the same shape; 0 is background, ids are arbitrary.
    iou_threshold
        Smallest IoU of a match, in (0, 1].

    Returns
    -------
    MatchResult
    """
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    return _match(_overlaps(ground_truth, prediction), iou_threshold)


def _match(overlaps: _Overlaps, iou_threshold: float) -> MatchResult:
    """One-to-one matching (see :func:`match_instances`) from precomputed overlaps."""
    candidate = overlaps.iou >= iou_threshold
    pairs, iou = overlaps.pairs[candidate], overlaps.iou[candidate]
    if iou_threshold <= 0.5:
        chosen = _optimal_matching(pairs, iou)
        pairs, iou = pairs[chosen], iou[chosen]
    n_true, n_pred, tp = overlaps.n_true, overlaps.n_pred, len(pairs)
    return MatchResult(
        tp=tp,
        fp=n_pred - tp,
        fn=n_true - tp,
        n_true=n_true,
        n_pred=n_pred,
        true_labels=pairs[:, 0],
        pred_labels=pairs[:, 1],
        iou=iou,
    )


def average_precision(
    ground_truth: np.ndarray, prediction: np.ndarray, *, iou_threshold: float = 0.5
) -> float:
    """Average precision TP / (TP + FP + FN) of a segmentation at ``iou_threshold``.

    Both images empty (nothing to find, nothing found) scores 1.0.

    Parameters
    ----------
    ground_truth, prediction
        Integer label images of the same shape; 0 is background.
    iou_threshold
        Smallest IoU of a true positive, in (0, 1].
    """
    match = match_instances(ground_truth, prediction, iou_threshold=iou_threshold)
    total = match.tp + match.fp + match.fn
    return 1.0 if total == 0 else match.tp / total


def threshold_key(threshold: float) -> str:
    """Text form of an IoU threshold used as a dict key and column name: 0.5 -> "0.5"."""
    return f"{float(threshold):g}"


def remove_small_objects(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set every instance with fewer than ``min_size`` pixels to background.

    An instance is all pixels of one label id (connected or not), as in the dense-cell
    benchmark's minimum mask size. The input is not modified.

    Parameters
    ----------
    labels
        Integer label image; 0 is background.
    min_size
        Smallest number of pixels (voxels) of an instance that is kept; 0 or 1 keeps all.

    Returns
    -------
    numpy.ndarray
        Labels of the same shape and dtype without the small instances.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if min_size <= 1:
        return labels.copy()
    ids, index, area = np.unique(labels.ravel(), return_inverse=True, return_counts=True)
    small = (area < min_size) & (ids != 0)
    return np.where(small[index], 0, labels.ravel()).astype(labels.dtype).reshape(labels.shape)


def adjusted_rand_index(ground_truth: np.ndarray, prediction: np.ndarray) -> float:
    """Adjusted Rand index of two pixel labellings, background (0) counted as one cluster.

    Equal to ``sklearn.metrics.adjusted_rand_score(ground_truth.ravel(),
    prediction.ravel())``, computed from the sparse contingency table (one entry per label
    pair that shares a pixel), so large images with many labels stay cheap. Identical
    partitions (whatever the ids) score 1.0; so do two images of one single cluster each.

    Parameters
    ----------
    ground_truth, prediction
        Integer label images of the same shape.

    Returns
    -------
    float
        In [-1, 1]; 0 is the expected value of a random labelling, 1 a perfect one.
    """
    return _adjusted_rand_index(_contingency(ground_truth, prediction))


@dataclass(frozen=True)
class ImageScores:
    """Scores of one predicted label image against its ground truth.

    Per-threshold arrays are aligned with ``thresholds``. With one-to-one matching at IoU
    >= t: ``ap = tp / (tp + fp + fn)``, ``precision = tp / (tp + fp)`` and
    ``recall = tp / (tp + fn)``. A 0/0 ratio is 1.0 when both images are empty (nothing to
    find, nothing found) and 0.0 otherwise (objects but no prediction gives precision 0;
    predictions but no objects gives recall 0).

    Attributes
    ----------
    thresholds
        IoU thresholds, shape (n,).
    tp, fp, fn
        Matched pairs, unmatched predictions and unmatched ground-truth objects per threshold.
    ap, precision, recall
        Per-threshold scores as above.
    n_true, n_pred
        Number of ground-truth and predicted objects (after ``min_size``).
    jaccard, dice
        Mean IoU and mean Dice coefficient ``2|A∩B| / (|A| + |B|) = 2 IoU / (1 + IoU)`` of the
        pairs matched at IoU >= 0.5; NaN when no pair matches.
    ari
        Adjusted Rand index of the pixel labellings (background is a cluster).
    min_size
        Objects smaller than this many pixels were removed from both images first.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    ap: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    n_true: int
    n_pred: int
    jaccard: float
    dice: float
    ari: float
    min_size: int = 0

    @property
    def mean_ap(self) -> float:
        """AP averaged over the thresholds (AP 0.5:0.95 with the default thresholds)."""
        return float(np.mean(self.ap))

    def at(self, threshold: float) -> dict[str, float]:
        """tp, fp, fn, ap, precision and recall at one of the ``thresholds``."""
        matches = np.flatnonzero(np.isclose(self.thresholds, threshold, rtol=0, atol=1e-9))
        if len(matches) == 0:
            raise KeyError(f"IoU threshold {threshold} was not scored; have {self.thresholds}")
        i = int(matches[0])
        return {
            "tp": int(self.tp[i]),
            "fp": int(self.fp[i]),
            "fn": int(self.fn[i]),
            "ap": float(self.ap[i]),
            "precision": float(self.precision[i]),
            "recall": float(self.recall[i]),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values; per-threshold scores keyed by :func:`threshold_key`."""
        keys = [threshold_key(t) for t in self.thresholds]

        def per_threshold(values: np.ndarray, kind: type) -> dict[str, Any]:
            return {key: kind(value) for key, value in zip(keys, values, strict=True)}

        return {
            "n_true": self.n_true,
            "n_pred": self.n_pred,
            "ap": per_threshold(self.ap, float),
            "mean_ap": self.mean_ap,
            "precision": per_threshold(self.precision, float),
            "recall": per_threshold(self.recall, float),
            "tp": per_threshold(self.tp, int),
            "fp": per_threshold(self.fp, int),
            "fn": per_threshold(self.fn, int),
            "jaccard": float(self.jaccard),
            "dice": float(self.dice),
            "ari": float(self.ari),
        }


def score_segmentation(
    ground_truth: np.ndarray,
    prediction: np.ndarray,
    *,
    thresholds: Sequence[float] | np.ndarray = DEFAULT_IOU_THRESHOLDS,
    min_size: int = 0,
) -> ImageScores:
    """Score a predicted label image against its ground truth.

    The pixel overlaps are counted once and every threshold is matched from them (see
    :func:`match_instances`). See :class:`ImageScores` for the scores and the 0/0 cases.

    Parameters
    ----------
    ground_truth, prediction
        Integer label images of the same shape, 2D or 3D; 0 is background, ids arbitrary.
    thresholds
        IoU thresholds in (0, 1], distinct; default 0.5, 0.55, ..., 0.95.
    min_size
        When > 0, objects with fewer pixels are removed from both images before scoring
        (and before the adjusted Rand index).

    Returns
    -------
    ImageScores
    """
    thresholds = check_thresholds(thresholds)
    ground_truth, prediction = np.asarray(ground_truth), np.asarray(prediction)
    _check_labels(ground_truth, prediction)
    if min_size:
        ground_truth = remove_small_objects(ground_truth, min_size)
        prediction = remove_small_objects(prediction, min_size)
    table = _contingency(ground_truth, prediction)
    overlaps = _overlaps_from(table)
    matches = [_match(overlaps, float(t)) for t in thresholds]
    tp = np.array([m.tp for m in matches], dtype=np.int64)
    fp = np.array([m.fp for m in matches], dtype=np.int64)
    fn = np.array([m.fn for m in matches], dtype=np.int64)
    nothing = overlaps.n_true == 0 and overlaps.n_pred == 0
    matched = _match(overlaps, MATCHED_OBJECTS_THRESHOLD)
    if matched.tp:
        jaccard = float(np.mean(matched.iou))
        dice = float(np.mean(2 * matched.iou / (1 + matched.iou)))
    else:
        jaccard = dice = float("nan")
    return ImageScores(
        thresholds=thresholds,
        tp=tp,
        fp=fp,
        fn=fn,
        ap=_ratio(tp, tp + fp + fn, nothing),
        precision=_ratio(tp, tp + fp, nothing),
        recall=_ratio(tp, tp + fn, nothing),
        n_true=overlaps.n_true,
        n_pred=overlaps.n_pred,
        jaccard=jaccard,
        dice=dice,
        ari=_adjusted_rand_index(table),
        min_size=int(min_size),
    )


def summarize(scores: Sequence[ImageScores]) -> dict[str, Any]:
    """Average per-image scores over images.

    Parameters
    ----------
    scores
        Scores of one or more images, all at the same thresholds.

    Returns
    -------
    dict
        ``n_images``; ``thresholds``; ``ap`` (mAP: per threshold, the mean of the per-image
        AP, keyed by :func:`threshold_key`); ``mean_ap`` (per-image AP averaged over the
        thresholds, then over images: "mean AP 0.5:0.95" by default); ``precision`` and
        ``recall`` (per threshold, means over images); ``jaccard`` and ``dice`` (means over
        the images that have matched pairs, NaN if none has); ``ari`` (mean); totals
        ``n_true``, ``n_pred`` and per threshold ``tp``, ``fp``, ``fn``.
    """
    if not scores:
        raise ValueError("no scores to summarize")
    thresholds = scores[0].thresholds
    if any(not np.array_equal(score.thresholds, thresholds) for score in scores):
        raise ValueError("all scores must use the same IoU thresholds")
    keys = [threshold_key(t) for t in thresholds]

    def per_threshold(name: str, reduce: Any, kind: type) -> dict[str, Any]:
        values = reduce(np.stack([getattr(score, name) for score in scores]), axis=0)
        return {key: kind(value) for key, value in zip(keys, values, strict=True)}

    def mean_of_defined(name: str) -> float:
        values = np.array([getattr(score, name) for score in scores], dtype=float)
        defined = values[~np.isnan(values)]
        return float(np.mean(defined)) if len(defined) else float("nan")

    return {
        "n_images": len(scores),
        "thresholds": [float(t) for t in thresholds],
        "ap": per_threshold("ap", np.mean, float),
        "mean_ap": float(np.mean([score.mean_ap for score in scores])),
        "precision": per_threshold("precision", np.mean, float),
        "recall": per_threshold("recall", np.mean, float),
        "jaccard": mean_of_defined("jaccard"),
        "dice": mean_of_defined("dice"),
        "ari": float(np.mean([score.ari for score in scores])),
        "n_true": int(sum(score.n_true for score in scores)),
        "n_pred": int(sum(score.n_pred for score in scores)),
        "tp": per_threshold("tp", np.sum, int),
        "fp": per_threshold("fp", np.sum, int),
        "fn": per_threshold("fn", np.sum, int),
    }


def check_thresholds(thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """Validated IoU thresholds: a non-empty 1-D float array of distinct values in (0, 1]."""
    values = np.asarray(thresholds, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"thresholds must be a non-empty list of numbers, got {thresholds}")
    if not np.all((values > 0) & (values <= 1)):
        raise ValueError(f"IoU thresholds must be in (0, 1], got {values.tolist()}")
    if len(np.unique(values)) != len(values):
        raise ValueError(f"IoU thresholds must be distinct, got {values.tolist()}")
    return values


def _ratio(numerator: np.ndarray, denominator: np.ndarray, nothing: bool) -> np.ndarray:
    """numerator / denominator, with 0/0 = 1.0 when both images are empty and 0.0 otherwise."""
    safe = np.where(denominator == 0, 1, denominator)
    return np.where(denominator == 0, 1.0 if nothing else 0.0, numerator / safe)


@dataclass(frozen=True)
class _Overlaps:
    """Overlapping instance pairs (sorted label ids) with their IoU, and instance counts."""

    pairs: np.ndarray
    iou: np.ndarray
    n_true: int
    n_pred: int


@dataclass(frozen=True)
class _Contingency:
    """Sparse contingency table of two label images, background included.

    ``true_ids``/``pred_ids`` are the sorted label ids present (0 among them when there is
    background) with their pixel counts ``true_area``/``pred_area``; ``pair_true`` and
    ``pair_pred`` index into them, one entry per (true, predicted) combination present,
    with its pixel count ``count``.
    """

    true_ids: np.ndarray
    true_area: np.ndarray
    pred_ids: np.ndarray
    pred_area: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    count: np.ndarray


def _check_labels(ground_truth: np.ndarray, prediction: np.ndarray) -> None:
    if ground_truth.shape != prediction.shape:
        raise ValueError(
            f"label images differ in shape: ground truth {ground_truth.shape}, "
            f"prediction {prediction.shape}"
        )
    for name, labels in (("ground truth", ground_truth), ("prediction", prediction)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name} labels must be integers, got dtype {labels.dtype}")


def _contingency(ground_truth: np.ndarray, prediction: np.ndarray) -> _Contingency:
    """Count pixels per label and per co-occurring label pair in one pass over the images."""
    ground_truth, prediction = np.asarray(ground_truth), np.asarray(prediction)
    _check_labels(ground_truth, prediction)
    true_ids, true_index = np.unique(ground_truth.ravel(), return_inverse=True)
    pred_ids, pred_index = np.unique(prediction.ravel(), return_inverse=True)
    true_area = np.bincount(true_index, minlength=len(true_ids))
    pred_area = np.bincount(pred_index, minlength=len(pred_ids))
    pair_codes, count = np.unique(
        true_index.astype(np.int64) * len(pred_ids) + pred_index, return_counts=True
    )
    pair_true, pair_pred = np.divmod(pair_codes, max(len(pred_ids), 1))
    return _Contingency(
        true_ids=true_ids,
        true_area=true_area,
        pred_ids=pred_ids,
        pred_area=pred_area,
        pair_true=pair_true,
        pair_pred=pair_pred,
        count=count,
    )


def _overlaps(ground_truth: np.ndarray, prediction: np.ndarray) -> _Overlaps:
    """Overlapping instance pairs of two label images with their IoU."""
    return _overlaps_from(_contingency(ground_truth, prediction))


def _overlaps_from(table: _Contingency) -> _Overlaps:
    """Instance pairs (both labels non-zero) of a contingency table with their IoU."""
    true_labels, pred_labels = table.true_ids[table.pair_true], table.pred_ids[table.pair_pred]
    both = (true_labels != 0) & (pred_labels != 0)
    intersection = table.count[both]
    union = table.true_area[table.pair_true[both]] + table.pred_area[table.pair_pred[both]]
    union = union - intersection
    return _Overlaps(
        pairs=np.column_stack([true_labels[both], pred_labels[both]]),
        iou=intersection / union,
        n_true=int(np.count_nonzero(table.true_ids)),
        n_pred=int(np.count_nonzero(table.pred_ids)),
    )


def _adjusted_rand_index(table: _Contingency) -> float:
    """Adjusted Rand index from pair counts, as ``sklearn.metrics.adjusted_rand_score``.

    Counts are ordered pixel pairs (Python integers, so no overflow): ``together`` in the
    same cluster in both labellings, ``only_true``/``only_pred`` together in one only.
    """
    n = int(table.true_area.sum())
    sum_squares = int(np.dot(table.count, table.count))
    true_squares = int(np.dot(table.true_area, table.true_area))
    pred_squares = int(np.dot(table.pred_area, table.pred_area))
    together = sum_squares - n
    only_true = true_squares - sum_squares
    only_pred = pred_squares - sum_squares
    apart = n * n - only_true - only_pred - sum_squares
    if only_true == 0 and only_pred == 0:  # identical partitions (or no pixels)
        return 1.0
    numerator = 2 * (together * apart - only_true * only_pred)
    denominator = (together + only_true) * (only_true + apart) + (together + only_pred) * (
        only_pred + apart
    )
    return numerator / denominator


def _optimal_matching(pairs: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """Indices of the candidate pairs forming a maximum matching of largest total IoU."""
    true_ids, true_index = np.unique(pairs[:, 0], return_inverse=True)
    pred_ids, pred_index = np.unique(pairs[:, 1], return_inverse=True)
    n_true, n_pred = len(true_ids), len(pred_ids)
    graph = sparse.coo_array(
        (np.ones(len(pairs)), (true_index, n_true + pred_index)),
        shape=(n_true + n_pred, n_true + n_pred),
    )
    _, component_of_node = connected_components(graph, directed=False)
    component = component_of_node[true_index]
    order = np.argsort(component, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(component[order])) + 1)
    chosen = [group for group in groups if len(group) == 1]
    for group in (group for group in groups if len(group) > 1):
        rows, row_index = np.unique(true_index[group], return_inverse=True)
        cols, col_index = np.unique(pred_index[group], return_inverse=True)
        # Each match is worth 1 plus an IoU bonus too small for any number of bonuses to
        # outweigh one more match: the most matches first, then the largest total IoU.
        weight = np.zeros((len(rows), len(cols)))
        weight[row_index, col_index] = 1 + iou[group] / (min(len(rows), len(cols)) + 1)
        matched_rows, matched_cols = linear_sum_assignment(weight, maximize=True)
        lookup = np.full((len(rows), len(cols)), -1)
        lookup[row_index, col_index] = group
        picked = lookup[matched_rows, matched_cols]
        chosen.append(picked[picked >= 0])
    return np.sort(np.concatenate([np.empty(0, dtype=np.int64), *chosen]))
