//! A simulated fleet against `vigil control`: N hosts, each with its own key, each
//! sending a realistic 20-check heartbeat every 15 s (a random phase, ±1 s of jitter),
//! spread over keep-alive connections to one or more receivers.
//!
//! ```text
//! # the enrolment file for `vigil control enroll --from FILE`: "fleet-I PUBKEY" lines
//! cargo run --release --example control_fleet -- keys N FILE
//! # the fleet; several receivers (one database) as a comma-separated list
//! cargo run --release --example control_fleet -- run URL[,URL…] N SECONDS [CONNS]
//! ```
//!
//! Every request is signed before the clock starts (on a real fleet the hosts sign, not
//! the receiver's machine), then sent at its scheduled moment. Prints the heartbeats
//! sent and accepted per second, the latency of the 200s (p50, p99, max), and how late
//! sends started (a receiver that cannot keep up makes every connection fall behind).
//! `benches/measure-fleet.sh` runs it against the stores and reads the receivers' CPU
//! and memory.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use vigil::heartbeat::keys::HeartbeatKey;
use vigil::heartbeat::sign::{self, SignedHeaders};

const INTERVAL: Duration = Duration::from_secs(15);

fn key(i: usize) -> HeartbeatKey {
    let mut seed = [0x5au8; 32];
    seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
    HeartbeatKey::from_signing_key(SigningKey::from_bytes(&seed))
}

/// A small deterministic generator (xorshift): phases, jitter and values without a
/// dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A heartbeat as a PostgreSQL host with the usual checks sends it (20 checks).
fn body(host: &str, seq: u64, rng: &mut Rng) -> Vec<u8> {
    const CHECKS: [(&str, &str, &str); 20] = [
        ("root", "disk", "ratio"),
        ("pgdata", "disk", "ratio"),
        ("wal", "disk", "ratio"),
        ("host", "system", "ratio"),
        ("postgres", "process", "count"),
        ("kernel", "kernel", ""),
        ("pg-up", "postgres.up", "seconds"),
        ("pg-replication", "postgres.replication", "bytes"),
        ("pg-slots", "postgres.slots", "bytes"),
        ("pg-archiving", "postgres.archiving", "seconds"),
        ("pg-connections", "postgres.connections", "ratio"),
        ("pg-wraparound", "postgres.wraparound", "ratio"),
        ("pg-long-tx", "postgres.long_transactions", "seconds"),
        ("backup", "backup.pgbackrest", "seconds"),
        ("backup-full", "backup.pgbackrest", "seconds"),
        ("tls", "tls.certificate", "seconds"),
        ("pgbouncer", "process", "count"),
        ("ntp", "command", ""),
        ("mem", "command", ""),
        ("raid", "command", ""),
    ];
    let checks: Vec<serde_json::Value> = CHECKS
        .iter()
        .map(|(name, kind, unit)| {
            let v = (rng.unit() * 1000.0).round() / 1000.0;
            serde_json::json!({"name": name, "kind": kind, "status": "ok", "tripped": false,
                "value": v, "unit": unit, "message": format!("{name}: {v} {unit}")})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "v": 1, "host_id": host, "seq": seq, "sent_at": "2026-11-24T00:00:00Z",
        "boot_id": "0b6c2a3e-8f1d-4a57-9e2b-7c4d5f6a8b9c", "agent_version": "0.1.0",
        "image": {"id": "pg15-debian12", "version": "2026.11.3"}, "kernel": "6.1.0-28-amd64",
        "labels": {"cluster": format!("c{}", rng.next() % 500), "region": "eu-1"},
        "state": "available", "lifecycle": "available", "health": "ok", "checks": checks,
        "automation": {"paused": false, "reason": null, "until": null, "escalated": []},
        "remediations": [],
    }))
    .unwrap_or_default()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn keys(n: usize, file: &str) {
    let mut out = String::with_capacity(n * 64);
    for i in 0..n {
        out.push_str(&format!(
            "fleet-{i} {}\n",
            key(i).public_key().info().public_key_b64
        ));
    }
    std::fs::write(file, out).unwrap_or_else(|e| panic!("{file}: {e}"));
}

/// One scheduled send: when (from the start), the body, its headers.
type Scheduled = (Duration, Bytes, SignedHeaders);

struct ConnResult {
    latencies: Vec<Duration>,
    late: Vec<Duration>,
    other: u64,
    errors: u64,
}

