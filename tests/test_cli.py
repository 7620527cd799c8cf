"""The ``pipeline`` command end to end: one run on a small simulated plate, then bad inputs.

The plate is run once (module fixture) and many properties are checked on that output against
independent truths: the OME-Zarr validator, the label image itself (scipy.ndimage statistics),
the input pixels, and the input's file hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from scipy import ndimage

from pipeline.cli import main
from pipeline.io.omezarr import open_plate

# Every test runs the `pipeline` command (most of them on a local Dask cluster).
pytestmark = pytest.mark.slow

VALIDATOR = Path(sys.executable).with_name("ome-zarr-models")
FIELDS = {"A/1": "A/1/0", "A/2": "A/2/0"}
TABLE_COLUMNS = {
    "label",
    "t",
    "y",
    "x",
    "area",
    "track_id",
    "parent_track_id",
    "intensity_mean_nuclei",
    "intensity_mean_cytoplasm",
}


def _file_digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    """Lines of stderr, progress-bar redraws (carriage returns) split apart."""
    return [line for line in re.split(r"[\r\n]+", result.stderr) if line.strip()]


def _field_table(out: Path, field: str) -> pd.DataFrame:
    return pd.read_parquet(out / field / "tables" / "cells" / "table.parquet")


def _label_levels(out: Path, field: str) -> list[np.ndarray]:
    labels = zarr.open_group(out / field / "labels" / "cells", mode="r")
    paths = [d["path"] for d in labels.attrs["ome"]["multiscales"][0]["datasets"]]
    return [labels[path][:] for path in paths]


def _root_attrs(out: Path) -> dict:
    return dict(zarr.open_group(out, mode="r").attrs)


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VALIDATOR), "validate", str(path)], capture_output=True, text=True, check=False
    )


def _dangling_well_images(out: Path) -> list[str]:
    """Images listed by a well group of ``out`` that do not exist."""
    missing = []
    for well_json in out.glob("*/*/zarr.json"):
        well = zarr.open_group(well_json.parent, mode="r").attrs.get("ome", {}).get("well")
        for image in (well or {}).get("images", []):
            if not (well_json.parent / image["path"] / "zarr.json").is_file():
                missing.append(f"{well_json.parent.relative_to(out)}/{image['path']}")
    return missing


@dataclass
class PlateRun:
    """One ``pipeline run`` of the small plate."""

    result: subprocess.CompletedProcess
    out: Path
    input_digests: dict[str, str]


@pytest.fixture(scope="module")
def plate_run(
    small_plate: Path, tmp_path_factory: pytest.TempPathFactory, pipeline_command
) -> PlateRun:
    digests = _file_digests(small_plate)
    folder = tmp_path_factory.mktemp("cli-run")
    out = folder / "results.zarr"
    result = pipeline_command("run", small_plate, "--out", out, "--workers", "1", cwd=folder)
    return PlateRun(result, out, digests)


# --------------------------------------------------------------------------------------------
# A successful run
# --------------------------------------------------------------------------------------------


def test_run_succeeds_with_dashboard_link_and_cells_per_well(plate_run: PlateRun) -> None:
    result = plate_run.result
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "still alive" not in result.stderr  # no worker is killed at the end of a good run
    # simulated nuclei look like nuclei: no plausibility warning in the summary
    assert not re.search(r"^WARNING ", result.stderr, flags=re.MULTILINE)
    assert re.search(r"https?://\S+/status", result.stdout)
    reported = dict(re.findall(r"well (\S+): (\d+) cells", result.stdout))
    assert reported.keys() == FIELDS.keys()
    for well, field in FIELDS.items():
        assert int(reported[well]) == len(_field_table(plate_run.out, field)) > 0


@pytest.mark.parametrize("node", ["", "A/1/0", "A/1/0/labels/cells"])
def test_output_is_valid_ome_zarr(plate_run: PlateRun, node: str) -> None:
    checked = _validate(plate_run.out / node)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_root_status_is_complete_and_plate_lists_all_wells(plate_run: PlateRun) -> None:
    attrs = _root_attrs(plate_run.out)
    assert attrs["pipeline_run"]["status"] == "complete"
    assert attrs["pipeline_run"]["failures"] == []
    assert [w["path"] for w in attrs["ome"]["plate"]["wells"]] == list(FIELDS)


def test_input_plate_is_unchanged(plate_run: PlateRun, small_plate: Path) -> None:
    assert _file_digests(small_plate) == plate_run.input_digests


@pytest.mark.parametrize("field", FIELDS.values())
def test_label_pyramid_has_the_image_level_shapes(plate_run: PlateRun, field: str) -> None:
    image = zarr.open_group(plate_run.out / field, mode="r")
    multiscale = image.attrs["ome"]["multiscales"][0]
    channel_axis = [a["name"] for a in multiscale["axes"]].index("c")
    image_shapes = [
        tuple(np.delete(image[d["path"]].shape, channel_axis)) for d in multiscale["datasets"]
    ]
    levels = _label_levels(plate_run.out, field)
    assert len(image_shapes) == 2  # the 256-pixel plate has a pyramid
    assert [level.shape for level in levels] == image_shapes
    for coarse in levels[1:]:  # downsampled labels hold existing ids, never averaged ones
        assert set(np.unique(coarse)) <= set(np.unique(levels[0]))


@pytest.mark.parametrize("field", FIELDS.values())
def test_labels_are_consecutive_over_the_time_series(plate_run: PlateRun, field: str) -> None:
    labels = _label_levels(plate_run.out, field)[0]
    ids = np.unique(labels[labels > 0])
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    per_frame = [set(np.unique(frame[frame > 0])) for frame in labels]
    assert sum(len(s) for s in per_frame) == len(ids)  # no id in two frames


@pytest.mark.parametrize("field", FIELDS.values())
def test_field_table_matches_label_image_and_pixels(
    plate_run: PlateRun, small_plate: Path, field: str
) -> None:
    table = _field_table(plate_run.out, field).set_index("label", drop=False).sort_index()
    assert TABLE_COLUMNS <= set(table.columns)
    labels = _label_levels(plate_run.out, field)[0]
    ids = np.unique(labels[labels > 0])
    np.testing.assert_array_equal(table.index.to_numpy(), ids)
    np.testing.assert_array_equal(table["n_pixels"], np.bincount(labels.ravel())[ids])

    multiscale = zarr.open_group(plate_run.out / field, mode="r").attrs["ome"]["multiscales"][0]
    transforms = {t["type"]: t for t in multiscale["datasets"][0]["coordinateTransformations"]}
    *_, scale_y, scale_x = transforms["scale"]["scale"]
    *_, origin_y, origin_x = transforms.get("translation", {}).get("translation", [0.0] * 4)
    np.testing.assert_allclose(table["area"], table["n_pixels"] * scale_y * scale_x)
    pixels = zarr.open_group(small_plate / field, mode="r")["0"][:]
    for frame, frame_labels in enumerate(labels):
        rows = table[table["t"] == frame]
        frame_ids = rows.index.to_numpy()
        np.testing.assert_array_equal(frame_ids, np.unique(frame_labels[frame_labels > 0]))
        centres = np.array(ndimage.center_of_mass(frame_labels > 0, frame_labels, frame_ids))
        np.testing.assert_allclose(rows["y"], origin_y + centres[:, 0] * scale_y, atol=1e-6)
        np.testing.assert_allclose(rows["x"], origin_x + centres[:, 1] * scale_x, atol=1e-6)
        for channel, name in enumerate(["nuclei", "cytoplasm"]):
            means = ndimage.mean(pixels[frame, channel], frame_labels, frame_ids)
            np.testing.assert_allclose(rows[f"intensity_mean_{name}"], means, rtol=1e-9)
    assert table["track_id"].min() >= 1


def test_table_groups_follow_the_ngio_convention(plate_run: PlateRun) -> None:
    tables = zarr.open_group(plate_run.out / "A/1/0/tables", mode="r")
    assert "cells" in tables.attrs["tables"]
    attrs = tables["cells"].attrs
    assert attrs["type"] == "feature_table"
    assert attrs["region"] == {"path": "../../labels/cells"}
    assert attrs["instance_key"] == "label"
    # the region path, resolved from the table group, is the label image
    region = (plate_run.out / "A/1/0/tables/cells" / attrs["region"]["path"]).resolve()
    assert region == (plate_run.out / "A/1/0/labels/cells").resolve()


def test_plate_table_holds_the_rows_of_the_field_tables(plate_run: PlateRun) -> None:
    plate_table = pd.read_parquet(plate_run.out / "tables" / "cells")
    expected = pd.concat(
        [
            _field_table(plate_run.out, field).assign(well=well.replace("/", ""))
            for well, field in FIELDS.items()
        ]
    )
    columns = list(expected.columns)
    got = plate_table.assign(well=plate_table["well"].astype(str))[columns]
    key = ["well", "label"]
    pd.testing.assert_frame_equal(
        got.sort_values(key).reset_index(drop=True),
        expected.sort_values(key).reset_index(drop=True),
        check_dtype=False,
    )


def test_simulate_subcommand_writes_the_requested_layout(tmp_path: Path) -> None:
    out = tmp_path / "sim.zarr"
    args = ["simulate", str(out), "--rows", "2", "--columns", "1", "--fields", "2"]
    assert main([*args, "--frames", "2", "--size", "64", "--seed", "1"]) == 0
    plate = open_plate(out)
    assert sorted(f.path for f in plate.fields) == ["A/1/0", "A/1/1", "B/1/0", "B/1/1"]
    assert {(f.data.sizes["t"], f.data.sizes["y"], f.data.sizes["x"]) for f in plate.fields} == {
        (2, 64, 64)
    }


# --------------------------------------------------------------------------------------------
# Bad input: one line on stderr naming the problem and the path, exit code 2, no traceback
# --------------------------------------------------------------------------------------------


def _ome_image(path: Path, axes: list[str], shape: tuple[int, ...], dtype: str) -> Path:
    """A minimal OME-Zarr 0.5 image written with zarr directly."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    kinds = {"c": "channel", "t": "time"}
    scale = {"type": "scale", "scale": [1.0] * len(axes)}
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [{"name": a, "type": kinds.get(a, "space")} for a in axes],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [scale],
                    }
                ],
            }
        ],
    }
    group.create_array("0", shape=shape, dtype=dtype)
    return path


