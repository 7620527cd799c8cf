"""Per-block partial statistics merged exactly equal whole-image regionprops (contract 3)."""

from __future__ import annotations

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import ndimage
from skimage.measure import regionprops

import pipeline
from pipeline.measurement.cells import (
    block_statistics,
    finalize_statistics,
    measure,
    merge_statistics,
    tree_reduce,
)


def blob_labels(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Connected blobs of smoothed noise, plus one label split into two distant pieces."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random(shape), sigma=3)
    labels, n_labels = ndimage.label(smooth > np.quantile(smooth, 0.6))
    labels[(0,) * len(shape)] = n_labels + 1
    labels[tuple(size - 1 for size in shape)] = n_labels + 1
    return labels.astype(np.int32)


def integer_image(n_channels: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Integer-valued float intensities (exact float sums in any order)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1000, size=(n_channels, *shape)).astype(np.float32)


def assert_matches_regionprops(table: pd.DataFrame, labels: np.ndarray, image: np.ndarray) -> None:
    """Compare a measurement table of one frame with regionprops and numpy on the whole image."""
    spatial_dims = "zyx"[-labels.ndim :]
    props = regionprops(labels, intensity_image=np.moveaxis(image, 0, -1))
    assert table["label"].tolist() == [prop.label for prop in props]
    np.testing.assert_array_equal(table["n_pixels"], [prop.area for prop in props])
    np.testing.assert_allclose(
        table[[f"centroid_{dim}_px" for dim in spatial_dims]],
        [prop.centroid for prop in props],
        rtol=1e-12,
    )
    bbox_columns = [f"bbox_min_{dim}" for dim in spatial_dims] + [
        f"bbox_max_{dim}" for dim in spatial_dims
    ]
    np.testing.assert_array_equal(table[bbox_columns], [prop.bbox for prop in props])
    for stat in ("mean", "min", "max"):
        expected = np.array([getattr(prop, f"intensity_{stat}") for prop in props])
        columns = [f"intensity_{stat}_{channel}" for channel in range(image.shape[0])]
        np.testing.assert_allclose(table[columns], expected, rtol=1e-6)
    expected_sums = [
        [image[channel][labels == prop.label].sum(dtype=np.float64) for channel in range(2)]
        for prop in props
    ]
    np.testing.assert_array_equal(table[["intensity_sum_0", "intensity_sum_1"]], expected_sums)


@pytest.mark.parametrize("chunks", [(64, 64), (17, 17), (30, 30), (17, 30), (1, 64), (64, 7)])
def test_2d_merged_blocks_equal_regionprops(chunks: tuple[int, int]) -> None:
    labels = blob_labels((64, 64), seed=1)
    image = integer_image(2, (64, 64), seed=2)
    result = measure(da.from_array(labels, chunks=chunks), da.from_array(image, chunks=(1, 9, 9)))
    assert isinstance(result, dd.DataFrame)
    table = result.compute()
    assert len(np.unique(labels)) - 1 == len(table) > 5
    assert_matches_regionprops(table, labels, image)


@pytest.mark.parametrize("chunks", [(20, 40, 33), (7, 17, 30), (3, 40, 11)])
def test_3d_merged_blocks_equal_regionprops(chunks: tuple[int, int, int]) -> None:
    labels = blob_labels((20, 40, 33), seed=3)
    image = integer_image(2, (20, 40, 33), seed=4)
    table = measure(da.from_array(labels, chunks=chunks), image).compute()
    assert_matches_regionprops(table, labels, image)
    assert "volume" in table and "area" not in table


def test_numpy_input_gives_pandas_equal_to_regionprops() -> None:
    labels = blob_labels((40, 50), seed=5)
    image = integer_image(2, (40, 50), seed=6)
    table = measure(labels, image)
    assert isinstance(table, pd.DataFrame)
    assert_matches_regionprops(table, labels, image)


def test_huge_uint64_ids_measured_like_small_ones() -> None:
    small = blob_labels((30, 30), seed=7)
    image = integer_image(2, (30, 30), seed=8)
    huge = np.where(small > 0, np.uint64(2**63) + small.astype(np.uint64) * 1_000_003, 0)
    huge_table = measure(da.from_array(huge, chunks=11), image).compute()
    small_table = measure(small, image)
    assert huge_table["label"].dtype == np.uint64
    assert huge_table["label"].tolist() == [2**63 + 1_000_003 * i for i in small_table["label"]]
    pd.testing.assert_frame_equal(
        huge_table.drop(columns="label"), small_table.drop(columns="label")
    )


def test_anisotropic_2d_centroid_and_area_in_micrometres() -> None:
    labels = np.zeros((8, 10), dtype=np.uint16)
    labels[2:4, 4:7] = 5  # 6 pixels, centroid (2.5, 5.0) px
    labels[7, 0] = 9
    coords = {"y": 10.0 + 0.5 * np.arange(8), "x": -1.0 + 0.25 * np.arange(10)}
    table = measure(xr.DataArray(labels, dims=("y", "x"), coords=coords))
    row = table.set_index("label").loc[5]
    assert row["y"] == pytest.approx(10.0 + 0.5 * 2.5)
    assert row["x"] == pytest.approx(-1.0 + 0.25 * 5.0)
    assert row["area"] == pytest.approx(6 * 0.5 * 0.25)
    assert (row["bbox_min_y"], row["bbox_max_y"], row["bbox_min_x"], row["bbox_max_x"]) == (
        2,
        4,
        4,
        7,
    )


def test_anisotropic_3d_volume_with_explicit_pixel_size() -> None:
    labels = np.zeros((4, 6, 6), dtype=np.int64)
    labels[1:3, 0:2, 3:6] = 1  # 12 voxels, centroid (1.5, 0.5, 4.0) px
    chunked = da.from_array(labels, chunks=(1, 4, 4))
    pixel_size = {"z": 2.0, "y": 0.3, "x": 0.2}
    table = measure(chunked, pixel_size=pixel_size, translation={"z": 5.0}).compute()
    assert table[["z", "y", "x"]].to_numpy()[0].tolist() == pytest.approx([8.0, 0.15, 0.8])
    assert table["volume"].item() == pytest.approx(12 * 2.0 * 0.3 * 0.2)
    assert table["n_pixels"].item() == 12


def test_same_label_in_two_frames_gives_two_rows() -> None:
    labels = np.zeros((2, 3, 9, 9), dtype=np.uint32)
    labels[0, 0, 0:2, 0:2] = 4
    labels[1, 2, 5:9, 3:6] = 4
    image = np.stack([np.full((3, 9, 9), 1.0), np.full((3, 9, 9), 3.0)])[:, None]
    image = np.repeat(image, 2, axis=1)  # (t, c, z, y, x) with 2 channels
    dask_table = measure(
        da.from_array(labels, chunks=(2, 2, 4, 4)), image, channel_names=["dna", "gfp"]
    ).compute()
    numpy_table = measure(labels, image, channel_names=["dna", "gfp"])
    pd.testing.assert_frame_equal(dask_table, numpy_table)
    assert numpy_table[["t", "label", "n_pixels"]].to_numpy().tolist() == [[0, 4, 4], [1, 4, 12]]
    assert numpy_table["intensity_mean_gfp"].tolist() == [1.0, 3.0]
    assert numpy_table["bbox_min_z"].tolist() == [0, 2]


def test_xarray_channel_names_and_time_dims() -> None:
    labels = np.zeros((2, 5, 5), dtype=np.int32)
    labels[:, 1:3, 1:3] = 1
    image = np.ones((2, 2, 5, 5))
    image[:, 1] = 7.0
    result = measure(
        xr.DataArray(da.from_array(labels, chunks=(1, 3, 3)), dims=("t", "y", "x")),
        xr.DataArray(image, dims=("t", "c", "y", "x"), coords={"c": ["dna", "gfp"]}),
    ).compute()
    assert result["t"].tolist() == [0, 1]
    assert result["intensity_mean_gfp"].tolist() == [7.0, 7.0]
    assert "area" in result


def merge_in_groups(partials: list[pd.DataFrame], groups: list[list[int]]) -> pd.DataFrame:
    """Merge partials group by group, then merge the group results."""
    return merge_statistics([merge_statistics([partials[i] for i in group]) for group in groups])


def block_partials(labels: np.ndarray, image: np.ndarray, size: int) -> list[pd.DataFrame]:
    """Partial statistics of every ``size`` x ``size`` block, by hand, in row-major order."""
    return [
        block_statistics(
            labels[y : y + size, x : x + size],
            image[:, y : y + size, x : x + size],
            offset=(y, x),
        )
        for y in range(0, labels.shape[0], size)
        for x in range(0, labels.shape[1], size)
    ]


def test_merge_is_associative_and_commutative() -> None:
    labels = blob_labels((40, 40), seed=9)
    partials = block_partials(labels, integer_image(2, (40, 40), seed=10), size=13)
    assert len(partials) == 16
    flat = merge_statistics(partials)
    shuffled = np.random.default_rng(0).permutation(16).tolist()
    for groups in ([[0, 1, 2], list(range(3, 16))], [shuffled[:3], shuffled[3:5], shuffled[5:]]):
        pd.testing.assert_frame_equal(merge_in_groups(partials, groups), flat)
    pd.testing.assert_frame_equal(merge_statistics(partials[::-1]), flat)
    whole = block_statistics(labels, integer_image(2, (40, 40), seed=10), offset=(0, 0))
    pd.testing.assert_frame_equal(flat, whole)


def test_tree_reduce_matches_flat_merge_and_keeps_empty_blocks() -> None:
    labels = blob_labels((30, 30), seed=11)
    labels[:10] = 0  # blocks with no labels give empty partials
    partials = block_partials(labels, integer_image(2, (30, 30), seed=12), size=10)
    assert partials[0].empty
    reduced = tree_reduce(partials, merge_statistics, split_every=2).compute()
    pd.testing.assert_frame_equal(reduced, merge_statistics(partials))


def test_empty_labels_give_empty_table_with_schema() -> None:
    table = measure(np.zeros((6, 6), dtype=np.int32), np.ones((3, 6, 6)))
    assert table.empty
    assert table["label"].dtype == np.int64
    assert "intensity_max_2" in table.columns
    assert finalize_statistics(merge_statistics([]), spatial_dims="yx").empty


def test_mismatched_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="does not match"):
        measure(np.zeros((6, 6), dtype=np.int32), np.ones((2, 6, 5)))
    with pytest.raises(ValueError, match="2 channel names given for 3 channels"):
        measure(np.ones((6, 6), dtype=np.int32), np.ones((3, 6, 6)), channel_names=["a", "b"])
    with pytest.raises(ValueError, match="integer"):
        measure(np.ones((6, 6)))


def test_plain_labels_take_their_dims_and_scale_from_an_xarray_image() -> None:
    """``measure(segment(fov.data.sel(c=...)), fov.data)``: the labels come back as a plain
    array, and the image's dims (t, c, y, x) and coordinates describe them."""
    labels = np.zeros((2, 6, 8), np.int32)
    labels[:, 1:3, 2:5] = 4
    values = np.arange(2 * 2 * 6 * 8, dtype=float).reshape(2, 2, 6, 8)
    image = xr.DataArray(
        values,
        dims=("t", "c", "y", "x"),
        coords={"c": ["dna", "ktr"], "y": 10 + 0.5 * np.arange(6), "x": 0.25 * np.arange(8)},
    )
    implicit = pipeline.measure(labels, image)
    explicit = pipeline.measure(
        labels,
        values,
        dims="tyx",
        pixel_size={"y": 0.5, "x": 0.25},
        translation={"y": 10.0, "x": 0.0},
        channel_names=["dna", "ktr"],
    )
    pd.testing.assert_frame_equal(implicit, explicit)
    assert implicit["area"].tolist() == [6 * 0.5 * 0.25] * 2
