//! Fault injection against the real `vigil agent`: a hung database (SIGSTOP), a failover
//! (primary stopped, standby promoted), a SIGHUP storm, abusive HTTP clients, a full
//! state directory, and kill -9 while state is being persisted.
//!
//! Every component is real: PostgreSQL 15 from [`crate::pgcluster`], the agent binary, the
//! kernel's signals and a tmpfs. The one stand-in is the control-plane receiver of
//! [`crate::receiver`] (the heartbeat tests' own; the reference `vigil control` is not what
//! is under test here). Each test's doc comment says what "nothing lost" means for it.
//! Everything waits by polling with a deadline; bounds on time are bounds, not benchmarks.

// Test helpers may unwrap freely (STYLE §4.4); clippy only exempts #[test] fns.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::pgcluster::{Cluster, ClusterOptions, Node};
use crate::postgres::{ALL_KINDS, all_kinds_with};
use crate::util::{Agent, TestConfig, poll, tempdir, try_http, write_config};

/// Deadline for anything that takes a few samples or a reconnect.
const WAIT: Duration = Duration::from_secs(30);

/// The most a single `/health` may take while the agent is under a fault. A cached answer
/// takes a few milliseconds; a second leaves room for a loaded 2-core CI machine and still
/// catches an answer that waits for a check (the checks' timeouts are near a second and
/// more) or for a queue of connections.
const HEALTH_BOUND: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------
// Helpers.

/// `GET /checks` as a map name → check object; `None` when the agent does not answer.
fn checks(addr: SocketAddr) -> Option<Vec<Value>> {
    let (code, body) = try_http(addr, "GET", "/checks", None).ok()?;
    assert_eq!(code, 200, "/checks: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    Some(v.as_array().unwrap().clone())
}

fn find<'a>(all: &'a [Value], name: &str) -> &'a Value {
    all.iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {all:?}"))
}

fn pg_names() -> Vec<&'static str> {
    ALL_KINDS.iter().map(|(_, n)| *n).collect()
}

/// Polls `/checks` until every check in `names` satisfies `f`.
fn wait_all(
    agent: &Agent,
    names: &[&str],
    what: &str,
    timeout: Duration,
    f: impl Fn(&Value) -> bool,
) {
    let mut last = Vec::new();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(all) = checks(agent.addr) {
            if names.iter().all(|n| f(find(&all, n))) {
                return;
            }
            last = all;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}; last: {last:#?}\n\
                 --- agent log ---\n{}",
                agent.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status(v: &Value) -> &str {
    v["status"].as_str().unwrap_or("")
}

/// Asserts the agent process is the one started (never restarted, never exited).
fn assert_alive(agent: &mut Agent, pid: u32) {
    assert_eq!(agent.child.id(), pid);
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited: {}",
        agent.logs()
    );
}

/// `GET /health` in a loop (every 50 ms) on its own thread, timing each answer.
struct HealthProbe {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(usize, Duration, Vec<String>)>>,
}

impl HealthProbe {
    fn start(addr: SocketAddr) -> HealthProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let (mut n, mut worst, mut errors) = (0, Duration::ZERO, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match try_http(addr, "GET", "/health", None) {
                        Ok((200 | 503, _)) => {}
                        Ok((code, body)) => errors.push(format!("{code}: {body}")),
                        Err(e) => errors.push(e.to_string()),
                    }
                    worst = worst.max(t.elapsed());
                    n += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                (n, worst, errors)
            }
        });
        HealthProbe {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the probe; asserts every answer came, was 200 or 503, and within `bound`.
    fn finish(mut self, bound: Duration, what: &str) {
        self.stop.store(true, Ordering::Relaxed);
        let (n, worst, errors) = self.thread.take().unwrap().join().unwrap();
        eprintln!("{what}: {n} /health requests, slowest {worst:?}");
        assert!(errors.is_empty(), "{what}: /health failed: {errors:?}");
        assert!(n >= 5, "{what}: only {n} /health requests");
        assert!(
            worst < bound,
            "{what}: a /health took {worst:?} (bound {bound:?})"
        );
    }
}

