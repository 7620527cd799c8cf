"""Wall time of a re-run that has nothing to do, against the first run, on the demo plate.

The demo plate (2 wells x 2 fields x 8 frames of 256 x 256, as ``pipeline demo`` makes it)
is run once with ``pipeline run``, then the same command is repeated: every field is done with
the same settings, model and input, so it must skip everything without starting a cluster.
Both are timed as a user sees them: the whole command in a fresh process.

    python benchmarks/resume_noop.py [--repeats 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.synthetic import simulate_plate


def _timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}")
    return elapsed, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="no-op re-runs to time")
    parser.add_argument("--dir", help="working folder (default: a new temporary one)")
    args = parser.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="resume-noop-"))
    plate = simulate_plate(
        folder / "demo-plate.zarr", rows=1, columns=2, fields=2, n_frames=8, size=256, seed=0
    )
    out = folder / "demo-results.zarr"
    command = [sys.executable, "-m", "pipeline", "run", str(plate), "--out", str(out)]
    first, _ = _timed([*command, "--workers", "2"])
    again = []
    for _ in range(args.repeats):
        elapsed, stdout = _timed(command)
        if "nothing to do" not in stdout:
            sys.exit(f"the re-run computed something:\n{stdout}")
        again.append(elapsed)
    median = statistics.median(again)
    print(f"first run (4 fields, 32 frames): {first:.2f} s")
    print(
        f"no-op re-run: median {median:.2f} s over {args.repeats} "
        f"(min {min(again):.2f}, max {max(again):.2f}); {median / first:.3f} of the first run"
    )


if __name__ == "__main__":
    main()
