#!/usr/bin/env bash
# A single-node SLURM cluster with two fake GPUs, private to one folder: its own munged, slurmctld and
# slurmd, its own ports, config, spool and logs. Nothing is written outside STATE_DIR.
#
#   tests/cluster/start_slurm.sh STATE_DIR      # prints SLURM_CONF=STATE_DIR/etc/slurm.conf when the node is idle
#   export SLURM_CONF=STATE_DIR/etc/slurm.conf PATH=STATE_DIR/bin:$PATH
#   sbatch ...
#   tests/cluster/stop_slurm.sh STATE_DIR       # stops the three daemons this script started
#
# Needs root and Debian's packages (`apt-get install --no-install-recommends slurmctld slurmd slurm-client
# munge`, SLURM 22.05 on bookworm); no systemd: the daemons are started directly.
set -euo pipefail

STATE_DIR=$(realpath -m "${1:?usage: start_slurm.sh STATE_DIR}")
NODE=medmem-node
CPUS=${SLURM_TEST_CPUS:-16}           # declared, not real: config_overrides lets a 2-core machine offer them
MEMORY_MB=${SLURM_TEST_MEMORY_MB:-65536}
GPUS=2

for tool in munged mungekey slurmctld slurmd sinfo sbatch srun squeue scontrol; do
    command -v "$tool" >/dev/null ||
        { echo "start_slurm.sh: $tool not found; install slurmctld slurmd slurm-client munge" >&2; exit 2; }
done
[[ $(id -u) == 0 ]] || { echo "start_slurm.sh: slurmd must run as root" >&2; exit 2; }

mkdir -p "$STATE_DIR"/{bin,etc,munge,log,run,spool/ctld,spool/d,dev}
chmod 700 "$STATE_DIR/munge"

# Two free TCP ports, so that this cluster never meets another one on the same machine.
read -r CTLD_PORT SLURMD_PORT < <(python3 - <<'EOF'
import socket
sockets = [socket.socket() for _ in range(2)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))
EOF
)

# A fake GPU GRES must name a character device: file-less GPUs are dropped and the node drains.
# Major 195 is NVIDIA's; nothing opens these files, slurmd only checks that they exist.
for ((index = 0; index < GPUS; index++)); do
    [[ -c $STATE_DIR/dev/nvidia$index ]] || mknod "$STATE_DIR/dev/nvidia$index" c 195 "$index"
done

# munge: a fresh key and a private socket (AuthInfo below points SLURM's daemons and clients at it).
[[ -f $STATE_DIR/munge/munge.key ]] || mungekey --create --keyfile="$STATE_DIR/munge/munge.key"
chmod 400 "$STATE_DIR/munge/munge.key"
munged --force \
    --socket="$STATE_DIR/munge/munge.socket" \
    --key-file="$STATE_DIR/munge/munge.key" \
    --pid-file="$STATE_DIR/run/munged.pid" \
    --log-file="$STATE_DIR/log/munged.log" \
    --seed-file="$STATE_DIR/munge/munge.seed"

cat > "$STATE_DIR/etc/slurm.conf" <<EOF
# Written by tests/cluster/start_slurm.sh: one node, two fake GPUs, no accounting database.
ClusterName=medmem-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE_DIR/munge/munge.socket
StateSaveLocation=$STATE_DIR/spool/ctld
SlurmdSpoolDir=$STATE_DIR/spool/d
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: track processes by /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Allocate cores, memory and GPUs per job; without DefMemPerCPU each job would take the whole node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
# Without slurmdbd, sacct cannot answer: Snakemake asks squeue, which sees a finished job for MinJobAge
# seconds. The executor wants MinJobAge >= 3 x its first status-check delay (120 s at the default 40 s);
# an hour also keeps every job visible to the test's scontrol after the run.
MinJobAge=3600
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
# Each task (the batch script and every srun step) records the GPUs it was given, for the tests to read.
TaskProlog=$STATE_DIR/etc/task_prolog.sh
MailProg=/bin/true
NodeName=$NODE NodeHostname=$(hostname) NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEMORY_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

cat > "$STATE_DIR/etc/gres.conf" <<EOF
NodeName=$NODE Name=gpu File=$STATE_DIR/dev/nvidia[0-$((GPUS - 1))]
EOF

cat > "$STATE_DIR/etc/task_prolog.sh" <<EOF
#!/bin/sh
echo "job=\$SLURM_JOB_ID step=\$SLURM_STEP_ID CUDA_VISIBLE_DEVICES=\${CUDA_VISIBLE_DEVICES-unset}" \\
    >> "$STATE_DIR/log/task_gpus.log"
EOF
chmod 755 "$STATE_DIR/etc/task_prolog.sh"

# Snakemake's job step runs the rule with `srun`, in an environment stripped of SLURM_* variables, so
# srun looks for /etc/slurm/slurm.conf, where a real cluster keeps it. This cluster's config lives here:
# put STATE_DIR/bin first on PATH and its srun brings SLURM_CONF back.
cat > "$STATE_DIR/bin/srun" <<EOF
#!/bin/sh
SLURM_CONF=$STATE_DIR/etc/slurm.conf exec $(command -v srun) "\$@"
EOF
chmod 755 "$STATE_DIR/bin/srun"

export SLURM_CONF=$STATE_DIR/etc/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N "$NODE"

# Wait for the node to register; a node that comes up drained or down says why in its Reason.
while ((SECONDS < 60)); do
    state=$(timeout 5 sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    [[ $state == idle ]] && { echo "SLURM_CONF=$SLURM_CONF"; exit 0; }
    sleep 1
done
echo "start_slurm.sh: node $NODE is '${state:-unreachable}' after 60 s" >&2
scontrol show node "$NODE" >&2 || true
tail -n 20 "$STATE_DIR/log/slurmctld.log" "$STATE_DIR/log/slurmd.log" >&2 || true
exit 1
