#!/usr/bin/env bash
# Start / stop a throwaway one-node SLURM cluster on this machine (Debian
# slurm-wlm packages), so tests and CI can submit real sbatch/srun jobs.
#
#   scripts/ci/local_slurm.sh start  [STATE_DIR]   # default /tmp/local-slurm
#   scripts/ci/local_slurm.sh status [STATE_DIR]
#   scripts/ci/local_slurm.sh stop   [STATE_DIR]
#
# After `start`, either `source STATE_DIR/env.sh` or eval the printed
# `export SLURM_CONF=...` line.  (When /etc/slurm/slurm.conf does not exist we
# also symlink it to ours, so plain sbatch/scontrol work without SLURM_CONF.)
#
# Env: LOCAL_SLURM_NO_INSTALL=1  never apt-get install missing packages
#      LOCAL_SLURM_TIMEOUT=60    seconds to wait for the node to become idle
#      LOCAL_SLURM_CTLD_PORT / LOCAL_SLURM_SLURMD_PORT   (default 6817 / 6818)
#      LOCAL_SLURM_CRED_EXPIRE=5 requeue delay in s (Slurm rejects values < 5)
#
# Timing facts for tests (measured with Slurm 22.05, Debian 12):
#  * `scontrol requeue` -> job runs again after ~cred_expire+1 s (~6 s here).
#  * slurmctld checks time limits only every 30 s (hard-coded), so
#    `--signal=B:USR1@N` arrives when (N, N+30] s of the limit are left, and the
#    time-limit SIGTERM comes 0-30 s after the limit (SIGKILL KillWait=5 s later).
#    For an immediate signal use `scancel --batch --signal=USR1 JOBID`.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin   # daemons live in sbin, often not on a CI user's PATH

CMD=${1:-}
STATE_DIR=${2:-${LOCAL_SLURM_DIR:-/tmp/local-slurm}}
CONF=$STATE_DIR/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s 2>/dev/null || uname -n); NODE=${NODE%%.*}
NODE=${NODE:-localhost}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}
[[ -d $STATE_DIR ]] && STATE_DIR=$(cd "$STATE_DIR" && pwd) && CONF=$STATE_DIR/slurm.conf

die() { echo "local_slurm: $*" >&2; exit 1; }
log() { echo "local_slurm: $*" >&2; }
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
munge_ok() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

