//! Criterion micro-benchmarks of the agent's and the receiver's hot paths:
//!
//! - `check/KIND`: one run of a check of each host kind (disk, system, process, kernel,
//!   tls.certificate, backup.files, command with Debian's `check_dummy` when installed),
//!   and, with `VIGIL_BENCH_DSN` set to a PostgreSQL DSN, of each `postgres.*` kind over
//!   the agent's kept connection;
//! - `heartbeat/build_sign_20`: build, serialize, digest and sign a 20-check heartbeat;
//! - `verify/one` and `verify/batch_64`: the receiver's parse + key id + digest + Ed25519
//!   check, one at a time and in a batch of 64 (per heartbeat);
//! - `spool/append_fsync`: one heartbeat appended to the spool, durable;
//! - `perfdata/parse`: a multi-line plugin output;
//! - `metrics/render_13`: the `/metrics` page of 13 checks with 100 kind metrics, about
//!   the 320 lines an agent with the full host + PostgreSQL + backup set serves.
//!
//! ```text
//! cargo bench --bench micro                       # everything
//! VIGIL_BENCH_DSN="host=/tmp port=5432 user=postgres" cargo bench --bench micro -- check/postgres
//! ```
//! The bench profile is the release profile the agent ships with.

#![allow(missing_docs)] // criterion_group! generates an undocumented public fn

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use indexmap::IndexMap;
use vigil::checks::perfdata::parse_plugin_output;
use vigil::checks::{CheckContext, Metric};
use vigil::heartbeat::delivery::StatusView;
use vigil::heartbeat::document::{Heartbeat, HostIdentity};
use vigil::heartbeat::keys::HeartbeatKey;
use vigil::heartbeat::sign::{self, Received};
use vigil::heartbeat::spool::Spool;
use vigil::http::metrics::render;

#[path = "../examples/common/snapshot.rs"]
mod common_snapshot;
use common_snapshot::snapshot;

const URL: &str = "https://control.internal:8443/v1/heartbeats";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"))
}

/// The config with one check of each kind that runs on any host, plus the PostgreSQL
/// kinds when a DSN is given.
fn config_text(dir: &Path, dsn: Option<&str>) -> String {
    let cert = rcgen::generate_simple_self_signed(vec!["bench.internal".into()])
        .unwrap_or_else(|e| panic!("rcgen: {e}"));
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("base.tar"), vec![0u8; 4096]).unwrap_or_else(|e| panic!("{e}"));
    let dummy = Path::new("/usr/lib/nagios/plugins/check_dummy");
    let command = if dummy.exists() {
        format!(
            "[check.command.plugin]\ncommand = [{:?}, \"0\", \"ok\"]\n",
            dummy
        )
    } else {
        "[check.command.plugin]\ncommand = [\"/bin/true\"]\n".to_string()
    };
    let mut text = format!(
        "[agent]\nstate_dir = \"state\"\n\n\
         [check.disk.root]\npath = \"/\"\n\n\
         [check.system.host]\n\n\
         [check.process.self]\npidfile = \"self.pid\"\n\n\
         [check.kernel.kernel]\n\n\
         [check.tls.certificate.cert]\npath = \"cert.pem\"\n\n\
         [check.backup.files.base]\nglob = \"{}/*.tar\"\n\n\
         {command}",
        dir.display()
    );
    if let Some(dsn) = dsn {
        for kind in [
            "up",
            "replication",
            "slots",
            "archiving",
            "connections",
            "wraparound",
            "long_transactions",
        ] {
            text.push_str(&format!(
                "\n[check.postgres.{kind}.pg-{kind}]\ndsn = {dsn:?}\n"
            ));
        }
    }
    std::fs::write(dir.join("self.pid"), std::process::id().to_string())
        .unwrap_or_else(|e| panic!("{e}"));
    text
}

fn checks(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dsn = std::env::var("VIGIL_BENCH_DSN").ok();
    let text = config_text(dir.path(), dsn.as_deref());
    let config = vigil::config::parse(&dir.path().join("vigil.toml"), &text)
        .unwrap_or_else(|e| panic!("bench config: {e}"));
    let rt = rt();
    let cx = CheckContext::host();
    let mut group = c.benchmark_group("check");
    for (name, spec) in config.check.iter() {
        let common = spec.common(config.agent.interval);
        let mut check = spec.build(&common);
        // The first run opens connections and fills histories: not what a round costs.
        let first = rt.block_on(check.run(&cx));
        if let Err(e) = &first {
            eprintln!("check {name}: {e} (measured anyway)");
        }
        group.bench_function(check.kind(), |b| {
            b.iter(|| black_box(rt.block_on(check.run(&cx))));
        });
    }
    group.finish();
}

fn identity() -> HostIdentity {
    HostIdentity {
        host_id: "4f1c2a9e8b7d4c3fa1e2b3c4d5e6f708".into(),
        boot_id: "0e6f3c1a-8d2b-4f7e-9a1c-3b5d7f9e1a2c".into(),
        image_id: Some("vigil-pg15".into()),
        image_version: Some("2026.11.3".into()),
        kernel: "6.1.0-27-amd64".into(),
    }
}

fn heartbeat(c: &mut Criterion) {
    let snap = snapshot(20);
    let id = identity();
    let mut labels = IndexMap::new();
    labels.insert("cluster".to_string(), "orders".to_string());
    let key = HeartbeatKey::from_signing_key(SigningKey::from_bytes(&[7u8; 32]));
    let mut seq = 0u64;
    c.bench_function("heartbeat/build_sign_20", |b| {
        b.iter(|| {
            seq += 1;
            let body = Heartbeat::new(&id, &labels, &snap, seq, SystemTime::now()).to_body();
            let h = sign::sign(&key, "POST", URL, "application/json", &body, 1_750_000_000)
                .unwrap_or_else(|e| panic!("{e}"));
            black_box((body, h))
        });
    });
}

