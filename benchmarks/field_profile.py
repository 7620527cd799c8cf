"""Where one field's time goes: each stage alone in this process, then the whole run.

Usage:
    python benchmarks/field_profile.py [--size 1024] [--frames 4] [--z-slices N] [--fields 1]
        [--threads 2] [--workers 2] [--diameter D] [--task-stream] [--json profile.json]

A simulated field (nuclei ~20 px across: the network works at 1.5x, on 1536 x 1536 for
``--size 1024``; ``--z-slices``: a z-stack per frame, planes 1.5 um apart) is written as an
OME-Zarr plate of one field (``--fields``: of several, in one well). The first field's stages
are then timed one after the other in this process, on numpy, with ``--threads`` torch
threads:

- read: the whole field from the store (``open_plate(...).fields[0].data.values``);
- normalise: each frame's percentiles and scaling;
- diameter: the estimate on the middle frame's middle plane (segmenting it at the model's
  scale, repeatedly); with ``--diameter`` none, that diameter is given to the stages and the
  runs (``segmentation.convnet.diameter_px``), as a user who knows it would;
- rescale: the frames to the model's scale, and the maps back;
- network: :func:`pipeline.convnet.inference.run_network` on the rescaled frames (every plane);
- post-processing: seeds and watershed on each frame's maps (in 3D with the intensity, which
  bounds nuclei along z);
- measurement: the default cell table; tracking: linking the cells over the frames;
- write: the image copy and the label pyramid to a new OME-Zarr.

Then ``pipeline.run`` on the same plate (a local cluster of ``--workers`` processes, the
default config) gives the end-to-end wall time of a real run, startup of the cluster
included; the network alone is timed again after it, and the throughput ratio divides by the
mean of the two timings (a shared machine's pace drifts within minutes). The table gives
each stage's seconds and share, and the ratios of the end-to-end time to the network's and
to the stage sum (what the orchestration adds: cluster start, scheduling, tiling halos, the
measurement of each block, stitching).

``--task-stream`` runs the plate once more on a local cluster of the same shape started
beforehand (so its start is not counted) and breaks the run's wall time into the workers'
busy seconds per kind of task (Dask's task stream, by key prefix) and their idle share.

The script restarts itself with the memory settings of a run's workers
(:data:`pipeline.convnet.memory.MALLOC_SETTINGS`), so that the stages here allocate
as the workers do and the network alone is timed as fast as they run it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from dask.utils import key_split

import pipeline
from pipeline.config import RunConfig
from pipeline.convnet.inference import (
    InferenceSettings,
    loaded_model,
    rescale_factor,
    run_network,
    scaled_shape,
)
from pipeline.convnet.memory import MALLOC_SETTINGS
from pipeline.convnet.rescale import rescale_planes
from pipeline.io import omezarr
from pipeline.normalize import frame_percentiles, normalize
from pipeline.segmentation.convnet import RECIPE_MAPS, ConvNetParameters, ConvNetRecipe
from pipeline.segmentation.diameter import estimate_diameter
from pipeline.segmentation.methods import diameter_sample
from pipeline.synthetic import simulate_plate


def profile(
    size: int,
    frames: int,
    z_slices: int | None,
    fields: int,
    threads: int,
    workers: int,
    folder: Path,
    given_diameter: float | None = None,
) -> dict:
    """Seconds per stage of the first field, and of a whole run of the plate."""
    plate = simulate_plate(
        folder / "plate.zarr",
        rows=1,
        columns=1,
        fields=fields,
        n_frames=frames,
        size=size,
        z_slices=z_slices,
        seed=0,
    )
    settings = InferenceSettings(cpu_threads=threads)
    _, info = loaded_model(settings.model, settings.device)  # loading is not a stage
    seconds: dict[str, float] = {}

    def timed(stage: str, function, *args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - started
        return result

    field = omezarr.open_plate(plate).fields[0]
    data = timed("read", lambda: field.data.values)
    raw = data[:, 0]
    dims = "".join(field.pixel_size)
    pixel_size = tuple(field.pixel_size[d] for d in dims)

    def normalised() -> np.ndarray:
        limits = frame_percentiles(raw, info.percentiles, settings.polarity)
        return np.stack([normalize(f, lo, hi) for f, (lo, hi) in zip(raw, limits, strict=True)])

    planes = timed("normalise", normalised)
    sample = np.asarray(diameter_sample(raw))
    diameter = given_diameter or timed("diameter", estimate_diameter, sample, settings)
    shape = scaled_shape(raw.shape[-2:], rescale_factor(info, diameter))
    scaled = timed("rescale", rescale_planes, planes, shape).reshape(-1, *shape)
    maps = timed("network", run_network, scaled, settings)
    # as a run: only the maps the recipe reads go back to the image's scale
    maps = timed("rescale", rescale_planes, maps[:, list(RECIPE_MAPS)], raw.shape[-2:])
    maps = np.moveaxis(maps.reshape(*raw.shape[:-2], -1, *raw.shape[-2:]), -3, 1)
    if z_slices:  # the intensity bounds nuclei along z
        maps = np.concatenate([maps, planes[:, np.newaxis]], axis=1)

    recipe = ConvNetRecipe(
        ConvNetParameters(), diameter * pixel_size[-1], volumetric=bool(z_slices)
    )

    def post_processing() -> np.ndarray:
        frames_cells = [
            recipe.filter(recipe.cells(m, 0.0, pixel_size)[0], pixel_size) for m in maps
        ]
        return np.stack(frames_cells).astype(np.int32)

    labels = timed("post-processing", post_processing)
    table = timed(
        "measurement",
        pipeline.measure,
        labels,
        data,
        dims="t" + dims,
        pixel_size={d: field.pixel_size[d] for d in dims},
    )
    timed("tracking", pipeline.track, table, max_distance=15.0)

    def write() -> None:
        root = omezarr.create_root(folder / "written.zarr")
        group = omezarr.write_image(
            root,
            "image",
            [level.dask_array() for level in field.levels],
            field.data.dims,
            field.levels[0].scale,
            channel_names=list(field.channel_names),
            level_shapes=[level.shape for level in field.levels],
        )
        omezarr.write_labels(group, "cells", labels)

    timed("write", write)
    started = time.perf_counter()
    summary = pipeline.run(
        plate, folder / "run.zarr", config=run_config(given_diameter), workers=workers
    )
    run_seconds = time.perf_counter() - started
    # the network alone once more, after the run: the machine's pace drifts between the two
    started = time.perf_counter()
    run_network(scaled, settings)
    network_after = time.perf_counter() - started
    assert not summary.failed, summary.failed
    return {
        "size": size,
        "frames": frames,
        "fields": fields,
        "z_slices": z_slices,
        "threads": threads,
        "workers": workers,
        "diameter_px": diameter,
        "network_px": list(shape),
        "cells": len(table),
        "stages_s": seconds,
        "run_s": run_seconds,
        "run_reported_s": summary.wall_seconds,
        "network_after_run_s": network_after,
    }


def run_config(diameter: float | None) -> RunConfig:
    """The default settings, with the nucleus diameter given where there is one."""
    return RunConfig.model_validate({"segmentation": {"convnet": {"diameter_px": diameter}}})


def task_stream(plate: Path, out: Path, workers: int, diameter: float | None) -> dict:
    """The run of ``plate`` on a cluster started beforehand: wall seconds, the workers' busy
    seconds per task prefix, and their idle share of workers x wall."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        client.get_task_stream()  # installs the scheduler's task-stream plugin
        started = time.time()
        summary = pipeline.run(
            plate, out, config=run_config(diameter), scheduler=cluster.scheduler_address
        )
        wall = time.time() - started
        assert not summary.failed, summary.failed
        busy: dict[str, float] = {}
        for task in client.get_task_stream(start=started):
            for span in task["startstops"]:
                if span["action"] == "compute":
                    prefix = key_split(task["key"])
                    busy[prefix] = busy.get(prefix, 0.0) + span["stop"] - span["start"]
    return {"wall_s": wall, "busy_s": busy, "idle_share": 1 - sum(busy.values()) / (wall * workers)}


