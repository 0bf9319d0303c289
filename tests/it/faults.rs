//! Fault injection against the real `vigil agent`: a hung database (SIGSTOP), a failover
//! (primary stopped, standby promoted), a SIGHUP storm, abusive HTTP clients, a full
//! state directory, and kill -9 while state is being persisted.
//!
//! Every component is real: PostgreSQL 15 from [`crate::pgcluster`], the agent binary,
//! real remediation scripts, the kernel's signals, sockets and a tmpfs. Nothing is faked:
//! where heartbeats matter the control plane is simply down (a closed port), which is the
//! fault those tests want. Each test's doc comment says what "nothing lost" means for it.
//! Everything waits by polling with a deadline; bounds on time are bounds, not benchmarks.

// Test helpers may unwrap freely (STYLE §4.4); clippy only exempts #[test] fns.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::pgcluster::{Cluster, ClusterOptions, Node};
use crate::postgres::{ALL_KINDS, all_kinds_with};
use crate::util::{
    Agent, HealthProbe, RssWatch, TestConfig, assert_refused_heads, oversized_heads, poll,
    raise_nofile, read_until_closed, rss_kib, slowloris, status_code, tempdir, try_http,
    write_config,
};

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
        &(last + "[check.disk.d]\npath = \"/\"\nbogus_key = 1\n"),
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

// ---------------------------------------------------------------------------------------
// 4. Abusive clients against the API.

/// Idle connections the flood opens.
const FLOOD: usize = 2000;

