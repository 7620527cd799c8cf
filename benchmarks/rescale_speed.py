"""Rescaling one frame to the conv-net's scale and its maps back: separable vs scipy's affine.

Usage:
    python benchmarks/rescale_speed.py [--size 1024] [--factor 1.475] [--repeats 5]

A frame of ``--size`` squared pixels (float32) is rescaled by ``--factor`` (the simulated field's
20 px nuclei to the model's 30 px), and four maps of the rescaled size back, with
:func:`pipeline.convnet.rescale.rescale_planes` and with scipy's ``affine_transform`` (order 1,
the general path the pipeline used before). Prints the best of ``--repeats`` for each, their
ratio, and the largest difference between the two.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage as ndi

from pipeline.convnet.inference import scaled_shape
from pipeline.convnet.rescale import rescale_planes


def scipy_rescale(array: np.ndarray, shape_yx: tuple[int, ...]) -> np.ndarray:
    """scipy's order-1 affine transform with the same geometry (pixel centres aligned)."""
    ratios = [i / o for i, o in zip(array.shape[-2:], shape_yx, strict=True)]
    matrix = np.diag([1.0] * (array.ndim - 2) + ratios)
    offset = np.array([0.0] * (array.ndim - 2) + [0.5 * r - 0.5 for r in ratios])
    output_shape = (*array.shape[:-2], *shape_yx)
    return ndi.affine_transform(
        array, matrix, offset=offset, output_shape=output_shape, order=1, mode="nearest"
    )


def best_of(repeats: int, function, *args) -> tuple[float, np.ndarray]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function(*args)
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--factor", type=float, default=1.475)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    frame = rng.random((1, args.size, args.size), dtype=np.float32)
    scaled = scaled_shape(frame.shape[-2:], args.factor)
    maps = rng.random((4, *scaled), dtype=np.float32)
    print("| rescale | separable | scipy affine | ratio | largest difference |")
    print("|---|---|---|---|---|")
    for name, array, shape in [
        (f"frame {args.size}^2 -> {scaled[0]}^2", frame, scaled),
        (f"4 maps {scaled[0]}^2 -> {args.size}^2", maps, frame.shape[-2:]),
    ]:
        separable, ours = best_of(args.repeats, rescale_planes, array, shape)
        general, reference = best_of(args.repeats, scipy_rescale, array, shape)
        print(
            f"| {name} | {separable:.3f} s | {general:.3f} s | {general / separable:.1f}x "
            f"| {np.abs(ours - reference).max():.1e} |"
        )


if __name__ == "__main__":
    main()
