//! The real `vigil agent` sending heartbeats to a control-plane stand-in
//! ([`crate::receiver`]): RFC 9421 signatures checked by us and by an independent
//! verifier, the spool through outages, crashes and a full disk, the answers 409 / 401 /
//! 400, SIGTERM's last heartbeat, and bad keys or TLS setups that must not stop the agent.

// Test helpers may unwrap freely (STYLE §4.4); clippy only exempts #[test] fns.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use vigil::heartbeat::keys::{self, PublicKey};
use vigil::heartbeat::seq::SeqCounter;
use vigil::heartbeat::sign;
use vigil::heartbeat::spool::Spool;

use crate::receiver::{Mode, PATH, Receiver, Record};
use crate::util::{Agent, TestConfig, is_root, run, tempdir, try_http, unix_http, write_config};

/// `[agent].host_id` of every test here.
const HOST_ID: &str = "it-heartbeat-host";
/// Generous bound for anything that takes a few short intervals.
const WAIT: Duration = Duration::from_secs(20);

const VERIFY_PY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/signing/verify.py"
);

// ---------------------------------------------------------------------------------------
// Config, keys, the agent's answers.

/// `dir/vigil.toml`: a cheap disk check, `host_id = HOST_ID`, and `[heartbeat]` with `url`,
/// `ca_file` when given, and the `extra` lines.
fn config_for(dir: &Path, url: &str, ca_file: Option<&Path>, extra: &str) -> TestConfig {
    let mut heartbeat = format!("[heartbeat]\nurl = {url:?}\n");
    if let Some(ca) = ca_file {
        heartbeat.push_str(&format!("ca_file = {:?}\n", ca.display().to_string()));
    }
    heartbeat.push_str(extra);
    let checks = format!(
        "[check.disk.scratch]\npath = {:?}\nwarn = \"99%\"\ncrit = \"100%\"\ninterval = \"200ms\"\n\n",
        dir.display().to_string()
    );
    let cfg = write_config(dir, &format!("{checks}{heartbeat}"));
    // The harness writes `[agent]` itself; the host id goes into that table.
    let text = std::fs::read_to_string(&cfg.path).unwrap().replacen(
        "[agent]\n",
        &format!("[agent]\nhost_id = {HOST_ID:?}\n"),
        1,
    );
    std::fs::write(&cfg.path, text).unwrap();
    cfg
}

/// [`config_for`] the receiver (with its CA when it serves HTTPS).
fn config(dir: &Path, rx: &Receiver, extra: &str) -> TestConfig {
    config_for(dir, rx.url(), rx.ca_file(), extra)
}

/// Creates `state_dir` (0700) and the default key `<state_dir>/heartbeat.key` in it.
fn enrol(cfg: &TestConfig) -> PublicKey {
    make_state_dir(cfg);
    new_key(&cfg.state_dir.join("heartbeat.key"))
}

fn make_state_dir(cfg: &TestConfig) {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.state_dir)
        .unwrap();
}

fn new_key(path: &Path) -> PublicKey {
    let info = keys::generate(path, false).unwrap();
    PublicKey::from_b64(&info.public_key_b64).unwrap()
}

/// `GET /health` whatever its status (503 when the host is not available).
fn health(agent: &Agent) -> Value {
    let (code, body) = try_http(agent.addr, "GET", "/health", None)
        .unwrap_or_else(|e| panic!("GET /health: {e}\n{}", tail(agent)));
    assert!(
        code == 200 || code == 503,
        "/health answered {code}: {body}"
    );
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/health: {e}: {body}"))
}

/// The `heartbeat` block of `/health`.
fn hb(agent: &Agent) -> Value {
    let v = health(agent);
    let block = v["heartbeat"].clone();
    assert!(block.is_object(), "/health has no heartbeat block: {v}");
    block
}

fn spooled(agent: &Agent) -> u64 {
    let b = hb(agent);
    b["spooled"]
        .as_u64()
        .unwrap_or_else(|| panic!("heartbeat.spooled is not a number: {b}"))
}

/// `GET /heartbeat`: delivery in detail (`/health` carries only the contract's three
/// keys, `last_success`, `spooled` and `rejected`).
fn detail(agent: &Agent) -> Value {
    let (code, v) = agent.get_json("/heartbeat");
    assert_eq!(code, 200, "/heartbeat: {v}");
    v
}

/// The last seq produced, if any.
fn produced_seq(agent: &Agent) -> Option<u64> {
    detail(agent)["seq"].as_u64()
}

/// The last problem: key, spool, the control plane's answer.
fn hb_error(agent: &Agent) -> Option<String> {
    detail(agent)["error"].as_str().map(str::to_string)
}

fn metrics(agent: &Agent) -> String {
    let (code, text) = agent.get("/metrics");
    assert_eq!(code, 200, "/metrics: {text}");
    text
}

/// The value of the sample `series` (a name, or a name with its labels exactly as
/// exposed, e.g. `vigil_heartbeats_dropped_total{reason="spool_full"}`).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn metric(agent: &Agent, series: &str) -> Option<f64> {
    value(&metrics(agent), series)
}

