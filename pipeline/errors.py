"""Errors that mean "the user's input is wrong", reported as one line without a traceback."""

from __future__ import annotations

from pathlib import Path


class PipelineInputError(Exception):
    """Bad user input: a missing or malformed dataset, a bad config, an unreadable chunk.

    Parameters
    ----------
    problem
        What is wrong, in words a biologist can act on.
    path
        The file, folder or zarr node the problem is in.
    """

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(f"{problem}: {self.path}" if self.path else problem)

    def __reduce__(self):
        """Keep ``problem`` and ``path`` when the error travels between Dask processes."""
        return (type(self), (self.problem, self.path))


class InputWarning(UserWarning):
    """The input was read with a guess the user should know of (a default calibration, an
    assumed axis): shown as a ``warning:`` line by the command line, unlike the warnings of
    the libraries that read it."""


class CorruptChunkError(PipelineInputError):
    """A chunk of an input array cannot be read or decoded."""


class HaloTooSmall(RuntimeError):
    """A cell (or what shapes it) reaches beyond the halo of its block."""
