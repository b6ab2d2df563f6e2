#!/usr/bin/env bash
# gapaware on a handful of VMs over SSH, with the systemd units in deploy/systemd.
# Needs passwordless SSH and sudo on each host, and gapaware installed in
# /opt/gapaware/venv there (python3 -m venv /opt/gapaware/venv && .../pip install gapaware).
#
#   cluster.sh install HOST...               units + /etc/gapaware/gapaware.env (kept if present)
#   cluster.sh server HEAD                   start the server on HEAD and wait until it serves
#   cluster.sh workers HEAD HOST[:GPUS]...   start GPUS workers (default 1) on each HOST
#   cluster.sh stop-workers HOST...          stop every worker on each HOST (scale down)
#   cluster.sh status HEAD                   the run's table: progress, workers, staleness
set -euo pipefail

UNITS_DIR=$(cd "$(dirname "$0")/../systemd" && pwd)

usage() {
    sed -n '2,11p' "$0" >&2
    exit 2
}

install_on() {
    local host=$1
    scp -q "$UNITS_DIR/gapaware-server.service" "$UNITS_DIR/gapaware-worker@.service" \
        "$UNITS_DIR/gapaware.env" "$host:/tmp/"
    ssh "$host" 'sudo install -m 644 /tmp/gapaware-server.service /tmp/gapaware-worker@.service /etc/systemd/system/ &&
        sudo install -d /etc/gapaware && { [ -e /etc/gapaware/gapaware.env ] ||
        sudo install -m 640 /tmp/gapaware.env /etc/gapaware/gapaware.env; } &&
        { id gapaware >/dev/null 2>&1 || sudo useradd --system --home /var/lib/gapaware gapaware; } &&
        sudo systemctl daemon-reload'
}

start_workers() {
    local head=$1 spec=$2
    local host=${spec%%:*} gpus=1
    [[ $spec == *:* ]] && gpus=${spec#*:}
    local units=()
    for ((gpu = 0; gpu < gpus; gpu++)); do units+=("gapaware-worker@$gpu"); done
    ssh "$host" "echo GAPAWARE_SERVER=$head:7070 | sudo tee /etc/gapaware/worker.env >/dev/null &&
        sudo systemctl start ${units[*]}"
    echo "$host: started ${units[*]}"
}

[[ $# -ge 2 ]] || usage
command=$1
shift
case $command in
    install)
        for host in "$@"; do install_on "$host"; done ;;
    server)
        ssh "$1" sudo systemctl start gapaware-server
        gapaware health --server "$1:7070" --wait 300 ;;
    workers)
        head=$1
        shift
        for spec in "$@"; do start_workers "$head" "$spec"; done ;;
    stop-workers)
        for host in "$@"; do ssh "$host" "sudo systemctl stop 'gapaware-worker@*'"; done ;;
    status)
        gapaware status --server "$1:7070" ;;
    *)
        usage ;;
esac
