#!/usr/bin/env bash
# One run, one idle PostgreSQL 15 primary + streaming standby (pgBackRest archiving, one
# full backup), and in turn, next to it:
#   baseline   no peer: what the idle cluster costs by itself;
#   vigil      the release agent with the full host + PostgreSQL + backup check set;
#   exporters  prometheus-node-exporter + prometheus-postgres-exporter, scraped every 15 s
#              by a curl loop here, as Prometheus would;
#   monit      `set daemon 15` with system, filesystem, process, pgsql port and
#              `pgbackrest info` checks.
# The backup check runs `pgbackrest info` every 5 minutes in both vigil and monit: that is
# vigil's default for the backup kinds, and `every 20 cycles` in monit (a check program
# otherwise runs every cycle). Run every 15 s, it costs each ~0.05 CPU s per minute,
# more than either daemon itself.
# Every daemon runs as the postgres OS user. Each phase: start (timing exec → first 200),
# WARM_SECS of warm-up, IDLE_SECS of idle measurement (RSS, CPU of the daemon and of the
# PostgreSQL work it causes), then the HTTP load (/metrics latency, health throughput).
# Prints a Markdown table with ratios against the peers and vigil's targets, and writes
# the raw numbers to RESULTS (outside the repo; the path is printed at the end).
#
# What is measured, per peer:
#   RSS          VmRSS at the end of the idle window, summed over the peer's daemons
#                (not a pgbackrest child that happens to run at that instant);
#   CPU          of each daemon and everything it forks: once its first 200 is timed, each
#                daemon moves into a cgroup of its own, whose usage counter is its CPU
#                (nanoseconds, exited threads and reaped pgbackrest runs included, what it
#                forked before the move not: that is warm-up); without cgroups, utime+stime
#                +cutime+cstime from /proc/PID/stat of the daemon and its live descendants,
#                in 10 ms clock ticks. The PostgreSQL work it causes: the ticks of both
#                postmasters and their children (cutime: reaped backends), minus the
#                baseline phase's, per minute;
#   latency      wrk -t1 -c1 -dLAT_SECS --latency: one keep-alive connection, requests back
#                to back as a scraper sends them, µs resolution, thousands of samples for a
#                fast endpoint, and the tool and flags of measure-agent.sh so the numbers
#                compare with it (a python client would add its own interpreter's latency);
#   throughput   wrk -t2 -c16 -d10s on the health endpoint (or the cheapest page);
#   first 200    python: fork, setuid postgres, exec; then a GET every 1 ms until a 200;
#                the median of START_TRIALS (5) starts, each but the last stopped again
#                (SIGTERM) once timed: a single start swings with the machine;
#   binary       file size of the release vigil (stripped by the linker: src/build.rs) and
#                of the peers.
#
# Usage (root; installs nothing: postgresql-15 pgbackrest prometheus-node-exporter
#        prometheus-postgres-exporter monit wrk curl python3 must be there):
#   benches/side-by-side.sh
#   IDLE_SECS=30 WARM_SECS=20 LAT_SECS=5 RESULTS=/tmp/sbs.txt benches/side-by-side.sh
#   PHASES="vigil monit" benches/side-by-side.sh   only those peers (the baseline always runs)
#   VIGIL_BIN=/path/to/vigil benches/side-by-side.sh   that build instead of a fresh release
#   SOAK_WRAP="heaptrack -o /tmp/ht" SOAK_SECS=1200 benches/side-by-side.sh   the soak's
#              agent under a wrapper (a heap profiler)
#   SOAK_SECS=3600 benches/side-by-side.sh     the soak instead (see "the soak" below)
# Everything else lives in a temp dir, removed at the end with every process started here.
set -euo pipefail
cd "$(dirname "$0")/.."
# 300 s: a window holds exactly one 5-minute pgbackrest run of each peer and 20 rounds,
# and the cluster's CPU (10 ms clock ticks) is good to ±0.002 s per minute.
IDLE_SECS=${IDLE_SECS:-300}
PHASES=${PHASES:-vigil exporters monit}
want() { [[ " $PHASES " == *" $1 "* ]]; }
WARM_SECS=${WARM_SECS:-20}
LAT_SECS=${LAT_SECS:-5}
START_TRIALS=${START_TRIALS:-5}
RESULTS=${RESULTS:-/tmp/vigil-side-by-side-$(date -u +%Y%m%dT%H%M%SZ).txt}
# shellcheck source=benches/pg-server.sh
. benches/pg-server.sh
node_exporter=/usr/bin/prometheus-node-exporter
pg_exporter=/usr/bin/prometheus-postgres-exporter
monit_bin=/usr/bin/monit

