"""TIFF import: axes and pixel sizes from OME/ImageJ metadata or the user, stacks, plates."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile

from pipeline.errors import PipelineInputError
from pipeline.io.importing import default_n_levels, import_images
from pipeline.io.omezarr import open_plate
from pipeline.io.tiff import read_tiff


def _random(shape: tuple[int, ...], dtype: str = "uint16", seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, shape).astype(dtype)


@pytest.fixture
def ome_tczyx(tmp_path):
    """OME-TIFF, TCZYX, x in nanometres, with channel names and a time increment."""
    pixels = _random((2, 3, 4, 24, 40))
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(
        path,
        pixels,
        photometric="minisblack",
        metadata={
            "axes": "TCZYX",
            "PhysicalSizeX": 650.0,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 0.65,
            "PhysicalSizeZ": 0.002,
            "PhysicalSizeZUnit": "mm",
            "TimeIncrement": 2.0,
            "TimeIncrementUnit": "min",
            "Channel": {"Name": ["DAPI", "GFP", "RFP"]},
        },
    )
    return path, pixels


def test_ome_tiff_axes_scale_names_and_pixels(ome_tczyx):
    path, pixels = ome_tczyx
    image = read_tiff(path)
    assert image.dims == "tczyx"
    assert image.scale == pytest.approx({"t": 120.0, "z": 2.0, "y": 0.65, "x": 0.65})
    assert image.channel_names == ("DAPI", "GFP", "RFP")
    assert image.source == str(path)
    np.testing.assert_array_equal(image.data.compute(), pixels)


def test_ome_tiff_user_pixel_size_and_names_override(ome_tczyx):
    path, _ = ome_tczyx
    image = read_tiff(path, pixel_size={"X": 0.1, "t": 5.0}, channel_names=["a", "b", "c"])
    assert image.scale == pytest.approx({"t": 5.0, "z": 2.0, "y": 0.65, "x": 0.1})
    assert image.channel_names == ("a", "b", "c")


def test_imagej_hyperstack_spacing_resolution_and_canonical_order(tmp_path):
    pixels_tzcyx = _random((3, 5, 2, 16, 20)).astype("float32")
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(
        path,
        pixels_tzcyx,
        imagej=True,
        resolution=(1 / 0.2, 1 / 0.3),  # pixels per unit in x, y
        metadata={"axes": "TZCYX", "spacing": 1.5, "unit": "um", "finterval": 10.0},
    )
    image = read_tiff(path)
    assert image.dims == "tczyx"
    assert image.scale == pytest.approx({"t": 10.0, "z": 1.5, "y": 0.3, "x": 0.2})
    np.testing.assert_array_equal(image.data.compute(), pixels_tzcyx.transpose(0, 2, 1, 3, 4))


def test_plain_2d_with_user_axes_and_pixel_size(tmp_path):
    pixels = _random((30, 20), "uint8")
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, pixels, photometric="minisblack", metadata=None)
    image = read_tiff(path, axes="YX", pixel_size={"y": 0.5, "x": 0.25})
    assert image.dims == "yx"
    assert image.scale == {"y": 0.5, "x": 0.25}
    assert image.channel_names is None
    np.testing.assert_array_equal(image.data.compute(), pixels)


def test_user_axes_transposed_to_canonical_order(tmp_path):
    pixels_yxz = _random((12, 10, 3))
    path = tmp_path / "yxz.tif"
    tifffile.imwrite(path, pixels_yxz, photometric="minisblack", metadata=None)
    image = read_tiff(path, axes="yxz")
    assert image.dims == "zyx"
    np.testing.assert_array_equal(image.data.compute(), pixels_yxz.transpose(2, 0, 1))


def test_multipage_without_metadata_needs_axes(tmp_path):
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, _random((4, 8, 8)), photometric="minisblack", metadata=None)
    with pytest.raises(PipelineInputError, match="give the axes") as error:
        read_tiff(path)
    assert error.value.path == str(path)
    assert read_tiff(path, axes="tyx").dims == "tyx"


def test_files_stacked_as_time_series_in_natural_order(tmp_path):
    frames = [_random((10, 14), seed=i) for i in range(11)]
    for i, frame in enumerate(frames):
        tifffile.imwrite(tmp_path / f"t{i}.tif", frame, photometric="minisblack")
    shuffled = [tmp_path / f"t{i}.tif" for i in (10, 2, 0, 1, 9, 3, 4, 8, 5, 7, 6)]
    image = read_tiff(shuffled, axes="yx", pixel_size={"t": 30.0})
    assert image.dims == "tyx"
    assert image.scale == {"t": 30.0, "y": 1.0, "x": 1.0}
    np.testing.assert_array_equal(image.data.compute(), np.stack(frames))
    from_folder = read_tiff(tmp_path, axes="yx", stack_axis="c")
    assert from_folder.dims == "cyx"
    np.testing.assert_array_equal(from_folder.data.compute(), np.stack(frames))


def test_large_planes_are_read_in_several_blocks(tmp_path, monkeypatch):
    import pipeline.io.tiff as tiff_module

    pixels = _random((2, 7, 6, 5))
    path = tmp_path / "blocks.tif"
    tifffile.imwrite(path, pixels, photometric="minisblack", metadata={"axes": "TZYX"})
    plane_bytes = 6 * 5 * 2
    monkeypatch.setattr(tiff_module, "_BLOCK_BYTES", 3 * plane_bytes)
    image = read_tiff(path)
    assert image.data.chunks[:2] == ((1, 1), (3, 3, 1))
    np.testing.assert_array_equal(image.data.compute(), pixels)


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ("ZYX", "3 letters but the image has 2 dimensions"),
        ("QX", "unknown letter"),
        ("XX", "repeat"),
        ("ZX", "lack Y or X"),
    ],
)
def test_bad_axes_raise(tmp_path, axes, message):
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, _random((8, 8)), photometric="minisblack")
    with pytest.raises(PipelineInputError, match=message) as error:
        read_tiff(path, axes=axes)
    assert error.value.path == str(path)


def test_mismatched_shapes_raise(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", _random((8, 8)), photometric="minisblack")
    tifffile.imwrite(tmp_path / "b.tif", _random((8, 9)), photometric="minisblack")
    with pytest.raises(PipelineInputError, match="differ in shape") as error:
        read_tiff([tmp_path / "a.tif", tmp_path / "b.tif"], axes="yx")
    assert error.value.path == str(tmp_path / "b.tif")


def test_missing_and_non_tiff_files_raise(tmp_path):
    with pytest.raises(PipelineInputError, match="not found") as error:
        read_tiff(tmp_path / "missing.tif")
    assert error.value.path == str(tmp_path / "missing.tif")
    text = tmp_path / "notes.tif"
    text.write_text("not an image")
    with pytest.raises(PipelineInputError, match="not a readable TIFF") as error:
        read_tiff(text)
    assert error.value.path == str(text)


def test_unsupported_dtype_and_bad_user_values_raise(tmp_path):
    path = tmp_path / "complex.tif"
    tifffile.imwrite(path, np.ones((4, 4), np.complex64))
    with pytest.raises(PipelineInputError, match="unsupported pixel type"):
        read_tiff(path)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, _random((4, 4)), photometric="minisblack")
    with pytest.raises(PipelineInputError, match="axis 'z'"):
        read_tiff(plain, pixel_size={"z": 1.0})
    with pytest.raises(PipelineInputError, match="positive"):
        read_tiff(plain, pixel_size={"x": -1.0})
    with pytest.raises(PipelineInputError, match="2 channel names given for 1"):
        read_tiff(plain, channel_names=["a", "b"])
    with pytest.raises(PipelineInputError, match="stack axis must be"):
        read_tiff([plain, plain], axes="yx", stack_axis="y")
    volume = tmp_path / "volume.tif"
    tifffile.imwrite(volume, _random((2, 4, 4)), photometric="minisblack")
    with pytest.raises(PipelineInputError, match="already has axes"):
        read_tiff([volume, volume], axes="zyx", stack_axis="z")


def test_default_n_levels():
    assert default_n_levels((100, 200)) == 1
    assert default_n_levels((512, 512)) == 1
    assert default_n_levels((513, 100)) == 2
    assert default_n_levels((700, 1100)) == 3
    assert default_n_levels((4096, 4096)) == 4


def test_import_ome_tiff_round_trips_through_open_plate(ome_tczyx, tmp_path):
    path, pixels = ome_tczyx
    out = import_images(path, tmp_path / "image.ome.zarr", n_levels=2)
    plate = open_plate(out)
    assert not plate.is_plate
    (field,) = plate.fields
    assert field.data.dims == ("t", "c", "z", "y", "x")
    np.testing.assert_array_equal(field.data.values, pixels)
    assert field.pixel_size == pytest.approx({"z": 2.0, "y": 0.65, "x": 0.65})
    assert field.channel_names == ("DAPI", "GFP", "RFP")
    assert len(field.levels) == 2
    assert field.levels[1].shape == (2, 3, 4, 12, 20)
    np.testing.assert_allclose(field.data["x"].values, np.arange(40) * 0.65)
    np.testing.assert_allclose(field.data["t"].values, np.arange(2) * 120.0)


def test_import_time_series_stack_as_image(tmp_path):
    frames = [_random((20, 30), seed=i) for i in range(3)]
    paths = []
    for i, frame in enumerate(frames):
        paths.append(tmp_path / f"frame_{i}.tif")
        tifffile.imwrite(paths[-1], frame, photometric="minisblack")
    out = import_images(paths, tmp_path / "series.zarr", axes="yx", pixel_size={"x": 0.5, "y": 0.5})
    (field,) = open_plate(out).fields
    assert field.data.dims == ("t", "y", "x")
    assert field.pixel_size == {"y": 0.5, "x": 0.5}
    np.testing.assert_array_equal(field.data.values, np.stack(frames))
    with pytest.raises(PipelineInputError, match="already exists"):
        import_images(paths, out, axes="yx")
    import_images(paths[:1], out, axes="yx", overwrite=True)
    assert open_plate(out).fields[0].data.dims == ("y", "x")


def test_import_plate_wells_and_fields_from_file_names(tmp_path):
    sources = tmp_path / "tiffs"
    sources.mkdir()
    names = ["A01_f1.tif", "B02_f0.tif", "A01_f0.tif"]
    pixels = {name: _random((16, 18), seed=i) for i, name in enumerate(names)}
    for name, image in pixels.items():
        tifffile.imwrite(sources / name, image, photometric="minisblack")
    out = tmp_path / "plate.zarr"
    import_images(sources, out, plate=True, pixel_size={"x": 0.3, "y": 0.3})
    plate = open_plate(out)
    assert plate.is_plate
    assert plate.rows == ("A", "B")
    assert plate.columns == ("1", "2")
    got = {(f.row, f.column, f.field): f for f in plate.fields}
    assert sorted(got) == [("A", "1", "0"), ("A", "1", "1"), ("B", "2", "0")]
    for (row, column, field), name in [
        (("A", "1", "0"), "A01_f0.tif"),
        (("A", "1", "1"), "A01_f1.tif"),
        (("B", "2", "0"), "B02_f0.tif"),
    ]:
        np.testing.assert_array_equal(got[row, column, field].data.values, pixels[name])
        assert got[row, column, field].pixel_size == {"y": 0.3, "x": 0.3}


def test_default_well_pattern_variants_and_plate_errors(tmp_path):
    for name in ("B3.tif", "C12_s2.ome.tif", "c12_s10.ome.tif"):
        tifffile.imwrite(tmp_path / name, _random((8, 8)), photometric="minisblack")
    plate = open_plate(import_images(tmp_path, tmp_path / "p.zarr", plate=True))
    assert [(f.row, f.column, f.field) for f in plate.fields] == [
        ("B", "3", "0"),
        ("C", "12", "0"),
        ("C", "12", "1"),
    ]
    tifffile.imwrite(tmp_path / "notes.tif", _random((8, 8)), photometric="minisblack")
    with pytest.raises(PipelineInputError, match="does not match the well pattern") as error:
        import_images(tmp_path, tmp_path / "q.zarr", plate=True)
    assert error.value.path == str(tmp_path / "notes.tif")
    with pytest.raises(PipelineInputError, match="same field"):
        import_images(
            [tmp_path / "C12_s2.ome.tif", tmp_path / "c12_s10.ome.tif"],
            tmp_path / "r.zarr",
            plate=True,
            pattern=r"(?P<row>[A-Za-z])(?P<column>\d+)",
        )


@pytest.mark.parametrize(
    ("unit", "expected_x"),
    [("micron", 0.2), ("\\u00B5m", 0.2), ("nm", 0.0002), ("mm", 200.0), ("pixel", 1.0)],
)
def test_imagej_units_convert_to_micrometres(tmp_path, unit, expected_x):
    path = tmp_path / "units.tif"
    tifffile.imwrite(
        path, _random((8, 8)), imagej=True, resolution=(5.0, 5.0), metadata={"unit": unit}
    )
    assert read_tiff(path).scale["x"] == pytest.approx(expected_x)


def test_unknown_unit_warns_and_keeps_default(tmp_path):
    path = tmp_path / "parsec.tif"
    tifffile.imwrite(
        path, _random((8, 8)), imagej=True, resolution=(5.0, 5.0), metadata={"unit": "parsec"}
    )
    with pytest.warns(UserWarning, match="cannot read"):
        image = read_tiff(path)
    assert image.scale == {"y": 1.0, "x": 1.0}
    with pytest.warns(UserWarning):
        assert read_tiff(path, pixel_size={"x": 0.4, "y": 0.4}).scale == {"y": 0.4, "x": 0.4}


def test_bilevel_mask_is_read_as_uint8(tmp_path):
    mask = _random((6, 9)) > 500
    path = tmp_path / "mask.tif"
    tifffile.imwrite(path, mask)
    image = read_tiff(path)
    assert image.data.dtype == np.uint8
    np.testing.assert_array_equal(image.data.compute(), mask.astype(np.uint8))


def test_every_calibration_the_files_lack_is_warned_about_once(tmp_path, capsys):
    """Plain TIFFs say nothing of their pixel size or frame interval: the import writes 1.0
    and says so, once per missing step; given on the command line, nothing is said and the
    steps reach the output (a frame interval of 10 min, pixels of 0.65 um)."""
    from pipeline.cli import main

    for name in ("A01_f0.tif", "A02_f0.tif"):
        tifffile.imwrite(tmp_path / name, _random((3, 16, 16)), photometric="minisblack")
    tiffs = [tmp_path / "A01_f0.tif", tmp_path / "A02_f0.tif"]
    command = ["import", *map(str, tiffs), "--plate", "--axes", "tyx", "--out"]
    assert main([*command, str(tmp_path / "bare.zarr")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line]
    assert warned == [
        f"warning: no x/y calibration in {tiffs[0]} (and 1 more files): pixel size 1.0 um "
        "written (give --pixel-size, or pixel_size={'x': ..., 'y': ...})",
        f"warning: no t calibration in {tiffs[0]} (and 1 more files): frame interval 1 s "
        "written (give --time-step, or pixel_size={'t': ...}, in seconds)",
    ]
    given = ["--pixel-size", "0.65", "--time-step", "600"]
    assert main([*command, str(tmp_path / "given.zarr"), *given]) == 0
    assert capsys.readouterr().err == ""
    field = open_plate(tmp_path / "given.zarr").fields[0]
    assert field.pixel_size == pytest.approx({"y": 0.65, "x": 0.65})
    np.testing.assert_allclose(field.data["t"].values, [0.0, 600.0, 1200.0])


def test_files_stacked_without_a_stack_axis_are_warned_about(tmp_path):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"frame_{i}.tif")
        tifffile.imwrite(paths[-1], _random((8, 8), seed=i), photometric="minisblack")
    with pytest.warns(UserWarning, match="2 files stacked as the frames of a time series"):
        assert read_tiff(paths, pixel_size={"x": 1, "y": 1, "t": 1}).dims == "tyx"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said explicitly: nothing to warn about
        assert read_tiff(paths, stack_axis="t", pixel_size={"x": 1, "y": 1, "t": 1}).dims == "tyx"
