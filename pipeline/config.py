"""Run configuration: a YAML file, validated (unknown keys rejected) and hashed for provenance."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
)

from pipeline.errors import PipelineInputError
from pipeline.measurement.features import FeatureSet
from pipeline.segmentation.classical import ClassicalParameters
from pipeline.segmentation.parameters import (
    CellsConfig,
    ConvNetConfig,
    ConvNetExecution,
    SegmentationConfig,
)
from pipeline.settings import StrictModel

__all__ = [
    "CellsConfig",
    "ClassicalParameters",
    "ComputeConfig",
    "ConvNetConfig",
    "HaloConfig",
    "MeasurementConfig",
    "OutputConfig",
    "RunConfig",
    "SegmentationConfig",
    "TilingConfig",
    "TrackingConfig",
    "load_config",
]


class HaloConfig(StrictModel):
    """Halo depth in micrometres; z and the image plane differ for anisotropic voxels."""

    xy: PositiveFloat = 40.0
    z: PositiveFloat = 15.0


class TilingConfig(StrictModel):
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


class TrackingConfig(StrictModel):
    """Linear-assignment tracking (see :func:`pipeline.tracking.track`)."""

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
        """Keyword arguments of :func:`pipeline.tracking.track`."""
        return {
            "max_distance": self.max_distance_um,
            "max_gap": self.max_gap,
            "gap_closing_max_distance": self.gap_closing_max_distance_um,
            "divisions": self.divisions,
            "splitting_max_distance": self.splitting_max_distance_um,
            "feature_weights": dict(self.feature_weights),
        }


class ComputeConfig(ConvNetExecution):
    """How the work runs: how much is on the cluster at once, and how the network runs.

    None of these change results (tiled inference equals whole-image inference), so they are
    left out of the results digest: changing them between runs recomputes nothing.
    """

    fields_in_flight: PositiveInt = Field(
        4, description="fields of view whose graphs are on the scheduler at the same time"
    )
    block_halos: PositiveFloat = Field(
        8.0,
        description="blocks in y/x are at least this many halos long, so that the halo read "
        "around each block is a bounded share of its work ((1 + 2 / block_halos)^2 of its area); "
        "larger blocks hold more memory per task",
    )
    frames_in_flight: PositiveInt = Field(
        64,
        description="timepoints of a field segmented at once (bounds the conv-net maps held "
        "on GPU workers); results do not depend on it",
    )


class MeasurementConfig(StrictModel):
    """What is measured beyond position, size and mean intensities: with ``segmentation.cells``
    the compartments of :mod:`pipeline.measurement.compartments`, and the feature sets of
    :mod:`pipeline.measurement.features`."""

    ring_um: PositiveFloat = Field(
        3.0, description="width of the cytoplasmic ring (cytoring) outside each nucleus"
    )
    compartment_margin_um: NonNegativeFloat = Field(
        0.0, description="band on both sides of the nuclear outline left out of compartments"
    )
    cytoplasm_mixture: bool = Field(
        False, description="add the Gaussian-mixture estimate of each cell's cytoplasm"
    )
    features: list[FeatureSet] = Field(
        default_factory=list,
        description="CellProfiler feature sets (cp-measure) of each cell, or of each nucleus "
        "without segmentation.cells: sizeshape, zernike, feret, intensity, texture, "
        "radial_distribution, radial_zernikes, granularity, colocalization (channel pairs), "
        "neighbors",
    )


class ClassificationConfig(StrictModel):
    """Classify every cell from its crop with a model of ``pipeline classify train``; the cells
    table gains ``class_probability_<class>`` columns and ``class``."""

    model: str = Field(description="classifier file (.pt) written by pipeline classify train")

    @field_validator("model")
    @classmethod
    def _existing_file(cls, value: str) -> str:
        path = Path(value).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"classifier model not found: {path}")
        return str(path)

    def model_sha256(self) -> str:
        """sha256 of the model file: a new model makes results stale, a moved one does not."""
        return hashlib.sha256(Path(self.model).read_bytes()).hexdigest()


class CropsConfig(StrictModel):
    """Cut a crop around every cell after the run (``OUT/crops``, as ``pipeline crops`` does);
    derived from the fields' results, so not part of the settings digest."""

    size_um: PositiveFloat = Field(description="crop edge in micrometres")
    size_px: PositiveInt = Field(64, description="crop edge in pixels")
    channels: list[str] | None = Field(None, description="channel names (default: all)")
    block: PositiveInt = Field(512, description="crops per task and chunk")


class InputConfig(StrictModel):
    """How the input is read."""

    missing_chunks: Literal["auto", "error", "fill"] = Field(
        "auto",
        description="a chunk absent from the input store: auto: reads as the array's fill value "
        "where every stored pixel around it has that value (zarr-python skips such chunks), "
        "else fails its field; error: always fails its field; fill: always reads as the fill "
        "value (for writers that skip empty chunks); chunks read as fill are listed in the "
        "field's record",
    )
    non_finite: Literal["error", "zero"] = Field(
        "error",
        description="floating-point images: NaN or infinite pixels fail their field (error) or "
        "read as 0 (zero: e.g. the NaN padding of registered or deskewed images)",
    )


class OutputConfig(StrictModel):
    """How the output arrays are stored (not what they hold: left out of the results digest)."""

    shard_px: PositiveInt | None = Field(
        2048,
        description="Zarr v3 shards of the image copy and label images: one file holds the "
        "chunks of up to this many pixels in y and x of one timepoint, channel and z chunk "
        "(2048 with 256-pixel chunks: 64 chunks per file); null: one file per chunk",
    )


class RunConfig(StrictModel):
    """A run's settings; all but ``compute``, ``output`` and ``crops`` decide its results (and
    are hashed)."""

    input: InputConfig = InputConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    tiling: TilingConfig = TilingConfig()
    tracking: TrackingConfig = TrackingConfig()
    measurement: MeasurementConfig = MeasurementConfig()
    classification: ClassificationConfig | None = None
    crops: CropsConfig | None = None
    compute: ComputeConfig = ComputeConfig()
    output: OutputConfig = OutputConfig()

    def digest(self) -> str:
        """sha256 of the canonical JSON of the settings that decide results (not ``compute``,
        ``output`` or ``crops``).

        A unit of work whose recorded digest differs from this one is recomputed on resume.
        Sections added later (``segmentation.cells``, ``measurement``, ``classification``)
        enter it only when set, so results made before they existed stay valid; a classifier
        enters by the digest of its file.
        """
        settings = self.model_dump(mode="json", exclude={"compute", "crops", "output"})
        if self.segmentation.cells is None:
            del settings["segmentation"]["cells"]
        if self.measurement == MeasurementConfig():
            del settings["measurement"]
        if self.classification is None:
            del settings["classification"]
        else:
            settings["classification"] = {"model_sha256": self.classification.model_sha256()}
        text = json.dumps(settings, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


# Execution settings that sat in ``segmentation.convnet`` before they moved to ``compute``.
_MOVED_TO_COMPUTE = tuple(ConvNetExecution.model_fields)


def _printable(text: str) -> str:
    """``text`` on one line: control characters (a key of ``"\\n"``) written as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = _printable(".".join(str(part) for part in first["loc"]))
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][-1])
        if first["loc"][:-1] == ("segmentation", "convnet") and key in _MOVED_TO_COMPUTE:
            return f"config key '{where}' has moved to 'compute.{key}'"
        return f"unknown config key '{where}'"
    return f"bad config value for '{where}': {_printable(first['msg'])}"


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
