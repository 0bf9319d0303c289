//! Load generator for `vigil control`.
//!
//! ```text
//! # verify cost alone: parse + keyid + Content-Digest + RFC 9421 Ed25519 verify, one core
//! cargo run --release --example control_load -- verify [ITERATIONS]
//! # accepted heartbeats per second against a running receiver (plain HTTP on loopback,
//! # keep-alive connections); enrols HOSTS hosts into STORE first: the receiver's
//! # state_dir (file store) or its postgresql:// URL
//! cargo run --release --example control_load -- load URL STORE HOSTS CONNS SECONDS
//! # only enrol (e.g. to measure a receiver's memory with many hosts); with
//! # CONTROL_LOAD_ENROLLED=1 set, `load` then skips its enrolment
//! cargo run --release --example control_load -- enroll STORE HOSTS
//! ```
//!
//! `load` prints the 200s per second and the latency percentiles of the 200s. Each
//! connection sends for its own hosts in turn, every request signed (before the clock
//! starts) with its own seq, so the receiver does the full work (verify, seq check,
//! group-committed fsync) each time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use vigil::control::store::file::FileStore;
use vigil::control::store::postgresql::PgStore;
use vigil::control::store::{AnyStore, Store};
use vigil::heartbeat::keys::HeartbeatKey;
use vigil::heartbeat::sign::{self, Received, SignedHeaders};

/// A body and its signature headers, ready to send.
type Prepared = (Bytes, SignedHeaders);

fn body(host: &str, seq: u64) -> Vec<u8> {
    // About the size of a real heartbeat with a dozen checks.
    let checks: Vec<serde_json::Value> = (0..12)
        .map(|i| {
            serde_json::json!({"name": format!("check-{i}"), "kind": "disk", "status": "ok",
                "tripped": false, "value": 0.42, "unit": "ratio", "message": "42% used of /"})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "v": 1, "host_id": host, "seq": seq, "sent_at": "2026-01-01T00:00:00Z",
        "state": "available", "kernel": "6.1.0-18-amd64", "image": {"id": "debian", "version": "12"},
        "labels": {"cluster": "orders"}, "checks": checks,
    }))
    .unwrap_or_default()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn verify(iterations: u32) {
    let key = HeartbeatKey::from_signing_key(SigningKey::from_bytes(&[7; 32]));
    let public = key.public_key();
    let b = body("4f1c0b6e2a9d4e7f8a3b5c6d7e8f9012", 1);
    let url = "https://control.internal:8443/v1/heartbeats";
    let h = sign::sign(&key, "POST", url, "application/json", &b, now()).unwrap_or_else(|e| {
        panic!("sign: {e}");
    });
    let (digest, input, signature) = (h.content_digest, h.signature_input, h.signature);
    let request = || Received {
        method: "POST",
        target_uri: url,
        content_type: Some("application/json"),
        content_digest: Some(&digest),
        signature_input: Some(&input),
        signature: Some(&signature),
        body: &b,
    };
    // One at a time, as a receiver with one request in flight does.
    let t = Instant::now();
    for _ in 0..iterations {
        let parsed = vigil::control::body::parse(&b).map(|p| p.seq);
        let kid = sign::signature_key_id(&input);
        let ok = sign::verify(&public, &request(), now(), Duration::from_secs(300));
        assert!(parsed.is_ok() && kid.is_ok() && ok.is_ok());
    }
    let per = t.elapsed() / iterations;
    println!(
        "body {} bytes, one at a time: {per:?} per heartbeat (parse + keyid + digest + verify), {:.0}/s on one core",
        b.len(),
        1.0 / per.as_secs_f64()
    );
    // Batched, as the receiver's verify threads do under load: the same per-request work,
    // and the Ed25519 checks of a batch in one multiscalar multiplication.
    let batch = vigil::control::verifier::MAX_BATCH;
    let rounds = (iterations as usize).div_ceil(batch);
    let key = *public.verifying_key();
    let t = Instant::now();
    for _ in 0..rounds {
        let mut pending = Vec::with_capacity(batch);
        let req = request();
        for _ in 0..batch {
            let parsed = vigil::control::body::parse(&b).map(|p| p.seq);
            let kid = sign::signature_key_id(&input);
            assert!(parsed.is_ok() && kid.is_ok());
            let prepared = sign::prepare(&public, &req, now(), Duration::from_secs(300));
            pending.push(prepared.unwrap_or_else(|e| panic!("{e}")));
        }
        let messages: Vec<&[u8]> = pending.iter().map(|(s, _)| s.message.as_slice()).collect();
        let signatures: Vec<_> = pending.iter().map(|(s, _)| s.signature).collect();
        let keys = vec![key; batch];
        let ok = ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok();
        for (_, rest) in pending {
            assert!(rest.finish(ok).is_ok());
        }
    }
    let per = t.elapsed() / (rounds * batch) as u32;
    println!(
        "batches of {batch}: {per:?} per heartbeat (the same work, Ed25519 batched), {:.0}/s on one core",
        1.0 / per.as_secs_f64()
    );
}

