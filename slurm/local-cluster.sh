#!/usr/bin/env bash
# A throw-away one-node Slurm cluster for tests and demos.
#
#   slurm/local-cluster.sh start    install (if needed), configure and start munged, slurmctld, slurmd
#   slurm/local-cluster.sh stop     stop the daemons this script started (by their pid files)
#   slurm/local-cluster.sh status   exit 0 when all daemons run and the node answers, 3 otherwise
#   slurm/local-cluster.sh env      print `export SLURM_CONF=...`; use as: eval "$(slurm/local-cluster.sh env)"
#
# Needs root on Debian/Ubuntu (apt-get) without systemd; everything else exits 77 ("skip") with the
# reason on stderr, so test suites can skip.  Exit codes: 0 ok, 1 failure, 2 usage, 3 not running
# (status only), 77 this machine cannot run the cluster.
#
# Environment:
#   TASKFARM_SLURM_DIR      state dir: slurm.conf, pid files, logs, spool (default /tmp/taskfarm-slurm)
#   TASKFARM_SLURM_TIMEOUT  seconds to wait for each daemon and for the node to go idle (default 60)
#   TASKFARM_SLURM_CPUS     CPUs the node advertises, whatever the hardware has (default 8)
#   TASKFARM_SLURM_PORT     slurmctld port; slurmd uses the next one (default 6817)
#
# The settings follow what works on a 2-core Debian 12 container run as root: no cgroups
# (proctrack/linuxproc, task/none), no accounting, consumable CPUs, slurmd allowed to
# advertise more CPUs than it has, no batch scheduling delay, and a short KillWait.
set -euo pipefail

readonly EXIT_OK=0
readonly EXIT_FAIL=1
readonly EXIT_USAGE=2
readonly EXIT_NOT_RUNNING=3
readonly EXIT_SKIP=77

readonly STATE_DIR="${TASKFARM_SLURM_DIR:-/tmp/taskfarm-slurm}"
readonly TIMEOUT="${TASKFARM_SLURM_TIMEOUT:-60}"
readonly NODE_CPUS="${TASKFARM_SLURM_CPUS:-8}"
readonly CTLD_PORT="${TASKFARM_SLURM_PORT:-6817}"
readonly SLURMD_PORT=$((CTLD_PORT + 1))
readonly CONF="$STATE_DIR/slurm.conf"
readonly PACKAGES=(slurmctld slurmd slurm-client munge)
readonly MUNGE_KEY=/etc/munge/munge.key
readonly MUNGE_RUN=/run/munge
readonly POLL=0.1          # seconds between polls
readonly KILL_WAIT=5       # Slurm's KillWait: SIGTERM -> SIGKILL on timeout/scancel
readonly MIN_JOB_AGE=30    # seconds a finished job stays visible to squeue/scontrol
readonly STOP_GRACE=10     # seconds between SIGTERM and SIGKILL in `stop`

export SLURM_CONF="$CONF"

say() { printf 'local-cluster: %s\n' "$*" >&2; }
die() { say "error: $*"; exit "$EXIT_FAIL"; }
skip() { say "skip: $*"; exit "$EXIT_SKIP"; }

now() { printf '%s' "${EPOCHREALTIME/,/.}"; }
elapsed_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

node_name() { hostname -s; }

# ---- processes ---------------------------------------------------------------------------------

# pid_alive PID NAME: the process exists, is not a zombie, and its command name is NAME.
pid_alive() {
    local pid=$1 name=$2 stat comm
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    # state is the first field after the ")" that closes the command name
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name" ]]
}

pid_from() {
    if [[ -s $1 ]]; then tr -dc '0-9' <"$1"; fi
}

# daemon_alive NAME: the daemon whose pid file is $STATE_DIR/NAME.pid runs.
daemon_alive() {
    local pid
    pid=$(pid_from "$STATE_DIR/$1.pid")
    [[ -n $pid ]] && pid_alive "$pid" "$1"
}

# wait_for DESCRIPTION COMMAND...: poll COMMAND until it succeeds or TIMEOUT passes.
wait_for() {
    local what=$1 deadline
    shift
    deadline=$(awk -v t="$(now)" -v d="$TIMEOUT" 'BEGIN { printf "%.3f", t + d }')
    until "$@"; do
        if awk -v t="$(now)" -v d="$deadline" 'BEGIN { exit !(t > d) }'; then
            say "timed out after ${TIMEOUT}s waiting for $what"
            return 1
        fi
        sleep "$POLL"
    done
}

show_logs() {
    local log
    for log in "$STATE_DIR/slurmctld.log" "$STATE_DIR/slurmd.log"; do
        [[ -f $log ]] || continue
        say "---- last lines of $log"
        tail -n 20 "$log" >&2 || true
    done
}

# ---- preconditions and installation ------------------------------------------------------------

check_machine() {
    [[ $(uname -s) == Linux ]] || skip "needs Linux, this is $(uname -s)"
    [[ $EUID -eq 0 ]] || skip "needs root (starts munged and the Slurm daemons), running as uid $EUID"
}

# packages_missing: print the names of the needed packages that are not installed, space-separated.
packages_missing() {
    local pkg missing=()
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$pkg")
    done
    printf '%s' "${missing[*]}"
}

