#!/usr/bin/env bash
# A one-node SLURM cluster in a scratch folder, for the `slurm` tests and for trying nfvi's SLURM sweeps on a laptop.
#
#   scripts/slurm_local.sh up   [DIR]    # install slurm-wlm and munge if missing (Debian/Ubuntu, root), start
#                                        # munged, slurmctld and slurmd with their config and state in DIR, wait
#                                        # until the node is idle, print the `export SLURM_CONF=...` to use it
#   scripts/slurm_local.sh down [DIR]    # cancel its jobs, stop exactly the daemons `up` started (pid files in
#                                        # DIR/run), keep DIR (logs, jobcomp.txt)
#   scripts/slurm_local.sh env  [DIR]    # print the export line again
#
# DIR: the argument, else $NFVI_SLURM_DIR, else ${TMPDIR:-/tmp}/nfvi-slurm. Needs Linux and root (the daemons and
# the package install). Nothing outside DIR is configured: munged gets its own key and socket in DIR (a munged
# of the machine, if any, is left alone); ports $NFVI_SLURM_PORT and +1 (default 6817, 6818: change them if the
# machine runs a SLURM of its own). No accounting database: `scontrol show job <id>` (for 5 minutes after the
# end, MinJobAge) and DIR/log/jobcomp.txt (one line per finished job: JobState, ExitCode) record how jobs ended.
set -euo pipefail

usage() { echo "usage: $0 up|down|env [DIR]  (DIR defaults to \$NFVI_SLURM_DIR or \${TMPDIR:-/tmp}/nfvi-slurm)" >&2; }
die() { echo "slurm_local.sh: error: $*" >&2; exit 1; }

[ $# -ge 1 ] || { usage; exit 2; }
action=$1
DIR=${2:-${NFVI_SLURM_DIR:-${TMPDIR:-/tmp}/nfvi-slurm}}
PORT=${NFVI_SLURM_PORT:-6817}
CONF=$DIR/etc/slurm.conf

export_line() { echo "export SLURM_CONF=$CONF"; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null &&
    command -v mungekey >/dev/null && command -v sinfo >/dev/null && return 0
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get to install them"
  echo "slurm_local.sh: installing slurm-wlm and munge (apt-get)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

# pid of the daemon whose pid file is DIR/run/$1.pid, if it runs
running_pid() {
  local file=$DIR/run/$1.pid pid
  [ -s "$file" ] || return 1
  pid=$(cat "$file")
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

write_config() {
  local host cpus mem_mb
  host=$(hostname -s)
  cpus=$(nproc)
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$DIR"/{etc,state,spool,log,run,munge}
  chmod 755 "$DIR" "$DIR"/{etc,state,spool,log,run}
  cat >"$CONF" <<EOF
# written by nfvi's scripts/slurm_local.sh: a one-node cluster whose state lives in $DIR
ClusterName=nfvi-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
# its own munged; cred_expire: a requeued job may start again after 10 s (SLURM's default is 120 s)
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# look at pending jobs every 5 s (default 30-60 s): a requeued job starts again soon after cred_expire
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
# SIGTERM, then SIGKILL 10 s later (scancel, requeue, time limit): time for nfvi train to save its checkpoint
KillWait=10
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  running_pid munged >/dev/null && return 0
  chown munge:munge "$DIR/munge" && chmod 711 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    runuser -u munge -- mungekey --create --keyfile="$DIR/munge/munge.key"
  fi
  # the pid file is written by munged (as munge): keep it in munge's folder, link it from run/
  runuser -u munge -- munged --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
  ln -sf "$DIR/munge/munged.pid" "$DIR/run/munged.pid"
}

wait_idle() {
  local state=""
  for _ in $(seq 1 60); do
    state=$(SLURM_CONF=$CONF sinfo --noheader --Node --format=%T 2>/dev/null | head -1 || true)
    case $state in idle | mixed | allocated) return 0 ;; esac
    sleep 1
  done
  die "the node is not idle after 60 s (state '${state}'); see $DIR/log/slurmctld.log and slurmd.log"
}

up() {
  [ "$(uname -s)" = Linux ] || die "needs Linux"
  [ "$(id -u)" = 0 ] || die "needs root (to install packages and run the SLURM daemons)"
  install_packages
  if [ ! -s "$CONF" ]; then write_config; fi
  start_munge
  if ! running_pid slurmctld >/dev/null; then
    local fresh=()
    [ -e "$DIR/state/node_state" ] || fresh=(-i)  # first start: no saved state to recover
    SLURM_CONF=$CONF slurmctld "${fresh[@]}"
  fi
  running_pid slurmd >/dev/null || SLURM_CONF=$CONF slurmd
  wait_idle
  echo "slurm_local.sh: one-node cluster up in $DIR; use it with:" >&2
  export_line
}

stop_daemon() {
  local name=$1 pid
  pid=$(running_pid "$name") || return 0
  kill "$pid"
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -9 "$pid" 2>/dev/null || true
}

down() {
  if running_pid slurmctld >/dev/null; then
    # its jobs first (their processes belong to slurmstepd, not to the daemons stopped below)
    SLURM_CONF=$CONF scancel --quiet --partition=local 2>/dev/null || true
    for _ in $(seq 1 30); do
      [ -z "$(SLURM_CONF=$CONF squeue --noheader --states=RUNNING,COMPLETING 2>/dev/null)" ] && break
      sleep 1
    done
  fi
  stop_daemon slurmd
  stop_daemon slurmctld
  stop_daemon munged
  echo "slurm_local.sh: stopped the cluster of $DIR (logs kept in $DIR/log)" >&2
}

case $action in
  up) up ;;
  down) down ;;
  env) export_line ;;
  *) usage; exit 2 ;;
esac
