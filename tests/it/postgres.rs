//! `postgres.*` checks and the routing endpoints, end to end: a real `vigil agent` against
//! the real PostgreSQL 15 primary and streaming standby of `pgcluster`.
//!
//! The healthy pair and the hung-server test read the shared pair only; every scenario that
//! changes a server (paused replay, a stopped standby, a dead slot, broken archiving, an
//! open transaction, exhausted connections) starts its own cluster, primary-only where the
//! standby plays no part. Checks sample every 300 ms; everything is polled with deadlines,
//! and the assertions are on status codes, JSON fields and metric values, not wording.

// Test helpers may unwrap freely (STYLE §4.4); clippy only exempts #[test] fns.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::pgcluster::{Cluster, ClusterOptions, Node, PG_BIN, STANDBY_NAME, STANDBY_SLOT, shared};
use crate::util::{Agent, free_port, http, tempdir, write_config};

/// Deadline for anything that takes a few samples, a WAL write or a reconnect.
const WAIT: Duration = Duration::from_secs(30);

/// How often the checks under test sample.
const INTERVAL: &str = "300ms";

const MIB: f64 = 1024.0 * 1024.0;

/// Every postgres kind, with the names [`all_kinds`] gives them.
pub(crate) const ALL_KINDS: [(&str, &str); 7] = [
    ("up", "pg-up"),
    ("replication", "pg-replication"),
    ("slots", "pg-slots"),
    ("archiving", "pg-archiving"),
    ("connections", "pg-connections"),
    ("wraparound", "pg-wraparound"),
    ("long_transactions", "pg-long-tx"),
];

/// `[check.postgres.KIND.NAME]` on `dsn` with `extra` keys; `interval` is [`INTERVAL`]
/// unless `extra` sets one.
pub(crate) fn pg_check(kind: &str, name: &str, dsn: &str, extra: &str) -> String {
    let interval = if extra.contains("interval =") {
        String::new()
    } else {
        format!("interval = \"{INTERVAL}\"\n")
    };
    format!("[check.postgres.{kind}.{name}]\ndsn = {dsn:?}\n{interval}{extra}\n")
}

/// Every postgres kind on `dsn`, with thresholds a healthy, quiet test server is far from.
fn all_kinds(dsn: &str) -> String {
    all_kinds_with(dsn, "")
}

/// [`all_kinds`] with `common` (e.g. `interval` and `timeout` lines) added to every check.
pub(crate) fn all_kinds_with(dsn: &str, common: &str) -> String {
    let pg_check = |kind: &str, name: &str, dsn: &str, extra: &str| {
        pg_check(kind, name, dsn, &format!("{common}{extra}"))
    };
    [
        pg_check("up", "pg-up", dsn, ""),
        pg_check(
            "replication",
            "pg-replication",
            dsn,
            "warn = \"64MB\"\ncrit = \"256MB\"\nwarn_time = \"5m\"\ncrit_time = \"10m\"\n",
        ),
        pg_check("slots", "pg-slots", dsn, "warn = \"1GB\"\ncrit = \"2GB\"\n"),
        pg_check(
            "archiving",
            "pg-archiving",
            dsn,
            "warn = \"1h\"\ncrit = \"2h\"\n",
        ),
        pg_check(
            "connections",
            "pg-connections",
            dsn,
            "warn = \"80%\"\ncrit = \"90%\"\n",
        ),
        pg_check(
            "wraparound",
            "pg-wraparound",
            dsn,
            "warn = \"50%\"\ncrit = \"80%\"\n",
        ),
        pg_check(
            "long_transactions",
            "pg-long-tx",
            dsn,
            "warn = \"5m\"\ncrit = \"10m\"\n",
        ),
    ]
    .concat()
}

/// Starts an agent on a fresh config holding `body`.
fn start(body: &str) -> (tempfile::TempDir, Agent) {
    let dir = tempdir();
    let cfg = write_config(dir.path(), body);
    let agent = Agent::start(&cfg);
    (dir, agent)
}

/// `GET /checks/NAME`, asserting 200.
fn check(agent: &Agent, name: &str) -> Value {
    let (code, v) = agent.get_json(&format!("/checks/{name}"));
    assert_eq!(
        code,
        200,
        "/checks/{name}: {v}\n--- agent log ---\n{}",
        agent.logs()
    );
    v
}

