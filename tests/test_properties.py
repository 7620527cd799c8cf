"""Property-based tests (hypothesis): the readers give back what was written, whatever the
shape, dtype, chunking and axes; absent chunks are read back or named, never guessed wrong;
and any configuration file either loads or is refused in one line, never with a traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.config import RunConfig, load_config
from pipeline.errors import CorruptChunkError, PipelineInputError
from pipeline.io.omezarr import (
    create_root,
    open_plate,
    write_image,
    write_plate_metadata,
    write_well,
)

SIZES = {"t": (1, 3), "c": (1, 3), "z": (1, 4), "y": (1, 20), "x": (1, 20)}
DTYPES = ("uint8", "uint16", "int16", "int32", "float32", "float64")
PROPERTIES = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def images(draw) -> tuple[np.ndarray, str, dict[str, int]]:
    """An image: dims a subset of tczyx with y and x, any supported dtype, any chunking."""
    dims = "".join(d for d in "tcz" if draw(st.booleans())) + "yx"
    shape = tuple(draw(st.integers(*SIZES[d])) for d in dims)
    chunks = {d: draw(st.integers(1, n)) for d, n in zip(dims, shape, strict=True)}
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype.kind == "f":
        values = rng.normal(100, 50, shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    zeroed = draw(st.floats(0, 1))  # part of the image black, as padding would be
    values[rng.random(shape) < zeroed] = 0
    return values, dims, chunks


def _one_field_plate(path: Path, image: np.ndarray, dims: str, chunks: dict[str, int]) -> Path:
    root = create_root(path)
    well = write_well(root, "A", "1", ["0"])
    write_image(well, "0", image, dims, {"y": 0.5, "x": 0.5}, chunks=chunks)
    write_plate_metadata(
        root, name="p", rows=["A"], columns=["1"], wells=[("A", "1")], field_count=1
    )
    return path


@PROPERTIES
@given(images())
def test_an_image_reads_back_as_written(case) -> None:
    image, dims, chunks = case
    with tempfile.TemporaryDirectory() as folder:
        plate = _one_field_plate(Path(folder) / "p.zarr", image, dims, chunks)
        field = open_plate(plate).fields[0]
        assert "".join(field.data.dims) == dims
        assert field.data.dtype == image.dtype
        np.testing.assert_array_equal(field.data.values, image)


@PROPERTIES
@given(images(), st.data())
def test_absent_chunks_read_as_zeros_or_fail_naming_one_never_as_something_else(case, data):
    """Whatever chunks are deleted: under ``fill`` the image reads back as written with
    exactly those chunks zero; under ``auto`` the same, every deleted chunk listed as filled,
    or the read fails naming one of the deleted chunks (nothing else is ever read as zero)."""
    image, dims, chunks = case
    with tempfile.TemporaryDirectory() as folder:
        plate = _one_field_plate(Path(folder) / "p.zarr", image, dims, chunks)
        array = plate / "A/1/0/0"
        files = sorted(p for p in (array / "c").rglob("*") if p.is_file())
        lost = data.draw(st.lists(st.sampled_from(files), unique=True, max_size=3))
        reader = open_plate(plate).fields[0].levels[0].reader
        grid = [range(-(-n // s)) for n, s in zip(reader.shape, reader.chunks, strict=True)]
        expected = image.copy()
        for cell in np.ndindex(*[len(r) for r in grid]):
            key = reader._metadata.encode_chunk_key(cell)
            if array / key in lost:
                region = tuple(
                    slice(i * s, (i + 1) * s) for i, s in zip(cell, reader.chunks, strict=True)
                )
                expected[region] = 0
        for path in lost:
            path.unlink()
        filled = open_plate(plate, missing_chunks="fill").fields[0]
        np.testing.assert_array_equal(filled.data.values, expected)
        automatic = open_plate(plate).fields[0]
        try:
            values = automatic.data.values
        except CorruptChunkError as error:
            assert "is missing inside the image" in error.problem
            assert any(f"chunk {p.relative_to(array).as_posix()} " in error.problem for p in lost)
        else:
            np.testing.assert_array_equal(values, expected)
            assert len(automatic.levels[0].reader.filled_chunks()) == len(lost)


CONFIG_KEYS = (
    "input",
    "segmentation",
    "tiling",
    "tracking",
    "measurement",
    "compute",
    "crops",
    "classification",
    "method",
    "channel",
    "missing_chunks",
    "non_finite",
    "convnet",
    "classical",
    "cells",
    "halo_um",
    "max_distance_um",
    "features",
    "ring_um",
    "model",
    "size_um",
)
CONFIG_WORDS = ("classical", "convnet", "auto", "fill", "zero", "error", "propagation", "nuclei")
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(CONFIG_WORDS)
    | st.text(max_size=8)
)
keys = st.sampled_from(CONFIG_KEYS) | st.text(min_size=1, max_size=8)
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=4),
    max_leaves=12,
)


@PROPERTIES
@given(documents)
@example({"\n": None})  # a key that is a line break (found by hypothesis)
def test_any_config_file_loads_or_is_refused_in_one_line(document) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.yaml"
        path.write_text(yaml.safe_dump(document))
        try:
            config = load_config(path)
        except PipelineInputError as error:
            assert "\n" not in str(error)
            assert error.path == str(path)
        else:
            assert isinstance(config, RunConfig)
            assert isinstance(config.digest(), str)


@pytest.mark.parametrize("text", ["{", "a: [1, 2", "\t- x", "key: value\n  bad indent: 1"])
def test_malformed_yaml_is_refused_in_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(PipelineInputError, match="config is not valid YAML"):
        load_config(path)
