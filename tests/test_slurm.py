"""Runs on a real single-node SLURM (deploy/slurm/testing/start.sh): Dask workers as SLURM jobs
and one whole run as one sbatch job, each giving what a local run gives; adaptive scaling to
no jobs.

Skipped, with the reason, only where SLURM is not installed (deploy/slurm/testing/install.sh)
or its daemons do not come up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

import pipeline.api
from pipeline.orchestration.cluster import connect
from pipeline.synthetic import simulate_plate

pytestmark = [pytest.mark.slurm, pytest.mark.cluster]

REPO = Path(__file__).parents[1]
TESTING = REPO / "deploy" / "slurm" / "testing"
FIELDS = ("A/1/0", "A/2/0")


def _squeue() -> list[str]:
    """Ids of the jobs SLURM still knows as pending, running or completing."""
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def _wait_for_no_jobs(timeout: float) -> list[str]:
    """Poll ``squeue`` until no job is left or ``timeout`` seconds pass; the jobs left."""
    deadline = time.monotonic() + timeout
    while (jobs := _squeue()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return jobs


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private single-node SLURM for this module; SLURM_CONF points at it meanwhile."""
    missing = [
        t
        for t in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
        if not shutil.which(t)
    ]
    if missing:
        pytest.skip(
            f"SLURM is not installed ({', '.join(missing)} not found); "
            "run deploy/slurm/testing/install.sh as root"
        )
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(
        ["bash", str(TESTING / "start.sh"), str(state)], capture_output=True, text=True, timeout=120
    )
    try:
        if started.returncode != 0:
            pytest.skip(f"the test SLURM did not come up: {started.stderr.strip()}")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SLURM_CONF", str(state / "slurm.conf"))
            yield state
    finally:
        subprocess.run(["bash", str(TESTING / "stop.sh"), str(state)], timeout=120, check=False)


def _jobqueue_yaml(directory: Path) -> Path:
    """The CPU section of ``deploy/slurm/jobqueue.yaml`` sized for the test node."""
    config = yaml.safe_load((REPO / "deploy" / "slurm" / "jobqueue.yaml").read_text())
    config["jobqueue"] = {"slurm": config["jobqueue"]["slurm"]}
    config["jobqueue"]["slurm"].update(
        {
            "queue": None,
            "cores": 1,
            "processes": 1,
            "memory": "2GiB",
            "walltime": "00:10:00",
            "local-directory": str(directory / "local"),
            "log-directory": str(directory / "logs"),
            "shared-temp-directory": str(directory / "tls"),
        }
    )
    path = directory / "jobqueue.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def plate_and_local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small simulated plate and its output from a run on a local cluster (the reference)."""
    directory = tmp_path_factory.mktemp("slurm-plate")
    plate = simulate_plate(
        directory / "plate.zarr", rows=1, columns=2, fields=1, n_frames=3, size=128, seed=11
    )
    summary = pipeline.api.run(plate, directory / "local.zarr", workers=1)
    assert not summary.failed
    return plate, directory / "local.zarr"


def _assert_same_results(out: Path, reference: Path) -> None:
    """Labels and cell tables of both fields of ``out`` equal those of ``reference``."""
    for field in FIELDS:
        labels = zarr.open_array(out / field / "labels" / "cells" / "0", mode="r")[...]
        expected = zarr.open_array(reference / field / "labels" / "cells" / "0", mode="r")[...]
        assert labels.max() > 0, field
        np.testing.assert_array_equal(labels, expected, err_msg=field)
        table, expected_table = (
            pd.read_parquet(root / field / "tables" / "cells" / "table.parquet")
            .sort_values(["t", "label"])
            .reset_index(drop=True)
            for root in (out, reference)
        )
        pd.testing.assert_frame_equal(table, expected_table)


@pytest.mark.timeout(300)
def test_run_on_slurm_workers_equals_local_run(slurm, plate_and_local_run, tmp_path):
    plate, reference = plate_and_local_run
    config = _jobqueue_yaml(tmp_path)
    summary = pipeline.api.run(
        plate, tmp_path / "slurm.zarr", cluster="slurm", cluster_config=config, max_jobs=2
    )
    assert not summary.failed
    _assert_same_results(tmp_path / "slurm.zarr", reference)

    # The workers were SLURM jobs: the job logs show workers that registered over TLS.
    logs = sorted((tmp_path / "logs").glob("pipeline-worker-*.err"))
    registered = [log for log in logs if "Registered to:      tls://" in log.read_text()]
    assert registered, [log.read_text() for log in logs]
    # ... and closing the cluster cancelled them all.
    assert _wait_for_no_jobs(30) == []