/// The sum of `vigil_heartbeats_dropped_total` over every reason.
fn dropped_all(agent: &Agent) -> f64 {
    metrics(agent)
        .lines()
        .filter(|l| l.starts_with("vigil_heartbeats_dropped_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn dropped(reason: &str) -> String {
    format!("vigil_heartbeats_dropped_total{{reason=\"{reason}\"}}")
}

fn failures(reason: &str) -> String {
    format!("vigil_heartbeat_send_failures_total{{reason=\"{reason}\"}}")
}

/// The last lines of the agent's log.
fn tail(agent: &Agent) -> String {
    let log = agent.logs();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// What to print when a wait times out.
fn diag(rx: &Receiver, agent: Option<&Agent>) -> String {
    let mut out = rx.summary();
    if let Some(a) = agent {
        let h = try_http(a.addr, "GET", "/health", None)
            .map(|(_, b)| b)
            .unwrap_or_else(|e| format!("(no answer: {e})"));
        let d = try_http(a.addr, "GET", "/heartbeat", None)
            .map(|(_, b)| b)
            .unwrap_or_else(|e| format!("(no answer: {e})"));
        out.push_str(&format!(
            "/health: {h}\n/heartbeat: {d}\nagent log:\n{}\n",
            tail(a)
        ));
    }
    out
}

/// Polls `f` every 20 ms until `Some`, else panics naming `what` with the receiver's
/// requests, `/health` and the agent's log.
fn wait_for<T>(
    timeout: Duration,
    what: &str,
    rx: &Receiver,
    agent: Option<&Agent>,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                diag(rx, agent)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait<T>(what: &str, rx: &Receiver, agent: &Agent, f: impl FnMut() -> Option<T>) -> T {
    wait_for(WAIT, what, rx, Some(agent), f)
}

/// Waits until the spool is empty by `/health` and the metric, and the last seq the agent
/// produced has been accepted; returns the accepted seqs.
fn wait_drained(rx: &Receiver, agent: &Agent) -> Vec<u64> {
    wait("the spool to drain", rx, agent, || {
        let last = produced_seq(agent)?;
        let acc = rx.accepted_seqs();
        (spooled(agent) == 0
            && metric(agent, "vigil_heartbeat_spool_records") == Some(0.0)
            && acc.contains(&last))
        .then_some(acc)
    })
}

fn assert_strictly_increasing(seqs: &[u64], what: &str) {
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "{what}: not strictly increasing: {seqs:?}"
    );
}

fn body_json(r: &Record) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| {
        panic!(
            "body is not JSON ({e}): {}",
            String::from_utf8_lossy(&r.body)
        )
    })
}

/// An accepted request is the agent's heartbeat as the contract describes it.
fn assert_heartbeat_request(r: &Record, pk: &PublicKey) {
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, PATH);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let params = r
        .verified
        .as_ref()
        .unwrap_or_else(|e| panic!("seq {:?} did not verify: {e}", r.seq));
    assert_eq!(params.key_id, pk.info().key_id);
    let v = body_json(r);
    assert_eq!(v["v"], 1, "{v}");
    assert_eq!(v["host_id"], HOST_ID, "{v}");
    assert_eq!(v["seq"].as_u64(), r.seq, "{v}");
    let sent_at = v["sent_at"].as_str().unwrap_or_else(|| panic!("{v}"));
    humantime::parse_rfc3339(sent_at).unwrap_or_else(|e| panic!("sent_at {sent_at:?}: {e}"));
    assert!(v["state"].is_string(), "{v}");
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The independent RFC 9421 verifier (PyPI's `http-message-signatures`, see signing.rs).
fn python_verify(request_json: &Path) -> Output {
    let out = Command::new("python3")
        .arg(VERIFY_PY)
        .arg("verify")
        .arg(request_json)
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 is needed for the independent RFC 9421 verifier ({e}); run .ci/deps")
        });
    if out.status.code() == Some(3) {
        panic!(
            "the independent RFC 9421 verifier needs PyPI's http-message-signatures \
             (run .ci/deps): {}",
            stderr(&out)
        );
    }
    out
}

/// A captured request as verify.py reads it, with `body` and `digest` in place of the
/// received ones.
fn python_request(url: &str, r: &Record, body: &[u8], digest: &str, pk: &PublicKey) -> String {
    json!({
        "method": r.method,
        "url": url,
        "headers": {
            "Content-Type": r.header("content-type").unwrap(),
            "Content-Digest": digest,
            "Signature-Input": r.header("signature-input").unwrap(),
            "Signature": r.header("signature").unwrap(),
        },
        "body_b64": STANDARD.encode(body),
        "public_key_b64": pk.info().public_key_b64,
    })
    .to_string()
}

/// `POST /lifecycle` on the admin socket.
fn set_lifecycle(cfg: &TestConfig, state: &str) {
    let (code, body) = unix_http(
        &cfg.socket,
        "POST",
        "/lifecycle",
        Some(&json!({"state": state, "reason": "heartbeat test"}).to_string()),
    );
    assert_eq!(code, 200, "lifecycle {state}: {body}");
}

/// The seqs (in order) in the spool of a stopped agent.
fn spool_contents(cfg: &TestConfig, max: u64) -> Vec<u64> {
    let mut spool = Spool::open(&cfg.state_dir.join("spool"), max).unwrap();
    let all = spool.peek_oldest(usize::MAX).unwrap();
    all.into_iter().map(|(s, _)| s).collect()
}

// ---------------------------------------------------------------------------------------
// 1. Over real TLS.

#[test]
fn tls_heartbeats_have_consecutive_seqs_and_an_independent_verifier_accepts_them() {
    let dir = tempdir();
    let rx = Receiver::https(&dir.path().join("pki"), None);
    assert!(rx.url().starts_with("https://localhost:"), "{}", rx.url());
    let cfg = config(dir.path(), &rx, "interval = \"100ms\"\n");
    let pk = enrol(&cfg);
    rx.set_public_key(pk.clone());
    let agent = Agent::start(&cfg);

    let acc = wait("three accepted heartbeats", &rx, &agent, || {
        let a = rx.accepted();
        (a.len() >= 3).then_some(a)
    });
    let started = now_secs();
    let seqs: Vec<u64> = acc.iter().map(|r| r.seq.unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "consecutive seqs: {seqs:?}"
    );
    for r in &acc {
        assert_heartbeat_request(r, &pk);
        let created = r.verified.as_ref().unwrap().created;
        assert!(
            created.abs_diff(started) <= 60,
            "created {created} is not now ({started})"
        );
    }
    // Nothing was refused: every request the agent made verified and was in order.
    for r in rx.records() {
        assert_eq!(
            r.answer,
            Some(200),
            "{}\n{}",
            r.line(),
            diag(&rx, Some(&agent))
        );
    }
    let b = hb(&agent);
    assert!(b["last_success"].is_string(), "{b}");
    assert_eq!(b["rejected"], false, "{b}");
    let d = detail(&agent);
    assert_eq!(d["enabled"], true, "{d}");
    assert_eq!(d["error"], Value::Null, "{d}");

    // The same requests through an RFC 9421 implementation we did not write.
    let req = dir.path().join("req.json");
    for r in &acc[..2] {
        let digest = r.header("content-digest").unwrap().to_string();
        std::fs::write(&req, python_request(rx.url(), r, &r.body, &digest, &pk)).unwrap();
        let ok = python_verify(&req);
        assert_eq!(ok.status.code(), Some(0), "{}{}", stdout(&ok), stderr(&ok));
        assert!(
            stdout(&ok).starts_with(&format!(
                "OK label=vigil keyid={} created=",
                pk.info().key_id
            )),
            "{}",
            stdout(&ok)
        );

        // The body changed (another seq): the digest no longer matches.
        let seq = r.seq.unwrap();
        let text = String::from_utf8(r.body.clone()).unwrap();
        let needle = format!("\"seq\":{seq}");
        assert!(text.contains(&needle), "{text}");
        let tampered = text.replacen(&needle, &format!("\"seq\":{}", seq + 1000), 1);
        std::fs::write(
            &req,
            python_request(rx.url(), r, tampered.as_bytes(), &digest, &pk),
        )
        .unwrap();
        let bad = python_verify(&req);
        assert_eq!(
            bad.status.code(),
            Some(1),
            "{}{}",
            stdout(&bad),
            stderr(&bad)
        );
        assert!(
            stdout(&bad).starts_with("REJECTED: Content-Digest does not match"),
            "{}",
            stdout(&bad)
        );

        // And with the Content-Digest recomputed for it: the signature no longer matches.
        let forged = sign::content_digest(tampered.as_bytes());
        std::fs::write(
            &req,
            python_request(rx.url(), r, tampered.as_bytes(), &forged, &pk),
        )
        .unwrap();
        let bad = python_verify(&req);
        assert_eq!(
            bad.status.code(),
            Some(1),
            "{}{}",
            stdout(&bad),
            stderr(&bad)
        );
        assert!(stdout(&bad).starts_with("REJECTED"), "{}", stdout(&bad));
        assert!(
            !stdout(&bad).contains("Content-Digest"),
            "the signature, not the digest, refuses it: {}",
            stdout(&bad)
        );
    }
}

