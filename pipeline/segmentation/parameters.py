"""The settings of the segmentation stage, as a run's configuration and the API take them.

The recipes' own parameter models are the settings: ``segmentation.classical`` is a
:class:`~pipeline.segmentation.classical.ClassicalParameters`, ``segmentation.convnet`` a
:class:`~pipeline.segmentation.convnet.ConvNetParameters` with the model and its scale
(:class:`ConvNetConfig`). How the network runs (:class:`ConvNetExecution`) does not change
results and is kept apart, under the run's ``compute`` section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat

from pipeline.convnet.settings import ConvNetExecution, ModelSettings
from pipeline.convnet.weights import model_postprocessing
from pipeline.segmentation.cells import CellParameters
from pipeline.segmentation.classical import ClassicalParameters
from pipeline.segmentation.convnet import ConvNetParameters
from pipeline.settings import StrictModel

__all__ = [
    "CellsConfig",
    "ConvNetConfig",
    "ConvNetExecution",
    "SegmentationConfig",
    "with_model_postprocessing",
]


class ConvNetConfig(ConvNetParameters, ModelSettings):
    """The conv-net segmenter: model, scale and post-processing (how it runs: ``compute``)."""

    diameter_px: PositiveFloat | None = Field(
        None, description="typical nucleus diameter in pixels; None: estimated per field"
    )


class CellsConfig(CellParameters):
    """Whole cells grown from the nuclei (:mod:`pipeline.segmentation.cells`)."""

    channel: str | int | None = Field(
        None,
        description="channel name or index of the cytoplasm, membrane or phase stain the "
        "cells grow over (not needed by method expand)",
    )


class SegmentationConfig(StrictModel):
    """Which segmenter runs, on which channel; optionally whole cells grown from the nuclei."""

    method: Literal["convnet", "classical"] = "convnet"
    channel: str | int = Field(0, description="channel name or index holding the nuclei")
    convnet: ConvNetConfig = ConvNetConfig()
    classical: ClassicalParameters = ClassicalParameters()
    cells: CellsConfig | None = Field(
        None,
        description="grow whole cells from the nuclei (labels/cells then holds the cells and "
        "labels/nuclei the nuclei; a cell shares its nucleus' id); None: nuclei only",
    )


def with_model_postprocessing(segmentation: SegmentationConfig) -> SegmentationConfig:
    """``segmentation`` with the conv-net's post-processing settings its model recommends
    (:func:`pipeline.convnet.weights.model_postprocessing`) where the user set none."""
    if segmentation.method != "convnet":
        return segmentation
    convnet = segmentation.convnet
    recommended = model_postprocessing(convnet.model)
    unset = {
        name: value for name, value in recommended.items() if name not in convnet.model_fields_set
    }
    if not unset:
        return segmentation
    chosen = {name: getattr(convnet, name) for name in convnet.model_fields_set}
    resolved = type(convnet).model_validate({**chosen, **unset})
    return segmentation.model_copy(update={"convnet": resolved})
