"""Compartment intensities: every statistic against numpy on boolean masks drawn by hand, the
ratios, tiled (odd chunks) == whole image for every column, and clear errors."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from skimage.segmentation import expand_labels

import pipeline
from pipeline.measurement.compartments import COMPARTMENTS, STATISTICS
from pipeline.synthetic import simulate_field

NUMPY = {
    "mean": np.mean,
    "median": np.median,
    "sum": np.sum,
    "std": np.std,
    "min": np.min,
    "max": np.max,
}


def _two_cells() -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, dict[int, np.ndarray]]]:
    """Two touching cells with nuclei, random intensities, and each compartment's mask drawn
    by hand (ring: 2 px at 0.5 um per pixel and ring_um = 1)."""
    nuclei = np.zeros((30, 40), np.uint16)
    cells = np.zeros((30, 40), np.uint16)
    cells[2:20, 2:20] = 7
    cells[2:20, 20:36] = 12
    nuclei[8:12, 8:13] = 7
    nuclei[6:10, 26:30] = 12
    masks: dict[str, dict[int, np.ndarray]] = {c: {} for c in COMPARTMENTS}
    for cell in (7, 12):
        nucleus = nuclei == cell
        within_two = np.zeros_like(nucleus)
        ys, xs = np.nonzero(nucleus)
        yy, xx = np.mgrid[:30, :40]
        for y, x in zip(ys, xs, strict=True):
            within_two |= (yy - y) ** 2 + (xx - x) ** 2 <= 4
        masks["nucleus"][cell] = nucleus
        masks["cell"][cell] = cells == cell
        masks["cytoplasm"][cell] = (cells == cell) & ~nucleus
        masks["cytoring"][cell] = within_two & (cells == cell) & ~nucleus
    image = np.random.default_rng(1).gamma(2.0, 50.0, size=(2, 30, 40))
    return nuclei, cells, image, masks


def test_every_statistic_equals_numpy_on_hand_drawn_masks() -> None:
    nuclei, cells, image, masks = _two_cells()
    table = pipeline.measure(
        nuclei,
        image,
        dims="yx",
        pixel_size={"y": 0.5, "x": 0.5},
        channel_names=["dapi", "ktr"],
        cells=cells,
        ring_um=1.0,
    ).set_index("label")
    for c, channel in enumerate(["dapi", "ktr"]):
        for compartment in COMPARTMENTS:
            for statistic in STATISTICS:
                for cell in (7, 12):
                    want = NUMPY[statistic](image[c][masks[compartment][cell]])
                    got = table.loc[cell, f"intensity_{statistic}_{channel}_{compartment}"]
                    assert got == pytest.approx(want, rel=1e-9), (compartment, statistic)
        for compartment in ("cytoplasm", "cytoring"):
            ratio = (
                table[f"intensity_mean_{channel}_{compartment}"]
                / table[f"intensity_mean_{channel}_nucleus"]
            )
            pd.testing.assert_series_equal(
                table[f"ratio_{compartment}_nucleus_{channel}"], ratio, check_names=False
            )


def test_tiled_compartments_equal_whole_image() -> None:
    simulated = simulate_field(n_frames=2, size=160, seed=5)
    nuclei = simulated.labels
    cells = np.stack([expand_labels(frame, 6) for frame in nuclei])
    options = {
        "dims": "tyx",
        "pixel_size": {"y": 0.5, "x": 0.5},
        "ring_um": 2.0,
        "cytoplasm_mixture": True,
    }
    whole = pipeline.measure(nuclei, simulated.image, cells=cells, **options)
    tiled = pipeline.measure(
        da.from_array(nuclei, chunks=(1, 45, 70)),
        da.from_array(simulated.image, chunks=(1, 1, 45, 70)),
        cells=da.from_array(cells, chunks=(1, 45, 70)),
        **options,
    ).compute()
    tiled = tiled.sort_values(["t", "label"], ignore_index=True)
    assert len(whole) > 20 and whole["ratio_cytoring_nucleus_1"].notna().all()
    pd.testing.assert_frame_equal(tiled[whole.columns], whole, check_dtype=False)


def test_mixture_keeps_the_cytoplasm_not_the_nuclear_signal_bleeding_in() -> None:
    """A cytoplasm of 400 pixels: 70 % at 20 (the cytoplasm) and 30 % at 100 like the nucleus
    (signal bleeding in), with noise; the mixture recovers 20, the plain mean does not."""
    rng = np.random.default_rng(3)
    nuclei = np.zeros((30, 30), np.int32)
    cells = np.zeros((30, 30), np.int32)
    cells[5:25, 5:25] = 1
    nuclei[13:17, 13:17] = 1
    image = np.zeros((1, 30, 30))
    image[0][nuclei == 1] = 100 + rng.normal(0, 2, 16)
    cytoplasm = (cells == 1) & (nuclei == 0)
    image[0][cytoplasm] = np.where(rng.random(cytoplasm.sum()) < 0.3, 100, 20) + rng.normal(
        0, 2, cytoplasm.sum()
    )
    table = pipeline.measure(nuclei, image, dims="yx", cells=cells, cytoplasm_mixture=True)
    assert table["intensity_mixture_0_cytoplasm"][0] == pytest.approx(20, abs=0.5)
    assert table["intensity_mean_0_cytoplasm"][0] > 35
    assert table["ratio_mixture_nucleus_0"][0] == pytest.approx(0.2, abs=0.01)


def test_compartments_need_an_image_and_matching_cells() -> None:
    nuclei, cells, image, _ = _two_cells()
    with pytest.raises(ValueError, match="needs an image"):
        pipeline.measure(nuclei, cells=cells)
    with pytest.raises(ValueError, match="do not match"):
        pipeline.measure(nuclei, image, dims="yx", cells=cells[:10])


def test_batched_mixture_fits_agree_with_scikit_learn() -> None:
    """two_gaussians fits many groups at once; each group's fit is that of
    sklearn.mixture.GaussianMixture(2) on the group alone."""
    from sklearn.mixture import GaussianMixture

    from pipeline.measurement.compartments import two_gaussians

    rng = np.random.default_rng(4)
    groups = []
    for share in (0.2, 0.4, 0.5, 0.7, 0.9):
        n = 400
        low = rng.random(n) < share
        groups.append(np.where(low, rng.normal(10, 3, n), rng.normal(40, 5, n)))
    values = np.concatenate(groups)
    group = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    means, variances, weights = two_gaussians(values, group, len(groups))
    for k, sample in enumerate(groups):
        reference = GaussianMixture(2, random_state=0, tol=1e-8, max_iter=1000)
        reference.fit(sample[:, None])
        order, ours = np.argsort(reference.means_[:, 0]), np.argsort(means[k])
        np.testing.assert_allclose(means[k][ours], reference.means_[order, 0], rtol=1e-3)
        np.testing.assert_allclose(
            variances[k][ours], reference.covariances_[order, 0, 0], rtol=1e-2
        )
        np.testing.assert_allclose(weights[k][ours], reference.weights_[order], rtol=1e-2)
