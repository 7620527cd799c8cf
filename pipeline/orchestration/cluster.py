"""The Dask cluster a run computes on: local, an existing scheduler, or SLURM jobs.

Secure by default: a cluster started here has its scheduler and dashboard on localhost unless
told otherwise, refuses to listen on a public interface without TLS, and SLURM clusters always
use TLS (certificates from the Dask config, else temporary ones made for the run).
"""

from __future__ import annotations

import copy
import getpass
import ipaddress
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import dask.config
import yaml
from distributed import Client, LocalCluster
from distributed.comm import get_address_host
from distributed.security import Security
from distributed.utils import format_dashboard_link

from pipeline.convnet.memory import MALLOC_SETTINGS
from pipeline.errors import PipelineInputError

__all__ = [
    "CLUSTERS",
    "RunCluster",
    "connect",
    "gpu_requested",
    "is_loopback",
    "worker_environment",
]

CLUSTERS = ("local", "slurm", "slurm-gpu")
"""Kinds of cluster :func:`connect` can start."""

DEFAULT_MAX_JOBS = 4
"""Adaptive SLURM clusters grow to at most this many jobs unless told otherwise."""

DEFAULT_TLS_DIRECTORY = "~/.cache/pipeline/tls"
"""Where temporary worker certificates go when the jobqueue section names no
``shared-temp-directory`` (it must be readable on the compute nodes: home usually is)."""

# Job directives that ask SLURM for a GPU: --gres=gpu:1, --gres=gpu:a100:2, --gpus=1,
# --gpus-per-node=1, --gpus-per-task=1, -G 1.
_GPU_DIRECTIVE = re.compile(r"--gres[= ]\S*\bgpu\b|--gpus(-per-\w+)?[= ]|^-G\s*\d")
_TLS_KEYS = "distributed.comm.tls.ca-file and distributed.comm.tls.{scheduler,worker,client}.cert"


@dataclass
class RunCluster:
    """A connected Dask client and what a run needs to know about its cluster.

    Attributes
    ----------
    client
        Client connected to the cluster's scheduler.
    gpu_workers
        Whether workers carry the resource ``GPU=1``: inference must then be restricted to them.
    dashboard_link
        Address of the dashboard's status page, e.g. ``http://127.0.0.1:PORT/status``.
    tunnel_command
        For SLURM, the ``ssh -N -L 8787:127.0.0.1:PORT USER@HOST`` command that brings the
        dashboard to a laptop (then open ``http://localhost:8787/status``); None otherwise.
    """

    client: Client
    gpu_workers: bool
    dashboard_link: str
    tunnel_command: str | None


