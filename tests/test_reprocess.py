"""``pipeline reprocess``: many plates on one cluster, computing only what is new or stale."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import zarr

from pipeline.orchestration.runner import ClusterOptions, reprocess
from pipeline.synthetic import simulate_plate

pytestmark = pytest.mark.cluster


def _plate(path: Path, seed: int) -> Path:
    return simulate_plate(path, rows=1, columns=1, fields=2, n_frames=2, size=96, seed=seed)


def _label_mtimes(out: Path, field: str) -> list[int]:
    files = sorted((out / field / "labels").rglob("*"))
    return [path.stat().st_mtime_ns for path in files if path.is_file()]


def _finished(out: Path) -> dict[str, str]:
    root = zarr.open_group(out, mode="r")
    return {path: root[path].attrs["pipeline"]["finished"] for path in ("A/1/0", "A/1/1")}


def test_reprocess_computes_new_and_stale_and_reports_bad_plates(
    tmp_path: Path, pipeline_command, shared_scheduler: str
) -> None:
    archive = tmp_path / "archive"
    _plate(archive / "first.zarr", seed=1)
    _plate(archive / "second.zarr", seed=2)
    results = tmp_path / "results"
    pattern = str(archive / "*.zarr")

    items = reprocess([pattern], results, cluster=ClusterOptions(scheduler=shared_scheduler))

    assert [Path(item.input_path).name for item in items] == ["first.zarr", "second.zarr"]
    assert all(not item.failed and not item.summary.skipped for item in items)
    before = {name: _finished(results / name) for name in ("first.zarr", "second.zarr")}
    labels_before = {f: _label_mtimes(results / "second.zarr", f) for f in ("A/1/0", "A/1/1")}
    assert (results / "first.report" / "index.html").is_file()

    # the archive changes: a new plate, one field of a plate re-acquired, a broken plate
    _plate(archive / "third.zarr", seed=3)
    chunk = sorted((archive / "second.zarr" / "A/1/1/0/c").rglob("*"))[-1]
    chunk.write_bytes(chunk.read_bytes())
    (archive / "broken.zarr").mkdir()
    (archive / "broken.zarr" / "notes.txt").write_text("not a plate")

    result = pipeline_command(
        "reprocess", pattern, "--out-dir", results, "--workers", "2", cwd=tmp_path
    )

    assert result.returncode == 3, result.stderr  # partial: the broken plate
    assert "Traceback" not in result.stderr
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in result.stdout.splitlines()}
    assert rows[str(archive / "first.zarr")] == ["0", "2", "0"]
    assert rows[str(archive / "second.zarr")] == ["1", "1", "0"]
    assert rows[str(archive / "third.zarr")] == ["2", "0", "0"]
    assert "not a zarr group" in rows[str(archive / "broken.zarr")][-1]
    assert _finished(results / "first.zarr") == before["first.zarr"]
    second = _finished(results / "second.zarr")
    assert second["A/1/0"] == before["second.zarr"]["A/1/0"]
    # the stale field was recomputed (record and label files strictly newer), the other not
    assert second["A/1/1"] > before["second.zarr"]["A/1/1"]
    stale_labels = _label_mtimes(results / "second.zarr", "A/1/1")
    assert min(stale_labels) > max(labels_before["A/1/1"])
    assert _label_mtimes(results / "second.zarr", "A/1/0") == labels_before["A/1/0"]
    assert not (results / "broken.zarr").exists()

    # nothing new: every plate skipped, no cluster started
    shutil.rmtree(archive / "broken.zarr")
    again = pipeline_command("reprocess", pattern, "--out-dir", results, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "dashboard" not in again.stdout
