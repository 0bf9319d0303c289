#!/usr/bin/env bash
# Measures the RSS the heartbeat path adds to the release agent: three agents with
# config/dev.toml's checks run side by side for IDLE_SECS (default 120):
#   - "off":      no [heartbeat];
#   - "sending":  heartbeats every second to a loopback receiver that answers 200;
#   - "spooling": heartbeats every second to a receiver that answers 503 (spool, backoff
#                 capped at 2s, so the send path runs too).
# Then the spooling receiver turns to 200 and the drain is timed.
# Usage: benches/measure-heartbeat.sh        IDLE_SECS=60 benches/measure-heartbeat.sh
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE_SECS=${IDLE_SECS:-120}
cargo build --release --quiet
bin=$PWD/target/release/vigil
work=$(mktemp -d)
trap 'kill $(cat "$work"/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cat > "$work/recv.py" <<'PY'
import http.server, os, sys
port, mode_file = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        code = int(open(mode_file).read())
        self.send_response(code)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY

start_agent() { # name, extra toml
    local name=$1 extra=$2 port
    port=$(free_port)
    mkdir -p "$work/$name"
    sed -e "s|^state_dir = .*|state_dir = \"$work/$name/state\"|" \
        -e "s|^admin_socket = .*|admin_socket = \"$work/$name/admin.sock\"|" \
        -e "s|^listen = .*|listen = \"127.0.0.1:$port\"|" \
        -e "s|^path = \"..\"|path = \"$PWD\"|" \
        -e "s|^level = .*|level = \"warn\"|" config/dev.toml > "$work/$name/vigil.toml"
    printf '\n%s\n' "$extra" >> "$work/$name/vigil.toml"
    mkdir -p "$work/$name/state"
    "$bin" keygen --out "$work/$name/state/heartbeat.key" > /dev/null
    "$bin" agent -c "$work/$name/vigil.toml" 2> "$work/$name/log" &
    echo $! > "$work/$name.pid"
    echo "$port" > "$work/$name.port"
}
start_receiver() { # name, code
    local port
    port=$(free_port)
    echo "$2" > "$work/$1.mode"
    # Not attached to our stdout: this runs inside $(…), which waits for EOF.
    python3 "$work/recv.py" "$port" "$work/$1.mode" > /dev/null 2>&1 &
    echo $! > "$work/$1-recv.pid"
    echo "$port"
}

ok_port=$(start_receiver ok 200)
bad_port=$(start_receiver bad 503)
hb() { printf '[heartbeat]\nurl = "http://127.0.0.1:%s/v1/heartbeats"\ninterval = "1s"\nmax_backoff = "2s"\n' "$1"; }
start_agent off ""
start_agent sending "$(hb "$ok_port")"
start_agent spooling "$(hb "$bad_port")"

rss() { awk '/^VmRSS/ {printf "%.2f", $2/1024}' "/proc/$(cat "$work/$1.pid")/status"; }
metric() { curl -s "127.0.0.1:$(cat "$work/$1.port")/metrics" | awk -v m="$2" '$1 == m {print $2}'; }
sleep "$IDLE_SECS"
off=$(rss off) sending=$(rss sending) spooling=$(rss spooling)
echo "after ${IDLE_SECS}s: RSS off ${off} MiB, sending ${sending} MiB, spooling ${spooling} MiB"
echo "added by the heartbeat path: sending $(echo "$sending - $off" | bc) MiB, spooling $(echo "$spooling - $off" | bc) MiB"
echo "sending: $(metric sending vigil_heartbeats_sent_total) delivered;" \
     "spooling: $(metric spooling vigil_heartbeat_spool_records) spooled, $(metric spooling vigil_heartbeat_spool_bytes) bytes"
echo 200 > "$work/bad.mode"
t0=$(date +%s.%N)
until [ "$(metric spooling vigil_heartbeat_spool_records)" = "0" ]; do sleep 0.1; done
echo "spool drained $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s after the receiver answered 200 again (includes the backoff wait, up to 2 s)"
