"""Distributed batch processing of OME-Zarr microscopy plates.

The public API: :func:`open_plate`, :func:`segment`, :func:`measure`, :func:`track`, :func:`run`,
:func:`read_cells` (a run's cells as one table), and for cell classification
:class:`CellClassifier` and :func:`label_by_marker`.
They are imported on first use, so that ``import pipeline.<submodule>`` (the command line, the
training loop on a GPU node) loads only what that submodule needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline._version import __version__

if TYPE_CHECKING:
    from pipeline.api import open_plate, run, segment
    from pipeline.classification.classifier import CellClassifier
    from pipeline.classification.marker import label_by_marker
    from pipeline.io.tables import read_cells
    from pipeline.measurement.cells import measure
    from pipeline.tracking import track

_PUBLIC_HOMES = {
    "CellClassifier": "pipeline.classification.classifier",
    "label_by_marker": "pipeline.classification.marker",
    "open_plate": "pipeline.api",
    "run": "pipeline.api",
    "segment": "pipeline.api",
    "measure": "pipeline.measurement.cells",
    "read_cells": "pipeline.io.tables",
    "track": "pipeline.tracking",
}

__all__ = [
    "CellClassifier",
    "__version__",
    "label_by_marker",
    "measure",
    "open_plate",
    "read_cells",
    "run",
    "segment",
    "track",
]


def __getattr__(name: str) -> Any:
    """Import a public function from its module the first time it is asked for."""
    if name not in _PUBLIC_HOMES:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC_HOMES})
