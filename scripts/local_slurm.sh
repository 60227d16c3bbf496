#!/bin/bash
# A real one-node Slurm on this machine, to try the sbatch scripts and for `make test-slurm`.
#
#   scripts/local_slurm.sh up       install slurm + munge (Debian, apt) if missing, start them
#   scripts/local_slurm.sh status   what runs, and sinfo
#   scripts/local_slurm.sh down     stop the daemons that `up` started (by their pid files)
#   eval "$(scripts/local_slurm.sh env)"   point sbatch/squeue/... at this cluster
#
# Everything lives in $LOCAL_SLURM_DIR (default /tmp/swav-local-slurm): slurm.conf, a private
# munge key and socket, state, logs and pid files; nothing under /etc is touched. CPU only, one
# node with $LOCAL_SLURM_CPUS task slots (default 4, more than the cores is allowed), no cgroups
# (proctrack/linuxproc, task/none), no systemd: munged, slurmctld and slurmd are started
# directly. Needs root (apt-get, and SlurmUser=root).
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/swav-local-slurm}
CONF=$DIR/slurm.conf
CPUS=${LOCAL_SLURM_CPUS:-4}
PORT=${LOCAL_SLURM_PORT:-6817}  # slurmctld; slurmd uses PORT+1
NODE=$(hostname -s)
export SLURM_CONF=$CONF

die() {
    echo "local_slurm: error: $*" >&2
    exit 1
}

say() {
    echo "local_slurm: $*"
}

alive() {  # alive PIDFILE: the process named in the pid file runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_missing() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null ||
        die "missing ${missing[*]} and no apt-get to install them (Debian/Ubuntu packages)"
    say "installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >"$DIR/apt.log" 2>&1 || { tail -n 20 "$DIR/apt.log" >&2; die "apt-get install failed"; }
}

write_config() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<EOF
# written by scripts/local_slurm.sh: one CPU node, no cgroups, no accounting
ClusterName=swavlocal
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$DIR/munge/run/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=3600
MailProg=/bin/true
SchedulerParameters=sched_interval=2
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE OverSubscribe=NO State=UP
EOF
}

start_munge() {
    local m=$DIR/munge
    alive "$m/run/munged.pid" && return 0
    mkdir -p "$m/key" "$m/run"
    chmod 700 "$m/key"
    chmod 755 "$DIR" "$m" "$m/run"  # munged wants the socket's folder open to all
    if [ ! -s "$m/key/munge.key" ]; then
        dd if=/dev/urandom of="$m/key/munge.key" bs=1024 count=1 status=none
        chmod 400 "$m/key/munge.key"
    fi
    munged --socket="$m/run/munge.socket" --key-file="$m/key/munge.key" \
        --pid-file="$m/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$m/key/munged.seed" || die "munged did not start: see $DIR/log/munged.log"
}

wait_idle() {
    local i state=
    for i in $(seq 1 60); do
        state=$(sinfo -h -N -o %T 2>/dev/null | head -n1 || true)
        case "$state" in
            idle | mixed | allocated) say "node $NODE is $state"; return 0 ;;
            down* | drain* | unknown*)
                if [ "$i" -eq 10 ]; then scontrol update nodename="$NODE" state=resume || true; fi ;;
        esac
        sleep 1
    done
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "the node did not become idle in 60 s (state: ${state:-no answer}); logs above"
}

up() {
    [ "$(id -u)" -eq 0 ] || die "needs root (apt-get, munge and SlurmUser=root): run it as root"
    mkdir -p "$DIR"
    install_missing
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
        say "already up"
        wait_idle
        return 0
    fi
    write_config
    start_munge
    alive "$DIR/slurmctld.pid" || slurmctld -c -f "$CONF" ||
        die "slurmctld did not start: see $DIR/log/slurmctld.log"
    alive "$DIR/slurmd.pid" || slurmd -f "$CONF" || die "slurmd did not start: see $DIR/log/slurmd.log"
    wait_idle
    say "up: export SLURM_CONF=$CONF (or eval \"\$($0 env)\")"
}

stop_pid() {  # stop_pid NAME PIDFILE
    if alive "$2"; then
        local pid
        pid=$(cat "$2")
        kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        say "stopped $1 (pid $pid)"
    fi
    rm -f "$2"
}

down() {
    stop_pid slurmd "$DIR/slurmd.pid"
    stop_pid slurmctld "$DIR/slurmctld.pid"
    stop_pid munged "$DIR/munge/run/munged.pid"
}

status() {
    local name pidfile rc=0
    for name in munged slurmctld slurmd; do
        case $name in
            munged) pidfile=$DIR/munge/run/munged.pid ;;
            *) pidfile=$DIR/$name.pid ;;
        esac
        if alive "$pidfile"; then say "$name running (pid $(cat "$pidfile"))"; else say "$name not running"; rc=3; fi
    done
    [ $rc -eq 0 ] && sinfo
    return $rc
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
