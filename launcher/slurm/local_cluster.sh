#!/usr/bin/env bash
# A one-node Slurm on this machine (munged + slurmctld + slurmd), to try and test `ernie-tiny-ds submit slurm`.
#   launcher/slurm/local_cluster.sh start STATE_DIR   install if missing (Debian, root), start, wait until usable;
#                                                     prints the line to eval: export SLURM_CONF=STATE_DIR/slurm.conf
#   launcher/slurm/local_cluster.sh stop STATE_DIR    stop the daemons this script started
#   launcher/slurm/local_cluster.sh install           only install slurm-wlm and munge if missing (CI does this)
# Everything (config, munge key and socket, spool, logs) lives in STATE_DIR, so a system Slurm is left alone.
# Made for containers: no cgroups (proctrack/linuxproc, task/none), root runs the daemons and the jobs.
#   SLURMCTLD_PORT / SLURMD_PORT   ports (default 6817 / 6818)
set -euo pipefail

usage() { echo "usage: $0 start|stop STATE_DIR, or $0 install" >&2; exit 2; }

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return
  fi
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"  # non-interactive: fail rather than wait for a password
  if ! command -v apt-get >/dev/null || { [ -n "$sudo" ] && ! sudo -n true 2>/dev/null; }; then
    echo "error: Slurm is not installed; install slurm-wlm and munge (Debian: apt-get install slurm-wlm munge)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq >/dev/null
  $sudo apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

if [ "${1:-}" = install ] && [ $# -eq 1 ]; then
  install_if_missing
  exit 0
fi
[ $# -eq 2 ] || usage
action=$1
mkdir -p "$2"
state=$(cd "$2" && pwd)
conf=$state/slurm.conf

write_config() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$state/ctld" "$state/spool" "$state/munge"
  cat >"$conf" <<EOF
# written by launcher/slurm/local_cluster.sh: a one-node cluster for trying ernie-tiny-ds submit
ClusterName=ernie-local
SlurmctldHost=$host
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$state/munge/munge.socket,cred_expire=10
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
# a container: no cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# look at pending jobs (a requeued one) every few seconds, not every minute
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=30
# finished jobs stay visible to scontrol for 10 minutes (there is no accounting database)
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  local key=$state/munge/munge.key
  if [ ! -s "$key" ]; then
    (umask 077 && dd if=/dev/urandom of="$key" bs=1024 count=1 status=none)
  fi
  if [ -S "$state/munge/munge.socket" ] && munge -s "$state/munge/munge.socket" -n </dev/null >/dev/null 2>&1; then
    return
  fi
  # --force: the key and socket folder belong to root, which munged otherwise refuses
  munged --force --key-file="$key" --socket="$state/munge/munge.socket" --pid-file="$state/munge/munged.pid" \
    --log-file="$state/munge/munged.log" --seed-file="$state/munge/munged.seed"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_until_usable() {
  local deadline=$((SECONDS + 90)) host
  host=$(hostname -s)
  while [ $SECONDS -lt $deadline ]; do
    if state_line=$(SLURM_CONF=$conf sinfo -h -n "$host" -o '%t' 2>/dev/null) && [[ $state_line =~ ^(idle|mix|alloc) ]]; then
      return 0
    fi
    # a node left down by an earlier unclean stop comes back once told so
    SLURM_CONF=$conf scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "error: Slurm did not become usable within 90 s; logs: $state/slurmctld.log $state/slurmd.log" >&2
  return 1
}

stop_pidfile() {
  local pidfile=$1 pid deadline
  running "$pidfile" || return 0
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
}

case $action in
  start)
    install_if_missing
    write_config
    start_munge
    running "$state/slurmctld.pid" || SLURM_CONF=$conf slurmctld -f "$conf"
    running "$state/slurmd.pid" || SLURM_CONF=$conf slurmd -f "$conf"
    wait_until_usable
    printf 'export SLURM_CONF=%q\n' "$conf"
    ;;
  stop)
    if running "$state/slurmctld.pid"; then
      # end this cluster's jobs first, so no training outlives the daemons that track it
      SLURM_CONF=$conf scancel --partition=debug >/dev/null 2>&1 || true
      deadline=$((SECONDS + 60))
      while [ -n "$(SLURM_CONF=$conf squeue --noheader 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do sleep 1; done
    fi
    stop_pidfile "$state/slurmd.pid"
    stop_pidfile "$state/slurmctld.pid"
    stop_pidfile "$state/munge/munged.pid"
    ;;
  *) usage ;;
esac
