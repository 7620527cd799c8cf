"""Crop extraction on a Dask worker: crops per second and its peak memory as the plate grows.

Usage:
    python benchmarks/crop_throughput.py [--fields 1,4,16] [--size 512] [--frames 4]
        [--size-um 20] [--size-px 64] [--block 512]

For each plate size, a run-like output is written (a simulated field, 2 channels, its true
nuclei as ``labels/cells`` and their measurements as ``tables/cells``, repeated over the
wells), then ``pipeline.classification.store.write_crops`` cuts every cell's crop on one
local Dask worker process with one thread. Reported per plate: crops, wall time, crops per
second for that worker, and the worker's peak resident memory (sampled every 20 ms) above its
memory before the work: flat memory means the peak does not grow with the plate.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import psutil
from distributed import Client, LocalCluster

import pipeline
from pipeline.classification.store import CropSettings, write_crops
from pipeline.io import omezarr
from pipeline.io.tables import write_table
from pipeline.orchestration.cluster import worker_environment
from pipeline.synthetic import simulate_field


def write_results(path: Path, n_fields: int, size: int, frames: int) -> int:
    """A plate-like output of ``n_fields`` wells (one field each); returns the cell rows."""
    field = simulate_field(n_frames=frames, size=size, seed=0)
    cells = pipeline.measure(
        field.labels, field.image, dims="tyx", channel_names=("nuclei", "cytoplasm")
    )
    root = omezarr.create_root(path)
    columns = [str(n + 1) for n in range(n_fields)]
    for column in columns:
        well = omezarr.write_well(root, "A", column, ["0"])
        image = omezarr.write_image(
            well, "0", field.image, "tcyx", field.pixel_size, channel_names=("nuclei", "cytoplasm")
        )
        omezarr.write_labels(image, "cells", field.labels)
        write_table(image, "cells", cells, table_type="feature_table", instance_key="label")
    omezarr.write_plate_metadata(
        root,
        name="bench",
        rows=["A"],
        columns=columns,
        wells=[("A", c) for c in columns],
        field_count=1,
    )
    return len(cells) * n_fields


class PeakMemory:
    """Peak resident memory of a process, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", default="1,4,16")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size-um", type=float, default=20.0)
    parser.add_argument("--size-px", type=int, default=64)
    parser.add_argument("--block", type=int, default=512)
    args = parser.parse_args()
    settings = CropSettings(size_um=args.size_um, size_px=args.size_px, block=args.block)
    print(
        "| fields | crops | seconds | crops / s (one worker, one thread) "
        "| worker peak above start (MB) |"
    )
    print("|---|---|---|---|---|")
    with (
        worker_environment(),
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        pid = next(iter(client.run(os.getpid).values()))
        for n_fields in (int(n) for n in args.fields.split(",")):
            with TemporaryDirectory() as folder:
                results = Path(folder) / "results.zarr"
                n_cells = write_results(results, n_fields, args.size, args.frames)
                client.run(lambda: __import__("gc").collect())
                with PeakMemory(pid) as memory:
                    started = time.perf_counter()
                    write_crops(results, settings, submit=client.submit)
                    seconds = time.perf_counter() - started
                print(
                    f"| {n_fields} | {n_cells} | {seconds:.1f} | {n_cells / seconds:.0f} | "
                    f"{(memory.peak - memory.base) / 1e6:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
