//! `vigil control` on a real PostgreSQL store (the pgcluster harness, one primary shared
//! by these tests, one database each), over real TLS (rcgen):
//!
//! - a real `vigil agent` enrolled with `vigil keygen`'s public key shows `available`
//!   with its checks; the control plane stopped for three minutes while the agent runs
//!   (a heartbeat a second, so ~180 spool, and the backoff sits at its cap for most of
//!   it) loses no `seq`, reorders none, stores none twice. It is the longest test of the
//!   suite by design, and runs alongside the others;
//! - two receivers on one database with a webhook: one call per change, not two, also
//!   for a change noticed at their restart;
//! - `enroll --from` as on the file store, in one transaction;
//! - the agent stopped: `uncertain` within `overdue_after` plus one interval, back when it
//!   resumes, across restarts of the control plane;
//! - the rejections and the enrolment, rotation and revocation of the file-store tests,
//!   on PostgreSQL (where receivers cache keys);
//! - two receivers on one database get the same heartbeat at once, hundreds of times:
//!   exactly one 200 each time, the other 409;
//! - behind a TLS-terminating HAProxy with `public_url`; with `client_ca`;
//! - the database stopped: 503 with a reason, the receiver keeps serving, and recovers.
//!
//! The harness runs PostgreSQL with `fsync = off` (its data is thrown away): these tests
//! check what is committed, not what survives a power cut.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use vigil::config::HeartbeatConfig;
use vigil::config::types::{ByteSize, Duration as CfgDuration};
use vigil::heartbeat::client::HeartbeatClient;
use vigil::heartbeat::sign;

use super::{
    Hook, Plane, body, bulk_enrolment, change, enrolment_and_revocation_at_once,
    forgeries_and_replays_are_refused, key, now, post, post_with, triple, until_uncertain,
};
use crate::pgcluster::{Cluster, ClusterOptions, Node};
use crate::util::{self, Agent, TestConfig, free_port, poll};

/// The server these tests share (no standby: nothing here replicates).
fn cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(|| {
        Cluster::start(ClusterOptions {
            standby: false,
            // Each receiver holds four sessions; several tests run at once.
            extra_conf: vec!["max_connections = 200".into()],
            ..ClusterOptions::default()
        })
    })
}

/// A fresh database on `c`: its name and the `store` URL.
fn database(c: &Cluster) -> (String, String) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "vigil_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    c.psql(Node::Primary, &format!("CREATE DATABASE {name}"));
    let url = format!(
        "postgresql://postgres@127.0.0.1:{}/{name}",
        c.primary_port()
    );
    (name, url)
}

/// `sql` run in database `db`.
fn sql(c: &Cluster, db: &str, sql: &str) -> String {
    c.psql(Node::Primary, &format!("\\c {db}\n{sql}"))
}

/// A plane on a PostgreSQL store, with `extra` config lines.
fn pg_plane(url: &str, extra: &str) -> Plane {
    Plane::new(&format!("store = {url:?}\n{extra}"))
}

/// An agent's config in `dir`: host `host_id`, a cheap disk check, `[heartbeat]` to
/// `plane` over TLS (its CA in `ca_file`) every `interval`, with a key made by
/// `vigil keygen` and enrolled with `vigil control enroll --pubkey`.
fn agent_config(plane: &Plane, dir: &Path, host_id: &str, interval: &str) -> TestConfig {
    let out = plane.cli(&["enroll", "--host", host_id, "--pubkey", &util::keygen(dir)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    util::write_heartbeat_config(
        dir,
        host_id,
        "200ms",
        &format!("https://127.0.0.1:{}/v1/heartbeats", plane.addr.port()),
        &plane.dir.path().join("ca.pem"),
        &format!("interval = {interval:?}\nmax_backoff = \"500ms\""),
    )
}

/// The last seq the agent produced (its `/heartbeat` detail).
fn produced_seq(agent: &Agent) -> u64 {
    let (code, v) = agent.get_json("/heartbeat");
    assert_eq!(code, 200, "{v}");
    v["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no seq in /heartbeat: {v}"))
}

/// Heartbeats waiting in the agent's spool.
fn spooled(agent: &Agent) -> u64 {
    let (_, body) = util::http(agent.addr, "GET", "/health", None);
    let v: Value = serde_json::from_str(&body).unwrap();
    v["heartbeat"]["spooled"]
        .as_u64()
        .unwrap_or_else(|| panic!("no heartbeat.spooled in {v}"))
}

/// Polls `f` every 100 ms until `Some`, or panics with `what` and `diag()` after `limit`.
async fn wait<T, F>(limit: Duration, what: &str, diag: impl Fn() -> String, mut f: F) -> T
where
    F: AsyncFnMut() -> Option<T>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}\n{}",
            diag()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits up to 20 s (`what`) until `plane` shows `host` available; returns the host.
