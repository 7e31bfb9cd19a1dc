#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine for the tests: munged, slurmctld and slurmd
# with their configuration, state and logs under DIR. Needs root and Debian's slurm-wlm and munge.
#
#   bash tests/slurm/start_cluster.sh DIR     then: export SLURM_CONF=DIR/slurm.conf
#   bash tests/slurm/start_cluster.sh --stop DIR
set -euo pipefail

if [[ ${1:-} == --stop ]]; then
  dir=$2
  for daemon in slurmd slurmctld; do
    [[ -f "$dir/$daemon.pid" ]] && kill "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
  done
  exit 0
fi

dir=$(realpath -m "$1")
mkdir -p "$dir/state" "$dir/spool"
host=$(hostname -s)
node_line=$(slurmd -C | head -n 1 | sed 's/ UpTime=.*//')

cat >"$dir/slurm.conf" <<CONF
ClusterName=rsicdtest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

if ! pgrep -x munged >/dev/null; then
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
  runuser -u munge -- /usr/sbin/munged
fi

export SLURM_CONF=$dir/slurm.conf
slurmctld -i -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"

for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
    echo "SLURM is up: export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "SLURM did not come up within 60 s; logs: $dir/slurmctld.log $dir/slurmd.log" >&2
exit 1
