#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (munged + slurmctld + slurmd), for trying the
# sbatch scripts and for the Slurm test; it needs no systemd, so it runs in a container.
#
# Usage:
#   LOCAL_SLURM_DIR=/tmp/slurm launch/slurm/local-cluster.sh start    # writes config, starts daemons
#   export SLURM_CONF=/tmp/slurm/slurm.conf                          # then sbatch/squeue/sinfo work
#   sbatch --nodes 1 launch/slurm/pretrain.sbatch --config ... key=value ...
#   LOCAL_SLURM_DIR=/tmp/slurm launch/slurm/local-cluster.sh status
#   LOCAL_SLURM_DIR=/tmp/slurm launch/slurm/local-cluster.sh stop     # stops the daemons it started
#
# Everything lives under $LOCAL_SLURM_DIR: slurm.conf, the munge key and socket, state and
# spool directories, logs, and one pid file per daemon. `stop` signals exactly those pids.
# Needs root (slurmd starts job steps as the submitting user; run it with sudo, then submit
# as yourself) and the Debian packages slurm-wlm and munge
# (`apt-get install --no-install-recommends slurm-wlm munge`).
#
# Env knobs:
#   LOCAL_SLURM_DIR        directory for all of the above (required)
#   LOCAL_SLURM_CPUS       CPUs the node offers (default: nproc)
#   LOCAL_SLURM_CTLD_PORT  slurmctld port (default 16817; not the stock 6817, so a real
#                          Slurm on the machine is left alone)
#   LOCAL_SLURM_SLURMD_PORT  slurmd port (default 16818)
#   LOCAL_SLURM_TIMEOUT    seconds to wait for the node to come up (default 60)
set -euo pipefail

command="${1:-}"
DIR="${LOCAL_SLURM_DIR:?set LOCAL_SLURM_DIR to the directory for the cluster config and state}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
CONF="$DIR/slurm.conf"
NODE="$(hostname -s)"
DAEMONS=(munged slurmctld slurmd)

export SLURM_CONF="$CONF"

die() { echo "local-cluster: $*" >&2; exit 1; }

pid_alive() { [[ -f "$DIR/$1.pid" ]] && kill -0 "$(cat "$DIR/$1.pid")" 2> /dev/null; }

write_config() {
    # nproc obeys OMP_NUM_THREADS, which says nothing about the machine: ignore it here.
    local cpus="${LOCAL_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
    mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/log"
    # Users submit jobs too, so the socket must be reachable; only the key stays private.
    chmod 0755 "$DIR" "$DIR/munge"
    if [[ ! -f "$DIR/munge/munge.key" ]]; then
        # munged refuses a key that others can read.
        (umask 077 && dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none)
    fi
    cat > "$CONF" << EOF
# Written by launch/slurm/local-cluster.sh: one node, everything under $DIR.
ClusterName=onerec-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=${LOCAL_SLURM_CTLD_PORT:-16817}
SlurmdPort=${LOCAL_SLURM_SLURMD_PORT:-16818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
# The daemons' own pid files; start/stop use the ones this script writes ($DIR/<daemon>.pid).
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$DIR/spool/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups and no systemd in a container: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
# Trust the CPU count below even where the hardware reports another.
SlurmdParameters=config_overrides
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

# start_daemon NAME COMMAND...: run a daemon in the foreground of a background job, its
# output in log/NAME.out, and record the pid we started (our own pid files, never theirs).
start_daemon() {
    local name="$1"
    shift
    if pid_alive "$name"; then
        echo "local-cluster: $name already running (pid $(cat "$DIR/$name.pid"))"
        return
    fi
    setsid "$@" >> "$DIR/log/$name.out" 2>&1 < /dev/null &
    echo $! > "$DIR/$name.pid"
    sleep 0.5
    pid_alive "$name" || die "$name exited at once; see $DIR/log/$name.out:
$(tail -n 20 "$DIR/log/$name.out")"
}

wait_for() {  # wait_for DESCRIPTION COMMAND...
    local what="$1" deadline=$((SECONDS + ${LOCAL_SLURM_TIMEOUT:-60}))
    shift
    until "$@" > /dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out waiting for $what; logs in $DIR/log"
        sleep 0.5
    done
}

node_ready() { sinfo -h -n "$NODE" -o %t | grep -Eq '^(idle|mix|alloc)'; }

start() {
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" > /dev/null || die "$tool not found: install the Debian packages slurm-wlm and munge"
    done
    [[ "$(id -u)" == "0" ]] || die "must run as root (slurmd launches job steps as the submitting user)"
    write_config
    start_daemon munged munged --foreground --force \
        --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed" \
        --log-file="$DIR/log/munged.log"
    wait_for "munged's socket" test -S "$DIR/munge/munge.socket"
    # -i: ignore state left by an earlier cluster in this directory.
    start_daemon slurmctld slurmctld -D -i -f "$CONF"
    wait_for "slurmctld" scontrol ping
    start_daemon slurmd slurmd -D -f "$CONF" -N "$NODE"
    wait_for "node $NODE to become idle" node_ready
    echo "local-cluster: up; export SLURM_CONF=$CONF"
}

stop() {
    local name pid
    # Reverse order: slurmd first, munged last.
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        name="${DAEMONS[i]}"
        [[ -f "$DIR/$name.pid" ]] || continue
        pid="$(cat "$DIR/$name.pid")"
        if kill -0 "$pid" 2> /dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 1 40); do
                kill -0 "$pid" 2> /dev/null || break
                sleep 0.25
            done
            kill -0 "$pid" 2> /dev/null && kill -KILL "$pid"
        fi
        rm -f "$DIR/$name.pid"
        echo "local-cluster: stopped $name (pid $pid)"
    done
}

status() {
    local name rc=0
    for name in "${DAEMONS[@]}"; do
        if pid_alive "$name"; then
            echo "$name: running (pid $(cat "$DIR/$name.pid"))"
        else
            echo "$name: not running"
            rc=1
        fi
    done
    if ((rc == 0)); then
        sinfo
    fi
    return $rc
}

case "$command" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: LOCAL_SLURM_DIR=DIR $0 start|stop|status" ;;
esac
