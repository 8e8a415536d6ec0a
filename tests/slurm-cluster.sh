#!/usr/bin/env bash
# Starts a real two-node Slurm cluster (Debian's slurm-wlm and munge) for the Slurm executor's
# tests, private to this checkout — two slurmd daemons on this machine, nodes n1 and n2, so that
# a job can span two nodes (multi-node training): its configuration, state, logs and munge socket live in
# target/slurm, its daemons listen on 127.0.0.1 on their own ports, and they run as the user
# who runs this script. Tests find it through SLURM_CONF=target/slurm/slurm.conf. Running it
# again when the cluster answers changes nothing.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR="$ROOT/target/slurm"
export SLURM_CONF="$DIR/slurm.conf"
if [ -f "$SLURM_CONF" ] && scontrol ping 2>/dev/null | grep -q UP \
  && [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" = 2 ]; then
  exit 0
fi
for tool in munged slurmctld slurmd sbatch; do
  command -v "$tool" >/dev/null || PATH="$PATH:/usr/sbin"
  command -v "$tool" >/dev/null || { echo "tests/slurm-cluster.sh: $tool is missing (apt install slurm-wlm munge)" >&2; exit 1; }
done
# A cluster of an earlier start that no longer answers: stop what is left of it.
for pid_file in "$DIR"/run/*.pid; do
  [ -f "$pid_file" ] && kill "$(cat "$pid_file")" 2>/dev/null || true
done
sleep 0.5
rm -rf "$DIR/run" "$DIR/state" "$DIR/spool"
mkdir -p "$DIR/run" "$DIR/state" "$DIR/spool/n1" "$DIR/spool/n2" "$DIR/log"
chmod 700 "$DIR/run"
user=$(id -un)
if [ ! -f "$DIR/munge.key" ]; then
  (umask 077; head -c 1024 /dev/urandom > "$DIR/munge.key")
fi
force=()
[ "$(id -u)" = 0 ] && force=(--force)
munged "${force[@]}" --socket="$DIR/run/munge.sock" --key-file="$DIR/munge.key" \
  --pid-file="$DIR/run/munged.pid" --seed-file="$DIR/run/munged.seed" \
  --log-file="$DIR/log/munged.log"
cpus=$(nproc)
memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
cat > "$SLURM_CONF" <<CONF
ClusterName=pipe-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=16817
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
AuthInfo=socket=$DIR/run/munge.sock
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=1
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=10
MinJobAge=600
InactiveLimit=0
SchedulerParameters=sched_interval=1
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=16818 CPUs=16 RealMemory=$memory State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=16819 CPUs=16 RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=512
CONF
slurmctld -i
slurmd -N n1
slurmd -N n2
for _ in $(seq 1 60); do
  if [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" = 2 ]; then
    echo "tests/slurm-cluster.sh: a two-node Slurm cluster is up (SLURM_CONF=$SLURM_CONF)"
    exit 0
  fi
  sleep 0.5
done
echo "tests/slurm-cluster.sh: the cluster did not come up; see $DIR/log" >&2
tail -n 20 "$DIR"/log/*.log >&2
exit 1
