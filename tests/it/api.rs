//! The real `vigil agent` over HTTP: every endpoint, status codes, JSON shapes, promtool.
//!
//! Each test starts its own agent on a fresh temp config (interval 1s) and asserts on
//! status codes and JSON structure, never on message wording.

// Test helpers may unwrap freely (STYLE §4.4); clippy only exempts #[test] fns.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::util::{Agent, TestConfig, http, poll, tempdir, write_config};

/// The keys of a check object, as `/checks` and `vigil check --json` show it.
pub const CHECK_KEYS: [&str; 10] = [
    "name",
    "kind",
    "status",
    "tripped",
    "value",
    "unit",
    "message",
    "since",
    "sampled_at",
    "streak",
];

/// This test process's command name, as a `process` check matches it.
pub fn own_comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .unwrap()
        .trim_end()
        .to_string()
}

/// Three checks that are ok on any sane host: a disk check on `dir`, this test process by
/// comm, and a system check with thresholds a busy CI runner cannot reach.
pub fn healthy_checks(dir: &Path) -> String {
    format!(
        "[check.disk.scratch]\npath = {path:?}\nwarn = \"99%\"\ncrit = \"100%\"\n\n\
         [check.process.tests]\nname = {comm:?}\nmin = 1\n\n\
         [check.system.host]\nwarn = 1000\ncrit = 2000\nmem_warn = \"1%\"\nmem_crit = \"0%\"\n",
        path = dir.display().to_string(),
        comm = own_comm(),
    )
}

/// A process check that is critical at once: nothing has this comm, and min is 1.
pub const GHOST_CHECK: &str = "[check.process.ghost]\nname = \"no-such-comm-x\"\nmin = 1\n";

fn start_healthy() -> (tempfile::TempDir, TestConfig, Agent) {
    let dir = tempdir();
    let cfg = write_config(dir.path(), &healthy_checks(dir.path()));
    let agent = Agent::start(&cfg);
    (dir, cfg, agent)
}

/// One request; returns the status, the raw header block (lowercase) and the body.
fn raw(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end: {text:?}"));
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, head.to_ascii_lowercase(), body.to_string())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")).map(str::trim))
}

fn parse(path: &str, body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body:?}"))
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

fn sorted<'a>(k: &[&'a str]) -> Vec<&'a str> {
    let mut k = k.to_vec();
    k.sort_unstable();
    k
}

/// `YYYY-MM-DDTHH:MM:SS[.frac]Z`.
pub fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |mut r: std::ops::Range<usize>| r.all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && s.ends_with('Z')
        && (b.len() == 20 || (b[19] == b'.' && digits(20..b.len() - 1) && b.len() > 21))
}

/// Asserts the shape of one check object.
pub fn assert_check_object(c: &Value) {
    assert_eq!(keys(c), sorted(&CHECK_KEYS), "check keys: {c}");
    assert!(
        c["name"].is_string()
            && c["kind"].is_string()
            && c["unit"].is_string()
            && c["message"].is_string(),
        "{c}"
    );
    assert!(
        ["ok", "warning", "critical", "unknown"].contains(&c["status"].as_str().unwrap()),
        "status: {c}"
    );
    assert!(c["tripped"].is_boolean(), "tripped: {c}");
    assert!(c["value"].is_number() || c["value"].is_null(), "value: {c}");
    assert!(c["streak"].is_u64(), "streak: {c}");
    let sampled = c["sampled_at"]
        .as_str()
        .unwrap_or_else(|| panic!("sampled_at not a string: {c}"));
    assert!(
        is_rfc3339_utc(sampled),
        "sampled_at is not RFC 3339 UTC: {sampled:?}"
    );
    let since = c["since"]
        .as_str()
        .unwrap_or_else(|| panic!("since not a string: {c}"));
    assert!(
        is_rfc3339_utc(since),
        "since is not RFC 3339 UTC: {since:?}"
    );
}

