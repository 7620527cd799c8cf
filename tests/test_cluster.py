"""The run's Dask cluster: localhost by default, TLS off loopback, SLURM jobs (no SLURM)."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import urlopen

import dask.config
import psutil
import pytest
import yaml
from distributed import Client, LocalCluster
from distributed.comm import get_address_host, parse_host_port
from distributed.security import Security

from pipeline.convnet.memory import MALLOC_SETTINGS
from pipeline.errors import PipelineInputError
from pipeline.orchestration.cluster import (
    connect,
    gpu_requested,
    plain_connection_warning,
    worker_environment,
)

DEPLOY_YAML = Path(__file__).parents[1] / "deploy" / "slurm" / "jobqueue.yaml"


@pytest.fixture(autouse=True)
def _no_tls_in_dask_config() -> Iterator[None]:
    """Each test starts from a Dask config without TLS certificates, as on a fresh machine."""
    with dask.config.set({"distributed.comm.tls.ca-file": None}):
        yield


def _listening_hosts(port: int) -> set[str]:
    """The addresses this process listens on at ``port``, as the operating system reports."""
    return {
        c.laddr.ip
        for c in psutil.Process().net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


def _public_ports(run, children_before: set[int]) -> set[int]:
    """Ports a local cluster listens on beyond loopback: its scheduler, dashboard and nannies
    (in this process) and everything of its worker processes (children started since)."""
    workers = run.client.scheduler_info()["workers"]
    own = {_port(run.client.scheduler.address), urlparse(run.dashboard_link).port}
    own |= {_port(worker["nanny"]) for worker in workers.values()}
    sockets = [c for c in psutil.Process().net_connections("tcp") if c.laddr.port in own]
    for child in psutil.Process().children(recursive=True):
        if child.pid not in children_before:
            sockets += child.net_connections("tcp")
    return {
        c.laddr.port
        for c in sockets
        if c.status == psutil.CONN_LISTEN and not ipaddress.ip_address(c.laddr.ip).is_loopback
    }


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def _port(address: str) -> int:
    return parse_host_port(address.split("://")[-1])[1]


def _jobqueue_yaml(directory: Path, name: str = "slurm", **overrides) -> Path:
    """Section ``name`` of ``deploy/slurm/jobqueue.yaml``, small, its folders in ``directory``."""
    section = yaml.safe_load(DEPLOY_YAML.read_text())["jobqueue"][name]
    section.update(
        {
            "queue": None,
            "cores": 1,
            "processes": 1,
            "memory": "1GiB",
            "local-directory": str(directory / "local"),
            "log-directory": str(directory / "logs"),
            "shared-temp-directory": str(directory / "tls"),
        }
    )
    section.update(overrides)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"jobqueue": {name: section}}))
    return path


def _worker_arguments(job_script: str) -> list[str]:
    """The ``dask worker`` command line of a job script, split as bash would."""
    command = next(
        line for line in job_script.splitlines() if "distributed.cli.dask_worker" in line
    )
    return shlex.split(command)


@pytest.mark.cluster
def test_local_cluster_listens_on_localhost_only():
    before = _children()
    with connect(workers=2) as run:
        assert _public_ports(run, before) == set()
        address = run.client.scheduler.address
        dashboard = urlparse(run.dashboard_link)
        assert get_address_host(address) == "127.0.0.1"
        assert _listening_hosts(_port(address)) == {"127.0.0.1"}
        assert dashboard.hostname == "127.0.0.1"
        assert _listening_hosts(dashboard.port) == {"127.0.0.1"}
        with urlopen(run.dashboard_link, timeout=10) as page:
            assert page.status == 200
        assert run.client.submit(sum, [1, 2]).result() == 3
        assert run.gpu_workers is False
        assert run.tunnel_command is None
        assert _memory_environments(run.client) == [MALLOC_SETTINGS] * 2


def _memory_environments(client: Client) -> list[dict[str, str | None]]:
    """Each worker's values of the variables of :data:`MALLOC_SETTINGS`."""
    values = {name: client.run(os.getenv, name) for name in MALLOC_SETTINGS}
    workers = next(iter(values.values()))
    return [{name: values[name][worker] for name in values} for worker in workers]


