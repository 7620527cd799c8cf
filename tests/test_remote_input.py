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


CLASSICAL = RunConfig.model_validate({"segmentation": {"method": "classical"}})


@pytest.fixture(scope="module")
def local_result(served, tmp_path_factory: pytest.TempPathFactory, shared_scheduler) -> Path:
    """The served plate run from disk: what every remote run must equal."""
    out = tmp_path_factory.mktemp("local") / "local.zarr"
    assert not run(served[0], out, config=CLASSICAL, scheduler=shared_scheduler).failed
    return out


def _assert_same_results(output: Path, expected: Path) -> None:
    """Every field's label image (all levels) and cells and tracks tables are equal."""
    for field in ("A/1/0", "A/2/0"):
        near = zarr.open_group(expected / field / "labels/cells", mode="r")
        far = zarr.open_group(output / field / "labels/cells", mode="r")
        assert sorted(far.array_keys()) == sorted(near.array_keys())
        for level in near.array_keys():
            np.testing.assert_array_equal(far[level][:], near[level][:])
        for table in ("cells", "tracks"):
            near = pd.read_parquet(expected / field / "tables" / table / TABLE)
            far = pd.read_parquet(output / field / "tables" / table / TABLE)
            assert len(near) > 0
            pd.testing.assert_frame_equal(far, near)


@pytest.mark.cluster
def test_a_plate_read_over_http_gives_the_labels_and_tables_of_the_plate_on_disk(
    served, local_result, tmp_path, shared_scheduler
):
    _, url = served
    summary = run(url, tmp_path / "http.zarr", config=CLASSICAL, scheduler=shared_scheduler)
    assert not summary.failed
    _assert_same_results(tmp_path / "http.zarr", local_result)
    again = run(url, tmp_path / "http.zarr", config=CLASSICAL, scheduler=shared_scheduler)
    assert len(again.skipped) == 2  # resumes: the remote metadata is unchanged


@pytest.fixture
def bucket(served, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The served plate uploaded to a bucket of moto's S3 server on the loopback; the AWS
    environment points at it (credentials and endpoint, as a user's would point at theirs).

    moto is not among the test extras (with them, pip's resolver backtracks for many minutes
    over boto3/botocore, aiobotocore and torch): ``pip install "moto[server]"`` to run it."""
    import logging

    moto_server = pytest.importorskip(
        "moto.server", reason='needs moto\'s S3 server: pip install "moto[server]"'
    )
    s3fs = pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", f"http://{host}:{port}"),
    ):
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    filesystem = s3fs.S3FileSystem()
    filesystem.mkdir("plates")
    filesystem.put(str(served[0]), "plates/plate.zarr", recursive=True)
    try:
        yield "s3://plates/plate.zarr"
    finally:
        server.stop()


@pytest.mark.cluster
def test_a_plate_read_from_a_bucket_gives_the_labels_of_the_plate_on_disk(
    bucket, local_result, tmp_path
):
    """The run's own cluster (started after the environment names the endpoint) reads the
    plate from the bucket."""
    remote = run(bucket, tmp_path / "s3.zarr", config=CLASSICAL, workers=1)
    assert not remote.failed
    _assert_same_results(tmp_path / "s3.zarr", local_result)