/// Asserts the shape of a `/health` document (also what `vigil status --json` prints).
pub fn assert_health_document(h: &Value) {
    let obj = h
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {h}"));
    for k in [
        "state",
        "health",
        "lifecycle",
        "counts",
        "tripped",
        "stale",
        "automation",
        "heartbeat",
        "config_error",
    ] {
        assert!(obj.contains_key(k), "/health lacks {k:?}: {h}");
    }
    assert!(
        h["state"].is_string() && h["health"].is_string() && h["lifecycle"].is_string(),
        "{h}"
    );
    for s in ["ok", "warning", "critical", "unknown"] {
        assert!(h["counts"][s].is_u64(), "counts.{s}: {h}");
    }
    assert!(h["tripped"].is_array(), "tripped: {h}");
    assert!(h["stale"].is_boolean(), "stale: {h}");
    assert_eq!(
        keys(&h["automation"]),
        sorted(&["paused", "reason", "until", "escalated"]),
        "automation: {h}"
    );
    assert!(h["automation"]["paused"].is_boolean(), "{h}");
    assert!(h["automation"]["escalated"].is_array(), "{h}");
    assert_eq!(
        keys(&h["heartbeat"]),
        sorted(&["last_success", "spooled", "rejected"]),
        "heartbeat: {h}"
    );
    assert!(h["heartbeat"]["spooled"].is_u64(), "{h}");
    assert!(
        h["config_error"].is_null() || h["config_error"].is_string(),
        "{h}"
    );
}

/// An error answer: a JSON object with string `error` and `reason`.
fn assert_error_body(path: &str, body: &str) -> Value {
    let v = parse(path, body);
    assert!(v["error"].is_string(), "{path}: no error: {v}");
    assert!(v["reason"].is_string(), "{path}: no reason: {v}");
    v
}

#[test]
fn health_is_200_with_every_contract_key_when_all_checks_pass() {
    let (_dir, _cfg, agent) = start_healthy();
    let (code, h) = agent.get_json("/health");
    assert_eq!(code, 200, "{h}");
    assert_health_document(&h);
    assert_eq!(h["state"], "available");
    assert_eq!(h["health"], "available");
    assert_eq!(h["lifecycle"], "available");
    assert_eq!(h["tripped"], serde_json::json!([]));
    assert_eq!(h["stale"], false);
    assert_eq!(h["config_error"], Value::Null);
    assert_eq!(h["automation"]["paused"], false);
    let total: u64 = ["ok", "warning", "critical", "unknown"]
        .iter()
        .map(|s| h["counts"][s].as_u64().unwrap())
        .sum();
    assert_eq!(total, 3, "counts cover the three checks: {h}");
    assert_eq!(h["counts"]["ok"], 3, "{h}");
}

#[test]
fn liveness_endpoints_answer_200_while_the_scheduler_runs() {
    let (_dir, _cfg, agent) = start_healthy();
    for path in ["/health/live", "/liveness"] {
        let (code, body) = agent.get(path);
        assert_eq!(code, 200, "{path}: {body}");
        parse(path, &body);
    }
}

#[test]
fn checks_lists_every_check_with_the_contract_keys() {
    let (_dir, _cfg, agent) = start_healthy();
    let (code, v) = agent.get_json("/checks");
    assert_eq!(code, 200);
    let arr = v
        .as_array()
        .unwrap_or_else(|| panic!("/checks is not an array: {v}"));
    let names: Vec<&str> = arr.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["scratch", "tests", "host"], "config order");
    let kinds: Vec<&str> = arr.iter().map(|c| c["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["disk", "process", "system"]);
    for c in arr {
        assert_check_object(c);
        assert_eq!(c["status"], "ok", "{c}");
        assert_eq!(c["tripped"], false, "{c}");
    }
    assert_eq!(arr[0]["unit"], "ratio");
    assert_eq!(arr[1]["unit"], "count");
    assert!(
        arr[1]["value"].as_f64().unwrap() >= 1.0,
        "this test process is counted: {}",
        arr[1]
    );
}

/// The brief asks for `/checks` in config order; the file below lists its kinds in the
/// opposite of the registry's order, so a kind-major listing shows up here.
#[test]
fn checks_follow_config_order_across_kinds() {
    let dir = tempdir();
    let body = format!(
        "[check.system.host]\nwarn = 1000\ncrit = 2000\nmem_warn = \"1%\"\nmem_crit = \"0%\"\n\n\
         [check.process.tests]\nname = {comm:?}\n\n\
         [check.disk.scratch]\npath = {path:?}\nwarn = \"99%\"\ncrit = \"100%\"\n",
        comm = own_comm(),
        path = dir.path().display().to_string(),
    );
    let cfg = write_config(dir.path(), &body);
    let agent = Agent::start(&cfg);
    let (_, v) = agent.get_json("/checks");
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["host", "tests", "scratch"],
        "/checks must list checks in config order"
    );
}

