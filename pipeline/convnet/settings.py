"""How the network runs and which network: the settings of inference (torch-free to import).

:class:`ModelSettings` decide results (which weights, test-time augmentation, polarity) and
belong to a run's ``segmentation.convnet`` section; :class:`ConvNetExecution` does not (tiled
== whole-image inference) and is the run's ``compute`` section. :class:`InferenceSettings`
is both, as :mod:`pipeline.convnet.inference` takes them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from pipeline.settings import StrictModel

__all__ = [
    "GPU_FRAMES_PER_BLOCK",
    "GPU_TILES_PER_PASS",
    "ConvNetExecution",
    "InferenceSettings",
    "ModelSettings",
]

GPU_FRAMES_PER_BLOCK = 4
"""Timepoints per inference task on a GPU unless set: tiles of several frames fill its batches."""

GPU_TILES_PER_PASS = 4
"""Tiles per forward pass on a GPU unless set. A CPU takes one at a time: it gains no speed
from batches, and each tile's activations take about 1 GB at the default tile size."""


def _set_or_device_default(value: int | None, gpu: bool, gpu_default: int) -> int:
    """``value`` where it is set, else ``gpu_default`` on a GPU and 1 on a CPU."""
    if value is not None:
        return value
    return gpu_default if gpu else 1


class ModelSettings(StrictModel):
    """Which network, and how its input is presented; these change results."""

    model: str | None = Field(None, description="model path (NAME or NAME.pt); None: shipped")
    tta: bool = Field(False, description="average the 8 rotations/reflections of each tile")
    polarity: Literal["auto", "bright", "dark"] = Field(
        "auto",
        description="nuclei bright on dark (fluorescence) or dark on light (brightfield, "
        "inverted); auto: decided per frame from its histogram",
    )


class ConvNetExecution(StrictModel):
    """How the conv-net runs; results do not depend on it (tiled == whole-image inference)."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the conv-net runs (auto: cuda where the process sees a GPU)"
    )
    cpu_threads: PositiveInt | None = Field(
        1, description="torch threads per inference task on a CPU (None: torch's default)"
    )
    batch_size: PositiveInt | None = Field(
        None, description="tiles per forward pass (None: 4 on a GPU, 1 on a CPU)"
    )
    tile_px: PositiveInt = Field(
        1536,
        description="largest tile edge at the model's scale; a plane is cut into the fewest "
        "tiles of at most this edge, as equal as possible (each read with a receptive-field "
        "halo, so larger tiles waste less)",
    )
    frames_per_block: PositiveInt | None = Field(
        None,
        description="timepoints batched in one inference task (None: 4 on a GPU, to fill its "
        "batches; 1 on CPUs, so that one frame's post-processing overlaps the next one's "
        "inference)",
    )

    def tiles_per_pass(self, gpu: bool) -> int:
        """Tiles per forward pass: ``batch_size``, else the default for the device.

        Parameters
        ----------
        gpu
            Whether the network runs on a GPU.
        """
        return _set_or_device_default(self.batch_size, gpu, GPU_TILES_PER_PASS)

    def frames_per_task(self, gpu: bool) -> int:
        """Timepoints per inference task: ``frames_per_block``, else the default for the device.

        Parameters
        ----------
        gpu
            Whether the network runs on a GPU.
        """
        return _set_or_device_default(self.frames_per_block, gpu, GPU_FRAMES_PER_BLOCK)


class InferenceSettings(ModelSettings, ConvNetExecution):
    """Everything inference takes: the model settings and how it runs."""
