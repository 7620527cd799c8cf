#!/usr/bin/env bash
# Stop the single-node SLURM that deploy/slurm/testing/start.sh DIR started: cancel its jobs,
# then end slurmd, slurmctld and munged by the pids in DIR/run. DIR itself is kept (logs).
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dir=$(cd "$1" && pwd)
export SLURM_CONF="$dir/slurm.conf"

# Cancel every job and wait (at most 20 s) until none is left.
if [[ -s "$dir/run/slurmctld.pid" ]] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 40); do
            [[ -z $(squeue -h -o %i 2>/dev/null || true) ]] && break
            sleep 0.5
        done
    fi
fi

# Ask all three daemons to stop at once, wait (at most 10 s), then kill what is left.
pids=()
for daemon in slurmd slurmctld munged; do
    pidfile="$dir/run/$daemon.pid"
    [[ -s $pidfile ]] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$pidfile"
done
for _ in $(seq 40); do
    alive=()
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null && alive+=("$pid")
    done
    [[ ${#alive[@]} -eq 0 ]] && exit 0
    sleep 0.25
done
kill -9 "${alive[@]}" 2>/dev/null
exit 0
