"""Distributed batch processing of OME-Zarr microscopy plates.

The public API: :func:`open_plate`, :func:`segment`, :func:`measure`, :func:`track`, :func:`run`.
"""

from pipeline._version import __version__
from pipeline.api import open_plate, run, segment
from pipeline.measurement.cells import measure
from pipeline.tracking import track

__all__ = ["__version__", "measure", "open_plate", "run", "segment", "track"]
