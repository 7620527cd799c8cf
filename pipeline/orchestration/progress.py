"""Progress of a field while its graph runs, from the chunks its scratch array has received.

The workers write each block of labels to the field's scratch array as soon as it is done; a
thread of the client counts the chunk files there and reports the share of the field's frames
they stand for, so the progress bar moves block by block instead of once per field. Works with
any scheduler (nothing is sent from the workers); the count is of files, so the scratch array
must store every chunk, empty ones too. In a bucket the count is one listing request, made less
often.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from upath import UPath

from pipeline.io.location import file_sizes, is_remote

__all__ = ["chunk_progress"]

POLL_SECONDS = 0.5
REMOTE_POLL_SECONDS = 5.0


def _chunk_files(folder: UPath) -> int:
    """Chunk files of the zarr array at ``folder`` (all files but its metadata)."""
    if is_remote(folder):
        names = (name.rsplit("/", 1)[-1] for name in file_sizes(folder))
    else:  # names only, no stat
        names = (name for _, _, files in os.walk(folder) for name in files)
    return sum(name != "zarr.json" for name in names)


@contextmanager
def chunk_progress(
    folder: UPath, chunks: int, frames: float, report: Callable[[float], None]
) -> Iterator[None]:
    """Report ``frames * written / chunks`` as the chunks of the array at ``folder`` are
    written, in increments, while the context lasts; all of ``frames`` when it ends.

    A context left by an exception takes back what it reported (the caller retries the field,
    e.g. with a larger halo, and reports again).
    """
    reported = 0.0
    stop = threading.Event()
    lock = threading.Lock()

    def advance_to(value: float) -> None:
        nonlocal reported
        with lock:
            if value != reported:
                report(value - reported)
                reported = value

    def poll() -> None:
        while not stop.wait(REMOTE_POLL_SECONDS if is_remote(folder) else POLL_SECONDS):
            advance_to(frames * min(_chunk_files(folder), chunks) / max(chunks, 1))

    thread = threading.Thread(target=poll, name="chunk-progress", daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        stop.set()
        thread.join()
        advance_to(0.0)
        raise
    stop.set()
    thread.join()
    advance_to(frames)
