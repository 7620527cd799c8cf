"""What grows in memory as one cluster runs plate after plate: a census of Python objects.

Usage:
    python benchmarks/memory_census.py [--wells 16] [--runs 4] [--method classical]
        [--computations-history N]

A simulated plate of ``--wells`` one-field wells (4 frames of 256 x 256) is run ``--runs`` times
on one local cluster (2 workers x 1 thread; its scheduler lives in this process). After each
run: the resident memory of every worker and of this process, the entries of the workers'
profile history (``Worker.profile_history``) and of the scheduler's history of computations.
At the end, the object types whose count grew most from the second run to the last, on each
worker and here (``gc.get_objects()`` after a collection, counted by type).
``--computations-history`` sets ``distributed.diagnostics.computations.max-history`` first.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from collections import Counter
from pathlib import Path

import dask
import psutil
from distributed import Client, LocalCluster

import pipeline
from pipeline.config import RunConfig
from pipeline.orchestration.cluster import worker_environment
from pipeline.synthetic import simulate_plate


def object_counts() -> Counter:
    """Live Python objects of this process, by type, after a garbage collection."""
    gc.collect()
    return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())


def worker_census(dask_worker=None) -> tuple[dict, Counter]:
    """A worker's memory, what it holds and its histories, and its objects by type."""
    sizes = {
        "rss_mib": psutil.Process().memory_info().rss / 2**20,
        "data": len(dask_worker.data),
        "tasks": len(dask_worker.state.tasks),
        "profile_history": len(dask_worker.profile_history),
    }
    return sizes, object_counts()


def growth(first: Counter, last: Counter, top: int = 8) -> list[tuple[str, int]]:
    return Counter({k: last.get(k, 0) - first.get(k, 0) for k in first | last}).most_common(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wells", type=int, default=16)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--method", default="classical", choices=["classical", "convnet"])
    parser.add_argument("--computations-history", type=int)
    args = parser.parse_args()
    if args.computations_history is not None:
        dask.config.set(
            {"distributed.diagnostics.computations.max-history": args.computations_history}
        )
    config = RunConfig.model_validate({"segmentation": {"method": args.method}})
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        plate = simulate_plate(
            folder / "plate.zarr", rows=1, columns=args.wells, fields=1, n_frames=4, size=256
        )
        with (
            worker_environment(),
            LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
            Client(cluster) as client,
        ):
            workers, here = [], []
            for run in range(args.runs):
                pipeline.run(
                    plate, folder / f"out{run}", config=config, scheduler=cluster.scheduler_address
                )
                workers.append(client.run(worker_census))
                here.append(object_counts())
                rss = psutil.Process().memory_info().rss / 2**20
                print(
                    f"run {run + 1}: client + scheduler {rss:.0f} MiB, scheduler computations "
                    f"{len(cluster.scheduler.computations)}; workers "
                    + "; ".join(
                        f"{sizes['rss_mib']:.0f} MiB, {sizes['data']} data, {sizes['tasks']} "
                        f"tasks, {sizes['profile_history']} profiles"
                        for sizes, _ in workers[-1].values()
                    )
                )
            if args.runs < 3:
                return
            print(f"\nobjects grown from run 2 to run {args.runs}:")
            print("client + scheduler:", growth(here[1], here[-1]))
            for address in workers[-1]:
                print(f"worker {address}:", growth(workers[1][address][1], workers[-1][address][1]))


if __name__ == "__main__":
    main()