def _missing(tmp: Path, plate: Path) -> tuple[list, Path]:
    return [tmp / "missing.zarr"], tmp / "missing.zarr"


def _not_ome_zarr_folder(tmp: Path, plate: Path) -> tuple[list, Path]:
    folder = tmp / "images"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a dataset")
    return [folder], folder


def _zarr_without_ome(tmp: Path, plate: Path) -> tuple[list, Path]:
    path = tmp / "plain.zarr"
    zarr.open_group(path, mode="w", zarr_format=3).create_array("0", shape=(8, 8), dtype="u2")
    return [path], path


def _unsupported_axes(tmp: Path, plate: Path) -> tuple[list, Path]:
    path = _ome_image(tmp / "yxc.zarr", ["y", "x", "c"], (8, 8, 2), "uint16")
    return [path], path


def _unsupported_dtype(tmp: Path, plate: Path) -> tuple[list, Path]:
    path = _ome_image(tmp / "complex.zarr", ["y", "x"], (8, 8), "complex64")
    return [path], path


def _config(text: str) -> Callable[[Path, Path], tuple[list, Path]]:
    def build(tmp: Path, plate: Path) -> tuple[list, Path]:
        config = tmp / "config.yaml"
        config.write_text(text)
        return [plate, "--config", config], config

    return build