async fn run(urls: Vec<String>, n: usize, secs: u64, conns: usize) {
    let rounds = secs.div_ceil(INTERVAL.as_secs()) + 1;
    let base = now() * 1000;
    let t = Instant::now();
    let mut plans: Vec<Vec<Scheduled>> = (0..conns).map(|_| Vec::new()).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..n {
        let k = key(i);
        let host = format!("fleet-{i}");
        let url = &urls[(i % conns) % urls.len()];
        let phase = INTERVAL.mul_f64(rng.unit());
        for r in 0..rounds {
            let jitter = rng.unit() * 2.0 - 1.0; // ±1 s
            let at = (phase + INTERVAL * r as u32).as_secs_f64() + jitter;
            if at < 0.0 || at >= secs as f64 {
                continue;
            }
            let b = body(&host, base + r, &mut rng);
            let h = sign::sign(&k, "POST", url, "application/json", &b, now())
                .unwrap_or_else(|e| panic!("{e}"));
            plans[i % conns].push((Duration::from_secs_f64(at), Bytes::from(b), h));
        }
    }
    for p in &mut plans {
        p.sort_by_key(|s| s.0);
    }
    let total: usize = plans.iter().map(Vec::len).sum();
    eprintln!(
        "{n} hosts, {total} heartbeats signed in {:?}; sending for {secs}s over {conns} connections to {} receiver(s)",
        t.elapsed(),
        urls.len()
    );
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for (c, plan) in plans.into_iter().enumerate() {
        let url = urls[c % urls.len()].clone();
        tasks.push(tokio::spawn(connection(url, plan, start)));
    }
    let mut r = ConnResult {
        latencies: Vec::new(),
        late: Vec::new(),
        other: 0,
        errors: 0,
    };
    for t in tasks {
        if let Ok(c) = t.await {
            r.latencies.extend(c.latencies);
            r.late.extend(c.late);
            r.other += c.other;
            r.errors += c.errors;
        }
    }
    let ran = start.elapsed().as_secs_f64();
    r.latencies.sort();
    r.late.sort();
    let pct = |v: &[Duration], p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "sent {total} in {ran:.1}s = {:.0}/s; accepted {} = {:.0}/s ({} not 200, {} errors); \
         latency p50 {:?} p99 {:?} max {:?}; send started late p99 {:?} max {:?}",
        total as f64 / ran,
        r.latencies.len(),
        r.latencies.len() as f64 / ran,
        r.other,
        r.errors,
        pct(&r.latencies, 0.5),
        pct(&r.latencies, 0.99),
        r.latencies.last().copied().unwrap_or_default(),
        pct(&r.late, 0.99),
        r.late.last().copied().unwrap_or_default(),
    );
}

async fn connection(url: String, plan: Vec<Scheduled>, start: tokio::time::Instant) -> ConnResult {
    let mut r = ConnResult {
        latencies: Vec::with_capacity(plan.len()),
        late: Vec::with_capacity(plan.len()),
        other: 0,
        errors: 0,
    };
    let uri: hyper::Uri = url.parse().unwrap_or_else(|e| panic!("{e}"));
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    let path = uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.to_string());
    let mut sender = None;
    for (at, b, h) in plan {
        tokio::time::sleep_until(start + at).await;
        let began = tokio::time::Instant::now();
        r.late.push(began.saturating_duration_since(start + at));
        if sender.is_none() {
            let Ok(tcp) = tokio::net::TcpStream::connect(&authority).await else {
                r.errors += 1;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let Ok((s, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
            else {
                r.errors += 1;
                continue;
            };
            tokio::spawn(conn);
            sender = Some(s);
        }
        let Some(send) = sender.as_mut() else {
            continue;
        };
        let req = hyper::Request::post(&path)
            .header("host", &authority)
            .header("content-type", "application/json")
            .header("content-digest", h.content_digest)
            .header("signature-input", h.signature_input)
            .header("signature", h.signature)
            .body(Full::new(b))
            .unwrap_or_else(|e| panic!("{e}"));
        match send.send_request(req).await {
            Ok(resp) => {
                let ok = resp.status().as_u16() == 200;
                let _ = resp.into_body().collect().await;
                if ok {
                    r.latencies.push(began.elapsed());
                } else {
                    r.other += 1;
                }
            }
            Err(_) => {
                r.errors += 1;
                sender = None;
            }
        }
    }
    r
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("keys") if args.len() == 3 => keys(args[1].parse().unwrap_or(1000), &args[2]),
        Some("run") if args.len() >= 4 => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            rt.block_on(run(
                args[1].split(',').map(str::to_string).collect(),
                args[2].parse().unwrap_or(1000),
                args[3].parse().unwrap_or(60),
                args.get(4).and_then(|c| c.parse().ok()).unwrap_or(1000),
            ));
        }
        _ => eprintln!("usage: control_fleet keys N FILE | run URL[,URL…] N SECONDS [CONNS]"),
    }
}
