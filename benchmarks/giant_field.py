"""How fast and in how much memory a run answers a giant, nearly empty field.

Usage:
    python benchmarks/giant_field.py [--size 200000] [--chunk 512] [--dir DIR]

Writes a lone OME-Zarr image declaring 1 x 2 x SIZE x SIZE pixels in CHUNK x CHUNK chunks of
which one is stored (a truncated write, or a canvas far larger than its data), then runs
``pipeline run`` on it in a subprocess and reports its exit code, the field's failure line,
the command's wall time and the peak resident memory of the command's processes (the client
and its local workers; ``getrusage`` of the children).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from pipeline.io.omezarr import create_root, write_image


def giant_image(path: Path, size: int, chunk: int) -> int:
    """Write the image; returns the number of chunks it declares."""
    root = create_root(path, overwrite=True)
    write_image(
        root, "", np.zeros((1, 2, 64, 64), np.uint16), "tcyx", {"y": 0.5, "x": 0.5}
    )  # the metadata of a one-level image, then its array replaced by the giant one
    array = zarr.create_array(
        path / "0",
        shape=(1, 2, size, size),
        chunks=(1, 1, chunk, chunk),
        dtype="uint16",
        fill_value=0,
        overwrite=True,
    )
    rng = np.random.default_rng(0)
    array[0, 0, :chunk, :chunk] = rng.integers(0, 1000, (chunk, chunk), dtype=np.uint16)
    return array.nchunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--dir", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="giant-field-"))
    folder.mkdir(parents=True, exist_ok=True)
    n_chunks = giant_image(folder / "giant.zarr", args.size, args.chunk)
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            str(folder / "giant.zarr"),
            "--out",
            str(folder / "out.zarr"),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    failure = [line for line in result.stderr.splitlines() if line.startswith("FAILED")]
    print(f"declared: 1 x 2 x {args.size} x {args.size} in {n_chunks:,} chunks, 1 stored")
    print(f"exit code {result.returncode}, wall time {wall:.1f} s, peak RSS {peak_mb:,.0f} MB")
    print(failure[0] if failure else result.stderr[-2000:])


if __name__ == "__main__":
    main()