// ---------------------------------------------------------------------------------------
// 2. An outage: spooled, then drained in order, each seq once.

#[test]
fn an_outage_spools_and_then_every_seq_is_delivered_once_in_order() {
    let dir = tempdir();
    let rx = Receiver::http(None);
    let cfg = config(
        dir.path(),
        &rx,
        "interval = \"100ms\"\nmax_backoff = \"200ms\"\n",
    );
    rx.set_public_key(enrol(&cfg));
    // Throttled first, then failing: both keep the heartbeats.
    rx.set_mode(Mode::Status(429));
    let agent = Agent::start(&cfg);

    wait("a throttled send", &rx, &agent, || {
        (metric(&agent, &failures("throttled")).unwrap_or(0.0) > 0.0).then_some(())
    });
    rx.set_mode(Mode::Status(503));
    wait("5 heartbeats spooled", &rx, &agent, || {
        (spooled(&agent) >= 5).then_some(())
    });
    let m = metrics(&agent);
    assert!(
        value(&m, &failures("server_error")).is_some_and(|v| v > 0.0),
        "{m}"
    );
    assert!(
        value(&m, "vigil_heartbeat_spool_records").is_some_and(|v| v >= 1.0),
        "{m}"
    );
    assert!(
        value(&m, "vigil_heartbeat_spool_bytes").is_some_and(|v| v > 0.0),
        "{m}"
    );
    assert_eq!(hb(&agent)["last_success"], Value::Null);
    assert_eq!(dropped_all(&agent), 0.0, "{m}");
    rx.set_mode(Mode::Accept);
    let acc = wait_drained(&rx, &agent);

    let records = rx.records();
    let first = records.iter().filter_map(|r| r.seq).min().unwrap();
    let last = *acc.last().unwrap();
    assert_eq!(
        acc,
        (first..=last).collect::<Vec<_>>(),
        "every seq from the first produced to the last accepted, once, in order\n{}",
        diag(&rx, Some(&agent))
    );
    // Everything seen during the outage got through.
    for r in records.iter().filter(|r| r.answer == Some(503)) {
        assert!(acc.contains(&r.seq.unwrap()), "{}", r.line());
    }
    for r in rx.accepted() {
        assert!(r.ok(), "{}", r.line());
    }
    assert!(
        records
            .iter()
            .all(|r| matches!(r.answer, Some(200 | 429 | 503))),
        "no 409/401 along the way\n{}",
        rx.summary()
    );
    let m = metrics(&agent);
    // Every series of the contract is there (each reason from the start), and the
    // exposition is valid.
    let mut series: Vec<String> = [
        "vigil_heartbeats_sent_total",
        "vigil_heartbeats_duplicate_total",
        "vigil_heartbeat_last_success_timestamp_seconds",
        "vigil_heartbeat_spool_records",
        "vigil_heartbeat_spool_bytes",
        "vigil_heartbeat_rejected",
        "vigil_heartbeat_seq",
    ]
    .map(String::from)
    .to_vec();
    for r in [
        "connect",
        "tls",
        "timeout",
        "http",
        "server_error",
        "throttled",
        "rejected",
    ] {
        series.push(failures(r));
    }
    for r in [
        "spool_full",
        "client_error",
        "too_large",
        "corrupt",
        "unspoolable",
    ] {
        series.push(dropped(r));
    }
    for name in &series {
        assert!(value(&m, name).is_some(), "no {name} in\n{m}");
    }
    assert!(
        value(&m, "vigil_heartbeat_seq").is_some_and(|v| v >= last as f64),
        "{m}"
    );
    crate::util::assert_promtool_accepts(&m);
    assert_eq!(value(&m, "vigil_heartbeat_spool_records"), Some(0.0), "{m}");
    assert!(
        value(&m, "vigil_heartbeats_sent_total").is_some_and(|v| v >= acc.len() as f64 - 1.0),
        "{m}"
    );
    assert!(
        value(&m, "vigil_heartbeat_last_success_timestamp_seconds")
            .is_some_and(|v| v >= now_secs() as f64 - 60.0),
        "{m}"
    );
    assert!(hb(&agent)["last_success"].is_string());
}

// ---------------------------------------------------------------------------------------
// 3. Heartbeats spooled long ago still verify: they are signed at send time.

