"""Intensities per cell compartment: nucleus, cell, cytoplasm and a cytoplasmic ring.

For every cell (a whole-cell label that shares its id with its nucleus, see
:mod:`pipeline.segmentation.cells`) and every channel: mean, median, sum, standard deviation,
minimum and maximum over

- ``nucleus``: the nucleus' pixels;
- ``cell``: the whole cell;
- ``cytoplasm``: the cell minus its nucleus;
- ``cytoring``: the pixels of the cell within ``ring_um`` outside its nucleus (the kinase
  translocation reporter readout of Van Valen et al. 2016 uses a 5 px ring),

plus the ratios ``ratio_cytoplasm_nucleus_<channel>`` and ``ratio_cytoring_nucleus_<channel>``
(mean over the compartment / mean over the nucleus). Columns are named
``intensity_<statistic>_<channel>_<compartment>``; a compartment without pixels gives NaN.

Optionally (``mixture=True``) the cytoplasm is also estimated as in Van Valen et al. 2016: a
two-component Gaussian mixture of the cytoplasm's pixel values (:func:`two_gaussians`, the
model of :class:`sklearn.mixture.GaussianMixture` fitted for all cells at once), keeping the
mean of the component farther from the nucleus' mean (the other one is nuclear signal bleeding
in): ``intensity_mixture_<channel>_cytoplasm`` and ``ratio_mixture_nucleus_<channel>``.
Cytoplasms of fewer than 10 pixels give their plain mean.

Tiled (Dask) input: medians and the other order statistics do not merge across blocks, so each
cell is measured whole by the one block that owns it (:mod:`pipeline.measurement.owned`); every
value equals the whole-image value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels

from pipeline.measurement.owned import owned_cell_table

__all__ = [
    "COMPARTMENTS",
    "STATISTICS",
    "Geometry",
    "column_names",
    "compartment_table",
    "compartment_table_dask",
    "two_gaussians",
]

COMPARTMENTS = ("nucleus", "cell", "cytoplasm", "cytoring")
STATISTICS = {
    "mean": ndi.mean,
    "median": ndi.median,
    "sum": ndi.sum_labels,
    "std": ndi.standard_deviation,
    "min": ndi.minimum,
    "max": ndi.maximum,
}
RATIOS = ("cytoplasm", "cytoring")
_MIXTURE_MIN_PIXELS = 10
_VARIANCE_FLOOR = 1e-6  # as sklearn's reg_covar


@dataclass(frozen=True)
class Geometry:
    """How compartments are drawn: pixel size (um per axis), the ring's width outside the
    nucleus and a margin (um) kept clear on both sides of the nuclear outline (0: none)."""

    spacing: tuple[float, ...]
    ring_um: float
    margin_um: float = 0.0


def _compartment_labels(
    nuclei: np.ndarray, cells: np.ndarray, geometry: Geometry
) -> dict[str, np.ndarray]:
    """Each compartment as a label image with the cell's id."""
    spacing = geometry.spacing
    nuclei = np.where(cells > 0, nuclei, 0)  # a nucleus counts where its cell is
    nucleus, away = nuclei, nuclei == 0
    if geometry.margin_um > 0:
        inside = ndi.distance_transform_edt(nuclei > 0, sampling=spacing)
        nucleus = np.where(inside > geometry.margin_um, nuclei, 0)
        outside = ndi.distance_transform_edt(nuclei == 0, sampling=spacing)
        away &= outside > geometry.margin_um
    grown = expand_labels(nuclei, geometry.margin_um + geometry.ring_um, spacing=spacing)
    return {
        "nucleus": nucleus,
        "cell": cells,
        "cytoplasm": np.where(away, cells, 0),
        "cytoring": np.where(away & (grown == cells), cells, 0),
    }


