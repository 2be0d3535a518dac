#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for tests and for trying `ganpipe submit --profile local`.
#
# It installs nothing: Debian's packages (`apt-get install -y slurmctld slurmd munge slurm-client`, which .ci/run
# does) must be present. It writes a munge key, a slurm.conf and all state (spool, logs, pid files, sockets)
# under one directory, starts munged, slurmctld and slurmd against them, and waits until the node is idle.
# Nothing under /etc or /run is touched, so it can run beside a system Slurm and several copies can coexist.
#
#   tools/slurm_local.sh start [DIR]   start a cluster with its state in DIR (default: a new temp dir); prints
#                                      the DIR and the `export` lines to use it (also written to DIR/env.sh)
#   tools/slurm_local.sh stop DIR      stop the daemons started from DIR (by their pid files)
#   tools/slurm_local.sh status DIR    sinfo/squeue of that cluster
#
# The cluster: one node named by `hostname`, address 127.0.0.1, CPUs = max(nproc, 2) (config_overrides lets a
# 1-core machine still run the 2-task test job), ProctrackType=proctrack/linuxproc and TaskPlugin=task/none
# (no cgroups needed, so it runs in containers), SelectType=select/cons_tres, JobRequeue=1, all daemons as the
# current user. Clients find it through SLURM_CONF; munge through the socket named in AuthInfo.
set -euo pipefail

usage() {
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

need() {
    for cmd in "$@"; do
        if ! command -v "$cmd" >/dev/null 2>&1; then
            echo "slurm_local.sh: '$cmd' not found: apt-get install -y slurmctld slurmd munge slurm-client" >&2
            exit 3
        fi
    done
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop_pidfile() {
    local pidfile=$1 name=$2
    [[ -f $pidfile ]] || return 0
    local pid
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "slurm_local.sh: $name ($pid) did not stop on SIGTERM; sending SIGKILL" >&2
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

cmd_stop() {
    local dir=$1
    [[ -d $dir ]] || { echo "slurm_local.sh: no cluster state in $dir" >&2; exit 2; }
    if [[ -f $dir/slurm.conf ]]; then
        # Jobs first, so their steps do not outlive slurmd.
        SLURM_CONF=$dir/slurm.conf timeout 10 scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    stop_pidfile "$dir/run/slurmd.pid" slurmd
    stop_pidfile "$dir/run/slurmctld.pid" slurmctld
    stop_pidfile "$dir/run/munged.pid" munged
    echo "stopped the Slurm test cluster in $dir"
}

cmd_start() {
    need munged mungekey slurmctld slurmd sbatch scontrol sinfo python3
    local dir=${1:-}
    if [[ -z $dir ]]; then
        dir=$(mktemp -d "${TMPDIR:-/tmp}/slurm-local.XXXXXX")
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    mkdir -p "$dir"/{munge,run,log,spool/ctld,spool/d}
    chmod 700 "$dir/munge"

    local user node cpus ctld_port d_port
    user=$(id -un)
    node=$(hostname -s)
    cpus=$(nproc)
    ((cpus < 2)) && cpus=2
    ctld_port=$(free_port)
    d_port=$(free_port)
    while [[ $d_port == "$ctld_port" ]]; do d_port=$(free_port); done

    # munge: a private key and socket; munged refuses group/world-writable paths, hence the modes.
    [[ -f $dir/munge/munge.key ]] || mungekey --create --keyfile="$dir/munge/munge.key" --force >/dev/null
    chmod 400 "$dir/munge/munge.key"
    munged --force \
        --key-file="$dir/munge/munge.key" \
        --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/run/munged.pid" \
        --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed"

    cat >"$dir/slurm.conf" <<EOF
# Written by tools/slurm_local.sh: a single-node test cluster, state under $dir
ClusterName=ganpipe-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$dir/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
# Quick turnaround for tests: short kill wait, finished jobs leave the controller quickly.
KillWait=30
MinJobAge=300
SchedulerParameters=defer_batch
InactiveLimit=0
Waittime=0
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    : >"$dir/plugstack.conf"

    export SLURM_CONF=$dir/slurm.conf
    # -i: ignore state from an earlier run in the same DIR (a fresh cluster every start).
    slurmctld -i -f "$dir/slurm.conf"
    slurmd -f "$dir/slurm.conf" -N "$node"

    # Wait for the node to register and become idle.
    local state=""
    for _ in $(seq 150); do
        state=$(sinfo -h -N -n "$node" -o '%T' 2>/dev/null | head -1 || true)
        if [[ $state == idle* ]]; then
            break
        fi
        sleep 0.2
    done
    if [[ $state != idle* ]]; then
        echo "slurm_local.sh: node $node is '${state:-unreachable}' after 30 s; logs in $dir/log" >&2
        tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
        cmd_stop "$dir" >&2 || true
        exit 1
    fi
    printf 'export SLURM_CONF=%s\n' "$dir/slurm.conf" >"$dir/env.sh"
    echo "SLURM_LOCAL_DIR=$dir"
    cat "$dir/env.sh"
}

cmd_status() {
    local dir=$1
    SLURM_CONF=$dir/slurm.conf sinfo
    SLURM_CONF=$dir/slurm.conf squeue
}

[[ $# -ge 1 ]] || usage
case $1 in
start) cmd_start "${2:-}" ;;
stop) [[ $# -eq 2 ]] || usage; cmd_stop "$2" ;;
status) [[ $# -eq 2 ]] || usage; cmd_status "$2" ;;
*) usage ;;
esac