#[test]
fn heartbeats_spooled_ten_minutes_ago_are_delivered_first_and_still_verify() {
    let dir = tempdir();
    let rx = Receiver::http(None);
    let cfg = config(
        dir.path(),
        &rx,
        "interval = \"100ms\"\nspool_max = \"1MiB\"\n",
    );
    let pk = enrol(&cfg);
    rx.set_public_key(pk.clone());

    // What a previous run left: three heartbeats from ten minutes ago, their seqs reserved.
    let mut counter = SeqCounter::open(&cfg.state_dir).unwrap();
    let old: Vec<u64> = (0..3).map(|_| counter.next().unwrap()).collect();
    drop(counter);
    let then = SystemTime::now() - Duration::from_secs(600);
    let bodies: Vec<Vec<u8>> = old
        .iter()
        .map(|&seq| {
            serde_json::to_vec(&json!({
                "v": 1, "host_id": HOST_ID, "seq": seq,
                "sent_at": humantime::format_rfc3339_millis(then).to_string(),
                "boot_id": "00000000-0000-0000-0000-000000000000",
                "agent_version": "0.0.0-test", "image": {"id": null, "version": null},
                "kernel": "test", "labels": {}, "state": "available",
                "lifecycle": "available", "health": "available", "checks": [],
                "automation": {"paused": false, "reason": null, "until": null, "escalated": []},
                "remediations": [],
            }))
            .unwrap()
        })
        .collect();
    let mut spool = Spool::open(&cfg.state_dir.join("spool"), 1 << 20).unwrap();
    for (seq, body) in old.iter().zip(&bodies) {
        spool.append(*seq, body).unwrap();
    }
    drop(spool);

    // The premise: this receiver refuses a signature made when they were spooled.
    let key = keys::load(&cfg.state_dir.join("heartbeat.key")).unwrap();
    let stale = sign::sign(
        &key,
        "POST",
        rx.url(),
        "application/json",
        &bodies[0],
        now_secs() - 600,
    )
    .unwrap();
    let refused = sign::verify(
        &pk,
        &sign::Received {
            method: "POST",
            target_uri: rx.url(),
            content_type: Some("application/json"),
            content_digest: Some(&stale.content_digest),
            signature_input: Some(&stale.signature_input),
            signature: Some(&stale.signature),
            body: &bodies[0],
        },
        now_secs(),
        Duration::from_secs(300),
    );
    assert!(
        matches!(refused, Err(sign::VerifyError::CreatedOutOfWindow { .. })),
        "{refused:?}"
    );

    let t0 = now_secs();
    let agent = Agent::start(&cfg);
    let acc = wait("the old heartbeats and two new ones", &rx, &agent, || {
        let a = rx.accepted();
        (a.len() >= 5).then_some(a)
    });
    for (i, r) in acc[..3].iter().enumerate() {
        assert_eq!(r.seq, Some(old[i]), "oldest first\n{}", rx.summary());
        assert_eq!(r.body, bodies[i], "seq {} delivered byte for byte", old[i]);
        let created = r.verified.as_ref().unwrap().created;
        assert!(
            created + 1 >= t0,
            "signed at send time: created {created} < {t0}"
        );
    }
    let newest_old = *old.last().unwrap();
    for r in &acc[3..] {
        assert_heartbeat_request(r, &pk);
        assert!(r.seq.unwrap() > newest_old, "{}", r.line());
    }
    assert_strictly_increasing(&rx.accepted_seqs(), "accepted");
    for r in rx.records() {
        assert_eq!(r.answer, Some(200), "{}\n{}", r.line(), rx.summary());
    }
}

// ---------------------------------------------------------------------------------------
// 4. kill -9 at random moments.

#[test]
fn kill_9_at_random_moments_never_reuses_a_seq_and_loses_nothing_spooled() {
    let dir = tempdir();
    let rx = Receiver::http(None);
    let cfg = config(
        dir.path(),
        &rx,
        "interval = \"50ms\"\nmax_backoff = \"100ms\"\ntimeout = \"1s\"\n",
    );
    rx.set_public_key(enrol(&cfg));

    let started = Instant::now();
    let mut rounds = 0;
    // Mostly an outage (the spool grows and is retried); every third round the receiver
    // accepts, so some die while draining or acknowledging. 50 rounds, unless a slow
    // machine makes that take more than 40 s.
    while rounds < 50 && started.elapsed() < Duration::from_secs(40) {
        rx.set_mode(if rounds % 3 == 2 {
            Mode::Accept
        } else {
            Mode::Status(503)
        });
        let agent = Agent::start(&cfg);
        std::thread::sleep(Duration::from_millis(fastrand::u64(50..=400)));
        drop(agent); // SIGKILL
        rounds += 1;
    }
    let before = rx.records();
    rx.set_mode(Mode::Accept);
    let agent = Agent::start(&cfg);
    wait_drained(&rx, &agent);
    drop(agent);
    let records = rx.records();
    eprintln!(
        "{rounds} kills in {:?}; {} requests",
        started.elapsed(),
        records.len()
    );
    assert!(rounds >= 20, "only {rounds} rounds");

    // One seq, one body, whatever the answer.
    let mut bodies: BTreeMap<u64, &[u8]> = BTreeMap::new();
    for r in &records {
        let seq = r
            .seq
            .unwrap_or_else(|| panic!("a request without seq: {}", r.line()));
        let prev = *bodies.entry(seq).or_insert(&r.body);
        assert_eq!(
            prev,
            &r.body[..],
            "seq {seq} sent with two different bodies:\n{}\n{}",
            String::from_utf8_lossy(prev),
            String::from_utf8_lossy(&r.body)
        );
    }
    // Accepted ones: signed, JSON with that seq, strictly increasing.
    let accepted = rx.accepted();
    for r in &accepted {
        assert!(r.ok(), "{}", r.line());
        assert_eq!(body_json(r)["seq"].as_u64(), r.seq, "{}", r.line());
    }
    let acc: Vec<u64> = accepted.iter().map(|r| r.seq.unwrap()).collect();
    assert_strictly_increasing(&acc, "accepted");
    // In seq order: a 409 only ever answers a resend of one accepted before (a crash
    // between the 200 and its acknowledgement), never an older heartbeat that was
    // overtaken by a newer one.
    let mut seen_accepted = BTreeSet::new();
    for r in &records {
        match r.answer {
            Some(200) => {
                seen_accepted.insert(r.seq.unwrap());
            }
            Some(409) => assert!(
                seen_accepted.contains(&r.seq.unwrap()),
                "seq {} was overtaken: 409 before it was ever accepted\n{}",
                r.seq.unwrap(),
                rx.summary()
            ),
            _ => {}
        }
    }

    // A heartbeat sent twice during the outage was retried from the spool: it was
    // durable, so it must have been delivered in the end.
    let mut tries: BTreeMap<u64, usize> = BTreeMap::new();
    for r in before.iter().filter(|r| r.answer == Some(503)) {
        *tries.entry(r.seq.unwrap()).or_default() += 1;
    }
    let retried: BTreeSet<u64> = tries
        .into_iter()
        .filter(|&(_, n)| n >= 2)
        .map(|(s, _)| s)
        .collect();
    assert!(
        !retried.is_empty(),
        "nothing was ever retried\n{}",
        rx.summary()
    );
    let acc_set: BTreeSet<u64> = acc.iter().copied().collect();
    let mut answers: BTreeMap<Option<u16>, usize> = BTreeMap::new();
    for r in &records {
        *answers.entry(r.answer).or_default() += 1;
    }
    eprintln!(
        "answers {answers:?}; {} seqs retried from the spool, {} accepted",
        retried.len(),
        acc.len()
    );
    let lost: Vec<&u64> = retried.difference(&acc_set).collect();
    assert!(
        lost.is_empty(),
        "spooled (retried) but never delivered: {lost:?}\n{}",
        rx.summary()
    );
}

