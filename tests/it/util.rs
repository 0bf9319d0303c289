//! The shared harness: temp dirs, configs, a real `vigil agent` process, raw HTTP.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn vigil() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vigil"))
}

/// Runs `vigil ARGS…` to completion.
pub fn run(args: &[&str]) -> Output {
    vigil()
        .args(args)
        .env_remove("VIGIL_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .expect("run vigil")
}

/// A unique scratch directory, removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vigil-it-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir")
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A config for one test: state dir, listen port and admin socket inside `dir`, plus
/// `body` (checks and anything else).
pub struct TestConfig {
    pub path: PathBuf,
    pub addr: SocketAddr,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
}

/// Writes `dir/vigil.toml` with a fresh port and the given extra TOML.
pub fn write_config(dir: &Path, body: &str) -> TestConfig {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let socket = dir.join("admin.sock");
    let state_dir = dir.join("state");
    let path = dir.join("vigil.toml");
    let text = format!(
        "[agent]\nstate_dir = {state:?}\ninterval = \"1s\"\n\n[api]\nlisten = \"{addr}\"\nadmin_socket = {sock:?}\n\n{body}\n",
        state = state_dir.display().to_string(),
        sock = socket.display().to_string(),
    );
    std::fs::write(&path, text).unwrap();
    TestConfig {
        path,
        addr,
        socket,
        state_dir,
    }
}

/// A running `vigil agent`, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Agent {
    pub child: Child,
    pub addr: SocketAddr,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// Starts the agent on `cfg` and waits until `/health` answers after the first round.
    pub fn start(cfg: &TestConfig) -> Agent {
        let log = cfg.path.with_extension("log");
        let child = vigil()
            .args(["agent", "-c"])
            .arg(&cfg.path)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn vigil agent");
        let mut agent = Agent {
            child,
            addr: cfg.addr,
            socket: cfg.socket.clone(),
            log,
        };
        poll(Duration::from_secs(20), "the agent's first round", || {
            if let Ok(Some(st)) = agent.child.try_wait() {
                panic!("agent exited early with {st}: {}", agent.logs());
            }
            match try_http(agent.addr, "GET", "/health", None) {
                Ok((_, body)) if !body.contains("\"starting\"") => Some(()),
                _ => None,
            }
        });
        agent
    }

    /// GET `path` over TCP.
    pub fn get(&self, path: &str) -> (u16, String) {
        http(self.addr, "GET", path, None)
    }

    /// GET `path` over TCP, parsed as JSON.
    pub fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let (code, body) = self.get(path);
        (
            code,
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")),
        )
    }

    /// The agent's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(mut self) -> Option<i32> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let code = poll(Duration::from_secs(15), "the agent to exit", || {
            self.child.try_wait().unwrap()
        });
        code.code()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = self.child.wait();
        }
    }
}

fn exchange(
    mut s: impl Read + Write,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text:?}")))?;
    Ok((code, body.to_string()))
}

/// One HTTP/1.1 request over TCP; errors returned.
pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    exchange(s, method, path, body)
}

