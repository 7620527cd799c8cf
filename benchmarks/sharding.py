"""Files and read speed of the output arrays with and without Zarr v3 sharding.

Usage:
    python benchmarks/sharding.py [--size 2048] [--frames 8] [--shard-px 2048] [--repeats 3]

Writes one field as ``pipeline run`` writes its output (``write_image`` with the run's default
chunks and pyramid, then ``write_labels``): FRAMES x 2 channels x SIZE x SIZE uint16 of noise
and uint32 labels, once with one file per chunk and once in shards of SHARD_PX pixels. Reports
the files of each, and, side by side in one run (best of REPEATS), the time to read the whole
full-resolution label image, one 256 x 256 chunk of it (a viewer's tile) and one timepoint.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from pipeline.io.omezarr import create_root, write_image, write_labels


def write_field(path: Path, image: np.ndarray, labels: np.ndarray, shard_px: int | None) -> None:
    group = write_image(
        create_root(path, overwrite=True),
        "",
        image,
        "tcyx",
        {"y": 0.5, "x": 0.5},
        n_levels=3,
        shard_px=shard_px,
    )
    write_labels(group, "cells", labels)


def best_of(repeats: int, read: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        read()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--shard-px", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.frames, 2, args.size, args.size)
    image = rng.integers(0, 4000, shape, dtype=np.uint16)
    labels = rng.integers(0, 5000, (args.frames, args.size, args.size), dtype=np.uint32)
    folder = Path(tempfile.mkdtemp(prefix="sharding-"))
    rows = []
    for name, shard_px in (
        ("one file per chunk", None),
        (f"shards of {args.shard_px}", args.shard_px),
    ):
        path = folder / f"{shard_px}.zarr"
        started = time.perf_counter()
        write_field(path, image, labels, shard_px)
        write = time.perf_counter() - started
        files = sum(1 for f in path.rglob("*") if f.is_file())
        array = zarr.open_array(path / "labels/cells/0", mode="r")
        whole = best_of(args.repeats, lambda a=array: a[:])
        tile = best_of(args.repeats, lambda a=array: a[args.frames // 2, 512:768, 512:768])
        frame = best_of(args.repeats, lambda a=array: a[args.frames // 2])
        rows.append((name, files, write, whole, tile, frame))
    print(f"{args.frames} x 2 x {args.size} x {args.size} uint16 + labels, 3 levels, chunks 256\n")
    print(
        "| layout | files | write s | read labels s | read one 256 px tile ms | read one frame ms |"
    )
    print("|---|---|---|---|---|---|")
    for name, files, write, whole, tile, frame in rows:
        print(
            f"| {name} | {files:,} | {write:.2f} | {whole:.3f} | {1000 * tile:.1f} | "
            f"{1000 * frame:.1f} |"
        )
    (_, f0, w0, a0, t0, r0), (_, f1, w1, a1, t1, r1) = rows
    print(
        f"\nsharded / plain: files {f1 / f0:.3f}, write {w1 / w0:.2f}, whole read {a1 / a0:.2f}, "
        f"tile {t1 / t0:.2f}, frame {r1 / r0:.2f}"
    )


if __name__ == "__main__":
    main()