@pytest.mark.timeout(180)
def test_adaptive_cluster_shrinks_to_no_jobs(slurm, tmp_path):
    config = _jobqueue_yaml(tmp_path)
    with connect("slurm", cluster_config=config, max_jobs=2) as run:
        assert _squeue() == []  # no work, no jobs
        # Functions the SLURM workers can import (this test module is not on their path).
        futures = run.client.map(time.sleep, [0.5] * 8, pure=False)
        most = 0  # jobs at once
        while not all(f.done() for f in futures):
            most = max(most, len(_squeue()))
            time.sleep(0.2)
        assert run.client.gather(futures) == [None] * 8
        del futures  # results held on a worker would keep it
        assert 1 <= most <= 2  # max_jobs
        # Idle: the cluster gives its jobs back while it is still open.
        assert _wait_for_no_jobs(60) == []
        assert run.client.scheduler_info()["workers"] == {}


def _wait_for_job(job_id: str, timeout: float) -> dict[str, str]:
    """Poll ``scontrol show job`` until the job has ended (or ``timeout``); its fields.

    (``sbatch --wait`` would do, but it polls at 2, 4, 8, 16, 32 s intervals.)
    """
    deadline = time.monotonic() + timeout
    while True:
        shown = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True
        )
        fields = dict(item.split("=", 1) for item in shown.stdout.split() if "=" in item)
        if fields["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return fields
        assert time.monotonic() < deadline, f"job {job_id} still {fields['JobState']}"
        time.sleep(0.5)


@pytest.mark.timeout(300)
def test_sbatch_script_runs_a_whole_plate(slurm, plate_and_local_run, tmp_path):
    plate, reference = plate_and_local_run
    log = tmp_path / "job.out"
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--cpus-per-task=2",
            "--mem=4G",
            "--time=00:10:00",
            f"--output={log}",
            str(REPO / "deploy" / "slurm" / "pipeline-run.sbatch"),
            str(plate),
            "out.zarr",  # relative: to the directory sbatch is called from
        ],
        cwd=tmp_path,
        env={**os.environ, "PIPELINE_VENV": sys.prefix},
        capture_output=True,
        text=True,
        check=True,
    )
    job = _wait_for_job(submitted.stdout.strip().split(";")[0], timeout=180)
    output = log.read_text() if log.exists() else ""
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), output
    assert "--workers 2" in output  # one local worker per CPU of the allocation
    _assert_same_results(tmp_path / "out.zarr", reference)


@pytest.mark.timeout(420)
def test_nightly_reprocess_job_runs_workers_as_jobs_then_skips(
    slurm, plate_and_local_run, tmp_path
):
    """deploy/schedule/pipeline-reprocess.sbatch, as cron or the systemd timer submit it: a
    driver job whose Dask workers are SLURM jobs of their own; the next night skips it all."""
    plate, reference = plate_and_local_run
    archive = tmp_path / "archive"
    shutil.copytree(plate, archive / "plate.zarr")
    results = tmp_path / "results"
    env = {
        **os.environ,
        "PIPELINE_VENV": sys.prefix,
        "ARCHIVE_GLOB": str(archive / "*.zarr"),
        "RESULTS_DIR": str(results),
        "CLUSTER_CONFIG": str(_jobqueue_yaml(tmp_path)),
        "PIPELINE_MAX_JOBS": "1",  # the test node has 2 CPUs: the driver's and one worker's
    }

    def night() -> tuple[dict[str, str], str]:
        submitted = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--cpus-per-task=1",
                "--mem=2G",
                f"--chdir={tmp_path}",
                str(REPO / "deploy" / "schedule" / "pipeline-reprocess.sbatch"),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        job_id = submitted.stdout.strip().split(";")[0]
        job = _wait_for_job(job_id, timeout=300)
        return job, (tmp_path / f"pipeline-reprocess-{job_id}.log").read_text()

    job, log = night()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log
    _assert_same_results(results / "plate.zarr", reference)
    assert f"{archive / 'plate.zarr'}\t2\t0\t0" in log  # computed, skipped, failed
    assert list((tmp_path / "logs").glob("pipeline-worker-*.err")), "no worker jobs ran"

    job, log = night()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert f"{archive / 'plate.zarr'}\t0\t2\t0" in log
    assert "Dask dashboard" not in log  # nothing to do: no cluster, no worker jobs
