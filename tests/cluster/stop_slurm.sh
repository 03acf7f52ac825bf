#!/usr/bin/env bash
# Stops the daemons that start_slurm.sh started in STATE_DIR (by their pid files), slurmd first.
set -uo pipefail

STATE_DIR=$(realpath -m "${1:?usage: stop_slurm.sh STATE_DIR}")
status=0
for daemon in slurmd slurmctld munged; do
    pid_file=$STATE_DIR/run/$daemon.pid
    [[ -s $pid_file ]] || continue
    pid=$(<"$pid_file")
    kill -TERM "$pid" 2>/dev/null || { rm -f "$pid_file"; continue; }
    for ((tenth = 0; tenth < 100; tenth++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "stop_slurm.sh: $daemon ($pid) ignored SIGTERM for 10 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null
        status=1
    fi
    rm -f "$pid_file"
done
exit $status
