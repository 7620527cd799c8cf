"""When each phase of one field's run ends, from Dask's task stream, over repeated runs.

Usage:
    python benchmarks/field_timeline.py [--repeats 3] [--frames 4] [--size 1024]
        [--z-slices N] [--workers 2] [--config "compute: {tile_px: 1024}"] [--dump-slower-than S]

A simulated field (as in ``field_profile.py``: nuclei ~20 px across) is run once to warm a
local cluster of ``--workers`` single-thread workers (in a run's worker environment), then
``--repeats`` more times. For each run the task stream gives, in seconds from the run's
start: the end of the diameter estimate, the first and last inference task of the field, the
last labelled block, the field's tables, and the seconds of inference each worker did (an
uneven split shows a worker left idle while the other works through several tiles). The
time the run reports comes first; ``--config`` (YAML) changes the run's settings, e.g. the
tile size.
``--dump-slower-than S`` prints, for every run whose reported time exceeds S seconds, each
worker's tasks in order (consecutive tasks of one kind merged) and the moments when both
workers were idle: what a rare slow run spent its time on.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml
from dask.utils import key_split

import pipeline
from pipeline.config import RunConfig
from pipeline.orchestration.cluster import worker_environment
from pipeline.synthetic import simulate_plate


def phases(spans: list[tuple[float, float, str, str]]) -> dict[str, float | list[float]]:
    """Phase ends (s) and inference seconds per worker from (start, stop, worker, prefix)."""
    estimate = max((stop for _, stop, _, prefix in spans if prefix == "median_of_cells"), default=0)
    inference = [s for s in spans if "infer" in s[3] and s[0] >= estimate]
    per_worker: dict[str, float] = {}
    for start, stop, worker, _ in inference:
        per_worker[worker] = per_worker.get(worker, 0.0) + stop - start
    return {
        "estimate_end": estimate,
        "first_inference": min(start for start, *_ in inference),
        "last_inference": max(stop for _, stop, *_ in inference),
        "last_label": max(stop for _, stop, _, prefix in spans if "label_block" in prefix),
        "tables": max(stop for _, stop, _, prefix in spans if prefix == "tabulate_field"),
        "inference_per_worker": sorted(per_worker.values()),
    }


def dump(spans: list[tuple[float, float, str, str]]) -> None:
    """Each worker's tasks in order, consecutive ones of a kind merged, and the gaps (> 50 ms)
    when no worker ran anything."""
    for worker in sorted({worker for _, _, worker, _ in spans}):
        merged: list[list] = []
        for start, stop, _, prefix in sorted(s for s in spans if s[2] == worker):
            if merged and merged[-1][2] == prefix and start - merged[-1][1] < 0.05:
                merged[-1][1], merged[-1][3] = stop, merged[-1][3] + 1
            else:
                merged.append([start, stop, prefix, 1])
        print(f"worker {worker}")
        for start, stop, prefix, count in merged:
            if stop - start >= 0.05:
                print(f"  {start:7.2f} {stop:7.2f} {prefix} x{count}")
    busy_until, gaps = 0.0, []
    for start, stop in sorted((start, stop) for start, stop, *_ in spans):
        if start > busy_until + 0.05:
            gaps.append(f"{busy_until:.2f}-{start:.2f}")
        busy_until = max(busy_until, stop)
    print("both idle: " + ", ".join(gaps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--z-slices", type=int, help="z-stacks of this many planes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--config", default="{}", help="YAML of run settings to change")
    parser.add_argument("--dump-slower-than", type=float, help="seconds; dump slower runs' tasks")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    config = RunConfig.model_validate(yaml.safe_load(args.config) or {})
    folder = Path(tempfile.mkdtemp())
    plate = simulate_plate(
        folder / "plate.zarr",
        rows=1,
        columns=1,
        fields=1,
        n_frames=args.frames,
        size=args.size,
        z_slices=args.z_slices,
        seed=0,
    )
    with (
        worker_environment(),
        LocalCluster(
            n_workers=args.workers, threads_per_worker=1, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.get_task_stream()  # installs the scheduler's task-stream plugin
        address = cluster.scheduler_address
        pipeline.run(plate, folder / "warm.zarr", config=config, scheduler=address)
        print(
            "| reported | estimate | first inference | last inference | last label | tables "
            "| inference per worker |\n|---|---|---|---|---|---|---|"
        )
        for repeat in range(args.repeats):
            started = time.time()
            out = folder / f"run{repeat}.zarr"
            summary = pipeline.run(plate, out, config=config, scheduler=address)
            spans = [
                (
                    span["start"] - started,
                    span["stop"] - started,
                    task["worker"],
                    key_split(task["key"]),
                )
                for task in client.get_task_stream(start=started)
                for span in task["startstops"]
                if span["action"] == "compute"
            ]
            found = phases(spans)
            workers = " / ".join(f"{s:.1f}" for s in found["inference_per_worker"])
            print(
                f"| {summary.wall_seconds:.2f} | {found['estimate_end']:.2f} | "
                f"{found['first_inference']:.2f} | {found['last_inference']:.2f} | "
                f"{found['last_label']:.2f} | {found['tables']:.2f} | {workers} |",
                flush=True,
            )
            if args.dump_slower_than is not None and summary.wall_seconds > args.dump_slower_than:
                dump(spans)


if __name__ == "__main__":
    main()
