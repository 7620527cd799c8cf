"""The segmenters a run can use, behind one function: frames in, global cell ids out (lazy).

``convnet`` (default): tiled conv-net inference (:mod:`pipeline.convnet.inference`), then seeds
and watershed on its maps (:mod:`pipeline.segmentation.convnet`). ``classical``: Otsu per frame,
then the classical recipe (:mod:`pipeline.segmentation.classical`). Both are stitched exactly by
:func:`pipeline.segmentation.tiled.label_frames`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dask.array as da
import numpy as np
from dask.delayed import Delayed

from pipeline.convnet.inference import maps_from_normalised, normalised_frames, runs_on_gpu
from pipeline.convnet.settings import InferenceSettings, ModelSettings
from pipeline.normalize import frame_statistics, is_dark_on_light
from pipeline.qc.plausibility import BRIGHTFIELD_WARNING
from pipeline.segmentation.classical import ClassicalRecipe
from pipeline.segmentation.convnet import RECIPE_MAPS, ConvNetRecipe
from pipeline.segmentation.diameter import estimate_diameter
from pipeline.segmentation.parameters import ConvNetExecution, SegmentationConfig
from pipeline.segmentation.threshold import frame_thresholds
from pipeline.segmentation.tiled import label_frames

__all__ = [
    "brightfield_warnings",
    "diameter_sample",
    "estimate_field_diameter",
    "inference_settings",
    "instance_ids",
    "stitching_halo_um",
]


def inference_settings(
    segmentation: SegmentationConfig, compute: ConvNetExecution | None = None
) -> InferenceSettings:
    """The inference settings of a segmentation configuration and how the network runs."""
    convnet, compute = segmentation.convnet, compute or ConvNetExecution()
    chosen = {name: getattr(convnet, name) for name in ModelSettings.model_fields}
    execution = {name: getattr(compute, name) for name in ConvNetExecution.model_fields}
    return InferenceSettings(**chosen, **execution)


def diameter_sample(frames: da.Array) -> da.Array:
    """The plane a field's nucleus diameter is estimated on: middle timepoint, middle z."""
    plane = frames[frames.shape[0] // 2]
    while plane.ndim > 2:
        plane = plane[plane.shape[0] // 2]
    return plane


def estimate_field_diameter(
    frames: da.Array,
    segmentation: SegmentationConfig,
    compute: ConvNetExecution | None = None,
    evaluate: Callable[[Delayed], Any] | None = None,
) -> float:
    """The nucleus diameter of a field in pixels, estimated on its :func:`diameter_sample`.

    ``evaluate`` computes each round's graph (default: Dask's threads; a run passes its
    cluster's client), see :func:`pipeline.segmentation.diameter.estimate_diameter`.
    """
    return estimate_diameter(
        diameter_sample(frames),
        inference_settings(segmentation, compute),
        segmentation.convnet,
        evaluate=evaluate,
    )


def brightfield_warnings(
    frames: da.Array,
    segmentation: SegmentationConfig,
    evaluate: Callable[[da.Array], np.ndarray] = np.asarray,
) -> list[str]:
    """:data:`~pipeline.qc.plausibility.BRIGHTFIELD_WARNING` where the shipped conv-net is to
    segment frames declared brightfield (``polarity: dark``) or whose :func:`diameter_sample`
    looks like it (:func:`pipeline.normalize.is_dark_on_light`); otherwise nothing.

    ``evaluate`` computes the sample's verdict (default: here; a run passes its cluster's).
    """
    convnet = segmentation.convnet
    shipped = segmentation.method == "convnet" and convnet.model is None
    if not shipped or convnet.polarity == "bright":
        return []
    dark = convnet.polarity == "dark"
    if not dark:
        sample = diameter_sample(frames)[np.newaxis]
        looks = frame_statistics(sample, lambda *h: np.asarray(is_dark_on_light(*h), float))
        dark = bool(evaluate(looks)[0])
    return [BRIGHTFIELD_WARNING] if dark else []


HALO_DIAMETERS = 6.0


def stitching_halo_um(halo_um: dict[str, float], diameter_um: float | None) -> dict[str, float]:
    """The halo for exact stitching: the configured one, widened to the nuclei's needs.

    A nucleus, the nuclei touching it and the conv-net post-processing's reach span about
    :data:`HALO_DIAMETERS` diameters (``diameter_um`` None: the classical recipe, unchanged).
    A field whose cells still do not fit is detected and retried with a larger halo.
    """
    if diameter_um is None:
        return dict(halo_um)
    return {axis: max(value, HALO_DIAMETERS * diameter_um) for axis, value in halo_um.items()}


def instance_ids(
    frames: da.Array,
    segmentation: SegmentationConfig,
    *,
    pixel_size: Sequence[float],
    halo: Sequence[int],
    diameter_px: float | None = None,
    compute: ConvNetExecution | None = None,
    on_maps: Callable[[da.Array], da.Array] | None = None,
) -> da.Array:
    """Global cell ids (see :func:`label_frames`) of (t, [z,] y, x) frames of one channel.

    Parameters
    ----------
    frames
        Raw intensities, one chunk per timepoint, spatial chunks = the block plan.
    segmentation
        Method and its parameters.
    pixel_size
        Micrometres per pixel per spatial axis.
    halo
        Halo of the instance stitching, in pixels per spatial axis.
    diameter_px
        Nucleus diameter in pixels for the conv-net (required for it; see
        :func:`estimate_field_diameter`).
    compute
        How the network runs (default: :class:`ConvNetExecution`; a run passes its
        ``compute`` section).
    on_maps
        Applied to the conv-net's maps before post-processing (e.g. to persist them on GPU
        workers).
    """
    if segmentation.method == "classical":
        recipe = ClassicalRecipe(segmentation.classical)
        return label_frames(
            frames, frame_thresholds(frames), recipe=recipe, pixel_size=pixel_size, halo=halo
        )
    if diameter_px is None:
        raise ValueError("the conv-net needs a nucleus diameter (given or estimated)")
    compute = compute or ConvNetExecution()
    settings = inference_settings(segmentation, compute)
    normalised = normalised_frames(frames, settings)
    maps = maps_from_normalised(
        normalised,
        diameter=diameter_px,
        settings=settings,
        output_chunks=frames.chunks[-2:],
        frames_per_block=compute.frames_per_task(runs_on_gpu(compute.device)),
        channels=RECIPE_MAPS,
    )
    if on_maps is not None:
        maps = on_maps(maps)
    volumetric = frames.ndim == 4
    if volumetric:  # the intensity shapes 3D instances along z (ConvNetRecipe)
        maps = da.concatenate([maps, normalised[:, np.newaxis]], axis=1).rechunk({1: -1})
    recipe = ConvNetRecipe(
        segmentation.convnet,
        diameter_px * float(pixel_size[-1]),
        volumetric=volumetric,
    )
    return label_frames(maps, recipe=recipe, pixel_size=pixel_size, halo=halo)