def _frame_table(
    cells: np.ndarray,
    nuclei: np.ndarray,
    image: np.ndarray,
    *,
    channel_names: Sequence[str],
    geometry: Geometry,
    ids: np.ndarray | None = None,
    mixture: bool = False,
) -> pd.DataFrame:
    """The compartment columns of the cells ``ids`` (default: all) of one frame."""
    ids = np.unique(cells[cells > 0]) if ids is None else np.asarray(ids)
    columns: dict[str, np.ndarray] = {"label": ids.astype(np.int64)}
    if ids.size == 0:
        return pd.DataFrame(columns=["label", *column_names(channel_names, mixture)])
    compartments = _compartment_labels(nuclei, cells, geometry)
    for c, name in enumerate(channel_names):
        values = np.asarray(image[c], dtype=np.float64)
        for compartment, labels in compartments.items():
            present = np.isin(ids, labels[labels > 0])
            for statistic, function in STATISTICS.items():
                column = np.full(ids.size, np.nan)
                if present.any():
                    # scipy's variance divides by the count of every label up to the
                    # largest, absent ones included: harmless NaNs it does not return
                    with np.errstate(invalid="ignore", divide="ignore"):
                        column[present] = function(values, labels, ids[present])
                columns[f"intensity_{statistic}_{name}_{compartment}"] = column
        nucleus_mean = columns[f"intensity_mean_{name}_nucleus"]
        if mixture:
            columns[f"intensity_mixture_{name}_cytoplasm"] = _mixture_means(
                values, compartments["cytoplasm"], ids, nucleus_mean
            )
        for compartment in (*RATIOS, "mixture") if mixture else RATIOS:
            source = "mixture" if compartment == "mixture" else "mean"
            region = "cytoplasm" if compartment == "mixture" else compartment
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = columns[f"intensity_{source}_{name}_{region}"] / nucleus_mean
            columns[f"ratio_{compartment}_nucleus_{name}"] = ratio
    return pd.DataFrame(columns)


def _mixture_means(
    values: np.ndarray, cytoplasm: np.ndarray, ids: np.ndarray, nucleus_mean: np.ndarray
) -> np.ndarray:
    """Per cell, the mean of the Gaussian-mixture component of its cytoplasm's pixel values
    farther from its nucleus' mean (module notes), all cells fitted at once."""
    flat = cytoplasm.ravel()
    inside = np.isin(flat, ids)
    group = np.searchsorted(ids, flat[inside])
    pixels = values.ravel()[inside].astype(np.float64)
    counts = np.bincount(group, minlength=ids.size).astype(np.float64)
    means = np.full(ids.size, np.nan)
    present = counts > 0
    means[present] = np.bincount(group, pixels, ids.size)[present] / counts[present]
    fit = (counts >= _MIXTURE_MIN_PIXELS) & (
        np.bincount(group, (pixels - means[group]) ** 2, ids.size) > 0
    )
    if fit.any():
        centres = two_gaussians(pixels, group, ids.size)[0]
        farther = np.argmax(np.abs(centres - nucleus_mean[:, np.newaxis]), axis=1)
        means[fit] = centres[np.arange(ids.size), farther][fit]
    return means


