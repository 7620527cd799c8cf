"""Per-cell measurement throughput: cells per second on one core, per feature set.

Usage:
    python benchmarks/feature_throughput.py [--size 512] [--frames 2] [--repeats 2]

One simulated field (nuclei, a cytoplasm channel, whole cells = nucleus plus its ring) is
measured with ``pipeline.measure`` on numpy input (one process, one thread: one core) with:
the default table (position, size, mean/sum/min/max per channel), the compartments
(``cells=``), the compartments with the Gaussian-mixture cytoplasm, and each feature set of the
nuclei alone and all at once (features only, no compartments). Each timing is the best of
``--repeats``; the table gives cells per second and the time relative to the default table,
measured side by side in one run.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pipeline
from pipeline.measurement.features import FEATURE_SETS
from pipeline.synthetic import simulate_field


def _best(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    field = simulate_field(n_frames=args.frames, size=args.size, seed=0)
    nuclei, cells, image = field.labels, field.cells, field.image
    n_cells = int(sum(len(set(frame[frame > 0].tolist())) for frame in nuclei))
    base = {"dims": "tyx", "pixel_size": field.pixel_size, "channel_names": ["dna", "ktr"]}
    cases = {
        "default table": {},
        "compartments": {"cells": cells},
        "compartments + mixture": {"cells": cells, "cytoplasm_mixture": True},
        **{f"features: {name}": {"features": [name]} for name in FEATURE_SETS},
        "features: all sets": {"features": list(FEATURE_SETS)},
    }
    timings = {
        name: _best(
            lambda options=options: pipeline.measure(nuclei, image, **base, **options), args.repeats
        )
        for name, options in cases.items()
    }
    print(f"{n_cells} cells ({args.frames} frames of {args.size} x {args.size}), one core\n")
    print("| measurement | cells / s | time vs default table |\n|---|---|---|")
    reference = timings["default table"]
    for name, seconds in timings.items():
        print(f"| {name} | {n_cells / seconds:,.0f} | {seconds / reference:.1f} |")


if __name__ == "__main__":
    main()