#[test]
fn one_check_by_name_and_a_json_404_for_an_unknown_name_or_path() {
    let (_dir, _cfg, agent) = start_healthy();
    let (code, c) = agent.get_json("/checks/tests");
    assert_eq!(code, 200);
    assert_check_object(&c);
    assert_eq!(c["name"], "tests");
    assert_eq!(c["kind"], "process");

    let (code, body) = agent.get("/checks/nope");
    assert_eq!(code, 404, "{body}");
    assert_error_body("/checks/nope", &body);

    for path in ["/nope", "/health/nope", "/checksx"] {
        let (code, body) = agent.get(path);
        assert_eq!(code, 404, "{path}: {body}");
        assert_error_body(path, &body);
    }
}

#[test]
fn the_tcp_listener_refuses_every_mutating_method_with_405() {
    let (_dir, _cfg, agent) = start_healthy();
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in ["/health", "/checks", "/lifecycle", "/nope"] {
            let (code, body) = http(
                agent.addr,
                method,
                path,
                Some("{\"state\":\"retiring\",\"reason\":\"x\"}"),
            );
            assert_eq!(code, 405, "{method} {path}: {body}");
            assert_error_body(path, &body);
        }
    }
    // Nothing changed.
    let (code, h) = agent.get_json("/health");
    assert_eq!((code, h["lifecycle"].as_str()), (200, Some("available")));
}

#[test]
fn head_and_options_answer_the_get_status_with_an_empty_body() {
    let dir = tempdir();
    let cfg = write_config(
        dir.path(),
        &format!("{}\n{GHOST_CHECK}", healthy_checks(dir.path())),
    );
    let agent = Agent::start(&cfg);
    let mut seen = std::collections::BTreeSet::new();
    for path in [
        "/health",
        "/health/live",
        "/liveness",
        "/checks",
        "/checks/ghost",
        "/checks/nope",
        "/metrics",
        "/nope",
    ] {
        let (get_code, _, get_body) = raw(agent.addr, "GET", path);
        assert!(!get_body.is_empty(), "GET {path} has a body");
        seen.insert(get_code);
        for method in ["HEAD", "OPTIONS"] {
            let (code, _, body) = raw(agent.addr, method, path);
            assert_eq!(code, get_code, "{method} {path}");
            assert_eq!(body, "", "{method} {path} must have no body");
        }
    }
    // The paths above cover the three answers a load balancer tells apart.
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), [200, 404, 503]);
}

#[test]
fn metrics_are_prometheus_text_that_promtool_accepts() {
    let (_dir, _cfg, agent) = start_healthy();
    let (code, head, body) = raw(agent.addr, "GET", "/metrics");
    assert_eq!(code, 200);
    let ct = header(&head, "content-type").unwrap_or_else(|| panic!("no content-type: {head}"));
    assert!(
        ct.starts_with("text/plain; version=0.0.4"),
        "content-type {ct:?}"
    );

    let series: Vec<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert!(
        series
            .iter()
            .any(|l| l.starts_with("vigil_build_info{") && l.ends_with(" 1")),
        "vigil_build_info"
    );
    for family in [
        "vigil_check_success",
        "vigil_check_duration_seconds",
        "vigil_check_status",
    ] {
        for check in ["scratch", "tests", "host"] {
            let label = format!("check=\"{check}\"");
            assert!(
                series
                    .iter()
                    .any(|l| l.starts_with(&format!("{family}{{")) && l.contains(&label)),
                "{family} for {check} missing:\n{body}"
            );
        }
    }

    crate::util::assert_promtool_accepts(&body);
}

