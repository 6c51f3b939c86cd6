#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine (slurmctld + slurmd, munge), for tests/test_slurm.py.
#
# Idempotent: installs the Debian packages only when missing, rewrites the configuration only when it
# differs, and starts only the daemons that are not running. Needs root (apt-get, /etc/slurm, daemons).
#
# The node advertises two *fake* GPUs as a gpu GRES (gres.conf points at two character devices made
# here, clones of /dev/null): SLURM then schedules `--gpus=1` exactly as on a GPU node and sets
# CUDA_VISIBLE_DEVICES in the job, but no CUDA device exists behind it. The demo runs on CPU anyway.
#
# No accounting database: AccountingStorageType=accounting_storage/none. Finished jobs stay visible
# to `squeue --states=all` for MinJobAge (1 h here), which is what the Snakemake SLURM executor
# polls when its status command is squeue, and every finished job is also written to the job
# completion log (JobCompType=jobcomp/filetxt, $STATE/jobcomp.log).
#
# Usage: tests/slurm/setup_cluster.sh            (prints the sinfo line when the node is ready)
#        VLMSENS_SLURM_STATE=/var/lib/vlmsens-slurm tests/slurm/setup_cluster.sh
set -euo pipefail

STATE=${VLMSENS_SLURM_STATE:-/var/lib/vlmsens-slurm}
CONF_DIR=/etc/slurm
MARKER="# vlmsens one-node test cluster (tests/slurm/setup_cluster.sh)"
NODE=$(hostname -s)

log() { echo "[slurm-setup] $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "needs root (apt-get, /etc/slurm, daemons)"; exit 77
fi

# 1. Packages ---------------------------------------------------------------------------------------
need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
command -v munged >/dev/null || need+=(munge)
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || { log "missing ${need[*]} and no apt-get"; exit 77; }
    log "installing slurm-wlm munge (missing: ${need[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# 2. Configuration -----------------------------------------------------------------------------------
if [ -f "$CONF_DIR/slurm.conf" ] && ! grep -qF "$MARKER" "$CONF_DIR/slurm.conf"; then
    log "$CONF_DIR/slurm.conf exists and was not written by this script: refusing to overwrite it"
    exit 78
fi

# What slurmd sees on this machine; leave 1 GiB of memory to the system.
read -r CPUS SOCKETS CORES THREADS MEM < <(slurmd -C | head -1 | awk '{
    for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    print v["CPUs"], v["SocketsPerBoard"], v["CoresPerSocket"], v["ThreadsPerCore"], v["RealMemory"] }')
MEM=$(( MEM > 2048 ? MEM - 1024 : MEM ))

mkdir -p "$STATE"/{ctld,spool,log} "$CONF_DIR"
# Two fake GPU device files (char 1:3, like /dev/null) for the gpu GRES.
for i in 0 1; do
    # A character device is needed: with a plain file SLURM schedules the GRES but sets no CUDA_VISIBLE_DEVICES.
    [ -c "$STATE/fakegpu$i" ] || mknod -m 666 "$STATE/fakegpu$i" c 1 3 \
        || { log "mknod $STATE/fakegpu$i failed (a container without CAP_MKNOD?)"; exit 1; }
done

new_conf=$(cat <<CONF
$MARKER
ClusterName=vlmsens
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5
ReturnToService=2
MinJobAge=3600
MaxJobCount=100000
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
MpiDefault=none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
)
new_gres="$MARKER
NodeName=$NODE Name=gpu File=$STATE/fakegpu[0-1]"

changed=0
if [ "$(cat "$CONF_DIR/slurm.conf" 2>/dev/null)" != "$new_conf" ]; then
    printf '%s\n' "$new_conf" > "$CONF_DIR/slurm.conf"; changed=1
fi
if [ "$(cat "$CONF_DIR/gres.conf" 2>/dev/null)" != "$new_gres" ]; then
    printf '%s\n' "$new_gres" > "$CONF_DIR/gres.conf"; changed=1
fi
# The Debian cgroup.conf default is not needed (no cgroup plugins); nothing else to write.

# 3. Daemons -----------------------------------------------------------------------------------------
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {  # stop one daemon of ours by its pid file
    if alive "$1"; then
        kill "$(cat "$1")"
        for _ in $(seq 50); do alive "$1" || break; sleep 0.2; done
    fi
}

if [ "$changed" -eq 1 ]; then
    log "configuration written to $CONF_DIR/slurm.conf and $CONF_DIR/gres.conf"
    stop "$STATE/slurmd.pid"
    stop "$STATE/slurmctld.pid"
fi

# munge: a key is created by the Debian package; make one if it is missing.
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n </dev/null >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.2; done
fi
munge -n </dev/null | unmunge >/dev/null || { log "munge does not work"; exit 1; }

if ! alive "$STATE/slurmctld.pid"; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
if ! alive "$STATE/slurmd.pid"; then
    log "starting slurmd"
    /usr/sbin/slurmd
fi

# 4. Wait for the node ---------------------------------------------------------------------------------
for _ in $(seq 150); do
    st=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null || true)
    case "$st" in
        idle*|mixed*|allocated*) break ;;
        drain*|down*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
done
st=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null || true)
case "$st" in
    idle*|mixed*|allocated*) ;;
    *) log "node $NODE is '$st', not usable; see $STATE/log/"; tail -n 20 "$STATE"/log/*.log >&2; exit 1 ;;
esac
sinfo -N -o "%N %T %c %m %G %P"
