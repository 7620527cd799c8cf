"""Resumable, idempotent runs and faults: skip what is done, recompute what is stale, survive
killed workers and killed runs, fail only the unit with a bad chunk.

Every "equals a clean run" check compares the label arrays and tables of each field with those
of one uninterrupted run of the same plate (module fixture).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import zarr
from distributed import Client, LocalCluster

from pipeline import __version__
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.convnet.weights import load_model, model_paths, save_model
from pipeline.errors import PipelineInputError
from pipeline.io.omezarr import open_plate
from pipeline.orchestration.plan import input_fingerprint
from pipeline.orchestration.records import unit_states
from pipeline.orchestration.runner import run
from pipeline.synthetic import simulate_plate

pytestmark = pytest.mark.cluster

FIELDS = ["A/1/0", "A/1/1", "A/2/0", "A/2/1"]


@pytest.fixture(scope="module")
def plate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four fields of three 128 x 128 frames: small, but enough to interrupt between fields."""
    return simulate_plate(
        tmp_path_factory.mktemp("resume") / "plate.zarr",
        rows=1,
        columns=2,
        fields=2,
        n_frames=3,
        size=128,
        seed=11,
    )


@pytest.fixture(scope="module")
def clean(plate: Path, tmp_path_factory: pytest.TempPathFactory, shared_scheduler: str) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out.zarr"
    summary = run(plate, out, scheduler=shared_scheduler)
    assert not summary.failed and not summary.skipped
    return out


