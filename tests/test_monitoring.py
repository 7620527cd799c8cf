"""Monitoring a live run: the printed dashboard serves /status and Prometheus /metrics, and the
run leaves a Dask performance report and a QC report beside its output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pipeline.synthetic import simulate_plate

pytestmark = pytest.mark.cluster


def _fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read().decode(errors="replace")


@pytest.mark.timeout(300)
def test_live_run_serves_dashboard_and_metrics_then_writes_reports(tmp_path: Path) -> None:
    plate = simulate_plate(
        tmp_path / "plate.zarr", rows=1, columns=2, fields=1, n_frames=4, size=192, seed=5
    )
    out = tmp_path / "out.zarr"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(plate), "--out", str(out), "--workers", "1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        link = None
        for line in process.stdout:
            match = re.search(r"Dask dashboard: (http://\S+)/status", line)
            if match:
                link = match.group(1)
                break
        assert link is not None, "no dashboard link printed"
        assert link.startswith("http://127.0.0.1:")  # localhost only
        status, page = _fetch(f"{link}/status")
        assert status == 200 and "<html" in page.lower()
        status, metrics = _fetch(f"{link}/metrics")
        assert status == 200
        workers = re.search(r"^dask_scheduler_workers\{[^}]*\} (\S+)", metrics, re.MULTILINE)
        assert workers is not None, metrics[:500]
        assert "dask_scheduler_tasks" in metrics
        rest = process.stdout.read()
    finally:
        process.wait(timeout=240)
    assert process.returncode == 0
    reports = tmp_path / "out.report"
    [performance] = reports.glob("dask-performance-*.html")
    assert "Dask Performance Report" in performance.read_text()
    assert f"QC report: {reports / 'index.html'}" in rest
    index = (reports / "index.html").read_text()
    images = re.findall(r'src="([^"]+\.png)"', index)
    assert {"A1_0_outlines.png", "A2_0_tracks.png", "plate_heatmap.png"} <= set(images)
    assert all((reports / image).stat().st_size > 1000 for image in images)