install_pkgs() {
  local need=0 b
  for b in slurmctld slurmd munged sbatch; do command -v "$b" >/dev/null || need=1; done
  ((need)) || return 0
  [[ ${LOCAL_SLURM_NO_INSTALL:-0} == 1 ]] && die "slurm/munge not installed and LOCAL_SLURM_NO_INSTALL=1"
  ((EUID == 0)) || die "slurm/munge not installed and not root (cannot apt-get install)"
  command -v apt-get >/dev/null || die "slurm/munge not installed and no apt-get on this machine"
  log "installing slurmctld slurmd slurm-client munge with apt-get"
  # Keep the packages' postinst from trying to start the services themselves.
  local rc_guard=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    rc_guard=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$rc_guard" && chmod +x "$rc_guard"
  fi
  local pkgs=(slurmctld slurmd slurm-client munge) ok=0
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$STATE_DIR/apt.log" 2>&1 ||
    { apt-get update -q >>"$STATE_DIR/apt.log" 2>&1 &&
      apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$STATE_DIR/apt.log" 2>&1; } || ok=$?
  [[ -n $rc_guard ]] && rm -f "$rc_guard"
  ((ok == 0)) || die "apt-get install failed (see $STATE_DIR/apt.log)"
}

start_munge() {
  munge_ok && return 0          # a system munged is already running: reuse it
  ((EUID == 0)) || die "munged is not running and we are not root to start it"
  if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  # munged refuses to run unless key and dirs are owned by it and not group/world writable.
  chown munge:munge /etc/munge /etc/munge/munge.key && chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  runuser -u munge -- munged --force
  for _ in $(seq 50); do munge_ok && { cp /run/munge/munged.pid "$STATE_DIR/munged.pid"; return 0; }; sleep 0.1; done
  die "munged did not come up (see /var/log/munge/munged.log)"
}

write_conf() {
  mkdir -p "$STATE_DIR"/{state,spool,log}
  rm -f "$STATE_DIR"/log/*.log                     # logs of this run only
  # Notes on the non-default values:
  #  * proctrack/linuxproc + task/none: no cgroups needed (containers/VMs).
  #  * CR_Core (not CR_Core_Memory): memory is not a consumable, so jobs never
  #    block on --mem; config_overrides keeps the node from draining if the
  #    detected hardware differs from what we declare.
  #  * AuthInfo cred_expire: a requeued job gets BeginTime = now + cred_expire
  #    (default 120 s!), so keep it short for fast requeue in tests.
  #  * sched_interval / bf_interval: how often pending jobs (e.g. a requeued
  #    job whose BeginTime just passed) are re-examined (defaults 60 s / 30 s).
  cat >"$CONF" <<EOF
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=${LOCAL_SLURM_CTLD_PORT:-6817}
SlurmdPort=${LOCAL_SLURM_SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=${LOCAL_SLURM_CRED_EXPIRE:-5}
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
SlurmdTimeout=10
SlurmctldTimeout=10
MessageTimeout=10
InactiveLimit=0
MinJobAge=5
KillWait=5
WaitTime=0
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  printf 'export SLURM_CONF=%s\n' "$CONF" >"$STATE_DIR/env.sh"
}

is_up() { pid_alive "$STATE_DIR/slurmctld.pid" && pid_alive "$STATE_DIR/slurmd.pid" &&
  SLURM_CONF=$CONF scontrol ping 2>/dev/null | grep -q UP; }

show_logs() {
  local f
  for f in "$STATE_DIR"/log/*.log; do [[ -f $f ]] && { echo "== $f" >&2; tail -n 30 "$f" >&2; }; done
}

do_start() {
  mkdir -p "$STATE_DIR"
  STATE_DIR=$(cd "$STATE_DIR" && pwd); CONF=$STATE_DIR/slurm.conf
  if [[ -f $CONF ]] && is_up; then
    log "already up ($STATE_DIR)"; echo "export SLURM_CONF=$CONF"; return 0
  fi
  ((EUID == 0)) || die "must run as root (daemons run with SlurmUser=root)"
  install_pkgs
  do_stop quiet                                   # clear leftovers from a half-started run
  local t0=$SECONDS
  start_munge
  write_conf
  export SLURM_CONF=$CONF
  # Make plain `sbatch` work without SLURM_CONF, but never clobber a real config.
  if [[ ! -e $ETC_CONF ]]; then mkdir -p /etc/slurm && ln -sfn "$CONF" "$ETC_CONF"; fi
  slurmctld -c -f "$CONF" || { show_logs; die "slurmctld failed to start"; }  # -c: fresh job state
  slurmd -f "$CONF" -N "$NODE" || { show_logs; die "slurmd failed to start"; }
  local state=""
  while ((SECONDS - t0 < TIMEOUT)); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    [[ $state == idle ]] && break
    sleep 0.5
  done
  if [[ $state != idle ]]; then
    show_logs; die "node $NODE not idle after ${TIMEOUT}s (state='$state')"
  fi
  log "up in $((SECONDS - t0))s: node $NODE, $(nproc) CPUs, partition debug ($STATE_DIR)"
  echo "export SLURM_CONF=$CONF"
}

stop_pid() {  # stop_pid PIDFILE NAME: TERM, then KILL after ~10 s
  local f=$1 pid
  pid_alive "$f" || { rm -f "$f"; return 0; }
  pid=$(cat "$f"); kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && { log "$2 ($pid) ignored SIGTERM, killing"; kill -9 "$pid" 2>/dev/null || true; }
  rm -f "$f"
}

do_stop() {
  [[ -d $STATE_DIR ]] || return 0
  # Cancel jobs first so no slurmstepd/job processes outlive the daemons.
  if [[ -f $CONF ]] && pid_alive "$STATE_DIR/slurmctld.pid"; then
    local jobs
    mapfile -t jobs < <(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)
    if ((${#jobs[@]})); then
      SLURM_CONF=$CONF scancel "${jobs[@]}" 2>/dev/null || true
      for _ in $(seq 30); do
        [[ -z $(SLURM_CONF=$CONF squeue -h -t R,CG -o %i 2>/dev/null) ]] && break; sleep 0.5
      done
    fi
  fi
  stop_pid "$STATE_DIR/slurmd.pid" slurmd
  stop_pid "$STATE_DIR/slurmctld.pid" slurmctld
  stop_pid "$STATE_DIR/munged.pid" munged        # only present if we started munged
  [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]] && rm -f "$ETC_CONF"
  [[ ${1:-} == quiet ]] || log "stopped ($STATE_DIR)"
}

do_status() {
  if ! { [[ -f $CONF ]] && is_up; }; then echo "down ($STATE_DIR)"; return 3; fi
  echo "up ($STATE_DIR)"; echo "export SLURM_CONF=$CONF"
  SLURM_CONF=$CONF sinfo; SLURM_CONF=$CONF squeue
}

case $CMD in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) echo "usage: $0 start|stop|status [STATE_DIR]" >&2; exit 2 ;;
esac
