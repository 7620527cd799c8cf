"""The network on a CPU in a Dask worker's memory settings and in those of a run's workers.

Usage:
    python benchmarks/malloc_reuse.py [--size 1501] [--planes 2] [--repeats 3]

Each measurement is a fresh process that runs
:func:`pipeline.convnet.inference.run_network` on ``--planes`` random planes of ``--size``
pixels with one torch thread, in a thread other than the main one, as a Dask worker runs its
tasks, after one small pass that loads the model. Three environments, interleaved:

- ``dask worker``: as distributed's nanny starts a worker (``MALLOC_TRIM_THRESHOLD_=65536``);
- ``plain``: glibc's defaults;
- ``run workers``: :data:`pipeline.convnet.memory.MALLOC_SETTINGS`, as a run starts
  its workers.

Reported per environment, the median over repeats: the network's wall time, the process's
system CPU time during it (the kernel mapping and zeroing pages) and its peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from pipeline.convnet.memory import MALLOC_SETTINGS

CHILD = """
import json, resource, sys, threading, time
import numpy as np
from pipeline.convnet.inference import InferenceSettings, run_network
size, planes = int(sys.argv[1]), int(sys.argv[2])
settings = InferenceSettings(cpu_threads=1)
x = np.random.default_rng(0).random((planes, size, size), dtype=np.float32)
figures = {}
def task():
    run_network(x[:1, :64, :64], settings)  # loads the model
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    run_network(x, settings)
    figures["seconds"] = time.perf_counter() - started
    figures["system"] = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before.ru_stime
thread = threading.Thread(target=task)
thread.start()
thread.join()
figures["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(figures))
"""

ENVIRONMENTS = {
    "dask worker": {"MALLOC_TRIM_THRESHOLD_": "65536"},
    "plain": {},
    "run workers": MALLOC_SETTINGS,
}


def measure(size: int, planes: int, environment: dict[str, str]) -> dict[str, float]:
    """One fresh process's figures."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(size), str(planes)],
        env={**inherited, **environment},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1501)
    parser.add_argument("--planes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in ENVIRONMENTS}
    for _ in range(args.repeats):
        for name, environment in ENVIRONMENTS.items():
            runs[name].append(measure(args.size, args.planes, environment))
    print(
        f"{args.planes} planes of {args.size} x {args.size}, 1 torch thread, {args.repeats} repeats"
    )
    print("| environment | network s | system CPU s | peak RSS GB |\n|---|---|---|---|")
    medians = {
        name: [
            statistics.median(v[key] for v in values) for key in ("seconds", "system", "peak_gb")
        ]
        for name, values in runs.items()
    }
    for name, (seconds, system, peak) in medians.items():
        print(f"| {name} | {seconds:.2f} | {system:.2f} | {peak:.2f} |")
    ratio = medians["run workers"][0] / medians["dask worker"][0]
    print(f"network time, run workers / dask worker: {ratio:.2f}")


if __name__ == "__main__":
    main()