/// Thousands of idle connections, a slowloris, 1 MiB of headers and a 16 MiB body against
/// the agent's listeners: `/health` keeps answering within [`HEALTH_BOUND`], the agent's
/// RSS stays under its baseline plus 32 MiB, the slowloris is cut off at the header-read
/// timeout, the oversized header gets 431, the oversized admin body 413, and the agent is
/// the same process at the end.
///
/// The RSS bound: at most `[api].max_connections` (256) connections are held, each with
/// hyper's read buffer (8 KiB, growing to its ~400 KiB cap only while a head is being
/// read); idle ones cost ~2 MiB in all, and the four oversized heads ~1.6 MiB. 32 MiB is
/// far above that and far below what holding every flood connection or every header byte
/// would cost (2000 connections × 8 KiB = 16 MiB of buffers alone before task overhead;
/// 4 × 1 MiB of headers and a 16 MiB body buffered would break it outright).
///
/// Nothing lost: no `/health` request fails or waits behind the abusive clients, and the
/// agent neither crashes nor restarts.
#[test]
fn abusive_clients_do_not_starve_health_or_grow_memory() {
    use std::io::Write;
    use std::net::TcpStream;

    raise_nofile(FLOOD as u64 + 1024);
    let dir = tempdir();
    let d = dir.path();
    let cfg = write_config(d, &disk_check("a", d));
    let mut agent = Agent::start(&cfg);
    let pid = agent.child.id();
    // Warm up the allocator and the listener with a few ordinary requests first.
    for _ in 0..20 {
        assert_eq!(agent.get("/health").0, 200);
    }
    let baseline = rss_kib(pid);
    let rss = RssWatch::start(pid);
    let probe = HealthProbe::start(agent.addr);

    // The flood: connect, never send a byte.
    let t = Instant::now();
    let mut idle = Vec::with_capacity(FLOOD);
    let mut refused = 0;
    let mut slowest = Duration::ZERO;
    for _ in 0..FLOOD {
        let c = Instant::now();
        match TcpStream::connect_timeout(&agent.addr, Duration::from_secs(2)) {
            Ok(s) => idle.push(s),
            Err(_) => refused += 1,
        }
        slowest = slowest.max(c.elapsed());
    }
    eprintln!(
        "flood: {} connected, {refused} not, in {:?} (slowest connect {slowest:?})",
        idle.len(),
        t.elapsed()
    );
    assert!(idle.len() >= FLOOD / 2, "only {} connected", idle.len());
    // With every flood connection still open, fresh requests are answered at once.
    for _ in 0..10 {
        let t = Instant::now();
        let (code, body) = try_http(agent.addr, "GET", "/health", None)
            .unwrap_or_else(|e| panic!("/health during the flood: {e}"));
        assert_eq!(code, 200, "{body}");
        assert!(t.elapsed() < HEALTH_BOUND, "/health took {:?}", t.elapsed());
    }

    // Oversized headers: 1 MiB of one header, four at once.
    assert_refused_heads(&oversized_heads(
        agent.addr,
        b"GET /health HTTP/1.1\r\nHost: x\r\n",
    ));

    // An oversized body on the read-only listener: answered without reading it.
    let mut s = TcpStream::connect(agent.addr).unwrap();
    let body_len = 16 * 1024 * 1024;
    s.write_all(
        format!("GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: {body_len}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![b'b'; 64 * 1024];
            for _ in 0..(body_len / chunk.len()) {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    let (resp, _) = read_until_closed(&mut s, Duration::from_secs(10));
    assert_eq!(
        status_code(&resp),
        Some(200),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    drop(s);
    writer.join().unwrap();

    // And on the admin socket, where POST bodies are read: refused at the limit.
    let admin = {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let mut s = UnixStream::connect(&cfg.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = format!(
            "POST /lifecycle HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {body_len}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        let chunk = vec![b' '; 64 * 1024];
        for _ in 0..(body_len / chunk.len()) {
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        resp
    };
    assert_eq!(
        status_code(&admin),
        Some(413),
        "{}",
        String::from_utf8_lossy(&admin)
    );

    // A slowloris: one header byte every 2 s is cut off at the header-read timeout (5 s)
    // plus slack, rather than held forever.
    let (closed_after, _) = slowloris(agent.addr, Duration::from_secs(12));
    assert!(
        closed_after < Duration::from_secs(10),
        "slowloris held for {closed_after:?}"
    );

    drop(idle);
    probe.finish(HEALTH_BOUND, "abusive clients");
    let peak = rss.finish();
    eprintln!("abusive clients: RSS baseline {baseline} KiB, peak {peak} KiB");
    assert!(
        peak <= baseline + 32 * 1024,
        "RSS grew from {baseline} KiB to {peak} KiB"
    );
    assert_alive(&mut agent, pid);
    assert_eq!(agent.get("/health").0, 200);
}

// ---------------------------------------------------------------------------------------
// State directory checks shared by 5 and 6.

/// Every file under a stopped agent's `state_dir` parses: the JSON state files, each line
/// of each audit segment (complete JSON ending in a newline, `n` strictly increasing
/// across segments), and the spool (opened and read by the agent's own code). Returns the
/// audit `n`s and the spooled seqs, in order. `skip` names files that are not the agent's.
fn assert_state_dir_parses(state_dir: &std::path::Path, skip: &[&str]) -> (Vec<u64>, Vec<u64>) {
    let mut audit_ns = Vec::new();
    let mut stack = vec![state_dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    files.sort();
    for path in &files {
        let rel = path
            .strip_prefix(state_dir)
            .unwrap()
            .to_string_lossy()
            .to_string();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        // agent.lock: the empty file the running agent holds an flock on.
        if skip.contains(&rel.as_str()) || rel.starts_with("spool/") || rel == "agent.lock" {
            continue;
        }
        let bytes = std::fs::read(path).unwrap();
        if name.starts_with('.') && name.contains(".tmp.") {
            // write_atomic's temp file of a write cut short by the kill: never read, and
            // the real file beside it still holds the previous value.
            continue;
        }
        if rel.starts_with("audit/") && name.ends_with(".jsonl") {
            let text = String::from_utf8(bytes).unwrap_or_else(|e| panic!("{rel}: not UTF-8: {e}"));
            for (i, line) in text.split_inclusive('\n').enumerate() {
                // A line without its newline can only be the torn tail of the newest
                // segment, which the agent cuts at open; a complete one must parse.
                assert!(
                    line.ends_with('\n'),
                    "{rel}:{}: a half-written audit record: {line:?}",
                    i + 1
                );
                let v: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{rel}:{}: {e}: {line:?}", i + 1));
                audit_ns.push(
                    v["n"]
                        .as_u64()
                        .unwrap_or_else(|| panic!("{rel}: no n: {v}")),
                );
            }
            continue;
        }
        serde_json::from_slice::<Value>(&bytes)
            .unwrap_or_else(|e| panic!("{rel}: {e}: {:?}", String::from_utf8_lossy(&bytes)));
    }
    for w in audit_ns.windows(2) {
        assert!(w[0] < w[1], "audit n not increasing: {audit_ns:?}");
    }
    let spool_dir = state_dir.join("spool");
    let seqs = if spool_dir.exists() {
        // A child the killed agent was starting (fork done, exec not yet) still holds
        // the agent's descriptors, the spool lock among them, until it execs (every fd is
        // close-on-exec): wait for that, briefly, instead of failing on it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut spool = loop {
            match vigil::heartbeat::spool::Spool::open(&spool_dir, 64 << 20) {
                Ok(s) => break s,
                Err(e) if e.to_string().contains("in use") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("spool: {e}"),
            }
        };
        let all = spool
            .peek_oldest(usize::MAX)
            .unwrap_or_else(|e| panic!("spool: {e}"));
        all.into_iter().map(|(s, _)| s).collect()
    } else {
        Vec::new()
    };
    (audit_ns, seqs)
}

/// `POST` on the admin socket; status and body.
fn admin_post(cfg: &TestConfig, path: &str, body: &Value) -> (u16, String) {
    crate::util::unix_http(&cfg.socket, "POST", path, Some(&body.to_string()))
}

/// `GET /health` whatever the status.
fn health(agent: &Agent) -> Value {
    let (code, body) = try_http(agent.addr, "GET", "/health", None)
        .unwrap_or_else(|e| panic!("/health: {e}\n{}", agent.logs()));
    assert!(code == 200 || code == 503, "/health {code}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The value of an unlabelled series in `/metrics`.
fn metric(agent: &Agent, name: &str) -> f64 {
    let (code, text) = agent.get("/metrics");
    assert_eq!(code, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// 5. State directory full.

/// `state_dir` on a 256 KiB tmpfs, heartbeats spooling (the receiver's port is closed) and
/// a remediation run by hand, then the tmpfs filled to the brim: the agent keeps checking
/// and serving; the failed writes show in `/health` (`state_writes`) and `/metrics`; a
/// lifecycle change and a remediation run are refused rather than half-done (the script
/// does not run unaudited); once the filler is deleted, spooling and auditing resume and the
/// failures clear; after a clean stop every file in `state_dir` parses.
///
/// Nothing lost: every heartbeat spooled before the disk filled is still in the spool
/// afterwards, every audit record is whole, and nothing ran without its audit record.
#[test]
fn a_full_state_dir_is_reported_and_writes_resume_when_space_returns() {
    if !crate::util::is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    use crate::heartbeat::{Tmpfs, fill};
    use crate::remediation::{automation, remediation, scripts};
    use serde_json::json;

    let dir = tempdir();
    let d = dir.path();
    let marker = d.join("ran");
    let rd = scripts(d, &[("mark.sh", "#!/bin/sh\necho run >> \"$1\"\n")]);
    let key = d.join("hb.key");
    let out = crate::util::run(&["keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let closed = format!(
        "http://127.0.0.1:{}/v1/heartbeats",
        crate::util::free_port()
    );
    let body = format!(
        "{}{}{}[heartbeat]\nurl = {closed:?}\ninterval = \"100ms\"\nmax_backoff = \"200ms\"\n\
         spool_max = \"4MiB\"\nkey_file = {:?}\n",
        disk_check("scratch", d),
        automation(&rd, ""),
        remediation(
            &rd,
            "mark",
            "mark.sh",
            &format!(
                "args = [{:?}]\ncooldown = \"0s\"\nmax_runs = 1000",
                marker.display().to_string()
            )
        ),
        key.display().to_string()
    );
    let cfg = write_config(d, &body);
    let _mount = Tmpfs::mount(&cfg.state_dir, "256k");
    let mut agent = Agent::start(&cfg);
    let pid = agent.child.id();
    let run = |reason: &str| admin_post(&cfg, "/remediations/mark/run", &json!({"reason": reason}));
    let (code, body) = run("before the disk fills");
    assert_eq!(code, 200, "{body}");
    let spooled_before = poll(WAIT, "3 heartbeats spooled", || {
        let n = health(&agent)["heartbeat"]["spooled"].as_u64()?;
        (n >= 3).then_some(n)
    });
    assert_eq!(health(&agent)["state_writes"]["failing"], json!({}));
    assert_eq!(metric(&agent, "vigil_state_files_failing"), 0.0);

    fill(&cfg.state_dir.join("filler"));
    let failing = poll(WAIT, "the spool's write failure in /health", || {
        let h = health(&agent);
        h["state_writes"]["failing"]
            .get("spool")
            .map(|_| h["state_writes"].clone())
    });
    eprintln!("state dir full: {failing}");
    assert!(metric(&agent, "vigil_state_write_failures_total") >= 1.0);
    assert!(metric(&agent, "vigil_state_files_failing") >= 1.0);
    // A lifecycle change that cannot be persisted is refused, not half-applied.
    let (code, body) = admin_post(
        &cfg,
        "/lifecycle",
        &json!({"state": "upgrading", "reason": "full"}),
    );
    assert_eq!(code, 500, "{body}");
    assert_eq!(health(&agent)["lifecycle"], "available");
    // A run whose audit record cannot be written runs nothing.
    let runs_before = std::fs::read_to_string(&marker).unwrap().lines().count();
    let (code, body) = run("while the disk is full");
    assert_ne!(code, 200, "{body}");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().lines().count(),
        runs_before,
        "the script ran without its audit record"
    );
    // Refused runs are audited too: enough of them to need a new page of the audit
    // segment, which a full tmpfs cannot give, so one append is cut short part-way
    // (ENOSPC after a partial write). That fragment must not survive to corrupt the log.
    poll(WAIT, "an audit append to fail", || {
        let (code, body) = run("refused while full");
        assert_ne!(code, 200, "{body}");
        health(&agent)["state_writes"]["failing"]
            .get("audit")
            .map(|_| ())
    });
    // Checking and serving go on.
    keeps_sampling(&agent, &["scratch"]);
    assert_alive(&mut agent, pid);

    std::fs::remove_file(cfg.state_dir.join("filler")).unwrap();
    // The run that could not save its guardrail state escalated the remediation (by
    // design: cooldowns that cannot be kept disable it until an operator resumes).
    let (code, body) = run("after the disk has room again");
    assert_eq!(code, 423, "{body}");
    assert!(body.contains("escalated"), "{body}");
    let (code, body) = admin_post(&cfg, "/automation/resume", &json!({"reason": "disk freed"}));
    assert_eq!(code, 200, "{body}");
    let (code, body) = run("after the resume");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().lines().count(),
        runs_before + 1
    );
    let (code, body) = admin_post(
        &cfg,
        "/lifecycle",
        &json!({"state": "upgrading", "reason": "room"}),
    );
    assert_eq!(code, 200, "{body}");
    poll(WAIT, "every state write to succeed again", || {
        (health(&agent)["state_writes"]["failing"] == json!({})).then_some(())
    });
    assert_eq!(metric(&agent, "vigil_state_files_failing"), 0.0);
    // Spooling resumed: more heartbeats in the spool than before the disk filled.
    poll(WAIT, "the spool to grow again", || {
        let n = health(&agent)["heartbeat"]["spooled"].as_u64()?;
        (n > spooled_before + 2).then_some(())
    });
    assert_eq!(agent.stop(), Some(0));

    let (audit, seqs) = assert_state_dir_parses(&cfg.state_dir, &[]);
    assert!(audit.len() >= 4, "audit records of two runs: {audit:?}");
    assert!(seqs.len() as u64 > spooled_before, "spool: {seqs:?}");
    // A fresh state_dir hands out seq 1 first: what was spooled before the disk filled is
    // 1..=spooled_before, and all of it is still there.
    let kept: Vec<u64> = seqs.iter().copied().take(spooled_before as usize).collect();
    assert_eq!(
        kept,
        (1..=spooled_before).collect::<Vec<_>>(),
        "spool: {seqs:?}"
    );
    for w in seqs.windows(2) {
        assert!(w[0] < w[1], "spool seqs not increasing: {seqs:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 6. kill -9 while persisting.

/// Rounds of start, work, kill -9.
const KILLS: usize = 100;

/// The agent killed with SIGKILL at a random moment, [`KILLS`] times, while it persists
/// lifecycle changes (a thread flips `available` ↔ `upgrading` on the admin socket),
/// remediation state and audit records (a `backup.files` check that a thread keeps
/// tripping, with an approved remediation that fixes it, no cooldown) and spools heartbeats
/// (the receiver's port is closed). After each kill: every file in `state_dir` parses, each
/// audit line is complete JSON (only the newest segment may end in a torn line, which the
/// next start must cut off), and the agent starts again on that state.
///
/// Nothing lost: an audit record or a spooled heartbeat seen after one kill is still there,
/// byte for byte, after every later kill (nothing is delivered, so nothing may be deleted);
/// no audit `n` and no heartbeat `seq` is ever used for two different records; the
/// sequence reservation on disk never goes backwards.
#[test]
fn kill_9_while_persisting_never_corrupts_or_reuses_state() {
    use std::collections::BTreeMap;

    use crate::remediation::{automation, remediation, scripts};
    use serde_json::json;

    let dir = tempdir();
    let d = dir.path();
    let data = d.join("data");
    std::fs::create_dir(&data).unwrap();
    let rd = scripts(
        d,
        &[("recreate.sh", "#!/bin/sh\necho dump > \"$1/latest.dump\"\n")],
    );
    let key = d.join("hb.key");
    let out = crate::util::run(&["keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let closed = format!(
        "http://127.0.0.1:{}/v1/heartbeats",
        crate::util::free_port()
    );
    let body = format!(
        "{}[check.backup.files.dumps]\nglob = \"{}/*.dump\"\ninterval = \"100ms\"\n\
         remediation = \"recreate\"\n\n{}[heartbeat]\nurl = {closed:?}\ninterval = \"50ms\"\n\
         max_backoff = \"100ms\"\nspool_max = \"16MiB\"\nkey_file = {:?}\n",
        automation(&rd, ""),
        data.display(),
        remediation(
            &rd,
            "recreate",
            "recreate.sh",
            &format!(
                "args = [{:?}]\nverify_after = \"50ms\"\ncooldown = \"0s\"\nmax_runs = 1000000",
                data.display().to_string()
            )
        ),
        key.display().to_string()
    );
    let cfg = write_config(d, &body);

    let stop = Arc::new(AtomicBool::new(false));
    // Keeps the check tripping: the remediation recreates the file, this removes it.
    let deleter = std::thread::spawn({
        let (stop, file) = (stop.clone(), data.join("latest.dump"));
        move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = std::fs::remove_file(&file);
                std::thread::sleep(Duration::from_millis(150));
            }
        }
    });
    // Lifecycle changes through the admin socket, whenever an agent is there to take them.
    let flipper = std::thread::spawn({
        let (stop, socket) = (stop.clone(), cfg.socket.clone());
        move || {
            let mut changes = 0;
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let state = if i % 2 == 0 { "upgrading" } else { "available" };
                i += 1;
                let body = json!({"state": state, "reason": "kill -9 test"}).to_string();
                if let Ok(s) = std::os::unix::net::UnixStream::connect(&socket) {
                    use std::io::{Read, Write};
                    let mut s = s;
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let req = format!(
                        "POST /lifecycle HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let mut resp = String::new();
                    if s.write_all(req.as_bytes()).is_ok()
                        && s.read_to_string(&mut resp).is_ok()
                        && resp.starts_with("HTTP/1.1 200")
                    {
                        changes += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            changes
        }
    });

    let started = Instant::now();
    let mut audit_seen: BTreeMap<u64, String> = BTreeMap::new();
    let mut spool_seen: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut reserved = 0u64;
    let mut torn = 0;
    let mut rounds = 0;
    while rounds < KILLS && started.elapsed() < Duration::from_secs(100) {
        let agent = Agent::start(&cfg);
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..=250)));
        drop(agent); // SIGKILL, then reaped
        rounds += 1;

        let (audit, spool) = crash_state(&cfg.state_dir, &mut torn);
        for (n, line) in &audit {
            if let Some(prev) = audit_seen.insert(*n, line.clone()) {
                assert_eq!(&prev, line, "round {rounds}: audit n {n} reused");
            }
        }
        for n in audit_seen.keys() {
            assert!(
                audit.contains_key(n),
                "round {rounds}: audit record {n} lost"
            );
        }
        for (seq, body) in &spool {
            if let Some(prev) = spool_seen.insert(*seq, body.clone()) {
                assert_eq!(
                    &prev, body,
                    "round {rounds}: seq {seq} reused for another body"
                );
            }
        }
        for seq in spool_seen.keys() {
            assert!(
                spool.contains_key(seq),
                "round {rounds}: spooled seq {seq} lost"
            );
        }
        let text =
            std::fs::read_to_string(cfg.state_dir.join("heartbeat-seq.json")).unwrap_or_default();
        if !text.is_empty() {
            let v: Value = serde_json::from_str(&text).unwrap();
            let r = v["reserved_until"].as_u64().unwrap();
            assert!(
                r >= reserved,
                "round {rounds}: reservation went back {reserved} → {r}"
            );
            reserved = r;
        }
    }
    stop.store(true, Ordering::Relaxed);
    deleter.join().unwrap();
    let changes = flipper.join().unwrap();
    // The last start must cut a torn tail left by the last kill, and load everything.
    let agent = Agent::start(&cfg);
    drop(agent);
    crash_state(&cfg.state_dir, &mut torn);

    eprintln!(
        "kill -9: {rounds} rounds in {:?}; {} audit records, {} spooled heartbeats, \
         {changes} lifecycle changes, {torn} torn audit tails",
        started.elapsed(),
        audit_seen.len(),
        spool_seen.len()
    );
    assert!(rounds >= KILLS / 2, "only {rounds} rounds");
    let events: Vec<&str> = audit_seen
        .values()
        .filter_map(|l| l.split("\"event\":\"").nth(1)?.split('"').next())
        .collect();
    assert!(
        events.contains(&"started") && events.contains(&"succeeded"),
        "remediations ran during the test: {events:?}"
    );
    assert!(
        spool_seen.len() >= rounds,
        "heartbeats spooled: {}",
        spool_seen.len()
    );
    assert!(changes >= 10, "lifecycle changes: {changes}");
}

/// What a killed agent left: every file parses; audit records by `n` (the JSON line) and
/// the spool's records by seq. A torn last line of the newest audit segment is allowed
/// (counted in `torn`) and left for the next start to cut off.
fn crash_state(
    state_dir: &std::path::Path,
    torn: &mut usize,
) -> (
    std::collections::BTreeMap<u64, String>,
    std::collections::BTreeMap<u64, Vec<u8>>,
) {
    let audit_dir = state_dir.join("audit");
    let mut segments: Vec<_> = std::fs::read_dir(&audit_dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                .collect()
        })
        .unwrap_or_default();
    segments.sort();
    let mut skip = Vec::new();
    if let Some(newest) = segments.last() {
        let text = std::fs::read_to_string(newest).unwrap();
        if !text.is_empty() && !text.ends_with('\n') {
            *torn += 1;
            // Checked here without its torn tail; the rest of the checker still applies
            // to every other file.
            skip.push(
                newest
                    .strip_prefix(state_dir)
                    .unwrap()
                    .to_string_lossy()
                    .to_string(),
            );
            let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            for line in whole.lines() {
                serde_json::from_str::<Value>(line)
                    .unwrap_or_else(|e| panic!("{}: {e}: {line:?}", newest.display()));
            }
        }
    }
    let skip_refs: Vec<&str> = skip.iter().map(String::as_str).collect();
    assert_state_dir_parses(state_dir, &skip_refs);

    let mut audit = std::collections::BTreeMap::new();
    for seg in &segments {
        let text = std::fs::read_to_string(seg).unwrap();
        for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let v: Value = serde_json::from_str(line).unwrap();
            let n = v["n"].as_u64().unwrap();
            assert!(
                audit.insert(n, line.trim_end().to_string()).is_none(),
                "audit n {n} twice on disk"
            );
        }
    }
    let mut spool = std::collections::BTreeMap::new();
    let spool_dir = state_dir.join("spool");
    if spool_dir.exists() {
        let mut s = vigil::heartbeat::spool::Spool::open(&spool_dir, 64 << 20).unwrap();
        for (seq, body) in s.peek_oldest(usize::MAX).unwrap() {
            assert!(
                spool.insert(seq, body).is_none(),
                "seq {seq} twice in the spool"
            );
        }
    }
    (audit, spool)
}
