"""Microscope files through bioio (issue 16): multi-scene OME-TIFF written by tifffile and by
bioio's own writer, a CZI written by Zeiss's libCZI (pylibCZIrw), each imported with its
calibration; one run end to end with the calibration in its tables."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from pipeline.cli import main
from pipeline.errors import InputWarning, PipelineInputError
from pipeline.io.importing import import_images
from pipeline.io.omezarr import open_image, open_plate
from pipeline.synthetic import simulate_field


def _write_positions(path: Path, seeds: tuple[int, ...]) -> list[np.ndarray]:
    """A multi-position OME-TIFF as tifffile writes it: one OME image per position, each a
    (t, c, y, x) movie of simulated nuclei, 0.5 um pixels, 5 minutes between frames."""
    movies = [simulate_field(n_frames=3, size=128, seed=seed).image for seed in seeds]
    with tifffile.TiffWriter(path, ome=True) as tif:
        for index, movie in enumerate(movies):
            tif.write(
                movie,
                metadata={
                    "axes": "TCYX",
                    "PhysicalSizeX": 0.5,
                    "PhysicalSizeY": 0.5,
                    "TimeIncrement": 5.0,
                    "TimeIncrementUnit": "min",
                    "Channel": {"Name": ["dna", "ktr"]},
                    "Name": f"position {index}",
                },
            )
    return movies


def _scale(group_path: Path) -> list[float]:
    attrs = zarr.open_group(group_path, mode="r").attrs["ome"]
    return attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]


def test_a_multi_position_ome_tiff_is_a_plate_of_one_field_per_position(tmp_path):
    movies = _write_positions(tmp_path / "positions.ome.tif", seeds=(1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # every step is calibrated
        import_images(tmp_path / "positions.ome.tif", tmp_path / "out.zarr")
    plate = open_plate(tmp_path / "out.zarr")
    assert [fov.path for fov in plate.fields] == ["A/1/0", "A/1/1"]
    for fov, movie in zip(plate.fields, movies, strict=True):
        assert fov.data.dims == ("t", "c", "y", "x")
        np.testing.assert_array_equal(fov.data.values, movie)
        assert list(fov.channel_names) == ["dna", "ktr"]
        assert _scale(tmp_path / "out.zarr" / fov.path) == [300.0, 1.0, 0.5, 0.5]


def test_an_ome_tiff_written_by_bioio_keeps_its_scenes_z_step_and_channel_names(tmp_path):
    from bioio_base.types import PhysicalPixelSizes
    from bioio_ome_tiff.writers import OmeTiffWriter

    rng = np.random.default_rng(0)
    stacks = [rng.integers(0, 4000, (1, 2, 3, 32, 48), dtype=np.uint16) for _ in range(3)]
    OmeTiffWriter.save(
        stacks,
        tmp_path / "stacks.ome.tiff",
        dim_order="TCZYX",
        channel_names=[["dapi", "gfp"]] * 3,
        image_name=["a", "b", "c"],
        physical_pixel_sizes=[PhysicalPixelSizes(2.0, 0.325, 0.325)] * 3,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # one frame: no interval is needed
        import_images(tmp_path / "stacks.ome.tiff", tmp_path / "out.zarr")
    plate = open_plate(tmp_path / "out.zarr")
    assert len(plate.fields) == 3
    for fov, stack in zip(plate.fields, stacks, strict=True):
        assert fov.data.dims == ("c", "z", "y", "x")
        np.testing.assert_array_equal(fov.data.values, stack[0])
        assert list(fov.channel_names) == ["dapi", "gfp"]
        assert _scale(tmp_path / "out.zarr" / fov.path) == [1.0, 2.0, 0.325, 0.325]


def test_a_czi_written_by_zeiss_libczi_imports_as_one_image_with_its_pixel_size(tmp_path):
    from pylibCZIrw import czi as pyczi

    rng = np.random.default_rng(1)
    planes = rng.integers(0, 4000, (3, 2, 64, 96), dtype=np.uint16)  # t, c, y, x
    with pyczi.create_czi(str(tmp_path / "movie.czi")) as writer:
        for t in range(3):
            for c in range(2):
                writer.write(planes[t, c], plane={"T": t, "C": c})
        writer.write_metadata(channel_names={0: "dna", 1: "ktr"}, scale_x=0.65e-6, scale_y=0.65e-6)
    code = main(
        [
            "import",
            str(tmp_path / "movie.czi"),
            "--out",
            str(tmp_path / "out.zarr"),
            "--time-step",
            "60",
        ]
    )
    assert code == 0
    image = open_image(tmp_path / "out.zarr")
    np.testing.assert_array_equal(image.data.values, planes)
    assert list(image.channel_names) == ["dna", "ktr"]
    assert _scale(tmp_path / "out.zarr") == [60.0, 1.0, 0.65, 0.65]


def test_the_import_shows_its_own_guesses_not_the_readers_warnings(tmp_path, capsys):
    from pylibCZIrw import czi as pyczi

    with pyczi.create_czi(str(tmp_path / "plane.czi")) as writer:
        writer.write(np.ones((16, 16), np.uint16), plane={"T": 0, "C": 0})
        writer.write(np.ones((16, 16), np.uint16), plane={"T": 1, "C": 0})
        writer.write_metadata(channel_names={0: "dna"}, scale_x=0.5e-6, scale_y=0.5e-6)
    assert main(["import", str(tmp_path / "plane.czi"), "--out", str(tmp_path / "o.zarr")]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: no t calibration in "), lines


def test_an_unreadable_microscope_file_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "broken.nd2").write_bytes(b"not an nd2 file" * 10)
    with pytest.raises(PipelineInputError, match="cannot read this file"):
        import_images(tmp_path / "broken.nd2", tmp_path / "out.zarr")
    assert main(["import", str(tmp_path / "broken.nd2"), "--out", str(tmp_path / "o.zarr")]) == 2
    err = capsys.readouterr().err
    assert "broken.nd2" in err and "Traceback" not in err


@pytest.mark.cluster
def test_a_multi_position_file_runs_end_to_end_with_its_calibration_in_the_tables(
    tmp_path, shared_scheduler
):
    """0.5 um pixels and 5 minutes between frames, from the file: positions in the cells
    table are the pixel centroids x 0.5, areas the pixel counts x 0.25, and each track's
    mean speed its path length over its duration in seconds."""
    from pipeline.config import RunConfig
    from pipeline.orchestration.runner import run

    _write_positions(tmp_path / "positions.ome.tif", seeds=(3, 4))
    import_images(tmp_path / "positions.ome.tif", tmp_path / "plate.zarr")
    config = RunConfig.model_validate({"segmentation": {"method": "classical"}})
    summary = run(
        tmp_path / "plate.zarr", tmp_path / "out.zarr", config=config, scheduler=shared_scheduler
    )
    assert not summary.failed
    for field in ("A/1/0", "A/1/1"):
        tables = tmp_path / "out.zarr" / field / "tables"
        cells = pd.read_parquet(tables / "cells" / "table.parquet")
        assert len(cells) > 20
        np.testing.assert_allclose(cells["x"], cells["centroid_x_px"] * 0.5)
        np.testing.assert_allclose(cells["area"], cells["n_pixels"] * 0.25)
        tracks = pd.read_parquet(tables / "tracks" / "table.parquet")
        moving = tracks[tracks["end_t"] > tracks["start_t"]]
        assert len(moving) > 10
        np.testing.assert_allclose(
            moving["mean_speed"],
            moving["path_length"] / ((moving["end_t"] - moving["start_t"]) * 300.0),
        )
        cell_units = zarr.open_group(tables / "cells", mode="r").attrs["units"]
        track_units = zarr.open_group(tables / "tracks", mode="r").attrs["units"]
        assert (cell_units["x"], cell_units["area"], cell_units["t"]) == ("um", "um^2", "frame")
        assert (track_units["mean_speed"], track_units["path_length"]) == ("um/s", "um")
