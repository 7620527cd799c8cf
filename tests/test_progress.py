"""The progress of a field follows the chunks written to its scratch array."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.orchestration import progress
from pipeline.orchestration.progress import chunk_progress


def test_progress_moves_chunk_by_chunk_and_ends_at_the_field_frames(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "POLL_SECONDS", 0.01)
    reports: list[float] = []
    folder = tmp_path / "scratch"
    (folder / "c").mkdir(parents=True)
    (folder / "zarr.json").write_text("{}")  # metadata: not a chunk
    with chunk_progress(folder, chunks=4, frames=8, report=reports.append):
        for k in range(3):
            (folder / "c" / str(k)).write_bytes(b"chunk")
            deadline = time.monotonic() + 5
            while sum(reports) < 2 * (k + 1) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sum(reports) == pytest.approx(2 * (k + 1))  # 8 frames x k/4 chunks
    assert sum(reports) == pytest.approx(8)  # the rest when the field's graph is done
    assert len(reports) == 4


def test_a_failed_attempt_takes_its_progress_back(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(progress, "POLL_SECONDS", 0.01)
    reports: list[float] = []
    folder = tmp_path / "scratch"
    folder.mkdir()
    with pytest.raises(RuntimeError), chunk_progress(folder, 2, 6, reports.append):
        (folder / "0").write_bytes(b"chunk")
        deadline = time.monotonic() + 5
        while not reports and time.monotonic() < deadline:
            time.sleep(0.01)
        raise RuntimeError("halo too small: the field is retried")
    assert reports[0] == pytest.approx(3) and sum(reports) == pytest.approx(0)