[ "$(id -u)" = 0 ] || { echo "run as root (the daemons and PostgreSQL run as the postgres user)" >&2; exit 1; }
missing=()
need() { [ -x "$1" ] || missing+=("$2 ($1)"); }
need "$pgbin/postgres" postgresql-15
need "$node_exporter" prometheus-node-exporter
need "$pg_exporter" prometheus-postgres-exporter
need "$monit_bin" monit
need "$(command -v pgbackrest || echo /usr/bin/pgbackrest)" pgbackrest
need "$(command -v wrk || echo /usr/bin/wrk)" wrk
need "$(command -v curl || echo /usr/bin/curl)" curl
need "$(command -v python3 || echo /usr/bin/python3)" python3
id postgres >/dev/null 2>&1 || missing+=("the postgres OS user (postgresql-common)")
if [ ${#missing[@]} -gt 0 ]; then
    printf 'missing: %s\n' "${missing[@]}" >&2
    echo "install them with apt-get install; this script installs nothing" >&2
    exit 1
fi

# VIGIL_BIN: measure that build instead (e.g. one with symbols, for perf or heaptrack).
if [ -n "${VIGIL_BIN:-}" ]; then
    bin_src=$VIGIL_BIN
else
    cargo build --release --quiet --bin vigil
    bin_src=$PWD/target/release/vigil
fi
work=$(mktemp -d /tmp/vigil-sbs-XXXXXX)   # short: socket paths must stay under 107 bytes
chmod 755 "$work"
chown postgres: "$work"
: > "$work/pids"
cleanup() {
    set +e
    # Every daemon and loop started here, by the pids recorded as they started.
    for p in $(cat "$work/pids" 2>/dev/null); do kill "$p" 2>/dev/null; done
    sleep 0.5
    for p in $(cat "$work/pids" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    for d in standby primary; do pg_stop "$work/$d"; done
    # The daemons' cgroups, empty once they are gone.
    for g in /sys/fs/cgroup/"$(basename "$work")"-* /sys/fs/cgroup/cpuacct/"$(basename "$work")"-*; do
        [ -d "$g" ] && rmdir "$g" 2>/dev/null
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Every daemon here runs with a clean environment, pg-server.sh's functions included.
as_pg() { runuser -u postgres -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$work" LC_ALL=C "$@"; }
pgdir() { install -d -m "$1" -o postgres -g postgres "${@:2}"; }
raw() { echo "$*" >> "$RESULTS"; }
: > "$RESULTS"
raw "# vigil side-by-side $(date -u +%FT%TZ) on $(hostname), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
raw "IDLE_SECS=$IDLE_SECS"; raw "WARM_SECS=$WARM_SECS"; raw "LAT_SECS=$LAT_SECS"
raw "START_TRIALS=$START_TRIALS"

# The agent runs from the temp dir: the postgres user may not traverse the checkout.
install -m 755 "$bin_src" "$work/vigil"
bin=$work/vigil

# ---------------------------------------------------------------- helpers (python) ----
cat > "$work/h.py" <<'PY'
import json, os, pwd, signal, socket, subprocess, sys, time

HZ = os.sysconf("SC_CLK_TCK")

def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []

def tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out

def ticks(pid):
    """utime + stime + cutime + cstime: the process, its threads, its reaped children."""
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(x) for x in f[11:15])

CGROUPS = os.environ.get("SBS_CGROUPS", "")
START_TRIALS = max(1, int(os.environ.get("START_TRIALS", "5")))

def cgroup_usage(pid):
    """CPU seconds from the cgroup launch() put pid in, or None (no cgroup for it)."""
    try:
        path = json.load(open(CGROUPS)).get(str(pid))
    except (OSError, ValueError):
        return None
    if not path:
        return None
    if os.path.exists(f"{path}/cpu.stat"):  # cgroup v2
        for l in open(f"{path}/cpu.stat"):
            if l.startswith("usage_usec "):
                return int(l.split()[1]) / 1e6
        return None
    return int(open(f"{path}/cpuacct.usage").read()) / 1e9  # cgroup v1 cpuacct

def cpu(pids):
    """CPU seconds of each daemon with everything it forked: its cgroup's counter, else
    the ticks of its tree (live descendants counted once each)."""
    t = 0.0
    for r in pids:
        u = cgroup_usage(r)
        t += u if u is not None else sum(ticks(p) for p in tree(r)) / HZ
    return t

def new_cgroup(name):
    """A new CPU-accounting cgroup (v2, else v1 cpuacct), or None when neither is there."""
    for root, probe in (("/sys/fs/cgroup", "cgroup.controllers"), ("/sys/fs/cgroup/cpuacct", "cpuacct.usage")):
        if os.path.exists(f"{root}/{probe}"):
            path = f"{root}/{name}"
            try:
                os.mkdir(path)
            except FileExistsError:
                pass
            except OSError:
                return None
            return path
    return None

def kib(pids, file, field):
    """A KiB field of /proc/PID/FILE summed over pids themselves (not a transient child
    such as pgbackrest)."""
    t = 0
    for p in pids:
        for l in open(f"/proc/{p}/{file}"):
            if l.startswith(field):
                t += int(l.split()[1])
    return t

def rss(pids):
    """VmRSS in KiB."""
    return kib(pids, "status", "VmRSS:")

def pss(pids):
    """Pss in KiB from smaps_rollup: shared pages (libc, a binary two processes map) count
    by the share each process has, so it is what the host pays."""
    return kib(pids, "smaps_rollup", "Pss:")

def get(port, path):
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        head = s.recv(64)
        return int(head.split()[1])
    finally:
        s.close()

def start(spec):
    """Starts every daemon of a phase at one instant (setuid postgres between fork and
    exec, no runuser in the timing), then polls each URL every 1 ms until a 200: returns
    the processes and the milliseconds to each URL's first 200."""
    pw = pwd.getpwnam("postgres")
    procs = {}
    t0 = time.perf_counter()
    for d in spec["daemons"]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": spec["home"], "LC_ALL": "C"}
        env.update(d.get("env", {}))
        p = subprocess.Popen(d["argv"], env=env, cwd=spec["home"], user=pw.pw_uid,
                             group=pw.pw_gid, extra_groups=[], stdin=subprocess.DEVNULL,
                             stdout=open(d["log"], "a"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs[d["name"]] = p
        with open(spec["pids"], "a") as f:  # at once, for the cleanup trap
            f.write(f"{p.pid}\n")
    pending = list(spec["probes"])  # [name, port, path]
    done = {}
    deadline = t0 + spec.get("timeout", 30)
    while pending and time.perf_counter() < deadline:
        for pr in list(pending):
            name, port, path = pr
            try:
                if get(port, path) == 200:
                    done[name] = (time.perf_counter() - t0) * 1000
                    pending.remove(pr)
            except (OSError, ValueError, IndexError):
                pass
        time.sleep(0.001)
    return procs, done

def stop(spec, procs):
    """SIGTERM to each daemon's session (what it forked too), SIGKILL after 10 s; the pids
    leave the cleanup list once reaped, since they may be reused."""
    for p in procs.values():
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs.values():
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    gone = {str(p.pid) for p in procs.values()}
    with open(spec["pids"]) as f:
        keep = [l for l in f if l.strip() not in gone]
    with open(spec["pids"], "w") as f:
        f.writelines(keep)

def launch(spec_file):
    """Starts the phase's daemons START_TRIALS times, stopping all but the last start:
    one start's time swings with whatever else the machine does in those milliseconds
    (8 to 16 ms for the same build in two runs), so the figure is the median. Prints
    `first200 NAME MS` (the median; `none` if any start missed), `first200_trials NAME
    MS,MS,...` per URL and `pid NAME PID` per daemon of the start that stays."""
    spec = json.load(open(spec_file))
    prefix = os.path.basename(os.path.dirname(os.path.abspath(spec_file)))
    peer = os.path.basename(spec_file).rsplit(".", 1)[0]
    trials = {name: [] for name, _, _ in spec["probes"]}
    for n in range(START_TRIALS):
        procs, done = start(spec)
        for name in trials:
            trials[name].append(done.get(name))
        if n < START_TRIALS - 1:
            stop(spec, procs)
    # Each daemon into a cgroup of its own, now that the first 200s are timed: a move
    # waits for an RCU grace period (11 ms measured) during which the daemon cannot
    # start threads, which would count in its start-up time. What it forked before the
    # move (a first pgbackrest run) stays outside, but that is in the warm-up.
    for d in spec["daemons"]:
        p = procs[d["name"]]
        cg = new_cgroup(f"{prefix}-{peer}-{d['name']}") if CGROUPS else None
        if cg:
            try:
                with open(f"{cg}/cgroup.procs", "w") as f:
                    f.write(str(p.pid))
                groups = json.load(open(CGROUPS)) if os.path.exists(CGROUPS) else {}
                groups[str(p.pid)] = cg
                json.dump(groups, open(CGROUPS, "w"))
            except OSError:
                pass
    for name, p in procs.items():
        print(f"pid {name} {p.pid}")
    for name, ts in trials.items():
        ok = sorted(t for t in ts if t is not None)
        med = f"{ok[len(ok) // 2]:.2f}" if len(ok) == len(ts) else "none"
        print(f"first200 {name} {med}")
        print(f"first200_trials {name} " + ",".join(f"{t:.2f}" if t is not None else "none" for t in ts))

if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "cpu":  # the total, then each tree's own
        pids = [int(p) for p in sys.argv[2:]]
        print(" ".join(f"{cpu(g):.4f}" for g in [pids] + ([[p] for p in pids] if len(pids) > 1 else [])))
    elif cmd == "rss":
        print(rss([int(p) for p in sys.argv[2:]]))
    elif cmd == "pss":
        print(pss([int(p) for p in sys.argv[2:]]))
    elif cmd == "launch":
        launch(sys.argv[2])
    elif cmd == "now":
        print(f"{time.time():.3f}")
PY
h() { SBS_CGROUPS="$work/cgroups.json" START_TRIALS=$START_TRIALS python3 "$work/h.py" "$@"; }

# ------------------------------------------------ PostgreSQL 15 pair + pgBackRest ----
pgdir 700 "$work/primary" "$work/standby"
pgdir 755 "$work/run-primary" "$work/run-standby" "$work/pgbr" "$work/pgbr/repo" "$work/pgbr/log" "$work/pgbr/lock"
pport=$(free_port)
sport=$(free_port)
pgbr_conf=$work/pgbr/pgbackrest.conf
cat > "$pgbr_conf" <<EOF
[global]
repo1-path=$work/pgbr/repo
log-path=$work/pgbr/log
lock-path=$work/pgbr/lock
start-fast=y
repo1-retention-full=9999
log-level-console=warn
log-level-file=off
archive-timeout=60

[main]
pg1-path=$work/primary
pg1-port=$pport
pg1-socket-path=$work/run-primary
pg1-user=postgres
EOF
chown postgres: "$pgbr_conf"
chmod 644 "$pgbr_conf"

echo "starting PostgreSQL 15 primary (port $pport) and standby (port $sport) in $work"
pg_init "$work/primary" postgres -E UTF8 --locale=C --no-instructions
cat > "$work/primary/pg_hba.conf" <<EOF
local all all trust
host all all 127.0.0.1/32 trust
local replication all trust
host replication all 127.0.0.1/32 trust
EOF
pg_listen "$work/primary" "$pport" "$work/run-primary"
cat >> "$work/primary/postgresql.conf" <<EOF
# side-by-side bench
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
shared_buffers = 16MB
max_connections = 30
archive_mode = on
archive_command = 'pgbackrest --config=$pgbr_conf --stanza=main archive-push %p'
wal_receiver_status_interval = 1s
cluster_name = 'sbs_primary'
EOF
pg_start "$work/primary" "$work/primary.log"
as_pg pgbackrest --config="$pgbr_conf" --stanza=main stanza-create
as_pg pgbackrest --config="$pgbr_conf" --stanza=main backup --type=full
as_pg "$pgbin/pg_basebackup" -h 127.0.0.1 -p "$pport" -U postgres -R -X stream -c fast \
    -N -C -S sbs_standby -D "$work/standby"
pg_listen "$work/standby" "$sport" "$work/run-standby"
cat >> "$work/standby/postgresql.conf" <<EOF
cluster_name = 'sbs_standby'
EOF
pg_start "$work/standby" "$work/standby.log"
psql_p() { as_pg "$pgbin/psql" -X -A -t -q -h "$work/run-$1" -p "$2" -U postgres -d postgres -c "$3"; }
for _ in $(seq 300); do
    [ "$(psql_p standby "$sport" "select status from pg_stat_wal_receiver" 2>/dev/null)" = streaming ] && break
    sleep 0.1
done
[ "$(psql_p standby "$sport" "select status from pg_stat_wal_receiver")" = streaming ] ||
    { echo "standby is not streaming:" >&2; tail -20 "$work/standby.log" >&2; exit 1; }
echo "pair up, standby streaming; $(as_pg pgbackrest --config="$pgbr_conf" --stanza=main info | grep -c 'full backup') full backup in the repository"

# The agent's configuration: the full host, PostgreSQL and backup check set, on both
# servers of the pair.
vport=$(free_port)
pdsn="host=$work/run-primary port=$pport user=postgres dbname=postgres"
sdsn="host=$work/run-standby port=$sport user=postgres dbname=postgres"
pgdir 755 "$work/vigil-state"
cat > "$work/vigil.toml" <<EOF
[agent]
state_dir = "$work/vigil-state"
interval = "15s"

[api]
listen = "127.0.0.1:$vport"
admin_socket = "$work/vigil-admin.sock"

[log]
level = "warn"

[check.disk.root]
path = "/"

# Loose load thresholds: this measures cost, and a build machine's load must not turn
# /health into a 503 (which would time the wrong path).
[check.system.host]
warn = 50.0
crit = 100.0

[check.process.postgres]
pidfile = "$work/primary/postmaster.pid"
min = 1
max = 1

[check.kernel.kernel]
deny = []

[check.postgres.up.pg-up]
dsn = "$pdsn"

[check.postgres.replication.pg-replication]
dsn = "$pdsn"
min_standbys = 1

[check.postgres.slots.pg-slots]
dsn = "$pdsn"

[check.postgres.archiving.pg-archiving]
dsn = "$pdsn"

[check.postgres.connections.pg-connections]
dsn = "$pdsn"

[check.postgres.wraparound.pg-wraparound]
dsn = "$pdsn"

[check.postgres.long_transactions.pg-long-transactions]
dsn = "$pdsn"

[check.postgres.replication.pg-standby-replication]
dsn = "$sdsn"

# At the kind's default interval (5 minutes), as monit's "every 20 cycles" below.
[check.backup.pgbackrest.pgbackrest]
stanza = "main"
config = "$pgbr_conf"
EOF
chown postgres: "$work/vigil.toml"
as_pg "$bin" config check -c "$work/vigil.toml" >/dev/null

# SBS_HOOK=CMD: run CMD against the pair instead of the comparison, then stop the pair
# (benches/hot-text.sh profiles the agent this way). CMD finds the pair in SBS_WORK: the
# agent's config in vigil.toml, the servers' sockets in run-primary and run-standby.
if [ -n "${SBS_HOOK:-}" ]; then
    SBS_WORK=$work "$SBS_HOOK"
    exit
fi

pm_pids() { head -1 "$work/primary/postmaster.pid"; head -1 "$work/standby/postmaster.pid"; }
# Cluster CPU: both postmasters, their live children, and (cutime/cstime) every backend,
# archiver run and walsender already reaped.
cluster_cpu() { h cpu $(pm_pids); }

# ------------------------------------------------------------------------ the soak ----
# SOAK_SECS=3600: instead of the comparison, run vigil alone for that long with the full
# check set at a 1 s interval and heartbeats every second to a release `vigil control`
# (file store) on loopback. RSS, open fds and threads of both are recorded every minute;
# at the end every seq the agent made must be stored (the control plane's seq equals the
# agent's, nothing spooled, dropped or rejected).
if [ -n "${SOAK_SECS:-}" ]; then
    cport=$(free_port)
    vport=$(free_port)
    pdsn="host=$work/run-primary port=$pport user=postgres dbname=postgres"
    sdsn="host=$work/run-standby port=$sport user=postgres dbname=postgres"
    pgdir 700 "$work/vigil-state" "$work/control-state"
    printf '%s\n' '[control]' "listen = \"127.0.0.1:$cport\"" \
        "state_dir = \"$work/control-state\"" 'overdue_after = "10s"' '' \
        '[log]' 'level = "warn"' > "$work/control.toml"
    {
        printf '%s\n' '[agent]' 'host_id = "soak-host"' "state_dir = \"$work/vigil-state\"" \
            'interval = "1s"' '' '[api]' "listen = \"127.0.0.1:$vport\"" \
            "admin_socket = \"$work/vigil-admin.sock\"" '' '[log]' 'level = "warn"' '' \
            '[heartbeat]' "url = \"http://127.0.0.1:$cport/v1/heartbeats\"" 'interval = "1s"' '' \
            '[check.disk.root]' 'path = "/"' '' \
            '[check.system.host]' 'warn = 50.0' 'crit = 100.0' '' \
            '[check.process.postgres]' "pidfile = \"$work/primary/postmaster.pid\"" '' \
            '[check.kernel.kernel]' '' \
            '[check.backup.pgbackrest.pgbackrest]' 'stanza = "main"' "config = \"$pgbr_conf\"" ''
        for k in up replication slots archiving connections wraparound long_transactions; do
            printf '%s\n' "[check.postgres.$k.pg-${k//_/-}]" "dsn = \"$pdsn\"" ''
        done
        printf '%s\n' '[check.postgres.replication.pg-standby-replication]' "dsn = \"$sdsn\""
    } > "$work/vigil.toml"
    chown postgres: "$work/vigil.toml" "$work/control.toml"
    pub=$(as_pg "$bin" keygen --out "$work/vigil-state/heartbeat.key" | sed -n 's/^public_key = "\(.*\)"/\1/p')
    as_pg "$bin" control enroll -c "$work/control.toml" --host soak-host --pubkey "$pub" >/dev/null
    as_pg "$bin" control -c "$work/control.toml" 2> "$work/control.log" &
    echo $! >> "$work/pids"
    # shellcheck disable=SC2086 # SOAK_WRAP is a command line, split on purpose
    as_pg ${SOAK_WRAP:-} "$bin" agent -c "$work/vigil.toml" 2> "$work/vigil.log" &
    echo $! >> "$work/pids"
    for _ in $(seq 50); do
        vpid=$(pgrep -u postgres -f "^$bin agent -c $work/vigil.toml" | head -1 || true)
        cpid=$(pgrep -u postgres -f "control -c $work/control.toml" | head -1 || true)
        [ -n "$vpid" ] && [ -n "$cpid" ] && break
        sleep 0.1
    done
    echo "$vpid $cpid" >> "$work/pids"
    echo "soak: agent $vpid, control plane $cpid, for ${SOAK_SECS}s"
    t0=$(date +%s)
    sample() { # label
        raw "soak.$1 t=$(($(date +%s) - t0))s" \
            "agent_rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$vpid/status")" \
            "agent_fds=$(ls "/proc/$vpid/fd" | wc -l) agent_threads=$(ls "/proc/$vpid/task" | wc -l)" \
            "control_rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$cpid/status")" \
            "control_fds=$(ls "/proc/$cpid/fd" | wc -l)"
        tail -1 "$RESULTS"
    }
    sleep 60
    sample start
    while [ $(($(date +%s) - t0)) -lt "$SOAK_SECS" ]; do
        sleep 60
        sample minute
    done
    sample end
    # Stop the agent (SIGTERM sends a last heartbeat), then compare what it made with
    # what the control plane stored.
    hb=$(curl -s "127.0.0.1:$vport/heartbeat")
    kill "$vpid"
    for _ in $(seq 100); do [ -d "/proc/$vpid" ] || break; sleep 0.1; done
    host=$(curl -s "127.0.0.1:$cport/v1/hosts/soak-host")
    accepted=$(curl -s "127.0.0.1:$cport/metrics" | awk '/^vigil_control_heartbeats_accepted_total/ {print $2}')
    # Every seq stored once: the stored seq equals the count accepted (seqs start at 1).
    raw "soak.result seq_before_stop=$(jq .seq <<< "$hb")" \
        "stored_seq=$(jq .seq <<< "$host") accepted_total=$accepted" \
        "spooled=$(jq .spooled <<< "$hb") dropped=$(jq -c .dropped <<< "$hb")" \
        "rejected=$(jq .rejected <<< "$hb") failures=$(jq -c .failures <<< "$hb")"
    tail -1 "$RESULTS"
    echo "results: $RESULTS"
    exit 0
fi

# -------------------------------------------------------------------- the peers ----
record() { raw "$1=$2"; }   # one raw number: peer.measure[.process]=value

run_wrk() { # url threads conns secs [--latency] → wrk's output
    wrk -t"$2" -c"$3" -d"$4"s ${5:-} "$1" 2>&1
}
wrk_ms() { # wrk --latency output, percentile → ms
    awk -v p="$2%" '$1 == p {
        v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v)
        printf "%.3f", v * (u == "us" ? 0.001 : u == "ms" ? 1 : u == "s" ? 1000 : u == "m" ? 60000 : 1) }' <<< "$1"
}
wrk_rps() { awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<< "$1"; }
wrk_bad() { awk '/Non-2xx or 3xx responses:/ {n=$NF} /Socket errors:/ {e=$0} END {print (n ? n : 0) (e ? " (" e ")" : "")}' <<< "$1"; }

latency() { # peer.key url
    local out
    out=$(run_wrk "$2" 1 1 "$LAT_SECS" --latency)
    raw "# wrk -t1 -c1 -d${LAT_SECS}s --latency $2"; sed 's/^/#   /' <<< "$out" >> "$RESULTS"
    record "$1.p50_ms" "$(wrk_ms "$out" 50)"
    record "$1.p99_ms" "$(wrk_ms "$out" 99)"
    record "$1.lat_requests" "$(awk '/requests in/ {print $1}' <<< "$out")"
}
throughput() { # peer.key url
    local out
    out=$(run_wrk "$2" 2 16 10)
    raw "# wrk -t2 -c16 -d10s $2"; sed 's/^/#   /' <<< "$out" >> "$RESULTS"
    record "$1.rps" "$(wrk_rps "$out")"
    record "$1.non2xx" "$(wrk_bad "$out")"
}

stop_pids() {
    local p
    for p in "$@"; do kill "$p" 2>/dev/null || true; done
    for _ in $(seq 100); do
        local alive=0
        for p in "$@"; do [ -e "/proc/$p" ] && [ "$(awk '{print $3}' "/proc/$p/stat")" != Z ] && alive=1; done
        [ $alive = 0 ] && return
        sleep 0.1
    done
    for p in "$@"; do kill -9 "$p" 2>/dev/null || true; done
}
forget_pids() { # gone: not for the cleanup to signal again (the pid may be reused)
    local p
    for p in "$@"; do sed -i "/^$p\$/d" "$work/pids"; done
}

# launch PEER SPEC_JSON: starts the phase's daemons, records first-200 times, sets PIDS.
launch() {
    local peer=$1 out k name v
    echo "$2" > "$work/$peer.json"
    out=$(h launch "$work/$peer.json")
    PIDS=() NAMES=()
    while read -r k name v; do
        case $k in
            pid) PIDS+=("$v") NAMES+=("$name"); record "$peer.pid.$name" "$v" ;;
            first200) record "$peer.first200_ms.$name" "$v" ;;
            first200_trials) record "$peer.first200_trials_ms.$name" "$v" ;;
        esac
    done <<< "$out"
    if grep -qs "\"${PIDS[0]:-none}\"" "$work/cgroups.json"; then
        record "$peer.cpu_source" cgroup
    else
        record "$peer.cpu_source" ticks
    fi
}

