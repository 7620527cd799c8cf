"""Reading and writing: OME-Zarr, image import (TIFF, ND2, CZI, LIF), Parquet tables, Cell Tracking
Challenge folders."""

from pipeline.io.ctc import export_ctc, read_ctc, write_ctc

__all__ = ["export_ctc", "read_ctc", "write_ctc"]
