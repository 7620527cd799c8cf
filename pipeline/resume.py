"""Resumable runs: which units of work are done, stale, failed or pending, and their records.

A unit of work is one field of view. When a unit has written all its label chunks and tables,
its image group gets a *completion record* (attribute ``pipeline``) with its provenance: the
digest of the settings that decide results, the model weights' sha256, the package version,
a fingerprint of its input files and timestamps. A re-run skips a unit whose record matches
what it would compute now and recomputes the others (from scratch: the unit's group is
removed first). The output's root attribute ``pipeline_run`` holds the run's ledger: the state of
every unit (``done``, ``failed`` with its error, ``running``, ``pending``), which
``pipeline status`` shows.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import zarr

from pipeline._version import __version__
from pipeline.config import RunConfig
from pipeline.convnet.weights import weights_sha256
from pipeline.errors import PipelineInputError
from pipeline.io import omezarr

__all__ = [
    "Ledger",
    "RunPlan",
    "UnitState",
    "input_fingerprint",
    "plan_run",
    "run_provenance",
    "unit_states",
]

ATTRIBUTE = "pipeline"  # a unit's completion record, on its image group
RUN_ATTRIBUTE = "pipeline_run"  # the run's ledger, on the output's root
_SKIPPED_FOLDERS = ("labels", "tables")  # written by others; not part of the image input
_PROVENANCE_KEYS = ("config_sha256", "model_sha256", "input_fingerprint")


def now() -> str:
    """The current time in UTC, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def input_fingerprint(fov: omezarr.FieldOfView) -> str:
    """sha256 over the name, size and modification time of every file of a field's image.

    The image's ``labels`` and ``tables`` folders are left out. This reads no pixel data
    (one ``stat`` per stored chunk), so it is cheap enough to check on every run; a chunk
    rewritten in place, or the data copied without keeping times, counts as changed.
    """
    image = Path(fov.dataset_path) / fov.path
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(image):
        if Path(folder) == image:
            subfolders[:] = [name for name in subfolders if name not in _SKIPPED_FOLDERS]
        subfolders.sort()
        for name in sorted(files):
            path = Path(folder, name)
            stat = path.stat()
            relative = path.relative_to(image).as_posix()
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def run_provenance(config: RunConfig) -> dict[str, Any]:
    """What decides every unit's results besides its input: settings digest and model sha256."""
    segmentation = config.segmentation
    model = weights_sha256(segmentation.convnet.model) if segmentation.method == "convnet" else None
    return {"config_sha256": config.digest(), "model_sha256": model}


def _record(root: zarr.Group, path: str) -> dict[str, Any] | None:
    """The completion record of the unit at ``path`` ("" for a lone image), if complete."""
    try:
        group = root[path] if path else root
    except KeyError:
        return None
    record = group.attrs.get(ATTRIBUTE)
    if isinstance(record, dict) and record.get("status") == "complete":
        return record
    return None


@dataclass
class RunPlan:
    """What a run has to do on an output: the units to compute and those already done."""

    output: Path
    exists: bool
    todo: list[omezarr.FieldOfView]
    done: dict[str, dict[str, Any]]
    provenance: dict[str, dict[str, Any]]

    @property
    def nothing_to_do(self) -> bool:
        """Every unit is done with matching provenance."""
        return not self.todo


def _output_root(out: Path) -> zarr.Group:
    try:
        return zarr.open_group(out, mode="r")
    except Exception:
        raise PipelineInputError(
            "output exists but is not a zarr group written by pipeline run", out
        ) from None


