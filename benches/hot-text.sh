#!/usr/bin/env bash
# Regenerates src/hot-text.ld, the list of functions the agent runs, which the release
# build links first and together (src/build.rs).
#
# Why: most of an idle agent's RSS is its own code pages, and the kernel maps code a
# whole page-cache folio (64-256 KiB here) at a time. In the compiler's order the few
# hundred functions a round runs are spread over every folio of the 4.3 MiB text, so all
# of it became resident; packed together they fill about a third of it.
#
# How: side-by-side.sh starts its PostgreSQL primary + standby and pgBackRest repository
# and calls this script back (SBS_HOOK) with its agent configuration, to which this adds
# signed heartbeats over TLS to a local `vigil control`. Then:
#   1. the agent runs under valgrind's callgrind for PROFILE_SECS while the API is
#      scraped and the config reloaded: every function it runs becomes a pattern;
#   2. the same workload runs natively with the new layout, and every page fault in the
#      rest of the text names a function valgrind did not see (pidfd reaping, contended
#      locks); those are added, up to PASSES times, until no fault lands there.
# Patterns leave out the parts of a symbol that change between builds (the legacy hash,
# v0 crate disambiguators and back-references, LTO's .NNNN suffixes), so the file keeps
# working across dependency and compiler updates; a pattern that matches nothing costs
# nothing, and a function missing from it is only linked with the rest.
#
# Usage, as root from the repository root (PostgreSQL runs as the postgres user):
#   benches/hot-text.sh                     PROFILE_SECS=90 PASSES=3
# Needs valgrind, perf and openssl, besides what side-by-side.sh needs.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE_SECS=${PROFILE_SECS:-90}
PASSES=${PASSES:-3}
target=$PWD/target/hot-text
bin=$target/release/vigil

# The release build, laid out by the current src/hot-text.ld, with its symbols: their
# names are what the patterns are made from. VIGIL_KEEP_SYMBOLS only drops the linker's
# --strip-all (src/build.rs); any profile change would rename the functions LTO merges.
build() {
    VIGIL_KEEP_SYMBOLS=1 cargo build --release --quiet --bin vigil --target-dir "$target"
}

if [ -z "${SBS_WORK:-}" ]; then
    for t in valgrind perf openssl; do
        command -v "$t" >/dev/null || { echo "hot-text: needs $t" >&2; exit 1; }
    done
    build
    SBS_HOOK=$PWD/benches/hot-text.sh VIGIL_BIN=$bin exec benches/side-by-side.sh
fi

