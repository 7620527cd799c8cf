"""The settings of the segmentation stage, as a run's configuration and the API take them.

The post-processing fields mirror :class:`~pipeline.segmentation.convnet.ConvNetParameters` and
:class:`~pipeline.segmentation.classical.ClassicalParameters` (which the recipes take); how the
network runs (:class:`ConvNetExecution`) does not change results and is kept apart, under the
run's ``compute`` section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from pipeline.segmentation.classical import ClassicalParameters
from pipeline.segmentation.convnet import ConvNetParameters

__all__ = [
    "ClassicalConfig",
    "ConvNetConfig",
    "ConvNetExecution",
    "SegmentationConfig",
    "StrictModel",
]


class StrictModel(BaseModel):
    """Settings that reject unknown keys and cannot be changed once made."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassicalConfig(StrictModel):
    """Parameters of the classical recipe (see :class:`ClassicalParameters`)."""

    closing_radius_um: float = Field(1.0, ge=0)
    max_hole_size_um: float = Field(100.0, ge=0)
    smoothing_sigma_um: float = Field(1.0, ge=0)
    min_distance_um: PositiveFloat = 3.0
    min_size_um: float = Field(10.0, ge=0)
    max_size_um: PositiveFloat | None = None
    clear_border: bool = False

    def parameters(self) -> ClassicalParameters:
        """The recipe parameters as the segmenter takes them."""
        return ClassicalParameters(**self.model_dump())


class ConvNetConfig(StrictModel):
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
    foreground_threshold: float = Field(ConvNetParameters.foreground_threshold, gt=0, lt=1)
    seed_threshold: float = Field(ConvNetParameters.seed_threshold, ge=0)
    seed_radius: PositiveFloat = Field(
        ConvNetParameters.seed_radius, description="in nucleus diameters"
    )
    smoothing: float = Field(
        ConvNetParameters.smoothing, ge=0, description="Gaussian sigma in nucleus diameters"
    )
    min_size: float = Field(
        ConvNetParameters.min_size, ge=0, description="fraction of a one-diameter disc or ball"
    )
    clear_border: bool = ConvNetParameters.clear_border
    axial_fraction: float = Field(
        ConvNetParameters.axial_fraction,
        ge=0,
        le=1,
        description="z-stacks: keep voxels above this fraction of the axial intensity peak",
    )

    def parameters(self) -> ConvNetParameters:
        """The post-processing parameters."""
        names = ConvNetParameters.__dataclass_fields__
        return ConvNetParameters(**{k: v for k, v in self.model_dump().items() if k in names})


class SegmentationConfig(StrictModel):
    """Which segmenter runs, on which channel."""

    method: Literal["convnet", "classical"] = "convnet"
    channel: str | int = Field(0, description="channel name or index holding the nuclei")
    convnet: ConvNetConfig = ConvNetConfig()
    classical: ClassicalConfig = ClassicalConfig()


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