/// One HTTP/1.1 request over TCP.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    try_http(addr, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// One HTTP/1.1 request over a Unix socket.
pub fn unix_http(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    exchange(s, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Whether the tests run as root (mounts, other users).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `promtool check metrics` accepts `text` without a single complaint (promtool comes from
/// Debian's `prometheus` package, which `.ci/deps` installs).
pub fn assert_promtool_accepts(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`; run .ci/deps)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool check metrics ({}):\n{complaints}",
        out.status
    );
}

// ---------------------------------------------------------------------------------------
// Abusive clients (the agent's API in `faults`, the control plane in `control::faults`).

/// A process's resident set size in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Samples a process's RSS every 20 ms on its own thread; `finish` gives the peak.
pub struct RssWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl RssWatch {
    pub fn start(pid: u32) -> RssWatch {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut peak = 0;
                // The process gone (a crash the test reports itself) ends the sampling.
                while !stop.load(Ordering::Relaxed)
                    && Path::new(&format!("/proc/{pid}/status")).exists()
                {
                    peak = peak.max(rss_kib(pid));
                    std::thread::sleep(Duration::from_millis(20));
                }
                peak
            }
        });
        RssWatch {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Raises this process's soft RLIMIT_NOFILE to the hard limit (a flood needs more than
/// the usual 1024 descriptors); asserts there is room for `need`.
pub fn raise_nofile(need: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    assert!(hard >= need, "RLIMIT_NOFILE hard limit {hard} < {need}");
}

/// Reads from `s` until EOF, an error or `limit`; returns what came and how long it took.
pub fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    use std::io::Read;
    let t = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while t.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    (got, t.elapsed())
}

/// The status code of a raw HTTP/1.1 response; `None` when there is none.
pub fn status_code(response: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(response);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// `GET /health` (the agent's or the control plane's) in a loop (every 50 ms) on its own
/// thread, timing each answer.
pub struct HealthProbe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, Duration, Vec<String>)>>,
}

impl HealthProbe {
    pub fn start(addr: SocketAddr) -> HealthProbe {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let (mut n, mut worst, mut errors) = (0, Duration::ZERO, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
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
    pub fn finish(mut self, bound: Duration, what: &str) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
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
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether the calling test should return at once because it does not run as root; if
/// so, says on stderr that it was skipped, and why it needs root (`why`).
pub fn skip_unless_root(why: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("skipped: needs root ({why})");
    true
}

/// Makes a heartbeat key with `vigil keygen --out DIR/heartbeat.key` and returns the public
/// key it prints, for `vigil control enroll --pubkey`.
pub fn keygen(dir: &Path) -> String {
    let key = dir.join("heartbeat.key");
    let out = run(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("public_key = \"")?.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no public_key line in {stdout:?}"))
        .to_string()
}

/// [`write_config`] for an agent that heartbeats as `host_id`: a disk check on `dir` every
/// `check_interval` that never trips, and `[heartbeat]` to `url`, trusting the CA in
/// `ca_file`, signing with the key [`keygen`] made in `dir`, plus the `heartbeat` lines
/// (interval, backoff, timeout…).
pub fn write_heartbeat_config(
    dir: &Path,
    host_id: &str,
    check_interval: &str,
    url: &str,
    ca_file: &Path,
    heartbeat: &str,
) -> TestConfig {
    let cfg = write_config(
        dir,
        &format!(
            "[check.disk.scratch]\npath = {dir:?}\nwarn = \"99%\"\ncrit = \"100%\"\n\
             interval = {check_interval:?}\n\n[heartbeat]\nurl = {url:?}\nca_file = {ca:?}\n\
             key_file = {key:?}\n{heartbeat}\n",
            dir = dir.display().to_string(),
            ca = ca_file.display().to_string(),
            key = dir.join("heartbeat.key").display().to_string(),
        ),
    );
    let text = std::fs::read_to_string(&cfg.path).unwrap().replacen(
        "[agent]\n",
        &format!("[agent]\nhost_id = {host_id:?}\n"),
        1,
    );
    std::fs::write(&cfg.path, text).unwrap();
    cfg
}

/// Heartbeats as a store holds them, `(seq, received_at_ms)` in the order stored: every seq
/// from 1 to at least `produced`, once each, none received before the one before it.
/// Returns the last seq stored.
pub fn assert_every_seq_once_in_order(rows: &[(u64, u64)], produced: u64) -> u64 {
    let seqs: Vec<u64> = rows.iter().map(|r| r.0).collect();
    let last = seqs.last().copied().unwrap_or(0);
    assert!(last >= produced, "stored up to {last}, produced {produced}");
    assert_eq!(
        seqs,
        (1..=last).collect::<Vec<_>>(),
        "every seq from 1, once, no gap, in order"
    );
    assert!(
        rows.windows(2).all(|w| w[0].1 <= w[1].1),
        "received in the order produced"
    );
    last
}

/// Sends four requests at once to `addr`, each `head` followed by 1 MiB of one header
/// value, and returns what came back on each before the server closed (bounded at 10 s).
pub fn oversized_heads(addr: std::net::SocketAddr, head: &[u8]) -> Vec<(Vec<u8>, Duration)> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let mut s = std::net::TcpStream::connect(addr).unwrap();
                    let mut req = head.to_vec();
                    req.extend_from_slice(b"X-Big: ");
                    req.resize(req.len() + 1024 * 1024, b'a');
                    req.extend_from_slice(b"\r\n\r\n");
                    // The server may close before taking it all: that is the point.
                    let _ = std::io::Write::write_all(&mut s, &req);
                    read_until_closed(&mut s, Duration::from_secs(10))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Each answer to [`oversized_heads`] is a 431 or a close, and came within 10 s.
pub fn assert_refused_heads(answers: &[(Vec<u8>, Duration)]) {
    for (resp, took) in answers {
        let code = status_code(resp);
        assert!(
            code.is_none() || code == Some(431),
            "1 MiB of headers answered {code:?}: {}",
            String::from_utf8_lossy(resp)
        );
        assert!(*took < Duration::from_secs(10), "never closed");
    }
}

/// The status code of `resp` is `want`, else the response is shown.
pub fn assert_status(resp: &[u8], want: u16) {
    assert_eq!(
        status_code(resp),
        Some(want),
        "{}",
        String::from_utf8_lossy(resp)
    );
}

/// A slowloris against `addr`: one byte of a request head at a time, each followed by up
/// to 2 s of waiting for the server to answer or close. Returns how long until it was cut
/// off, and the stream (for what the server said); panics if `give_up` passes first.
pub fn slowloris(addr: std::net::SocketAddr, give_up: Duration) -> (Duration, std::net::TcpStream) {
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    let t = std::time::Instant::now();
    let cut = b"GET /health HTTP/1.1\r\nHost: x\r\n".iter().any(|b| {
        assert!(t.elapsed() <= give_up, "the slowloris was never cut off");
        if std::io::Write::write_all(&mut slow, &[*b]).is_err() {
            return true;
        }
        // An answer (408, 400) or a close, read before the next byte goes.
        let (resp, took) = read_until_closed(&mut slow, Duration::from_secs(2));
        !resp.is_empty() || took < Duration::from_secs(2)
    });
    assert!(cut, "the whole head went through a byte at a time");
    let closed_after = t.elapsed();
    eprintln!("slowloris: cut off after {closed_after:?}");
    (closed_after, slow)
}
