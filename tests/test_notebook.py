"""The quickstart notebook runs headless, top to bottom, in this test environment's Python."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_S = 180


def _kernel_of_this_python(jupyter_path: Path) -> str:
    """Write a "python3" kernelspec that starts ``sys.executable``; return its name."""
    spec_dir = jupyter_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return "python3"


def test_stored_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [], "clear the notebook's outputs before saving it"
        assert cell.execution_count is None
    assert notebook.metadata.kernelspec.name == "python3"


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    jupyter_path = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    kernel_name = _kernel_of_this_python(jupyter_path)
    assert KernelSpecManager().get_kernel_spec(kernel_name).argv[0] == sys.executable
    # The notebook's workdir is a tempfile.mkdtemp(): keep it under tmp_path.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=kernel_name,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(run_dir)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    print(f"quickstart notebook ran in {elapsed:.1f} s")

    outputs = [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    ]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3  # segmentation, tracks, cells per frame
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "2 fields processed, 0 failed" in text

    (workdir,) = scratch.glob("pipeline-quickstart-*")
    results = workdir / "results.zarr"
    cells = pd.read_parquet(results / "tables" / "cells")
    assert len(cells) > 0
    assert set(cells["well"].astype(str)) == {"A1", "A2"}
    assert {"t", "label", "y", "x", "track_id"} <= set(cells.columns)
    tracks = pd.read_parquet(results / "A" / "1" / "0" / "tables" / "tracks" / "table.parquet")
    assert len(tracks) > 0
