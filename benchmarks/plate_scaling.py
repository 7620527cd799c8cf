"""How a run's memory, scheduler load and time grow with the plate.

Usage:
    python benchmarks/plate_scaling.py [--fields 1,2,4,8] [--size 256] [--frames 4]
        [--workers 2] [--method classical]

For each plate size F, a simulated plate of F wells (one field each, FRAMES frames of SIZE x
SIZE) is run with ``pipeline.run`` on a local cluster started here (WORKERS processes, one
thread each; the default ``compute.fields_in_flight``). While it runs, a thread samples every
0.1 s the resident memory of each worker process (psutil, from outside Dask), the number of
tasks the scheduler holds (the scheduler lives in this process) and this process's own memory
(client and scheduler). Reported per plate: wall time of the run, seconds per field, the peaks,
and each as a ratio to the smallest plate. A one-field plate is run first and not reported,
so that the workers' imports and model loading count in no plate's figures.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil
from distributed import LocalCluster

from pipeline.config import RunConfig
from pipeline.orchestration.cluster import worker_environment
from pipeline.orchestration.runner import run
from pipeline.synthetic import simulate_plate


class Peaks:
    """The largest worker RSS, scheduler task count and own RSS seen while running."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.worker_rss = 0
        self.tasks = 0
        self.own_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for child in me.children(recursive=True):
                try:
                    self.worker_rss = max(self.worker_rss, child.memory_info().rss)
                except psutil.Error:
                    pass
            self.tasks = max(self.tasks, len(self.cluster.scheduler.tasks))
            self.own_rss = max(self.own_rss, me.memory_info().rss)
            time.sleep(0.1)

    def __enter__(self) -> Peaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fields", default="1,2,4,8")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--method", default="classical", choices=["classical", "convnet"])
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="plate-scaling-"))
    config = RunConfig.model_validate({"segmentation": {"method": args.method}})
    rows = []
    with (
        worker_environment(),
        LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
    ):
        for n_fields in (0, *(int(n) for n in args.fields.split(","))):  # 0: the warm-up
            plate = simulate_plate(
                folder / f"plate-{n_fields}.zarr",
                rows=1,
                columns=max(n_fields, 1),
                fields=1,
                n_frames=args.frames,
                size=args.size,
                seed=0,
            )
            with Peaks(cluster) as peaks:
                started = time.perf_counter()
                summary = run(
                    plate,
                    folder / f"out-{n_fields}.zarr",
                    config=config,
                    scheduler=cluster.scheduler_address,
                )
                wall = time.perf_counter() - started
            assert not summary.failed, summary.failed
            if n_fields:
                rows.append((n_fields, wall, peaks.worker_rss, peaks.tasks, peaks.own_rss))
    print(
        f"{args.method}, fields of {args.frames} x {args.size} x {args.size}, "
        f"{args.workers} workers x 1 thread\n"
    )
    print(
        "| fields | wall s | s per field | peak worker RSS MiB | peak scheduler tasks | "
        "peak client+scheduler RSS MiB |"
    )
    print("|---|---|---|---|---|---|")
    for n_fields, wall, worker, tasks, own in rows:
        print(
            f"| {n_fields} | {wall:.1f} | {wall / n_fields:.2f} | {worker / 2**20:,.0f} | "
            f"{tasks:,} | {own / 2**20:,.0f} |"
        )
    first, last = rows[0], rows[-1]
    print(
        f"\n{last[0]}x / {first[0]}x fields: wall {last[1] / first[1]:.2f}, worker RSS "
        f"{last[2] / first[2]:.2f}, scheduler tasks {last[3] / first[3]:.2f}, client RSS "
        f"{last[4] / first[4]:.2f}"
    )


if __name__ == "__main__":
    main()
