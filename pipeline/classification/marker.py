"""Training labels from a marker channel, as Ogawa et al. made them.

A two-component Gaussian mixture is fitted to the cells' log marker intensity; the component
with the higher mean is the marker-positive class. A cell is labelled only where its posterior
for one component is at least ``min_posterior`` (0.8 in the paper); the cells in between, and
those whose intensity has no logarithm, are left out of training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.mixture import GaussianMixture

__all__ = ["MarkerLabels", "label_by_marker"]

_MIN_CELLS = 10


@dataclass(frozen=True)
class MarkerLabels:
    """Labels of a table's cells from their marker intensity.

    Attributes
    ----------
    labels
        Per row of the table: the class name, or missing (NaN) where the cell is left out.
    left_out
        Per row: True where the cell gets no label.
    posterior
        Per row: the mixture's posterior probability of the positive class (NaN where the
        intensity has no logarithm).
    means
        The two components' means, negative then positive, in intensity units (the geometric
        means when ``log`` was used).
    """

    labels: pd.Series
    left_out: pd.Series
    posterior: pd.Series
    means: tuple[float, float]


def label_by_marker(
    table: pd.DataFrame,
    column: str,
    *,
    min_posterior: float = 0.8,
    log: bool = True,
    names: tuple[str, str] = ("negative", "positive"),
    random_state: int = 0,
) -> MarkerLabels:
    """Label cells marker-negative or -positive by a two-component mixture on their intensity.

    Parameters
    ----------
    table
        Per-cell table (e.g. the cells table of a run).
    column
        The marker intensity column (e.g. ``intensity_mean_<channel>``).
    min_posterior
        Smallest posterior (in (0.5, 1)) for a cell to get a label.
    log
        Fit the mixture to the logarithm of the intensity (non-positive values are left out).
    names
        Class names of the dim and the bright component.
    random_state
        Seed of the mixture's initialisation.

    Returns
    -------
    MarkerLabels
        Labels, left-out cells and posteriors, indexed like ``table``.
    """
    if column not in table.columns:
        raise ValueError(
            f"marker column {column!r} not in the table; intensity columns: "
            f"{[c for c in table.columns if c.startswith('intensity')]}"
        )
    if not 0.5 < min_posterior < 1:
        raise ValueError(f"min_posterior must be between 0.5 and 1, got {min_posterior}")
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    usable = np.isfinite(values) & ((values > 0) if log else True)
    if usable.sum() < _MIN_CELLS:
        raise ValueError(
            f"marker column {column!r}: {usable.sum()} cells with a usable intensity, "
            f"at least {_MIN_CELLS} are needed for a two-component mixture"
        )
    x = np.log(values[usable]) if log else values[usable]
    mixture = GaussianMixture(2, n_init=5, random_state=random_state).fit(x[:, np.newaxis])
    positive = int(np.argmax(mixture.means_.ravel()))
    posterior = np.full(len(values), np.nan)
    posterior[usable] = mixture.predict_proba(x[:, np.newaxis])[:, positive]
    classes = np.full(len(values), None, dtype=object)
    classes[posterior >= min_posterior] = names[1]
    classes[posterior <= 1.0 - min_posterior] = names[0]
    means = np.sort(mixture.means_.ravel())
    if log:
        means = np.exp(means)
    labels = pd.Series(pd.Categorical(classes, categories=list(names)), index=table.index)
    return MarkerLabels(
        labels=labels,
        left_out=pd.Series(labels.isna().to_numpy(), index=table.index),
        posterior=pd.Series(posterior, index=table.index),
        means=(float(means[0]), float(means[1])),
    )
