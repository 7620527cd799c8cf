"""How fast the simulated fields grow in their own ground truth: doubling times from the labelled
area and from the cell count.

Usage:
    python benchmarks/simulated_growth.py [--seeds 3] [--frames 8] [--size 256]

The simulation doubles each cell's nominal size every ``doubling_frames`` (12) frames and then
divides it; what a segmentation can measure is the labelled area of the frames. This prints,
per seed, the doubling time (in frames) of the ground truth's total labelled area and of its
cell count, from least-squares fits of their logarithms over the frames, for comparison with
the doubling times a run reports (``tables/well_doubling``).
"""

from __future__ import annotations

import argparse

import numpy as np

from pipeline.synthetic import simulate_field


def doubling_frames(values: np.ndarray) -> float:
    """Frames per doubling of a positive series, from the slope of its logarithm."""
    slope = np.polyfit(np.arange(len(values)), np.log(values), 1)[0]
    return float(np.log(2) / slope)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    print("| seed | from the labelled area | from the cell count |\n|---|---|---|")
    for seed in range(args.seeds):
        labels = simulate_field(n_frames=args.frames, size=args.size, seed=seed).labels
        area = np.array([np.count_nonzero(frame) for frame in labels], dtype=float)
        count = np.array([len(np.unique(frame)) - 1 for frame in labels], dtype=float)
        print(f"| {seed} | {doubling_frames(area):.1f} | {doubling_frames(count):.1f} |")


if __name__ == "__main__":
    main()
