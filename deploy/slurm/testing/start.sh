#!/usr/bin/env bash
# Start a private single-node SLURM (munged, slurmctld, slurmd) as root, without systemd.
#
#   bash deploy/slurm/testing/start.sh DIR
#
# Everything lives in DIR: slurm.conf, a munge key and socket, state, spool, logs and pid files.
# Clients (sbatch, squeue, scancel, dask-jobqueue) find this cluster through SLURM_CONF; the last
# line printed is the export to use. Stop it with deploy/slurm/testing/stop.sh DIR.
# For tests and demos only: one node (this machine), all CPUs, no accounting.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
for tool in munged slurmctld slurmd sinfo; do
    if ! command -v "$tool" >/dev/null; then
        echo "$tool not found: run deploy/slurm/testing/install.sh first" >&2
        exit 1
    fi
done
if [[ $(id -u) -ne 0 ]]; then
    echo "start.sh runs the SLURM daemons as root; run it as root" >&2
    exit 1
fi

mkdir -p "$1"
dir=$(cd "$1" && pwd)
mkdir -p "$dir"/{munge,state,spool,log,run}
chmod 700 "$dir/munge"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

# A TCP port on which nothing listens (bash's /dev/tcp: a refused connection means free).
free_port() {
    local port
    while true; do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

node=$(hostname -s)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys these variables
memory_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
ctld_port=$(free_port)
slurmd_port=$(free_port)
while [[ $slurmd_port == "$ctld_port" ]]; do slurmd_port=$(free_port); done

cat >"$conf" <<CONF
# Single-node test cluster written by deploy/slurm/testing/start.sh
ClusterName=pipeline-test
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF

key="$dir/munge/munge.key"
if [[ ! -s $key ]]; then
    dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
fi
chmod 400 "$key"

munged --force --key-file="$key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/munged.seed"
slurmctld -i -f "$conf"
slurmd -f "$conf"

# Wait (at most 60 s) until the node is idle.
for _ in $(seq 120); do
    if [[ $(sinfo -h -N -o %t 2>/dev/null) == idle ]]; then
        echo "export SLURM_CONF=$conf"
        exit 0
    fi
    sleep 0.5
done
echo "SLURM did not come up; logs are in $dir/log" >&2
sinfo >&2 || true
exit 1