# idle PEER [PID...]: warm-up, then IDLE_SECS: CPU of the daemons (in all and, for a
# peer of several, each; NAMES from launch), cluster CPU, and RSS at the end.
idle() {
    local peer=$1; shift
    echo "  $peer: warm-up ${WARM_SECS}s, idle ${IDLE_SECS}s"
    sleep "$WARM_SECS"
    local t0 c0 p0 t1 c1 p1 i
    t0=$(h now); c0=($( [ $# -gt 0 ] && h cpu "$@" || echo 0)); p0=$(cluster_cpu)
    sleep "$IDLE_SECS"
    t1=$(h now); c1=($( [ $# -gt 0 ] && h cpu "$@" || echo 0)); p1=$(cluster_cpu)
    IDLE_T0=$t0 IDLE_T1=$t1   # the window, for the scrape count
    d() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.4f", a - b}'; }
    record "$peer.idle_wall_s" "$(awk -v a="$t1" -v b="$t0" 'BEGIN {printf "%.3f", a - b}')"
    record "$peer.daemon_cpu_s" "$(d "${c1[0]}" "${c0[0]}")"
    for ((i = 1; i < ${#c0[@]}; i++)); do
        record "$peer.daemon_cpu_s.${NAMES[i-1]}" "$(d "${c1[i]}" "${c0[i]}")"
        record "$peer.rss_kib.${NAMES[i-1]}" "$(h rss "${!i}")"
    done
    record "$peer.cluster_cpu_s" "$(d "$p1" "$p0")"
    [ $# -gt 0 ] && record "$peer.rss_kib" "$(h rss "$@")" && record "$peer.pss_kib" "$(h pss "$@")"
    return 0
}

# --- baseline
echo "phase baseline: the idle pair alone"
idle baseline

# --- vigil
if want vigil; then
echo "phase vigil: $bin agent on 127.0.0.1:$vport"
launch vigil "{\"pids\": \"$work/pids\", \"home\": \"$work\", \"daemons\": [
  {\"name\": \"vigil\", \"argv\": [\"$bin\", \"agent\", \"-c\", \"$work/vigil.toml\"], \"log\": \"$work/vigil.log\"}],
  \"probes\": [[\"live\", $vport, \"/health/live\"], [\"health\", $vport, \"/health\"]]}"
vpids=("${PIDS[@]}")
idle vigil "${vpids[@]}"
raw "# vigil /checks after the idle phase:"
curl -s "127.0.0.1:$vport/checks" | python3 -c 'import json,sys
for c in json.load(sys.stdin): print("#   %-24s %-8s %s" % (c["name"], c["status"], c["message"]))' >> "$RESULTS" || true
latency vigil.metrics "http://127.0.0.1:$vport/metrics"
throughput vigil.health "http://127.0.0.1:$vport/health"
stop_pids "${vpids[@]}"
forget_pids "${vpids[@]}"
fi

# --- node_exporter + postgres_exporter
if want exporters; then
nport=$(free_port)
eport=$(free_port)
echo "phase exporters: node_exporter on $nport, postgres_exporter on $eport, scraped every 15 s"
launch exporters "{\"pids\": \"$work/pids\", \"home\": \"$work\", \"daemons\": [
  {\"name\": \"node\", \"argv\": [\"$node_exporter\", \"--web.listen-address=127.0.0.1:$nport\"], \"log\": \"$work/node_exporter.log\"},
  {\"name\": \"pg\", \"argv\": [\"$pg_exporter\", \"--web.listen-address=127.0.0.1:$eport\"], \"log\": \"$work/postgres_exporter.log\",
   \"env\": {\"DATA_SOURCE_NAME\": \"$pdsn sslmode=disable\"}}],
  \"probes\": [[\"node\", $nport, \"/metrics\"], [\"pg\", $eport, \"/metrics\"]]}"
epids=("${PIDS[@]}")
# Prometheus' part: one scrape of each every 15 s (its own CPU is not counted).
( while :; do
      date +%s.%N >> "$work/scrapes"
      curl -s -o /dev/null "http://127.0.0.1:$nport/metrics" &
      curl -s -o /dev/null "http://127.0.0.1:$eport/metrics"
      wait
      sleep 15
  done ) &
scraper=$!
echo "$scraper" >> "$work/pids"
idle exporters "${epids[@]}"
record exporters.scrapes_in_window "$(awk -v a="$IDLE_T0" -v b="$IDLE_T1" '$1 >= a && $1 < b {n++} END {print n + 0}' "$work/scrapes")"
raw "# postgres_exporter pg_up: $(curl -s "127.0.0.1:$eport/metrics" | awk '$1 == "pg_up" {print $2}')"
scrape_children=$(pgrep -P "$scraper" || true)
kill "$scraper" $scrape_children 2>/dev/null || true
wait "$scraper" 2>/dev/null || true
forget_pids "$scraper"
latency exporters.node_metrics "http://127.0.0.1:$nport/metrics"
latency exporters.pg_metrics "http://127.0.0.1:$eport/metrics"
throughput exporters.node_root "http://127.0.0.1:$nport/"
throughput exporters.pg_root "http://127.0.0.1:$eport/"
stop_pids "${epids[@]}"
forget_pids "${epids[@]}"
fi

# --- monit
if want monit; then
mport=$(free_port)
pgdir 755 "$work/monit"
cat > "$work/monit/monitrc" <<EOF
set daemon 15
set logfile $work/monit/log
set pidfile $work/monit/pid
set idfile $work/monit/id
set statefile $work/monit/state
set httpd port $mport and use address 127.0.0.1
    allow localhost

check system sbs_host
    if loadavg (5min) per core > 4 then alert
    if memory usage > 90% then alert

check filesystem root with path /
    if space usage > 90% then alert

check process postgres with pidfile $work/primary/postmaster.pid

check host pg_primary with address 127.0.0.1
    if failed port $pport protocol pgsql then alert

check host pg_standby with address 127.0.0.1
    if failed port $sport protocol pgsql then alert

check program pgbackrest with path "/usr/bin/pgbackrest --config=$pgbr_conf --stanza=main info" timeout 60 seconds
    every 20 cycles
    if status != 0 then alert
EOF
chown postgres: "$work/monit/monitrc"
chmod 600 "$work/monit/monitrc"
as_pg "$monit_bin" -t -c "$work/monit/monitrc" >/dev/null
echo "phase monit: set daemon 15, httpd on $mport"
launch monit "{\"pids\": \"$work/pids\", \"home\": \"$work/monit\", \"daemons\": [
  {\"name\": \"monit\", \"argv\": [\"$monit_bin\", \"-I\", \"-c\", \"$work/monit/monitrc\"], \"log\": \"$work/monit/stdout\"}],
  \"probes\": [[\"monit\", $mport, \"/_status?format=xml\"]]}"
mpids=("${PIDS[@]}")
idle monit "${mpids[@]}"
raw "# monit status after the idle phase:"
curl -s "127.0.0.1:$mport/_status" | sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/#   /' >> "$RESULTS"
latency monit.status_xml "http://127.0.0.1:$mport/_status?format=xml"
throughput monit.status "http://127.0.0.1:$mport/_status"
stop_pids "${mpids[@]}"
forget_pids "${mpids[@]}"
fi

# --- binaries
record vigil.binary_bytes "$(stat -c %s "$bin_src")"
record exporters.binary_bytes.node "$(stat -Lc %s "$node_exporter")"
record exporters.binary_bytes.pg "$(stat -Lc %s "$pg_exporter")"
record monit.binary_bytes "$(stat -Lc %s "$monit_bin")"

# -------------------------------------------------------------------- the table ----
python3 - "$RESULTS" <<'PY' | tee -a "$RESULTS.md"
import sys
R = {}
for l in open(sys.argv[1]):
    if l.startswith("#") or "=" not in l or " " in l.split("=", 1)[0]:
        continue
    k, v = l.rstrip("\n").split("=", 1)
    R[k] = v
def num(k):
    try:
        return float(R[k])
    except (KeyError, ValueError):
        return None
# A phase left out by PHASES has no numbers: every figure built from one is None.
def per_min(peer, k):
    v, w = num(f"{peer}.{k}"), num(f"{peer}.idle_wall_s")
    return None if v is None or not w else v * 60 / w
def add(*xs):
    return None if any(x is None for x in xs) else sum(xs)
def half(x):
    return None if x is None else x / 2
base_min = per_min("baseline", "cluster_cpu_s")
def caused(peer):
    c = per_min(peer, "cluster_cpu_s")
    return None if c is None else c - base_min
mib = lambda k: num(k) / 1024 if num(k) is not None else None

rows = []  # (measure, vigil, node, pg, exporters together, monit, target, fmt, higher_is_better)
v_cpu = per_min("vigil", "daemon_cpu_s")
e_cpu = per_min("exporters", "daemon_cpu_s")
m_cpu = per_min("monit", "daemon_cpu_s")
rows.append(("steady RSS, MiB", mib("vigil.rss_kib"), mib("exporters.rss_kib.node"), mib("exporters.rss_kib.pg"),
             mib("exporters.rss_kib"), mib("monit.rss_kib"), ("≤", 6.0), "{:.2f}", False))
rows.append(("steady PSS (shared pages by share), MiB", mib("vigil.pss_kib"), None, None,
             mib("exporters.pss_kib"), mib("monit.pss_kib"), None, "{:.2f}", False))
rows.append(("CPU s per idle minute, daemon + children", v_cpu, per_min("exporters", "daemon_cpu_s.node"),
             per_min("exporters", "daemon_cpu_s.pg"), e_cpu, m_cpu, ("≤", half(m_cpu)), "{:.3f}", False))
# Only postgres_exporter talks to PostgreSQL: the pair's share is all its own.
rows.append(("CPU s per idle minute, PostgreSQL work caused (vs baseline)", caused("vigil"), None,
             caused("exporters"), caused("exporters"), caused("monit"), None, "{:+.3f}", False))
# A negative "caused" is the cluster's own variation between phases, larger than what the
# peer adds: the total is then not resolved by this run, and none is shown.
def total(cpu, c):
    return None if c is not None and c < 0 else add(cpu, c)
vt, et, mt = total(v_cpu, caused("vigil")), total(e_cpu, caused("exporters")), total(m_cpu, caused("monit"))
rows.append(("CPU s per idle minute, total", vt, None, None, et, mt, ("≤", half(mt)), "{:.3f}", False))
def lat(q):
    n, p = num(f"exporters.node_metrics.{q}"), num(f"exporters.pg_metrics.{q}")
    return (num(f"vigil.metrics.{q}"), n, p, add(n, p),
            num(f"monit.status_xml.{q}"))
rows.append(("/metrics latency p50, ms", *lat("p50_ms"), None, "{:.3f}", False))
rows.append(("/metrics latency p99, ms", *lat("p99_ms"), ("≤", 0.5), "{:.3f}", False))
n, p = num("exporters.node_root.rps"), num("exporters.pg_root.rps")
rows.append(("health endpoint, req/s (wrk -t2 -c16)", num("vigil.health.rps"), n, p,
             max(n, p) if n is not None and p is not None else None, num("monit.status.rps"), ("≥", 50000), "{:,.0f}", True))
n, p = num("exporters.first200_ms.node"), num("exporters.first200_ms.pg")
rows.append(("exec → first 200, ms (vigil /health/live)", num("vigil.first200_ms.live"), n, p,
             max(n, p) if n is not None and p is not None else None, num("monit.first200_ms.monit"), ("≤", 10), "{:.1f}", False))
# /health is 200 only once every check has a sample (a health answer must rest on one): no
# target, the time is the first round's.
rows.append(("exec → first 200, ms (vigil /health, first round done)", num("vigil.first200_ms.health"), n, p,
             max(n, p) if n is not None and p is not None else None, num("monit.first200_ms.monit"), None, "{:.1f}", False))
b = lambda k: num(k) / 1048576
rows.append(("binary size, MiB", b("vigil.binary_bytes"), b("exporters.binary_bytes.node"), b("exporters.binary_bytes.pg"),
             add(b("exporters.binary_bytes.node"), b("exporters.binary_bytes.pg")), b("monit.binary_bytes"), None, "{:.2f}", False))

def f(fmt, v):
    return "n/a" if v is None else fmt.format(v)
def ratio(v, peer):
    # A zero or negative figure (a difference from the baseline within the noise) has no
    # meaningful ratio.
    if v is None or peer is None or peer <= 0 or v < 0:
        return "n/a"
    return f"{v / peer:.2f}×"
print()
print(f"## vigil side by side (IDLE_SECS={R.get('IDLE_SECS', '?')}, one run; ratios are vigil ÷ peer)")
print()
print("| measure | vigil | target | node_exporter | postgres_exporter | node+pg exporters | monit | vs node+pg exporters | vs monit |")
print("|---|---|---|---|---|---|---|---|---|")
for name, v, n, p, e, m, target, fmt, hib in rows:
    t = ""
    if target is not None and v is not None and target[1] is not None:
        op, tv = target
        ok = v <= tv if op == "≤" else v >= tv
        t = f"{op} {fmt.format(tv)} {'✅' if ok else '❌'}"
    print(f"| {name} | {f(fmt, v)} | {t} | {f(fmt, n)} | {f(fmt, p)} | {f(fmt, e)} | {f(fmt, m)} | {ratio(v, e)} | {ratio(v, m)} |")
print()
head = open(sys.argv[1]).readline().lstrip("# ").strip()
tick = 0.01 * 60 / num("baseline.idle_wall_s")
sources = {R.get(f"{p}.cpu_source") for p in ("vigil", "exporters", "monit")} - {None}
if sources == {"cgroup"}:
    cpu_note = ("Each daemon's CPU is its own cgroup's usage counter (nanoseconds;\n"
                "  exited threads and every pgbackrest run it forked included).\n  ")
else:
    cpu_note = ("Daemon CPU is in clock ticks as the cluster's below (no cgroup could be\n"
                "  made for " + ", ".join(sorted(sources - {"cgroup"})) + ").\n  ")
print(f"""Notes ({head}):
- Baseline (idle pair, no peer): {per_min('baseline', 'cluster_cpu_s'):.3f} CPU s per minute; "PostgreSQL work caused"
  is a phase's cluster CPU minus that, per minute.
  {cpu_note}The cluster's CPU comes from /proc/PID/stat in clock ticks (10 ms), each
  process good to about ±{tick:.3f} s per minute at IDLE_SECS={R.get('IDLE_SECS')}; with some 15
  processes the cluster is good to several times that, so a small or negative "caused"
  is noise; a longer IDLE_SECS narrows it.
- exec → first 200 is the median of {R.get('START_TRIALS')} starts, each but the last stopped once
  timed; every start's time is in the raw numbers (*.first200_trials_ms.*).
- node+pg exporters: RSS, CPU and binary size are sums; /metrics latency is the sum of
  both scrapes (Prometheus needs both for the data vigil serves in one); first 200 is the
  later of the two medians (started at the same instant); the health row is the faster of their
  landing pages `/` (neither has a health endpoint).
- monit has no /metrics: its latency rows are its status page `/_status?format=xml`, its
  health row is `/_status`, its first 200 is `/_status?format=xml` on its httpd.
- Scrapes of the exporters inside the idle window: {R.get('exporters.scrapes_in_window')}.""")
PY
echo
echo "raw numbers: $RESULTS (table also in $RESULTS.md)"
