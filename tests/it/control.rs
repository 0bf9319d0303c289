//! The real `vigil control` over real TLS: enrolment from the CLI, signed heartbeats,
//! every rejection, replays, restarts, kill -9 under load, and overdue hosts. [`pg`]: the
//! same receiver on a real PostgreSQL store, with a real agent, two receivers, a proxy,
//! client certificates and a database that goes away.

/// Abusive clients against the receiver; kill -9 of the file store, 100 times.
mod faults;
/// The PostgreSQL store, end to end.
mod pg;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use vigil::config::HeartbeatConfig;
use vigil::config::types::{ByteSize, Duration as CfgDuration};
use vigil::heartbeat::client::HeartbeatClient;
use vigil::heartbeat::keys::HeartbeatKey;
use vigil::heartbeat::sign::{self, SignedHeaders};

use crate::util::{self, poll};

/// A CA, a server certificate for 127.0.0.1, and a control config using them (or, from
/// [`Plane::plain`], plain HTTP on loopback).
struct Plane {
    dir: tempfile::TempDir,
    config: PathBuf,
    addr: SocketAddr,
    ca_der: CertificateDer<'static>,
    tls: bool,
}

impl Plane {
    fn new(extra: &str) -> Plane {
        Plane::with_tls(extra, true)
    }

    /// Plain HTTP: for tests that speak raw HTTP/1.1 on the socket (the CA is still made,
    /// unused).
    fn plain(extra: &str) -> Plane {
        Plane::with_tls(extra, false)
    }

    fn with_tls(extra: &str, tls: bool) -> Plane {
        let dir = util::tempdir();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "vigil test CA");
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", util::free_port()).parse().unwrap();
        let config = dir.path().join("control.toml");
        let tls_lines = if tls {
            "tls_cert = \"server.pem\"\ntls_key = \"server.key\"\n"
        } else {
            ""
        };
        std::fs::write(
            &config,
            format!("[control]\nlisten = \"{addr}\"\n{tls_lines}state_dir = \"state\"\n{extra}\n"),
        )
        .unwrap();
        Plane {
            ca_der: ca.der().clone(),
            dir,
            config,
            addr,
            tls,
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        util::vigil()
            .arg("control")
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .env_remove("VIGIL_CONTROL_CONFIG")
            .output()
            .unwrap()
    }

    fn enroll(&self, host: &str, key: &HeartbeatKey) {
        let out = self.cli(&[
            "enroll",
            "--host",
            host,
            "--pubkey",
            &key.info().public_key_b64,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&self) -> Receiver {
        let log = self.dir.path().join("control.log");
        let child = util::vigil()
            .arg("control")
            .arg("-c")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut r = Receiver { child, log };
        poll(Duration::from_secs(20), "vigil control to listen", || {
            if let Ok(Some(st)) = r.child.try_wait() {
                panic!("vigil control exited with {st}: {}", r.logs());
            }
            std::net::TcpStream::connect(self.addr).ok().map(|_| ())
        });
        r
    }

    fn client(&self) -> HeartbeatClient {
        let scheme = if self.tls { "https" } else { "http" };
        HeartbeatClient::new(&HeartbeatConfig {
            url: format!("{scheme}://127.0.0.1:{}/v1/heartbeats", self.addr.port()),
            interval: CfgDuration::from_secs(15),
            key_file: PathBuf::new(),
            ca_file: self.tls.then(|| self.dir.path().join("ca.pem")),
            client_cert: None,
            client_key: None,
            spool_max: ByteSize(1 << 20),
            max_backoff: CfgDuration::from_secs(1),
            timeout: CfgDuration::from_secs(10),
        })
        .unwrap()
    }

    /// GET over TLS, trusting the test CA; the body parsed as JSON.
    async fn get(&self, path: &str) -> (u16, Value) {
        self.get_at(self.addr, path).await
    }

    /// GET over TLS at `addr` (the receiver, or a proxy in front of it).
    async fn get_at(&self, addr: SocketAddr, path: &str) -> (u16, Value) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header("host", addr.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v = if path == "/metrics" {
            Value::String(String::from_utf8_lossy(&body).into_owned())
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&body)))
        };
        (status, v)
    }

    async fn host(&self, id: &str) -> Value {
        let (code, v) = self.get(&format!("/v1/hosts/{id}")).await;
        assert_eq!(code, 200, "{v}");
        v
    }
}

