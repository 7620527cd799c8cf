"""Run configuration: a YAML file, validated (unknown keys rejected) and hashed for provenance."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from pipeline.errors import PipelineInputError
from pipeline.segment.classical import ClassicalParameters
from pipeline.segment.convnet import ConvNetParameters

__all__ = ["RunConfig", "load_config"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassicalConfig(_Strict):
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


class ConvNetConfig(_Strict):
    """The conv-net segmenter: model, scale, how inference runs, and its post-processing."""

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
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: PositiveInt | None = Field(
        1, description="torch threads per inference task on a CPU (None: torch's default)"
    )
    batch_size: PositiveInt = 4
    tile_px: PositiveInt = Field(1024, description="tile edge at the model's scale")
    frames_per_block: PositiveInt = Field(4, description="timepoints batched in one task")
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


class SegmentationConfig(_Strict):
    """Which segmenter runs, on which channel."""

    method: Literal["convnet", "classical"] = "convnet"
    channel: str | int = Field(0, description="channel name or index holding the nuclei")
    convnet: ConvNetConfig = ConvNetConfig()
    classical: ClassicalConfig = ClassicalConfig()


class HaloConfig(_Strict):
    """Halo depth in micrometres; z and the image plane differ for anisotropic voxels."""

    xy: PositiveFloat = 40.0
    z: PositiveFloat = 15.0


class TilingConfig(_Strict):
    """How fields are cut into blocks."""

    halo_um: HaloConfig = HaloConfig()
    min_block_px: PositiveInt = Field(
        256, description="smallest block edge in y/x; blocks are whole input chunks"
    )
    halo_retries: int = Field(
        3,
        ge=0,
        description="times a field is recomputed with a doubled halo when a cell does not fit",
    )


class TrackingConfig(_Strict):
    """Linear-assignment tracking (see :func:`pipeline.track.track`)."""

    max_distance_um: PositiveFloat = Field(8.0, description="largest move between two frames")
    max_gap: int = Field(2, ge=0, description="frames a cell may be missed (0: no gap closing)")
    gap_closing_max_distance_um: PositiveFloat | None = Field(
        None, description="largest distance across a gap (None: max_distance_um)"
    )
    divisions: bool = True
    splitting_max_distance_um: PositiveFloat | None = Field(
        None, description="largest mother-daughter distance (None: max_distance_um)"
    )
    feature_weights: dict[str, float] = Field(
        default_factory=dict,
        description="e.g. {area: 1.0}: link cost times 1 + weight * |ln ratio| of the feature",
    )
    write_track_labels: bool = Field(
        False, description="also write labels/tracks whose ids are track ids (as CTC expects)"
    )

    def parameters(self) -> dict[str, object]:
        """Keyword arguments of :func:`pipeline.track.track`."""
        return {
            "max_distance": self.max_distance_um,
            "max_gap": self.max_gap,
            "gap_closing_max_distance": self.gap_closing_max_distance_um,
            "divisions": self.divisions,
            "splitting_max_distance": self.splitting_max_distance_um,
            "feature_weights": dict(self.feature_weights),
        }


class ComputeConfig(_Strict):
    """How much work is on the cluster at once."""

    fields_in_flight: PositiveInt = Field(
        4, description="fields of view whose graphs are on the scheduler at the same time"
    )
    frames_in_flight: PositiveInt = Field(
        64,
        description="timepoints of a field segmented at once (bounds the conv-net maps held "
        "on GPU workers); results do not depend on it",
    )


class InputConfig(_Strict):
    """How the input is read."""

    missing_chunks: Literal["error", "fill"] = Field(
        "error",
        description="a chunk absent from the input store fails its field (error) or reads as "
        "the array's fill value (fill: for writers that skip empty chunks)",
    )


class RunConfig(_Strict):
    """A run's settings; all but ``compute`` decide its results (and are hashed)."""

    input: InputConfig = InputConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    tiling: TilingConfig = TilingConfig()
    tracking: TrackingConfig = TrackingConfig()
    compute: ComputeConfig = ComputeConfig()

    def digest(self) -> str:
        """sha256 of the canonical JSON of the settings that decide results (not ``compute``).

        A unit of work whose recorded digest differs from this one is recomputed on resume.
        """
        text = json.dumps(self.model_dump(mode="json", exclude={"compute"}), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{where}'"
    return f"bad config value for '{where}': {first['msg']}"


def load_config(path: str | Path | None) -> RunConfig:
    """Read and validate a YAML run configuration; ``None`` gives the defaults.

    Raises
    ------
    PipelineInputError
        If the file is missing, is not YAML, has an unknown key or a bad value.
    """
    if path is None:
        return RunConfig()
    path = Path(path)
    if not path.is_file():
        raise PipelineInputError("config file not found", path)
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise PipelineInputError(
            f"config is not valid YAML ({error.__class__.__name__})", path
        ) from None
    if not isinstance(content, dict):
        raise PipelineInputError("config must be a mapping of keys to values", path)
    try:
        return RunConfig.model_validate(content)
    except ValidationError as error:
        raise PipelineInputError(_describe(error), path) from None