@contextmanager
def connect(
    cluster: str = "local",
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int = 1,
    cluster_config: str | Path | None = None,
    max_jobs: int | None = None,
    scheduler_host: str = "127.0.0.1",
) -> Iterator[RunCluster]:
    """Start (or join) the Dask cluster of a run, and close what was started on exit.

    Parameters
    ----------
    cluster
        ``"local"``: worker processes on this machine; ``"slurm"`` or ``"slurm-gpu"``: an
        adaptive dask-jobqueue cluster of SLURM jobs described by the section
        ``jobqueue.<cluster>`` of the Dask config.
    scheduler
        Address of an existing scheduler (``tcp://host:8786``, ``tls://...``); overrides
        ``cluster``. A ``tls://`` scheduler is reached with the certificates of the Dask config.
    workers
        Local worker processes (default: one per core, at most 4).
    threads_per_worker
        Threads per local worker.
    cluster_config
        A Dask config YAML file with the ``jobqueue`` section (e.g.
        ``deploy/slurm/jobqueue.yaml``), in force while the cluster lives. Without it,
        dask-jobqueue's usual config lookup (``~/.config/dask/jobqueue.yaml``) applies.
    max_jobs
        Most SLURM jobs the adaptive cluster grows to (default 4); it shrinks to none when idle.
    scheduler_host
        Interface the local cluster's scheduler listens on. Anything but loopback needs TLS
        certificates in the Dask config (``distributed.comm.tls``).

    Yields
    ------
    RunCluster
        Connected client, whether workers have GPUs, dashboard link and SSH tunnel command.

    Raises
    ------
    PipelineInputError
        Unknown cluster kind, a missing or malformed cluster config (or section), or a
        scheduler that would listen on a public interface without TLS.
    """
    if scheduler is not None:
        with _existing(scheduler) as run_cluster:
            yield run_cluster
    elif cluster == "local":
        with _local(workers, threads_per_worker, scheduler_host) as run_cluster:
            yield run_cluster
    elif cluster in CLUSTERS:
        with _slurm(cluster, cluster_config, max_jobs) as run_cluster:
            yield run_cluster
    else:
        raise PipelineInputError(
            f"unknown cluster {cluster!r} (expected one of {', '.join(CLUSTERS)})", cluster
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only loopback addresses (127.0.0.0/8, ::1, localhost).

    Parameters
    ----------
    host
        Host name or IP address; empty means every interface.

    Returns
    -------
    bool
        True when every address ``host`` resolves to is a loopback address.
    """
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def gpu_requested(job_extra_directives: list[str]) -> bool:
    """Whether SLURM job directives ask for a GPU (``--gres=gpu:1``, ``--gpus=1``, ``-G 1``).

    Parameters
    ----------
    job_extra_directives
        The ``#SBATCH`` options of a job, without ``#SBATCH``.

    Returns
    -------
    bool
        True when one of them requests a GPU.
    """
    return any(_GPU_DIRECTIVE.search(str(directive).strip()) for directive in job_extra_directives)


def _config_path() -> Path:
    """The user's Dask config folder, where ``distributed.comm.tls`` and jobqueue live."""
    return Path(dask.config.PATH)


def _config_security() -> Security | None:
    """TLS settings of the Dask config for a cluster started here; None when it has none."""
    security = Security()
    if not security.tls_ca_file:
        return None
    missing = [
        role
        for role in ("scheduler", "worker", "client")
        if not getattr(security, f"tls_{role}_cert")
    ]
    if missing:
        raise PipelineInputError(
            f"the Dask config's TLS settings lack a certificate for {', '.join(missing)} "
            f"(give {_TLS_KEYS})",
            _config_path(),
        )
    return security


def plain_connection_warning(address: str) -> str | None:
    """The warning a run prints before it reaches a scheduler on another machine without TLS
    (None for ``tls://`` and for this machine's loopback)."""
    if address.startswith(("tls://", "inproc://")):
        return None
    if is_loopback(get_address_host(address if "://" in address else f"tcp://{address}")):
        return None
    return (
        f"warning: scheduler {address} is reached without TLS: whoever can reach it can read "
        "the data and run code on its workers; use a tls:// address (deploy/README.md)"
    )


@contextmanager
def _existing(address: str) -> Iterator[RunCluster]:
    """A client of a running scheduler; GPU workers are those it has now."""
    security = Security()
    if address.startswith("tls://") and not (security.tls_ca_file and security.tls_client_cert):
        raise PipelineInputError(
            f"scheduler {address} uses TLS: give distributed.comm.tls.ca-file and "
            "distributed.comm.tls.client.cert (and .key) in the Dask config",
            _config_path(),
        )
    if warning := plain_connection_warning(address):
        print(warning, file=sys.stderr)
    with Client(address, security=security) as client:
        workers = client.scheduler_info()["workers"].values()
        yield RunCluster(
            client=client,
            gpu_workers=any(w.get("resources", {}).get("GPU", 0) > 0 for w in workers),
            dashboard_link=client.dashboard_link,
            tunnel_command=None,
        )


def _chosen_worker_environment() -> dict[str, str]:
    """:data:`~pipeline.convnet.memory.MALLOC_SETTINGS` (glibc keeps the network's freed
    memory for reuse: 1.7x faster on a CPU, about 0.45 GB more peak memory per worker), with
    any of its variables that this process's environment sets to a value of its own (not
    Dask's default, which every nanny started in a process leaves in its environment)."""
    dask_defaults = dask.config.get("distributed.nanny.pre-spawn-environ", default={})
    chosen = {}
    for name, value in MALLOC_SETTINGS.items():
        own = os.environ.get(name)
        dask_default = dask_defaults.get(name)
        left_by_dask = dask_default is not None and own == str(dask_default)
        chosen[name] = value if own is None or left_by_dask else own
    return chosen


@contextmanager
def worker_environment() -> Iterator[dict[str, str]]:
    """Worker processes that nannies start in this context get
    :func:`_chosen_worker_environment` (and the rest of Dask's ``pre-spawn-environ``); this
    process's environment is as before afterwards.

    A nanny reads these variables from the environment before Dask's config and writes them
    there before it starts its worker: both are set for the context.
    """
    chosen = _chosen_worker_environment()
    before = {name: os.environ.get(name) for name in chosen}
    spawn = {**dask.config.get("distributed.nanny.pre-spawn-environ", default={}), **chosen}
    os.environ.update(chosen)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn}):
            yield chosen
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _local(workers: int | None, threads_per_worker: int, host: str) -> Iterator[RunCluster]:
    """Worker processes on this machine; TLS when the Dask config has certificates."""
    security = _config_security()
    if security is None and not is_loopback(host):
        raise PipelineInputError(
            f"refusing to open a Dask scheduler on public interface {host!r} without TLS; "
            f"give TLS certificates in the Dask config ({_TLS_KEYS}) or listen on 127.0.0.1",
            _config_path(),
        )
    n_workers = workers or max(1, min(4, os.cpu_count() or 1))
    with (
        _ctrl_c_ignored(),  # by the worker processes started now: the run stops them
        worker_environment(),
    ):
        local = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            host=host,
            dashboard_address="127.0.0.1:0",
            # Workers' HTTP servers (metrics, health) are unencrypted: keep them on localhost.
            worker_dashboard_address=None if is_loopback(host) else "127.0.0.1:0",
            protocol=None if security is None else "tls://",
            security=security,
        )
    with local, Client(local) as client:
        yield RunCluster(
            client=client,
            gpu_workers=False,
            dashboard_link=format_dashboard_link("127.0.0.1", local.scheduler.http_server.port),
            tunnel_command=None,
        )


