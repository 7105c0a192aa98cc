#!/usr/bin/env bash
# Stop the test Slurm started by tests/slurm/up.sh: cancel jobs, then slurmd, slurmctld, slurmdbd, mariadb, munged.
# Safe to run when nothing (or only part) is running. Packages and configuration stay in place.
set -uo pipefail

[[ $(id -u) -eq 0 ]] || { echo "down.sh: must run as root" >&2; exit 1; }

# stop_pidfile <name> <pidfile>: SIGTERM the daemon, wait up to 15 s, then SIGKILL.
stop_pidfile() {
    local name=$1 pidfile=$2 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "down.sh: ${name} (pid ${pid}) ignored SIGTERM; killing it" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
    rm -f "$pidfile"
    echo "down.sh: stopped ${name}"
}

if command -v scancel >/dev/null && scontrol ping 2>/dev/null | grep -q "is UP"; then
    scancel --full --quiet --user=root 2>/dev/null
    [[ -n ${SUDO_USER:-} ]] && scancel --full --quiet --user="$SUDO_USER" 2>/dev/null
fi
stop_pidfile slurmd /run/slurm/slurmd.pid
stop_pidfile slurmctld /run/slurm/slurmctld.pid
stop_pidfile slurmdbd /run/slurm/slurmdbd.pid
if command -v mysqladmin >/dev/null && mysqladmin ping >/dev/null 2>&1; then
    mysqladmin shutdown && echo "down.sh: stopped mariadb"
fi
stop_pidfile munged /run/munge/munged.pid
exit 0
