"""Shared fixtures: one small simulated plate for the tests that run the whole pipeline."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.synthetic import simulate_plate


@pytest.fixture(scope="session")
def small_plate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated 1 x 2 plate, one field per well, 3 frames of 256 x 256 (two pyramid levels).

    Shared by several tests: never modify it; copy it first.
    """
    return simulate_plate(
        tmp_path_factory.mktemp("plate") / "plate.zarr",
        rows=1,
        columns=2,
        fields=1,
        n_frames=3,
        size=256,
        seed=3,
    )


@pytest.fixture(scope="session")
def shared_scheduler() -> Iterator[str]:
    """Address of one local Dask cluster (2 worker processes, 1 thread each) for the session.

    Tests whose subject is what a run computes, not how it starts its cluster, pass it as
    ``run(..., scheduler=...)``: workers then import torch and load the model once, not once
    per run. Tests of cluster start-up, worker loss or the command line start their own.
    """
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start a cluster or need SLURM are slow as well: ``-m "not slow"`` is the
    fast subset. The SLURM tests share one controller and its queue: under pytest-xdist they
    run one after the other in one worker (``--dist loadgroup``)."""
    for item in items:
        if item.get_closest_marker("cluster") or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))


# Dask's scheduler warns when a key comes back with other dependencies while the first is
# still known ("Detected different `run_spec`", dask/dask#9888): two graphs sharing a name for
# different work, which can deadlock or give one graph the other's result. Seen once on a run
# of a real movie (issue 17); every test and every command run by the tests must be free of it.
KEY_COLLISION = "Detected different `run_spec`"


class _KeyCollisions(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if KEY_COLLISION in record.getMessage():
            self.messages.append(record.getMessage()[:400])


@pytest.fixture(autouse=True)
def no_key_collisions_in_the_scheduler() -> Iterator[None]:
    """Fail a test during which an in-process scheduler (a test's own cluster, or
    :func:`shared_scheduler`) saw one key submitted with two different tasks."""
    handler = _KeyCollisions()
    logger = logging.getLogger("distributed.scheduler")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.messages, handler.messages[0]


def run_pipeline(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python -m pipeline ARGS`` in a subprocess, as a user would; its stderr must not
    hold the scheduler's key-collision warning."""
    completed = subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        check=False,
    )
    assert KEY_COLLISION not in completed.stderr, completed.stderr[-2000:]
    return completed


@pytest.fixture(scope="session")
def pipeline_command():
    """:func:`run_pipeline`: the ``pipeline`` command in a subprocess."""
    return run_pipeline