impl Drop for HealthProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A postmaster and all its children stopped with SIGSTOP; SIGCONT again on drop (also
/// when the test fails, so no frozen server outlives it).
struct Frozen {
    pids: Vec<i32>,
}

impl Frozen {
    fn stop(postmaster: i32) -> Frozen {
        kill(Pid::from_raw(postmaster), Signal::SIGSTOP).unwrap();
        let mut frozen = Frozen {
            pids: vec![postmaster],
        };
        // The stopped postmaster forks nothing new, but one may have been forked just
        // before: list the children until a pass finds none not yet stopped.
        loop {
            let fresh: Vec<i32> = children(postmaster)
                .into_iter()
                .filter(|p| !frozen.pids.contains(p))
                .collect();
            if fresh.is_empty() {
                break;
            }
            for p in fresh {
                // A backend that exited meanwhile is fine: it needs no stopping.
                let _ = kill(Pid::from_raw(p), Signal::SIGSTOP);
                frozen.pids.push(p);
            }
        }
        assert!(
            frozen.pids.len() >= 4,
            "postmaster and its children: {:?}",
            frozen.pids
        );
        frozen
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // Children first, so the postmaster wakes to a consistent set.
        for p in self.pids.iter().rev() {
            let _ = kill(Pid::from_raw(*p), Signal::SIGCONT);
        }
    }
}

/// `ps --ppid PID`: the children of a process.
fn children(pid: i32) -> Vec<i32> {
    let out = Command::new("ps")
        .args(["--ppid", &pid.to_string(), "-o", "pid="])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------
// 1. Database hung.

/// Interval of the postgres checks in the hung-database test.
const HUNG_INTERVAL: Duration = Duration::from_millis(1000);
/// Their timeout.
const HUNG_TIMEOUT: Duration = Duration::from_millis(800);

/// The primary's postmaster and every backend SIGSTOPped: each `postgres.*` check is
/// `unknown` within its timeout plus one interval (plus slack for polling and a loaded
/// machine), the disk and system checks keep sampling on their schedule, `/health` answers
/// every request within [`HEALTH_BOUND`]; after SIGCONT every postgres check is `ok` again
/// in the same agent process.
///
/// Nothing lost: no check stops being sampled (every one shows fresh samples during and
/// after the hang), no `/health` request fails or waits, the agent is never restarted.
#[test]
fn hung_database_is_unknown_within_the_timeout_and_stalls_nothing_else() {
    let c = Cluster::start(ClusterOptions {
        standby: false,
        ..ClusterOptions::default()
    });
    let dir = tempdir();
    let common = format!(
        "interval = \"{}ms\"\ntimeout = \"{}ms\"\n",
        HUNG_INTERVAL.as_millis(),
        HUNG_TIMEOUT.as_millis()
    );
    let others = format!(
        "[check.disk.scratch]\npath = {:?}\nwarn = \"100%\"\ncrit = \"100%\"\ninterval = \"300ms\"\n\n\
         [check.system.host]\nwarn = 1000\ncrit = 2000\nmem_warn = \"1%\"\nmem_crit = \"0%\"\n\
         interval = \"300ms\"\n\n",
        dir.path().display().to_string()
    );
    let cfg = write_config(
        dir.path(),
        &(all_kinds_with(&c.primary_dsn(), &common) + &others),
    );
    let mut agent = Agent::start(&cfg);
    let pid = agent.child.id();
    let pg = pg_names();
    wait_all(&agent, &pg, "every postgres check ok", WAIT, |v| {
        status(v) == "ok"
    });

    let probe = HealthProbe::start(agent.addr);
    let frozen = Frozen::stop(c.postmaster_pid(Node::Primary));
    let frozen_at = Instant::now();
    eprintln!("hung database: {} processes stopped", frozen.pids.len());
    // The first sample after the stop starts within one interval and gives up at its
    // timeout; one more second for the 20 ms polling, HTTP and a loaded machine.
    let bound = HUNG_INTERVAL + HUNG_TIMEOUT + Duration::from_secs(1);
    wait_all(&agent, &pg, "every postgres check unknown", bound, |v| {
        status(v) == "unknown" && v["value"].is_null()
    });
    eprintln!("hung database: all unknown after {:?}", frozen_at.elapsed());

    // Disk and system keep their 300 ms schedule: two fresh samples each (sampled_at
    // changes), while the postgres checks keep answering unknown.
    let before = checks(agent.addr).unwrap();
    for name in ["scratch", "host"] {
        let mut last = find(&before, name)["sampled_at"].clone();
        for _ in 0..2 {
            last = poll(
                Duration::from_secs(5),
                &format!("{name} sampled again"),
                || {
                    let all = checks(agent.addr)?;
                    let now = find(&all, name)["sampled_at"].clone();
                    (now != last).then_some(now)
                },
            );
        }
    }
    let still = checks(agent.addr).unwrap();
    for name in &pg {
        assert_eq!(status(find(&still, name)), "unknown", "{name} while hung");
    }
    assert_alive(&mut agent, pid);

    drop(frozen); // SIGCONT
    // Reconnects back off (1 s doubling); the hang was a few seconds, so the next attempt
    // is a few seconds away at most.
    wait_all(
        &agent,
        &pg,
        "every postgres check ok after SIGCONT",
        WAIT,
        |v| status(v) == "ok",
    );
    probe.finish(HEALTH_BOUND, "hung database");
    assert_alive(&mut agent, pid);
}

// ---------------------------------------------------------------------------------------
// 2. Failover.

/// Interval of the failover test's checks.
const FAILOVER_INTERVAL: Duration = Duration::from_millis(1000);

/// `/primary` on `agent`: status code and the body's `role` (null when unknown).
fn routing(agent: &Agent, path: &str) -> (u16, Value) {
    let (code, body) = try_http(agent.addr, "GET", path, None)
        .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", agent.logs()));
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (code, v)
}

/// A primary and a streaming standby, an agent on each. The primary is stopped with
/// `pg_ctl stop -m immediate` and the standby promoted: the standby's agent reports role
/// `primary` within two check intervals of the promotion (plus slack for polling), its
/// `/primary` turns 200 and `/replica` 503, and its postgres checks are `ok`. At no point
/// do both agents answer `/primary` with 200.
///
/// Nothing lost: the standby's agent keeps its process and connections (it recovers without
/// a restart), and routing never points writers at two servers at once.
#[test]
fn failover_flips_the_standbys_agent_to_primary_within_two_intervals() {
    let c = Cluster::start(ClusterOptions::default());
    let common = format!("interval = \"{}ms\"\n", FAILOVER_INTERVAL.as_millis());
    let dirs = [tempdir(), tempdir()];
    let body = |dsn: &str| {
        crate::postgres::pg_check("up", "pg-up", dsn, &common)
            + &crate::postgres::pg_check(
                "replication",
                "pg-replication",
                dsn,
                &format!("{common}warn = \"64MB\"\ncrit = \"256MB\"\n"),
            )
    };
    let p_cfg = write_config(dirs[0].path(), &body(&c.primary_dsn()));
    let s_cfg = write_config(dirs[1].path(), &body(&c.standby_dsn()));
    let p_agent = Agent::start(&p_cfg);
    let mut s_agent = Agent::start(&s_cfg);
    let s_pid = s_agent.child.id();
    let names = ["pg-up", "pg-replication"];
    for a in [&p_agent, &s_agent] {
        wait_all(a, &names, "postgres checks ok", WAIT, |v| status(v) == "ok");
    }
    poll(WAIT, "routing before the failover", || {
        (routing(&p_agent, "/primary").0 == 200
            && routing(&s_agent, "/replica").0 == 200
            && routing(&s_agent, "/primary").0 == 503)
            .then_some(())
    });

    let split_brain = |what: &str| {
        let (p, _) = routing(&p_agent, "/primary");
        let (s, _) = routing(&s_agent, "/primary");
        assert!(!(p == 200 && s == 200), "both agents say primary ({what})");
    };
    c.stop(Node::Primary, "immediate");
    // The old primary's agent takes it out of writes once its checks see it down.
    poll(WAIT, "the old primary's /primary to be 503", || {
        split_brain("after the stop");
        (routing(&p_agent, "/primary").0 == 503).then_some(())
    });
    c.promote_standby();
    let promoted = Instant::now();
    let bound = 2 * FAILOVER_INTERVAL + Duration::from_millis(500);
    let role_at = poll(bound, "the standby's agent to report role primary", || {
        split_brain("after the promotion");
        let (_, v) = routing(&s_agent, "/primary");
        (v["role"] == "primary").then(|| promoted.elapsed())
    });
    eprintln!("failover: role primary {role_at:?} after pg_ctl promote returned");
    let flipped = poll(bound, "/primary 200 on the promoted standby", || {
        split_brain("after the promotion");
        (routing(&s_agent, "/primary").0 == 200).then(|| promoted.elapsed())
    });
    eprintln!("failover: /primary 200 {flipped:?} after the promotion");
    let (code, v) = routing(&s_agent, "/replica");
    assert_eq!(code, 503, "/replica on the new primary: {v}");
    assert_eq!(routing(&p_agent, "/primary").0, 503);
    wait_all(&s_agent, &names, "the new primary's checks ok", WAIT, |v| {
        status(v) == "ok"
    });
    assert_alive(&mut s_agent, s_pid);
}

// ---------------------------------------------------------------------------------------
// 3. SIGHUP storm.

/// A disk check on `dir` that the host's own disk cannot make non-ok.
fn disk_check(name: &str, dir: &std::path::Path) -> String {
    format!(
        "[check.disk.{name}]\npath = {:?}\nwarn = \"100%\"\ncrit = \"100%\"\ninterval = \"200ms\"\n\n",
        dir.display().to_string()
    )
}

/// Replaces the config file atomically (write + rename), so a reload never reads half a
/// file: what is under test is the agent's handling of signals, not torn writes.
fn replace_config(cfg: &TestConfig, header: &str, body: &str) {
    let tmp = cfg.path.with_extension("toml.tmp");
    std::fs::write(&tmp, format!("{header}{body}")).unwrap();
    std::fs::rename(&tmp, &cfg.path).unwrap();
}

fn names(all: &[Value]) -> Vec<String> {
    all.iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

/// Sends `n` SIGHUPs as fast as the loop goes, calling `between(i)` before each; returns
/// how long the storm took.
fn sighup_storm(agent: &Agent, n: usize, mut between: impl FnMut(usize)) -> Duration {
    let t = Instant::now();
    for i in 0..n {
        between(i);
        agent.signal(Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(2));
    }
    t.elapsed()
}

/// 100 SIGHUPs within a second while the config file is replaced half-way (checks a, b →
/// a, c): the agent stays up and healthy (same pid, `/health` 200 within
/// [`HEALTH_BOUND`] throughout), the final config is in force, and the checks keep
/// sampling. A second storm over an invalid file is refused as a whole: `config_error` is
/// set, the last good config keeps running. (The single reload and single refusal are in
/// `reload.rs`.)
///
/// Nothing lost: no reload is half-applied (the check set is always exactly one of the
/// two configs), the last write before the last signal wins, and no signal kills or
/// restarts the agent.
#[test]
fn a_storm_of_sighups_leaves_the_last_config_in_force_and_the_agent_healthy() {
    let dir = tempdir();
    let d = dir.path();
    let cfg = write_config(d, &(disk_check("a", d) + &disk_check("b", d)));
    let text = std::fs::read_to_string(&cfg.path).unwrap();
    let header = text[..text.find("[check.").unwrap()].to_string();
    let mut agent = Agent::start(&cfg);
    let pid = agent.child.id();
    let probe = HealthProbe::start(agent.addr);

    let first = [disk_check("a", d), disk_check("b", d)].concat();
    let last = [disk_check("a", d), disk_check("c", d)].concat();
    let mut seen_sets = Vec::new();
    let took = sighup_storm(&agent, 100, |i| {
        if i == 50 {
            replace_config(&cfg, &header, &last);
        } else if i < 50 && i % 10 == 0 {
            // The same valid config written again: a reload with nothing to change.
            replace_config(&cfg, &header, &first);
        }
        if i % 10 == 5
            && let Some(all) = checks(agent.addr)
        {
            seen_sets.push(names(&all));
        }
    });
    eprintln!("sighup storm: 100 signals in {took:?}");
    assert!(took < Duration::from_secs(2), "the storm took {took:?}");
    for set in &seen_sets {
        assert!(
            set == &["a", "b"] || set == &["a", "c"],
            "a half-applied reload: {set:?}"
        );
    }
    poll(WAIT, "checks [a, c] after the storm", || {
        (names(&checks(agent.addr)?) == ["a", "c"]).then_some(())
    });
    assert_alive(&mut agent, pid);
    let (code, h) = agent.get_json("/health");
    assert_eq!(code, 200, "{h}");
    assert!(h["config_error"].is_null(), "{h}");
    keeps_sampling(&agent, &["a", "c"]);

    // An invalid file and another storm: refused, shown, the old config kept.
    replace_config(
        &cfg,
        &header,
        &(last.clone() + "[check.disk.d]\npath = \"/\"\nbogus_key = 1\n"),
    );
    sighup_storm(&agent, 100, |_| {});
    let err = poll(WAIT, "/health config_error to be set", || {
        agent.get_json("/health").1["config_error"]
            .as_str()
            .map(str::to_string)
    });
    assert!(err.contains("bogus_key"), "{err}");
    assert_eq!(names(&checks(agent.addr).unwrap()), ["a", "c"]);
    keeps_sampling(&agent, &["a", "c"]);
    assert_alive(&mut agent, pid);
    probe.finish(HEALTH_BOUND, "sighup storm");
}

/// Waits until each named check shows a new `sampled_at`.
fn keeps_sampling(agent: &Agent, names: &[&str]) {
    for name in names {
        let before = find(&checks(agent.addr).unwrap(), name)["sampled_at"].clone();
        poll(WAIT, &format!("{name} to be sampled again"), || {
            let all = checks(agent.addr)?;
            (find(&all, name)["sampled_at"] != before).then_some(())
        });
    }
}
