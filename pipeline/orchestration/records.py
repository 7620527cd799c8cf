"""What an output records about its run: each field's completion record and the run's ledger.

When a field (a *unit* of work) has written all its label chunks and tables, its image group
gets a *completion record* (attribute ``pipeline``): its provenance (settings digest, model
sha256, input fingerprint, package version), timestamps, counts and QC. The output's root
attribute ``pipeline_run`` holds the run's *ledger*: the state of every unit (``done``,
``failed`` with its error, ``running``, ``pending``), which ``pipeline status`` shows.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import zarr

from pipeline._version import __version__
from pipeline.errors import PipelineInputError
from pipeline.io.location import file_sizes, location

__all__ = [
    "ATTRIBUTE",
    "RUN_ATTRIBUTE",
    "Ledger",
    "UnitState",
    "completion_record",
    "damage",
    "now",
    "output_root",
    "unit_manifest",
    "unit_states",
]

ATTRIBUTE = "pipeline"  # a unit's completion record, on its image group
RUN_ATTRIBUTE = "pipeline_run"  # the run's ledger, on the output's root
UNIT_OUTPUT_FOLDERS = ("labels", "tables")  # what a run writes into an image's group


def now() -> str:
    """The current time in UTC, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def output_root(out: str | os.PathLike) -> zarr.Group:
    """The root group of an existing output, read-only."""
    try:
        return zarr.open_group(str(out), mode="r")
    except Exception:
        raise PipelineInputError(
            "output exists but is not a zarr group written by pipeline run", out
        ) from None


def completion_record(root: zarr.Group, path: str) -> dict[str, Any] | None:
    """The completion record of the unit at ``path`` ("" for a lone image), if complete."""
    try:
        group = root[path] if path else root
    except KeyError:
        return None
    record = group.attrs.get(ATTRIBUTE)
    if isinstance(record, dict) and record.get("status") == "complete":
        return record
    return None


def unit_manifest(out: str | os.PathLike, path: str) -> dict[str, Any]:
    """What a unit's results are on disk: the number, total size and a digest of the names and
    sizes of the files under its ``labels`` and ``tables`` (a listing, no file read)."""
    unit = location(out) / path if path else location(out)
    sizes = sorted(
        (f"{name}/{relative}", size)
        for name in UNIT_OUTPUT_FOLDERS
        for relative, size in file_sizes(unit / name).items()
    )
    listing = "".join(f"{name}\t{size}\n" for name, size in sizes)
    return {
        "files": len(sizes),
        "bytes": sum(size for _, size in sizes),
        "sha256": hashlib.sha256(listing.encode()).hexdigest(),
    }


def damage(out: str | os.PathLike, path: str, record: dict[str, Any]) -> str | None:
    """How a done unit's results differ from what its completion record lists (files missing,
    added, truncated or grown); None when they match or the record lists nothing to compare."""
    expected = record.get("manifest")
    if not isinstance(expected, dict):
        return None  # written before records listed their files
    found = unit_manifest(out, path)
    if found == expected:
        return None
    return (
        f"results changed since the run: {found['files']} files of {found['bytes']} bytes, "
        f"the run wrote {expected['files']} of {expected['bytes']}"
    )


class Ledger:
    """The run's record of every unit's state, in the output's root attributes (thread-safe).

    Each write re-reads the root group, so that other root metadata (a lone image's, which a
    unit rewrites) is kept.

    Parameters
    ----------
    output
        The output's root path.
    input_path
        The input the output is made from.
    units
        Paths of all units of the input.
    done
        Units whose completion record an earlier run wrote: recorded as done even where that
        run was killed between writing the record and updating the ledger.
    """

    def __init__(
        self,
        output: str | os.PathLike,
        input_path: str,
        units: Iterable[str],
        done: Iterable[str] = (),
    ) -> None:
        self._output = str(output)
        self._lock = threading.Lock()
        previous = zarr.open_group(self._output, mode="r").attrs.get(RUN_ATTRIBUTE) or {}
        known = previous.get("units", {}) if previous.get("input") == input_path else {}
        self._state: dict[str, Any] = {
            "status": "running",
            "version": __version__,
            "input": input_path,
            "started": now(),
            "units": {
                path: known.get(path, {"state": "pending", "error": None, "time": None})
                for path in units
            },
        }
        for path in done:
            unit = self._state["units"].get(path)
            if unit is not None and unit["state"] != "done":
                self._state["units"][path] = {**unit, "state": "done", "error": None}
        self.rewrite()

    def _write(self) -> None:
        zarr.open_group(self._output, mode="r+").attrs[RUN_ATTRIBUTE] = self._state

    def rewrite(self) -> None:
        """Write the ledger to the root's attributes (again)."""
        with self._lock:
            self._write()

    def set(
        self, path: str, state: str, error: str | None = None, traceback: str | None = None
    ) -> None:
        """Record that unit ``path`` is ``running``, ``done`` or ``failed`` (with ``error``,
        and the ``traceback`` of an unexpected one)."""
        unit = {"state": state, "error": error, "time": now()}
        if traceback is not None:
            unit["traceback"] = traceback
        with self._lock:
            self._state["units"][path] = unit
            self._write()

    def interrupt(self, wall_seconds: float) -> None:
        """Record that the run was stopped (Ctrl-C) before its units were all done."""
        with self._lock:
            self._state.update(
                status="interrupted", finished=now(), wall_seconds=round(wall_seconds, 3)
            )
            self._write()

    def finish(self, wall_seconds: float) -> str:
        """Record the end of the run; returns its status, ``complete`` or ``partial``."""
        units = self._state["units"]
        status = "complete" if all(u["state"] == "done" for u in units.values()) else "partial"
        with self._lock:
            self._state.update(
                status=status,
                finished=now(),
                wall_seconds=round(wall_seconds, 3),
                fields_done=sum(u["state"] == "done" for u in units.values()),
                failures=[
                    {"field": path, "error": u["error"]}
                    for path, u in units.items()
                    if u["state"] == "failed"
                ],
            )
            self._write()
        return status


@dataclass(frozen=True)
class UnitState:
    """One unit of an output as ``pipeline status`` shows it."""

    path: str
    state: str
    error: str | None
    time: str | None
    traceback: str | None = None


def unit_states(
    out: str | os.PathLike, verify: bool = False
) -> tuple[dict[str, Any], list[UnitState]]:
    """The run ledger of an output and the state of each unit: done, failed or pending, and
    with ``verify`` *damaged*: done, but its files are not those the run wrote (:func:`damage`).

    A unit is *done* only when its completion record is written; one that was running when
    the run was killed is *pending*.

    Raises
    ------
    PipelineInputError
        If ``out`` does not exist or was not written by ``pipeline run``.
    """
    out = location(out)
    if not out.exists():
        raise PipelineInputError("output not found", str(out))
    root = output_root(out)
    ledger = root.attrs.get(RUN_ATTRIBUTE)
    if not isinstance(ledger, dict) or "units" not in ledger:
        raise PipelineInputError("not an output of pipeline run (no run ledger)", out)
    states = []
    for path, unit in ledger["units"].items():
        record = completion_record(root, path)
        damaged = None if record is None or not verify else damage(out, path, record)
        if damaged is not None:
            states.append(UnitState(path, "damaged", damaged, record.get("finished")))
        elif record is not None:
            states.append(UnitState(path, "done", None, record.get("finished")))
        elif unit["state"] == "failed":
            states.append(
                UnitState(path, "failed", unit["error"], unit["time"], unit.get("traceback"))
            )
        else:
            states.append(UnitState(path, "pending", None, unit["time"]))
    return ledger, states