def main() -> None:
    differing = {k: v for k, v in MALLOC_SETTINGS.items() if os.environ.get(k) != v}
    if differing:  # glibc reads them as a process starts
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **differing})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--fields", type=int, default=1, help="fields of the plate that is run")
    parser.add_argument("--z-slices", type=int, help="z planes per frame (default: 2D)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the stages")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the run")
    parser.add_argument("--diameter", type=float, help="nucleus diameter given (px): no estimate")
    parser.add_argument("--task-stream", action="store_true", help="busy time per task kind")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = profile(
            args.size,
            args.frames,
            args.z_slices,
            args.fields,
            args.threads,
            args.workers,
            Path(folder),
            args.diameter,
        )
        if args.task_stream:
            result["task_stream"] = task_stream(
                Path(folder) / "plate.zarr",
                Path(folder) / "streamed.zarr",
                args.workers,
                args.diameter,
            )
    stages = result["stages_s"]
    total = sum(stages.values())
    print(
        f"{args.frames} frames of {args.z_slices or 1} x {args.size} x {args.size}, "
        f"nuclei {result['diameter_px']:.1f}"
        f" px (network on {result['network_px'][0]} x {result['network_px'][1]}), "
        f"{result['cells']} cells\n"
    )
    print("| stage | seconds | share of the stages |\n|---|---|---|")
    for stage, value in stages.items():
        print(f"| {stage} | {value:.2f} | {value / total:.0%} |")
    print(f"| **sum of the stages** | {total:.2f} | 100% |")
    network = stages["network"]
    fields = args.fields
    # every field has the first one's shape; the network's pace before and after the run
    plate_network = (network + result["network_after_run_s"]) / 2 * fields
    print(
        f"\nwhole run (`pipeline.run` of {fields} field(s), {args.workers} workers, cluster start "
        f"included): {result['run_s']:.1f} s ({result['run_reported_s']:.1f} s reported by the "
        f"run)\nend-to-end / network: {result['run_s'] / plate_network:.2f}; stage sum / "
        f"network: {total / network:.2f}; end-to-end / stage sum: "
        f"{result['run_s'] / (total * fields):.2f}\n"
        f"network alone before / after the run: {network:.2f} / "
        f"{result['network_after_run_s']:.2f} s\n"
        f"throughput, end-to-end / network alone (the time the run reports, the mean of the "
        f"two): {plate_network / result['run_reported_s']:.2f}"
    )
    if args.task_stream:
        stream = result["task_stream"]
        busy = stream["busy_s"]
        print(
            f"\nrun on a started cluster: {stream['wall_s']:.1f} s wall, workers idle "
            f"{stream['idle_share']:.0%} of {args.workers} x wall; throughput, end-to-end / "
            f"network alone: {plate_network / stream['wall_s']:.2f}\n"
        )
        print("| task kind (key prefix) | worker seconds | share of busy |\n|---|---|---|")
        for prefix, value in sorted(busy.items(), key=lambda item: -item[1])[:15]:
            print(f"| {prefix} | {value:.2f} | {value / sum(busy.values()):.0%} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
