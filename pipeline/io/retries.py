"""Transient object-store errors: retried with back-off, and counted.

Requests to S3 are retried by botocore when the store answers with a transient error (HTTP 500,
502, 503, 504, throttling such as ``SlowDown``): up to 5 attempts with exponential back-off by
default, or as the AWS configuration says (``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``); s3fs
retries dropped connections and timeouts the same way. A request that still fails, or fails
for good (403, 404), raises an error naming the object. This module counts the retries:
botocore logs each one, and :func:`count_store_retries` installs a filter on those loggers in
a process (the client, each worker) that counts them; the run sums the counts of all its
processes for its summary.
"""

from __future__ import annotations

import logging
import threading

__all__ = ["count_store_retries", "store_retries"]

#: The loggers of botocore's retry handlers (the legacy and the standard/adaptive modes).
_RETRY_LOGGERS = ("botocore.retryhandler", "botocore.retries.standard")


class _RetryCounter(logging.Filter):
    """Counts the retry records of botocore's retry loggers and drops their debug records."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().lower().startswith("retry needed"):
            with self._lock:
                self.count += 1
        return record.levelno > logging.DEBUG


_COUNTER = _RetryCounter()


def count_store_retries() -> None:
    """Count the store requests retried in this process from now on (idempotent)."""
    for name in _RETRY_LOGGERS:
        logger = logging.getLogger(name)
        if _COUNTER not in logger.filters:
            logger.addFilter(_COUNTER)
        logger.setLevel(logging.DEBUG)  # the retry records are debug records


def store_retries() -> int:
    """Store requests retried in this process since :func:`count_store_retries`."""
    return _COUNTER.count