// ---------------------------------------------------------------------------------------
// 5. Spool overflow.

#[test]
fn spool_overflow_drops_the_oldest_counts_them_and_delivers_the_rest_after_a_restart() {
    const SPOOL_MAX: u64 = 8 * 1024;
    let dir = tempdir();
    let rx = Receiver::http(None);
    // A long interval: heartbeats are made only when the test changes the lifecycle, so the
    // counts can be read while nothing moves.
    let cfg = config(
        dir.path(),
        &rx,
        "interval = \"1h\"\nspool_max = \"8KiB\"\nmax_backoff = \"200ms\"\n",
    );
    rx.set_public_key(enrol(&cfg));
    rx.set_mode(Mode::Status(503));
    let agent = Agent::start(&cfg);
    wait("the first heartbeat", &rx, &agent, || {
        (!rx.records().is_empty()).then_some(())
    });

    let mut toggles = 0;
    while metric(&agent, &dropped("spool_full")).unwrap_or(0.0) == 0.0 {
        assert!(
            toggles < 200,
            "no spool_full drop after {toggles} heartbeats"
        );
        let before = produced_seq(&agent);
        set_lifecycle(
            &cfg,
            if toggles % 2 == 0 {
                "upgrading"
            } else {
                "available"
            },
        );
        toggles += 1;
        wait("a heartbeat for the lifecycle change", &rx, &agent, || {
            (produced_seq(&agent) != before).then_some(())
        });
    }
    if toggles % 2 == 1 {
        set_lifecycle(&cfg, "available");
    }
    // Quiet: the same seq, spool and counter twice in a row 300 ms apart.
    let read = || {
        (
            produced_seq(&agent).unwrap(),
            spooled(&agent),
            metric(&agent, &dropped("spool_full")).unwrap(),
        )
    };
    let (seq_q, spooled_q, dropped_q) = wait("the agent to settle", &rx, &agent, || {
        let a = read();
        std::thread::sleep(Duration::from_millis(300));
        (read() == a).then_some(a)
    });
    let first = rx.records().iter().filter_map(|r| r.seq).min().unwrap();
    assert!(dropped_q > 0.0);
    assert_eq!(
        dropped_q as u64 + spooled_q,
        seq_q - first + 1,
        "dropped + spooled = produced (seqs {first}..={seq_q}), nothing lost silently"
    );
    assert!(
        metric(&agent, "vigil_heartbeat_spool_bytes").is_some_and(|b| b <= SPOOL_MAX as f64),
        "{}",
        metrics(&agent)
    );
    eprintln!(
        "{toggles} lifecycle changes: seqs {first}..={seq_q}, {spooled_q} spooled, \
         {dropped_q} dropped"
    );
    assert_eq!(agent.stop(), Some(0));

    // The spool the next start finds: a contiguous run of the newest, the last one (made
    // at SIGTERM) included; the SIGTERM heartbeat may have pushed out one more segment.
    let kept = spool_contents(&cfg, SPOOL_MAX);
    let last = *kept.last().expect("the spool is empty after SIGTERM");
    assert!(last > seq_q, "the SIGTERM heartbeat was spooled: {kept:?}");
    assert_eq!(
        kept,
        (kept[0]..=last).collect::<Vec<_>>(),
        "a newest suffix"
    );
    assert!(
        kept.len() as u64 <= spooled_q + (last - seq_q),
        "nothing but overflow went missing: {kept:?}, {spooled_q} spooled before"
    );

    rx.set_mode(Mode::Accept);
    let agent = Agent::start(&cfg);
    let acc = wait_drained(&rx, &agent);
    for (name, v) in [
        ("spool_full", metric(&agent, &dropped("spool_full"))),
        ("all", Some(dropped_all(&agent))),
    ] {
        assert_eq!(v, Some(0.0), "the restart dropped more ({name})");
    }
    let delivered: Vec<u64> = acc.iter().copied().filter(|&s| s <= last).collect();
    assert_eq!(delivered, kept, "exactly what was spooled, in order");
    let produced: BTreeSet<u64> = (first..=last).collect();
    let dropped_seqs: Vec<u64> = produced
        .iter()
        .copied()
        .filter(|s| !delivered.contains(s))
        .collect();
    assert_eq!(delivered.len() + dropped_seqs.len(), produced.len());
    assert!(!dropped_seqs.is_empty());
    assert!(
        dropped_seqs.iter().max() < delivered.iter().min(),
        "the oldest were dropped: dropped {dropped_seqs:?}, delivered {delivered:?}"
    );
    assert_strictly_increasing(&acc, "accepted");
}

// ---------------------------------------------------------------------------------------
// 6. 409: already received; skip forward.

#[test]
fn a_409_with_a_last_seq_ahead_makes_the_agent_skip_forward_for_good() {
    let dir = tempdir();
    let rx = Receiver::http(None);
    let cfg = config(dir.path(), &rx, "interval = \"100ms\"\n");
    rx.set_public_key(enrol(&cfg));
    rx.set_last_seq(1000);
    let agent = Agent::start(&cfg);

    let first = wait("an accepted heartbeat", &rx, &agent, || {
        rx.accepted_seqs().first().copied()
    });
    assert_eq!(first, 1001, "{}", rx.summary());
    let records = rx.records();
    assert!(
        records
            .iter()
            .any(|r| r.answer == Some(409) && r.seq.is_some_and(|s| s <= 1000)),
        "{}",
        rx.summary()
    );
    wait("the duplicate counter", &rx, &agent, || {
        (metric(&agent, "vigil_heartbeats_duplicate_total").unwrap_or(0.0) >= 1.0).then_some(())
    });
    assert!(produced_seq(&agent).is_some_and(|s| s >= 1001));
    assert_eq!(agent.stop(), Some(0));

    let n = rx.records().len();
    let high = rx.last_seq();
    let agent = Agent::start(&cfg);
    wait("two heartbeats after the restart", &rx, &agent, || {
        (rx.accepted_seqs().iter().filter(|&&s| s > high).count() >= 2).then_some(())
    });
    for r in &rx.records()[n..] {
        assert!(r.seq.unwrap() > high, "seq went back: {}", r.line());
        assert_eq!(r.answer, Some(200), "{}", r.line());
    }
    assert_eq!(
        metric(&agent, "vigil_heartbeats_duplicate_total"),
        Some(0.0)
    );
}

