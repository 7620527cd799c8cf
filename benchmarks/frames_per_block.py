"""Run time of one field against ``compute.frames_per_block`` (timepoints per inference task).

Usage:
    python benchmarks/frames_per_block.py

A simulated field of 4 frames of 1024 x 1024 (nuclei ~20 px) is run on a local cluster of 2
single-thread workers started beforehand (and warmed by one run), with 4, 1 and 2 frames per
inference task, twice in turn; prints each run's wall time and the time the run reports.
Fewer frames per task make more, smaller inference tasks, so the labelling of the first frames
can start while the network works on the others. An execution setting: results are the same.
"""

import tempfile
import time
from pathlib import Path

from distributed import LocalCluster

import pipeline
from pipeline.config import RunConfig
from pipeline.synthetic import simulate_plate


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    plate = simulate_plate(
        folder / "plate.zarr", rows=1, columns=1, fields=1, n_frames=4, size=1024, seed=0
    )
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster:
        pipeline.run(plate, folder / "warm.zarr", scheduler=cluster.scheduler_address)
        for repeat in range(2):
            for frames in (4, 1, 2):
                config = RunConfig.model_validate({"compute": {"frames_per_block": frames}})
                started = time.time()
                summary = pipeline.run(
                    plate,
                    folder / f"out{repeat}{frames}.zarr",
                    config=config,
                    scheduler=cluster.scheduler_address,
                )
                wall = time.time() - started
                print(
                    f"frames_per_block {frames}: wall {wall:.1f} s, "
                    f"reported {summary.wall_seconds:.1f} s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
