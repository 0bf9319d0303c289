#!/usr/bin/env bash
# A simulated fleet against release `vigil control` receivers on this machine
# (examples/control_fleet.rs: N hosts with their own keys, a 20-check heartbeat each
# every 15 s with jitter, signed before the clock starts), in three set-ups:
#   file  one receiver, the file store;
#   pg    one receiver on a PostgreSQL 15 started here (loopback, fsync and
#         synchronous_commit on);
#   pg2   two receivers on one PostgreSQL database, the fleet split between them.
# Prints per set-up: heartbeats sent and accepted per second, latency p50/p99, how late
# sends started, the receivers' CPU per heartbeat and RSS, and PostgreSQL's CPU per
# heartbeat and database size.
#
# Usage (root: PostgreSQL runs as the postgres user):
#   benches/measure-fleet.sh [N] [SECS] [CONNS]      defaults 100000 60 1000
#   SETUPS="pg pg2" benches/measure-fleet.sh         some set-ups only
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
SECS=${2:-60}
CONNS=${3:-1000}
SETUPS=${SETUPS:-file pg pg2}
cargo build --release --quiet --bin vigil --example control_fleet
bin=$PWD/target/release/vigil
fleet=$PWD/target/release/examples/control_fleet
# shellcheck source=benches/pg-server.sh
. benches/pg-server.sh
ulimit -n "$(ulimit -Hn)"   # 1,000 connections and more
work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
    kill $(cat "$work"/*.pid 2>/dev/null) 2>/dev/null || true
    pg_stop "$work/pg/data"
    rm -rf "$work"
}
trap cleanup EXIT
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
hz=$(getconf CLK_TCK)
pg_ticks() { # the cluster: postmaster, its live children, and the children it reaped
    local pm t p
    pm=$(head -1 "$work/pg/data/postmaster.pid")
    t=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$pm/stat")
    for p in $(pgrep -P "$pm"); do
        t=$((t + $(ticks "$p")))
    done
    echo $t
}
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

start_pg() {
    [ -n "${pgport:-}" ] && return
    pgport=$(free_port)
    pg_server "$work/pg" "$pgport" vigil 'shared_buffers = 1GB' 'wal_buffers = 64MB' \
        'max_wal_size = 16GB' 'checkpoint_timeout = 30min'
}

echo "N=$N SECS=$SECS CONNS=$CONNS on $(nproc) CPUs"
"$fleet" keys "$N" "$work/keys"
for setup in $SETUPS; do
    receivers=1
    case $setup in
        file) store=file ;;
        pg | pg2)
            start_pg
            as_pg "$pgbin/createdb" -h 127.0.0.1 -p "$pgport" -U vigil "$setup"
            store="postgresql://vigil@127.0.0.1:$pgport/$setup"
            [ "$setup" = pg2 ] && receivers=2
            ;;
    esac
    urls=() pids=()
    for r in $(seq "$receivers"); do
        port=$(free_port)
        dir="$work/$setup-$r"
        mkdir -p "$dir/state"
        cat > "$dir/control.toml" <<EOF
[control]
listen = "127.0.0.1:$port"
state_dir = "$dir/state"
store = "$store"
overdue_after = "45s"

[log]
level = "warn"
EOF
        if [ "$r" = 1 ]; then
            t0=$(date +%s.%N)
            "$bin" control enroll -c "$dir/control.toml" --from "$work/keys" | tail -1
            echo "  enrolment of $N hosts: $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')s"
        fi
        "$bin" control -c "$dir/control.toml" 2> "$dir/log" &
        pids+=($!)
        echo $! > "$dir.pid"
        urls+=("http://127.0.0.1:$port/v1/heartbeats")
        for _ in $(seq 100); do
            python3 -c "import socket; socket.create_connection(('127.0.0.1', $port))" 2>/dev/null && break
            sleep 0.1
        done
    done
    c0=0
    for p in "${pids[@]}"; do c0=$((c0 + $(ticks "$p"))); done
    p0=$([ "$store" = file ] && echo 0 || pg_ticks)
    out=$("$fleet" run "$(IFS=,; echo "${urls[*]}")" "$N" "$SECS" "$CONNS" 2>&1)
    c1=0 rss=0
    for p in "${pids[@]}"; do
        c1=$((c1 + $(ticks "$p")))
        rss=$((rss + $(rss_kib "$p")))
    done
    p1=$([ "$store" = file ] && echo 0 || pg_ticks)
    echo "$setup:"
    echo "$out" | sed 's/^/  /'
    n=$(echo "$out" | sed -n 's/.*accepted \([0-9]*\) = .*/\1/p')
    n=${n:-0}
    echo "  receivers: CPU $(( (c1 - c0) * 1000000 / hz / (n > 0 ? n : 1) )) us/heartbeat," \
        "RSS $((rss / 1024)) MiB for $N hosts ($((rss * 100000 / N / 1024)) MiB per 100,000 hosts)"
    if [ "$store" != file ]; then
        echo "  PostgreSQL: CPU $(( (p1 - p0) * 1000000 / hz / (n > 0 ? n : 1) )) us/heartbeat," \
            "database $(as_pg "$pgbin/psql" -h 127.0.0.1 -p "$pgport" -U vigil -d "$setup" -Atc "SELECT pg_size_pretty(pg_database_size('$setup'))")"
    else
        echo "  file store on disk: $(du -sh "$work/file-1/state" | cut -f1)"
    fi
    for p in "${pids[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
done
