"""Plates on object storage and over HTTP (issue 18): a plate served by a web server on the
loopback interface, or kept in a bucket of an S3 server there (moto's), runs to the same labels
and tables as the same plate on disk, into a local folder or a bucket; a run on a bucket
resumes after it was killed, and ``status`` and the QC report work there as on disk."""

from __future__ import annotations

import contextlib
import functools
import http.client
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from pipeline.config import RunConfig
from pipeline.errors import PipelineInputError
from pipeline.io.omezarr import open_plate
from pipeline.io.tables import read_cells, read_table
from pipeline.orchestration.plan import input_fingerprint
from pipeline.orchestration.records import unit_states
from pipeline.orchestration.runner import run
from pipeline.synthetic import simulate_plate


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


def _assert_same_results(output: str | Path, expected: Path) -> None:
    """Every field's label image (all levels), cells and tracks tables, and the plate-wide
    table are equal; ``output`` may be a bucket's URL."""
    for field in ("A/1/0", "A/2/0"):
        near = zarr.open_group(str(expected / field), mode="r")
        far = zarr.open_group(f"{output}/{field}", mode="r")
        assert sorted(far["labels/cells"].array_keys()) == sorted(near["labels/cells"].array_keys())
        for level in near["labels/cells"].array_keys():
            np.testing.assert_array_equal(
                far[f"labels/cells/{level}"][:], near[f"labels/cells/{level}"][:]
            )
        for table in ("cells", "tracks"):
            assert len(read_table(near, table)) > 0
            pd.testing.assert_frame_equal(read_table(far, table), read_table(near, table))
    pd.testing.assert_frame_equal(read_cells(output), read_cells(expected))