// ---------------------------------------------------------------------------------------
// 7. 401: the control plane rejects this host.

#[test]
fn a_401_keeps_the_heartbeats_and_says_rejected_until_a_success() {
    let dir = tempdir();
    let rx = Receiver::http(None);
    let cfg = config(
        dir.path(),
        &rx,
        "interval = \"100ms\"\nmax_backoff = \"200ms\"\n",
    );
    rx.set_public_key(enrol(&cfg));
    rx.set_mode(Mode::Status(401));
    let agent = Agent::start(&cfg);

    wait(
        "rejected in /health and the metric, 3 spooled",
        &rx,
        &agent,
        || {
            let b = hb(&agent);
            (b["rejected"] == true
                && b["spooled"].as_u64().is_some_and(|n| n >= 3)
                && metric(&agent, "vigil_heartbeat_rejected") == Some(1.0))
            .then_some(())
        },
    );
    let err = hb_error(&agent).unwrap_or_default();
    assert!(!err.is_empty(), "{}", detail(&agent));
    assert!(
        metric(&agent, &failures("rejected")).is_some_and(|v| v > 0.0),
        "{}",
        metrics(&agent)
    );
    // Kept, not dropped.
    assert_eq!(dropped_all(&agent), 0.0, "{}", metrics(&agent));

    rx.set_mode(Mode::Accept);
    let acc = wait_drained(&rx, &agent);
    wait("rejected to clear", &rx, &agent, || {
        (hb(&agent)["rejected"] == false && metric(&agent, "vigil_heartbeat_rejected") == Some(0.0))
            .then_some(())
    });
    let first = rx.records().iter().filter_map(|r| r.seq).min().unwrap();
    assert_eq!(acc, (first..=*acc.last().unwrap()).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------
// 8. Another 4xx: that one heartbeat is dropped.

#[test]
fn a_400_for_one_heartbeat_drops_that_one_and_delivers_the_next() {
    const BAD: u64 = 3;
    let dir = tempdir();
    let rx = Receiver::http(None);
    let cfg = config(dir.path(), &rx, "interval = \"100ms\"\n");
    rx.set_public_key(enrol(&cfg));
    // A fresh state_dir starts at seq 1.
    rx.answer_once(BAD, 400);
    let agent = Agent::start(&cfg);

    wait("three accepted after the refused one", &rx, &agent, || {
        (rx.accepted_seqs().iter().filter(|&&s| s > BAD).count() >= 3).then_some(())
    });
    let records = rx.records();
    let bad: Vec<&Record> = records.iter().filter(|r| r.seq == Some(BAD)).collect();
    assert_eq!(bad.len(), 1, "sent once, not retried\n{}", rx.summary());
    assert_eq!(bad[0].answer, Some(400));
    wait("the client_error drop to be counted", &rx, &agent, || {
        (metric(&agent, &dropped("client_error")) == Some(1.0)).then_some(())
    });
    let acc = rx.accepted_seqs();
    let first = *acc.first().unwrap();
    let want: Vec<u64> = (first..=*acc.last().unwrap())
        .filter(|&s| s != BAD)
        .collect();
    assert_eq!(acc, want, "{}", rx.summary());
    assert!(first < BAD, "{}", rx.summary());
    // Nothing went to the spool (`/health`'s `spooled` also counts the one being sent).
    assert_eq!(
        metric(&agent, "vigil_heartbeat_spool_records"),
        Some(0.0),
        "{}",
        metrics(&agent)
    );
    assert_eq!(dropped_all(&agent), 1.0, "{}", metrics(&agent));
}

// ---------------------------------------------------------------------------------------
// 9. Bad input: the agent keeps serving and says what is wrong.

/// `/checks/scratch` has been sampled, at least twice (its `sampled_at` moves).
fn assert_checks_still_run(rx: &Receiver, agent: &Agent) {
    let at = |a: &Agent| {
        let (code, v) = a.get_json("/checks/scratch");
        assert_eq!(code, 200, "{v}");
        v["sampled_at"].as_str().map(str::to_string)
    };
    let first = wait("a sample", rx, agent, || at(agent));
    wait("another sample", rx, agent, || {
        at(agent).filter(|t| *t != first).map(|_| ())
    });
}

#[test]
fn a_missing_key_is_reported_and_heartbeats_start_once_it_exists() {
    let dir = tempdir();
    let rx = Receiver::http(None);
    let cfg = config(dir.path(), &rx, "interval = \"100ms\"\n");
    let key_path = cfg.state_dir.join("heartbeat.key");
    let agent = Agent::start(&cfg);

    let err = wait("heartbeat.error naming the key", &rx, &agent, || {
        hb_error(&agent).filter(|e| e.contains(key_path.to_str().unwrap()))
    });
    assert_checks_still_run(&rx, &agent);
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        rx.records().is_empty(),
        "sent without a key ({err})\n{}",
        rx.summary()
    );
    assert_eq!(produced_seq(&agent), None, "{}", detail(&agent));

    // `vigil keygen` while the agent runs: it picks the key up without a restart.
    make_state_dir(&cfg);
    let o = run(&["keygen", "--out", key_path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let public = out
        .lines()
        .find_map(|l| l.strip_prefix("public_key = \"")?.strip_suffix('"'))
        .unwrap_or_else(|| panic!("{out}"));
    let pk = PublicKey::from_b64(public).unwrap();
    rx.set_public_key(pk.clone());
    let acc = wait("a heartbeat signed with the new key", &rx, &agent, || {
        rx.accepted().first().cloned()
    });
    assert_heartbeat_request(&acc, &pk);
}

#[test]
fn a_key_others_can_read_is_refused_with_the_reason() {
    let dir = tempdir();
    let rx = Receiver::http(None);
    let cfg = config(dir.path(), &rx, "interval = \"100ms\"\n");
    rx.set_public_key(enrol(&cfg));
    let key_path = cfg.state_dir.join("heartbeat.key");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let agent = Agent::start(&cfg);

    let err = wait("heartbeat.error naming the key", &rx, &agent, || {
        hb_error(&agent).filter(|e| e.contains(key_path.to_str().unwrap()))
    });
    let lower = err.to_lowercase();
    assert!(
        lower.contains("permission") || lower.contains("0644"),
        "says what is wrong with it: {err}"
    );
    assert_checks_still_run(&rx, &agent);
    assert!(rx.records().is_empty(), "{}", rx.summary());
}

#[test]
fn https_without_the_ca_is_a_tls_failure_and_the_agent_keeps_serving() {
    let dir = tempdir();
    let rx = Receiver::https(&dir.path().join("pki"), None);
    let cfg = config_for(
        dir.path(),
        rx.url(),
        None,
        "interval = \"100ms\"\nmax_backoff = \"200ms\"\n",
    );
    rx.set_public_key(enrol(&cfg));
    let agent = Agent::start(&cfg);

    wait("a tls send failure", &rx, &agent, || {
        (metric(&agent, &failures("tls")).unwrap_or(0.0) > 0.0).then_some(())
    });
    let err = wait("heartbeat.error", &rx, &agent, || hb_error(&agent));
    let lower = err.to_lowercase();
    assert!(
        lower.contains("tls") || lower.contains("certificate"),
        "{err}"
    );
    assert_checks_still_run(&rx, &agent);
    wait("a few spooled", &rx, &agent, || {
        (spooled(&agent) >= 2).then_some(())
    });
    assert!(rx.records().is_empty(), "{}", rx.summary());
}

#[test]
fn a_closed_port_is_a_connect_failure_and_the_heartbeats_wait_in_the_spool() {
    let dir = tempdir();
    let rx = Receiver::http(None);
    let url = format!("http://127.0.0.1:{}{PATH}", crate::util::free_port());
    let cfg = config_for(
        dir.path(),
        &url,
        None,
        "interval = \"100ms\"\nmax_backoff = \"200ms\"\n",
    );
    enrol(&cfg);
    let agent = Agent::start(&cfg);
    wait("connect failures and 3 spooled", &rx, &agent, || {
        (metric(&agent, &failures("connect")).unwrap_or(0.0) > 0.0 && spooled(&agent) >= 3)
            .then_some(())
    });
    let err = hb_error(&agent).unwrap_or_default();
    assert!(err.contains("127.0.0.1"), "names the target: {err:?}");
    assert_eq!(hb(&agent)["rejected"], false);
    assert_checks_still_run(&rx, &agent);
}

#[test]
fn a_receiver_that_never_answers_times_out_and_health_stays_fast() {
    let dir = tempdir();
    let rx = Receiver::http(None);
    let cfg = config(
        dir.path(),
        &rx,
        "interval = \"100ms\"\ntimeout = \"300ms\"\nmax_backoff = \"200ms\"\n",
    );
    rx.set_public_key(enrol(&cfg));
    rx.set_mode(Mode::Hang);
    let agent = Agent::start(&cfg);

    wait("timeouts counted and 3 spooled", &rx, &agent, || {
        (metric(&agent, &failures("timeout")).unwrap_or(0.0) >= 2.0 && spooled(&agent) >= 3)
            .then_some(())
    });
    for _ in 0..10 {
        let t = Instant::now();
        hb(&agent);
        let took = t.elapsed();
        assert!(took < Duration::from_secs(1), "/health took {took:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(hb_error(&agent).is_some(), "{}", detail(&agent));

    rx.set_mode(Mode::Accept);
    let acc = wait_drained(&rx, &agent);
    let first = rx.records().iter().filter_map(|r| r.seq).min().unwrap();
    assert_eq!(acc, (first..=*acc.last().unwrap()).collect::<Vec<_>>());
}

/// A small tmpfs, unmounted (lazily if busy) on drop.
pub(crate) struct Tmpfs(PathBuf);

impl Tmpfs {
    pub(crate) fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(ok.success(), "mount tmpfs");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.0).status();
        if !ok.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Writes to `path` until the file system is full; the file stays.
pub(crate) fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5a_u8; 4096];
    loop {
        match f.write_all(&chunk).and_then(|()| f.sync_data()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => return,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

#[test]
fn a_full_disk_under_the_spool_is_reported_and_nothing_spooled_is_lost() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = tempdir();
    let rx = Receiver::http(None);
    // The key outside the tmpfs; spool_max above its size, so the disk fills first.
    let key_path = dir.path().join("hb.key");
    let cfg = config(
        dir.path(),
        &rx,
        &format!(
            "interval = \"100ms\"\nmax_backoff = \"200ms\"\nspool_max = \"4MiB\"\nkey_file = {:?}\n",
            key_path.display().to_string()
        ),
    );
    let _mount = Tmpfs::mount(&cfg.state_dir, "256k");
    rx.set_public_key(new_key(&key_path));
    rx.set_mode(Mode::Status(503));
    let agent = Agent::start(&cfg);

    // Every heartbeat so far is in the spool (nothing delivered, nothing dropped).
    let first = wait("the first heartbeat", &rx, &agent, || {
        rx.records().iter().filter_map(|r| r.seq).min()
    });
    let spooled_upto = wait("3 heartbeats spooled", &rx, &agent, || {
        let seq = produced_seq(&agent)?;
        (spooled(&agent) == seq - first + 1 && seq - first >= 2).then_some(seq)
    });
    assert_eq!(hb_error(&agent).filter(|e| e.contains("space")), None);
    fill(&cfg.state_dir.join("filler"));

    let err = wait(
        "heartbeat.error about the spool or space",
        &rx,
        &agent,
        || {
            hb_error(&agent).filter(|e| {
                let l = e.to_lowercase();
                l.contains("spool") || l.contains("space")
            })
        },
    );
    assert_checks_still_run(&rx, &agent);
    eprintln!("full disk: {err}");

    std::fs::remove_file(cfg.state_dir.join("filler")).unwrap();
    rx.set_mode(Mode::Accept);
    let acc = wait_drained(&rx, &agent);
    let acc_set: BTreeSet<u64> = acc.iter().copied().collect();
    let missing: Vec<u64> = (first..=spooled_upto)
        .filter(|s| !acc_set.contains(s))
        .collect();
    assert!(
        missing.is_empty(),
        "spooled before the disk filled, never delivered: {missing:?}\n{}",
        rx.summary()
    );
    assert_strictly_increasing(&acc, "accepted");
    // Anything else that did not make it is counted.
    let last = *acc.last().unwrap();
    let skipped = (first..=last).filter(|s| !acc_set.contains(s)).count();
    assert_eq!(
        skipped as f64,
        dropped_all(&agent),
        "seqs never delivered = drops counted\n{}",
        metrics(&agent)
    );
}

// ---------------------------------------------------------------------------------------
// 10. SIGTERM sends a last heartbeat.

#[test]
fn sigterm_sends_a_last_heartbeat_and_exits_0() {
    let dir = tempdir();
    let rx = Receiver::http(None);
    let cfg = config(dir.path(), &rx, "interval = \"1h\"\n");
    let pk = enrol(&cfg);
    rx.set_public_key(pk.clone());
    let agent = Agent::start(&cfg);
    // Settled: the first heartbeat (and any for a change of health) in, nothing for 300 ms.
    let n = wait("the first heartbeat", &rx, &agent, || {
        let n = rx.accepted().len();
        std::thread::sleep(Duration::from_millis(300));
        (n >= 1 && rx.records().len() == n).then_some(n)
    });
    let before = *rx.accepted_seqs().last().unwrap();
    assert_eq!(agent.stop(), Some(0));
    let acc = rx.accepted();
    assert_eq!(acc.len(), n + 1, "one last heartbeat\n{}", rx.summary());
    let last = acc.last().unwrap();
    assert_heartbeat_request(last, &pk);
    assert!(last.seq.unwrap() > before);
}

#[test]
fn sigterm_during_an_outage_spools_the_last_heartbeat_for_the_next_start() {
    let dir = tempdir();
    let rx = Receiver::http(None);
    let cfg = config(dir.path(), &rx, "interval = \"1h\"\n");
    rx.set_public_key(enrol(&cfg));
    rx.set_mode(Mode::Status(503));
    let agent = Agent::start(&cfg);
    let first = wait("the first heartbeat", &rx, &agent, || {
        rx.records().first().and_then(|r| r.seq)
    });
    let t = Instant::now();
    assert_eq!(agent.stop(), Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "SIGTERM took {:?}",
        t.elapsed()
    );

    let kept = spool_contents(&cfg, 64 << 20);
    assert!(kept.contains(&first), "{kept:?}");
    let last = *kept.last().unwrap();
    assert!(last > first, "the SIGTERM heartbeat is spooled: {kept:?}");

    rx.set_mode(Mode::Accept);
    let agent = Agent::start(&cfg);
    let acc = wait_drained(&rx, &agent);
    assert_eq!(&acc[..kept.len()], &kept[..], "the spool first, in order");
    assert_strictly_increasing(&acc, "accepted");
}

/// Heartbeats carry the automation state and the audit records not yet delivered: a
/// manual remediation run shows up in the next heartbeat with its `n`, a pause shows as
/// `automation.paused`, and after a restart records already delivered are not sent again.
#[test]
fn heartbeats_carry_automation_and_each_audit_record_once() {
    let dir = tempdir();
    let rd = dir.path().join("remediations.d");
    std::fs::create_dir_all(&rd).unwrap();
    std::fs::set_permissions(&rd, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = rd.join("noop.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let approved = run(&["approve", script.to_str().unwrap()]);
    assert_eq!(approved.status.code(), Some(0));
    let pin = String::from_utf8(approved.stdout).unwrap();

    let rx = Receiver::http(None);
    let cfg = config(dir.path(), &rx, "interval = \"200ms\"\n");
    let text = std::fs::read_to_string(&cfg.path).unwrap();
    std::fs::write(
        &cfg.path,
        format!(
            "{text}\n[automation]\ndir = {:?}\n\n[remediation.noop]\nscript = {:?}\n{pin}\n",
            rd.display().to_string(),
            script.display().to_string()
        ),
    )
    .unwrap();
    rx.set_public_key(enrol(&cfg));
    let agent = Agent::start(&cfg);

    let carried = |rx: &Receiver| -> Vec<(u64, Value)> {
        rx.accepted()
            .iter()
            .flat_map(|r| {
                let b = body_json(r);
                b["remediations"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|rec| (r.seq.unwrap(), rec.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    };

    let out = run(&[
        "remediate",
        "noop",
        "--reason",
        "it",
        "--socket",
        cfg.socket.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{:?}", out);
    let first = wait(
        "the run's audit records in a heartbeat",
        &rx,
        &agent,
        || {
            let c = carried(&rx);
            c.iter()
                .any(|(_, r)| r["remediation"] == "noop" && r["event"] == "succeeded")
                .then_some(c)
        },
    );
    for (_, r) in &first {
        assert!(
            r["n"].as_u64().is_some(),
            "every record has its number: {r}"
        );
        assert_eq!(r["remediation"], "noop", "{r}");
    }

    let out = run(&[
        "automation",
        "pause",
        "--reason",
        "maintenance window",
        "--socket",
        cfg.socket.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{:?}", out);
    wait("automation.paused in a heartbeat", &rx, &agent, || {
        rx.accepted().iter().rev().find_map(|r| {
            let a = &body_json(r)["automation"];
            (a["paused"] == true && a["reason"] == "maintenance window").then_some(())
        })
    });

    // Settle, then restart: the records delivered before are not carried again.
    std::thread::sleep(Duration::from_millis(600));
    let before: BTreeSet<u64> = carried(&rx)
        .iter()
        .map(|(_, r)| r["n"].as_u64().unwrap())
        .collect();
    let last_seq = *rx.accepted_seqs().last().unwrap();
    assert_eq!(agent.stop(), Some(0));
    let agent = Agent::start(&cfg);
    wait("heartbeats after the restart", &rx, &agent, || {
        (rx.accepted_seqs().iter().filter(|s| **s > last_seq).count() >= 3).then_some(())
    });
    let again: Vec<u64> = carried(&rx)
        .iter()
        .filter(|(seq, _)| *seq > last_seq + 1)
        .map(|(_, r)| r["n"].as_u64().unwrap())
        .filter(|n| before.contains(n))
        .collect();
    assert!(
        again.is_empty(),
        "records carried again after a restart: {again:?}"
    );
    drop(agent);
}