install_packages() {
    local missing log="$STATE_DIR/apt.log"
    local -a names apt=(apt-get install -y --no-install-recommends -o Dpkg::Use-Pty=0
                        -o DPkg::Lock::Timeout=120)
    missing=$(packages_missing)
    [[ -z $missing ]] && return 0
    command -v apt-get >/dev/null || skip "packages missing ($missing) and no apt-get to install them"
    read -ra names <<<"$missing"
    say "installing $missing"
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" "${names[@]}" >"$log" 2>&1; then
        say "install failed, running apt-get update and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get update >>"$log" 2>&1 ||
            { tail -n 20 "$log" >&2; die "apt-get update failed (log: $log)"; }
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" "${names[@]}" >>"$log" 2>&1 ||
            { tail -n 20 "$log" >&2; die "apt-get install failed (log: $log)"; }
    fi
    missing=$(packages_missing)
    [[ -z $missing ]] || die "still missing after install: $missing"
}

# ---- configuration -----------------------------------------------------------------------------

write_config() {
    local node
    node=$(node_name)
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/slurmd"
    cat >"$CONF.tmp" <<EOF
# Written by slurm/local-cluster.sh: a one-node test cluster. Edits are overwritten on start.
ClusterName=taskfarm
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in containers: track processes by parentage, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# no slurmdbd
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# let the node advertise more CPUs than the hardware has
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
KillWait=$KILL_WAIT
MinJobAge=$MIN_JOB_AGE
InactiveLimit=0
SlurmdTimeout=300
NodeName=$node NodeAddr=127.0.0.1 CPUs=$NODE_CPUS State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE DefaultTime=01:00:00 State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

# ---- daemons -----------------------------------------------------------------------------------

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
    if daemon_alive munged; then return 0; fi
    if munge_works; then
        say "a munged not started by this script is already running; using it"
        return 0
    fi
    install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge /etc/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        say "creating $MUNGE_KEY"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    rm -f "$MUNGE_RUN/munged.pid"
    runuser -u munge -- /usr/sbin/munged --force --pid-file="$MUNGE_RUN/munged.pid" ||
        die "munged failed to start (see /var/log/munge/munged.log)"
    wait_for "munged's pid file" test -s "$MUNGE_RUN/munged.pid" || die "munged did not start"
    cp "$MUNGE_RUN/munged.pid" "$STATE_DIR/munged.pid"
    wait_for "munge to answer" munge_works || die "munged does not answer"
}

# start_slurm_daemon NAME ARGS...: start /usr/sbin/NAME unless its pid file names a live process.
start_slurm_daemon() {
    local name=$1
    shift
    if daemon_alive "$name"; then return 0; fi
    rm -f "$STATE_DIR/$name.pid"
    "/usr/sbin/$name" -f "$CONF" "$@" || { show_logs; die "$name failed to start"; }
    wait_for "$name's pid file" daemon_alive "$name" || { show_logs; die "$name did not start"; }
}

node_state() { sinfo -h -n "$(node_name)" -o %T 2>/dev/null || true; }
# node_ready: the node answers and takes jobs (idle, or busy with some: no '*' = not responding,
# no down/drain)
node_ready() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }
ctld_answers() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

wait_node_ready() {
    local state
    wait_for "slurmctld to answer" ctld_answers || { show_logs; die "slurmctld does not answer"; }
    # a node left DOWN/DRAINED by an earlier run is resumed once
    state=$(node_state)
    if [[ $state == down* || $state == drain* ]]; then
        scontrol update nodename="$(node_name)" state=resume 2>/dev/null || true
    fi
    wait_for "node $(node_name) to be idle" node_ready ||
        { show_logs; die "node $(node_name) is not ready: $(node_state)"; }
}

all_alive() { daemon_alive slurmctld && daemon_alive slurmd && munge_works; }

cmd_start() {
    local t0
    t0=$(now)
    check_machine
    mkdir -p "$STATE_DIR"
    if all_alive && node_ready; then
        say "already running (state dir $STATE_DIR)"
        return "$EXIT_OK"
    fi
    install_packages
    command -v runuser >/dev/null || skip "no runuser to start munged as the munge user"
    daemon_alive slurmctld || daemon_alive slurmd || write_config
    start_munged
    start_slurm_daemon slurmctld
    start_slurm_daemon slurmd -N "$(node_name)"
    wait_node_ready
    say "up in $(elapsed_since "$t0") s: node $(node_name), $NODE_CPUS CPUs, SLURM_CONF=$CONF"
}

stop_pid_file() {
    local name=$1 file="$STATE_DIR/$1.pid" pid deadline
    pid=$(pid_from "$file")
    if [[ -n $pid ]] && pid_alive "$pid" "$name"; then
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + STOP_GRACE))
        while pid_alive "$pid" "$name" && ((SECONDS < deadline)); do sleep "$POLL"; done
        if pid_alive "$pid" "$name"; then
            say "$name ($pid) ignored SIGTERM for ${STOP_GRACE}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        say "stopped $name ($pid)"
    fi
    rm -f "$file"
}

cmd_stop() {
    check_machine
    stop_pid_file slurmd
    stop_pid_file slurmctld
    stop_pid_file munged
}

cmd_status() {
    local name ok=1
    for name in munged slurmctld slurmd; do
        if daemon_alive "$name"; then
            printf '%-10s running (pid %s)\n' "$name" "$(pid_from "$STATE_DIR/$name.pid")"
        elif [[ $name == munged ]] && munge_works; then
            printf '%-10s running (not started by this script)\n' "$name"
        else
            printf '%-10s not running\n' "$name"
            ok=0
        fi
    done
    if ((ok)) && [[ -f $CONF ]] && command -v sinfo >/dev/null; then
        sinfo || ok=0
    fi
    ((ok)) && return "$EXIT_OK"
    return "$EXIT_NOT_RUNNING"
}

cmd_env() { printf 'export SLURM_CONF=%q\n' "$CONF"; }

main() {
    case "${1:-}" in
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        env) cmd_env ;;
        *)
            say "usage: $0 start|stop|status|env"
            exit "$EXIT_USAGE"
            ;;
    esac
}

main "$@"
