"""Time to draw a run's QC report: its fields' figures drawn here, or on the cluster's workers.

Usage:
    python benchmarks/report_drawing.py [--fields 16] [--workers 2]

A simulated plate (2 x 4 wells, fields per well to make ``--fields``, 8 frames of 512 x 512)
is run once on a local cluster of single-thread workers; then its report is written twice in
turn each way: by this process alone (``pipeline report``), and with the fields' figures
drawn on the workers (what ``pipeline run`` does). Prints the seconds of each, and their ratio.
"""

import argparse
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster

import pipeline
from pipeline.orchestration.cluster import worker_environment
from pipeline.qc.report import write_qc_report
from pipeline.synthetic import simulate_plate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    plate = simulate_plate(
        folder / "plate.zarr",
        rows=2,
        columns=4,
        fields=max(1, args.fields // 8),
        n_frames=8,
        size=512,
        seed=0,
    )
    output = folder / "out.zarr"
    with (
        worker_environment(),
        LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as c,
        Client(c) as client,
    ):
        pipeline.run(plate, output, scheduler=c.scheduler_address, show_progress=False)
        seconds: dict[str, list[float]] = {"here": [], "workers": []}
        for repeat in range(2):
            for where, drawing_client in (("here", None), ("workers", client)):
                started = time.perf_counter()
                write_qc_report(output, folder / f"report-{where}{repeat}", client=drawing_client)
                seconds[where].append(time.perf_counter() - started)
                print(f"{where}: {seconds[where][-1]:.1f} s", flush=True)
    here, workers = min(seconds["here"]), min(seconds["workers"])
    print(
        f"best of 2: here {here:.1f} s, on {args.workers} workers {workers:.1f} s, "
        f"ratio {here / workers:.2f}"
    )


if __name__ == "__main__":
    main()