async fn until_available(
    plane: &Plane,
    host: &str,
    what: &str,
    diag: impl Fn() -> String,
) -> Value {
    wait(Duration::from_secs(20), what, diag, async || {
        let h = plane.host(host).await;
        (h["state"] == "available").then_some(h)
    })
    .await
}

/// The seqs of database `db`'s heartbeats, in order, comma-separated.
fn stored_seqs(c: &Cluster, db: &str) -> String {
    sql(
        c,
        db,
        "SELECT string_agg(seq::text, ',' ORDER BY seq) FROM heartbeats",
    )
}

/// The state the webhook was last told for `host` in database `db`.
fn notified_state(c: &Cluster, db: &str, host: &str) -> String {
    sql(
        c,
        db,
        &format!("SELECT notified_state FROM hosts WHERE host_id = '{host}'"),
    )
}

/// How long the control plane stays away while the agent runs.
const OUTAGE: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_is_available_with_its_checks_and_an_outage_of_the_plane_loses_no_seq() {
    let c = cluster();
    let (db, url) = database(c);
    let plane = pg_plane(&url, "");
    let dir = util::tempdir();
    // A heartbeat a second: many to spool over the outage, few enough to read back.
    let cfg = agent_config(&plane, dir.path(), "pg-agent-1", "1s");
    let rx = plane.start();
    let agent = Agent::start(&cfg);
    let diag = || format!("agent log:\n{}", agent.logs());

    let h = until_available(&plane, "pg-agent-1", "the host available", diag).await;
    assert_eq!(h["reported_state"], "available", "{h}");
    let checks = h["last_heartbeat"]["checks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        checks
            .iter()
            .any(|c| c["name"] == "scratch" && c["status"] == "ok"),
        "the agent's checks: {h}"
    );

    // The control plane goes away; the agent keeps producing and spools.
    assert_eq!(rx.stop(), Some(0));
    let outage = Instant::now();
    let seq_at_stop = produced_seq(&agent);
    wait(
        Duration::from_secs(60),
        "heartbeats spooled",
        diag,
        async || (spooled(&agent) >= 20).then_some(()),
    )
    .await;
    let left = OUTAGE.saturating_sub(outage.elapsed());
    tokio::time::sleep(left).await; // the outage itself, not a wait for something
    let produced = produced_seq(&agent);
    // At least one a second for most of the outage (the agent's own timing may slip on a
    // loaded machine, but not by half).
    assert!(
        produced >= seq_at_stop + OUTAGE.as_secs() / 2,
        "{produced} vs {seq_at_stop}"
    );
    assert!(spooled(&agent) >= 50, "spooled {}", spooled(&agent));

    let rx = plane.start();
    wait(
        Duration::from_secs(60),
        "the spool drained",
        diag,
        async || {
            let stored = plane.host("pg-agent-1").await["seq"].as_u64().unwrap_or(0);
            (spooled(&agent) == 0 && stored >= produced).then_some(())
        },
    )
    .await;
    // SIGTERM: a last heartbeat, delivered to the running plane.
    let last_produced = produced_seq(&agent);
    assert_eq!(agent.stop(), Some(0));

    let rows = sql(
        c,
        &db,
        "SELECT seq, received_ms FROM heartbeats WHERE host_id = 'pg-agent-1' ORDER BY seq",
    );
    let rows: Vec<(u64, u64)> = rows
        .lines()
        .map(|l| {
            let (s, r) = l.split_once('|').unwrap();
            (s.parse().unwrap(), r.parse().unwrap())
        })
        .collect();
    let last = util::assert_every_seq_once_in_order(&rows, last_produced);
    let host = plane.host("pg-agent-1").await;
    assert_eq!(host["seq"], last);
    assert_eq!(
        sql(
            c,
            &db,
            "SELECT last_seq FROM hosts WHERE host_id = 'pg-agent-1'"
        ),
        last.to_string()
    );
    drop(rx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_turns_uncertain_in_time_and_back_across_restarts_of_the_plane() {
    let c = cluster();
    let (_db, url) = database(c);
    let overdue = Duration::from_secs(2);
    let interval = Duration::from_millis(500);
    let plane = pg_plane(&url, "overdue_after = \"2s\"");
    let dir = util::tempdir();
    let cfg = agent_config(&plane, dir.path(), "pg-agent-2", "500ms");
    let rx = plane.start();
    let agent = Agent::start(&cfg);
    let diag = || format!("agent log:\n{}", agent.logs());
    until_available(&plane, "pg-agent-2", "the host available", diag).await;

    let stopped = Instant::now();
    assert_eq!(agent.stop(), Some(0));
    let h = wait(
        Duration::from_secs(20),
        "the host uncertain",
        String::new,
        async || {
            let h = plane.host("pg-agent-2").await;
            (h["state"] == "uncertain").then_some(h)
        },
    )
    .await;
    let took = stopped.elapsed();
    // The last heartbeat came at most one interval before the stop (SIGTERM sends one
    // more); 300 ms covers the 100 ms polling and a loaded machine's request latency.
    assert!(
        took <= overdue + interval + Duration::from_millis(300),
        "uncertain only after {took:?}"
    );
    // Not before overdue_after past the last heartbeat the plane stored.
    let last_seen = h["last_seen"].as_str().unwrap().to_string();
    assert_eq!(h["reported_state"], "available");
    let seen_ms = humantime::parse_rfc3339(&last_seen)
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap();
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    assert!(
        now_ms >= seen_ms + overdue,
        "uncertain early: last seen {last_seen}"
    );

    // A restart of the plane keeps it uncertain (its last heartbeat is old, and stored).
    assert_eq!(rx.stop(), Some(0));
    let rx = plane.start();
    let h = plane.host("pg-agent-2").await;
    assert_eq!(
        (&h["state"], &h["last_seen"]),
        (&json!("uncertain"), &json!(last_seen))
    );
    wait(
        Duration::from_secs(10),
        "the metrics to count it",
        String::new,
        async || {
            let (_, m) = plane.get("/metrics").await;
            m.as_str()
                .unwrap()
                .contains("vigil_control_hosts{state=\"uncertain\"} 1")
                .then_some(())
        },
    )
    .await;

    // Heartbeats resume: available again, and still so after another restart.
    let agent = Agent::start(&cfg);
    let diag = || format!("agent log:\n{}", agent.logs());
    until_available(&plane, "pg-agent-2", "the host available again", diag).await;
    assert_eq!(rx.stop(), Some(0));
    let rx = plane.start();
    assert_eq!(plane.host("pg-agent-2").await["state"], "available");
    drop(agent);
    drop(rx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forgery_and_replay_is_refused_with_nothing_stored() {
    let c = cluster();
    let (db, url) = database(c);
    forgeries_and_replays_are_refused(pg_plane(&url, "")).await;
    // Only the two genuine heartbeats reached the history.
    assert_eq!(stored_seqs(c, &db), "1,2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_rotation_and_revocation_reach_a_caching_receiver_at_once() {
    let (_db, url) = database(cluster());
    enrolment_and_revocation_at_once(pg_plane(&url, "")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_receivers_on_one_database_never_both_accept_a_heartbeat() {
    const ROUNDS: u64 = 300;
    let c = cluster();
    let (db, url) = database(c);
    // One public_url for both: what the agents sign for, whichever receiver gets it.
    let public = "https://control.internal";
    let a = pg_plane(&url, &format!("public_url = {public:?}"));
    let b = pg_plane(&url, &format!("public_url = {public:?}"));
    let k = key(3);
    a.enroll("db-twice", &k);
    let (ra, rb) = (a.start(), b.start());
    let (ca, cb) = (a.client(), b.client());
    let target = format!("{public}/v1/heartbeats");
    let mut wins = [0u64; 2];
    for seq in 1..=ROUNDS {
        let hb = body("db-twice", seq, "available");
        let h = sign::sign(&k, "POST", &target, "application/json", &hb, now()).unwrap();
        // The same request to both at the same moment.
        let (x, y) = tokio::join!(post_with(&ca, &hb, &h), post_with(&cb, &hb, &h));
        let mut codes = [x.0, y.0];
        codes.sort();
        assert_eq!(codes, [200, 409], "seq {seq}: {x:?} {y:?}");
        let loser = if x.0 == 409 { &x.1 } else { &y.1 };
        assert_eq!(
            loser["last_seq"], seq,
            "the 409 names the accepted seq: {loser}"
        );
        wins[usize::from(x.0 != 200)] += 1;
    }
    eprintln!("receiver a won {} times, b {}", wins[0], wins[1]);
    assert_eq!(
        sql(
            c,
            &db,
            "SELECT count(*), count(DISTINCT seq), max(seq) FROM heartbeats"
        ),
        format!("{ROUNDS}|{ROUNDS}|{ROUNDS}")
    );
    // Enrolment through one receiver's CLI was seen by the other at once, and the
    // history each accepted is visible through both.
    assert_eq!(a.host("db-twice").await["seq"], ROUNDS);
    assert_eq!(b.host("db-twice").await["seq"], ROUNDS);
    drop((ra, rb));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_receivers_on_one_database_send_each_webhook_change_once() {
    let c = cluster();
    let (db, url) = database(c);
    let mut hook = Hook::start().await;
    let extra = format!(
        "overdue_after = \"6s\"\nwebhook = \"http://{}/hook\"",
        hook.addr
    );
    let (a, b) = (pg_plane(&url, &extra), pg_plane(&url, &extra));
    let k = key(7);
    a.enroll("db-hook", &k);
    let (ra, rb) = (a.start(), b.start());
    until_uncertain(&a, 1).await;
    until_uncertain(&b, 1).await;
    let ca = a.client();

    // Both trackers notice each change; one call each.
    assert_eq!(post(&ca, &k, &body("db-hook", 1, "available")).await.0, 200);
    let (v, _) = hook.next("uncertain to available").await;
    assert_eq!(change(&v), triple("db-hook", "uncertain", "available"));
    let (v, _) = tokio::time::timeout(Duration::from_secs(15), hook.calls.recv())
        .await
        .expect("the overdue call")
        .unwrap();
    assert_eq!(change(&v), triple("db-hook", "available", "uncertain"));
    hook.assert_none_for(Duration::from_secs(3)).await;

    // Back, then both receivers stop; it goes silent while they are down: after their
    // restart, one call.
    let posted = Instant::now();
    assert_eq!(post(&ca, &k, &body("db-hook", 2, "available")).await.0, 200);
    let (v, _) = hook.next("back to available").await;
    assert_eq!(change(&v), triple("db-hook", "uncertain", "available"));
    assert_eq!(ra.stop(), Some(0));
    assert_eq!(rb.stop(), Some(0));
    assert!(
        posted.elapsed() < Duration::from_secs(6),
        "the machine is too slow for this test: stopped only after {:?}",
        posted.elapsed()
    );
    assert_eq!(notified_state(c, &db, "db-hook"), "available");
    // The outage itself, not a wait for something.
    tokio::time::sleep(Duration::from_secs(7).saturating_sub(posted.elapsed())).await;
    assert_eq!(hook.pending(), vec![], "no call while both are down");
    let (ra, rb) = (a.start(), b.start());
    let (v, code) = hook.next("replayed after the restart").await;
    assert_eq!(
        (change(&v), code),
        (triple("db-hook", "available", "uncertain"), 200)
    );
    assert_eq!(v["seq"], 2);
    hook.assert_none_for(Duration::from_secs(3)).await;
    assert_eq!(notified_state(c, &db, "db-hook"), "uncertain");

    // A change still being retried when both stop is given back, and sent once after
    // their restart.
    hook.answer(500);
    let posted = Instant::now();
    assert_eq!(post(&ca, &k, &body("db-hook", 3, "available")).await.0, 200);
    let (v, code) = hook.next("a try answered 500").await;
    assert_eq!(
        (change(&v), code),
        (triple("db-hook", "uncertain", "available"), 500)
    );
    assert_eq!(ra.stop(), Some(0));
    assert_eq!(rb.stop(), Some(0));
    assert_eq!(
        notified_state(c, &db, "db-hook"),
        "uncertain",
        "the claim was given back"
    );
    hook.answer(200);
    let (ra, rb) = (a.start(), b.start());
    let delivered = loop {
        let (v, code) = hook.next("the unsent change after the restart").await;
        assert_eq!(change(&v), triple("db-hook", "uncertain", "available"));
        if code == 200 {
            break v;
        }
    };
    assert_eq!(delivered["seq"], 3);
    assert!(
        posted.elapsed() < Duration::from_secs(6),
        "too slow: db-hook went overdue before the check ({:?})",
        posted.elapsed()
    );
    // Only the next change follows (db-hook going silent), once.
    let (v, code) = tokio::time::timeout(Duration::from_secs(15), hook.calls.recv())
        .await
        .expect("the overdue call")
        .unwrap();
    assert_eq!(
        (change(&v), code),
        (triple("db-hook", "available", "uncertain"), 200)
    );
    hook.assert_none_for(Duration::from_secs(3)).await;
    drop((ra, rb));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_enrolment_checks_every_line_first_and_enrols_in_one_transaction() {
    let c = cluster();
    let (db, url) = database(c);
    bulk_enrolment(pg_plane(&url, "")).await;
    assert_eq!(sql(c, &db, "SELECT count(*) FROM host_keys"), "1001");
}

/// HAProxy terminating TLS on `front` with `pem` (certificate and key), forwarding
/// plain HTTP to `back`.
struct Haproxy(std::process::Child);

impl Haproxy {
    fn start(dir: &Path, pem: &Path, front: u16, back: u16) -> Haproxy {
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "defaults\n\tmode http\n\ttimeout connect 2s\n\ttimeout client 30s\n\
                 \ttimeout server 30s\n\nfrontend tls_in\n\tbind 127.0.0.1:{front} ssl crt {pem}\n\
                 \tdefault_backend control\n\nbackend control\n\tserver c 127.0.0.1:{back}\n",
                pem = pem.display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("/usr/sbin/haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("haproxy.err")).unwrap())
            .spawn()
            .expect("spawn haproxy");
        poll(Duration::from_secs(20), "haproxy to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", front)).ok()
        });
        Haproxy(child)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn client_for(url: &str, ca: &Path, cert: Option<(PathBuf, PathBuf)>) -> HeartbeatClient {
    let (client_cert, client_key) = cert.unzip();
    HeartbeatClient::new(&HeartbeatConfig {
        url: url.into(),
        interval: CfgDuration::from_secs(15),
        key_file: PathBuf::new(),
        ca_file: Some(ca.to_path_buf()),
        client_cert,
        client_key,
        spool_max: ByteSize(1 << 20),
        max_backoff: CfgDuration::from_secs(1),
        timeout: CfgDuration::from_secs(10),
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_tls_terminating_haproxy_heartbeats_verify_against_public_url() {
    let c = cluster();
    let (_db, url) = database(c);
    let plane = pg_plane(&url, "");
    let front = free_port();
    let public = format!("https://127.0.0.1:{front}");
    let pem = plane.dir.path().join("haproxy.pem");
    let cert = std::fs::read_to_string(plane.dir.path().join("server.pem")).unwrap();
    let key_pem = std::fs::read_to_string(plane.dir.path().join("server.key")).unwrap();
    std::fs::write(&pem, format!("{cert}{key_pem}")).unwrap();
    let _proxy = Haproxy::start(plane.dir.path(), &pem, front, plane.addr.port());
    let client = client_for(
        &format!("{public}/v1/heartbeats"),
        &plane.dir.path().join("ca.pem"),
        None,
    );
    let k = key(4);
    plane.enroll("db-proxied", &k);
    let proxy_addr = format!("127.0.0.1:{front}").parse().unwrap();

    // Plain HTTP behind the proxy, first without public_url: the receiver rebuilds
    // http://… from what it saw, which is not what the agent signed.
    let write = |plane: &Plane, extra: &str| {
        std::fs::write(
            &plane.config,
            format!(
                "[control]\nlisten = \"{}\"\nstate_dir = \"state\"\nstore = {url:?}\n{extra}\n",
                plane.addr
            ),
        )
        .unwrap();
    };
    write(&plane, "");
    let rx = plane.start();
    let (code, v) = post(&client, &k, &body("db-proxied", 1, "available")).await;
    assert_eq!((code, &v["reason"]), (401, &json!("bad_signature")), "{v}");
    drop(rx);

    write(&plane, &format!("public_url = \"{public}/\""));
    let rx = plane.start();
    let (code, v) = post(&client, &k, &body("db-proxied", 1, "available")).await;
    assert_eq!((code, &v), (200, &json!({"seq": 1})));
    let (code, h) = plane.get_at(proxy_addr, "/v1/hosts/db-proxied").await;
    assert_eq!(
        (code, &h["seq"], &h["state"]),
        (200, &json!(1), &json!("available"))
    );
    drop(rx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_ca_a_client_without_a_certificate_is_refused() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let c = cluster();
    let (db, url) = database(c);
    // A second CA for agents, and one agent certificate.
    let dir = util::tempdir();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "agents CA");
    let agents_ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
    let agent_key = KeyPair::generate().unwrap();
    let agent_cert = CertificateParams::new(vec!["db-mtls".into()])
        .unwrap()
        .signed_by(&agent_key, &agents_ca)
        .unwrap();
    let ca_path = dir.path().join("agents-ca.pem");
    std::fs::write(&ca_path, agents_ca.pem()).unwrap();
    let (cert_path, key_path) = (dir.path().join("agent.pem"), dir.path().join("agent.key"));
    std::fs::write(&cert_path, agent_cert.pem()).unwrap();
    std::fs::write(&key_path, agent_key.serialize_pem()).unwrap();

    let plane = pg_plane(
        &url,
        &format!("client_ca = {:?}", ca_path.display().to_string()),
    );
    let k = key(5);
    plane.enroll("db-mtls", &k);
    let rx = plane.start();
    let url = format!("https://127.0.0.1:{}/v1/heartbeats", plane.addr.port());
    let server_ca = plane.dir.path().join("ca.pem");

    let bare = client_for(&url, &server_ca, None);
    let hb = body("db-mtls", 1, "available");
    let h = sign::sign(
        &k,
        "POST",
        bare.target_uri(),
        "application/json",
        &hb,
        now(),
    )
    .unwrap();
    let refused = bare.post(&hb, &h).await;
    assert!(
        refused.is_err(),
        "no client certificate, yet {:?}",
        refused.map(|r| r.status)
    );

    let with_cert = client_for(&url, &server_ca, Some((cert_path, key_path)));
    let (code, v) = post_with(&with_cert, &hb, &h).await;
    assert_eq!((code, &v), (200, &json!({"seq": 1})));
    assert_eq!(
        sql(c, &db, "SELECT count(*) FROM heartbeats"),
        "1",
        "only the one with a certificate"
    );
    drop(rx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_goes_away_is_a_503_and_the_receiver_recovers_when_it_returns() {
    // Its own server: this test stops it.
    let c = Cluster::start(ClusterOptions {
        standby: false,
        ..ClusterOptions::default()
    });
    let (db, url) = database(&c);
    // The harness trusts every local connection, so this password is never checked; it
    // is there to prove it never reaches the log, even in connection errors.
    let url = url.replacen("postgres@", "postgres:hunter2@", 1);
    let plane = pg_plane(&url, "");
    let k = key(6);
    plane.enroll("db-1", &k);
    let rx = plane.start();
    let client = plane.client();
    assert_eq!(
        post(&client, &k, &body("db-1", 1, "available")).await.0,
        200
    );

    c.stop(Node::Primary, "fast");
    let t = Instant::now();
    let (code, v) = post(&client, &k, &body("db-1", 2, "available")).await;
    assert_eq!((code, &v["reason"]), (503, &json!("store_error")), "{v}");
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "answered only after {:?}",
        t.elapsed()
    );
    let (code, v) = plane.get("/v1/hosts/db-1").await;
    assert_eq!((code, &v["reason"]), (503, &json!("store_error")), "{v}");
    // During the backoff, answers come at once instead of waiting for a connect.
    let t = Instant::now();
    for seq in 2..5 {
        assert_eq!(
            post(&client, &k, &body("db-1", seq, "available")).await.0,
            503
        );
    }
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    let (code, _) = plane.get("/health").await;
    assert_eq!(code, 200, "the receiver itself still serves");

    c.start_node(Node::Primary);
    wait(
        Duration::from_secs(30),
        "a heartbeat accepted again",
        || rx.logs(),
        async || {
            let (code, _) = post(&client, &k, &body("db-1", 2, "available")).await;
            (code == 200).then_some(())
        },
    )
    .await;
    assert_eq!(plane.host("db-1").await["seq"], 2);
    assert_eq!(stored_seqs(&c, &db), "1,2");
    let logs = rx.logs();
    assert_eq!(
        logs.matches("PostgreSQL store not available").count(),
        1,
        "{logs}"
    );
    assert!(logs.contains("PostgreSQL store available again"), "{logs}");
    assert!(!logs.contains("hunter2"));
    drop(rx);
}
