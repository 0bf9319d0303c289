//! Measures the remediation path as the agent runs it:
//!
//! 1. the guard for a 64 KiB script: open + fstat + read + SHA-256 + sealed memfd copy;
//! 2. guard + exec: the same, then the runner starts the sealed copy (`#!/bin/sh`, `exit 0`)
//!    and waits for it (fork, pre_exec, exec of /proc/self/fd/N, the shell's start, reap);
//! 3. trip → script start: a check's tripping sample is published into the shared state,
//!    the engine's watcher sees it, writes and fsyncs `queued`, the worker checks the
//!    guardrails, runs the guard, saves the budget, fsyncs `started` and spawns; the
//!    script's first command writes the wall clock, compared with the publish time.
//!
//! ```text
//! cargo run --release --example remediation_cost [ITERATIONS]
//! ```
//!
//! The state directory is under `./target/` (the real disk, so the fsyncs are real).

// A measurement tool: the first failure should stop it, loudly.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vigil::checks::{CheckContext, Status, Unit};
use vigil::lifecycle::{Lifecycle, LifecycleRecord};
use vigil::remediation::{Engine, guard};
use vigil::runner::{Request, Runner};
use vigil::state::{CheckView, Hysteresis, Shared, Snapshot};

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "p50 {:>8.1} µs  p90 {:>8.1} µs  max {:>8.1} µs  (n={})",
        p(0.5).as_secs_f64() * 1e6,
        p(0.9).as_secs_f64() * 1e6,
        p(1.0).as_secs_f64() * 1e6,
        v.len()
    )
}

fn script_64k(stamp: &Path) -> String {
    let mut s = format!("#!/bin/sh\ndate +%s%N > {}\nexit 0\n", stamp.display());
    while s.len() < 64 * 1024 {
        s.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    s.truncate(64 * 1024 - 1);
    s.push('\n');
    s
}

fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let base = std::env::current_dir()
        .unwrap()
        .join("target/remediation-bench");
    let _ = std::fs::remove_dir_all(&base);
    let rd = base.join("remediations.d");
    std::fs::create_dir_all(&rd).unwrap();
    std::fs::set_permissions(&rd, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stamp = base.join("started");
    let script = rd.join("fix.sh");
    let body = script_64k(&stamp);
    std::fs::write(&script, &body).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sha = guard::sha256_hex(body.as_bytes());
    let me = nix::unistd::geteuid().as_raw();

    // 1. The guard alone.
    let mut guard_times = Vec::new();
    for _ in 0..iterations {
        let t = Instant::now();
        let sealed = guard::seal(&rd, &script, &sha, me).unwrap();
        guard_times.push(t.elapsed());
        assert_eq!(sealed.len, 64 * 1024);
    }
    println!("guard (open, fstat, read, sha256, sealed memfd) of a 64 KiB script:");
    println!("  {}", percentiles(guard_times));

    // 2. Guard + exec + exit + reap.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let runner = Runner::in_process();
    let mut exec_times = Vec::new();
    for _ in 0..iterations.min(100) {
        let t = Instant::now();
        let sealed = guard::seal(&rd, &script, &sha, me).unwrap();
        let req = Request::new([script.display().to_string()], Duration::from_secs(10));
        let out = rt.block_on(runner.run_sealed(&req, &sealed.fd)).unwrap();
        exec_times.push(t.elapsed());
        assert!(out.success(), "{out:?}");
    }
    println!("guard + exec of the sealed copy + /bin/sh start and exit + reap:");
    println!("  {}", percentiles(exec_times));

    // 3. Trip -> script start through the engine.
    let state_dir = base.join("state");
    // The verifying check samples this very process, so every run verifies (three
    // unverified runs in a row would escalate and stop the measurement).
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    let toml = format!(
        "[agent]\nstate_dir = {:?}\n[automation]\ndir = {:?}\n\
         [check.process.ghost]\nname = {:?}\nmin = 1\nremediation = \"fix\"\n\
         [remediation.fix]\nscript = {:?}\nsha256 = \"{sha}\"\ncooldown = \"0s\"\n\
         max_runs = 100000\nverify_after = \"0s\"\n",
        state_dir.display().to_string(),
        rd.display().to_string(),
        comm.trim(),
        script.display().to_string()
    );
    let config = vigil::config::parse(&base.join("vigil.toml"), &toml).unwrap();
    let pending = || {
        Arc::new(CheckView::pending(
            "ghost",
            "process",
            Unit::Count,
            Duration::from_secs(3600),
            Duration::from_secs(5),
            false,
            Hysteresis::new(1, 1),
        ))
    };
    let shared = Arc::new(Shared::new(Snapshot {
        checks: vec![pending()],
        lifecycle: LifecycleRecord {
            v: 1,
            state: Lifecycle::Available,
            reason: String::new(),
            changed_at: String::new(),
        },
        config_error: None,
        first_round_done: true,
    }));
    let mut latencies = Vec::new();
    rt.block_on(async {
        let engine = Engine::open(Arc::new(config), shared.clone(), CheckContext::host()).unwrap();
        let tracker = tokio_util::task::TaskTracker::new();
        let cancel = tokio_util::sync::CancellationToken::new();
        engine.start(&tracker, cancel.clone());
        for _ in 0..iterations.min(50) {
            let _ = std::fs::remove_file(&stamp);
            // Let the watcher see the cleared check first, so the next trip is an edge.
            shared.update(|s| s.checks = vec![pending()]);
            tokio::time::sleep(Duration::from_millis(30)).await;
            let mut v = CheckView::clone(&pending());
            v.hysteresis.observe(Status::Critical);
            v.status = Status::Critical;
            let published = SystemTime::now();
            shared.update(|s| s.checks = vec![Arc::new(v)]);
            let deadline = Instant::now() + Duration::from_secs(10);
            let started_ns: u128 = loop {
                if let Ok(t) = std::fs::read_to_string(&stamp) {
                    if let Ok(ns) = t.trim().parse() {
                        break ns;
                    }
                }
                assert!(Instant::now() < deadline, "the script did not start");
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            let published_ns = published.duration_since(UNIX_EPOCH).unwrap().as_nanos();
            latencies.push(Duration::from_nanos((started_ns - published_ns) as u64));
            // Wait for the run (and its verification) to finish before the next trip.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !engine
                .records(1, false)
                .first()
                .is_some_and(|r| r["event"] == "verified")
            {
                assert!(Instant::now() < deadline, "the run did not finish");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    });
    println!("tripping sample published -> the script's first command (date +%s%N):");
    println!("  {}", percentiles(latencies));
}