struct Receiver {
    child: Child,
    log: PathBuf,
}

impl Receiver {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(mut self) -> Option<i32> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        poll(Duration::from_secs(20), "vigil control to exit", || {
            self.child.try_wait().unwrap()
        })
        .code()
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn key(n: u8) -> HeartbeatKey {
    HeartbeatKey::from_signing_key(SigningKey::from_bytes(&[n; 32]))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn body(host: &str, seq: u64, state: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "v": 1, "host_id": host, "seq": seq, "state": state, "kernel": "6.1.0-18-amd64",
        "image": {"id": "debian", "version": "12"}, "future_field": [1, 2],
        "checks": [{"name": "root", "kind": "disk", "status": "ok"}],
    }))
    .unwrap()
}

fn signed(c: &HeartbeatClient, k: &HeartbeatKey, body: &[u8], created: u64) -> SignedHeaders {
    sign::sign(k, "POST", c.target_uri(), "application/json", body, created).unwrap()
}

async fn post(c: &HeartbeatClient, k: &HeartbeatKey, body: &[u8]) -> (u16, Value) {
    let h = signed(c, k, body, now());
    post_with(c, body, &h).await
}

async fn post_with(c: &HeartbeatClient, body: &[u8], h: &SignedHeaders) -> (u16, Value) {
    let r = c.post(body, h).await.unwrap();
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_verified_and_every_forgery_or_replay_is_refused_with_nothing_stored() {
    forgeries_and_replays_are_refused(Plane::new("")).await;
}

/// The rejections, on the store `plane` is configured with (also run on PostgreSQL by
/// [`pg`]).
async fn forgeries_and_replays_are_refused(plane: Plane) {
    let k = key(1);
    plane.enroll("db-1", &k);
    let rx = plane.start();
    let c = plane.client();

    let (code, v) = post(&c, &k, &body("db-1", 1, "available")).await;
    assert_eq!((code, &v), (200, &json!({"seq": 1})));
    let h = plane.host("db-1").await;
    assert_eq!(h["state"], "available");
    assert_eq!(h["seq"], 1);
    assert_eq!(
        h["last_heartbeat"]["future_field"],
        json!([1, 2]),
        "kept as sent"
    );

    let b2 = body("db-1", 2, "available");
    let good = signed(&c, &k, &b2, now());
    let reason = |v: &Value| v["reason"].as_str().unwrap_or("").to_string();

    // Signed by a key that is not enrolled.
    let (code, v) = post(&c, &key(2), &b2).await;
    assert_eq!((code, reason(&v).as_str()), (401, "unknown_key"), "{v}");
    // Another key's signature under the enrolled key's keyid.
    let mut forged = signed(&c, &key(2), &b2, now());
    forged.signature_input = good.signature_input.clone();
    let (code, v) = post_with(&c, &b2, &forged).await;
    assert_eq!((code, reason(&v).as_str()), (401, "bad_signature"), "{v}");
    // A tampered body under the original headers.
    let tampered = body("db-1", 2, "unavailable");
    let (code, v) = post_with(&c, &tampered, &good).await;
    assert_eq!((code, reason(&v).as_str()), (401, "bad_digest"), "{v}");
    // A Content-Digest recomputed for the tampered body: the signature covers it.
    let mut redigested = good.clone();
    redigested.content_digest = sign::content_digest(&tampered);
    let (code, v) = post_with(&c, &tampered, &redigested).await;
    assert_eq!((code, reason(&v).as_str()), (401, "bad_signature"), "{v}");
    // A covered component left out of the signature.
    let mut partial = good.clone();
    partial.signature_input = good.signature_input.replace(" \"content-digest\"", "");
    let (code, v) = post_with(&c, &b2, &partial).await;
    assert_eq!(
        (code, reason(&v).as_str()),
        (401, "missing_component"),
        "{v}"
    );
    // Created too far in the past and in the future.
    for created in [now() - 600, now() + 600] {
        let h = signed(&c, &k, &b2, created);
        let (code, v) = post_with(&c, &b2, &h).await;
        assert_eq!(
            (code, reason(&v).as_str()),
            (401, "created_out_of_window"),
            "{v}"
        );
    }
    // A host that is not enrolled.
    let (code, v) = post(&c, &k, &body("db-9", 1, "available")).await;
    assert_eq!((code, reason(&v).as_str()), (401, "unknown_host"), "{v}");
    // Garbage and a huge body.
    let (code, _) = post(&c, &k, b"not json").await;
    assert_eq!(code, 400);
    // The receiver refuses it from its Content-Length, before reading a byte of it, and
    // closes: the client either reads the 413 or, still writing the body, meets the close
    // (broken pipe, reset). Both are refusals; faults.rs reads the 413 on a raw socket.
    let big = vec![b' '; (1 << 20) + 1];
    match c.post(&big, &signed(&c, &k, &big, now())).await {
        Ok(r) => assert_eq!(r.status, 413),
        Err(e) => {
            let e = e.to_string();
            assert!(
                ["Broken pipe", "reset by peer", "connection closed"]
                    .iter()
                    .any(|s| e.contains(s)),
                "{e}"
            );
        }
    }
    // None of the above was stored.
    let h = plane.host("db-1").await;
    assert_eq!(
        (h["seq"].clone(), h["reported_state"].clone()),
        (json!(1), json!("available"))
    );
    assert_eq!(plane.get("/v1/hosts/db-9").await.0, 404);

    // The genuine request is accepted once; sent again it is a replay.
    assert_eq!(post_with(&c, &b2, &good).await.0, 200);
    let (code, v) = post_with(&c, &b2, &good).await;
    assert_eq!((code, &v["last_seq"]), (409, &json!(2)), "{v}");
    assert_eq!(reason(&v), "stale_seq");
    let (code, v) = post(&c, &k, &body("db-1", 1, "available")).await;
    assert_eq!((code, &v["last_seq"]), (409, &json!(2)));

    let (_, m) = plane.get("/metrics").await;
    let m = m.as_str().unwrap();
    for needle in [
        "vigil_control_heartbeats_accepted_total 2",
        "vigil_control_heartbeats_rejected_total{reason=\"bad_digest\"} 1",
        "vigil_control_heartbeats_rejected_total{reason=\"stale_seq\"} 2",
        "vigil_control_heartbeats_rejected_total{reason=\"created_out_of_window\"} 2",
        "vigil_control_verify_duration_seconds_count",
    ] {
        assert!(m.contains(needle), "{needle} missing:\n{m}");
    }
    util::assert_promtool_accepts(m);
    assert_eq!(rx.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_and_revocation_take_effect_at_once_in_a_running_receiver() {
    enrolment_and_revocation_at_once(Plane::new("")).await;
}

/// Enrolment, rotation and revocation from the CLI while `plane` runs (also run on
/// PostgreSQL by [`pg`], where the receiver caches keys).
async fn enrolment_and_revocation_at_once(plane: Plane) {
    let rx = plane.start();
    let c = plane.client();
    let (old, new) = (key(1), key(2));
    assert_eq!(post(&c, &old, &body("db-1", 1, "available")).await.0, 401);
    plane.enroll("db-1", &old);
    assert_eq!(post(&c, &old, &body("db-1", 1, "available")).await.0, 200);
    // Rotation: a second key, then the first revoked.
    plane.enroll("db-1", &new);
    assert_eq!(post(&c, &new, &body("db-1", 2, "available")).await.0, 200);
    let out = plane.cli(&["revoke", "--host", "db-1", "--key-id", &old.info().key_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, v) = post(&c, &old, &body("db-1", 3, "available")).await;
    assert_eq!((code, &v["reason"]), (401, &json!("unknown_key")));
    assert_eq!(post(&c, &new, &body("db-1", 3, "available")).await.0, 200);
    // Revoking a key that is not there says so.
    let out = plane.cli(&["revoke", "--host", "db-1", "--key-id", &old.info().key_id]);
    assert_eq!(out.status.code(), Some(1));
    // All keys revoked: not enrolled any more.
    assert!(plane.cli(&["revoke", "--host", "db-1"]).status.success());
    assert_eq!(plane.get("/v1/hosts/db-1").await.0, 404);
    let (code, v) = post(&c, &new, &body("db-1", 4, "available")).await;
    assert_eq!((code, &v["reason"]), (401, &json!("unknown_host")));
    // Enrolled again, its seq history is still there: no replay of old heartbeats.
    plane.enroll("db-1", &new);
    assert_eq!(post(&c, &new, &body("db-1", 3, "available")).await.0, 409);
    drop(rx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart_and_hosts_are_listed_and_filtered() {
    let plane = Plane::new("overdue_after = \"1h\"\nretention = \"1h\"");
    let k = key(1);
    for h in ["db-1", "db-2", "db-3"] {
        plane.enroll(h, &k);
    }
    let rx = plane.start();
    let c = plane.client();
    assert_eq!(post(&c, &k, &body("db-1", 10, "available")).await.0, 200);
    assert_eq!(post(&c, &k, &body("db-2", 5, "unavailable")).await.0, 200);
    assert_eq!(rx.stop(), Some(0));

    let rx = plane.start();
    let (_, all) = plane.get("/v1/hosts").await;
    let ids: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["host_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["db-1", "db-2", "db-3"]);
    assert_eq!(all[2]["state"], "uncertain", "never heard from");
    assert_eq!(all[2]["last_seen"], Value::Null);
    let (_, v) = plane.get("/v1/hosts?state=unavailable").await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["host_id"], "db-2");
    let (_, v) = plane
        .get("/v1/hosts?kernel=6.1.*&image=deb*&check_status=ok")
        .await;
    assert_eq!(v.as_array().unwrap().len(), 2);
    let (_, v) = plane.get("/v1/hosts?check_status=critical").await;
    assert_eq!(v.as_array().unwrap().len(), 0);
    let (_, v) = plane.get("/v1/hosts?limit=1&after=db-1").await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["host_id"], "db-2");
    assert_eq!(plane.get("/v1/hosts?state=asleep").await.0, 400);
    assert_eq!(plane.get("/v1/hosts?kernel=[").await.0, 400);
    // The seq check survived the restart.
    let (code, v) = post(&c, &k, &body("db-1", 10, "available")).await;
    assert_eq!((code, &v["last_seq"]), (409, &json!(10)));
    assert_eq!(post(&c, &k, &body("db-1", 11, "available")).await.0, 200);

    // The CLI reads the same store while the receiver runs.
    let out = plane.cli(&["hosts", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["seq"], 11);
    let out = plane.cli(&["hosts"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("HOST"), "{table}");
    assert!(table.contains("db-3  uncertain"), "{table}");
    drop(rx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_turns_uncertain_when_overdue_and_back_when_heartbeats_resume() {
    let plane = Plane::new("overdue_after = \"2s\"");
    let k = key(1);
    plane.enroll("db-1", &k);
    let rx = plane.start();
    let c = plane.client();
    // Taken before the POST: the receiver stamps the heartbeat when it reads the body,
    // so the host cannot be overdue before `sent + overdue_after`.
    let sent = Instant::now();
    assert_eq!(post(&c, &k, &body("db-1", 1, "available")).await.0, 200);
    assert_eq!(plane.host("db-1").await["state"], "available");
    let deadline = sent + Duration::from_secs(10);
    loop {
        let h = plane.host("db-1").await;
        if h["state"] == "uncertain" {
            assert_eq!(h["reported_state"], "available");
            break;
        }
        assert!(Instant::now() < deadline, "still {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        sent.elapsed() >= Duration::from_secs(2),
        "uncertain too early"
    );
    // The metrics follow within a tracker round.
    let t = Instant::now();
    loop {
        let (_, m) = plane.get("/metrics").await;
        if m.as_str()
            .unwrap()
            .contains("vigil_control_hosts{state=\"uncertain\"} 1")
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(post(&c, &k, &body("db-1", 2, "available")).await.0, 200);
    assert_eq!(plane.host("db-1").await["state"], "available");
    drop(rx);
}

/// Signed heartbeats from several enrolled hosts at once, each host on its own task with
/// seqs 1, 2, 3, …, the next one sent as soon as the last is answered, as an agent draining
/// its spool does. What the receiver answered is recorded per host: the highest seq
/// answered 200 (`acked`) and the highest ever sent (`sent`). A send that fails (the
/// receiver is down or was killed mid-request) is retried with the same seq after a short
/// pause; a 409 (the seq was stored but its 200 was lost with the receiver) moves on past
/// the `last_seq` it names. Shared by the kill -9 tests here and in [`faults`].
struct Load {
    hosts: Vec<String>,
    acked: Arc<Vec<std::sync::atomic::AtomicU64>>,
    sent: Arc<Vec<std::sync::atomic::AtomicU64>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts one task per host in `hosts`, all signing with `k`.
    fn start(c: HeartbeatClient, k: HeartbeatKey, hosts: &[String]) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let (c, k) = (Arc::new(c), Arc::new(k));
        let acked: Arc<Vec<AtomicU64>> =
            Arc::new(hosts.iter().map(|_| AtomicU64::new(0)).collect());
        let sent: Arc<Vec<AtomicU64>> = Arc::new(hosts.iter().map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let (c, k, h) = (c.clone(), k.clone(), h.clone());
                let (acked, sent, stop) = (acked.clone(), sent.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut seq = 1u64;
                    while !stop.load(Ordering::Relaxed) {
                        let b = body(&h, seq, "available");
                        let hdr = signed(&c, &k, &b, now());
                        sent[i].fetch_max(seq, Ordering::SeqCst);
                        match c.post(&b, &hdr).await {
                            Ok(r) if r.status == 200 => {
                                acked[i].store(seq, Ordering::SeqCst);
                                seq += 1;
                            }
                            Ok(r) if r.status == 409 => {
                                let v: Value = serde_json::from_slice(&r.body).unwrap();
                                let last = v["last_seq"].as_u64().unwrap();
                                assert!(last >= seq, "{h}: 409 for seq {seq} with last_seq {last}");
                                seq = last + 1;
                            }
                            Ok(r) => panic!(
                                "{h} seq {seq}: {} {}",
                                r.status,
                                String::from_utf8_lossy(&r.body)
                            ),
                            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                        }
                    }
                })
            })
            .collect();
        Load {
            hosts: hosts.to_vec(),
            acked,
            sent,
            stop,
            tasks,
        }
    }

    /// `(host, highest seq answered 200)` for every host, as of now.
    fn acked(&self) -> Vec<(String, u64)> {
        self.hosts
            .iter()
            .zip(self.acked.iter())
            .map(|(h, a)| (h.clone(), a.load(std::sync::atomic::Ordering::SeqCst)))
            .collect()
    }

    /// Total heartbeats answered 200 so far.
    fn total_acked(&self) -> u64 {
        self.acked().iter().map(|(_, a)| a).sum()
    }

    /// The highest seq ever sent for host number `i`.
    fn sent(&self, i: usize) -> u64 {
        self.sent[i].load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops every task and waits for them; a task's panic (an unexpected answer) is
    /// raised here.
    async fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            t.await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_keeps_every_heartbeat_answered_200() {
    let plane = Plane::new("");
    let k = key(1);
    let hosts: Vec<String> = (0..16).map(|i| format!("db-{i}")).collect();
    for h in &hosts {
        plane.enroll(h, &k);
    }
    let rx = plane.start();
    let mut load = Load::start(plane.client(), k, &hosts);
    // Load until at least a few hundred heartbeats were acknowledged, then kill -9.
    let t = Instant::now();
    while load.total_acked() < 300 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "only {} accepted",
            load.total_acked()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rx.kill9();
    load.stop().await;
    let rx = plane.start();
    for (i, (h, a)) in load.acked().iter().enumerate() {
        assert!(*a > 0, "{h} got no 200");
        let v = plane.host(h).await;
        let stored = v["seq"].as_u64().unwrap_or(0);
        assert!(
            stored >= *a,
            "{h}: answered 200 up to seq {a}, stored {stored}"
        );
        // At most the one in flight at the kill, never one that was not sent.
        assert!(
            stored <= load.sent(i),
            "{h}: stored {stored} beyond what was sent ({})",
            load.sent(i)
        );
    }
    drop(rx);
}

#[test]
fn an_invalid_config_exits_78_with_file_line_and_key() {
    let dir = util::tempdir();
    let path = dir.path().join("control.toml");
    std::fs::write(&path, "[control]\nlisten = \"0.0.0.0:8443\"\n").unwrap();
    let out = util::vigil()
        .args(["control", "-c"])
        .arg(&path)
        .env_remove("VIGIL_CONTROL_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "vigil: {}:2:1: control.listen: plain HTTP",
            path.display()
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // $VIGIL_CONTROL_CONFIG is the default for -c.
    let out = util::vigil()
        .args(["control", "hosts"])
        .env("VIGIL_CONTROL_CONFIG", &path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let out = util::vigil()
        .args(["control", "enroll", "--host", "h", "--pubkey", "nope", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("vigil: --pubkey: "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_gets_one_call_per_change_of_derived_state() {
    let hook = Hook::start().await;
    let (hook_addr, mut calls) = (hook.addr, hook.bodies());
    let plane = Plane::new(&format!(
        "overdue_after = \"2s\"\nwebhook = \"http://{hook_addr}/hook\""
    ));
    let k = key(1);
    plane.enroll("db-1", &k);
    let rx = plane.start();
    // The tracker's first round learns "uncertain" (never heard from) without a call.
    let t = Instant::now();
    loop {
        let (_, m) = plane.get("/metrics").await;
        if m.as_str()
            .unwrap()
            .contains("vigil_control_hosts{state=\"uncertain\"} 1")
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = plane.client();
    assert_eq!(post(&c, &k, &body("db-1", 1, "available")).await.0, 200);
    let first = next_call(&mut calls).await;
    assert_eq!(
        (&first["host_id"], &first["previous"], &first["state"]),
        (&json!("db-1"), &json!("uncertain"), &json!("available"))
    );
    let second = next_call(&mut calls).await;
    assert_eq!(
        (
            &second["previous"],
            &second["state"],
            &second["reported_state"]
        ),
        (
            &json!("available"),
            &json!("uncertain"),
            &json!("available")
        )
    );
    assert_eq!(second["seq"], 1);
    // Nothing changes any more, so nothing more is called (three tracker rounds).
    let more = tokio::time::timeout(Duration::from_secs(3), calls.recv()).await;
    assert!(more.is_err(), "an extra call: {more:?}");
    let (_, m) = plane.get("/metrics").await;
    assert!(
        m.as_str()
            .unwrap()
            .contains("vigil_control_webhook_calls_total{result=\"ok\"} 2"),
        "{m}"
    );
    drop(rx);
}

async fn next_call(calls: &mut tokio::sync::mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(10), calls.recv())
        .await
        .expect("a webhook call")
        .unwrap()
}

/// A webhook receiver: every call's body and the status it was answered with
/// ([`Hook::status`], 200 unless a test says otherwise).
struct Hook {
    addr: SocketAddr,
    calls: tokio::sync::mpsc::UnboundedReceiver<(Value, u16)>,
    status: Arc<std::sync::atomic::AtomicU16>,
}

impl Hook {
    async fn start() -> Hook {
        use hyper::service::service_fn;
        use std::sync::atomic::{AtomicU16, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, calls) = tokio::sync::mpsc::unbounded_channel::<(Value, u16)>();
        let status = Arc::new(AtomicU16::new(200));
        let answer = status.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let (tx, answer) = (tx.clone(), answer.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (tx, answer) = (tx.clone(), answer.clone());
                        async move {
                            let b = req.into_body().collect().await?.to_bytes();
                            let code = answer.load(Ordering::SeqCst);
                            let v = serde_json::from_slice(&b).unwrap_or(Value::Null);
                            let _ = tx.send((v, code));
                            let mut resp = hyper::Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
                            Ok::<_, hyper::Error>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Hook {
            addr,
            calls,
            status,
        }
    }

    /// The bodies alone, as the first webhook test reads them.
    fn bodies(self) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut calls = self.calls;
        tokio::spawn(async move {
            while let Some((v, _)) = calls.recv().await {
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        rx
    }

    fn answer(&self, code: u16) {
        self.status.store(code, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next call, within 10 s; `what` names it if none comes.
    async fn next(&mut self, what: &str) -> (Value, u16) {
        tokio::time::timeout(Duration::from_secs(10), self.calls.recv())
            .await
            .unwrap_or_else(|_| panic!("no webhook call: {what}"))
            .unwrap()
    }

    /// Panics if a call comes within `quiet`.
    async fn assert_none_for(&mut self, quiet: Duration) {
        let more = tokio::time::timeout(quiet, self.calls.recv()).await;
        assert!(more.is_err(), "an extra webhook call: {more:?}");
    }

    /// Calls already received, without waiting.
    fn pending(&mut self) -> Vec<(Value, u16)> {
        let mut v = Vec::new();
        while let Ok(c) = self.calls.try_recv() {
            v.push(c);
        }
        v
    }
}

/// `(host_id, previous, state)` of a webhook body.
fn change(v: &Value) -> (String, String, String) {
    let s = |k: &str| v[k].as_str().unwrap_or("?").to_string();
    (s("host_id"), s("previous"), s("state"))
}

fn triple(host: &str, from: &str, to: &str) -> (String, String, String) {
    (host.into(), from.into(), to.into())
}

/// Waits until the receiver's tracker has counted `n` hosts `uncertain` (its first round
/// has run).
async fn until_uncertain(plane: &Plane, n: usize) {
    let needle = format!("vigil_control_hosts{{state=\"uncertain\"}} {n}\n");
    let t = Instant::now();
    loop {
        let (_, m) = plane.get("/metrics").await;
        if m.as_str().unwrap().contains(&needle) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{needle} missing:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_changes_missed_while_the_plane_was_down_are_sent_after_the_restart() {
    const OVERDUE: Duration = Duration::from_secs(6);
    let mut hook = Hook::start().await;
    let plane = Plane::new(&format!(
        "overdue_after = \"6s\"\nwebhook = \"http://{}/hook\"",
        hook.addr
    ));
    let k = key(1);
    plane.enroll("db-1", &k);
    // Never heard from: uncertain from the start, never a call.
    plane.enroll("db-quiet", &k);
    let rx = plane.start();
    until_uncertain(&plane, 2).await;
    let c = plane.client();
    let posted = Instant::now();
    assert_eq!(post(&c, &k, &body("db-1", 1, "available")).await.0, 200);
    let (v, _) = hook.next("uncertain to available").await;
    assert_eq!(change(&v), triple("db-1", "uncertain", "available"));

    // Stopped while db-1 is still fresh; it goes silent past overdue_after meanwhile.
    assert_eq!(rx.stop(), Some(0));
    assert!(
        posted.elapsed() < OVERDUE,
        "the machine is too slow for this test: stopped only after {:?}",
        posted.elapsed()
    );
    // The outage itself, not a wait for something.
    tokio::time::sleep((OVERDUE + Duration::from_secs(1)).saturating_sub(posted.elapsed())).await;
    assert_eq!(hook.pending(), vec![], "no call while the plane is down");
    let rx = plane.start();
    let Ok(Some((v, code))) =
        tokio::time::timeout(Duration::from_secs(10), hook.calls.recv()).await
    else {
        panic!(
            "no call after the restart; notified.json: {:?}\nlog:\n{}",
            std::fs::read_to_string(plane.dir.path().join("state/notified.json")),
            rx.logs()
        );
    };
    assert_eq!(
        (change(&v), code),
        (triple("db-1", "available", "uncertain"), 200)
    );
    assert_eq!(
        (&v["seq"], &v["reported_state"]),
        (&json!(1), &json!("available"))
    );
    hook.assert_none_for(Duration::from_secs(3)).await;

    // A change still being retried when the plane stops is sent after the restart.
    hook.answer(500);
    let posted = Instant::now();
    assert_eq!(post(&c, &k, &body("db-1", 2, "available")).await.0, 200);
    let (v, code) = hook.next("a try answered 500").await;
    assert_eq!(
        (change(&v), code),
        (triple("db-1", "uncertain", "available"), 500)
    );
    assert_eq!(rx.stop(), Some(0));
    hook.answer(200);
    let rx = plane.start();
    let delivered = loop {
        let (v, code) = hook.next("the unsent change after the restart").await;
        assert_eq!(change(&v), triple("db-1", "uncertain", "available"));
        if code == 200 {
            break v;
        }
    };
    assert_eq!(delivered["seq"], 2);
    assert!(
        posted.elapsed() < OVERDUE,
        "too slow: db-1 went overdue before the check ({:?})",
        posted.elapsed()
    );
    // Then only the silence of db-1 once it is overdue, once.
    let (v, code) = tokio::time::timeout(OVERDUE + Duration::from_secs(5), hook.calls.recv())
        .await
        .expect("the overdue call")
        .unwrap();
    assert_eq!(
        (change(&v), code),
        (triple("db-1", "available", "uncertain"), 200)
    );
    hook.assert_none_for(Duration::from_secs(3)).await;
    let (_, m) = plane.get("/metrics").await;
    assert!(
        m.as_str()
            .unwrap()
            .contains("vigil_control_webhook_calls_total{result=\"ok\"} 2"),
        "{m}"
    );
    drop(rx);
}

/// A key for bulk tests, distinct per `i`.
fn bulk_key(i: u32) -> HeartbeatKey {
    let mut seed = [0x5a; 32];
    seed[..4].copy_from_slice(&i.to_le_bytes());
    HeartbeatKey::from_signing_key(SigningKey::from_bytes(&seed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_enrolment_checks_every_line_first_and_a_running_receiver_accepts_at_once() {
    bulk_enrolment(Plane::new("")).await;
}

/// `enroll --from` on the store `plane` is configured with (also run on PostgreSQL by
/// [`pg`]).
async fn bulk_enrolment(plane: Plane) {
    const HOSTS: u32 = 1000;
    let path = plane.dir.path().join("fleet.txt");
    let mut lines = vec!["# host_id public_key".to_string(), String::new()];
    for i in 0..HOSTS {
        lines.push(format!("bulk-{i:04} {}", bulk_key(i).info().public_key_b64));
    }
    let good = lines.join("\n") + "\n";
    let path_s = path.to_str().unwrap();

    // One bad line (line 503: the header, a blank line, then bulk-0500): nothing enrolled.
    let mut bad = lines.clone();
    bad[502] = "bulk-0500 not-a-key".into();
    std::fs::write(&path, bad.join("\n")).unwrap();
    let out = plane.cli(&["enroll", "--from", path_s]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with(&format!("vigil: {path_s}:503: public key: ")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let listed = plane.cli(&["hosts", "--json"]);
    assert!(listed.status.success());
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed, json!([]), "nothing enrolled");
    // --from conflicts with --host/--pubkey.
    let out = plane.cli(&["enroll", "--from", path_s, "--host", "db-1"]);
    assert_eq!(out.status.code(), Some(2));

    // Enrolled while a receiver runs: accepted at once.
    let rx = plane.start();
    std::fs::write(&path, &good).unwrap();
    let out = plane.cli(&["enroll", "--from", path_s]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("enrolled {HOSTS} keys for {HOSTS} hosts (0 already enrolled)\n")
    );
    let c = plane.client();
    let last = HOSTS - 1;
    let (code, v) = post(
        &c,
        &bulk_key(last),
        &body(&format!("bulk-{last:04}"), 1, "available"),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    // Another host's key does not sign for this one.
    let (code, _) = post(&c, &bulk_key(1), &body("bulk-0000", 1, "available")).await;
    assert_eq!(code, 401);

    // Again from standard input, with one new key for an enrolled host.
    let extra = format!("bulk-0000 {}\n", key(9).info().public_key_b64);
    let mut child = util::vigil()
        .args(["control", "enroll", "--from", "-", "-c"])
        .arg(&plane.config)
        .env_remove("VIGIL_CONTROL_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(good.as_bytes()).unwrap();
        stdin.write_all(extra.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("enrolled 1 keys for 1 hosts ({HOSTS} already enrolled)\n")
    );

    let out = plane.cli(&["hosts", "--json"]);
    assert!(out.status.success());
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    let ids: Vec<&str> = listed
        .iter()
        .map(|h| h["host_id"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..HOSTS).map(|i| format!("bulk-{i:04}")).collect();
    assert_eq!(ids, want);
    assert_eq!(listed[last as usize]["seq"], 1);
    drop(rx);
}
