#!/usr/bin/env bash
# Measures the release agent on this host with config/dev.toml's checks:
#   - stripped release binary size
#   - time from exec to the first 200 on /health with the first round done
#   - steady RSS after IDLE_SECS (default 300) and CPU seconds per idle minute
#   - /health throughput: wrk -t2 -c16 -d10s
#   - /metrics latency percentiles: wrk -t1 -c1 -d10s --latency
# Usage: benches/measure-agent.sh            (needs wrk: apt-get install wrk)
#        IDLE_SECS=60 benches/measure-agent.sh
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE_SECS=${IDLE_SECS:-300}
cargo build --release --quiet
bin=target/release/vigil
work=$(mktemp -d)
trap 'kill $(cat "$work/pid" 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# dev.toml's checks, with state, socket and port of our own.
sed -e "s|^state_dir = .*|state_dir = \"$work/state\"|" \
    -e "s|^admin_socket = .*|admin_socket = \"$work/admin.sock\"|" \
    -e "s|^listen = .*|listen = \"127.0.0.1:$port\"|" \
    -e "s|^path = \"..\"|path = \"$PWD\"|" \
    -e "s|^level = .*|level = \"warn\"|" config/dev.toml > "$work/vigil.toml"

echo "binary: $(stat -c %s "$bin") bytes ($(numfmt --to=iec-i --suffix=B "$(stat -c %s "$bin")")) stripped release"

python3 - "$bin" "$work" "$port" "$IDLE_SECS" <<'PY'
import os, socket, subprocess, sys, time
bin, work, port, idle = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def get(path):
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return int(data.split()[1])
t0 = time.perf_counter()
p = subprocess.Popen([bin, "agent", "-c", f"{work}/vigil.toml"], stderr=open(f"{work}/log", "w"))
open(f"{work}/pid", "w").write(str(p.pid))
while True:
    try:
        if get("/health") == 200:
            break
    except OSError:
        pass
    if time.perf_counter() - t0 > 10:
        sys.exit("no 200 from /health within 10s: " + open(f"{work}/log").read())
print(f"exec to first 200 on /health: {(time.perf_counter() - t0) * 1000:.2f} ms")
def cpu():
    # schedstat's first field is time on CPU in ns, far finer than stat's clock ticks; it
    # is per thread, so sum the agent's threads (a thread that exited is not counted, so
    # this is a lower bound when the blocking pool shrinks during the window).
    total = 0
    for t in os.listdir(f"/proc/{p.pid}/task"):
        try:
            total += int(open(f"/proc/{p.pid}/task/{t}/schedstat").read().split()[0])
        except OSError:
            pass
    return total / 1e9
def cpu_ticks():
    # utime + stime of the whole process, including threads that have exited.
    f = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
def rss():
    for l in open(f"/proc/{p.pid}/status"):
        if l.startswith("VmRSS:"):
            return int(l.split()[1]) / 1024
c0, k0, t1 = cpu(), cpu_ticks(), time.time()
time.sleep(idle)
c1, k1, t2 = cpu(), cpu_ticks(), time.time()
print(f"idle {idle}s: RSS {rss():.2f} MiB; CPU {(c1 - c0) / ((t2 - t1) / 60):.4f} s per idle minute "
      f"({(c1 - c0) * 1000:.1f} ms in {t2 - t1:.0f} s, threads' schedstat); "
      f"{(k1 - k0) / ((t2 - t1) / 60):.4f} s per idle minute by /proc/PID/stat (10 ms ticks)")
PY

echo "--- /health: wrk -t2 -c16 -d10s"
wrk -t2 -c16 -d10s "http://127.0.0.1:$port/health" | grep -E 'Requests/sec|Latency|requests in|Non-2xx'
echo "--- /metrics: wrk -t1 -c1 -d10s --latency"
wrk -t1 -c1 -d10s --latency "http://127.0.0.1:$port/metrics" | grep -E ' 50%| 90%| 99%|Requests/sec'
echo "RSS after load: $(awk '/VmRSS/ {printf "%.2f MiB", $2/1024}' /proc/"$(cat "$work/pid")"/status)"
