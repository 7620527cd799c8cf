"""OME-Zarr reading (0.4 and 0.5, also as written by ome-zarr-py) and writing (0.5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.writer import write_image as ozp_write_image
from ome_zarr.writer import write_plate_metadata as ozp_write_plate_metadata
from ome_zarr.writer import write_well_metadata as ozp_write_well_metadata

from pipeline.errors import CorruptChunkError, PipelineInputError
from pipeline.io.omezarr import (
    create_root,
    open_image,
    open_labels,
    open_plate,
    write_image,
    write_labels,
    write_plate_metadata,
    write_well,
)

VALIDATOR = Path(sys.executable).with_name("ome-zarr-models")
RNG = np.random.default_rng(42)


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VALIDATOR), "validate", str(path)], capture_output=True, text=True, check=False
    )


def _ozp_channel(label: str) -> dict:
    return {
        "label": label,
        "color": "FFFFFF",
        "window": {"start": 0, "end": 100, "min": 0, "max": 65535},
    }


def _ozp_image(group: zarr.Group, image: np.ndarray, fmt) -> None:
    """Write a cyx image with ome-zarr-py: pixel size y=0.5, x=0.25, two levels."""
    ozp_write_image(
        image,
        group,
        axes="cyx",
        fmt=fmt,
        scale_factors=[2],
        scale={"y": 0.5, "x": 0.25},
        axes_units={"y": "micrometer", "x": "micrometer"},
        omero={"channels": [_ozp_channel("DAPI"), _ozp_channel("GFP")]},
        storage_options={"chunks": (1, 16, 16)},
    )


def _block_mean_2x2(image: np.ndarray) -> np.ndarray:
    """Hand-written 2x2 mean over the last two axes of an even-sized array, rounded."""
    *lead, ny, nx = image.shape
    blocks = image.reshape(*lead, ny // 2, 2, nx // 2, 2).astype(float)
    return np.round(blocks.mean(axis=(-1, -3))).astype(image.dtype)


# --------------------------------------------------------------------------------------------
# Writing and reading back
# --------------------------------------------------------------------------------------------


def test_written_image_reads_back_with_levels_coords_and_chunks(tmp_path):
    image = RNG.integers(0, 4000, size=(2, 2, 3, 64, 48), dtype=np.uint16)
    root = create_root(tmp_path / "img.zarr")
    write_image(
        root,
        "",
        image,
        "tczyx",
        {"t": 30.0, "z": 2.0, "y": 0.5, "x": 0.25},
        translation={"y": 10.0, "x": -4.0},
        channel_names=["DAPI", "GFP"],
        n_levels=3,
        chunks={"z": 2, "y": 32, "x": 16},
    )
    assert _validate(tmp_path / "img.zarr").returncode == 0

    plate = open_plate(tmp_path / "img.zarr")
    assert not plate.is_plate and plate.version == "0.5" and plate.rows == ()
    (field,) = plate.fields
    assert field.path == "" and field.row is None and field.well is None
    data = field.data
    assert data.dims == ("t", "c", "z", "y", "x")
    np.testing.assert_array_equal(data.values, image)
    assert field.channel_names == ("DAPI", "GFP")
    assert list(data.coords["c"].values) == ["DAPI", "GFP"]
    np.testing.assert_allclose(data.coords["t"], [0.0, 30.0])
    np.testing.assert_allclose(data.coords["z"], [0.0, 2.0, 4.0])
    np.testing.assert_allclose(data.coords["y"], 10.0 + 0.5 * np.arange(64))
    np.testing.assert_allclose(data.coords["x"], -4.0 + 0.25 * np.arange(48))
    assert data.attrs["units"]["x"] == "micrometer" and data.attrs["units"]["t"] == "second"
    assert field.pixel_size == {"z": 2.0, "y": 0.5, "x": 0.25}
    assert data.chunks == ((1, 1), (1, 1), (2, 1), (32, 32), (16, 16, 16))

    assert [level.shape for level in field.levels] == [
        (2, 2, 3, 64, 48),
        (2, 2, 3, 32, 24),
        (2, 2, 3, 16, 12),
    ]
    assert [level.scale["y"] for level in field.levels] == [0.5, 1.0, 2.0]
    assert [level.scale["x"] for level in field.levels] == [0.25, 0.5, 1.0]
    assert all(level.scale["z"] == 2.0 for level in field.levels)
    assert all(level.translation["y"] == 10.0 for level in field.levels)
    level1 = zarr.open_array(tmp_path / "img.zarr", path="1", mode="r")[:]
    np.testing.assert_array_equal(level1, _block_mean_2x2(image))
    level2 = zarr.open_array(tmp_path / "img.zarr", path="2", mode="r")[:]
    np.testing.assert_array_equal(level2, _block_mean_2x2(level1))


def test_odd_sizes_round_up_and_average_only_present_pixels(tmp_path):
    image = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    root = create_root(tmp_path / "odd.zarr")
    write_image(root, "", image, "yx", {"y": 1.0, "x": 1.0}, n_levels=2)
    level1 = zarr.open_array(tmp_path / "odd.zarr", path="1", mode="r")[:]
    # blocks: rows (0,1),(2,3),(4); columns (0,1),(2)
    expected = np.array(
        [
            [np.mean([0, 1, 3, 4]), np.mean([2, 5])],
            [np.mean([6, 7, 9, 10]), np.mean([8, 11])],
            [np.mean([12, 13]), 14.0],
        ],
        dtype=np.float32,
    )
    np.testing.assert_allclose(level1, expected)


def test_level_shapes_rounded_down_and_given_levels(tmp_path):
    image = RNG.integers(0, 200, size=(1, 10, 7), dtype=np.uint8)
    root = create_root(tmp_path / "ls.zarr")
    write_image(root, "a", image, "cyx", {"y": 1.0, "x": 1.0}, level_shapes=[(1, 10, 7), (1, 5, 3)])
    level1 = zarr.open_array(tmp_path / "ls.zarr", path="a/1", mode="r")[:]
    np.testing.assert_array_equal(level1, _block_mean_2x2(image[:, :, :6]))

    levels = [image, image[:, ::2, ::2]]
    write_image(root, "b", levels, "cyx", {"y": 0.5, "x": 0.5})
    field = open_image(tmp_path / "ls.zarr", image_path="b")
    assert [level.shape for level in field.levels] == [(1, 10, 7), (1, 5, 4)]
    assert field.levels[1].scale == {"c": 1.0, "y": 1.0, "x": 1.0}
    stored = zarr.open_array(tmp_path / "ls.zarr", path="b/1", mode="r")[:]
    np.testing.assert_array_equal(stored, image[:, ::2, ::2])
    with pytest.raises(ValueError, match="level_shapes"):
        write_image(root, "c", levels, "cyx", {"y": 1.0, "x": 1.0}, level_shapes=[(1, 10, 7)])


def test_compute_false_returns_store_tasks_and_rechunks(tmp_path):
    image = da.from_array(RNG.integers(1, 50, size=(40, 40), dtype=np.uint16), chunks=(13, 7))
    root = create_root(tmp_path / "lazy.zarr")
    group, tasks = write_image(
        root,
        "",
        image,
        "yx",
        {"y": 1.0, "x": 1.0},
        n_levels=2,
        chunks={"y": 16, "x": 16},
        compute=False,
    )
    assert isinstance(group, zarr.Group) and tasks
    assert not zarr.open_array(tmp_path / "lazy.zarr", path="0", mode="r")[:].any()
    dask.compute(*tasks)
    assert zarr.open_array(tmp_path / "lazy.zarr", path="1", mode="r").shape == (20, 20)
    stored = open_image(tmp_path / "lazy.zarr")
    np.testing.assert_array_equal(stored.data.values, image.compute())
    assert stored.data.chunks == ((16, 16, 8), (16, 16, 8))


def test_writes_lazy_xarray_from_a_read_image(tmp_path):
    image = RNG.integers(0, 100, size=(3, 20, 20), dtype=np.int16)
    write_image(create_root(tmp_path / "in.zarr"), "", image, "zyx", {"z": 3.0, "y": 1.0, "x": 1.0})
    source = open_image(tmp_path / "in.zarr")
    write_image(
        create_root(tmp_path / "copy.zarr"),
        "",
        source.data,
        "zyx",
        source.pixel_size,
        level_shapes=[(3, 20, 20), (3, 10, 10)],
    )
    copy = open_image(tmp_path / "copy.zarr")
    np.testing.assert_array_equal(copy.data.values, image)
    assert copy.levels[1].scale == {"z": 3.0, "y": 2.0, "x": 2.0}


def test_create_root_refuses_existing_output(tmp_path):
    create_root(tmp_path / "out.zarr")
    with pytest.raises(PipelineInputError, match="output already exists"):
        create_root(tmp_path / "out.zarr")
    assert isinstance(create_root(tmp_path / "out.zarr", overwrite=True), zarr.Group)


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 48), (101, 75)])
def test_label_levels_equal_image_levels(tmp_path, shape):
    image = RNG.integers(0, 100, size=(2, *shape), dtype=np.uint16)
    labels = RNG.integers(0, 30, size=shape, dtype=np.uint32)
    root = create_root(tmp_path / "lab.zarr")
    group = write_image(
        root, "", image, "cyx", {"y": 0.65, "x": 0.65}, n_levels=3, chunks={"y": 32, "x": 32}
    )
    label_group = write_labels(group, "cells", labels)

    image_field = open_image(tmp_path / "lab.zarr")
    label_field = open_labels(tmp_path / "lab.zarr", name="cells")
    assert label_field.data.dims == ("y", "x")
    np.testing.assert_array_equal(label_field.data.values, labels)
    with pytest.raises(PipelineInputError, match="no label image labels/nuclei") as error:
        open_labels(tmp_path / "lab.zarr", name="nuclei")
    assert error.value.path == str(tmp_path / "lab.zarr")
    assert [lv.shape for lv in label_field.levels] == [lv.shape[1:] for lv in image_field.levels]
    for image_level, label_level in zip(image_field.levels, label_field.levels, strict=True):
        assert label_level.scale == {"y": image_level.scale["y"], "x": image_level.scale["x"]}
    for index in range(3):
        stored = label_group[str(index)][:]
        step = 2**index  # nearest sample at floor(i * 2**k) is a stride-2**k slice
        np.testing.assert_array_equal(stored, labels[::step, ::step])
        assert label_group[str(index)].chunks == group[str(index)].chunks[1:]
    labels_attrs = group["labels"].attrs["ome"]
    assert labels_attrs == {"version": "0.5", "labels": ["cells"]}
    for path in ["", "labels", "labels/cells"]:
        result = _validate(tmp_path / "lab.zarr" / path)
        assert result.returncode == 0, result.stdout


def test_write_labels_rejects_wrong_shape_and_float(tmp_path):
    root = create_root(tmp_path / "bad.zarr")
    group = write_image(root, "", np.zeros((8, 8), np.uint8), "yx", {"y": 1.0, "x": 1.0})
    with pytest.raises(ValueError, match="shape"):
        write_labels(group, "cells", np.zeros((8, 9), np.uint32))
    with pytest.raises(ValueError, match="integer"):
        write_labels(group, "cells", np.zeros((8, 8), np.float32))


# --------------------------------------------------------------------------------------------
# Plates
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_written_plate_validates_and_reads_back(tmp_path):
    path = tmp_path / "plate.zarr"
    root = create_root(path)
    wells = [("A", "1"), ("B", "3")]
    images = {}
    for row, column in wells:
        well = write_well(root, row, column, ["0", "1"])
        for field in ("0", "1"):
            image = RNG.integers(0, 1000, size=(2, 1, 21, 17), dtype=np.uint16)
            images[f"{row}/{column}/{field}"] = image
            group = write_image(
                well,
                field,
                image,
                "tcyx",
                {"t": 60.0, "y": 0.5, "x": 0.5},
                channel_names=["nuclei"],
                n_levels=2,
            )
            write_labels(group, "cells", (image[:, 0] > 500).astype(np.uint32))
    write_plate_metadata(
        root, name="demo", rows=["A", "B"], columns=["1", "2", "3"], wells=wells, field_count=2
    )

    for node in ["", "B/3", "B/3/1", "B/3/1/labels", "B/3/1/labels/cells"]:
        result = _validate(path / node)
        assert result.returncode == 0, f"{node}: {result.stdout}"

    plate = open_plate(path)
    assert plate.is_plate and plate.version == "0.5" and plate.name == "demo"
    assert plate.rows == ("A", "B") and plate.columns == ("1", "2", "3")
    assert [field.path for field in plate.fields] == ["A/1/0", "A/1/1", "B/3/0", "B/3/1"]
    field = plate.fields[3]
    assert (field.row, field.column, field.field, field.well) == ("B", "3", "1", "B/3")
    assert field.dataset_path == str(path)
    assert field.channel_names == ("nuclei",)
    assert field.pixel_size == {"y": 0.5, "x": 0.5}
    np.testing.assert_array_equal(field.data.values, images["B/3/1"])


@pytest.mark.parametrize(("fmt", "zarr_format"), [(FormatV04(), 2), (FormatV05(), 3)])
def test_reads_ome_zarr_py_plate(tmp_path, fmt, zarr_format):
    path = tmp_path / "ozp_plate.zarr"
    root = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    image = RNG.integers(0, 1000, size=(2, 40, 30), dtype=np.uint16)
    ozp_write_plate_metadata(
        root, ["A", "B"], ["1", "2"], ["B/2", "A/1"], fmt=fmt, name="ozp", field_count=2
    )
    for well_path in ["A/1", "B/2"]:
        well = root.require_group(well_path)
        ozp_write_well_metadata(well, ["0", "1"], fmt=fmt)
        for field in ("0", "1"):
            _ozp_image(well.require_group(field), image, fmt)

    plate = open_plate(path)
    assert plate.version == fmt.version and plate.is_plate and plate.name == "ozp"
    assert plate.rows == ("A", "B") and plate.columns == ("1", "2")
    assert [field.path for field in plate.fields] == ["A/1/0", "A/1/1", "B/2/0", "B/2/1"]
    field = plate.fields[2]
    assert field.well == "B/2" and field.field == "0"
    assert field.data.dims == ("c", "y", "x")
    assert field.channel_names == ("DAPI", "GFP")
    assert field.pixel_size == {"y": 0.5, "x": 0.25}
    assert field.levels[1].scale == {"c": 1.0, "y": 1.0, "x": 0.5}
    assert field.levels[1].shape == (2, 20, 15)
    np.testing.assert_allclose(field.data.coords["x"][:3], [0.0, 0.25, 0.5])
    np.testing.assert_array_equal(field.data.values, image)


def test_reads_ome_zarr_py_v04_image(tmp_path):
    path = tmp_path / "ozp_image.zarr"
    image = RNG.integers(0, 1000, size=(2, 40, 30), dtype=np.uint16)
    _ozp_image(zarr.open_group(path, mode="w", zarr_format=2), image, FormatV04())

    plate = open_plate(path)
    assert not plate.is_plate and plate.version == "0.4"
    field = plate.fields[0]
    assert field.data.dims == ("c", "y", "x")
    assert field.channel_names == ("DAPI", "GFP")
    assert field.pixel_size == {"y": 0.5, "x": 0.25}
    assert field.data.attrs["units"] == {"y": "micrometer", "x": "micrometer"}
    assert field.data.chunks == ((1, 1), (16, 16, 8), (16, 14))
    np.testing.assert_array_equal(field.data.values, image)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(PipelineInputError, match="path does not exist") as error:
        open_plate(tmp_path / "nope.zarr")
    assert error.value.path == str(tmp_path / "nope.zarr")


def test_plain_directory(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(PipelineInputError, match="not a zarr group"):
        open_plate(tmp_path / "plain")


def test_zarr_group_without_ome_metadata(tmp_path):
    zarr.open_group(tmp_path / "bare.zarr", mode="w").attrs["something"] = 1
    with pytest.raises(PipelineInputError, match="not an OME-Zarr image or plate"):
        open_plate(tmp_path / "bare.zarr")


ONE_SCALE = {"type": "scale", "scale": [1.0, 1.0, 1.0]}


def _fake_image(path: Path, axes: list[str], dtype: str) -> None:
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_array("0", shape=(4, 4, 2), chunks=(4, 4, 2), dtype=dtype, dimension_names=axes)
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [{"name": name} for name in axes],
                "datasets": [{"path": "0", "coordinateTransformations": [ONE_SCALE]}],
            }
        ],
    }


def test_unsupported_axes(tmp_path):
    _fake_image(tmp_path / "yxc.zarr", ["y", "x", "c"], "uint8")
    with pytest.raises(PipelineInputError, match=r"unsupported axes \['y', 'x', 'c'\]"):
        open_plate(tmp_path / "yxc.zarr")


def test_unsupported_dtype(tmp_path):
    _fake_image(tmp_path / "complex.zarr", ["c", "y", "x"], "complex64")
    with pytest.raises(PipelineInputError, match="unsupported dtype complex64"):
        open_plate(tmp_path / "complex.zarr")


def test_missing_well(tmp_path):
    root = create_root(tmp_path / "plate.zarr")
    write_plate_metadata(
        root, name="p", rows=["A"], columns=["1"], wells=[("A", "1")], field_count=1
    )
    with pytest.raises(PipelineInputError, match="well 'A/1' listed in the metadata is missing"):
        open_plate(tmp_path / "plate.zarr")


def _one_field_plate(path: Path, image: np.ndarray) -> None:
    """A plate with one well (B/3) and one field of ``image`` (t, c, y, x) in 4x4 chunks."""
    root = create_root(path)
    well = write_well(root, "B", "3", ["0"])
    write_image(well, "0", image, "tcyx", {"y": 1.0, "x": 1.0}, chunks={"y": 4, "x": 4})
    write_plate_metadata(
        root, name="p", rows=["B"], columns=["3"], wells=[("B", "3")], field_count=1
    )


def test_corrupt_chunk_v3(tmp_path):
    path = tmp_path / "plate.zarr"
    image = RNG.integers(0, 1000, size=(1, 2, 8, 8), dtype=np.uint16)
    _one_field_plate(path, image)
    chunk_file = path / "B/3/0/0/c/0/1/1/0"
    assert chunk_file.is_file()
    chunk_file.write_bytes(b"this is not zstd data")

    data = open_plate(path).fields[0].data
    np.testing.assert_array_equal(data[:, 0].values, image[:, 0])  # other chunks still read
    with pytest.raises(CorruptChunkError) as error:
        data.values  # noqa: B018
    message = str(error.value)
    assert "cannot read chunk c/0/1/1/0" in message
    assert error.value.path == os.path.join(str(path), "B/3/0/0")


def test_corrupt_chunk_v2(tmp_path):
    path = tmp_path / "v04.zarr"
    image = RNG.integers(0, 1000, size=(2, 40, 30), dtype=np.uint16)
    _ozp_image(zarr.open_group(path, mode="w", zarr_format=2), image, FormatV04())
    chunk_file = path / "s0/1/2/0"
    assert chunk_file.is_file()
    chunk_file.write_bytes(b"garbage")
    with pytest.raises(CorruptChunkError, match="cannot read chunk 1/2/0") as error:
        open_plate(path).fields[0].data.values  # noqa: B018
    assert error.value.path == os.path.join(str(path), "s0")


def test_missing_chunk_fails_naming_it_unless_asked_to_fill(tmp_path):
    path = tmp_path / "plate.zarr"
    image = RNG.integers(1, 1000, size=(1, 1, 8, 8), dtype=np.uint16)
    _one_field_plate(path, image)
    (path / "B/3/0/0/c/0/0/1/0").unlink()

    with pytest.raises(CorruptChunkError, match="chunk c/0/0/1/0 is missing") as error:
        open_plate(path).fields[0].data.values  # noqa: B018
    assert error.value.path == os.path.join(str(path), "B/3/0/0")
    with pytest.raises(CorruptChunkError, match="chunk c/0/0/1/0 is missing"):
        open_image(path, image_path="B/3/0").data.values  # noqa: B018

    filled = open_plate(path, missing_chunks="fill").fields[0].data.values
    expected = image.copy()
    expected[..., 4:, :4] = 0
    np.testing.assert_array_equal(filled, expected)


def _drop_zero_chunks(array_folder, image: np.ndarray, size: int = 4) -> list[str]:
    """Delete the stored chunks of ``image`` (t, c, y, x; ``size`` px square chunks) that hold
    only zeros, as zarr-python does by default; their storage keys."""
    dropped = []
    t, c, y, x = image.shape
    for cell in np.ndindex(t, c, y // size, x // size):
        block = image[cell[0], cell[1]][
            cell[2] * size : (cell[2] + 1) * size, cell[3] * size : (cell[3] + 1) * size
        ]
        if not block.any():
            key = "c/" + "/".join(map(str, cell))
            (array_folder / key).unlink()
            dropped.append(key)
    return dropped


def test_chunks_skipped_for_being_empty_read_as_zeros_and_lost_ones_still_fail(tmp_path):
    path = tmp_path / "plate.zarr"
    image = RNG.integers(1, 1000, size=(1, 1, 20, 16), dtype=np.uint16)
    image[..., :13, :9] = 0  # a 3 x 2 chunk empty region at a corner (the padding of a mosaic)
    image[..., 14:, 10:] = 0  # and a dark corner, one chunk of which is empty
    _one_field_plate(path, image)
    array = path / "B/3/0/0"
    dropped = _drop_zero_chunks(array, image)
    assert len(dropped) == 7

    reader = open_plate(path).fields[0].levels[0].reader
    np.testing.assert_array_equal(open_plate(path).fields[0].data.values, image)
    assert sorted(reader.filled_chunks()) == sorted(dropped)
    with pytest.raises(CorruptChunkError, match="missing"):  # strict: any absent chunk fails
        open_plate(path, missing_chunks="error").fields[0].data.values  # noqa: B018
    assert open_plate(path, missing_chunks="error").fields[0].levels[0].reader.filled_chunks() == []

    (array / "c/0/0/1/3").unlink()  # a chunk of signal lost
    with pytest.raises(CorruptChunkError, match=r"chunk c/0/0/1/3 is missing inside the image"):
        open_plate(path).fields[0].data.values  # noqa: B018
    reader = open_plate(path).fields[0].levels[0].reader
    assert sorted(reader.filled_chunks()) == sorted(dropped)  # the empty ones still are
    # a lost chunk beside an empty region makes the region suspect: it fails as well
    (array / "c/0/0/3/0").unlink()
    with pytest.raises(CorruptChunkError, match="missing inside the image"):
        open_plate(path).fields[0].data[..., :4, :4].values  # noqa: B018


def test_an_empty_region_that_ends_on_a_chunk_border_next_to_signal_is_not_guessed(tmp_path):
    """Zeros ending exactly where signal starts, on a chunk border: indistinguishable from
    lost files by the pixels around them, so they fail unless the user says fill."""
    path = tmp_path / "plate.zarr"
    image = RNG.integers(1, 1000, size=(1, 1, 8, 8), dtype=np.uint16)
    image[..., :4, :] = 0
    _one_field_plate(path, image)
    _drop_zero_chunks(path / "B/3/0/0", image)
    with pytest.raises(CorruptChunkError, match="missing inside the image"):
        open_plate(path).fields[0].data.values  # noqa: B018
    filled = open_plate(path, missing_chunks="fill").fields[0]
    np.testing.assert_array_equal(filled.data.values, image)
    assert filled.levels[0].reader.filled_chunks() == ["c/0/0/0/0", "c/0/0/0/1"]


def test_an_image_with_no_chunk_stored_is_not_taken_for_an_empty_one(tmp_path):
    path = tmp_path / "plate.zarr"
    image = np.zeros((1, 1, 8, 8), dtype=np.uint16)
    _one_field_plate(path, image)
    _drop_zero_chunks(path / "B/3/0/0", image)
    with pytest.raises(CorruptChunkError, match="missing inside the image"):
        open_plate(path).fields[0].data.values  # noqa: B018


def test_non_finite_pixels_fail_naming_the_chunk_unless_asked_to_read_them_as_zero(tmp_path):
    path = tmp_path / "plate.zarr"
    image = RNG.random((1, 1, 8, 8)).astype(np.float32) + 1
    image[0, 0, 5, 1] = np.nan  # chunk c/0/0/1/0
    image[0, 0, 6, 2] = -np.inf
    _one_field_plate(path, image)

    data = open_plate(path).fields[0].data
    np.testing.assert_array_equal(data[..., :4, :].values, image[..., :4, :])  # clean chunks
    with pytest.raises(PipelineInputError, match=r"2 NaN or infinite pixel\(s\) in chunk c/0/0/1"):
        data.values  # noqa: B018
    with pytest.raises(PipelineInputError, match=r"input\.non_finite: zero") as error:
        open_image(path, image_path="B/3/0").data.values  # noqa: B018
    assert error.value.path == os.path.join(str(path), "B/3/0/0")

    zeroed = open_plate(path, non_finite="zero").fields[0].data.values
    np.testing.assert_array_equal(zeroed, np.nan_to_num(image, nan=0, neginf=0))


def test_written_images_store_empty_chunks(tmp_path):
    # zarr-python skips chunks equal to the fill value unless told otherwise; the product's
    # outputs keep them, so that its own outputs read back under missing_chunks="error".
    image = np.zeros((1, 8, 8), dtype=np.uint16)
    image[0, :4, :4] = 7
    root = create_root(tmp_path / "out.zarr")
    write_image(root, "img", image, "cyx", {"y": 1.0, "x": 1.0}, chunks={"y": 4, "x": 4})
    chunk_files = [p for p in (tmp_path / "out.zarr/img/0/c").rglob("*") if p.is_file()]
    assert len(chunk_files) == 4
    stored = open_image(tmp_path / "out.zarr", image_path="img").data.values
    np.testing.assert_array_equal(stored, image)


def test_lengths_and_times_in_other_units_are_read_in_micrometres_and_seconds(tmp_path):
    """An image whose axes say nanometer and minute (scale 650 nm, 5 min, translation 1300 nm)
    reads as 0.65 um pixels, 300 s frames and a 1.3 um offset, in micrometer and second."""
    root = create_root(tmp_path / "nm.zarr")
    write_image(
        root,
        "",
        np.zeros((2, 1, 8, 8), np.uint16),
        "tcyx",
        {"t": 5.0, "y": 650.0, "x": 650.0},
        translation={"y": 1300.0, "x": 0.0},
    )
    group = zarr.open_group(tmp_path / "nm.zarr", mode="r+")
    ome = group.attrs["ome"]
    for axis in ome["multiscales"][0]["axes"]:
        axis["unit"] = {"t": "minute", "y": "nanometer", "x": "nanometer"}.get(axis["name"])
        if axis["unit"] is None:
            del axis["unit"]
    group.attrs["ome"] = ome
    image = open_image(tmp_path / "nm.zarr")
    assert image.pixel_size == pytest.approx({"y": 0.65, "x": 0.65})
    assert image.levels[0].scale["t"] == pytest.approx(300.0)
    assert image.levels[0].translation["y"] == pytest.approx(1.3)
    assert image.data.attrs["units"] == {"t": "second", "y": "micrometer", "x": "micrometer"}
    np.testing.assert_allclose(image.data["y"].values[:2], [1.3, 1.95])


@pytest.mark.parametrize(
    ("shape", "written", "refused"),
    [
        ((1, 1, 404, 404), 110, False),  # 10,201 chunks, over 1 % stored
        ((1, 1, 404, 404), 50, True),  # 10,201 chunks, under 1 % stored
        ((1, 1, 40, 40), 1, False),  # 100 chunks: too few to be checked
    ],
)
def test_arrays_declaring_far_more_than_they_store_are_refused(tmp_path, shape, written, refused):
    from pipeline.io.omezarr import ChunkReader

    array = zarr.create_array(
        tmp_path / "a.zarr", shape=shape, chunks=(1, 1, 4, 4), dtype="uint8", fill_value=0
    )
    for k in range(written):  # chunks along the first rows of the grid
        row, column = divmod(k, shape[-1] // 4)
        array[0, 0, 4 * row : 4 * row + 4, 4 * column : 4 * column + 4] = 1
    reader = ChunkReader(str(tmp_path / "a.zarr"), "")
    if refused:
        with pytest.raises(PipelineInputError, match=f"stores only {written} of them"):
            reader.check_extent()
    else:
        reader.check_extent()


def test_sharded_images_and_labels_hold_the_same_pixels_in_fewer_files_for_every_reader(
    tmp_path,
):
    """shard_px=128 with 64 px chunks: a 2 x 200 x 200 image is 2 x 2 files a level instead of
    2 x 4 x 4 (level 0); the labels follow the image's shards; our reader, ome-zarr-py and ngio
    read back exactly what was written."""
    import ngio
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    rng = np.random.default_rng(3)
    image = rng.integers(0, 4000, (2, 200, 200), dtype=np.uint16)
    labels = rng.integers(0, 50, (200, 200), dtype=np.uint32)
    written = {}
    for shard_px in (None, 128):
        path = tmp_path / f"shards-{shard_px}.zarr"
        group = write_image(
            create_root(path),
            "",
            image,
            "cyx",
            {"y": 0.5, "x": 0.5},
            n_levels=2,
            chunks={"y": 64, "x": 64},
            shard_px=shard_px,
        )
        write_labels(group, "cells", labels)
        written[shard_px] = path
    plain, sharded = written[None], written[128]
    array = zarr.open_array(sharded / "0", mode="r")
    assert (array.chunks, array.shards) == ((1, 64, 64), (1, 128, 128))
    assert zarr.open_array(sharded / "labels/cells/0", mode="r").shards == (128, 128)
    assert zarr.open_array(plain / "0", mode="r").shards is None
    files = {
        key: sum(1 for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")
        for key, path in written.items()
    }
    assert files == {None: 2 * 16 + 2 * 4 + 16 + 4, 128: 2 * 4 + 2 * 1 + 4 + 1}
    np.testing.assert_array_equal(open_image(sharded).data.values, image)
    np.testing.assert_array_equal(open_labels(sharded, name="cells").data.values, labels)
    nodes = list(Reader(parse_url(str(sharded)))())
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), image)
    container = ngio.open_ome_zarr_container(sharded)
    np.testing.assert_array_equal(np.asarray(container.get_label("cells").get_array()), labels)
    assert _validate(sharded).returncode == 0
