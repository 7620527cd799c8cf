"""Scaling of ``pipeline.track.track``: linking two frames of 10,000 and 100,000 cells.

Usage:
    python benchmarks/tracking_speed.py [--cells 10000,100000] [--spacing 20] [--motion 2]
        [--turnover 0.01] [--max-distance 15] [--repeats 3] [--seed 0]

Frame 0 holds ``n`` cells in a square with one cell per ``spacing**2`` square micrometres
(20 um: a dense layer of 10 um nuclei), at random positions that do not overlap: a square
lattice of pitch ``spacing`` in random order, each point jittered uniformly by up to
``0.3 * spacing`` per axis (nuclei at least 0.4 x 20 = 8 um apart; a uniform Poisson
scatter would put 7 % of the cells within 3 um of another, which no segmentation gives).
Frame 1 moves every cell by an isotropic Gaussian step (``motion`` um per axis), removes a
fraction ``turnover`` of them (deaths / leaving) and adds as many new ones (births) at random
positions. ``track`` links the two frames with divisions and gap closing on (their step 2
runs too), and the fraction of true links recovered is reported.

Time: best of ``--repeats`` calls of ``track`` only. Memory: the peak of Python-tracked
allocations during one extra call (``tracemalloc``; numpy and scipy buffers are included),
beside the size a dense ``n x n`` float64 cost matrix would need, and the growth of the
process's maximum resident set size (``ru_maxrss``) over the whole run.
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

import numpy as np
import pandas as pd

from pipeline.tracking import track


def two_frames(
    n: int, *, spacing: float, motion: float, turnover: float, seed: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """Objects of two frames (``t, y, x, cell``) and the true identity of each row."""
    rng = np.random.default_rng(seed)
    per_row = int(np.ceil(np.sqrt(n)))
    side = spacing * per_row
    lattice = np.stack(np.divmod(rng.permutation(per_row**2)[:n], per_row), axis=1)
    first = (lattice + 0.5 + rng.uniform(-0.3, 0.3, size=(n, 2))) * spacing
    leaving = max(1, round(turnover * n))
    kept = rng.permutation(n)[leaving:]
    second = first[kept] + rng.normal(0, motion, size=(len(kept), 2))
    born = rng.uniform(0, side, size=(leaving, 2))
    cells = np.r_[np.arange(n), kept, n + np.arange(leaving)]
    positions = np.r_[first, second, born]
    frames = np.r_[np.zeros(n, np.int64), np.ones(len(kept) + leaving, np.int64)]
    objects = pd.DataFrame({"t": frames, "y": positions[:, 0], "x": positions[:, 1]})
    return objects, cells


def link_recall(tracked: pd.DataFrame, cells: np.ndarray) -> float:
    """Fraction of the cells present in both frames whose frame-1 object follows frame 0.

    It follows when it continues the frame-0 object's track or is a daughter of it: a birth
    next to a cell can be read as a division, which in the CTC form ends the mother's track
    and gives both objects of frame 1 new tracks.
    """
    first = tracked["t"].to_numpy() == 0
    track_of_cell = pd.Series(tracked["track_id"].to_numpy()[first], index=cells[first])
    second = tracked[~first].assign(cell=cells[~first])
    second = second[second["cell"].isin(track_of_cell.index)]
    before = track_of_cell.loc[second["cell"]].to_numpy()
    follows = (second["track_id"].to_numpy() == before) | (
        second["parent_track_id"].to_numpy() == before
    )
    return float(follows.mean())


def measure(n: int, options: argparse.Namespace) -> dict:
    objects, cells = two_frames(
        n,
        spacing=options.spacing,
        motion=options.motion,
        turnover=options.turnover,
        seed=options.seed,
    )
    best = float("inf")
    for _ in range(options.repeats):
        began = time.perf_counter()
        tracked = track(objects, max_distance=options.max_distance)
        best = min(best, time.perf_counter() - began)
    tracemalloc.start()
    track(objects, max_distance=options.max_distance)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    dense = float(n) * n * 8
    return {
        "cells/frame": n,
        "objects": len(objects),
        "track s (best)": round(best, 3),
        "peak traced MiB": round(peak / 2**20, 1),
        "dense NxN GiB": round(dense / 2**30, 1),
        "peak / dense": f"{peak / dense:.1e}",
        "link recall": round(link_recall(tracked, cells), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="10000,100000")
    parser.add_argument("--spacing", type=float, default=20.0, help="um per cell (sqrt area)")
    parser.add_argument("--motion", type=float, default=2.0, help="Gaussian step sd per axis, um")
    parser.add_argument("--turnover", type=float, default=0.01, help="fraction dying and born")
    parser.add_argument("--max-distance", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = [measure(int(n), options) for n in options.cells.split(",") if n]
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before  # KiB on Linux
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"max RSS growth over the run: {rss_growth / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
