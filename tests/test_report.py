"""The QC report, checked against the run's own tables (pandas) and scikit-image."""

from __future__ import annotations

import html
import os
import re
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import zarr
from skimage.segmentation import find_boundaries

from pipeline.api import run
from pipeline.cli import main
from pipeline.errors import PipelineInputError
from pipeline.orchestration.records import RUN_ATTRIBUTE
from pipeline.qc.report import (
    choose_level,
    outline_overlay,
    safe_name,
    well_cell_counts,
    write_qc_report,
)
from pipeline.synthetic import simulate_plate


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory, shared_scheduler: str) -> dict[str, Path]:
    """A 1 x 2 plate (a field per well, 3 frames of 128 x 128) run as a plate and a lone image."""
    tmp = tmp_path_factory.mktemp("report")
    plate = simulate_plate(
        tmp / "plate.zarr", rows=1, columns=2, fields=1, n_frames=3, size=128, seed=11
    )
    run(plate, tmp / "out.zarr", scheduler=shared_scheduler)
    run(plate / "A" / "1" / "0", tmp / "lone.zarr", scheduler=shared_scheduler)
    return {"plate": tmp / "out.zarr", "lone": tmp / "lone.zarr"}


def _links(index: Path) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', index.read_text(encoding="utf-8"))


def _check_pngs(index: Path, links: list[str]) -> None:
    """Every link is a relative PNG inside the report folder that decodes to a real image."""
    for link in links:
        assert link.endswith(".png") and "/" not in link and not Path(link).is_absolute()
        picture = matplotlib.image.imread(index.parent / link)
        assert picture.ndim == 3 and min(picture.shape[:2]) >= 100
        assert picture[..., :3].std() > 0.01  # not a blank canvas


