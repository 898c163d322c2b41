#!/usr/bin/env bash
# A real single-node Slurm on this machine, reached on 127.0.0.1 only: for areal's Slurm tests and for
# trying `launcher.type=slurm` without a cluster.
#
#   bash scripts/slurm_local.sh up       # munged + slurmctld + slurmd; returns once the node is idle
#   bash scripts/slurm_local.sh status   # sinfo, and the daemons' pids
#   bash scripts/slurm_local.sh down     # stops the daemons this script started
#
# Needs root (slurmd starts each job as its user) and Debian/Ubuntu's slurm-wlm (`up` installs it with
# apt-get when missing). The node claims AREAL_SLURM_CPUS CPUs (default 8, whatever the machine has:
# SlurmdParameters=config_overrides) so a small box can run a controller and several 1-CPU roles side
# by side. Slurm clients read /etc/slurm/slurm.conf; this script writes it only when it is absent or was
# written by this script, never over a real cluster's.
set -euo pipefail

STATE=${AREAL_SLURM_STATE:-/tmp/areal-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by areal scripts/slurm_local.sh"
NODE=$(hostname -s)
CPUS=${AREAL_SLURM_CPUS:-8}

die() { echo "slurm_local: $*" >&2; exit 1; }

installed() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
              && command -v sbatch >/dev/null; }

running() { [[ -f $STATE/$1.pid ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1; }

install_slurm() {
    installed && return 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "slurm_local: slurm-wlm is not installed; installing it with apt-get" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm >/dev/null || die "apt-get install slurm-wlm failed"
        installed || die "slurm-wlm installed but slurmctld/slurmd/munged/sbatch are still not on PATH"
    else
        die "Slurm is not installed: apt-get install slurm-wlm (as root)"
    fi
}

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script (a real cluster's?); not touching it"
    fi
    mkdir -p "$(dirname "$CONF")" "$STATE/ctld" "$STATE/d"
    cat > "$CONF" <<EOF
$MARK; state, logs and pids under $STATE
ClusterName=areal-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (default 120): short here, nodes need no cleanup
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# no cgroups: processes are tracked by parentage, tasks are not confined
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# memory is scheduled as on most clusters; a job that asks none gets 200 MB per CPU (not all the node's), so
# several jobs fit side by side. Nothing enforces it here (no cgroups).
DefMemPerCPU=200
SchedulerType=sched/backfill
# look at pending jobs every 2 s (default 60): a requeued job restarts as soon as it may
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
# finished jobs stay visible to scontrol for 5 minutes (no accounting database here)
MinJobAge=300
KillWait=10
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if munge -n </dev/null >/dev/null 2>&1; then return 0; fi  # a munged already answers
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    if id munge >/dev/null 2>&1; then
        chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
        runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
    else
        /usr/sbin/munged --force || die "munged did not start"
    fi
    cp /run/munge/munged.pid "$STATE/munged.pid"  # ours to stop on `down` (one that was already running is not)
    for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "munged started but does not answer"
}

up() {
    [[ $(id -u) -eq 0 ]] || die "needs root (slurmd starts jobs as their users); run it with sudo"
    install_slurm
    if running slurmctld && running slurmd && [[ $(node_state) =~ ^(idle|mix|alloc) ]]; then
        echo "slurm_local: already up (node $NODE on 127.0.0.1)"
        return 0
    fi
    mkdir -p "$STATE"
    chmod 0755 "$STATE"  # jobs of other users read nothing here, but slurmd's spool must be reachable
    write_conf
    start_munge
    # a fresh start forgets earlier jobs (-c): this cluster lives for a test session
    running slurmctld || slurmctld -c || die "slurmctld did not start (see $STATE/slurmctld.log)"
    running slurmd || slurmd -N "$NODE" || die "slurmd did not start (see $STATE/slurmd.log)"
    for _ in $(seq 100); do
        state=$(node_state)
        if [[ $state =~ ^(idle|mix|alloc) ]]; then
            echo "slurm_local: up (node $NODE, $CPUS CPUs, on 127.0.0.1; state, logs and pids in $STATE)"
            return 0
        fi
        if [[ $state =~ ^(down|drain|fail) ]]; then scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true; fi
        sleep 0.2
    done
    die "node $NODE is not idle after 20 s (state: ${state:-no answer}); see $STATE/slurmctld.log and $STATE/slurmd.log"
}

down() {
    for daemon in slurmd slurmctld munged; do
        if running "$daemon"; then
            pid=$(cat "$STATE/$daemon.pid")
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$STATE/$daemon.pid"
    done
    echo "slurm_local: down"
}

status() {
    for daemon in munged slurmctld slurmd; do
        if running "$daemon"; then echo "$daemon: running (pid $(cat "$STATE/$daemon.pid"))"; else echo "$daemon: not running"; fi
    done
    installed && sinfo 2>&1 || true
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: bash scripts/slurm_local.sh up|down|status" >&2; exit 2 ;;
esac