def two_gaussians(
    values: np.ndarray, group: np.ndarray, n_groups: int, iterations: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-component 1-D Gaussian mixtures of many groups of values, fitted together by
    expectation-maximisation (the model of :class:`sklearn.mixture.GaussianMixture` with
    ``n_components=2``, vectorised over groups; initialised at each group's mean -+ one
    standard deviation).

    Parameters
    ----------
    values
        All values.
    group
        The group (0 .. n_groups - 1) of each value.
    n_groups
        Number of groups.
    iterations
        Most EM steps; each group stops once neither of its means moves by more than 1e-9
        of its spread.

    Returns
    -------
    means, variances, weights
        Each (n_groups, 2); NaN rows for empty groups.
    """
    count = np.bincount(group, minlength=n_groups).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.bincount(group, values, n_groups) / count
        spread = np.sqrt(np.bincount(group, (values - mean[group]) ** 2, n_groups) / count)
        centres = np.stack([mean - spread, mean + spread], axis=1)
        variances = np.stack([spread**2, spread**2], axis=1) + _VARIANCE_FLOOR
        weights = np.full((n_groups, 2), 0.5)
        active = count > 0  # groups whose fit still moves; the others are final
        for _ in range(iterations):
            pick = active[group]
            g, v = group[pick], values[pick]
            x = v[:, np.newaxis]
            log_p = (
                np.log(weights[g])
                - 0.5 * np.log(2 * np.pi * variances[g])
                - 0.5 * (x - centres[g]) ** 2 / variances[g]
            )
            log_p -= log_p.max(axis=1, keepdims=True)
            responsibility = np.exp(log_p)
            responsibility /= responsibility.sum(axis=1, keepdims=True)
            mass = np.stack([np.bincount(g, responsibility[:, k], n_groups) for k in (0, 1)], 1)
            new_centres = (
                np.stack([np.bincount(g, responsibility[:, k] * v, n_groups) for k in (0, 1)], 1)
                / mass
            )
            new_variances = (
                np.stack(
                    [
                        np.bincount(
                            g, responsibility[:, k] * (v - new_centres[g, k]) ** 2, n_groups
                        )
                        for k in (0, 1)
                    ],
                    axis=1,
                )
                / mass
                + _VARIANCE_FLOOR
            )
            moved = np.max(np.abs(new_centres - centres), axis=1) / (spread + 1e-300)
            centres[active] = new_centres[active]
            variances[active] = new_variances[active]
            weights[active] = (mass / count[:, np.newaxis])[active]
            active &= moved > 1e-9
            if not active.any():
                break
    return centres, variances, weights


def column_names(channel_names: Sequence[str], mixture: bool = False) -> list[str]:
    """The columns :func:`compartment_table` adds, in order, for these channels."""
    names = []
    for name in channel_names:
        names += [
            f"intensity_{statistic}_{name}_{compartment}"
            for compartment in COMPARTMENTS
            for statistic in STATISTICS
        ]
        if mixture:
            names.append(f"intensity_mixture_{name}_cytoplasm")
        ratios = (*RATIOS, "mixture") if mixture else RATIOS
        names += [f"ratio_{compartment}_nucleus_{name}" for compartment in ratios]
    return names


def compartment_table(
    nuclei: np.ndarray,
    cells: np.ndarray,
    image: np.ndarray,
    channel_names: Sequence[str],
    geometry: Geometry,
    mixture: bool = False,
) -> pd.DataFrame:
    """Compartment intensities of every cell of a (t, ...spatial) field (numpy).

    Parameters
    ----------
    nuclei, cells
        Nuclear and whole-cell labels (t, ...spatial); a cell and its nucleus share the id.
    image
        Intensities (t, c, ...spatial).
    channel_names
        One name per channel, used in the column names.
    geometry
        Pixel size, ring width and margin (:class:`Geometry`).
    mixture
        Add the Gaussian-mixture estimate of the cytoplasm (module notes).

    Returns
    -------
    pandas.DataFrame
        ``t``, ``label`` and the columns of :func:`column_names`, one row per cell and frame.
    """
    tables = [
        _frame_table(
            cells[t],
            nuclei[t],
            image[t],
            channel_names=channel_names,
            geometry=geometry,
            mixture=mixture,
        ).assign(t=t)
        for t in range(cells.shape[0])
    ]
    return _ordered(pd.concat(tables, ignore_index=True), channel_names, mixture)


def _ordered(table: pd.DataFrame, channel_names: Sequence[str], mixture: bool) -> pd.DataFrame:
    table = table[["t", "label", *column_names(channel_names, mixture)]]
    return table.astype({"t": "int64"}).sort_values(["t", "label"], ignore_index=True)


def compartment_table_dask(
    nuclei: da.Array,
    cells: da.Array,
    image: da.Array,
    channel_names: Sequence[str],
    geometry: Geometry,
    halo: Sequence[int],
    mixture: bool = False,
) -> dd.DataFrame:
    """:func:`compartment_table` of (t, ...spatial) Dask arrays, each cell measured whole by
    the block that owns it (:func:`pipeline.measurement.owned.owned_cell_table`), with ``halo``
    pixels per spatial axis; lazy.

    Raises (when computed)
    ----------------------
    HaloTooSmall
        A cell does not fit in the halo of the block that owns it.
    """
    frame_table = partial(
        _frame_table, channel_names=list(channel_names), geometry=geometry, mixture=mixture
    )
    columns = ["t", "label", *column_names(channel_names, mixture)]
    meta = pd.DataFrame(columns=columns).astype(float).astype({"t": "int64", "label": "int64"})
    return owned_cell_table(cells, [nuclei, image], frame_table, halo, meta)
