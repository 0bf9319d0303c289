#!/usr/bin/env bash
# Durable heartbeat accepts per second of one release `vigil control` on this machine,
# with the file store and with the PostgreSQL store (a PostgreSQL 15 started here, on
# loopback, fsync and synchronous_commit on), driven by examples/control_load.rs over
# plain HTTP keep-alive connections. Prints, per store: accepted/s, latency p50/p99, the
# receiver's CPU per heartbeat and RSS, and PostgreSQL's CPU per heartbeat.
#
# Usage (root: PostgreSQL runs as the postgres user):
#   benches/measure-control.sh [HOSTS] [CONNS] [SECS]      defaults 10000 256 20
#   STORES="pg" benches/measure-control.sh                 one store only (file, pg)
#   PERF=/tmp/control.perf CARGO_PROFILE_RELEASE_STRIP=false benches/measure-control.sh
#                                                          and profile the receiver
# Everything lives in a temp dir and is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTS=${1:-10000}
CONNS=${2:-256}
SECS=${3:-20}
STORES=${STORES:-file pg}
cargo build --release --quiet --bin vigil --example control_load
bin=$PWD/target/release/vigil
load=$PWD/target/release/examples/control_load
# shellcheck source=benches/pg-server.sh
. benches/pg-server.sh
work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
    kill $(cat "$work"/*.pid 2>/dev/null) 2>/dev/null || true
    pg_stop "$work/pg/data"
    rm -rf "$work"
}
trap cleanup EXIT
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
pg_ticks() { # every process of the cluster (postmaster and its children)
    local pm t=0 p
    pm=$(head -1 "$work/pg/data/postmaster.pid")
    for p in $pm $(pgrep -P "$pm"); do
        t=$((t + $(ticks "$p" 2>/dev/null || echo 0)))
    done
    echo $t
}

start_pg() {
    pgport=$(free_port)
    pg_server "$work/pg" "$pgport" vigil 'shared_buffers = 512MB' 'wal_buffers = 64MB' \
        'max_wal_size = 8GB' 'checkpoint_timeout = 30min'
    as_pg "$pgbin/createdb" -h 127.0.0.1 -p "$pgport" -U vigil vigil
}

run() { # kind store
    local kind=$1 store=$2 port pid c0 c1 p0 p1 out n
    port=$(free_port)
    mkdir -p "$work/$kind/state"
    cat > "$work/$kind/control.toml" <<EOF
[control]
listen = "127.0.0.1:$port"
state_dir = "$work/$kind/state"
store = "$store"

[log]
level = "warn"
EOF
    "$bin" control -c "$work/$kind/control.toml" 2> "$work/$kind/log" &
    pid=$!
    echo $pid > "$work/$kind.pid"
    for _ in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $port))" 2>/dev/null && break
        sleep 0.1
    done
    "$load" enroll "$([ "$kind" = file ] && echo "$work/$kind/state" || echo "$store")" "$HOSTS" 2>&1 | tail -1
    c0=$(ticks $pid)
    p0=$([ "$kind" = pg ] && pg_ticks || echo 0)
    # PERF=FILE: a CPU profile of the receiver during the load (perf must be installed;
    # build with CARGO_PROFILE_RELEASE_STRIP=false for symbols).
    [ -n "${PERF:-}" ] && { perf record -F 499 -g -p "$pid" -o "$PERF.$kind" >/dev/null 2>&1 & echo $! > "$work/perf.pid"; }
    out=$(CONTROL_LOAD_ENROLLED=1 "$load" load "http://127.0.0.1:$port/v1/heartbeats" "$store" "$HOSTS" "$CONNS" "$SECS" 2>&1)
    c1=$(ticks $pid)
    [ -n "${PERF:-}" ] && { kill -INT "$(cat "$work/perf.pid")"; sleep 2; rm -f "$work/perf.pid"; }
    p1=$([ "$kind" = pg ] && pg_ticks || echo 0)
    echo "$out" | sed 's/^/  /'
    n=$(echo "$out" | awk '/accepted in/ {print $1}')
    echo "  $kind: receiver CPU $(( (c1 - c0) * 1000000 / hz / (n > 0 ? n : 1) )) us/heartbeat," \
        "RSS $(awk '/VmRSS/ {print $2 " " $3}' /proc/$pid/status)" \
        "$([ "$kind" = pg ] && echo ", PostgreSQL CPU $(( (p1 - p0) * 1000000 / hz / (n > 0 ? n : 1) )) us/heartbeat")"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

echo "HOSTS=$HOSTS CONNS=$CONNS SECS=$SECS on $(nproc) CPUs"
for s in $STORES; do
    case $s in
        file) run file file ;;
        pg) start_pg; run pg "postgresql://vigil@127.0.0.1:$pgport/vigil" ;;
    esac
done