def test_worker_environment_replaces_what_dask_left_but_not_the_users_own(monkeypatch):
    """Every nanny leaves Dask's ``MALLOC_TRIM_THRESHOLD_=65536`` in its process's environment,
    which nannies read before the config: replaced while workers start; a value of the
    user's own is kept; the environment is as before afterwards."""
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    expected = {**MALLOC_SETTINGS, "MALLOC_ARENA_MAX": "2"}
    with worker_environment() as chosen:
        assert chosen == expected
        assert {name: os.environ[name] for name in chosen} == expected
        spawn = dask.config.get("distributed.nanny.pre-spawn-environ")
        assert {name: spawn[name] for name in chosen} == expected
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"
    assert os.environ["MALLOC_ARENA_MAX"] == "2"
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ


PAGE_FAULTS_OF_FOUR_PASSES = """
import resource, threading
import numpy as np
from pipeline.convnet.inference import InferenceSettings, run_network
faults = []
def passes():
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run_network(np.zeros((1, 768, 768), np.float32), InferenceSettings(cpu_threads=1))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
task = threading.Thread(target=passes)  # a Dask worker runs its tasks in threads
task.start()
task.join()
print(*faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_worker_memory_settings_let_network_passes_reuse_freed_memory():
    """With Dask's settings every pass of the network on a CPU maps its activations afresh, each
    page a fault (the kernel maps and zeroes it); with the run's, passes reuse them once the
    heap has settled (the second pass still grew it in 2 of 7 runs, by up to 37,415 faults)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def faults(environment: dict[str, str]) -> list[int]:
        output = subprocess.run(
            [sys.executable, "-c", PAGE_FAULTS_OF_FOUR_PASSES],
            env={**inherited, **environment},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [int(n) for n in output.split()]

    activations = 768 * 768 * 4 * 16 // 4096  # pages of one 16-channel map, a small part of them
    dask_first, *dask_later = faults({"MALLOC_TRIM_THRESHOLD_": "65536"})
    _, _, *settled = faults(MALLOC_SETTINGS)
    assert min(dask_later) > 0.8 * dask_first > activations
    assert max(settled) < 0.05 * min(dask_later)


def test_public_interface_without_tls_is_refused():
    with pytest.raises(PipelineInputError, match=r"public interface '0\.0\.0\.0' without TLS"):
        with connect(workers=1, scheduler_host="0.0.0.0"):
            pass


def _write_certificates(directory: Path) -> dict[str, str]:
    """A self-signed certificate and key as PEM files; Dask config keys pointing at them."""
    temporary = Security.temporary()
    ca, cert, key = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca.write_text(temporary.tls_ca_file)
    cert.write_text(temporary.tls_scheduler_cert)
    key.write_text(temporary.tls_scheduler_key)
    settings = {"distributed.comm.tls.ca-file": str(ca)}
    for role in ("scheduler", "worker", "client"):
        settings[f"distributed.comm.tls.{role}.cert"] = str(cert)
        settings[f"distributed.comm.tls.{role}.key"] = str(key)
    return settings


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_public_interface_with_tls_certificates(tmp_path):
    before = _children()
    with dask.config.set(_write_certificates(tmp_path)):
        with connect(workers=1, scheduler_host="0.0.0.0") as run:
            address = run.client.scheduler.address
            assert address.startswith("tls://")
            assert _listening_hosts(_port(address)) <= {"0.0.0.0", "::"}
            assert run.client.submit(sum, [1, 2]).result() == 3
            # What listens beyond loopback speaks TLS: scheduler, workers, nannies.
            workers = run.client.scheduler_info()["workers"]
            tls = [address, *workers, *(worker["nanny"] for worker in workers.values())]
            assert all(a.startswith("tls://") for a in tls)
            assert _public_ports(run, before) == {_port(a) for a in tls}
            # Without TLS nobody gets in.
            with pytest.raises((OSError, TimeoutError)):
                Client(address.replace("tls://", "tcp://"), timeout="2s", security=Security())


def test_incomplete_tls_config_is_named(tmp_path):
    settings = _write_certificates(tmp_path)
    del settings["distributed.comm.tls.worker.cert"]
    with dask.config.set(settings):
        with pytest.raises(PipelineInputError, match="certificate for worker"):
            with connect(workers=1, scheduler_host="0.0.0.0"):
                pass


@pytest.mark.cluster
def test_existing_scheduler_reports_gpu_workers():
    for resources, expected in (({"GPU": 1}, True), ({}, False)):
        with LocalCluster(
            n_workers=1,
            processes=False,
            host="127.0.0.1",
            protocol="tcp://",
            dashboard_address=None,
            resources=resources,
        ) as existing:
            with connect(scheduler=existing.scheduler_address) as run:
                assert run.client.scheduler.address == existing.scheduler_address
                assert run.gpu_workers is expected


@pytest.mark.parametrize(
    ("address", "warned"),
    [
        ("tcp://10.1.2.3:8786", True),  # another machine, in the clear
        ("10.1.2.3:8786", True),  # tcp is Dask's default protocol
        ("tcp://127.0.0.1:8786", False),
        ("tcp://[::1]:8786", False),
        ("localhost:8786", False),
        ("tls://10.1.2.3:8786", False),
    ],
)
def test_a_scheduler_on_another_machine_without_tls_is_warned_about(address, warned):
    warning = plain_connection_warning(address)
    assert (warning is not None) is warned
    if warned:
        assert warning.startswith(f"warning: scheduler {address} is reached without TLS")


def test_tls_scheduler_without_certificates_is_refused():
    with pytest.raises(PipelineInputError, match="uses TLS"):
        with connect(scheduler="tls://127.0.0.1:8786"):
            pass


def test_unknown_cluster_kind():
    with pytest.raises(PipelineInputError, match="unknown cluster 'pbs'"):
        with connect("pbs"):
            pass


def test_slurm_config_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(PipelineInputError, match="not found") as error:
        with connect("slurm", cluster_config=missing):
            pass
    assert str(missing) in str(error.value)

    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("jobqueue:\n  slurm: [cores: 1\n")
    with pytest.raises(PipelineInputError, match="malformed") as error:
        with connect("slurm", cluster_config=malformed):
            pass
    assert str(malformed) in str(error.value)

    cpu_only = _jobqueue_yaml(tmp_path)
    with pytest.raises(PipelineInputError, match=r"no section jobqueue\.slurm-gpu") as error:
        with connect("slurm-gpu", cluster_config=cpu_only):
            pass
    assert str(cpu_only) in str(error.value)

    no_memory = _jobqueue_yaml(tmp_path, memory=None)
    with pytest.raises(PipelineInputError, match=r"jobqueue\.slurm\.memory") as error:
        with connect("slurm", cluster_config=no_memory):
            pass
    assert str(no_memory) in str(error.value)


def test_deployed_config_sections(tmp_path):
    """The shipped jobqueue.yaml: CPU jobs without GPUs, GPU jobs asking SLURM for one."""
    deployed = yaml.safe_load(DEPLOY_YAML.read_text())["jobqueue"]
    assert not gpu_requested(deployed["slurm"]["job-extra-directives"])
    assert gpu_requested(deployed["slurm-gpu"]["job-extra-directives"])
    for section in deployed.values():
        host = section["scheduler-options"]["dashboard_address"].rsplit(":", 1)[0]
        assert host == "127.0.0.1"


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_slurm_uses_temporary_tls_by_default(tmp_path, monkeypatch):
    """Without certificates in the config, a SLURM cluster makes temporary ones and its jobs
    get them as files only this user can read; a worker started from the job script connects."""
    # No SLURM here: the job script is run by hand, and adaptive scaling must not call sbatch
    # (it is tested on a real SLURM in test_slurm.py).
    monkeypatch.setattr("dask_jobqueue.SLURMCluster.adapt", lambda self, **kwargs: None)
    config = _jobqueue_yaml(tmp_path)
    with connect("slurm", cluster_config=config) as run:
        address = run.client.scheduler.address
        assert address.startswith("tls://")
        assert _listening_hosts(_port(address)) == {"127.0.0.1"}
        assert run.gpu_workers is False
        dashboard = urlparse(run.dashboard_link)
        assert dashboard.hostname == "127.0.0.1"
        assert f"8787:127.0.0.1:{dashboard.port} " in run.tunnel_command

        script = run.client.cluster.job_script()
        assert "--resources" not in script
        args = _worker_arguments(script)
        assert args[args.index("--protocol") + 1] == "tls://"
        assert address in args
        files = {
            flag: Path(args[args.index(flag) + 1])
            for flag in ("--tls-ca-file", "--tls-cert", "--tls-key")
        }
        for flag, path in files.items():
            assert path.is_relative_to(tmp_path / "tls"), flag
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, flag
        assert "PRIVATE KEY" in files["--tls-key"].read_text()

        # What a SLURM job would run, run here: the worker reaches the scheduler over TLS.
        job = subprocess.Popen(
            ["bash", "-c", script],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            run.client.wait_for_workers(1, timeout=60)
            assert run.client.submit(os.getpid).result() != os.getpid()
            assert _memory_environments(run.client) == [MALLOC_SETTINGS]
            # Only TLS listens beyond loopback (the worker's HTTP server stays on localhost).
            (address, worker), *_ = run.client.scheduler_info()["workers"].items()
            processes = [psutil.Process(job.pid), *psutil.Process(job.pid).children(True)]
            public = {
                c.laddr.port
                for p in processes
                for c in p.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN
                and not ipaddress.ip_address(c.laddr.ip).is_loopback
            }
            assert address.startswith("tls://") and worker["nanny"].startswith("tls://")
            assert public <= {_port(address), _port(worker["nanny"])}
        finally:
            os.killpg(job.pid, signal.SIGTERM)
            job.wait(timeout=30)
    assert not any(path.exists() for path in files.values())


def test_slurm_uses_the_configured_certificates(tmp_path):
    settings = _write_certificates(tmp_path)
    with dask.config.set(settings):
        with connect("slurm", cluster_config=_jobqueue_yaml(tmp_path)) as run:
            assert run.client.scheduler.address.startswith("tls://")
            args = _worker_arguments(run.client.cluster.job_script())
    assert args[args.index("--tls-ca-file") + 1] == settings["distributed.comm.tls.ca-file"]
    assert args[args.index("--tls-cert") + 1] == settings["distributed.comm.tls.worker.cert"]
    assert args[args.index("--tls-key") + 1] == settings["distributed.comm.tls.worker.key"]


def test_gpu_section_gives_workers_the_gpu_resource(tmp_path):
    config = _jobqueue_yaml(tmp_path, "slurm-gpu")
    with connect("slurm-gpu", cluster_config=config) as run:
        script = run.client.cluster.job_script()
        assert run.gpu_workers is True
    assert re.search(r"^#SBATCH --gres=gpu:1$", script, re.MULTILINE)
    args = _worker_arguments(script)
    assert args[args.index("--resources") + 1] == "GPU=1"


@pytest.mark.parametrize(
    ("overrides", "directive", "resources"),
    [
        ({"job-extra-directives": [], "gres": "gpu:a100:2"}, "--gres=gpu:a100:2", "GPU=1"),
        (
            {"job-extra-directives": ["--gpus=1"], "worker-extra-args": ["--resources", "GPU=2"]},
            "--gpus=1",
            "GPU=2",
        ),
        (
            {
                "job-extra-directives": ["--gpus-per-node=1"],
                "worker-extra-args": ["--resources", "MEM=1"],
            },
            "--gpus-per-node=1",
            "MEM=1,GPU=1",
        ),
    ],
)
def test_gpu_requests_and_given_resources(tmp_path, overrides, directive, resources):
    """Other ways of asking SLURM for a GPU; resources already given are kept."""
    config = _jobqueue_yaml(tmp_path, "slurm-gpu", **overrides)
    with connect("slurm-gpu", cluster_config=config) as run:
        script = run.client.cluster.job_script()
        assert run.gpu_workers is True
    assert f"#SBATCH {directive}" in script.splitlines()
    args = _worker_arguments(script)
    assert args.count("--resources") == 1
    assert args[args.index("--resources") + 1] == resources


@pytest.mark.parametrize(
    ("message", "status", "shown"),
    [
        ("Compute Failed\nKey: x", "running", False),
        ("Failed to communicate with scheduler during heartbeat.", "closing", False),
        ("Failed to communicate with scheduler during heartbeat.", "closed", False),
        ("Failed to communicate with scheduler during heartbeat.", "running", True),
        ("Run out-of-band function 'f'", "running", True),
    ],
)
def test_worker_log_hides_only_failed_tasks_and_heartbeats_cut_by_closing(message, status, shown):
    """The run's own workers do not print tracebacks for task failures the run records, or for
    a heartbeat cut short by the worker's own closing; the messages filtered are Distributed's
    own (read from its source, so that a reworded message fails here)."""
    import inspect
    import logging
    from types import SimpleNamespace

    import distributed.worker
    from distributed.core import Status

    from pipeline.orchestration.runner import _QuietWorkerLog

    source = inspect.getsource(distributed.worker)
    assert '"Compute Failed' in source
    assert '"Failed to communicate with scheduler during heartbeat."' in source
    quiet = _QuietWorkerLog(SimpleNamespace(status=Status[status]))
    record = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, message, (), None)
    assert quiet.filter(record) is shown