# ------------------------------------------------------- called back by side-by-side ----
# shellcheck source=benches/pg-server.sh
. benches/pg-server.sh
w=$SBS_WORK
d=$w/hot-text
as_pg() { runuser -u postgres -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$d" LC_ALL=C "$@"; }
install -d -m 755 -o postgres -g postgres "$d" "$d/control-state"
cport=$(free_port)
vport=$(sed -n 's/^listen = "127.0.0.1:\([0-9]*\)"/\1/p' "$w/vigil.toml" | head -1)

# A CA and a certificate for 127.0.0.1: heartbeats go over TLS, as in production.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=hot-text-ca -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=127.0.0.1 \
    -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -days 2 \
    -extfile <(echo "subjectAltName=IP:127.0.0.1") -out "$d/server.pem" 2>/dev/null
printf '%s\n' '[control]' "listen = \"127.0.0.1:$cport\"" "state_dir = \"$d/control-state\"" \
    "tls_cert = \"$d/server.pem\"" "tls_key = \"$d/server.key\"" '' '[log]' 'level = "warn"' \
    > "$d/control.toml"
{
    sed "s|^state_dir = .*|state_dir = \"$d/state\"\nhost_id = \"hot-text\"|" "$w/vigil.toml"
    printf '%s\n' '' '[heartbeat]' "url = \"https://127.0.0.1:$cport/v1/heartbeats\"" \
        "ca_file = \"$d/ca.pem\"" 'interval = "5s"'
} > "$d/vigil.toml"
chown -R postgres: "$d"
install -d -m 700 -o postgres -g postgres "$d/state"
install -m 755 "$bin" "$d/vigil"
pub=$(as_pg "$d/vigil" keygen --out "$d/state/heartbeat.key" | sed -n 's/^public_key = "\(.*\)"/\1/p')
as_pg "$d/vigil" control enroll -c "$d/control.toml" --host hot-text --pubkey "$pub" >/dev/null
as_pg "$d/vigil" control -c "$d/control.toml" 2> "$d/control.log" &
trap 'pkill -u postgres -f "$d/" || true' EXIT

# workload PID: what a production agent does besides its rounds, for PROFILE_SECS.
workload() {
    local end=$((SECONDS + PROFILE_SECS)) hup=$((SECONDS + PROFILE_SECS / 2))
    while [ "$SECONDS" -lt "$end" ] && kill -0 "$1" 2>/dev/null; do
        for path in /health /health/live /checks /metrics /primary /replica?lag=1MB /heartbeat; do
            curl -s -o /dev/null "127.0.0.1:$vport$path" || true
        done
        if [ "$SECONDS" -ge "$hup" ]; then kill -HUP "$1"; hup=$end; fi
        sleep 2
    done
    kill -TERM "$1"   # the last heartbeat and the shutdown are code too
    while kill -0 "$1" 2>/dev/null; do sleep 0.2; done
}
agent_pid() { # the agent's pid, once it runs (under valgrind too: same process)
    local p=""
    for _ in $(seq 100); do
        p=$(pgrep -u postgres -f "$d/vigil agent" | head -1 || true)
        [ -n "$p" ] && break
        sleep 0.1
    done
    echo "$p"
}

cat > "$d/ld.py" <<'PY'
"""hot-text.ld from callgrind outputs and perf page-fault symbol lists."""
import re, sys

def pattern(sym):
    sym = sym.split("'")[0]  # callgrind's recursion marker
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.$]*", sym):
        return None  # callgrind's "0x..." and "(below main)"
    sym = re.sub(r"\.\d+$", "", sym)  # LTO's local copies: .NNNN, new every build
    if sym.startswith("_ZN"):
        sym = re.sub(r"17h[0-9a-f]{16}E$", "", sym)  # legacy: the hash
    elif sym.startswith("_R"):
        sym = re.sub(r"Cs[0-9A-Za-z]+_", "Cs*_", sym)  # v0: crate disambiguators
        sym = re.sub(r"B[0-9A-Za-z]*_", "B*_", sym)  # and back-references (offsets)
    else:
        return ".text." + sym + "*"  # C (ring, compiler builtins): GCC's .constprop.N
    # LLVM puts cold functions (#[cold], hashbrown's rehash) in .text.unlikely.NAME.
    return ".text.*" + sym + "*"

def callgrind(path):
    names, objs, obj = {}, {}, None
    for line in open(path):
        m = re.match(r"^(c?fn|c?ob)=\((\d+)\)(?: (.*))?", line)
        if not m:
            continue
        kind, i, name = m.groups()
        table = objs if kind.endswith("ob") else names
        if name:
            table[i] = name.strip()
        if kind == "ob":
            obj = table[i]
        # valgrind names the binary's text "???" when the layout puts .text.hot first
        elif kind == "fn" and obj and (obj.endswith("/vigil") or obj == "???"):
            yield names[i]

old = sys.argv[1]
seen, pats = set(), []
def add(sym):
    p = pattern(sym)
    if p and p not in seen:
        seen.add(p)
        pats.append(p)
# The current file's patterns stay, in their order (a pass only adds).
for line in open(old):
    m = re.match(r"\s*\*\((\S+)\)$", line)  # the fixed ones are re-added below
    if m and sys.argv[2] != "--fresh":
        seen.add(m.group(1)); pats.append(m.group(1))
for src in sys.argv[3:]:
    for sym in (callgrind(src) if src.endswith(".cg") else open(src).read().split()):
        add(sym)