#[test]
fn a_tripped_critical_check_makes_health_503_unavailable() {
    let dir = tempdir();
    let cfg = write_config(
        dir.path(),
        &format!("{}\n{GHOST_CHECK}", healthy_checks(dir.path())),
    );
    let agent = Agent::start(&cfg);
    let (code, h) = agent.get_json("/health");
    assert_eq!(code, 503, "{h}");
    assert_health_document(&h);
    assert_eq!(h["state"], "unavailable");
    assert_eq!(h["health"], "unavailable");
    assert_eq!(h["lifecycle"], "available");
    assert_eq!(h["tripped"], serde_json::json!(["ghost"]));
    assert_eq!(h["counts"]["critical"], 1, "{h}");
    assert!(h["reason"].is_string(), "a 503 carries a reason: {h}");

    let (code, c) = agent.get_json("/checks/ghost");
    assert_eq!(code, 200);
    assert_eq!(
        (c["status"].as_str(), c["tripped"].as_bool()),
        (Some("critical"), Some(true)),
        "{c}"
    );
    // /checks and /metrics still answer 200 on an unhealthy host.
    assert_eq!(agent.get("/checks").0, 200);
    assert_eq!(agent.get("/metrics").0, 200);
    // Liveness is about the scheduler, not the checks.
    assert_eq!(agent.get("/health/live").0, 200);
}

#[test]
fn a_source_outside_api_allow_gets_403() {
    let dir = tempdir();
    let body = format!("{}\n", healthy_checks(dir.path()));
    let cfg = write_config(dir.path(), &body);
    // Insert `allow` into the harness's [api] table (loopback not allowed).
    let text = std::fs::read_to_string(&cfg.path)
        .unwrap()
        .replace("[api]\n", "[api]\nallow = [\"10.0.0.0/8\"]\n");
    std::fs::write(&cfg.path, text).unwrap();
    // Agent::start waits for a non-"starting" answer from TCP, which this agent refuses;
    // start it by hand and wait on the admin socket instead.
    let log = std::fs::File::create(cfg.path.with_extension("log")).unwrap();
    let mut child = crate::util::vigil()
        .args(["agent", "-c"])
        .arg(&cfg.path)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(&mut child);
    poll(Duration::from_secs(20), "the admin socket", || {
        std::os::unix::net::UnixStream::connect(&cfg.socket)
            .ok()
            .map(|_| ())
    });
    for path in ["/health", "/checks", "/metrics", "/nope"] {
        let (code, body) = http(cfg.addr, "GET", path, None);
        assert_eq!(code, 403, "{path}: {body}");
        assert_error_body(path, &body);
    }
    let (code, _) = http(cfg.addr, "POST", "/lifecycle", Some("{}"));
    assert_eq!(code, 403, "a refused source learns nothing, not even 405");
    // The admin socket is not subject to [api].allow.
    let (code, _) = crate::util::unix_http(&cfg.socket, "GET", "/checks", None);
    assert_eq!(code, 200);
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// Staleness (503 `stale` when samples are older than three intervals) needs a wedged
// scheduler with a live HTTP server, which a real agent does not offer from the outside
// (SIGSTOP stops both); it is unit-tested with paused time in src/state.rs and routes.

#[test]
fn the_rfc3339_helper_accepts_only_utc_timestamps() {
    assert!(is_rfc3339_utc("2026-11-24T00:59:00Z"));
    assert!(is_rfc3339_utc("2026-11-24T00:59:00.123Z"));
    assert!(!is_rfc3339_utc("2026-11-24T00:59:00+00:00"));
    assert!(!is_rfc3339_utc("2026-11-24 00:59:00Z"));
    assert!(!is_rfc3339_utc("2026-11-24T00:59:00.Z"));
    assert!(!is_rfc3339_utc("1795481940"));
}
