"""Segmentation scores: instance matching by IoU and average precision.

The dense-cell benchmark scores a segmentation by AP = TP / (TP + FP + FN) at IoU >= 0.5,
where a true positive is a one-to-one match between a ground-truth and a predicted instance.
Label images hold arbitrary integer ids, 0 is background; 2D and 3D work alike. Overlaps are
counted sparsely (only pairs that touch), so large images with many cells stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

__all__ = ["MatchResult", "average_precision", "intersection_over_union", "match_instances"]


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
    overlaps = _overlaps(ground_truth, prediction)
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


@dataclass(frozen=True)
class _Overlaps:
    """Overlapping instance pairs (sorted label ids) with their IoU, and instance counts."""

    pairs: np.ndarray
    iou: np.ndarray
    n_true: int
    n_pred: int


def _overlaps(ground_truth: np.ndarray, prediction: np.ndarray) -> _Overlaps:
    """Count pixels per instance and per overlapping pair in one pass over the images."""
    ground_truth, prediction = np.asarray(ground_truth), np.asarray(prediction)
    if ground_truth.shape != prediction.shape:
        raise ValueError(
            f"label images differ in shape: ground truth {ground_truth.shape}, "
            f"prediction {prediction.shape}"
        )
    for name, labels in (("ground truth", ground_truth), ("prediction", prediction)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name} labels must be integers, got dtype {labels.dtype}")
    true_ids, true_index = np.unique(ground_truth.ravel(), return_inverse=True)
    pred_ids, pred_index = np.unique(prediction.ravel(), return_inverse=True)
    true_area = np.bincount(true_index, minlength=len(true_ids))
    pred_area = np.bincount(pred_index, minlength=len(pred_ids))
    both = (ground_truth.ravel() != 0) & (prediction.ravel() != 0)
    pair_codes, intersection = np.unique(
        true_index[both].astype(np.int64) * len(pred_ids) + pred_index[both],
        return_counts=True,
    )
    pair_true, pair_pred = np.divmod(pair_codes, len(pred_ids))
    union = true_area[pair_true] + pred_area[pair_pred] - intersection
    return _Overlaps(
        pairs=np.column_stack([true_ids[pair_true], pred_ids[pair_pred]]),
        iou=intersection / union,
        n_true=int(np.count_nonzero(true_ids)),
        n_pred=int(np.count_nonzero(pred_ids)),
    )


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
