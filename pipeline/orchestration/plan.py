"""Plan a run: which fields of view to compute, which are done with matching provenance.

A field is done when its completion record (:mod:`pipeline.orchestration.records`) carries the
provenance the run would give it now: the digest of the settings that decide results, the model
weights' sha256 and a fingerprint of its input files. The others are computed (from scratch).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr
from upath import UPath

from pipeline.config import RunConfig
from pipeline.convnet.weights import weights_sha256
from pipeline.errors import PipelineInputError
from pipeline.io import omezarr
from pipeline.io.location import is_remote, is_url, is_web_url, location
from pipeline.orchestration.records import (
    RUN_ATTRIBUTE,
    UNIT_OUTPUT_FOLDERS,
    completion_record,
    damage,
    output_root,
)

__all__ = [
    "RunPlan",
    "check_output_location",
    "input_fingerprint",
    "plan_run",
    "run_provenance",
    "same_input",
]

_PROVENANCE_KEYS = ("config_sha256", "model_sha256", "input_fingerprint")


def input_fingerprint(fov: omezarr.FieldOfView) -> str:
    """sha256 over the name, size and modification time of every file of a field's image.

    The image's ``labels`` and ``tables`` folders are left out. This reads no pixel data
    (one ``stat`` per stored chunk), so it is cheap enough to check on every run; a chunk
    rewritten in place, or the data copied without keeping times, counts as changed.
    """
    if is_web_url(fov.dataset_path):
        return _metadata_fingerprint(fov)
    if is_url(fov.dataset_path):
        return _listing_fingerprint(fov)
    image = Path(fov.dataset_path) / fov.path
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(image):
        if Path(folder) == image:
            subfolders[:] = [name for name in subfolders if name not in UNIT_OUTPUT_FOLDERS]
        subfolders.sort()
        for name in sorted(files):
            path = Path(folder, name)
            stat = path.stat()
            relative = path.relative_to(image).as_posix()
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _listing_fingerprint(fov: omezarr.FieldOfView) -> str:
    """sha256 over the name, size and ETag (the store's content hash) of every object of an
    image in a bucket, but its ``labels`` and ``tables``: one listing request per thousand
    objects, no object read."""
    image = UPath(fov.dataset_path) / fov.path
    prefix = image.path.rstrip("/") + "/"
    digest = hashlib.sha256()
    for name, info in sorted(image.fs.find(image.path, detail=True).items()):
        relative = name[len(prefix) :]
        if relative.split("/", 1)[0] in UNIT_OUTPUT_FOLDERS:
            continue
        tag = info.get("ETag") or info.get("LastModified")
        digest.update(f"{relative}\0{info['size']}\0{tag}\n".encode())
    return digest.hexdigest()


def _metadata_fingerprint(fov: omezarr.FieldOfView) -> str:
    """sha256 of a served image's metadata: its group's attributes and each level's array
    metadata. A web server lists no files, and a request per chunk would cost more than the
    run's planning should: chunks rewritten in place on the server are not noticed."""
    group = zarr.open_group(fov.dataset_path, path=fov.path, mode="r")
    documents = [group.attrs.asdict()]
    for level in fov.levels:
        array = zarr.open_array(fov.dataset_path, path=level.reader.array_path, mode="r")
        documents.append(array.metadata.to_dict())
    text = json.dumps(documents, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def same_input(recorded: str, given: str) -> bool:
    """Whether an output's recorded input is ``given`` (the same URL, or the same folder)."""
    if is_url(recorded) or is_url(given):
        return recorded.rstrip("/") == given.rstrip("/")
    return Path(recorded).resolve() == Path(given).resolve()


def run_provenance(config: RunConfig) -> dict[str, Any]:
    """What decides every unit's results besides its input: settings digest and model sha256."""
    segmentation = config.segmentation
    model = weights_sha256(segmentation.convnet.model) if segmentation.method == "convnet" else None
    return {"config_sha256": config.digest(), "model_sha256": model}


@dataclass
class RunPlan:
    """What a run has to do on an output: the units to compute and those already done."""

    output: UPath
    exists: bool
    todo: list[omezarr.FieldOfView]
    done: dict[str, dict[str, Any]]
    provenance: dict[str, dict[str, Any]]

    @property
    def nothing_to_do(self) -> bool:
        """Every unit is done with matching provenance."""
        return not self.todo


def check_output_location(out: UPath, input_path: str) -> None:
    """Refuse an output that is, lies inside or holds the input (the input is never
    modified), or whose folder cannot be written: before any cluster starts."""
    if is_remote(out):
        _check_bucket_location(out, input_path)
        return
    where = out.resolve()
    existing = next(p for p in (where, *where.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PipelineInputError(f"cannot write here ({existing} is not writable)", out)
    if is_url(input_path):  # a remote input cannot hold a local output
        return
    source = Path(input_path).resolve()
    if where == source:
        raise PipelineInputError("output must differ from the input", out)
    if where.is_relative_to(source):
        raise PipelineInputError(
            f"output lies inside the input {input_path} (the input is never modified); "
            "choose a folder outside it",
            out,
        )
    if source.is_relative_to(where):
        raise PipelineInputError(f"output would hold the input {input_path}", out)


def _check_bucket_location(out: UPath, input_path: str) -> None:
    """A bucket's output: not the input, not inside it, not holding it; its bucket exists."""
    given = str(out).rstrip("/")
    if out.protocol != "s3":
        raise PipelineInputError("cannot write over HTTP: write to a local folder or s3://", given)
    source = input_path.rstrip("/")
    if given == source:
        raise PipelineInputError("output must differ from the input", given)
    if given.startswith(source + "/"):
        raise PipelineInputError(
            f"output lies inside the input {input_path} (the input is never modified); "
            "choose a prefix outside it",
            given,
        )
    if source.startswith(given + "/"):
        raise PipelineInputError(f"output would hold the input {input_path}", given)
    bucket = given.split("://", 1)[1].split("/", 1)[0]
    try:
        found = out.fs.exists(bucket)
    except Exception as error:  # no credentials, no endpoint, refused
        raise PipelineInputError(
            f"cannot reach the bucket {bucket} ({type(error).__name__}: {error})", given
        ) from None
    if not found:
        raise PipelineInputError(f"bucket {bucket} not found", given)


def plan_run(
    plate: omezarr.Plate,
    out: str | Path,
    config: RunConfig,
    *,
    force: bool = False,
    only_failed: bool = False,
    verify: bool = False,
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
    verify
        Also compute the done units whose files are not those their run wrote
        (:func:`pipeline.orchestration.records.damage`: a chunk or table lost or truncated).

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
    out = location(out)
    check_output_location(out, plate.path)
    common = run_provenance(config)
    provenance = {
        fov.path: {**common, "input_fingerprint": input_fingerprint(fov)} for fov in plate.fields
    }
    if not out.exists():
        if only_failed:
            raise PipelineInputError("--only-failed needs an existing output", out)
        return RunPlan(out, False, list(plate.fields), {}, provenance)
    root = output_root(out)
    ledger = root.attrs.get(RUN_ATTRIBUTE)
    if not isinstance(ledger, dict) or "input" not in ledger:
        raise PipelineInputError("output exists but was not written by pipeline run", out)
    if not same_input(ledger["input"], plate.path) and not force:
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
        record = completion_record(root, fov.path)
        current = record is not None and all(
            record.get(key) == provenance[fov.path][key] for key in _PROVENANCE_KEYS
        )
        if current and verify and damage(out, fov.path, record) is not None:
            current = False
        if current:
            done[fov.path] = record
        elif not only_failed or fov.path in failed:
            todo.append(fov)
    return RunPlan(out, True, todo, done, provenance)
