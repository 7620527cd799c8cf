#!/usr/bin/env bash
# Install SLURM and munge from the distribution (Debian/Ubuntu) for the single-node test cluster
# of deploy/slurm/testing/start.sh. Idempotent; never fails: where it cannot install (not root,
# no apt-get, no network) it says why and exits 0, and the SLURM tests skip.
set -uo pipefail

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "install.sh: not root, SLURM not installed (the SLURM tests will skip)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install.sh: no apt-get, SLURM not installed (the SLURM tests will skip)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq slurm-wlm munge; } >/dev/null; then
    echo "install.sh: apt-get could not install slurm-wlm and munge (the SLURM tests will skip)" >&2
fi
exit 0