def _run_in_background(plate: Path, out: Path, *options: str | Path) -> subprocess.Popen:
    """``pipeline run PLATE --out OUT OPTIONS`` in its own process group, stderr captured."""
    command = [sys.executable, "-m", "pipeline", "run", str(plate), "--out", str(out)]
    return subprocess.Popen(
        [*command, *map(str, options)],
        cwd=out.parent,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_fields(process: subprocess.Popen, out: Path, fields: int) -> None:
    """Until ``fields`` fields of ``out`` are done; the run must still be running then."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and _records_done(out) >= fields:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be stopped"


def _copy_plate(plate: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "plate.zarr"
    shutil.copytree(plate, copy)  # keeps modification times: same input fingerprint
    return copy


def _records(out: Path) -> dict[str, dict]:
    """The completion records of the fields that have one (a field still being computed when
    its run was killed has a group without one)."""
    root = zarr.open_group(out, mode="r")
    groups = (root[path] for path in FIELDS if path in root)
    return {
        group.path: dict(group.attrs["pipeline"]) for group in groups if "pipeline" in group.attrs
    }


def _assert_equal_results(out: Path, reference: Path, fields=FIELDS) -> None:
    """Same labels (every level) and the same cell and track tables, field by field."""
    for path in fields:
        got, want = (
            zarr.open_group(out / path, mode="r"),
            zarr.open_group(reference / path, mode="r"),
        )
        got_labels, want_labels = got["labels/cells"], want["labels/cells"]
        for level in want_labels.array_keys():
            np.testing.assert_array_equal(got_labels[level][:], want_labels[level][:])
        for table in ("cells", "tracks"):
            pd.testing.assert_frame_equal(
                pd.read_parquet(out / path / "tables" / table / "table.parquet"),
                pd.read_parquet(reference / path / "tables" / table / "table.parquet"),
            )


# --------------------------------------------------------------------------------------------
# Skipping and recomputing
# --------------------------------------------------------------------------------------------


def test_records_hold_provenance_and_status_shows_all_done(clean: Path, plate: Path) -> None:
    fields = {fov.path: fov for fov in open_plate(plate).fields}
    weights, _ = model_paths(None)
    for path, record in _records(clean).items():
        assert record["status"] == "complete"
        assert record["version"] == __version__
        assert record["config_sha256"] == RunConfig().digest()
        assert record["model_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert record["input_fingerprint"] == input_fingerprint(fields[path])
        assert record["started"] <= record["finished"]
        table = pd.read_parquet(clean / path / "tables" / "cells" / "table.parquet")
        assert record["n_cells"] == len(table) > 0
    ledger, states = unit_states(clean)
    assert ledger["status"] == "complete"
    assert [(s.path, s.state) for s in states] == [(path, "done") for path in FIELDS]


def test_rerun_skips_everything_and_changes_nothing(
    clean: Path, plate: Path, tmp_path: Path, pipeline_command
) -> None:
    out = tmp_path / "out.zarr"
    shutil.copytree(clean, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = pipeline_command("run", plate, "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout
    assert "dashboard" not in result.stdout  # no cluster was started
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_changed_config_recomputes_every_field(
    clean: Path, plate: Path, tmp_path: Path, shared_scheduler: str
) -> None:
    out = tmp_path / "out.zarr"
    shutil.copytree(clean, out)
    config = tmp_path / "config.yaml"
    config.write_text("tracking: {max_gap: 1}\n")
    summary = run(plate, out, config=config, scheduler=shared_scheduler)
    assert not summary.skipped and not summary.failed
    old, new = _records(clean), _records(out)
    assert all(new[p]["config_sha256"] != old[p]["config_sha256"] for p in FIELDS)
    # tracking settings only: the same cells
    for path in FIELDS:
        np.testing.assert_array_equal(
            zarr.open_array(out / path / "labels/cells/0")[:],
            zarr.open_array(clean / path / "labels/cells/0")[:],
        )
    # settings that do not decide results (compute) leave the digest alone: all skipped
    config.write_text(
        "tracking: {max_gap: 1}\n"
        "compute: {fields_in_flight: 1, batch_size: 2, cpu_threads: 2, tile_px: 512,"
        " block_halos: 2}\n"
    )
    assert len(run(plate, out, config=config, scheduler=shared_scheduler).skipped) == len(FIELDS)


def test_time_blocks_of_a_field_give_the_same_results(
    clean: Path, plate: Path, tmp_path: Path, shared_scheduler: str
):
    """Two blocks of timepoints (2 + 1 frames) segmented one after the other: the same ids,
    labels and tables as all three at once."""
    config = tmp_path / "config.yaml"
    config.write_text("compute: {frames_in_flight: 2}\n")
    summary = run(plate, tmp_path / "out.zarr", config=config, scheduler=shared_scheduler)
    assert not summary.failed
    _assert_equal_results(tmp_path / "out.zarr", clean)


def test_changed_model_weights_recompute(
    clean: Path, plate: Path, tmp_path: Path, shared_scheduler: str
) -> None:
    model, info = load_model()
    save_model(model, info, tmp_path / "copy")  # same weights, another file: another digest
    config = tmp_path / "config.yaml"
    config.write_text(f"segmentation: {{convnet: {{model: {tmp_path / 'copy'}}}}}\n")
    out = tmp_path / "out.zarr"
    shutil.copytree(clean, out)
    summary = run(plate, out, config=config, scheduler=shared_scheduler)
    assert not summary.skipped and not summary.failed
    copy_digest = load_model(tmp_path / "copy")[1].weights_sha256
    assert {r["model_sha256"] for r in _records(out).values()} == {copy_digest}
    _assert_equal_results(out, clean)


def test_changed_input_recomputes_only_that_field(
    clean: Path, plate: Path, tmp_path: Path, shared_scheduler: str
) -> None:
    copy = _copy_plate(plate, tmp_path)
    out = tmp_path / "out.zarr"
    assert not run(copy, out, scheduler=shared_scheduler).failed
    first = _records(out)
    chunk = sorted((copy / "A/2/1/0/c").rglob("*"))[-1]
    chunk.write_bytes(chunk.read_bytes())  # rewritten in place: same bytes, new time
    summary = run(copy, out, scheduler=shared_scheduler)
    assert [f.path for f in summary.fields if not f.skipped] == ["A/2/1"]
    second = _records(out)
    assert second["A/2/1"]["finished"] >= first["A/2/1"]["finished"]
    assert all(second[p] == first[p] for p in FIELDS if p != "A/2/1")
    _assert_equal_results(out, clean)


def test_force_recomputes_every_field(
    clean: Path, plate: Path, tmp_path: Path, shared_scheduler: str
) -> None:
    out = tmp_path / "out.zarr"
    shutil.copytree(clean, out)
    assert (
        main(["run", str(plate), "--out", str(out), "--scheduler", shared_scheduler, "--force"])
        == 0
    )
    assert all(
        new["started"] >= old["finished"]
        for new, old in zip(_records(out).values(), _records(clean).values(), strict=True)
    )
    _assert_equal_results(out, clean)


def test_output_of_another_input_is_refused(clean: Path, tmp_path: Path, pipeline_command) -> None:
    other = simulate_plate(
        tmp_path / "other.zarr", rows=1, columns=1, fields=1, n_frames=1, size=64, seed=1
    )
    out = tmp_path / "out.zarr"
    shutil.copytree(clean, out)
    result = pipeline_command("run", other, "--out", out, cwd=tmp_path)
    assert result.returncode == 2
    assert "was made from" in result.stderr and str(out) in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------
# Bad chunks: the unit fails, the others complete, status shows it, exit code "partial"
# --------------------------------------------------------------------------------------------


def test_missing_chunk_fails_its_field_then_only_failed_retries_it(
    clean: Path, plate: Path, tmp_path: Path, pipeline_command, shared_scheduler: str
) -> None:
    copy = _copy_plate(plate, tmp_path)
    array = copy / "A/1/1/0"
    chunk = sorted(p for p in (array / "c").rglob("*") if p.is_file())[1]
    key = chunk.relative_to(array).as_posix()
    saved = chunk.read_bytes()
    stat = chunk.stat()
    chunk.unlink()
    out = tmp_path / "out.zarr"

    result = pipeline_command("run", copy, "--out", out, "--workers", "2", cwd=tmp_path)

    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    [failure] = [line for line in result.stderr.splitlines() if line.startswith("FAILED")]
    assert "A/1/1" in failure and key in failure and "missing" in failure
    status = pipeline_command("status", out, cwd=tmp_path)
    assert status.returncode == 3
    assert "3 done, 1 failed, 0 pending" in status.stdout
    [line] = [line for line in status.stdout.splitlines() if "A/1/1" in line]
    assert "failed" in line and key in line
    _assert_equal_results(out, clean, [p for p in FIELDS if p != "A/1/1"])
    assert "A/1/1" not in zarr.open_group(out, mode="r")  # its partial output was removed

    chunk.write_bytes(saved)  # the chunk is back, with its old time: the same input as before
    os.utime(chunk, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    done_before = _records(out)
    summary = run(copy, out, scheduler=shared_scheduler, only_failed=True)
    assert [f.path for f in summary.fields if not f.skipped] == ["A/1/1"]
    assert not summary.failed
    assert all(_records(out)[p] == done_before[p] for p in done_before)
    _assert_equal_results(out, clean)
    assert unit_states(out)[0]["status"] == "complete"


def test_missing_chunks_may_read_as_fill_value_when_configured(
    plate: Path, tmp_path: Path, shared_scheduler: str
) -> None:
    copy = _copy_plate(plate, tmp_path)
    chunk = sorted(p for p in (copy / "A/1/1/0/c").rglob("*") if p.is_file())[1]
    chunk.unlink()
    config = tmp_path / "config.yaml"
    config.write_text("input: {missing_chunks: fill}\n")
    summary = run(copy, tmp_path / "out.zarr", config=config, scheduler=shared_scheduler)
    assert not summary.failed


def test_a_second_run_on_the_same_output_is_refused_while_the_first_goes_on(
    clean: Path, plate: Path, tmp_path: Path, pipeline_command
) -> None:
    out = tmp_path / "out.zarr"
    first = _run_in_background(plate, out, "--workers", "1")
    lock = tmp_path / "out.zarr.lock"
    deadline = time.monotonic() + 60
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = pipeline_command("run", plate, "--out", out, "--force", cwd=tmp_path)
    _, first_stderr = first.communicate(timeout=300)
    assert second.returncode == 2
    assert second.stderr.startswith("error: another run is writing this output (host ")
    assert f"pid {first.pid}" in second.stderr
    assert first.returncode == 0, first_stderr
    assert not lock.exists()
    _assert_equal_results(out, clean)


def test_damaged_results_are_found_by_verify_and_redone_by_a_verifying_run(
    clean: Path, plate: Path, tmp_path: Path, shared_scheduler: str, capsys
) -> None:
    out = tmp_path / "out.zarr"
    shutil.copytree(clean, out)
    assert main(["status", str(out), "--verify"]) == 0
    chunk = sorted(p for p in (out / "A/1/0/labels/cells/0").rglob("*") if p.is_file())[-1]
    chunk.write_bytes(chunk.read_bytes()[:10])  # truncated
    (out / "A/2/1/tables/cells/table.parquet").unlink()  # lost
    capsys.readouterr()

    assert main(["status", str(out)]) == 0  # a plain status trusts the records
    assert main(["status", str(out), "--verify"]) == 3
    shown = capsys.readouterr().out
    assert "2 done, 2 damaged, 0 failed, 0 pending" in shown
    damaged = [line.split("\t") for line in shown.splitlines() if "\tdamaged\t" in line]
    assert [line[0].strip() for line in damaged] == ["A/1/0", "A/2/1"]
    assert all(line[3].startswith("results changed since the run") for line in damaged)

    assert [
        f.path for f in run(plate, out, scheduler=shared_scheduler).fields if not f.skipped
    ] == []
    summary = run(plate, out, scheduler=shared_scheduler, verify=True)
    assert sorted(f.path for f in summary.fields if not f.skipped) == ["A/1/0", "A/2/1"]
    _assert_equal_results(out, clean)
    assert main(["status", str(out), "--verify"]) == 0


def test_an_unexpected_error_is_one_line_with_its_traceback_kept_for_status(
    plate: Path, tmp_path: Path, shared_scheduler: str, monkeypatch, capsys
) -> None:
    from pipeline.orchestration import field

    def broken(*args, **kwargs):
        raise RuntimeError("a simulated bug")

    monkeypatch.setattr(field, "segment_and_measure", broken)
    out = tmp_path / "out.zarr"
    assert main(["run", str(plate), "--out", str(out), "--scheduler", shared_scheduler]) == 3
    failures = [line for line in capsys.readouterr().err.splitlines() if "FAILED" in line]
    assert failures == [
        f"FAILED {path}: RuntimeError: a simulated bug "
        f"(traceback: pipeline status {out} --traceback)"
        for path in FIELDS
    ]

    assert main(["status", str(out)]) == 3
    assert "Traceback" not in capsys.readouterr().out
    assert main(["status", str(out), "--traceback"]) == 3
    shown = capsys.readouterr().out
    assert shown.count("Traceback (most recent call last)") == len(FIELDS)
    assert "in broken" in shown and 'raise RuntimeError("a simulated bug")' in shown


# --------------------------------------------------------------------------------------------
# Killed workers and killed runs
# --------------------------------------------------------------------------------------------


def test_worker_killed_mid_run_still_completes_equal(
    clean: Path, plate: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.zarr"
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            host="127.0.0.1",
            processes=True,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(os.getpid)
        outcome: dict[str, object] = {}
        address = cluster.scheduler_address
        thread = threading.Thread(
            target=lambda: outcome.update(summary=run(plate, out, scheduler=address))
        )
        thread.start()
        deadline = time.monotonic() + 120
        victim = None
        while victim is None and time.monotonic() < deadline:
            busy = [w for w, tasks in client.processing().items() if tasks]
            victim = busy[0] if busy else None
            time.sleep(0.05)
        assert victim is not None, "no task ever ran"
        os.kill(pids[victim], signal.SIGKILL)
        thread.join(timeout=300)
        assert not thread.is_alive()
    summary = outcome["summary"]
    assert not summary.failed
    _assert_equal_results(out, clean)


def test_killed_run_is_completed_by_a_rerun(
    clean: Path, plate: Path, tmp_path: Path, shared_scheduler: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("compute: {fields_in_flight: 1}\n")
    out = tmp_path / "out.zarr"
    process = _run_in_background(plate, out, "--config", config, "--workers", "1")
    try:
        _wait_for_fields(process, out, 1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    _, states = unit_states(out)
    counts = {state: sum(s.state == state for s in states) for state in ("done", "pending")}
    assert counts["done"] >= 1 and counts["pending"] >= 1
    done = {s.path: _records(out)[s.path] for s in states if s.state == "done"}

    summary = run(plate, out, config=config, scheduler=shared_scheduler)

    assert not summary.failed
    assert {f.path for f in summary.skipped} == set(done)
    assert all(_records(out)[path] == record for path, record in done.items())
    _assert_equal_results(out, clean)
    assert unit_states(out)[0]["status"] == "complete"


@pytest.mark.parametrize("target", ["process group", "main process"])
def test_ctrl_c_stops_the_run_at_once_and_a_rerun_completes_it(
    target: str, clean: Path, plate: Path, tmp_path: Path, shared_scheduler: str
) -> None:
    """Ctrl-C in a terminal signals the whole process group (workers too); a workflow manager
    may signal the main process alone. Either way: exit 130 within seconds, one line, the
    ledger says interrupted, the lock is released, and a rerun finishes the same output."""
    config = tmp_path / "config.yaml"
    config.write_text("compute: {fields_in_flight: 1}\n")
    out = tmp_path / "out.zarr"
    process = _run_in_background(plate, out, "--config", config, "--workers", "1")
    _wait_for_fields(process, out, 1)
    interrupted = time.monotonic()
    if target == "process group":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left, should the test fail
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130
    assert time.monotonic() - interrupted < 30
    lines = [line for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    assert lines[-1] == "interrupted; run the same command again to resume"
    assert "Traceback" not in stderr
    assert unit_states(out)[0]["status"] == "interrupted"
    assert not (tmp_path / "out.zarr.lock").exists()

    summary = run(plate, out, config=config, scheduler=shared_scheduler)
    assert not summary.failed and summary.skipped
    _assert_equal_results(out, clean)
    assert unit_states(out)[0]["status"] == "complete"


def _records_done(out: Path) -> int:
    try:
        return sum(s.state == "done" for s in unit_states(out)[1])
    except PipelineInputError:  # the output is being created: no ledger yet
        return 0


def test_a_unit_completed_but_killed_before_the_ledger_knew_counts_as_done(tmp_path: Path):
    """The run was killed after a field's completion record and before the ledger said done
    (the race that made the rerun of test_killed_run_is_completed_by_a_rerun partial)."""
    from pipeline.orchestration.records import RUN_ATTRIBUTE, Ledger

    out = tmp_path / "out.zarr"
    root = zarr.open_group(out, mode="w", zarr_format=3)
    killed = {"state": "running", "error": None, "time": "2026-12-01T00:00:00Z"}
    root.attrs[RUN_ATTRIBUTE] = {"input": "plate.zarr", "units": {"A/1/0": killed}}
    ledger = Ledger(out, "plate.zarr", ["A/1/0", "A/2/0"], done=["A/1/0"])
    ledger.set("A/2/0", "done")
    assert ledger.finish(1.0) == "complete"
    units = zarr.open_group(out, mode="r").attrs[RUN_ATTRIBUTE]["units"]
    assert units["A/1/0"] == {**killed, "state": "done"}
    root.attrs[RUN_ATTRIBUTE] = {"input": "plate.zarr", "units": {"A/1/0": killed}}
    assert Ledger(out, "plate.zarr", ["A/1/0"]).finish(1.0) == "partial"  # as it was before


# --------------------------------------------------------------------------------------------
# Random faults: the output equals a clean run's whatever is killed, whenever
# --------------------------------------------------------------------------------------------

FAULT_RUNS = int(os.environ.get("PIPELINE_FAULT_RUNS", "3"))  # 20 or more nightly


def _spawned_workers(pid: int) -> list[psutil.Process]:
    """The Dask worker processes of the run whose main process is ``pid``."""
    children = psutil.Process(pid).children(recursive=True)
    return [p for p in children if "spawn_main" in " ".join(p.cmdline())]


@pytest.mark.parametrize("attempt", range(FAULT_RUNS))
def test_a_random_kill_leaves_an_output_equal_to_a_clean_run(
    attempt: int, clean: Path, plate: Path, tmp_path: Path, shared_scheduler: str
) -> None:
    """Odd attempts kill a random worker process, even ones the whole run (its process group),
    after a random number of fields (0-3) is done plus a random delay; a killed run is run
    again. Either way the output must equal the clean run's, field by field."""
    rng = random.Random(attempt)
    kill_run = attempt % 2 == 0
    fields_first, delay = rng.randrange(len(FIELDS)), rng.uniform(0.0, 2.0)
    out = tmp_path / "out.zarr"
    process = _run_in_background(plate, out, "--workers", "2")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            started = (tmp_path / "out.zarr.lock").exists() and out.exists()
            if started and _records_done(out) >= fields_first and _spawned_workers(process.pid):
                break
            time.sleep(0.05)
        time.sleep(delay)
        if process.poll() is None:
            if kill_run:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                rng.choice(_spawned_workers(process.pid)).kill()
        _, stderr = process.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    if kill_run:
        summary = run(plate, out, scheduler=shared_scheduler)
        assert not summary.failed
    else:
        assert process.returncode == 0, stderr
    _assert_equal_results(out, clean)
    assert unit_states(out)[0]["status"] == "complete"
