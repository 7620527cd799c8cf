"""Throughput of conv-net inference: one whole-image forward pass vs the tiled Dask inference.

Usage: python benchmarks/inference_throughput.py [--size 2048] [--repeats 3] [--tile 1024]
       [--model PATH] [--device auto] [--diameter D] [--threads N]

On one synthetic nuclear image of SIZE x SIZE pixels, in one run, side by side:

(a) whole: a single forward pass of the network over the whole (normalised) image, with N
    torch threads (default: all cores);
(b) tiled: :func:`pipeline.convnet.inference.predict_maps_tiled` on the same image as a Dask
    array computed with the threaded scheduler (N threads, one torch thread per task on a CPU):
    whole-frame percentiles, stride-aligned tiles with their receptive-field halo, batching and
    centre-crop stitching all included;
(c) segmentation: (b) plus instances (seeds, watershed, exact stitching, renumbering), i.e.
    ``pipeline.segment`` on the Dask array with the diameter given.

Megapixels per second are of the input image; the best of ``--repeats`` runs is kept for each.
The ratio (b)/(a) is the cost of tiling (target >= 0.8). With ``--diameter`` different from the
model's, (b) and (c) include the rescaling to the model's scale and back, and (a) runs on the
rescaled image (the same network work).
"""

from __future__ import annotations

import argparse
import os
import time

import dask
import dask.array as da
import numpy as np
import torch

from pipeline import segment
from pipeline.convnet.inference import (
    InferenceSettings,
    loaded_model,
    predict_maps_tiled,
    rescale_factor,
    run_network,
)
from pipeline.normalize import frame_percentiles, normalize
from pipeline.synthetic import simulate_field


def _best_of(repeats: int, function) -> float:
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile", type=int, default=1024, help="tile edge at the model's scale")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--diameter", type=float, default=None, help="nucleus diameter (px)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for both (a) and (b) (default: cores)",
    )
    args = parser.parse_args()

    cores = args.threads or os.cpu_count() or 1
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    image = simulate_field(n_frames=1, size=args.size, seed=0).image[0, 0]
    megapixels = image.size / 1e6
    _, info = loaded_model(args.model, device)
    diameter = args.diameter or info.diameter_px
    factor = rescale_factor(info, diameter)
    scaled = round(args.size * factor)
    low, high = frame_percentiles(image[np.newaxis], info.percentiles)[0]
    plane = normalize(image, low, high)
    if scaled != args.size:
        from scipy import ndimage as ndi

        plane = ndi.zoom(plane, scaled / args.size, order=1)

    whole_settings = InferenceSettings(model=args.model, device=device, batch_size=1)
    torch.set_num_threads(cores)
    whole = _best_of(args.repeats, lambda: run_network(plane[np.newaxis], whole_settings))

    tiled_settings = InferenceSettings(
        model=args.model,
        device=device,
        cpu_threads=1 if device == "cpu" else None,
        batch_size=args.batch,
        tile_px=args.tile,
    )
    lazy = da.from_array(image[np.newaxis], chunks=(1, 1024, 1024))
    with dask.config.set(scheduler="threads", num_workers=cores):
        tiled = _best_of(
            args.repeats,
            lambda: predict_maps_tiled(lazy, diameter=diameter, settings=tiled_settings).compute(),
        )
        segmentation = _best_of(
            args.repeats,
            lambda: segment(
                lazy[0],
                diameter=diameter,
                model=args.model,
                device=device,
                cpu_threads=1 if device == "cpu" else None,
                batch_size=args.batch,
                tile_px=args.tile,
            ).compute(),
        )
    torch.set_num_threads(cores)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {cores} threads"
    print(f"device: {name}; image {args.size}x{args.size}; diameter {diameter:g} px")
    print(f"model scale {scaled}x{scaled}; tile {args.tile}; best of {args.repeats}")
    print(f"{'':32s}{'seconds':>10s}{'MP/s':>10s}")
    rows = [
        ("(a) whole-image forward pass", whole),
        ("(b) tiled Dask inference", tiled),
        ("(c) segmentation (b + instances)", segmentation),
    ]
    for label, seconds in rows:
        print(f"{label:32s}{seconds:10.2f}{megapixels / seconds:10.2f}")
    print(f"ratio (b)/(a): {whole / tiled:.2f}")


if __name__ == "__main__":
    main()
