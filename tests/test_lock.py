"""One run per output: the lock beside it refuses a second run, names its holder, and is taken
over once its holder (on this host) is gone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import PipelineInputError
from pipeline.orchestration.lock import lock_path, output_lock


def _dead_pid() -> int:
    """The id of a process that has ended."""
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(ended.stdout)


def test_a_second_holder_is_refused_with_the_first_named(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    with output_lock(out) as path:
        assert path == tmp_path / "out.zarr.lock"
        holder = json.loads(path.read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        # another process of this host holding it: the lock is alive
        holder["pid"] = os.getppid()
        path.write_text(json.dumps(holder))
        with pytest.raises(PipelineInputError) as error:
            with output_lock(out):
                pass
        assert f"pid {os.getppid()}" in error.value.problem
        assert f"delete {path}" in error.value.problem
        assert error.value.path == str(out)
    assert not path.exists()  # released
    with output_lock(out):  # and free again
        pass


def test_the_lock_of_a_killed_run_on_this_host_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "x", "command": "x"}
    lock_path(out).write_text(json.dumps(stale))
    with output_lock(out) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    lock_path(out).write_text("{half-writ")  # killed while writing it
    with output_lock(out):
        pass


def test_a_lock_of_another_host_is_not_second_guessed(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    other = {"host": "node042", "pid": _dead_pid(), "started": "x", "command": "pipeline run"}
    lock_path(out).write_text(json.dumps(other))
    with pytest.raises(PipelineInputError, match="host node042"):
        with output_lock(out):
            pass
    assert json.loads(lock_path(out).read_text()) == other
