"""The settings of the segmentation stage, as a run's configuration and the API take them.

The recipes' own parameter models are the settings: ``segmentation.classical`` is a
:class:`~pipeline.segmentation.classical.ClassicalParameters`, ``segmentation.convnet`` a
:class:`~pipeline.segmentation.convnet.ConvNetParameters` with the model and its scale
(:class:`ConvNetConfig`). How the network runs (:class:`ConvNetExecution`) does not change
results and is kept apart, under the run's ``compute`` section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from pipeline.segmentation.classical import ClassicalParameters
from pipeline.segmentation.convnet import ConvNetParameters
from pipeline.settings import StrictModel

__all__ = ["ConvNetConfig", "ConvNetExecution", "SegmentationConfig"]


class ConvNetConfig(ConvNetParameters):
    """The conv-net segmenter: model, scale and post-processing (how it runs: ``compute``)."""

    model: str | None = Field(None, description="model path (NAME or NAME.pt); None: shipped")
    diameter_px: PositiveFloat | None = Field(
        None, description="typical nucleus diameter in pixels; None: estimated per field"
    )
    tta: bool = Field(False, description="average the 8 rotations/reflections of each tile")
    polarity: Literal["auto", "bright", "dark"] = Field(
        "auto",
        description="nuclei bright on dark (fluorescence) or dark on light (brightfield, "
        "inverted); auto: decided per frame",
    )


class SegmentationConfig(StrictModel):
    """Which segmenter runs, on which channel."""

    method: Literal["convnet", "classical"] = "convnet"
    channel: str | int = Field(0, description="channel name or index holding the nuclei")
    convnet: ConvNetConfig = ConvNetConfig()
    classical: ClassicalParameters = ClassicalParameters()


class ConvNetExecution(StrictModel):
    """How the conv-net runs; results do not depend on it (tiled == whole-image inference)."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the conv-net runs (auto: cuda where a worker has a GPU)"
    )
    cpu_threads: PositiveInt | None = Field(
        1, description="torch threads per inference task on a CPU (None: torch's default)"
    )
    batch_size: PositiveInt = Field(4, description="tiles per forward pass")
    tile_px: PositiveInt = Field(1024, description="tile edge at the model's scale")
    frames_per_block: PositiveInt = Field(4, description="timepoints batched in one task")
