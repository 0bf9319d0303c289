//! HAProxy for real (issue 3): Debian's `haproxy` health-checks a streaming standby through
//! its agent with `option httpchk GET /replica?lag=1MB`; the test reads HAProxy's stats
//! socket and sees the server go DOWN while replay is paused and lagging, and UP again
//! once it has caught up.
//!
//! Runs as root only (as in CI); otherwise it says so and passes.

// Test helpers may unwrap freely (STYLE §4.4); clippy only exempts #[test] fns.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pgcluster::{Cluster, ClusterOptions, Node};
use crate::util::{Agent, free_port, is_root, tempdir, write_config};

/// Where Debian's package installs it.
const HAPROXY: &str = "/usr/sbin/haproxy";

/// Deadline for a state change: a few 300 ms checks, a WAL write, a catch-up.
const WAIT: Duration = Duration::from_secs(30);

/// A foreground `haproxy -db`, killed on drop.
struct Haproxy {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Haproxy {
    /// Writes `dir/haproxy.cfg` checking the server `pg_port` through the agent on
    /// `agent_port`, starts HAProxy on it and waits for its stats socket.
    fn start(dir: &Path, pg_port: u16, agent_port: u16) -> Haproxy {
        let socket = dir.join("haproxy.sock");
        let cfg = dir.join("haproxy.cfg");
        let log = dir.join("haproxy.log");
        std::fs::write(
            &cfg,
            format!(
                "global\n\
                 \tstats socket {sock} mode 600 level admin\n\
                 \n\
                 defaults\n\
                 \tmode tcp\n\
                 \ttimeout connect 2s\n\
                 \ttimeout client 30s\n\
                 \ttimeout server 30s\n\
                 \ttimeout check 2s\n\
                 \n\
                 frontend replicas_in\n\
                 \tbind 127.0.0.1:{front}\n\
                 \tdefault_backend replicas\n\
                 \n\
                 backend replicas\n\
                 \toption httpchk GET /replica?lag=1MB\n\
                 \thttp-check expect status 200\n\
                 \tserver standby 127.0.0.1:{pg_port} check port {agent_port} inter 300ms fall 2 rise 2\n",
                sock = socket.display(),
                front = free_port(),
            ),
        )
        .unwrap();
        let check = Command::new(HAPROXY)
            .args(["-c", "-f"])
            .arg(&cfg)
            .output()
            .expect("run haproxy -c");
        assert!(
            check.status.success(),
            "haproxy -c: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new(HAPROXY)
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("haproxy.err")).unwrap())
            .spawn()
            .expect("spawn haproxy");
        let mut h = Haproxy { child, socket, log };
        let deadline = Instant::now() + WAIT;
        while UnixStream::connect(&h.socket).is_err() {
            if let Ok(Some(st)) = h.child.try_wait() {
                panic!("haproxy exited with {st}: {}", h.logs());
            }
            assert!(Instant::now() < deadline, "no stats socket: {}", h.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }

    fn logs(&self) -> String {
        let err = self.log.with_file_name("haproxy.err");
        format!(
            "{}{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(err).unwrap_or_default()
        )
    }

    /// `status` and `check_status` of `backend/server` from `show stat`.
    fn server_state(&self, backend: &str, server: &str) -> (String, String) {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"show stat\n").unwrap();
        let mut csv = String::new();
        s.read_to_string(&mut csv).unwrap();
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .and_then(|h| h.strip_prefix("# "))
            .unwrap_or_else(|| panic!("no CSV header: {csv:?}"))
            .split(',')
            .collect();
        let col = |name: &str| {
            header
                .iter()
                .position(|c| *c == name)
                .unwrap_or_else(|| panic!("no {name} column: {header:?}"))
        };
        let (px, sv, st, cs) = (
            col("pxname"),
            col("svname"),
            col("status"),
            col("check_status"),
        );
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.get(px) == Some(&backend) && f.get(sv) == Some(&server))
            .map(|f| (f[st].to_string(), f[cs].to_string()))
            .unwrap_or_else(|| panic!("no {backend}/{server} row: {csv}"))
    }

    /// Polls until the server's `status` is `want` (and, for UP, its last check passed).
    fn wait_status(&self, agent: &Agent, want: &str, what: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, check) = self.server_state("replicas", "standby");
            let passed = want != "UP" || check == "L7OK";
            if status == want && passed {
                return;
            }
            if Instant::now() > deadline {
                let (code, body) = agent.get("/replica?lag=1MB");
                panic!(
                    "timed out after {WAIT:?} waiting for {what}: status {status:?}, check \
                     {check:?}; the agent says {code} {body}\n--- haproxy ---\n{}\n\
                     --- agent ---\n{}",
                    self.logs(),
                    agent.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn haproxy_takes_a_lagging_standby_out_and_back_in() {
    if !is_root() {
        eprintln!("haproxy test skipped: runs as root only (as in CI)");
        return;
    }
    let c = Cluster::start(ClusterOptions::default());
    let dir = tempdir();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[check.postgres.replication.repl]\ndsn = {dsn:?}\ninterval = \"300ms\"\n",
            dsn = c.dsn(Node::Standby)
        ),
    );
    let agent = Agent::start(&cfg);
    let haproxy = Haproxy::start(dir.path(), c.standby_port(), cfg.addr.port());
    haproxy.wait_status(&agent, "UP", "the streaming standby UP");

    c.pause_replay();
    c.write_wal(8);
    haproxy.wait_status(&agent, "DOWN", "the lagging standby DOWN");
    let (code, body) = agent.get("/replica?lag=1MB");
    assert_eq!(code, 503, "{body}");

    c.resume_replay();
    c.wait_replayed();
    haproxy.wait_status(&agent, "UP", "the caught-up standby UP again");
}
