"""What a run did: per-field outcomes (computed, skipped or failed) and the run's summary."""

from __future__ import annotations

import traceback as tracebacks
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import PipelineInputError
from pipeline.io.omezarr import FieldOfView

__all__ = ["FieldOutcome", "RunSummary", "failed_outcome", "skipped_outcome"]


@dataclass
class FieldOutcome:
    """What happened to one field of view."""

    path: str
    well: str | None
    n_frames: int
    n_pixels: int
    n_cells: int = 0
    n_tracks: int = 0
    halo_um: dict[str, float] = field(default_factory=dict)
    diameter_px: float | None = None
    error: str | None = None
    traceback: str | None = None
    skipped: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass
class RunSummary:
    """What a run did, for the terminal summary and the output's provenance."""

    input_path: str
    output_path: str
    fields: list[FieldOutcome]
    wall_seconds: float
    store_retries: int = 0  # object-store requests retried after transient errors
    devices: dict[str, str] = field(default_factory=dict)  # the conv-net's device per worker
    device_warnings: list[str] = field(default_factory=list)  # e.g. a GPU torch cannot use

    @property
    def failed(self) -> list[FieldOutcome]:
        """Fields that did not complete."""
        return [f for f in self.fields if f.error is not None]

    @property
    def skipped(self) -> list[FieldOutcome]:
        """Fields done by an earlier run with the same provenance, not computed again."""
        return [f for f in self.fields if f.skipped]

    def cells_per_well(self) -> dict[str, int]:
        """Cells found per well (summed over fields and timepoints)."""
        counts: dict[str, int] = {}
        for outcome in self.fields:
            key = outcome.well or "image"
            counts[key] = counts.get(key, 0) + outcome.n_cells
        return counts

    @property
    def pixels_per_second(self) -> float:
        """Segmentation-channel pixels of fields computed by this run per second of wall time."""
        done = sum(f.n_pixels for f in self.fields if f.error is None and not f.skipped)
        return done / self.wall_seconds if self.wall_seconds > 0 else 0.0


def skipped_outcome(fov: FieldOfView, record: dict[str, Any]) -> FieldOutcome:
    """The outcome of a field done by an earlier run, from its completion record."""
    shape = fov.data.shape
    channels = fov.data.sizes.get("c", 1)
    return FieldOutcome(
        path=fov.path,
        well=fov.well,
        n_frames=fov.data.sizes.get("t", 1),
        n_pixels=int(np.prod(shape)) // channels,
        n_cells=int(record.get("n_cells", 0)),
        n_tracks=int(record.get("n_tracks", 0)),
        halo_um=record.get("halo_um", {}),
        diameter_px=record.get("diameter_px"),
        skipped=True,
        warnings=list(record.get("warnings", [])),
    )


def failed_outcome(fov: FieldOfView, error: BaseException) -> FieldOutcome:
    """The outcome of a field that failed with ``error``: one line, and the traceback (on the
    worker where it was raised) of an error that is not the user's input."""
    shape = fov.data.shape
    return FieldOutcome(
        path=fov.path,
        well=fov.well,
        n_frames=fov.data.sizes.get("t", 1),
        n_pixels=int(np.prod(shape)),
        error=_describe(error),
        traceback=None
        if isinstance(error, PipelineInputError)
        else "".join(tracebacks.format_exception(error)),
    )


def _describe(error: BaseException) -> str:
    if isinstance(error, PipelineInputError):
        return str(error)
    return f"{type(error).__name__}: {error}"
