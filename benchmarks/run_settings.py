"""Run time of one field under several execution settings, side by side on one cluster.

Usage:
    python benchmarks/run_settings.py SETTINGS [SETTINGS ...] [--size 1024] [--frames 4]
        [--repeats 2]

Each SETTINGS is a run config in YAML (flow style), e.g. ``"compute: {frames_per_block: 1}"``
or ``"compute: {block_halos: 1}"``. A simulated field (nuclei ~20 px) is run on a local cluster
of 2 single-thread workers started beforehand (and warmed by one run with the defaults), with
each setting in turn, ``--repeats`` times; prints each run's wall time and the time the run
reports. For settings that do not change results (how the work is cut), so only time differs.
"""

import argparse
import tempfile
import time
from pathlib import Path

import yaml
from distributed import LocalCluster

import pipeline
from pipeline.config import RunConfig
from pipeline.orchestration.cluster import worker_environment
from pipeline.synthetic import simulate_plate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="run configs in YAML flow style")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    configs = [RunConfig.model_validate(yaml.safe_load(text) or {}) for text in args.settings]
    folder = Path(tempfile.mkdtemp())
    plate = simulate_plate(
        folder / "plate.zarr",
        rows=1,
        columns=1,
        fields=1,
        n_frames=args.frames,
        size=args.size,
        seed=0,
    )
    with (
        worker_environment(),
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
    ):
        pipeline.run(plate, folder / "warm.zarr", scheduler=cluster.scheduler_address)
        for repeat in range(args.repeats):
            for index, (text, config) in enumerate(zip(args.settings, configs, strict=True)):
                started = time.time()
                summary = pipeline.run(
                    plate,
                    folder / f"out{repeat}-{index}.zarr",
                    config=config,
                    scheduler=cluster.scheduler_address,
                )
                wall = time.time() - started
                print(
                    f"{text}: wall {wall:.1f} s, reported {summary.wall_seconds:.1f} s", flush=True
                )


if __name__ == "__main__":
    main()