def _truth_counts(output: Path) -> pd.DataFrame:
    """Cells per well at frames 0 and T-1, from the plate-wide Parquet dataset with pandas."""
    cells = pd.read_parquet(output / "tables" / "cells")
    root = zarr.open_group(output, mode="r")
    rows = {}
    for well, part in cells.groupby("well", observed=True):
        row, column = str(well)[0], str(well)[1:]
        n_frames = root[f"{row}/{column}/0/0"].shape[0]
        rows[f"{row}/{column}"] = {
            "cells_first": int((part["t"] == 0).sum()),
            "cells_last": int((part["t"] == n_frames - 1).sum()),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


@pytest.mark.cluster
def test_plate_report_links_every_figure_and_each_decodes(outputs, tmp_path):
    index = write_qc_report(outputs["plate"], tmp_path / "qc")
    assert index == tmp_path / "qc" / "index.html"
    links = _links(index)
    expected = {
        "plate_heatmap.png",
        "plate_growth.png",
        "A1_0_outlines.png",
        "A1_0_tracks.png",
        "A2_0_outlines.png",
        "A2_0_tracks.png",
    }
    assert set(links) == expected
    assert {path.name for path in (tmp_path / "qc").glob("*.png")} == expected
    _check_pngs(index, links)
    text = index.read_text(encoding="utf-8")
    assert text.index("plate_heatmap.png") < text.index("A1_0_outlines.png")  # heat map on top
    root = zarr.open_group(outputs["plate"], mode="r")
    for path in ("A/1/0", "A/2/0"):
        cells = pd.read_parquet(outputs["plate"] / path / "tables" / "cells" / "table.parquet")
        qc = root[path].attrs["pipeline"]["merge_qc"]
        assert f"{qc['large_increase']}/{qc['links']} links" in text
        assert f'<td class="num">{cells["track_id"].nunique()}</td>' in text


@pytest.mark.cluster
def test_heat_map_counts_equal_the_parquet_tables(outputs):
    counts = well_cell_counts(outputs["plate"]).set_index("well")
    truth = _truth_counts(outputs["plate"])
    assert list(counts.index) == ["A/1", "A/2"]
    assert (counts["fields"] == 1).all()
    for column in ("cells_first", "cells_last"):
        assert counts.loc[truth.index, column].astype(int).tolist() == truth[column].tolist()
    assert (truth["cells_first"] > 0).all()


def test_outline_overlay_marks_exactly_the_skimage_boundaries():
    labels = np.zeros((40, 50), dtype=np.uint16)
    labels[5:20, 5:20] = 1
    labels[5:20, 20:32] = 2  # touches cell 1
    yy, xx = np.mgrid[:40, :50]
    labels[(yy - 30) ** 2 + (xx - 38) ** 2 <= 36] = 7
    labels[35, 5] = 9  # a one-pixel cell
    image = np.random.default_rng(0).normal(100, 20, labels.shape) + 50 * (labels > 0)
    color = (0, 255, 0)
    for mode in ("inner", "thick"):
        rgb = outline_overlay(image, labels, color=color, mode=mode)
        assert rgb.shape == (*labels.shape, 3) and rgb.dtype == np.uint8
        marked = np.all(rgb == color, axis=-1)
        np.testing.assert_array_equal(marked, find_boundaries(labels, mode=mode))
        # elsewhere: grey, the image linearly stretched between its 1st and 99.8th percentiles
        low, high = np.percentile(image, [1, 99.8])
        grey = np.round(np.clip((image - low) / (high - low), 0, 1) * 255)
        assert (rgb[~marked] == grey[~marked][:, None]).all()
    with pytest.raises(ValueError, match="one shape"):
        outline_overlay(image, labels[:-1])


@pytest.mark.cluster
def test_failed_fields_are_listed_with_their_error(outputs, tmp_path):
    # As a run leaves a partial output: the failed well's field is gone and unlisted, the
    # run's ledger on the root names it with its error; a second field has no completion
    # record.
    output = tmp_path / "partial.zarr"
    shutil.copytree(outputs["plate"], output)
    root = zarr.open_group(output, mode="r+")
    error = "CorruptChunkError: cannot read chunk c/0/0/0/0 (<zstd> & co): A/2/0/0"
    run_record = dict(root.attrs[RUN_ATTRIBUTE])
    run_record["status"] = "partial"
    run_record["failures"] = [{"field": "A/2/0", "error": error}]
    run_record["units"]["A/2/0"] = {"state": "failed", "error": error, "time": None}
    root.attrs[RUN_ATTRIBUTE] = run_record
    ome = root.attrs["ome"]
    ome["plate"]["wells"] = [w for w in ome["plate"]["wells"] if w["path"] != "A/2"]
    root.attrs["ome"] = ome
    shutil.rmtree(output / "A" / "2")
    root["A/1/0"].attrs["pipeline"] = {"status": "running"}

    index = write_qc_report(output, tmp_path / "qc")
    text = index.read_text(encoding="utf-8")
    assert html.escape(error) in text and error not in text  # escaped, not raw HTML
    rows = {row.split("</td>")[0]: row for row in re.findall(r"<tr><td>(.*?)</tr>", text)}
    assert "failed" in rows["A/2"] and html.escape(error) in rows["A/2"]
    assert "running" in rows["A/1"]
    # no field completed: no field figures (the growth curves are the run's, made before)
    assert set(_links(index)) == {"plate_heatmap.png", "plate_growth.png"}
    _check_pngs(index, _links(index))
    counts = well_cell_counts(output).set_index("well")
    assert counts["cells_first"].isna().all() and (counts["fields"] == 0).all()


@pytest.mark.cluster
def test_an_output_whose_fields_all_failed_lists_the_failures(outputs, tmp_path):
    # No field completed: the run writes no plate metadata, only its ledger.
    output = tmp_path / "failed.zarr"
    shutil.copytree(outputs["plate"], output)
    root = zarr.open_group(output, mode="r+")
    run_record = dict(root.attrs[RUN_ATTRIBUTE])
    errors = {path: f"ValueError: field {path} broke" for path in run_record["units"]}
    run_record["units"] = {
        path: {"state": "failed", "error": error, "time": None} for path, error in errors.items()
    }
    root.attrs[RUN_ATTRIBUTE] = run_record
    del root.attrs["ome"]
    index = write_qc_report(output, tmp_path / "qc")
    text = index.read_text(encoding="utf-8")
    assert all(error in text for error in errors.values()) and len(errors) == 2
    assert _links(index) == []
    assert well_cell_counts(output).empty
    with pytest.raises(PipelineInputError):
        write_qc_report(tmp_path / "nothing.zarr", tmp_path / "qc2")


@pytest.mark.cluster
def test_a_field_without_a_cells_table_is_skipped_gracefully(outputs, tmp_path):
    output = tmp_path / "no_table.zarr"
    shutil.copytree(outputs["plate"], output)
    shutil.rmtree(output / "A" / "2" / "0" / "tables" / "cells")
    index = write_qc_report(output, tmp_path / "qc", timepoints=1)
    assert "no tables/cells" in index.read_text(encoding="utf-8")
    links = set(_links(index))
    assert "A2_0_outlines.png" in links and "A2_0_tracks.png" not in links
    _check_pngs(index, list(links))
    counts = well_cell_counts(output).set_index("well")
    assert pd.isna(counts.loc["A/2", "cells_first"])
    assert counts.loc["A/1", "cells_first"] == _truth_counts(outputs["plate"]).loc["A/1"].iloc[0]


@pytest.mark.cluster
def test_lone_image_report_has_no_heat_map(outputs, tmp_path):
    index = write_qc_report(outputs["lone"], tmp_path / "qc", channel="cytoplasm", max_pixels=50)
    links = _links(index)
    assert set(links) == {"image_outlines.png", "image_tracks.png"}
    assert not (tmp_path / "qc" / "plate_heatmap.png").exists()
    _check_pngs(index, links)
    cells = pd.read_parquet(outputs["lone"] / "tables" / "cells" / "table.parquet")
    n_frames = zarr.open_array(outputs["lone"] / "0", mode="r").shape[0]
    first, last = (int((cells["t"] == t).sum()) for t in (0, n_frames - 1))
    assert f"{first} → {last}" in index.read_text(encoding="utf-8")
    assert well_cell_counts(outputs["lone"]).empty
    with pytest.raises(ValueError, match="no channel"):
        write_qc_report(outputs["lone"], tmp_path / "qc", channel="membrane")


def test_choose_level_takes_the_finest_level_that_fits():
    dims = ("t", "c", "y", "x")
    shapes = [(1, 2, 4000 // 2**i, 3000 // 2**i) for i in range(3)]
    assert choose_level(shapes, dims, 5000) == (0, 1)
    assert choose_level(shapes, dims, 2000) == (1, 1)
    assert choose_level(shapes, dims, 1024) == (2, 1)
    assert choose_level(shapes, dims, 300) == (2, 4)  # 1000 px read every 4th: 250 <= 300


def test_safe_name():
    assert safe_name("A/1/0") == "A1_0"
    assert safe_name("B/12/3") == "B12_3"
    assert safe_name("") == "image"
    assert safe_name("A/1/f 0") == "A1_f_0"


@pytest.mark.cluster
def test_run_writes_its_report_and_the_command_rewrites_it(outputs, tmp_path):
    own = outputs["plate"].with_suffix(".report") / "index.html"  # written by the run itself
    assert set(_links(own)) == set(_links(write_qc_report(outputs["plate"], tmp_path / "qc")))
    assert main(["report", str(outputs["plate"]), "--dir", str(tmp_path / "again")]) == 0
    _check_pngs(tmp_path / "again" / "index.html", _links(tmp_path / "again" / "index.html"))


@pytest.mark.cluster
def test_figures_drawn_on_the_workers_equal_those_drawn_here(outputs, tmp_path, shared_scheduler):
    """A run draws its fields' figures on the cluster: the same report, byte for byte."""
    from distributed import Client, get_task_stream

    here = write_qc_report(outputs["plate"], tmp_path / "here")
    with Client(shared_scheduler) as client, get_task_stream(client) as stream:
        there = write_qc_report(outputs["plate"], tmp_path / "there", client=client)
    drawn = [task for task in stream.data if str(task["key"]).startswith("_field_entry")]
    assert len(drawn) == 2  # one task per field, on the workers
    assert there.read_text(encoding="utf-8") == here.read_text(encoding="utf-8")
    files = sorted(path.name for path in here.parent.iterdir())
    assert files == sorted(path.name for path in there.parent.iterdir())
    for name in files:
        assert (there.parent / name).read_bytes() == (here.parent / name).read_bytes(), name


@pytest.mark.cluster
def test_a_failing_report_does_not_fail_the_run(
    outputs, tmp_path, monkeypatch, capsys, shared_scheduler
):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr("pipeline.qc.report.write_qc_report", broken)
    plate = zarr.open_group(outputs["plate"], mode="r").attrs["pipeline_run"]["input"]
    summary = run(plate, tmp_path / "out.zarr", scheduler=shared_scheduler)
    assert not summary.failed and len(summary.fields) == 2
    assert "warning: no QC report (RuntimeError: no fonts)" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# Where the browser test leaves its screenshot of the report (CI keeps the folder).
ARTIFACTS = Path(os.environ.get("PIPELINE_TEST_ARTIFACTS", Path(__file__).parents[1] / "artifacts"))


@pytest.mark.cluster
@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Chromium and its driver (Debian: chromium, chromium-driver; "
    ".ci/install-chromium.sh installs them)",
)
def test_the_report_opens_in_a_real_browser_with_every_picture_and_no_console_error(outputs):
    """The plate report in headless Chromium: every <img> decoded at its full size, no error
    in the console, and a screenshot that is not blank (kept in ARTIFACTS)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    index = write_qc_report(outputs["plate"], outputs["plate"].parent / "browser-qc")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(index.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map("
            "i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight]);"
        )
        console = driver.get_log("browser")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        screenshot = ARTIFACTS / "qc-report.png"
        assert driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    assert sorted(src for src, *_ in images) == sorted(set(_links(index)))
    for src, complete, width, height in images:
        assert complete and min(width, height) >= 100, src
    assert not [entry for entry in console if entry["level"] in ("SEVERE", "WARNING")], console
    picture = matplotlib.image.imread(screenshot)
    assert picture[..., :3].std() > 0.05  # text and figures, not an empty page
