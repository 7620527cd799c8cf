"""The Dask cluster a run computes on: a local one by default, or an existing scheduler."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

__all__ = ["connect"]


@contextmanager
def connect(
    scheduler: str | None = None, workers: int | None = None, threads_per_worker: int = 1
) -> Iterator[Client]:
    """A Dask client: to ``scheduler`` if given, else to a new LocalCluster on this machine.

    The local cluster listens on localhost only, for its scheduler and its dashboard.

    Parameters
    ----------
    scheduler
        Address of a running scheduler (``tcp://host:8786``), or None for a local cluster.
    workers
        Number of local worker processes (default: one per core, at most 4).
    threads_per_worker
        Threads per local worker.

    Yields
    ------
    distributed.Client
        Connected client; the local cluster is shut down on exit.
    """
    if scheduler is not None:
        with Client(scheduler) as client:
            yield client
        return
    import os

    n_workers = workers or max(1, min(4, os.cpu_count() or 1))
    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            processes=True,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
