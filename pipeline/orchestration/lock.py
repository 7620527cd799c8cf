"""One run per output at a time: a lock file beside the output, ``OUT.lock`` (in a bucket, an
object taken by a conditional write).

The lock holds the holder's host, process id, start time and command. A second run on the same
output refuses with a message naming the holder. A lock left by a run that was killed is stale
when its holder ran on this host and its process is gone; it is then taken over. A lock of
another host cannot be checked from here: the message says to delete the file once that run is
known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from upath import UPath

from pipeline.errors import PipelineInputError
from pipeline.io.location import create_new, location
from pipeline.orchestration.records import now

__all__ = ["lock_path", "output_lock"]


def lock_path(out: str | os.PathLike) -> UPath:
    """The lock file of the output ``out``: ``OUT.lock`` beside it."""
    out = location(out)
    return out.with_name(f"{out.name}.lock")


def _holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": now(),
        "command": " ".join(sys.argv),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(path: UPath) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # half-written by a run killed while taking it, or just released
    return holder if isinstance(holder, dict) else None


def _stale(holder: dict[str, Any] | None) -> bool:
    """Whether a lock's holder is known to be gone: this host, and no such process."""
    if holder is None:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return not (isinstance(pid, int) and pid != os.getpid() and _alive(pid))


def _create(path: UPath, out: str | os.PathLike) -> bool:
    try:
        return create_new(path, json.dumps(_holder()))
    except OSError as error:  # a read-only folder, a bucket that refuses the write
        raise PipelineInputError(f"cannot write the lock file {path} ({error})", out) from None


@contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[UPath]:
    """Hold the lock of ``out`` for the duration of the context.

    Raises
    ------
    PipelineInputError
        Another run holds it (its host, pid, start and command are named).
    """
    path = lock_path(out)
    if not _create(path, out):
        holder = _read(path)
        if not _stale(holder):
            raise PipelineInputError(
                f"another run is writing this output (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, since {holder.get('started')}: {holder.get('command')}); "
                f"wait for it, or delete {path} if that run is gone",
                out,
            )
        path.unlink(missing_ok=True)  # a killed run's lock
        if not _create(path, out):  # another run took it over first
            raise PipelineInputError("another run is writing this output", out)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