def plan_run(
    plate: omezarr.Plate,
    out: str | Path,
    config: RunConfig,
    *,
    force: bool = False,
    only_failed: bool = False,
) -> RunPlan:
    """Decide which units of ``plate`` to compute into ``out``; reads metadata only.

    Parameters
    ----------
    plate
        The input.
    out
        The output; a new one, or one an earlier run of the same input wrote.
    config
        The run's settings.
    force
        Recompute every unit (the old output is replaced).
    only_failed
        Compute only the units the last run recorded as failed.

    Returns
    -------
    RunPlan
        Units to compute, in plate order, and the records of those to skip.

    Raises
    ------
    PipelineInputError
        The output exists but is not a pipeline output, was made from another input (without
        ``force``), or ``only_failed`` is asked of an output that does not exist.
    """
    out = Path(out)
    if out.resolve() == Path(plate.path).resolve():
        raise PipelineInputError("output must differ from the input", out)
    common = run_provenance(config)
    provenance = {
        fov.path: {**common, "input_fingerprint": input_fingerprint(fov)} for fov in plate.fields
    }
    if not out.exists():
        if only_failed:
            raise PipelineInputError("--only-failed needs an existing output", out)
        return RunPlan(out, False, list(plate.fields), {}, provenance)
    root = _output_root(out)
    ledger = root.attrs.get(RUN_ATTRIBUTE)
    if not isinstance(ledger, dict) or "input" not in ledger:
        raise PipelineInputError("output exists but was not written by pipeline run", out)
    if Path(ledger["input"]).resolve() != Path(plate.path).resolve() and not force:
        raise PipelineInputError(
            f"output was made from {ledger['input']}, not this input; choose another output "
            "or use --force to replace it",
            out,
        )
    if force:
        return RunPlan(out, True, list(plate.fields), {}, provenance)
    failed = {path for path, unit in ledger.get("units", {}).items() if unit["state"] == "failed"}
    todo, done = [], {}
    for fov in plate.fields:
        record = _record(root, fov.path)
        current = record is not None and all(
            record.get(key) == provenance[fov.path][key] for key in _PROVENANCE_KEYS
        )
        if current:
            done[fov.path] = record
        elif not only_failed or fov.path in failed:
            todo.append(fov)
    return RunPlan(out, True, todo, done, provenance)


def clear_unit(root: zarr.Group, path: str) -> None:
    """Remove what an earlier, stale or interrupted computation of a unit left behind."""
    folder = Path(root.store.root) / path
    if path:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for name in _SKIPPED_FOLDERS:  # a lone image's output is the root itself
        shutil.rmtree(folder / name, ignore_errors=True)


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
    """

    def __init__(self, output: str | Path, input_path: str, units: Iterable[str]) -> None:
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
        self.rewrite()

    def _write(self) -> None:
        zarr.open_group(self._output, mode="r+").attrs[RUN_ATTRIBUTE] = self._state

    def rewrite(self) -> None:
        """Write the ledger to the root's attributes (again)."""
        with self._lock:
            self._write()

    def set(self, path: str, state: str, error: str | None = None) -> None:
        """Record that unit ``path`` is ``running``, ``done`` or ``failed`` (with ``error``)."""
        with self._lock:
            self._state["units"][path] = {"state": state, "error": error, "time": now()}
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


def unit_states(out: str | Path) -> tuple[dict[str, Any], list[UnitState]]:
    """The run ledger of an output and the state of each unit: done, failed or pending.

    A unit is *done* only when its completion record is written; one that was running when
    the run was killed is *pending*.

    Raises
    ------
    PipelineInputError
        If ``out`` does not exist or was not written by ``pipeline run``.
    """
    out = Path(out)
    if not out.exists():
        raise PipelineInputError("output not found", out)
    root = _output_root(out)
    ledger = root.attrs.get(RUN_ATTRIBUTE)
    if not isinstance(ledger, dict) or "units" not in ledger:
        raise PipelineInputError("not an output of pipeline run (no run ledger)", out)
    states = []
    for path, unit in ledger["units"].items():
        record = _record(root, path)
        if record is not None:
            states.append(UnitState(path, "done", None, record.get("finished")))
        elif unit["state"] == "failed":
            states.append(UnitState(path, "failed", unit["error"], unit["time"]))
        else:
            states.append(UnitState(path, "pending", None, unit["time"]))
    return ledger, states
