#!/usr/bin/env bash
# Start a one-node live Slurm (with slurmdbd accounting) on this machine, for the slurm integration tests.
#
#   sudo bash tests/slurm/up.sh      # install (once), configure, start; waits until the node is idle
#   bash tests/slurm/down.sh         # stop every daemon started here
#
# Installs Debian's slurmctld slurmd slurm-client munge slurmdbd mariadb-server (skipped when present), writes
# /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf, and starts munged, mariadb, slurmdbd, slurmctld and slurmd
# as plain daemons (no systemd needed). Idempotent: rerunning it restarts nothing that is already up.
# Environment: SLURM_UP_TIMEOUT (s, default 60) bounds every wait; ORCHARD_SLURM_CLUSTER (default orchard);
# ORCHARD_SLURM_GPUS (default 2, at most 5): fake GPUs the node advertises, so jobs asking `--gpus=N` (a rule's
# `gpu=N`) are scheduled here (with CUDA_VISIBLE_DEVICES set) and then run on the CPU.
set -euo pipefail

[[ $(id -u) -eq 0 ]] || { echo "up.sh: must run as root (installs packages, writes /etc/slurm)" >&2; exit 1; }

TIMEOUT=${SLURM_UP_TIMEOUT:-60}
CLUSTER=${ORCHARD_SLURM_CLUSTER:-orchard}
GPUS=${ORCHARD_SLURM_GPUS:-2}
DB_PASS=orchard-slurmdbd
LOG_DIR=/var/log/slurm
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
t0=$(date +%s%N)

