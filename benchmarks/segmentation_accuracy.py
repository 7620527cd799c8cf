"""AP@0.5 of the classical segmenter against simulated ground truth.

Usage: python benchmarks/segmentation_accuracy.py [--seeds 4] [--frames 8] [--size 256]

For each seed, one simulated field (2D) is segmented frame by frame with the default
parameters; AP = TP / (TP + FP + FN) at IoU >= 0.5 per frame, then averaged.
"""

from __future__ import annotations

import argparse

import numpy as np

from pipeline import segment
from pipeline.metrics import match_instances
from pipeline.synthetic import simulate_field


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--z", type=int, default=None, help="z slices (3D)")
    args = parser.parse_args()
    print("seed  frames  cells  AP@0.5(mean)  AP first frame  AP last frame")
    all_ap = []
    for seed in range(args.seeds):
        field = simulate_field(n_frames=args.frames, size=args.size, z_slices=args.z, seed=seed)
        labels = segment(
            field.image[:, 0], dims="tzyx" if args.z else "tyx", pixel_size=field.pixel_size
        )
        ap = []
        for truth, found in zip(field.labels, labels, strict=True):
            match = match_instances(truth, found, iou_threshold=0.5)
            ap.append(match.tp / (match.tp + match.fp + match.fn))
        all_ap.extend(ap)
        n_cells = sum(len(np.unique(f)) - 1 for f in field.labels)
        print(
            f"{seed:4d}  {args.frames:6d}  {n_cells:5d}  {np.mean(ap):12.3f}  "
            f"{ap[0]:14.3f}  {ap[-1]:13.3f}"
        )
    print(f"mean AP@0.5 over {len(all_ap)} frames: {np.mean(all_ap):.3f}")


if __name__ == "__main__":
    main()
