"""Plates read over HTTP (issue 18, first piece): a plate served by a web server on the loopback
interface runs to the same labels and tables as the same plate on disk, and resumes."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from pipeline.config import RunConfig
from pipeline.errors import PipelineInputError
from pipeline.io.omezarr import open_plate
from pipeline.orchestration.runner import run
from pipeline.synthetic import simulate_plate

TABLE = "table.parquet"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A simulated plate (2 wells, 3 frames of 128 x 128) on disk, and its URL on a web server
    (Python's http.server: GET and HEAD, 404 for what is absent, no directory listing used)."""
    folder = tmp_path_factory.mktemp("served")
    plate = simulate_plate(
        folder / "plate.zarr", rows=1, columns=2, fields=1, n_frames=3, size=128, seed=9
    )
    handler = functools.partial(_Quiet, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield plate, f"http://127.0.0.1:{server.server_address[1]}/plate.zarr"
    finally:
        server.shutdown()
        thread.join()


def test_a_plate_is_opened_over_http_as_on_disk(served):
    plate, url = served
    remote, local = open_plate(url), open_plate(plate)
    assert [fov.path for fov in remote.fields] == [fov.path for fov in local.fields]
    for far, near in zip(remote.fields, local.fields, strict=True):
        assert far.pixel_size == near.pixel_size
        np.testing.assert_array_equal(far.data.values, near.data.values)
    with pytest.raises(PipelineInputError, match="cannot open a zarr group here"):
        open_plate(url.replace("plate.zarr", "absent.zarr"))


@pytest.mark.cluster
def test_a_plate_read_over_http_gives_the_labels_and_tables_of_the_plate_on_disk(
    served, tmp_path, shared_scheduler
):
    plate, url = served
    config = RunConfig.model_validate({"segmentation": {"method": "classical"}})
    summaries = {
        name: run(source, tmp_path / f"{name}.zarr", config=config, scheduler=shared_scheduler)
        for name, source in (("local", plate), ("http", url))
    }
    assert not summaries["http"].failed and not summaries["local"].failed
    for field in ("A/1/0", "A/2/0"):
        near = zarr.open_group(tmp_path / "local.zarr" / field / "labels/cells", mode="r")
        far = zarr.open_group(tmp_path / "http.zarr" / field / "labels/cells", mode="r")
        assert sorted(far.array_keys()) == sorted(near.array_keys()) == ["0"]
        np.testing.assert_array_equal(far["0"][:], near["0"][:])
        for table in ("cells", "tracks"):
            near = pd.read_parquet(tmp_path / "local.zarr" / field / "tables" / table / TABLE)
            far = pd.read_parquet(tmp_path / "http.zarr" / field / "tables" / table / TABLE)
            assert len(near) > 0
            pd.testing.assert_frame_equal(far, near)
    again = run(url, tmp_path / "http.zarr", config=config, scheduler=shared_scheduler)
    assert len(again.skipped) == 2  # resumes: the remote metadata is unchanged