say() { local ms=$(( ($(date +%s%N) - t0) / 1000000 )); printf 'up.sh [%d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*"; }

# wait_for <description> <command...>: poll every 0.2 s until the command succeeds, fail after TIMEOUT s.
wait_for() {
    local what=$1; shift
    local deadline=$(( $(date +%s) + TIMEOUT ))
    until "$@" >/dev/null 2>&1; do
        if (( $(date +%s) >= deadline )); then
            echo "up.sh: timed out after ${TIMEOUT}s waiting for ${what}; logs in ${LOG_DIR} and /var/log/mysql:" >&2
            tail -n 20 "$LOG_DIR"/*.log /var/log/mysql/error.log >&2 2>/dev/null || true
            sinfo -N -o '%N %t %E' >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.2
    done
}

# ---------------------------------------------------------------- install
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "up.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
say "packages present"

# ---------------------------------------------------------------- configuration
HOST=$(hostname -s)
# The node's real topology, as slurmd sees it (CPUs, sockets, cores, threads, RealMemory).
NODE_LINE=$(slurmd -C | head -n 1)
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$NODE_LINE")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE_LINE")
TOPOLOGY=$(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$NODE_LINE")
MEM=$(( MEM * 95 / 100 ))                    # keep a margin, so the node never drains for "low RealMemory"
DEF_MEM_PER_CPU=$(( MEM / CPUS ))
if (( DEF_MEM_PER_CPU > 2048 )); then DEF_MEM_PER_CPU=2048; fi

NODE_GRES=""; if (( GPUS > 0 )); then NODE_GRES="Gres=gpu:${GPUS}"; fi

mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$LOG_DIR" /run/slurm /run/munge
chown slurm:slurm /var/lib/slurm/slurmctld "$LOG_DIR" /run/slurm
chown munge:munge /run/munge

cat > /etc/slurm/slurm.conf <<CONF
# Written by tests/slurm/up.sh: a one-node test cluster. Not for production.
ClusterName=${CLUSTER}
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in this container (gVisor): track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
# Schedule CPUs and memory; without DefMemPerCPU a job takes the whole node's memory and jobs run one at a time.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=${DEF_MEM_PER_CPU}
# sacct must work: the snakemake slurm executor polls job states through it. job_comment keeps the executor's
# --comment (rule_<name>_wildcards_...) in sacct's Comment column, so tests can tell which rule each job ran.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
# GPUs as generic resources backed by stand-in devices (gres.conf): "--gpus=N" is accepted and scheduled, and
# sacct's AllocTRES shows gres/gpu.
GresTypes=gpu
AccountingStorageTRES=gres/gpu
# Finished jobs leave slurmctld's memory quickly; sacct (slurmdbd) keeps them.
MinJobAge=30
InactiveLimit=0
KillWait=10
Waittime=0
NodeName=${HOST} NodeAddr=127.0.0.1 NodeHostname=${HOST} CPUs=${CPUS} ${TOPOLOGY} RealMemory=${MEM} ${NODE_GRES} State=UNKNOWN
PartitionName=main Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

# Fake GPUs: Slurm wants a character device per GPU; any will do, as task/none never restricts devices. Jobs get
# CUDA_VISIBLE_DEVICES=<index> and, on a machine without CUDA, torch simply runs on the CPU.
FAKE_DEVICES=(/dev/null /dev/zero /dev/full /dev/random /dev/urandom)
(( GPUS >= 0 && GPUS <= ${#FAKE_DEVICES[@]} )) || { echo "up.sh: ORCHARD_SLURM_GPUS must be 0..${#FAKE_DEVICES[@]}" >&2; exit 1; }
{
    echo "# Written by tests/slurm/up.sh: ${GPUS} fake GPUs (character devices stand in for GPU devices)."
    echo "AutoDetect=off"
    for (( i = 0; i < GPUS; i++ )); do echo "NodeName=${HOST} Name=gpu File=${FAKE_DEVICES[i]}"; done
} > /etc/slurm/gres.conf

cat > /etc/slurm/slurmdbd.conf <<CONF
# Written by tests/slurm/up.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
PidFile=/run/slurm/slurmdbd.pid
LogFile=${LOG_DIR}/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=${DB_PASS}
StorageLoc=slurm_acct_db
CONF
chown slurm:slurm /etc/slurm/slurmdbd.conf
chmod 600 /etc/slurm/slurmdbd.conf
say "wrote /etc/slurm/slurm.conf (node ${HOST}: CPUs=${CPUS} RealMemory=${MEM} DefMemPerCPU=${DEF_MEM_PER_CPU} gpu:${GPUS})"

# ---------------------------------------------------------------- munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    wait_for "munged" bash -c 'munge -n </dev/null | unmunge'
fi
say "munged up"

# ---------------------------------------------------------------- mariadb
if ! mysqladmin ping >/dev/null 2>&1; then
    mkdir -p /run/mysqld /var/log/mysql && chown mysql:mysql /run/mysqld /var/log/mysql
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    # setsid + nohup: the database must outlive this script's shell.
    setsid nohup mysqld_safe --skip-syslog --log-error=/var/log/mysql/error.log >/dev/null 2>&1 < /dev/null &
    wait_for "mariadb" mysqladmin ping
fi
mysql -uroot <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
say "mariadb up"

# ---------------------------------------------------------------- slurmdbd
if ! sacctmgr -n list cluster >/dev/null 2>&1; then
    slurmdbd
    wait_for "slurmdbd (sacctmgr list cluster)" sacctmgr -n list cluster
fi
say "slurmdbd up"

# Register the cluster, an account and the users who run tests, so sacct and account guessing behave as on a
# real cluster (the executor reads the user's default account from sacct/sacctmgr).
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null
fi
if ! sacctmgr -n -P list account format=account | grep -qx orchard; then
    sacctmgr -i -Q add account orchard Cluster="$CLUSTER" Description=orchard Organization=orchard >/dev/null
fi
for u in root ${SUDO_USER:-}; do
    if ! sacctmgr -n -P list user format=user | grep -qx "$u"; then
        sacctmgr -i -Q add user "$u" Account=orchard DefaultAccount=orchard Cluster="$CLUSTER" >/dev/null
    fi
done
say "cluster ${CLUSTER} registered"

# ---------------------------------------------------------------- slurmctld, slurmd
if scontrol ping 2>/dev/null | grep -q "is UP"; then
    scontrol reconfigure                    # already running: pick up the configuration written above
else
    slurmctld
    wait_for "slurmctld (scontrol ping)" bash -c 'scontrol ping | grep -q "is UP"'
fi
if [[ -s /run/slurm/slurmd.pid ]] && kill -0 "$(cat /run/slurm/slurmd.pid)" 2>/dev/null; then
    scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true   # clears a drain from an old config
else
    slurmd -N "$HOST"
fi
say "slurmctld and slurmd started"

node_idle() { sinfo -h -N -n "$HOST" -o '%t' | grep -Eq '^(idle|mix|alloc)$'; }
wait_for "node ${HOST} to be idle" node_idle
state=$(sinfo -h -N -n "$HOST" -o '%t')
say "node ${HOST} is ${state}; Slurm is ready"
sinfo
