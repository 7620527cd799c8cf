"""The scheduled-reprocessing recipes in deploy/ are well formed and consistent with each other.

No SLURM, cron or systemd is needed: scripts are syntax-checked with ``bash -n`` and run against
a stub ``pipeline`` command, units are parsed as INI files, the crontab line is split into its
fields. (A real submit under SLURM is tested elsewhere.)
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SCHEDULE = DEPLOY / "schedule"
SBATCH = SCHEDULE / "pipeline-reprocess.sbatch"
SERVICE = SCHEDULE / "pipeline-reprocess.service"
TIMER = SCHEDULE / "pipeline-reprocess.timer"
CRONTAB = SCHEDULE / "crontab"
ENV_EXAMPLE = SCHEDULE / "reprocess.env.example"

# Set by the system or by SLURM in every job: a script may use them without a default.
PROVIDED_VARIABLES = {"HOME", "PATH"}
PROVIDED_PREFIXES = ("SLURM_",)

_VARIABLE_REFERENCE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
_DEFAULTED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?[-=]")
_REQUIRED = re.compile(r"\[\[ -n \"\$\{([A-Za-z_]\w*):-\}\" \]\] \|\| fail\b")
_ASSIGNED = re.compile(r"^\s*(?:export\s+|local\s+|declare\s+(?:-\w+\s+)*)?([A-Za-z_]\w*)\+?=")
_LOOP_VARIABLE = re.compile(r"\bfor\s+([A-Za-z_]\w*)\s+in\b")


def _shell_code(path: Path) -> str:
    """The script without its comment lines and trailing `` # comments``."""
    lines = []
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        lines.append(re.sub(r"\s+#\s.*$", "", line))
    return "\n".join(lines)


def _env_example_variables() -> tuple[set[str], set[str]]:
    """Variables listed in reprocess.env.example: (all, those set, i.e. not commented out).

    A variable is listed as ``NAME=value`` or, optional, commented out as ``#NAME=value``.
    """
    listed, set_ = set(), set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^(#)?([A-Z][A-Z0-9_]*)=", line)
        if match:
            listed.add(match.group(2))
            if not match.group(1):
                set_.add(match.group(2))
    return listed, set_


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text(), source=str(path))
    return parser


def _cron_jobs() -> list[str]:
    """The crontab's job lines (no comments, blank lines or ``NAME=value`` settings)."""
    jobs = []
    for line in CRONTAB.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or re.match(r"^[A-Za-z_]\w*\s*=", stripped):
            continue
        jobs.append(stripped)
    return jobs


def _recipe(path_or_name: str) -> Path:
    """The recipe in deploy/schedule/ that a path in a unit or crontab names (must exist)."""
    recipe = SCHEDULE / Path(path_or_name).name
    assert recipe.is_file(), f"{path_or_name} names no file of the recipe set in {SCHEDULE}"
    return recipe


# --------------------------------------------------------------------------------------------
# sbatch scripts
# --------------------------------------------------------------------------------------------


def test_every_sbatch_script_parses():
    scripts = sorted(DEPLOY.rglob("*.sbatch"))
    assert SBATCH in scripts
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def test_sbatch_directives_come_first_and_ask_for_resources():
    lines = SBATCH.read_text().splitlines()
    assert lines[0].startswith("#!") and "bash" in lines[0]
    first_command = next(
        i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#")
    )
    directives = [line for line in lines if line.startswith("#SBATCH")]
    # sbatch stops reading #SBATCH lines at the first command
    assert all(lines.index(d) < first_command for d in directives)
    options = {d.split()[1].split("=")[0] for d in directives}
    assert {"--job-name", "--time", "--cpus-per-task", "--mem", "--output"} <= options
    assert "set -euo pipefail" in _shell_code(SBATCH)


def test_sbatch_variables_are_defaulted_or_in_env_example():
    code = _shell_code(SBATCH)
    used = set(_VARIABLE_REFERENCE.findall(code))
    defaulted = set(_DEFAULTED.findall(code))
    assigned = {m for line in code.splitlines() for m in _ASSIGNED.findall(line)}
    assigned |= set(_LOOP_VARIABLE.findall(code))
    listed, set_in_example = _env_example_variables()
    undeclared = {
        name
        for name in used - defaulted - assigned - listed - PROVIDED_VARIABLES
        if not name.startswith(PROVIDED_PREFIXES)
    }
    assert not undeclared, f"neither defaulted in the script nor in {ENV_EXAMPLE.name}"
    required = set(_REQUIRED.findall(code))
    assert {"ARCHIVE_GLOB", "RESULTS_DIR"} <= required
    assert required <= set_in_example, "required variables must be set in the example"


