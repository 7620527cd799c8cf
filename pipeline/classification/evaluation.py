"""Grouped cross-validation of the cell classifier against the paper's two baselines.

Ogawa et al. score a classifier by ROC AUC with the dish as the unit of cross-validation and
compare it with two baselines: the cell's size alone (an SVM) and its contour alone (the same
CNN on the binary mask). :func:`cross_validate` does exactly that on crops from
:mod:`pipeline.classification.store` (whose last channel is the cell's mask): per fold and
pooled over the out-of-fold predictions, one-vs-rest macro AUC for more than two classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from pipeline.classification.classifier import CellClassifier

__all__ = ["CrossValidation", "auc", "cross_validate", "size_baseline", "write_roc_figure"]

METHODS = ("cnn", "contour", "size")


@dataclass(frozen=True)
class CrossValidation:
    """Out-of-fold results of every method.

    Attributes
    ----------
    classes
        The classes, in the order of the probability columns.
    labels
        The true class of every crop.
    probabilities
        Method -> (N, n_classes) out-of-fold probabilities.
    folds
        One row per fold and method: ``fold``, ``method``, ``auc``, ``crops``, ``groups``.
    """

    classes: np.ndarray
    labels: np.ndarray
    probabilities: dict[str, np.ndarray]
    folds: pd.DataFrame

    def pooled(self) -> pd.DataFrame:
        """Pooled out-of-fold AUC and accuracy per method, with the folds' mean and spread."""
        rows = []
        for method, probability in self.probabilities.items():
            per_fold = self.folds.loc[self.folds["method"] == method, "auc"]
            predicted = self.classes[np.argmax(probability, axis=1)]
            rows.append(
                {
                    "method": method,
                    "auc": auc(self.classes, self.labels, probability),
                    "accuracy": float(np.mean(predicted == self.labels)),
                    "fold_auc_mean": float(per_fold.mean()),
                    "fold_auc_sd": float(per_fold.std(ddof=0)),
                }
            )
        return pd.DataFrame(rows)


def auc(classes: np.ndarray, labels: np.ndarray, probability: np.ndarray) -> float:
    """ROC AUC: of the second class for two, one-vs-rest macro for more (NaN for one class)."""
    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    if len(classes) == 2:
        return float(roc_auc_score(labels == classes[1], probability[:, 1]))
    columns = np.isin(classes, present)
    scores = probability[:, columns] / probability[:, columns].sum(axis=1, keepdims=True)
    return float(roc_auc_score(labels, scores, multi_class="ovr", labels=classes[columns]))


def size_baseline() -> Pipeline:
    """The paper's size baseline: an SVM (RBF) on the standardised log cell area, its scores
    calibrated to probabilities (sigmoid, internal cross-validation)."""
    return make_pipeline(StandardScaler(), CalibratedClassifierCV(SVC(), ensemble=False))


def cross_validate(
    crops: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    folds: int = 5,
    estimator: CellClassifier | None = None,
    baselines: bool = True,
    progress: bool = False,
) -> CrossValidation:
    """Grouped k-fold cross-validation of the CNN (and the two baselines) on crops.

    Parameters
    ----------
    crops
        (N, C + 1, H, W): image channels, then the cell's mask (as the crop store holds them).
    labels
        The class of every crop.
    groups
        The unit no fold splits (a dish, a well): crops of one group are tested together.
    folds
        Number of folds (at most the number of groups).
    estimator
        The classifier (default ``CellClassifier()``); cloned for every fold.
    baselines
        Also run the size (SVM on log mask area) and contour (CNN on the mask) baselines.
    progress
        Print a line per fold and method.

    Returns
    -------
    CrossValidation
        Out-of-fold probabilities and per-fold AUC of every method.
    """
    crops = np.asarray(crops)
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if not len(crops) == len(labels) == len(groups):
        raise ValueError(
            f"{len(crops)} crops, {len(labels)} labels and {len(groups)} groups must match"
        )
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError("cross-validation needs at least two groups (dishes, wells)")
    folds = min(folds, n_groups)
    classes = np.unique(labels)
    estimator = estimator if estimator is not None else CellClassifier()
    inputs = {"cnn": crops[:, :-1]}
    if baselines:
        inputs["contour"] = crops[:, -1:]
        inputs["size"] = np.log(crops[:, -1].sum(axis=(1, 2)).clip(min=1))[:, np.newaxis]
    probabilities = {method: np.zeros((len(crops), len(classes))) for method in inputs}
    rows = []
    for fold, (train, test) in enumerate(GroupKFold(folds).split(crops, labels, groups)):
        for method, features in inputs.items():
            model = size_baseline() if method == "size" else clone(estimator)
            model.fit(features[train], labels[train])
            columns = np.searchsorted(classes, model.classes_)
            probabilities[method][np.ix_(test, columns)] = model.predict_proba(features[test])
            score = auc(classes, labels[test], probabilities[method][test])
            rows.append(
                {
                    "fold": fold,
                    "method": method,
                    "auc": score,
                    "crops": len(test),
                    "groups": len(np.unique(groups[test])),
                }
            )
            if progress:
                print(f"fold {fold + 1}/{folds} {method}: AUC {score:.3f}", flush=True)
    return CrossValidation(classes, labels, probabilities, pd.DataFrame(rows))


def write_roc_figure(result: CrossValidation, path: str | Path) -> Path:
    """ROC curves of the pooled out-of-fold predictions, one per method (and class)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5, 4.5), dpi=100)
    axes = figure.add_subplot()
    binary = len(result.classes) == 2
    for method, probability in result.probabilities.items():
        for index, name in enumerate(result.classes):
            if binary and index == 0:
                continue
            if not binary and method != "cnn":
                continue
            truth = result.labels == name
            if truth.all() or not truth.any():
                continue
            fpr, tpr, _ = roc_curve(truth, probability[:, index])
            area = roc_auc_score(truth, probability[:, index])
            label = f"{method} (AUC {area:.3f})" if binary else f"{name} (AUC {area:.3f})"
            axes.plot(fpr, tpr, label=label)
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"positive: {result.classes[1]}" if binary else "CNN, one class vs the rest",
    )
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path