@pytest.fixture(scope="module")
def s3(served) -> Iterator[object]:
    """moto's S3 server on the loopback, the AWS environment pointing at it (credentials and
    endpoint, as a user's would point at theirs), the served plate uploaded to the bucket
    ``plates`` and an empty bucket ``results``; yields an s3fs file system of the server."""
    import logging

    moto_server = pytest.importorskip(
        "moto.server", reason='needs moto\'s S3 server: pip install "moto[server]"'
    )
    s3fs = pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", f"http://{host}:{port}"),
        ):
            patch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        filesystem = s3fs.S3FileSystem()
        filesystem.mkdir("plates")
        filesystem.mkdir("results")
        filesystem.put(str(served[0]), "plates/plate.zarr", recursive=True)
        try:
            yield filesystem
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@pytest.fixture(scope="module")
def s3_scheduler(s3) -> Iterator[str]:
    """A local cluster started once the environment names the S3 server (its workers
    inherit it)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


@pytest.mark.cluster
def test_plates_over_http_and_in_a_bucket_written_to_a_bucket_equal_the_run_on_disk(
    served, s3, s3_scheduler, local_result
):
    """HTTP -> bucket and bucket -> bucket give the labels and tables of disk -> disk; the
    bucket's outputs have their ledger (``status``), QC report and lock released, and a rerun
    skips every field (fingerprints: the served metadata, the bucket's listing)."""
    for source, out in (
        (served[1], "s3://results/http.zarr"),
        ("s3://plates/plate.zarr", "s3://results/s3.zarr"),
    ):
        summary = run(source, out, config=CLASSICAL, scheduler=s3_scheduler)
        assert not summary.failed
        _assert_same_results(out, local_result)
        ledger, states = unit_states(out, verify=True)
        assert ledger["status"] == "complete"
        assert [unit.state for unit in states] == ["done", "done"]
        name = out.removeprefix("s3://").removesuffix(".zarr")
        assert s3.exists(f"{name}.report/index.html")
        assert not s3.exists(f"{name}.zarr.lock")
        assert not s3.exists(f"results/.{name.split('/')[1]}.zarr.scratch")
        again = run(source, out, config=CLASSICAL, scheduler=s3_scheduler)
        assert len(again.skipped) == 2  # the input's fingerprint is unchanged


def test_a_changed_object_in_the_bucket_changes_the_fingerprint(s3):
    """The bucket's fingerprint is the listing's names, sizes and ETags: rewriting one chunk
    with other bytes of the same size changes it; nothing else does."""
    fov = open_plate("s3://plates/plate.zarr").fields[0]
    before = input_fingerprint(fov)
    assert input_fingerprint(open_plate("s3://plates/plate.zarr").fields[0]) == before
    chunk = next(key for key in s3.find(f"plates/plate.zarr/{fov.path}/0/c"))
    data = s3.cat(chunk)
    try:
        s3.pipe(chunk, bytes(reversed(data)))
        assert input_fingerprint(open_plate("s3://plates/plate.zarr").fields[0]) != before
    finally:
        s3.pipe(chunk, data)
    assert input_fingerprint(open_plate("s3://plates/plate.zarr").fields[0]) == before


@pytest.mark.cluster
def test_a_run_killed_on_a_bucket_resumes_to_the_results_of_the_plate_on_disk(
    s3, s3_scheduler, local_result, tmp_path
):
    """``pipeline run`` from the bucket to the bucket, killed (its process group) once the
    first field is done: its lock is stale and taken over, the rerun computes only the other
    field, and the results equal the plate's on disk."""
    out = "s3://results/killed.zarr"
    config = tmp_path / "classical.yaml"
    config.write_text("segmentation:\n  method: classical\n")
    command = [sys.executable, "-m", "pipeline", "run", "s3://plates/plate.zarr"]
    process = subprocess.Popen(
        [*command, "--out", out, "--config", str(config), "--workers", "1"],
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None and _done(out) < 1:
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()[1]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert s3.exists("results/killed.zarr.lock")  # left by the killed run
    summary = run("s3://plates/plate.zarr", out, config=CLASSICAL, scheduler=s3_scheduler)
    assert not summary.failed
    assert len(summary.skipped) == 1
    _assert_same_results(out, local_result)
    assert unit_states(out, verify=True)[0]["status"] == "complete"


def _done(out: str) -> int:
    try:
        return sum(unit.state == "done" for unit in unit_states(out)[1])
    except PipelineInputError:  # the output is being created: no ledger yet
        return 0


class _FaultyEndpoint(BaseHTTPRequestHandler):
    """Relays S3 requests to moto's server, but answers every fifth request for a chunk with
    HTTP 503 ``SlowDown`` (a transient error) and every request for ``broken`` with 403 (a
    permanent one)."""

    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int]
    broken: str
    requests = itertools.count()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _error(self, status: int, code: str) -> None:
        body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{code}</Message></Error>"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body.encode())

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b""
        while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
            body += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        return body

    def _relay(self) -> None:
        body = self._body()
        headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
        headers["Content-Length"] = str(len(body))
        path = self.path.split("?", 1)[0]
        if path.endswith(self.broken):
            return self._error(403, "AccessDenied")
        if "/c/" in path and next(self.requests) % 5 == 0:
            return self._error(503, "SlowDown")
        upstream = http.client.HTTPConnection(*self.upstream)
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay


@pytest.mark.cluster
def test_transient_store_errors_are_retried_and_counted_and_a_permanent_one_names_its_object(
    s3, s3_scheduler, local_result, monkeypatch
):
    """Through an endpoint that fails every fifth chunk request with 503 and one chunk of
    field A/2/0 always with 403: field A/1/0 comes out as on disk, the summary counts the
    retries, and A/2/0 fails with an error naming its chunk; ``--only-failed`` through the
    sound endpoint then computes A/2/0 alone, and the output equals the plate's on disk."""
    import s3fs

    field = open_plate("s3://plates/plate.zarr").fields[1]
    broken = f"{field.path}/0/c/1/0/0/0"  # frame 1, channel 0
    assert s3.exists(f"plates/plate.zarr/{broken}")
    handler = type(
        "Faulty",
        (_FaultyEndpoint,),
        {"upstream": _endpoint_of(os.environ["AWS_ENDPOINT_URL"]), "broken": broken},
    )
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        summary = run(
            "s3://plates/plate.zarr", "s3://results/faulty.zarr", config=CLASSICAL, workers=1
        )
    finally:
        proxy.shutdown()
        thread.join()
        monkeypatch.undo()
        s3fs.S3FileSystem.clear_instance_cache()
    assert summary.store_retries > 0
    failed = {outcome.path: outcome.error for outcome in summary.failed}
    assert list(failed) == [field.path]
    assert "plate.zarr/A/2/0" in failed[field.path] and "1/0/0/0" in failed[field.path]
    near = zarr.open_group(str(local_result / "A/1/0"), mode="r")
    far = zarr.open_group("s3://results/faulty.zarr/A/1/0", mode="r")
    np.testing.assert_array_equal(far["labels/cells/0"][:], near["labels/cells/0"][:])
    pd.testing.assert_frame_equal(read_table(far, "cells"), read_table(near, "cells"))
    assert unit_states("s3://results/faulty.zarr")[0]["status"] == "partial"

    again = run(
        "s3://plates/plate.zarr",
        "s3://results/faulty.zarr",
        config=CLASSICAL,
        scheduler=s3_scheduler,
        only_failed=True,
    )
    assert [o.path for o in again.fields if not o.skipped] == [field.path]
    assert not again.failed
    _assert_same_results("s3://results/faulty.zarr", local_result)


def _endpoint_of(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)
