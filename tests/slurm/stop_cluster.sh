#!/usr/bin/env bash
# Stop the daemons that tests/slurm/setup_cluster.sh started (by their pid files); leaves packages,
# configuration and job state in place, so setup_cluster.sh brings the same cluster back.
set -euo pipefail
STATE=${VLMSENS_SLURM_STATE:-/var/lib/vlmsens-slurm}
for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        echo "[slurm-stop] stopping $(basename "$pidfile" .pid) (pid $pid)" >&2
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
done
