#!/usr/bin/env bash
# Measures what one round of every postgres.* check costs the server, and the agent's
# RSS with all of them configured, against a throwaway PostgreSQL 15 on loopback.
#   - server CPU: time on CPU of vigil's backend(s) (/proc/PID/schedstat, found through
#     pg_stat_activity.application_name = 'vigil') over ROUNDS rounds at a 1s interval
#   - agent RSS after those rounds
# The role has only pg_monitor. Run as root (PostgreSQL runs as the postgres user).
# Usage: benches/measure-postgres.sh           ROUNDS=120 benches/measure-postgres.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-60}
cargo build --release --quiet
# shellcheck source=benches/pg-server.sh
. benches/pg-server.sh
work=$(mktemp -d /tmp/vigil-measure-XXXXXX)
chmod 755 "$work"
port=$(free_port)
apiport=$(free_port)
cleanup() {
  kill "$(cat "$work/agent.pid" 2>/dev/null)" 2>/dev/null || true
  pg_stop "$work/pg/data"
  rm -rf "$work"
}
trap cleanup EXIT
pg_server "$work/pg" "$port" postgres 'archive_mode = on' "archive_command = '/bin/true'"
as_pg "$pgbin/psql" -X -q -h "$work/pg" -p "$port" -U postgres -c \
  "CREATE ROLE vigil LOGIN; GRANT pg_monitor TO vigil;"
dsn="host=127.0.0.1 port=$port user=vigil dbname=postgres"
{
  printf '[agent]\nstate_dir = "%s/state"\ninterval = "1s"\n\n' "$work"
  printf '[api]\nlisten = "127.0.0.1:%s"\nadmin_socket = "%s/admin.sock"\n\n' "$apiport" "$work"
  printf '[log]\nlevel = "warn"\n\n'
  printf '[check.disk.root]\npath = "/"\n\n[check.system.host]\n\n'
  for kind in up replication slots archiving connections wraparound long_transactions; do
    printf '[check.postgres.%s.pg-%s]\ndsn = "%s"\n\n' "$kind" "$kind" "$dsn"
  done
} > "$work/vigil.toml"
target/release/vigil agent -c "$work/vigil.toml" 2> "$work/agent.log" &
echo $! > "$work/agent.pid"

python3 - "$work" "$port" "$apiport" "$ROUNDS" <<'PY'
import json, os, subprocess, sys, time, urllib.request
work, port, apiport, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
agent = int(open(f"{work}/agent.pid").read())
def checks():
    return json.load(urllib.request.urlopen(f"http://127.0.0.1:{apiport}/checks", timeout=2))
deadline = time.time() + 20
while True:
    try:
        cs = checks()
        if cs and all(c["sampled_at"] for c in cs):
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("agent did not sample every check: " + open(f"{work}/agent.log").read())
    time.sleep(0.2)
time.sleep(3)  # let every check run a few rounds on its session
pids = subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/psql", "-X", "-A", "-t",
                       "-h", f"{work}/pg", "-p", port, "-U", "postgres", "-c",
                       "SELECT pid FROM pg_stat_activity WHERE application_name = 'vigil'"],
                      capture_output=True, text=True, check=True).stdout.split()
def cpu(pid):
    # schedstat's first field is time on CPU in ns: far finer than stat's clock ticks.
    return int(open(f"/proc/{pid}/schedstat").read().split()[0]) / 1e9
c0 = sum(cpu(p) for p in pids)
t0 = time.time()
time.sleep(rounds)
c1 = sum(cpu(p) for p in pids)
elapsed = time.time() - t0
rss = next(int(l.split()[1]) for l in open(f"/proc/{agent}/status") if l.startswith("VmRSS:")) / 1024
statuses = {c["name"]: c["status"] for c in checks()}
print(f"vigil backends: {len(pids)} (one session per DSN)")
print(f"server CPU: {(c1 - c0) * 1000:.1f} ms over {elapsed:.0f} rounds of 7 postgres checks "
      f"= {(c1 - c0) * 1000 / elapsed:.3f} ms per round (/proc/PID/schedstat)")
print(f"agent RSS with all postgres kinds configured: {rss:.2f} MiB")
print("statuses:", ", ".join(f"{k}={v}" for k, v in statuses.items()))
PY
