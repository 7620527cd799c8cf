"""Distributed batch processing of OME-Zarr microscopy plates.

The public API: :func:`open_plate`, :func:`segment`, :func:`measure`, :func:`track`, :func:`run`.
"""

__version__ = "0.1.0"

from pipeline.api import open_plate, run, segment
from pipeline.measure import measure
from pipeline.track import track

__all__ = ["__version__", "measure", "open_plate", "run", "segment", "track"]
