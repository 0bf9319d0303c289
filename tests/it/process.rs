//! `process` against real processes (a copy of `sleep` under a unique comm): count by name
//! against `min`/`max`, restarts through a pidfile; and a check hung on a FIFO that neither
//! delays other checks and the API nor (per the contract) keeps SIGTERM from stopping the agent.

// Test helpers may unwrap freely (STYLE §4.4); clippy only exempts #[test] fns.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{Agent, poll, tempdir, write_config};

/// Generous bound for anything that takes a few 200 ms samples.
const WAIT: Duration = Duration::from_secs(20);

/// A copy of `sleep` under a unique short name, so that its comm matches nothing else on
/// the host; children are killed and reaped on drop.
struct Sleeper {
    exe: PathBuf,
    comm: String,
    children: Vec<Child>,
}

impl Sleeper {
    fn new(dir: &Path) -> Sleeper {
        let src = ["/bin/sleep", "/usr/bin/sleep"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .expect("a sleep binary");
        let comm = format!("vgl-{:06}", fastrand::u32(..1_000_000));
        let exe = dir.join(&comm);
        std::fs::copy(src, &exe).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        Sleeper {
            exe,
            comm,
            children: Vec::new(),
        }
    }

    /// Starts one more copy; returns its pid.
    fn spawn(&mut self) -> u32 {
        // Another test thread forking while the copy's write fd was open can make exec fail
        // with ETXTBSY for a moment.
        let child = poll(
            Duration::from_secs(5),
            "exec of the sleep copy",
            || match Command::new(&self.exe)
                .arg("300")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
            {
                Ok(c) => Some(c),
                Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => None,
                Err(e) => panic!("spawn {}: {e}", self.exe.display()),
            },
        );
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Kills and reaps the child `pid`.
    fn kill(&mut self, pid: u32) {
        let i = self
            .children
            .iter()
            .position(|c| c.id() == pid)
            .expect("a child of ours");
        let mut c = self.children.remove(i);
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Replaces `path` atomically with `pid\n`.
fn write_pidfile(path: &Path, pid: u32) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{pid}\n")).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `GET /checks/NAME`, asserting 200.
fn check(agent: &Agent, name: &str) -> Value {
    let (code, v) = agent.get_json(&format!("/checks/{name}"));
    assert_eq!(code, 200, "/checks/{name}: {v}");
    v
}

/// Polls `/checks/NAME` until `f` accepts it; returns that answer.
fn wait_check(agent: &Agent, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    poll(WAIT, what, || {
        let v = check(agent, name);
        f(&v).then_some(v)
    })
}

/// The value of the sample of metric `name` whose labels include `check="CHECK"`.
fn metric(text: &str, name: &str, check: &str) -> Option<f64> {
    let prefix = format!("{name}{{");
    let label = format!("check=\"{check}\"");
    text.lines()
        .find(|l| l.starts_with(&prefix) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn restarts(agent: &Agent, check: &str) -> Option<f64> {
    let (code, text) = agent.get("/metrics");
    assert_eq!(code, 200);
    metric(&text, "vigil_process_restarts_total", check)
}

fn is(v: &Value, status: &str, count: f64) -> bool {
    v["status"] == status && v["value"].as_f64() == Some(count)
}

#[test]
fn by_name_counts_real_processes_against_min_and_max() {
    let dir = tempdir();
    let mut sleeper = Sleeper::new(dir.path());
    let first = sleeper.spawn();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[check.process.sleeper]\nname = {:?}\nmin = 1\nmax = 1\ninterval = \"200ms\"\n",
            sleeper.comm
        ),
    );
    let agent = Agent::start(&cfg);

    let v = wait_check(&agent, "sleeper", "one process, ok", |v| is(v, "ok", 1.0));
    assert_eq!(v["kind"], "process", "{v}");

    // Below min: critical.
    sleeper.kill(first);
    wait_check(&agent, "sleeper", "no process, critical", |v| {
        is(v, "critical", 0.0)
    });

    // Back: ok again.
    let second = sleeper.spawn();
    wait_check(&agent, "sleeper", "one process again, ok", |v| {
        is(v, "ok", 1.0)
    });

    // Above max: critical.
    let third = sleeper.spawn();
    wait_check(&agent, "sleeper", "two processes, critical", |v| {
        is(v, "critical", 2.0)
    });
    sleeper.kill(third);
    wait_check(&agent, "sleeper", "one process, ok", |v| is(v, "ok", 1.0));
    sleeper.kill(second);
}

#[test]
fn pidfile_reports_a_restart_when_the_pid_changes() {
    let dir = tempdir();
    let mut sleeper = Sleeper::new(dir.path());
    let pidfile = dir.path().join("svc.pid");
    let old = sleeper.spawn();
    write_pidfile(&pidfile, old);
    // trip_after = 1 and a clear_after no test reaches: `tripped` keeps the memory of any
    // non-ok sample, even one too brief to observe.
    let cfg = write_config(
        dir.path(),
        &format!(
            "[check.process.svc]\npidfile = {:?}\ninterval = \"200ms\"\ntrip_after = 1\nclear_after = 100000\n",
            pidfile.display().to_string()
        ),
    );
    let agent = Agent::start(&cfg);

    // Sampled twice with the same process: no restart, never tripped.
    let v = wait_check(&agent, "svc", "pidfile process ok", |v| is(v, "ok", 1.0));
    let first = v["sampled_at"].as_str().unwrap().to_string();
    let v = wait_check(&agent, "svc", "a later sample", |v| {
        v["sampled_at"].as_str() != Some(first.as_str())
    });
    assert!(is(&v, "ok", 1.0), "{v}");
    assert_eq!(v["tripped"], false, "{v}");
    assert_eq!(restarts(&agent, "svc"), Some(0.0));

    // A new process takes over (new pid in the pidfile) while the old one still runs, as a
    // graceful restart does; then the old one exits.
    let new = sleeper.spawn();
    assert_ne!(old, new);
    write_pidfile(&pidfile, new);
    poll(
        WAIT,
        "vigil_process_restarts_total to count the restart",
        || (restarts(&agent, "svc")? >= 1.0).then_some(()),
    );
    sleeper.kill(old);
    assert_eq!(
        restarts(&agent, "svc"),
        Some(1.0),
        "one pid change is one restart"
    );
    // The restart sample was a warning (the count never left 1, so nothing else was non-ok);
    // it tripped the check at warning, which does not make the host unavailable.
    let v = wait_check(&agent, "svc", "ok after the restart", |v| is(v, "ok", 1.0));
    assert_eq!(v["tripped"], true, "the restart sample was not non-ok: {v}");
    let (code, h) = agent.get_json("/health");
    assert_eq!(code, 200, "{h}");
    assert_eq!(h["tripped"], serde_json::json!(["svc"]), "{h}");

    // The pidfile's process dies: critical, count 0.
    sleeper.kill(new);
    wait_check(&agent, "svc", "critical with the process gone", |v| {
        is(v, "critical", 0.0)
    });
    let third = sleeper.spawn();
    write_pidfile(&pidfile, third);
    wait_check(&agent, "svc", "ok with the process back", |v| {
        is(v, "ok", 1.0)
    });
}

/// Keeps opening a FIFO for writing and writing `text`, so that every reader gets `text`
/// and EOF; stopped (and joined) on drop.
struct FifoWriter {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FifoWriter {
    fn start(path: &Path, text: String) -> FifoWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (path.to_path_buf(), stop.clone());
        // Opening for writing blocks until a reader opens: this releases the agent's stuck read.
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&p) {
                    let _ = f.write_all(text.as_bytes());
                }
            }
        });
        FifoWriter {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FifoWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // A non-blocking reader of our own lets the writer's pending open return.
        let reader = nix::fcntl::open(
            &self.path,
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NONBLOCK,
            nix::sys::stat::Mode::empty(),
        );
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        drop(reader);
    }
}

#[test]
fn a_hung_check_is_unknown_and_delays_neither_other_checks_nor_the_api() {
    let dir = tempdir();
    let fifo = dir.path().join("hung.pid");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // Thresholds at 100% so the host's own disk cannot make `fast` non-ok.
    let cfg = write_config(
        dir.path(),
        &format!(
            "[check.disk.fast]\npath = {dir:?}\nwarn = \"100%\"\ncrit = \"100%\"\ninterval = \"200ms\"\n\n\
             [check.process.hung]\npidfile = {fifo:?}\ntimeout = \"300ms\"\ninterval = \"500ms\"\n",
            dir = dir.path().display().to_string(),
            fifo = fifo.display().to_string(),
        ),
    );
    let agent = Agent::start(&cfg);

    // The read of the FIFO blocks: the first run times out, later ones are refused while it
    // is still stuck. Either way: unknown, no value.
    let v = wait_check(&agent, "hung", "hung to be sampled", |v| {
        !v["sampled_at"].is_null()
    });
    assert_eq!(v["status"], "unknown", "{v}");
    assert!(v["value"].is_null(), "{v}");
    let msg = v["message"].as_str().unwrap().to_lowercase();
    assert!(
        msg.contains("timed out") || msg.contains("not returned"),
        "{v}"
    );

    // Meanwhile `fast` keeps sampling and /health answers at once, every time.
    let mut fast_seen = Vec::new();
    let mut hung_seen = Vec::new();
    poll(
        WAIT,
        "fast sampled at 3 and hung at 2 different times",
        || {
            let t = Instant::now();
            let (code, h) = agent.get_json("/health");
            let took = t.elapsed();
            assert!(took < Duration::from_secs(1), "/health took {took:?}");
            assert_eq!(
                code, 200,
                "a non-essential unknown check keeps the host available: {h}"
            );
            let fast = check(&agent, "fast");
            assert_eq!(fast["status"], "ok", "{fast}");
            let hung = check(&agent, "hung");
            assert_eq!(hung["status"], "unknown", "{hung}");
            for (v, seen) in [(&fast, &mut fast_seen), (&hung, &mut hung_seen)] {
                let at = v["sampled_at"].as_str().unwrap().to_string();
                if !seen.contains(&at) {
                    seen.push(at);
                }
            }
            (fast_seen.len() >= 3 && hung_seen.len() >= 2).then_some(())
        },
    );
    let (code, live) = agent.get_json("/health/live");
    assert_eq!(code, 200, "{live}");

    // Feed the FIFO our own pid: the stuck read returns, and the check measures again.
    let writer = FifoWriter::start(&fifo, format!("{}\n", std::process::id()));
    wait_check(
        &agent,
        "hung",
        "hung to recover once the FIFO is fed",
        |v| is(v, "ok", 1.0),
    );
    drop(writer);
}

#[test]
fn sigterm_stops_the_agent_while_a_check_is_hung() {
    let dir = tempdir();
    let fifo = dir.path().join("hung.pid");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[check.process.hung]\npidfile = {:?}\ntimeout = \"300ms\"\ninterval = \"500ms\"\n",
            fifo.display().to_string()
        ),
    );
    let mut agent = Agent::start(&cfg);
    wait_check(&agent, "hung", "hung to be unknown", |v| {
        v["status"] == "unknown" && !v["sampled_at"].is_null()
    });

    // The contract: SIGTERM stops scheduling and exits 0; a read stuck in the kernel must
    // not keep the agent alive (systemd would have to SIGKILL it).
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = agent.child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Release the stuck read either way, so that a failure here leaves nothing behind.
    let writer = FifoWriter::start(&fifo, format!("{}\n", std::process::id()));
    let logs = agent.logs();
    drop(agent);
    drop(writer);
    let status = status.unwrap_or_else(|| {
        panic!("the agent did not exit within 10s of SIGTERM while a FIFO read was stuck: {logs}")
    });
    assert_eq!(status.code(), Some(0), "{logs}");
}
