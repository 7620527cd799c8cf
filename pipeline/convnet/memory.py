"""glibc's memory settings for processes that run the network on a CPU.

The network's activations are buffers of tens to hundreds of MB. glibc gives every freed buffer
above its mmap threshold (at most 32 MB; above 64 MB in a thread other than the main one) back
to the system, and trims the heap's free top; the next pass then gets fresh memory that the
kernel maps and zeroes page by page. Keeping freed memory of up to :data:`KEPT_BYTES` for reuse
made the network 1.7x faster in a Dask worker (``python benchmarks/malloc_reuse.py``). Worker
processes take :data:`MALLOC_SETTINGS` from their environment as they start
(:mod:`pipeline.orchestration.cluster`); a process already running sets them for its main
thread with :func:`keep_freed_memory` (training).
"""

from __future__ import annotations

import ctypes
from functools import cache

__all__ = ["KEPT_BYTES", "MALLOC_SETTINGS", "keep_freed_memory"]

KEPT_BYTES = 512 * 2**20
"""Freed buffers up to this size, and free memory up to it at the heap's top, stay for reuse."""

MALLOC_SETTINGS = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(KEPT_BYTES),
    "MALLOC_TRIM_THRESHOLD_": str(KEPT_BYTES),
}
"""The environment variables that give a process started with them these settings in all its
threads (one arena: the main one, whose heap has no size limit)."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@cache
def keep_freed_memory() -> bool:
    """Keep freed memory for reuse in this process's main arena (its main thread and the
    processes it forks), once; whether it could (False where the C library is not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, KEPT_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, KEPT_BYTES)
    )