@contextmanager
def _ctrl_c_ignored() -> Iterator[None]:
    """SIGINT ignored while the context lasts, so that processes started in it ignore it too.

    Ctrl-C in a terminal signals the whole process group: worker processes would each die
    with a traceback while the run, which handles it, closes the cluster anyway.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


@contextmanager
def _slurm(
    name: str, cluster_config: str | Path | None, max_jobs: int | None
) -> Iterator[RunCluster]:
    """An adaptive cluster of SLURM jobs, always over TLS; GPU workers if the jobs ask for GPUs."""
    settings, section, source = _jobqueue_settings(name, cluster_config)
    directives = [str(d) for d in section["job-extra-directives"] or []]
    if section.get("gres"):
        directives.append(f"--gres={section['gres']}")
    gpu = gpu_requested(directives)
    worker_args = [str(a) for a in section["worker-extra-args"] or []]
    if gpu:
        worker_args = _with_gpu_resource(worker_args)
    if not any(arg.startswith(("--dashboard", "--no-dashboard")) for arg in worker_args):
        # A worker's HTTP server (metrics, health) is unencrypted: keep it on its node.
        worker_args += ["--dashboard-address", "127.0.0.1:0", "--no-dashboard"]
    options = {
        key.replace("-", "_"): value for key, value in (section["scheduler-options"] or {}).items()
    }
    if not str(options.get("protocol") or "tls").startswith("tls"):
        raise PipelineInputError(
            f"jobqueue.{name}.scheduler-options.protocol is {options['protocol']!r}, but SLURM "
            "clusters always use TLS: remove it",
            source,
        )
    if not ({"host", "interface"} & options.keys() or section["interface"]):
        options["host"] = "127.0.0.1"
    options.setdefault("dashboard_address", "127.0.0.1:0")
    tls_root = _expand(section["shared-temp-directory"] or DEFAULT_TLS_DIRECTORY)

    exports = [f"export {name}={value}" for name, value in _chosen_worker_environment().items()]
    with ExitStack() as stack:
        stack.enter_context(dask.config.set(settings))
        security = _config_security() or Security.temporary()
        tls_dir = _private_directory(tls_root, source)
        stack.callback(shutil.rmtree, tls_dir, ignore_errors=True)
        try:
            jobs = stack.enter_context(
                _jobqueue().SLURMCluster(
                    config_name=name,
                    security=_worker_files(security, tls_dir),
                    scheduler_options=options,
                    job_extra_directives=directives,
                    worker_extra_args=worker_args,
                    job_script_prologue=[*(section["job-script-prologue"] or []), *exports],
                )
            )
        except (TypeError, ValueError) as error:
            raise PipelineInputError(
                f"cannot start SLURM workers from jobqueue.{name}: {error}", source
            ) from error
        jobs.adapt(minimum_jobs=0, maximum_jobs=max_jobs or DEFAULT_MAX_JOBS)
        client = stack.enter_context(Client(jobs))
        dashboard_host = _dashboard_host(options["dashboard_address"], jobs.scheduler_address)
        port = jobs.scheduler.http_server.port
        yield RunCluster(
            client=client,
            gpu_workers=gpu,
            dashboard_link=format_dashboard_link(dashboard_host, port),
            tunnel_command=f"ssh -N -L 8787:{dashboard_host}:{port} {getpass.getuser()}@{_host()}",
        )


def _jobqueue() -> ModuleType:
    """dask-jobqueue, imported with this process' Ctrl-C handler kept: its ``runner`` module
    replaces it with ``sys.exit()`` on import, which turned an interrupted run into exit 0."""
    handler = signal.getsignal(signal.SIGINT)
    import dask_jobqueue

    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
    return dask_jobqueue


def _jobqueue_settings(
    name: str, cluster_config: str | Path | None
) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """Dask settings to apply, the complete ``jobqueue.<name>`` section, and its source file.

    The section is completed with dask-jobqueue's defaults for ``slurm``, so that a section of
    another name (``slurm-gpu``) needs only the keys that differ.
    """
    if cluster_config is None:
        source = _config_path() / "jobqueue.yaml"
        loaded: dict[str, Any] = {}
        user_section = dask.config.get(f"jobqueue.{name}", default=None)
    else:
        source = Path(cluster_config).expanduser().absolute()
        if not source.is_file():
            raise PipelineInputError("cluster config not found", source)
        try:
            loaded = dask.config.collect(paths=[str(source)])
        except ValueError as error:
            raise PipelineInputError(f"malformed cluster config ({error})", source) from error
        user_section = dask.config.get(f"jobqueue.{name}", default=None, config=loaded)
    if not isinstance(user_section, dict):
        raise PipelineInputError(f"no section jobqueue.{name} in the cluster config", source)
    with open(Path(_jobqueue().__file__).parent / "jobqueue.yaml") as f:
        defaults = yaml.safe_load(f)["jobqueue"]["slurm"]
    section = dask.config.merge(defaults, user_section)
    for key in ("cores", "memory"):
        if section[key] is None:
            raise PipelineInputError(f"jobqueue.{name}.{key} must be given", source)
    if section["log-directory"]:  # SLURM expands neither ~ nor $VARIABLES in #SBATCH -o
        section["log-directory"] = str(_expand(section["log-directory"]))
    settings = dask.config.merge(dask.config.config, loaded)
    settings["jobqueue"] = {**settings.get("jobqueue", {}), name: section}
    return settings, section, source


def _expand(path: str) -> Path:
    """``path`` with ``~`` and ``$VARIABLES`` expanded, as on this machine."""
    return Path(os.path.expandvars(path)).expanduser()


def _with_gpu_resource(worker_args: list[str]) -> list[str]:
    """``dask worker`` arguments with the resource ``GPU=1`` added, unless one is given."""
    if any("GPU=" in arg for arg in worker_args):
        return worker_args
    args = list(worker_args)
    for i, arg in enumerate(args):
        if arg == "--resources" and i + 1 < len(args):
            args[i + 1] = f"{args[i + 1]},GPU=1"
            return args
        if arg.startswith("--resources="):
            args[i] = f"{arg},GPU=1"
            return args
    return [*args, "--resources", "GPU=1"]


def _private_directory(root: Path, source: Path) -> Path:
    """A new directory only this user can read, under ``root`` (created if missing)."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="tls-", dir=root))
    except OSError as error:
        raise PipelineInputError(
            f"cannot write worker TLS certificates to shared-temp-directory {root} ({error})",
            source,
        ) from error


def _worker_files(security: Security, directory: Path) -> Security:
    """``security`` with the workers' in-memory certificates and key written to files.

    Job scripts pass certificates to ``dask worker`` as file names, so in-memory PEM
    (``Security.temporary()``) is written, readable by this user only, into ``directory``,
    which must be visible from the compute nodes.
    """
    files = copy.copy(security)
    for key, value in security.get_tls_config_for_role("worker").items():
        if value is None or "\n" not in value:
            continue
        path = directory / f"worker-{key}.pem"
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(value)
        setattr(files, "tls_ca_file" if key == "ca_file" else f"tls_worker_{key}", str(path))
    return files


def _host() -> str:
    """This machine's name as seen from a laptop: its FQDN, else its host name."""
    fqdn = socket.getfqdn()
    return socket.gethostname() if fqdn.startswith("localhost") else fqdn


def _dashboard_host(dashboard_address: str | int, scheduler_address: str) -> str:
    """The host serving the dashboard: its listen host, or the scheduler's for any interface."""
    text = str(dashboard_address)
    host = text.rsplit(":", 1)[0].strip("[]") if ":" in text else ""
    if host in ("", "0.0.0.0", "::"):
        return get_address_host(scheduler_address)
    return host