head = [l for l in open(old) if l.startswith("/*") or l.startswith(" *")]
print("".join(head), end="")
# Kept whatever the profile saw. The C start-up code (_start, frame_dummy, _init) runs
# once, but its objects put it in plain .text and .init, which no function's pattern
# matches: left where the linker puts them, they mapped a folio at each end of the cold
# text. Lock slow paths run only under contention, which a profile may not meet; all of
# them are a few KiB.
crt = ["Scrt1.o", "crti.o", "crtbeginS.o", "crtendS.o", "crtn.o"]
locks = [".text.*parking_lot*", ".text.*futex*", ".text.*4park*", ".text.*Condvar*",
         ".text.*5mutex*"]
pats = [p for p in pats if p not in locks]
print("SECTIONS {\n  .init : { KEEP(*(SORT_NONE(.init))) }\n  .text.hot : {")
for o in crt:
    print(f"    *{o}(.text .text.*)")
for p in locks + pats:
    print(f"    *({p})")
print("  }\n} INSERT BEFORE .text;")
print(f"patterns: {len(pats)}", file=sys.stderr)
PY

# ---- pass 1: every function the agent runs under valgrind
echo "hot-text: callgrind, ${PROFILE_SECS}s"
as_pg valgrind --tool=callgrind --demangle=no --dump-instr=no \
    --callgrind-out-file="$d/agent.cg" "$d/vigil" agent -c "$d/vigil.toml" \
    > "$d/valgrind.log" 2>&1 &
workload "$(agent_pid)"
python3 "$d/ld.py" src/hot-text.ld --fresh "$d/agent.cg" > "$d/hot-text.ld"
cp "$d/hot-text.ld" src/hot-text.ld

# ---- passes 2..: natively, the page faults that still land outside .text.hot
for pass in $(seq 2 "$PASSES"); do
    build
    install -m 755 "$bin" "$d/vigil"
    echo "hot-text: pass $pass, native, ${PROFILE_SECS}s"
    perf record -q -e page-faults -c 1 -d -o "$d/faults.data" -- \
        runuser -u postgres -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$d" LC_ALL=C \
        "$d/vigil" agent -c "$d/vigil.toml" > "$d/agent.log" 2>&1 &
    perf_pid=$!
    workload "$(agent_pid)"
    wait "$perf_pid"
    # The faults in .text (the cold rest) whose instruction is there too: a function
    # the layout left cold. perf's addresses are the mapping's: the mapping of the
    # binary's first page gives the load address.
    perf script -i "$d/faults.data" --no-demangle --show-mmap-events -F addr,ip,sym,dso \
        2>/dev/null | python3 -c '
import re, subprocess, sys
binp, exe = sys.argv[1], sys.argv[2]
secs = {}
for l in subprocess.run(["readelf", "-SW", binp], capture_output=True, text=True).stdout.splitlines():
    m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", l)
    if m:
        secs[m.group(1)] = (int(m.group(2), 16), int(m.group(3), 16))
lo, size = secs[".text"]
bias, cold = None, set()
for l in sys.stdin:
    m = re.search(r"MMAP2? .*\[(0x[0-9a-f]+)\(0x[0-9a-f]+\) @ (?:0|0x0) .*\]: r\S+ (\S+)$", l)
    if m and m.group(2) == exe and bias is None:
        bias = int(m.group(1), 16)
        continue
    m = re.match(r"\s*([0-9a-f]+)\s+.*\((\S+)\)\s+([0-9a-f]+)\s+(\S+)\s+\((\S+)\)\s*$", l)
    if not m or m.group(5) != exe or bias is None:
        continue
    if lo <= int(m.group(1), 16) - bias < lo + size:
        cold.add(m.group(4))
if bias is None:
    sys.exit("hot-text: no mapping of " + exe + " in the perf data")
print("\n".join(sorted(cold)))
' "$bin" "$d/vigil" > "$d/cold-$pass.txt"
    n=$(grep -c . "$d/cold-$pass.txt" || true)
    echo "hot-text: pass $pass: $n functions faulted outside .text.hot"
    [ "$n" -eq 0 ] && break
    python3 "$d/ld.py" src/hot-text.ld --add "$d/cold-$pass.txt" > "$d/hot-text.ld"
    cp "$d/hot-text.ld" src/hot-text.ld
done
echo "hot-text: wrote src/hot-text.ld ($(grep -c '^    \*(' src/hot-text.ld) patterns)"