/// Polls `/checks/NAME` until `f` accepts it; returns that answer. On timeout the panic
/// shows the last answer and the agent's log.
fn wait_check(agent: &Agent, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = check(agent, name);
        if f(&v) {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {WAIT:?} waiting for {name}: {what}; last: {v}\n\
                 --- agent log ---\n{}",
                agent.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until `n` further samples of NAME (new `sampled_at` values) have been seen after
/// the current one; returns them, oldest first.
fn next_samples(agent: &Agent, name: &str, n: usize) -> Vec<Value> {
    let mut last = check(agent, name)["sampled_at"].clone();
    let mut out = Vec::new();
    while out.len() < n {
        let v = wait_check(agent, name, "a new sample", |v| v["sampled_at"] != last);
        last = v["sampled_at"].clone();
        out.push(v);
    }
    out
}

/// Polls `/checks/NAME` until `done` accepts an answer, recording every answer on the way
/// (the last one accepted). The poll is far quicker than the 300 ms interval, so every
/// sample is seen at least once.
fn observe_until(
    agent: &Agent,
    name: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    let mut seen: Vec<Value> = Vec::new();
    loop {
        let v = check(agent, name);
        let stop = done(&v);
        seen.push(v);
        if stop {
            return seen;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {WAIT:?} waiting for {name}: {what}; last: {}\n\
                 --- agent log ---\n{}",
                seen[seen.len() - 1],
                agent.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `(status, streak, tripped)` of each answer, for a failure message.
fn streaks(seen: &[Value]) -> Vec<(String, u64, bool)> {
    seen.iter()
        .map(|v| {
            (
                v["status"].as_str().unwrap_or("?").to_string(),
                v["streak"].as_u64().unwrap_or(0),
                v["tripped"] == true,
            )
        })
        .collect()
}

fn status_is(v: &Value, status: &str) -> bool {
    v["status"] == status
}

fn ok_and_clear(v: &Value) -> bool {
    v["status"] == "ok" && v["tripped"] == false
}

/// The status code of `GET path`.
fn code(agent: &Agent, path: &str) -> u16 {
    agent.get(path).0
}

/// Asserts `GET path` answers `want`, showing the body otherwise.
fn assert_code(agent: &Agent, path: &str, want: u16) {
    let (got, body) = agent.get(path);
    assert_eq!(got, want, "GET {path}: {body}");
}

/// Polls until `GET path` answers `want`.
fn wait_code(agent: &Agent, path: &str, want: u16) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (got, body) = agent.get(path);
        if got == want {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {WAIT:?} waiting for GET {path} to answer {want}; last {got}: \
                 {body}\n--- agent log ---\n{}",
                agent.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The text of `/metrics`, asserting 200.
fn metrics(agent: &Agent) -> String {
    let (code, text) = agent.get("/metrics");
    assert_eq!(code, 200);
    text
}

/// The value of the first sample of metric `name` whose labels include every `labels` pair.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let prefix = format!("{name}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A `psql` session on `port` that stays connected while its stdin is open; killed on drop.
/// psql is only a client, so it runs as whatever user the tests run as.
struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Session {
    fn open(port: u16, sql: &str) -> Session {
        let mut cmd = Command::new(Path::new(PG_BIN).join("psql"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd
            .args(["-X", "-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-U", "postgres", "-d", "postgres"])
            .env("LC_ALL", "C")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn psql");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(sql.as_bytes()).unwrap();
        stdin.flush().unwrap();
        Session {
            child,
            stdin: Some(stdin),
        }
    }

    /// Closes stdin, so psql ends the session (rolling back an open transaction), and
    /// waits for it to exit.
    fn close(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Client sessions on the primary whose application_name is psql's default.
fn psql_sessions(c: &Cluster) -> usize {
    c.psql(
        Node::Primary,
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = 'psql' AND pid <> pg_backend_pid()",
    )
    .parse()
    .unwrap()
}

/// Healthy pair (issue 3): every kind ok on both hosts; `/primary` 200 and `/replica` 503 on
/// the primary's agent, the reverse on the standby's; `/read-only` 200 on both; HEAD and
/// OPTIONS answer with the same code and no body; a bad `lag` is 400; `/metrics` passes
/// promtool with the postgres metrics in it.
#[test]
fn healthy_pair_every_kind_ok_and_routing_follows_the_role() {
    let c = shared();
    c.wait_streaming();
    let (_pd, primary) = start(&all_kinds(&c.dsn(Node::Primary)));
    let (_sd, standby) = start(&all_kinds(&c.dsn(Node::Standby)));

    for (agent, host) in [(&primary, "primary"), (&standby, "standby")] {
        for (kind, name) in ALL_KINDS {
            let v = wait_check(agent, name, &format!("ok on the {host}"), ok_and_clear);
            assert_eq!(v["kind"], format!("postgres.{kind}"), "{v}");
            // Archiving is the primary's job: a standby with `archive_mode = on` has no
            // archive age of its own to report.
            let not_applicable = host == "standby" && kind == "archiving";
            assert!(
                v["value"].is_number() || (not_applicable && v["value"].is_null()),
                "{host} {name}: an ok value is a number: {v}"
            );
        }
        let (code, h) = agent.get_json("/health");
        assert_eq!(code, 200, "{host}: {h}");
        assert_eq!(h["counts"]["ok"], ALL_KINDS.len(), "{host}: {h}");
    }

    // The standby's lag is zero bytes behind a quiet primary, give or take another test's
    // write to the shared pair.
    let lag = check(&standby, "pg-replication")["value"].as_f64().unwrap();
    assert!((0.0..16.0 * MIB).contains(&lag), "standby lag {lag}");

    for path in ["/primary", "/", "/master", "/read-write", "/read-only"] {
        assert_code(&primary, path, 200);
    }
    for path in ["/replica", "/replica?lag=1GB", "/replica?lag=1h"] {
        assert_code(&primary, path, 503);
    }
    for path in [
        "/replica",
        "/replica?lag=1GB",
        "/replica?lag=1h",
        "/read-only",
    ] {
        assert_code(&standby, path, 200);
    }
    for path in ["/primary", "/master", "/read-write"] {
        assert_code(&standby, path, 503);
    }

    for agent in [&primary, &standby] {
        for path in ["/primary", "/replica", "/read-only"] {
            let get = code(agent, path);
            for method in ["HEAD", "OPTIONS"] {
                let (c, body) = http(agent.addr, method, path, None);
                assert_eq!(c, get, "{method} {path} vs GET");
                assert!(body.is_empty(), "{method} {path} has a body: {body:?}");
            }
        }
        let (c, v) = agent.get_json("/replica?lag=garbage");
        assert_eq!(c, 400, "{v}");
        assert!(v["error"].is_string() && v["reason"].is_string(), "{v}");
    }

    for (agent, host) in [(&primary, "primary"), (&standby, "standby")] {
        let text = metrics(agent);
        assert!(
            text.lines().any(|l| l.starts_with("vigil_pg_")),
            "{host}: no vigil_pg_* metrics:\n{text}"
        );
        for (_, name) in ALL_KINDS {
            assert_eq!(
                metric(&text, "vigil_check_success", &[("check", name)]),
                Some(1.0),
                "{host}: vigil_check_success for {name}"
            );
        }
        crate::util::assert_promtool_accepts(&text);
    }
    // Role and per-standby series: the primary labels them by the standby's
    // application_name.
    let p = metrics(&primary);
    let st = metrics(&standby);
    let up = [("check", "pg-up")];
    assert_eq!(metric(&p, "vigil_pg_up", &up), Some(1.0), "{p}");
    assert_eq!(metric(&st, "vigil_pg_up", &up), Some(1.0), "{st}");
    assert_eq!(metric(&p, "vigil_pg_is_standby", &up), Some(0.0), "{p}");
    assert_eq!(metric(&st, "vigil_pg_is_standby", &up), Some(1.0), "{st}");
    let repl = [("check", "pg-replication")];
    assert_eq!(
        metric(&p, "vigil_pg_standbys_connected", &repl),
        Some(1.0),
        "{p}"
    );
    assert_eq!(
        metric(
            &p,
            "vigil_pg_standby_streaming",
            &[("check", "pg-replication"), ("standby", STANDBY_NAME)]
        ),
        Some(1.0),
        "{p}"
    );
    assert_eq!(
        metric(&st, "vigil_pg_wal_receiver_streaming", &repl),
        Some(1.0),
        "{st}"
    );
    assert!(
        metric(
            &p,
            "vigil_pg_slot_active",
            &[("check", "pg-slots"), ("slot", STANDBY_SLOT)]
        ) == Some(1.0),
        "{p}"
    );
}

/// Replay paused on the standby while the primary writes 32 MiB (issue 3): the lag passes
/// `crit`, the check trips only after `trip_after` samples, `/health` and `/replica` turn
/// 503 while `?lag=1GB` still answers 200; after resuming it clears after `clear_after`.
#[test]
fn paused_replay_trips_replication_and_routing_then_clears_after_resume() {
    let c = Cluster::start(ClusterOptions::default());
    let (_d, agent) = start(&pg_check(
        "replication",
        "lag",
        &c.dsn(Node::Standby),
        "warn = \"1MB\"\ncrit = \"8MB\"\ntrip_after = 2\nclear_after = 2\n",
    ));
    wait_check(&agent, "lag", "ok before the pause", ok_and_clear);
    assert_code(&agent, "/replica", 200);
    assert_code(&agent, "/replica?lag=1MB", 200);
    assert_code(&agent, "/health", 200);

    c.pause_replay();
    // Sample while the WAL is being written, so the first non-ok samples are seen too.
    let seen = std::thread::scope(|s| {
        let writer = s.spawn(|| c.write_wal(32));
        let seen = observe_until(&agent, "lag", "tripped", |v| v["tripped"] == true);
        writer.join().unwrap();
        seen
    });
    let trace = streaks(&seen);
    for (status, streak, tripped) in &trace {
        if *tripped {
            assert!(*streak >= 2, "tripped before trip_after samples: {trace:?}");
        } else if status != "ok" {
            assert!(
                *streak < 2,
                "trip_after non-ok samples, not tripped: {trace:?}"
            );
        }
    }
    assert!(
        trace.iter().any(|(s, n, t)| s != "ok" && *n == 1 && !t),
        "the first non-ok sample already tripped: {trace:?}"
    );

    let v = wait_check(&agent, "lag", "critical past 8MB", |v| {
        v["status"] == "critical" && v["value"].as_f64().is_some_and(|b| b >= 8.0 * MIB)
    });
    assert_eq!(v["unit"], "bytes", "{v}");
    assert_eq!(v["tripped"], true, "{v}");
    let (code, h) = agent.get_json("/health");
    assert_eq!(code, 503, "{h}");
    assert_eq!(h["tripped"], serde_json::json!(["lag"]), "{h}");
    assert_code(&agent, "/replica", 503);
    assert_code(&agent, "/read-only", 503);
    assert_code(&agent, "/replica?lag=1MB", 503);
    assert_code(&agent, "/replica?lag=8MB", 503);
    let (code, body) = agent.get_json("/replica?lag=1GB");
    assert_eq!(
        code, 200,
        "?lag= replaces thresholds and tripped state: {body}"
    );
    let text = metrics(&agent);
    let lag = metric(&text, "vigil_pg_standby_lag_bytes", &[("check", "lag")]);
    assert!(
        lag.is_some_and(|b| b >= 8.0 * MIB),
        "vigil_pg_standby_lag_bytes {lag:?}:\n{text}"
    );

    c.resume_replay();
    let seen = observe_until(&agent, "lag", "cleared after resume", ok_and_clear);
    let trace = streaks(&seen);
    for (status, streak, tripped) in &trace {
        if status == "ok" && *streak < 2 {
            assert!(*tripped, "cleared before clear_after ok samples: {trace:?}");
        }
    }
    assert!(
        trace.iter().any(|(s, n, t)| s == "ok" && *n == 1 && *t),
        "the first ok sample already cleared: {trace:?}"
    );
    let v = &seen[seen.len() - 1];
    assert!(v["streak"].as_u64().unwrap() >= 2, "{v}");
    assert!(v["value"].as_f64().unwrap() < MIB, "{v}");
    assert_code(&agent, "/health", 200);
    assert_code(&agent, "/replica", 200);
    assert_code(&agent, "/replica?lag=1MB", 200);
}

/// Standby stopped (issue 3): the primary's check goes critical through `min_standbys`; the
/// standby's agent reports `unknown` (down), never ok, and `/replica` is 503. Started
/// again, both recover (the agent reconnects by itself).
#[test]
fn stopped_standby_is_critical_on_the_primary_and_unknown_on_the_standby() {
    let c = Cluster::start(ClusterOptions::default());
    let (_pd, primary) = start(&pg_check(
        "replication",
        "repl",
        &c.dsn(Node::Primary),
        "min_standbys = 1\n",
    ));
    let (_sd, standby) = start(
        &[
            pg_check("up", "up", &c.dsn(Node::Standby), ""),
            pg_check("replication", "repl", &c.dsn(Node::Standby), ""),
        ]
        .concat(),
    );
    wait_check(&primary, "repl", "ok with one standby", ok_and_clear);
    let text = metrics(&primary);
    assert_eq!(
        metric(&text, "vigil_pg_standbys_connected", &[("check", "repl")]),
        Some(1.0),
        "{text}"
    );
    for name in ["up", "repl"] {
        wait_check(&standby, name, "ok on the standby", ok_and_clear);
    }
    assert_code(&standby, "/replica", 200);

    c.stop_standby();
    let v = wait_check(&primary, "repl", "critical without its standby", |v| {
        v["status"] == "critical" && v["tripped"] == true
    });
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    let (code, h) = primary.get_json("/health");
    assert_eq!(code, 503, "{h}");
    let text = metrics(&primary);
    assert_eq!(
        metric(&text, "vigil_pg_standbys_connected", &[("check", "repl")]),
        Some(0.0),
        "{text}"
    );

    for name in ["up", "repl"] {
        let v = wait_check(&standby, name, "unknown while down", |v| {
            status_is(v, "unknown")
        });
        assert!(v["value"].is_null(), "an unknown sample has no value: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    // Stays unknown — a down server is never reported ok.
    for v in next_samples(&standby, "up", 3) {
        assert_eq!(v["status"], "unknown", "{v}");
    }
    assert_eq!(check(&standby, "repl")["status"], "unknown");
    assert_code(&standby, "/replica", 503);
    assert_code(&standby, "/replica?lag=1GB", 503);
    assert_code(&standby, "/read-only", 503);

    c.start_standby();
    c.wait_streaming();
    wait_check(&primary, "repl", "ok again", ok_and_clear);
    wait_check(&standby, "up", "ok again after a reconnect", ok_and_clear);
    wait_check(&standby, "repl", "ok again after a reconnect", ok_and_clear);
    wait_code(&standby, "/replica", 200);
}

/// An inactive slot retaining WAL trips `postgres.slots` (issue 3); the slot is named.
#[test]
fn inactive_slot_retaining_wal_trips_slots_and_is_named() {
    let c = Cluster::start(ClusterOptions {
        standby: false,
        ..ClusterOptions::default()
    });
    c.psql(
        Node::Primary,
        "SELECT pg_create_physical_replication_slot('dead', true)",
    );
    let (_d, agent) = start(&pg_check(
        "slots",
        "slots",
        &c.dsn(Node::Primary),
        "warn = \"8MB\"\ncrit = \"16MB\"\n",
    ));
    let v = wait_check(
        &agent,
        "slots",
        "ok while the slot retains little",
        ok_and_clear,
    );
    assert!(v["value"].as_f64().unwrap() < 8.0 * MIB, "{v}");

    c.write_wal(32);
    c.switch_wal();
    let v = wait_check(&agent, "slots", "critical past 16MB", |v| {
        status_is(v, "critical")
    });
    assert_eq!(v["tripped"], true, "{v}");
    assert_eq!(v["unit"], "bytes", "{v}");
    assert!(v["value"].as_f64().unwrap() >= 16.0 * MIB, "{v}");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains("dead"),
        "the inactive slot is named: {message:?}"
    );
    let text = metrics(&agent);
    let dead = [("check", "slots"), ("slot", "dead")];
    let retained = metric(&text, "vigil_pg_slot_retained_bytes", &dead);
    assert!(
        retained.is_some_and(|b| b >= 16.0 * MIB),
        "{retained:?}:\n{text}"
    );
    assert_eq!(
        metric(&text, "vigil_pg_slot_active", &dead),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "vigil_pg_slots_inactive", &[("check", "slots")]),
        Some(1.0),
        "{text}"
    );
    crate::util::assert_promtool_accepts(&text);
}

/// A failing `archive_command` trips `postgres.archiving` (issue 3): a failure newer than
/// the last success is critical by itself, whatever the age thresholds say.
#[test]
fn failing_archive_command_trips_archiving() {
    let c = Cluster::start(ClusterOptions {
        standby: false,
        archive_command: Some("false".into()),
        ..ClusterOptions::default()
    });
    let (_d, agent) = start(&pg_check(
        "archiving",
        "archiving",
        &c.dsn(Node::Primary),
        "warn = \"1h\"\ncrit = \"2h\"\n",
    ));
    c.psql(Node::Primary, "CREATE TABLE t();");
    c.switch_wal();
    let v = wait_check(
        &agent,
        "archiving",
        "critical after an archive failure",
        |v| status_is(v, "critical"),
    );
    assert_eq!(v["tripped"], true, "{v}");
    // It stays critical: every retry of the archiver fails too.
    for v in next_samples(&agent, "archiving", 2) {
        assert_eq!(v["status"], "critical", "{v}");
    }
    assert_code(&agent, "/health", 503);
    let text = metrics(&agent);
    let check = [("check", "archiving")];
    assert_eq!(
        metric(&text, "vigil_pg_archive_failing", &check),
        Some(1.0),
        "{text}"
    );
    let failures = metric(&text, "vigil_pg_archive_failures_total", &check);
    assert!(failures.is_some_and(|n| n >= 1.0), "{failures:?}:\n{text}");
}

/// An open transaction older than the threshold trips `postgres.long_transactions`
/// (issue 3); once it ends the check is ok again.
#[test]
fn open_transaction_older_than_crit_trips_long_transactions() {
    let c = Cluster::start(ClusterOptions {
        standby: false,
        ..ClusterOptions::default()
    });
    let (_d, agent) = start(&pg_check(
        "long_transactions",
        "long-tx",
        &c.dsn(Node::Primary),
        "warn = \"500ms\"\ncrit = \"1s\"\n",
    ));
    wait_check(
        &agent,
        "long-tx",
        "ok with no open transaction",
        ok_and_clear,
    );

    let session = Session::open(c.primary_port(), "BEGIN;\nSELECT txid_current();\n");
    let v = wait_check(&agent, "long-tx", "critical past 1s", |v| {
        status_is(v, "critical")
    });
    assert_eq!(v["unit"], "seconds", "{v}");
    assert!(v["value"].as_f64().unwrap() >= 1.0, "{v}");
    assert_eq!(v["tripped"], true, "{v}");
    let text = metrics(&agent);
    let age = metric(
        &text,
        "vigil_pg_oldest_transaction_seconds",
        &[("check", "long-tx")],
    );
    assert!(age.is_some_and(|s| s >= 1.0), "{age:?}:\n{text}");

    session.close();
    let v = wait_check(
        &agent,
        "long-tx",
        "ok once the transaction ended",
        ok_and_clear,
    );
    assert!(v["value"].as_f64().unwrap() < 1.0, "{v}");
}

/// `max_connections` nearly used trips `postgres.connections` (issue 3).
#[test]
fn nearly_exhausted_max_connections_trips_connections() {
    let c = Cluster::start(ClusterOptions {
        standby: false,
        extra_conf: vec!["max_connections = 10".into()],
        ..ClusterOptions::default()
    });
    let (_d, agent) = start(&pg_check(
        "connections",
        "conns",
        &c.dsn(Node::Primary),
        "warn = \"40%\"\ncrit = \"50%\"\n",
    ));
    let v = wait_check(
        &agent,
        "conns",
        "ok with only the agent connected",
        ok_and_clear,
    );
    assert_eq!(v["unit"], "ratio", "{v}");
    assert!(v["value"].as_f64().unwrap() < 0.4, "{v}");

    // The agent's session plus these six: 70% of 10.
    let sessions: Vec<Session> = (0..6)
        .map(|_| Session::open(c.primary_port(), ""))
        .collect();
    crate::util::poll(WAIT, "six psql sessions", || {
        (psql_sessions(&c) == 6).then_some(())
    });
    // A sample taken while only some sessions were open may already be critical (5 of 10
    // is 50%); wait for one that sees all of them.
    let v = wait_check(&agent, "conns", "critical past 50%", |v| {
        status_is(v, "critical") && v["value"].as_f64().is_some_and(|x| x >= 0.7)
    });
    assert!(v["value"].as_f64().unwrap() >= 0.5, "{v}");
    assert_eq!(v["tripped"], true, "{v}");
    let text = metrics(&agent);
    let check = [("check", "conns")];
    assert_eq!(
        metric(&text, "vigil_pg_connections_max", &check),
        Some(10.0),
        "{text}"
    );
    let used = metric(&text, "vigil_pg_connections_used", &check);
    assert!(used.is_some_and(|n| n >= 7.0), "{used:?}:\n{text}");

    for s in sessions {
        s.close();
    }
    wait_check(
        &agent,
        "conns",
        "ok once the sessions are gone",
        ok_and_clear,
    );
}

/// Database down: nothing listens on the port. `postgres.up` and `postgres.replication` are
/// `unknown` (never ok), routing is 503, and the API keeps answering at once.
#[test]
fn database_down_is_unknown_and_the_api_keeps_answering() {
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        free_port()
    );
    let (_d, agent) = start(
        &[
            pg_check("up", "up", &dsn, ""),
            pg_check("replication", "repl", &dsn, ""),
        ]
        .concat(),
    );
    for name in ["up", "repl"] {
        let v = wait_check(&agent, name, "unknown", |v| status_is(v, "unknown"));
        assert!(v["value"].is_null(), "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    for v in next_samples(&agent, "up", 3) {
        assert_eq!(v["status"], "unknown", "never ok while down: {v}");
        let started = Instant::now();
        let (code, h) = agent.get_json("/health");
        assert!(code == 200 || code == 503, "{h}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "/health took {:?}",
            started.elapsed()
        );
    }
    for path in ["/primary", "/replica", "/read-only"] {
        assert_code(&agent, path, 503);
    }
    let text = metrics(&agent);
    assert_eq!(
        metric(&text, "vigil_pg_up", &[("check", "up")]),
        Some(0.0),
        "{text}"
    );
    // "1 when the newest run measured, 0 when it could not": an unreachable server was
    // not measured, whichever way the kind reports it (replication does so with 0 too).
    assert_eq!(
        metric(&text, "vigil_check_success", &[("check", "repl")]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "vigil_check_success", &[("check", "up")]),
        Some(0.0),
        "{text}"
    );
}

/// A server that accepts and never answers, closed on drop.
struct HungServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HungServer {
    fn start() -> HungServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (accepted, stop) = (accepted.clone(), stop.clone());
            move || {
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            held.push(s);
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }
        });
        HungServer {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HungServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A hung server (accepts, never answers) is `unknown` within the timeout, and a check on
/// another server keeps sampling meanwhile (issue 3: "never blocks other checks or the
/// API").
#[test]
fn hung_server_is_unknown_within_the_timeout_and_blocks_nothing_else() {
    let hung = HungServer::start();
    let hung_dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=30",
        hung.addr.port()
    );
    let c = shared();
    let started = Instant::now();
    let (_d, agent) = start(
        &[
            pg_check(
                "up",
                "hung",
                &hung_dsn,
                "interval = \"1s\"\ntimeout = \"500ms\"\n",
            ),
            pg_check("up", "alive", &c.dsn(Node::Primary), ""),
        ]
        .concat(),
    );
    let v = wait_check(&agent, "hung", "unknown", |v| status_is(v, "unknown"));
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(2),
        "unknown only after {elapsed:?}: {v}"
    );
    eprintln!("hung server: unknown {elapsed:?} after the agent was spawned");
    assert!(v["value"].is_null(), "{v}");
    assert!(
        hung.accepted.load(Ordering::Relaxed) > 0,
        "the agent never connected"
    );

    let alive = next_samples(&agent, "alive", 2);
    assert_ne!(alive[0]["sampled_at"], alive[1]["sampled_at"]);
    for v in &alive {
        assert_eq!(v["status"], "ok", "{v}");
    }
    for v in next_samples(&agent, "hung", 2) {
        assert_eq!(v["status"], "unknown", "{v}");
        let t = Instant::now();
        assert_code(&agent, "/health/live", 200);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
}