fn verify(c: &mut Criterion) {
    let snap = snapshot(20);
    let key = HeartbeatKey::from_signing_key(SigningKey::from_bytes(&[7u8; 32]));
    let public = key.public_key();
    let body = Heartbeat::new(&identity(), &IndexMap::new(), &snap, 1, SystemTime::now()).to_body();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let h = sign::sign(&key, "POST", URL, "application/json", &body, now)
        .unwrap_or_else(|e| panic!("{e}"));
    let req = Received {
        method: "POST",
        target_uri: URL,
        content_type: Some("application/json"),
        content_digest: Some(&h.content_digest),
        signature_input: Some(&h.signature_input),
        signature: Some(&h.signature),
        body: &body,
    };
    let skew = Duration::from_secs(300);
    let mut group = c.benchmark_group("verify");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one", |b| {
        b.iter(|| {
            let parsed = vigil::control::body::parse(&body).map(|p| p.seq);
            let kid = sign::signature_key_id(&h.signature_input);
            black_box((parsed, kid, sign::verify(&public, &req, now, skew)))
        });
    });
    let batch = vigil::control::verifier::MAX_BATCH;
    group.throughput(Throughput::Elements(batch as u64));
    let vk = *public.verifying_key();
    group.bench_function(format!("batch_{batch}"), |b| {
        b.iter(|| {
            let mut pending = Vec::with_capacity(batch);
            for _ in 0..batch {
                let parsed = vigil::control::body::parse(&body).map(|p| p.seq);
                let kid = sign::signature_key_id(&h.signature_input);
                assert!(black_box(parsed).is_ok() && black_box(kid).is_ok());
                pending.push(
                    sign::prepare(&public, &req, now, skew).unwrap_or_else(|e| panic!("{e}")),
                );
            }
            let messages: Vec<&[u8]> = pending.iter().map(|(s, _)| s.message.as_slice()).collect();
            let signatures: Vec<_> = pending.iter().map(|(s, _)| s.signature).collect();
            let ok = ed25519_dalek::verify_batch(&messages, &signatures, &vec![vk; batch]).is_ok();
            let done: Vec<_> = pending
                .into_iter()
                .map(|(_, rest)| rest.finish(ok))
                .collect();
            black_box(done)
        });
    });
    group.finish();
}

fn spool(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut spool = Spool::open(dir.path(), 256 << 20).unwrap_or_else(|e| panic!("{e}"));
    let body = Heartbeat::new(
        &identity(),
        &IndexMap::new(),
        &snapshot(20),
        1,
        SystemTime::now(),
    )
    .to_body();
    let mut seq = 0u64;
    c.bench_function("spool/append_fsync", |b| {
        b.iter(|| {
            seq += 1;
            spool.append(seq, &body).unwrap_or_else(|e| panic!("{e}"));
            // Keep the spool small: acknowledged records are dropped as the agent does.
            if seq % 1024 == 0 {
                spool.ack(seq).unwrap_or_else(|e| panic!("{e}"));
            }
        });
    });
}

fn perfdata(c: &mut Criterion) {
    let text = "DISK OK - free space: / 3326 MB (56%); | /=2643MB;5948;5958;0;5968\n\
                / 15272 MB (77%);\n\
                /boot 68 MB (69%);\n\
                | /boot=68MB;88;93;0;98\n\
                /home=69357MB;253404;253409;0;253414\n\
                /var/log=818MB;970;975;0;980\n";
    c.bench_function("perfdata/parse", |b| {
        b.iter(|| black_box(parse_plugin_output(black_box(text))));
    });
}

/// What a scrape renders: `snapshot(13)` with the shape of the full check set's kind
/// metrics (per check a few gauges and a counter, one with a label per sample), and
/// heartbeat delivery on.
fn metrics(c: &mut Criterion) {
    let mut snap = snapshot(13);
    const NAMES: [&str; 8] = [
        "vigil_bench_a_ratio",
        "vigil_bench_b_bytes",
        "vigil_bench_c_seconds",
        "vigil_bench_d_ratio",
        "vigil_bench_e_bytes",
        "vigil_bench_f_seconds",
        "vigil_bench_g",
        "vigil_bench_h",
    ];
    snap.checks = snap
        .checks
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut v = (**v).clone();
            v.metrics = NAMES
                .iter()
                .map(|n| {
                    Metric::gauge(
                        n,
                        "A kind metric's help, as long as the real ones.",
                        i as f64,
                    )
                    .label("mountpoint", format!("/var/lib/postgresql/{i}"))
                })
                .collect();
            v.metrics.push(Metric::counter(
                "vigil_bench_events_total",
                "A kind counter.",
                7.0,
            ));
            Arc::new(v)
        })
        .collect();
    let hb = StatusView {
        enabled: true,
        ..StatusView::default()
    };
    let page = render(&snap, &hb, None);
    let mut group = c.benchmark_group("metrics");
    group.throughput(Throughput::Bytes(page.len() as u64));
    group.bench_function("render_13", |b| {
        b.iter(|| black_box(render(black_box(&snap), &hb, None)));
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = checks, heartbeat, verify, spool, perfdata, metrics
}
criterion_main!(benches);