def _existing_output(tmp: Path, plate: Path) -> tuple[list, Path]:
    out = tmp / "results.zarr"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    return [plate], out


def _image_path_leaving_the_plate(tmp: Path, plate: Path) -> tuple[list, Path]:
    copy = tmp / "plate.zarr"
    shutil.copytree(plate, copy)
    well = zarr.open_group(copy / "A/1", mode="r+")
    ome = dict(well.attrs["ome"])
    ome["well"] = {"images": [{"path": "../../elsewhere"}]}
    well.attrs["ome"] = ome
    return [copy], copy


def _output_being_written(tmp: Path, plate: Path) -> tuple[list, Path]:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "-", "command": "-"}
    (tmp / "results.zarr.lock").write_text(json.dumps(holder))  # this test process: alive
    return [plate], tmp / "results.zarr"


BAD_INPUTS = {
    "missing input": (_missing, "path does not exist"),
    "folder that is not OME-Zarr": (_not_ome_zarr_folder, "not a zarr group"),
    "zarr without OME metadata": (_zarr_without_ome, "not an OME-Zarr image or plate"),
    "unsupported axes": (_unsupported_axes, "unsupported axes ['y', 'x', 'c']"),
    "unsupported dtype": (_unsupported_dtype, "unsupported dtype complex64"),
    "unknown config key": (
        _config("segmentation: {methd: classical}\n"),
        "unknown config key 'segmentation.methd'",
    ),
    "moved config key": (
        _config("segmentation: {convnet: {batch_size: 8}}\n"),
        "config key 'segmentation.convnet.batch_size' has moved to 'compute.batch_size'",
    ),
    "bad config value": (
        _config("tracking: {max_distance_um: -1}\n"),
        "bad config value for 'tracking.max_distance_um'",
    ),
    "output exists": (_existing_output, "output exists but"),
    "output being written by another run": (
        _output_being_written,
        f"another run is writing this output (host {socket.gethostname()}, pid {os.getpid()}",
    ),
    "image path leaving the plate": (
        _image_path_leaving_the_plate,
        "image path 'A/1/../../elsewhere' in the metadata leaves its plate",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(
    case: str, tmp_path: Path, small_plate: Path, pipeline_command
) -> None:
    build, problem = BAD_INPUTS[case]
    inputs, named_path = build(tmp_path, small_plate)
    out = tmp_path / "results.zarr"
    result = pipeline_command("run", *inputs, "--out", out, "--workers", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = _stderr_lines(result)
    assert line.startswith(f"error: {problem}")
    assert str(named_path) in line
    if case == "output exists":
        assert (out / "keep.txt").read_text() == "earlier results"
    else:
        assert not out.exists()


@pytest.mark.parametrize("inside", ["results.zarr", "A/1/0/labels/more"])
def test_an_output_inside_the_input_is_refused_before_any_work(
    inside: str, tmp_path: Path, small_plate: Path, pipeline_command
) -> None:
    plate = tmp_path / "plate.zarr"
    shutil.copytree(small_plate, plate)
    before = _file_digests(plate)
    result = pipeline_command("run", plate, "--out", plate / inside, cwd=tmp_path)
    assert result.returncode == 2
    [line] = _stderr_lines(result)
    assert line == (
        f"error: output lies inside the input {plate} (the input is never modified); "
        f"choose a folder outside it: {plate / inside}"
    )
    assert _file_digests(plate) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_output_folder_is_refused_before_any_work(
    tmp_path: Path, small_plate: Path, pipeline_command
) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    result = pipeline_command("run", small_plate, "--out", folder / "out.zarr", cwd=tmp_path)
    assert result.returncode == 2
    [line] = _stderr_lines(result)
    assert line.startswith(f"error: cannot write here ({folder} is not writable)")


def test_status_into_a_closed_pipe_ends_quietly(plate_run: PlateRun) -> None:
    """As ``pipeline status OUT | head -n 0``: the reader has gone before anything is written."""
    status = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "status", str(plate_run.out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    status.stdout.close()  # long before the command has imported what it needs
    stderr = status.stderr.read()
    assert status.wait(timeout=60) == 141  # as a shell reports a command ended by SIGPIPE
    assert stderr == b""


def test_contradictory_flags_are_refused(small_plate: Path, tmp_path: Path, pipeline_command):
    out = tmp_path / "results.zarr"
    result = pipeline_command(
        "run", small_plate, "--out", out, "--force", "--only-failed", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "argument --only-failed: not allowed with argument --force" in result.stderr
    assert not out.exists()


def test_unreadable_chunk_fails_its_field_only(
    tmp_path: Path, small_plate: Path, pipeline_command
) -> None:
    plate = tmp_path / "plate.zarr"
    shutil.copytree(small_plate, plate)
    array = plate / "A/2/0/0"
    chunk = sorted(p for p in (array / "c").rglob("*") if p.is_file())[0]
    chunk.write_bytes(b"\x00garbage, not a compressed chunk\xff" * 4)
    key = chunk.relative_to(array).as_posix()
    out = tmp_path / "results.zarr"

    result = pipeline_command("run", plate, "--out", out, "--workers", "1", cwd=tmp_path)

    assert result.returncode == 3  # partial
    assert "Traceback" not in result.stderr
    failure_lines = [line for line in _stderr_lines(result) if key in line]
    assert len(failure_lines) == 1
    assert "A/2/0" in failure_lines[0] and str(array) in failure_lines[0]
    pipeline_attrs = _root_attrs(out)["pipeline_run"]
    assert pipeline_attrs["status"] == "partial"
    [failure] = pipeline_attrs["failures"]
    assert failure["field"] == "A/2/0" and key in failure["error"]
    # the other field is complete and is the only one the plate lists
    assert [w["path"] for w in _root_attrs(out)["ome"]["plate"]["wells"]] == ["A/1"]
    assert len(_field_table(out, "A/1/0")) == len(np.unique(_label_levels(out, "A/1/0")[0])) - 1
    assert set(pd.read_parquet(out / "tables" / "cells")["well"].astype(str)) == {"A1"}
    assert _dangling_well_images(out) == []
    checked = _validate(out)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_giant_field_that_stores_almost_nothing_fails_at_once_and_the_plate_goes_on(
    tmp_path: Path, pipeline_command
) -> None:
    """Issue 15: a field declaring 1 x 2 x 200,000 x 200,000 pixels (305,762 chunks) with one
    chunk written used to take the client 85 s and 3.5 GB to plan before failing; it fails
    before any graph, naming the shape and the chunks stored, and the other field is done."""
    from pipeline.io.omezarr import open_plate
    from pipeline.synthetic import simulate_plate

    plate = tmp_path / "plate.zarr"
    simulate_plate(plate, rows=1, columns=2, fields=1, n_frames=1, size=96, seed=4)
    giant = zarr.create_array(
        plate / "A/1/0/0",
        shape=(1, 2, 200_000, 200_000),
        chunks=(1, 1, 512, 512),
        dtype="uint16",
        fill_value=0,
        overwrite=True,
    )
    giant[0, 0, :512, :512] = 100
    for level in open_plate(plate).fields[0].levels[1:]:  # the giant has one level
        shutil.rmtree(plate / "A/1/0" / level.path)
    group = zarr.open_group(plate / "A/1/0", mode="r+")
    ome = group.attrs["ome"]
    ome["multiscales"][0]["datasets"] = ome["multiscales"][0]["datasets"][:1]
    group.attrs["ome"] = ome
    out = tmp_path / "results.zarr"
    result = pipeline_command("run", plate, "--out", out, "--workers", "1", cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    [failure] = [line for line in _stderr_lines(result) if line.startswith("FAILED")]
    assert failure.startswith(
        "FAILED A/1/0: the image declares shape (1, 2, 200000, 200000) in 305,762 chunks but "
        "stores only 1 of them"
    )
    assert [w["path"] for w in _root_attrs(out)["ome"]["plate"]["wells"]] == ["A/2"]


def test_nan_pixels_fail_their_field_with_the_chunk_named_or_read_as_zero_when_asked(
    tmp_path: Path, pipeline_command
) -> None:
    from pipeline.synthetic import simulate_field

    for well, seed in (("A01", 1), ("A02", 2)):
        frames = simulate_field(n_frames=2, size=96, seed=seed).image[:, 0].astype(np.float32)
        if well == "A01":
            frames[1, 10:20, 10:20] = np.nan  # deconvolution or registration leftovers
            frames[1, 50, 50] = np.inf
        tifffile.imwrite(tmp_path / f"{well}_f0.tif", frames, metadata={"axes": "TYX"})
    plate = tmp_path / "plate.zarr"
    tiffs = sorted(tmp_path.glob("*.tif"))
    imported = pipeline_command("import", *tiffs, "--plate", "--out", plate, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr

    out = tmp_path / "results.zarr"
    result = pipeline_command("run", plate, "--out", out, "--workers", "1", cwd=tmp_path)
    assert result.returncode == 3  # partial
    assert "Traceback" not in result.stderr
    [failure] = [line for line in _stderr_lines(result) if line.startswith("FAILED")]
    assert failure.startswith("FAILED A/1/0: 101 NaN or infinite pixel(s) in chunk")
    assert "input.non_finite: zero" in failure and str(plate / "A/1/0/0") in failure
    assert [w["path"] for w in _root_attrs(out)["ome"]["plate"]["wells"]] == ["A/2"]

    config = tmp_path / "zero.yaml"
    config.write_text("input:\n  non_finite: zero\n")
    out = tmp_path / "zeroed.zarr"
    result = pipeline_command(
        "run", plate, "--out", out, "--config", config, "--workers", "1", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert _root_attrs(out)["pipeline_run"]["status"] == "complete"
    assert len(_field_table(out, "A/1/0")) > 0


def test_chunks_zarr_python_skipped_as_empty_are_read_as_zeros_and_recorded(
    tmp_path: Path, pipeline_command
) -> None:
    from pipeline.synthetic import simulate_field

    frames = simulate_field(n_frames=1, size=520, seed=4).image[:, 0]
    frames[:, :300, :300] = 0  # the blank corner of a stitched mosaic
    tifffile.imwrite(tmp_path / "mosaic.tif", frames, metadata={"axes": "TYX"})
    plate = tmp_path / "mosaic.zarr"
    assert (
        pipeline_command("import", tmp_path / "mosaic.tif", "--out", plate, cwd=tmp_path).returncode
        == 0
    )
    array = zarr.open_array(plate / "0", mode="r")
    dropped = []  # what zarr-python's default (write_empty_chunks=False) leaves out
    for cell in np.ndindex(*array.cdata_shape):
        region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(cell, array.chunks, strict=True))
        if not array[region].any():
            key = array.metadata.encode_chunk_key(cell)
            (plate / "0" / key).unlink()
            dropped.append(key)
    assert len(dropped) == 1  # the corner chunk

    out = tmp_path / "results.zarr"
    result = pipeline_command("run", plate, "--out", out, "--workers", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [warning] = [line for line in _stderr_lines(result) if line.startswith("WARNING")]
    assert warning.startswith("WARNING image: 1 chunk(s) absent from the input read as the fill")
    assert sorted(_root_attrs(out)["pipeline"]["filled_chunks"]) == sorted(dropped)


def test_track_labels_are_written_and_exported_as_ctc(tmp_path: Path, small_plate: Path) -> None:
    """``tracking.write_track_labels``: labels/tracks holds each cell's track id; the CTC
    export of the field gives the same masks and one track-file line per track."""
    config = tmp_path / "config.yaml"
    config.write_text("tracking: {write_track_labels: true}\n")
    out = tmp_path / "results.zarr"
    assert main(["run", str(small_plate), "--out", str(out), "--config", str(config)]) == 0
    field = zarr.open_group(out / "A" / "1" / "0", mode="r")
    cells = np.asarray(field["labels/cells/0"])
    tracks = np.asarray(field["labels/tracks/0"])
    table = pd.read_parquet(out / "A" / "1" / "0" / "tables" / "cells" / "table.parquet")
    expected = np.zeros(cells.max() + 1, dtype=np.int64)
    expected[table["label"].to_numpy()] = table["track_id"].to_numpy()
    np.testing.assert_array_equal(tracks, expected[cells])
    assert main(["export-ctc", str(out), "A/1/0", str(tmp_path / "ctc")]) == 0
    for t, frame in enumerate(tracks):
        exported = tifffile.imread(tmp_path / "ctc" / f"mask{t:03d}.tif")
        np.testing.assert_array_equal(exported, frame)
    lines = (tmp_path / "ctc" / "res_track.txt").read_text().split("\n")
    assert len([line for line in lines if line.strip()]) == table["track_id"].nunique()


def test_track_table_growth_rates_and_merge_qc(plate_run: PlateRun) -> None:
    field = plate_run.out / "A" / "1" / "0"
    cells = pd.read_parquet(field / "tables" / "cells" / "table.parquet")
    tracks = pd.read_parquet(field / "tables" / "tracks" / "table.parquet")
    assert sorted(tracks["track_id"]) == sorted(cells["track_id"].unique())
    # growth rate of a cell = ln(area / previous area of its track) per time unit
    interval = float(open_plate(plate_run.out).fields[0].levels[0].scale["t"])
    longest = cells[cells["track_id"] == tracks.loc[tracks["n_frames"].idxmax(), "track_id"]]
    longest = longest.sort_values("t")
    expected = np.log(longest["area"].to_numpy()[1:] / longest["area"].to_numpy()[:-1]) / (
        np.diff(longest["t"].to_numpy()) * interval
    )
    np.testing.assert_allclose(longest["growth_rate"].to_numpy()[1:], expected)
    record = zarr.open_group(field, mode="r").attrs["pipeline"]
    assert record["warnings"] == []
    qc = record["merge_qc"]
    # one link between consecutive observations of a track
    assert qc["links"] == len(cells) - cells["track_id"].nunique()
    assert 0 <= qc["fraction"] <= 1


def _dark_nuclei_plate(folder: Path) -> Path:
    """A lone image of 2 frames of simulated nuclei made dark on a bright background."""
    from pipeline.io.importing import import_images
    from pipeline.synthetic import simulate_field

    field = simulate_field(n_frames=2, size=128, seed=4)
    inverted = (field.image[:, 0].max() - field.image[:, 0]).astype(np.uint16)
    tifffile.imwrite(folder / "stack.tif", inverted, photometric="minisblack")
    return import_images(
        [folder / "stack.tif"],
        folder / "dark.zarr",
        axes="tyx",
        pixel_size={"x": 0.5, "y": 0.5},
    )


@pytest.mark.parametrize(
    ("method", "said"),
    [
        ("classical", r"cells cover \d+% of the image"),
        ("convnet", r"the segmentation channel looks like brightfield"),
    ],
)
def test_an_input_unlike_nuclei_is_flagged_not_passed_silently(
    tmp_path: Path, capsys, method: str, said: str
) -> None:
    """Dark nuclei on a bright background: the classical recipe (which looks for bright
    objects) makes the background "cells"; the shipped conv-net inverts the frames but is weak
    on brightfield. Either way the run finishes, and its summary, the field's completion
    record and the QC report say that the input or the result does not look like what the
    segmenter knows."""
    plate = _dark_nuclei_plate(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(f"segmentation: {{method: {method}}}\n")
    out = tmp_path / "results.zarr"
    assert main(["run", str(plate), "--out", str(out), "--config", str(config)]) == 0
    stderr = capsys.readouterr().err
    assert re.search(rf"^WARNING image: {said}", stderr, flags=re.MULTILINE)
    record = zarr.open_group(out, mode="r").attrs["pipeline"]
    assert any(re.match(said, warning) for warning in record["warnings"])
    report = (out.with_suffix(".report") / "index.html").read_text()
    assert re.search(f"warning: {said}", report)


def test_ngio_reads_the_plate_its_images_labels_and_every_table(plate_run: PlateRun) -> None:
    """ngio (Fractal's OME-Zarr library) opens the output with its own readers: the plate's
    fields, each field's label image, and the cells (a feature table indexed by label) and
    tracks tables, row for row as the run wrote them."""
    import ngio

    plate = ngio.open_ome_zarr_plate(plate_run.out)
    assert sorted(plate.images_paths()) == sorted(FIELDS.values())
    for path in FIELDS.values():
        container = ngio.open_ome_zarr_container(plate_run.out / path)
        assert "cells" in container.list_labels()
        assert set(container.list_tables()) >= {"cells", "tracks"}
        cells = container.get_table("cells")
        assert isinstance(cells, ngio.FeatureTable)
        written = _field_table(plate_run.out, path).set_index("label")
        pd.testing.assert_frame_equal(
            cells.dataframe.sort_index()[written.columns], written.sort_index(), check_dtype=False
        )
        tracks = container.get_table("tracks").dataframe
        expected = pd.read_parquet(plate_run.out / path / "tables" / "tracks" / "table.parquet")
        assert len(tracks) == len(expected) > 0


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_anndata_export_holds_every_cell_of_the_plate_table(
    plate_run: PlateRun, tmp_path: Path, suffix: str
) -> None:
    import anndata

    out = tmp_path / f"cells{suffix}"
    assert main(["export-anndata", str(plate_run.out), "--out", str(out)]) == 0
    exported = anndata.read_h5ad(out) if suffix == ".h5ad" else anndata.read_zarr(out)
    plate = pd.read_parquet(plate_run.out / "tables" / "cells")  # the plate-wide dataset
    plate = plate.astype({"well": str, "field": str})
    plate = plate.sort_values(["well", "field", "t", "label"], ignore_index=True)
    obs = exported.obs.reset_index(drop=True)
    assert len(obs) == len(plate) > 0
    for column in ("well", "field"):
        assert obs[column].astype(str).tolist() == plate[column].tolist()
    assert exported.obs_names[0] == f"A1/0/t{plate['t'][0]}/{plate['label'][0]}"
    for column in ("t", "label", "track_id", "y", "x"):
        np.testing.assert_array_equal(obs[column], plate[column])
    assert "area" in exported.var_names and "y" not in exported.var_names
    for column in ("area", "intensity_mean_nuclei", "growth_rate"):
        got = exported[:, column].X.ravel()
        np.testing.assert_allclose(got, plate[column].astype(np.float32), equal_nan=True)
    assert exported.var.loc["area", "unit"] == "um^2"
    assert exported.var.loc["growth_rate", "unit"] == "1/s"
    assert exported.uns["pipeline"]["output"] == str(plate_run.out)


@pytest.mark.cluster
def test_a_lone_image_and_a_plate_give_the_same_cells_table(
    plate_run: PlateRun, small_plate: Path, tmp_path: Path, shared_scheduler: str
) -> None:
    """pipeline.read_cells: a plate's cells are its plate-wide dataset's rows; the same field
    run as a lone image gives the same rows in the same layout, with an empty well and field."""
    import pipeline

    plate = pipeline.read_cells(plate_run.out)
    dataset = pd.read_parquet(plate_run.out / "tables" / "cells").astype({"well": str})
    dataset = dataset.sort_values(["well", "field", "t", "label"], ignore_index=True)
    assert plate["well"].tolist() == dataset["well"].tolist()
    pd.testing.assert_frame_equal(
        plate.drop(columns=["well", "field"]), dataset[plate.columns[2:]], check_dtype=False
    )
    pipeline.run(small_plate / "A" / "1" / "0", tmp_path / "lone.zarr", scheduler=shared_scheduler)
    lone = pipeline.read_cells(tmp_path / "lone.zarr")
    assert list(lone.columns) == list(plate.columns)
    assert set(lone["well"]) == {""} and set(lone["field"]) == {""}
    first_well = plate[plate["well"] == "A1"].reset_index(drop=True)
    pd.testing.assert_frame_equal(lone.iloc[:, 2:], first_well.iloc[:, 2:])


def test_crops_command_cuts_every_cell_of_a_run(plate_run: PlateRun, tmp_path: Path) -> None:
    from pipeline.classification.crops import cut_crops
    from pipeline.classification.store import read_crops

    out = tmp_path / "results.zarr"
    shutil.copytree(plate_run.out, out)
    bad = main(["crops", str(out), "--size-um", "12", "--channels", "gfp", "--workers", "1"])
    assert bad == 2
    code = main(["crops", str(out), "--size-um", "12", "--size-px", "24", "--workers", "1"])
    assert code == 0
    crops, index = read_crops(out)
    tables = {field: _field_table(out, field) for field in FIELDS.values()}
    assert len(index) == crops.shape[0] == sum(len(table) for table in tables.values())
    assert crops.shape[1:] == (3, 24, 24)  # nuclei, cytoplasm and the mask
    field = index[index["field"] == "A/2/0"]
    joined = field.reset_index().merge(tables["A/2/0"], on=["t", "label", "track_id"])
    assert len(joined) == len(field) == len(tables["A/2/0"]) and set(field["well"]) == {"A/2"}
    n = int(joined["index"].iloc[len(joined) // 2])
    row = index.loc[n]
    image = zarr.open_group(out / row["field"], mode="r")["0"]
    labels = zarr.open_group(out / row["field"] / "labels" / "cells", mode="r")["0"]
    step = open_plate(out).fields[0].pixel_size["y"]
    t = int(row["t"])
    expected, _ = cut_crops(
        np.squeeze(image[t]), np.squeeze(labels[t]), 24, 12 / step, [int(row["label"])]
    )
    np.testing.assert_array_equal(crops[n], expected[0])


@pytest.mark.slow
def test_classify_train_on_a_simulated_coculture_run(tmp_path: Path) -> None:
    """Run a co-culture plate, cut crops, train with marker labels and wells as the unit."""
    from pipeline.synthetic import simulate_plate

    plate = simulate_plate(
        tmp_path / "coculture.zarr", rows=2, columns=2, fields=1, n_frames=2, seed=4, cell_types=2
    )
    out = tmp_path / "results.zarr"
    # the classical recipe segments these simulated nuclei well, in a fraction of the time
    segmentation = "segmentation:\n  method: classical\n"
    classical = tmp_path / "classical.yaml"
    classical.write_text(segmentation)
    run = ["run", str(plate), "--workers", "1", "--config"]
    assert main([*run, str(classical), "--out", str(out)]) == 0
    assert main(["crops", str(out), "--size-um", "20", "--size-px", "32", "--workers", "1"]) == 0
    model = tmp_path / "coculture.pt"
    fast = (
        '{"input_size": 32, "widths": [8, 8, 16, 16], "kernel_size": 5, "dense": 32, '
        '"learning_rate": 0.002, "max_epochs": 10}'
    )
    args = ["classify", "train", str(out), "--marker", "marker", "--params", fast]
    assert main([*args, "--folds", "4", "--out", str(model)]) == 0
    summary = pd.read_csv(f"{model}.summary.csv").set_index("method")
    folds = pd.read_csv(f"{model}.cv.csv")
    assert set(folds["fold"]) == {0, 1, 2, 3} and (folds["groups"] == 1).all()
    # against marker labels, wells held out, a small quick network: the CNN beats both baselines
    assert summary.loc["cnn", "auc"] > 0.8
    assert summary.loc["cnn", "auc"] > max(
        summary.loc["contour", "auc"], summary.loc["size", "auc"]
    )
    assert Path(f"{model}.roc.png").stat().st_size > 0
    from pipeline.classification.classifier import CellClassifier

    loaded = CellClassifier.load(model)
    assert loaded.n_channels_ == 2  # nuclei and cytoplasm: the marker is not learnt from
    assert loaded.metadata_["crops"]["channels"] == ["nuclei", "cytoplasm"]
    assert main([*args, "--channels", "dna", "--out", str(model)]) == 2

    # a run with the model classifies every cell; the classes follow the simulated types
    config = tmp_path / "classify.yaml"
    config.write_text(
        f"{segmentation}classification:\n  model: {model}\ncrops:\n  size_um: 16\n  size_px: 24\n"
    )
    classified = tmp_path / "classified.zarr"
    assert main([*run, str(config), "--out", str(classified)]) == 0
    agree = []
    for well in ("A/1", "A/2", "B/1", "B/2"):
        cells = _field_table(classified, f"{well}/0")
        probabilities = cells[["class_probability_negative", "class_probability_positive"]]
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
        truth = zarr.open_group(plate / well / "0" / "labels" / "ground_truth", mode="r")["0"][:]
        types = pd.read_parquet(
            plate / well / "0" / "tables" / "ground_truth_types" / "table.parquet"
        )
        kind = dict(zip(types["label"], types["cell_type"], strict=True))
        columns = ["t", "centroid_y_px", "centroid_x_px", "class"]
        for t, y, x, name in cells[columns].itertuples(index=False):
            found = truth[t, round(y), round(x)]
            if found:
                agree.append((name == "positive") == (kind[found] == 1))
    assert len(agree) > 200 and np.mean(agree) > 0.8
    from pipeline.classification.store import read_crops

    crops, index = read_crops(classified)  # the crops section: cut after the fields
    assert crops.shape[1:] == (4, 24, 24) and len(index) == sum(
        len(_field_table(classified, f"{well}/0")) for well in ("A/1", "A/2", "B/1", "B/2")
    )
    assert (classified.parent / "classified.report" / "plate_classes.png").is_file()