/// Enrols `load-0` … `load-{hosts-1}` with the load key, 64 at a time (pipelined on
/// PostgreSQL).
async fn enroll(store: &str, hosts: usize) {
    let key = HeartbeatKey::from_signing_key(SigningKey::from_bytes(&[7; 32])).public_key();
    let store = if store.starts_with("postgres") {
        AnyStore::Postgres(
            PgStore::open_cli(store)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        )
    } else {
        AnyStore::File(
            FileStore::open_read_only(std::path::Path::new(store), false)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    };
    let t = Instant::now();
    let mut next = 0;
    while next < hosts {
        let mut set = tokio::task::JoinSet::new();
        for i in next..(next + 64).min(hosts) {
            let (store, key) = (store.clone(), key.clone());
            set.spawn(async move { store.enroll(&format!("load-{i}"), &key).await });
        }
        next = (next + 64).min(hosts);
        while let Some(r) = set.join_next().await {
            r.unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    eprintln!("enrolled {hosts} hosts in {:?}", t.elapsed());
}

async fn load(url: String, store: String, hosts: usize, conns: usize, secs: u64) {
    let key = Arc::new(HeartbeatKey::from_signing_key(SigningKey::from_bytes(
        &[7; 32],
    )));
    // Already enrolled (e.g. 100,000 hosts by `enroll`): skip the slow part.
    if std::env::var_os("CONTROL_LOAD_ENROLLED").is_none() {
        enroll(&store, hosts).await;
    }
    let uri: hyper::Uri = url.parse().unwrap_or_else(|e| panic!("{e}"));
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    let target = url.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    // A seq base above anything a previous run left, so reruns need no fresh store.
    let base = now() * 1000;
    // Requests are signed before the clock starts: on a real fleet the hosts sign, and
    // signing here would take the receiver's CPU on this one machine. Enough rounds for
    // the whole run at up to CONTROL_LOAD_RATE heartbeats/s (default 20,000).
    let rate: usize = std::env::var("CONTROL_LOAD_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20_000);
    let rounds = (rate * secs as usize).div_ceil(hosts.max(1)).max(1) as u64;
    let t = Instant::now();
    let mut prepared: Vec<Vec<Prepared>> = Vec::with_capacity(conns);
    for c in 0..conns {
        let mine: Vec<String> = (c..hosts)
            .step_by(conns)
            .map(|i| format!("load-{i}"))
            .collect();
        let mut reqs = Vec::with_capacity(mine.len() * rounds as usize);
        for r in 1..=rounds {
            for h in &mine {
                let b = body(h, base + r);
                let s = sign::sign(&key, "POST", &target, "application/json", &b, now())
                    .unwrap_or_else(|e| panic!("{e}"));
                reqs.push((Bytes::from(b), s));
            }
        }
        prepared.push(reqs);
    }
    let total: usize = prepared.iter().map(Vec::len).sum();
    eprintln!(
        "signed {total} requests ({rounds} rounds) in {:?}",
        t.elapsed()
    );
    let started = Instant::now();
    for reqs in prepared {
        let (stop, authority, target) = (stop.clone(), authority.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(&authority)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let _ = tcp.set_nodelay(true);
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            tokio::spawn(conn);
            let mut lat = Vec::new();
            let mut other = 0u64;
            for (b, s) in reqs {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let req = hyper::Request::post(uri_path(&target))
                    .header("host", &authority)
                    .header("content-type", "application/json")
                    .header("content-digest", s.content_digest)
                    .header("signature-input", s.signature_input)
                    .header("signature", s.signature)
                    .body(Full::new(b))
                    .unwrap_or_else(|e| panic!("{e}"));
                let t = Instant::now();
                let resp = send
                    .send_request(req)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let status = resp.status().as_u16();
                let _ = resp.into_body().collect().await;
                if status == 200 {
                    lat.push(t.elapsed());
                } else {
                    other += 1;
                }
            }
            (lat, other, Instant::now())
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut other = 0;
    let mut last = started;
    for t in tasks {
        if let Ok((l, o, done)) = t.await {
            lat.extend(l);
            other += o;
            last = last.max(done);
        }
    }
    // A run that used up its signed requests early is measured over the time it ran.
    let secs = last.duration_since(started).as_secs_f64().min(secs as f64);
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{} accepted in {secs:.1}s = {:.0}/s ({other} not 200); latency p50 {:?} p99 {:?} max {:?}",
        lat.len(),
        lat.len() as f64 / secs,
        pct(0.50),
        pct(0.99),
        lat.last().copied().unwrap_or_default()
    );
}

fn uri_path(url: &str) -> String {
    url.parse::<hyper::Uri>()
        .ok()
        .and_then(|u| u.path_and_query().map(|p| p.to_string()))
        .unwrap_or_else(|| "/".into())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("verify") => verify(args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000)),
        Some("load") if args.len() == 6 => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            rt.block_on(load(
                args[1].clone(),
                args[2].clone(),
                args[3].parse().unwrap_or(1000),
                args[4].parse().unwrap_or(64),
                args[5].parse().unwrap_or(10),
            ));
        }
        Some("enroll") if args.len() == 3 => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            rt.block_on(enroll(&args[1], args[2].parse().unwrap_or(1000)));
        }
        _ => eprintln!(
            "usage: control_load verify [N] | load URL STORE HOSTS CONNS SECONDS | enroll STORE HOSTS"
        ),
    }
}