def test_env_example_lists_only_variables_the_recipes_use():
    listed, _ = _env_example_variables()
    recipes = "\n".join(p.read_text() for p in (SBATCH, SERVICE, CRONTAB))
    used = set(_VARIABLE_REFERENCE.findall(recipes))
    assert listed <= used, f"unused in the recipes: {sorted(listed - used)}"


# Running the script against a stub `pipeline`: which command line it builds, what it returns.


def _stub_pipeline(folder: Path) -> None:
    """A `pipeline` command that records its arguments and exits with $STUB_EXIT_CODE."""
    folder.mkdir(parents=True, exist_ok=True)
    stub = folder / "pipeline"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        'printf "%s\\0" "$@" > "$STUB_ARGS_FILE"\n'
        'exit "${STUB_EXIT_CODE:-0}"\n'
    )
    stub.chmod(0o755)


def _run_sbatch(tmp_path: Path, path_prefix: Path | None, **variables: str):
    system_path = os.pathsep.join(
        str(Path(shutil.which(tool)).parent) for tool in ("bash", "date", "mkdir", "uname")
    )
    env = {
        "PATH": f"{path_prefix}{os.pathsep}{system_path}" if path_prefix else system_path,
        "HOME": str(tmp_path / "home"),
        "STUB_ARGS_FILE": str(tmp_path / "args"),
        **variables,
    }
    result = subprocess.run(
        ["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    args_file = tmp_path / "args"
    args = args_file.read_text().split("\0")[:-1] if args_file.exists() else None
    return result, args


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    """An archive whose glob matches plates, a cluster config and a stub pipeline."""
    for name in ("p1.zarr", "p2.zarr"):
        (tmp_path / "archive" / name).mkdir(parents=True)
    cluster_config = tmp_path / "jobqueue.yaml"
    cluster_config.write_text("jobqueue: {}\n")
    _stub_pipeline(tmp_path / "bin")
    return {
        "glob": tmp_path / "archive" / "*.zarr",
        "results": tmp_path / "results",
        "cluster_config": cluster_config,
        "bin": tmp_path / "bin",
    }


def test_sbatch_runs_pipeline_reprocess_with_the_pattern_unexpanded(tmp_path, site):
    result, args = _run_sbatch(
        tmp_path,
        site["bin"],
        ARCHIVE_GLOB=str(site["glob"]),
        RESULTS_DIR=str(site["results"]),
        CLUSTER_CONFIG=str(site["cluster_config"]),
    )
    assert result.returncode == 0, result.stderr
    assert args == [
        "reprocess",
        str(site["glob"]),
        "--out-dir",
        str(site["results"]),
        "--cluster",
        "slurm",
        "--cluster-config",
        str(site["cluster_config"]),
    ]
    assert site["results"].is_dir()


def test_sbatch_passes_optional_settings(tmp_path, site):
    run_config = tmp_path / "run.yaml"
    run_config.write_text("tracking: {max_gap: 1}\n")
    default_cluster_config = tmp_path / "home" / ".config" / "dask" / "jobqueue.yaml"
    default_cluster_config.parent.mkdir(parents=True)
    default_cluster_config.write_text("jobqueue: {}\n")
    result, args = _run_sbatch(
        tmp_path,
        site["bin"],
        ARCHIVE_GLOB=str(site["glob"]),
        RESULTS_DIR=str(site["results"]),
        PIPELINE_CONFIG=str(run_config),
        PIPELINE_CLUSTER="slurm-gpu",
        PIPELINE_MAX_JOBS="8",
    )
    assert result.returncode == 0, result.stderr
    assert args[args.index("--cluster") + 1] == "slurm-gpu"
    assert args[args.index("--cluster-config") + 1] == str(default_cluster_config)
    assert args[args.index("--config") + 1] == str(run_config)
    assert args[args.index("--max-jobs") + 1] == "8"


def test_sbatch_activates_pipeline_venv(tmp_path, site):
    venv = tmp_path / "venv"
    _stub_pipeline(venv / "bin")
    # like a real activate script: reads variables that may be unset
    (venv / "bin" / "activate").write_text(
        f'if [ -n "$VIRTUAL_ENV_PROMPT" ]; then :; fi\nexport PATH="{venv}/bin:$PATH"\n'
    )
    result, args = _run_sbatch(
        tmp_path,
        None,  # pipeline is only in the venv
        ARCHIVE_GLOB=str(site["glob"]),
        RESULTS_DIR=str(site["results"]),
        CLUSTER_CONFIG=str(site["cluster_config"]),
        PIPELINE_VENV=str(venv),
    )
    assert result.returncode == 0, result.stderr
    assert args[0] == "reprocess"


@pytest.mark.parametrize("exit_code", [2, 3])
def test_sbatch_returns_the_pipeline_exit_code(tmp_path, site, exit_code):
    result, args = _run_sbatch(
        tmp_path,
        site["bin"],
        ARCHIVE_GLOB=str(site["glob"]),
        RESULTS_DIR=str(site["results"]),
        CLUSTER_CONFIG=str(site["cluster_config"]),
        STUB_EXIT_CODE=str(exit_code),
    )
    assert args is not None
    assert result.returncode == exit_code
    if exit_code == 3:
        assert "partial" in result.stderr


def test_sbatch_refuses_to_start_without_its_settings(tmp_path, site):
    result, args = _run_sbatch(tmp_path, site["bin"], RESULTS_DIR=str(site["results"]))
    assert result.returncode == 2 and "ARCHIVE_GLOB" in result.stderr
    assert args is None
    result, args = _run_sbatch(
        tmp_path,
        site["bin"],
        ARCHIVE_GLOB=str(site["glob"]),
        RESULTS_DIR=str(site["results"]),
        CLUSTER_CONFIG=str(tmp_path / "missing.yaml"),
    )
    assert result.returncode == 2 and "missing.yaml" in result.stderr
    assert args is None
    result, args = _run_sbatch(
        tmp_path,
        None,  # no pipeline anywhere
        ARCHIVE_GLOB=str(site["glob"]),
        RESULTS_DIR=str(site["results"]),
        CLUSTER_CONFIG=str(site["cluster_config"]),
    )
    assert result.returncode == 2 and "PATH" in result.stderr


# --------------------------------------------------------------------------------------------
# systemd units
# --------------------------------------------------------------------------------------------


def test_timer_starts_the_service_nightly():
    timer = _unit(TIMER)
    assert _recipe(timer["Timer"]["Unit"]) == SERVICE
    assert timer["Timer"]["OnCalendar"].strip()
    assert timer["Timer"]["Persistent"].strip() == "true"
    assert timer["Timer"]["RandomizedDelaySec"].strip()
    assert timer["Install"]["WantedBy"].strip() == "timers.target"


def test_service_submits_the_sbatch_script():
    service = _unit(SERVICE)["Service"]
    assert service["Type"] == "oneshot"
    assert service["EnvironmentFile"].lstrip("-") == "/etc/pipeline/reprocess.env"
    assert service["User"] and service["User"] != "root"
    command = shlex.split(service["ExecStart"])
    assert Path(command[0]).is_absolute() and Path(command[0]).name == "sbatch"
    assert "--wait" not in command  # submit only; the job runs under SLURM
    assert any(arg.startswith("--export=ALL") for arg in command)
    assert _recipe(command[-1]) == SBATCH
    # systemd substitutes ${NAME} from the environment file: each must be listed there
    _, set_in_example = _env_example_variables()
    substituted = set()
    for key in ("ExecStartPre", "ExecStart"):
        substituted |= set(re.findall(r"\$\{(\w+)\}", service.get(key, "")))
    assert substituted <= set_in_example


# --------------------------------------------------------------------------------------------
# crontab
# --------------------------------------------------------------------------------------------

_CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$|^[A-Za-z]{3}$")


def test_cron_line_submits_the_sbatch_script_nightly():
    (job,) = _cron_jobs()
    fields = job.split(None, 5)
    assert len(fields) == 6, "five time fields and a command"
    *schedule, command = fields
    assert all(_CRON_FIELD.match(field) for field in schedule), schedule
    assert schedule[2:] == ["*", "*", "*"], "every day"
    assert re.search(r"(^|[\s;&|/])sbatch\s", command)
    # cron turns an unescaped % into a newline
    assert not re.search(r"(?<!\\)%", command)
    words = shlex.split(command.replace(">>", " >> "))
    scripts = [w for w in words if w.endswith(".sbatch")]
    assert scripts and all(_recipe(s) == SBATCH for s in scripts)
    (export,) = [w for w in words if w.startswith("--export=")]
    exported = dict(item.split("=", 1) for item in export.split("=", 1)[1].split(",")[1:])
    assert export.startswith("--export=ALL,")
    listed, _ = _env_example_variables()
    assert {"ARCHIVE_GLOB", "RESULTS_DIR"} <= set(exported) <= listed
