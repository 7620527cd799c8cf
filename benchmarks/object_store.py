"""Reading plates from an S3 endpoint against reading them from local disk, side by side.

Usage:
    python benchmarks/object_store.py [--size 512] [--frames 8] [--fields 2] [--repeats 3]
        [--skip-run]

Needs moto's S3 server (``pip install -e ".[test]"`` brings it). Starts it on the loopback
interface, simulates a plate of FIELDS wells (FRAMES x SIZE x SIZE uint16 nuclei, chunks as the
simulator writes them), uploads it to a bucket, then in one process, best of REPEATS:

- *read*: every chunk of every field's full-resolution image through zarr and dask (as the
  workers read tiles), from the folder and from the bucket: MB/s and the ratio;
- *run*: ``pipeline run`` with the classical recipe (so that reading weighs in) on a local
  cluster of 2 workers, disk -> disk and bucket -> bucket: wall time and the ratio.

moto is a Python server in the same machine: its throughput is a floor, not a figure for a
real object store (which serves many connections in parallel, at network latency).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dask
import dask.array as da
import zarr

from pipeline.config import RunConfig
from pipeline.io.omezarr import open_plate
from pipeline.orchestration.runner import run
from pipeline.synthetic import simulate_plate

CLASSICAL = RunConfig.model_validate({"segmentation": {"method": "classical"}})


def start_s3() -> object:
    """moto's S3 server on the loopback, the AWS environment pointing at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    return server


def read_all(plate: str) -> int:
    """Read every chunk of every field's full-resolution image; returns the bytes read."""
    arrays = []
    for fov in open_plate(plate).fields:
        array = zarr.open_array(f"{fov.dataset_path}/{fov.levels[0].reader.array_path}", mode="r")
        arrays.append(da.from_zarr(array))
    with dask.config.set(scheduler="threads", num_workers=8):
        dask.compute(*[a.sum() for a in arrays])
    return sum(a.nbytes for a in arrays)


def best_of(repeats: int, work: Callable[[], object]) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--fields", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-run", action="store_true", help="only the read comparison")
    args = parser.parse_args()

    server = start_s3()
    import s3fs

    folder = Path(tempfile.mkdtemp(prefix="object-store-"))
    local = simulate_plate(
        folder / "plate.zarr",
        rows=1,
        columns=args.fields,
        fields=1,
        n_frames=args.frames,
        size=args.size,
        seed=3,
    )
    filesystem = s3fs.S3FileSystem()
    filesystem.mkdir("plates")
    filesystem.put(str(local), "plates/plate.zarr", recursive=True)
    remote = "s3://plates/plate.zarr"
    objects = len(filesystem.find("plates/plate.zarr"))
    print(
        f"plate: {args.fields} fields x {args.frames} frames x {args.size}^2, "
        f"{objects} objects in the bucket"
    )

    disk_s, nbytes = best_of(args.repeats, lambda: read_all(str(local)))
    bucket_s, _ = best_of(args.repeats, lambda: read_all(remote))
    print("\n| read every chunk | seconds | MB/s |")
    print("|---|---|---|")
    print(f"| local disk | {disk_s:.3f} | {nbytes / disk_s / 1e6:.0f} |")
    print(f"| S3 (moto, loopback) | {bucket_s:.3f} | {nbytes / bucket_s / 1e6:.0f} |")
    print(f"| ratio bucket / disk (time) | {bucket_s / disk_s:.2f} | |")

    if not args.skip_run:
        filesystem.mkdir("results")
        counter = iter(range(10**6))

        def run_on(source: str, out: Callable[[int], str]) -> None:
            summary = run(source, out(next(counter)), config=CLASSICAL, workers=2)
            assert not summary.failed

        disk_run, _ = best_of(
            args.repeats, lambda: run_on(str(local), lambda i: str(folder / f"out{i}.zarr"))
        )
        bucket_run, _ = best_of(
            args.repeats, lambda: run_on(remote, lambda i: f"s3://results/out{i}.zarr")
        )
        print("\n| pipeline run (classical, 2 local workers) | wall seconds |")
        print("|---|---|")
        print(f"| disk -> disk | {disk_run:.1f} |")
        print(f"| bucket -> bucket | {bucket_run:.1f} |")
        print(f"| ratio | {bucket_run / disk_run:.2f} |")
    server.stop()


if __name__ == "__main__":
    main()
