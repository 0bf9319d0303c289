//! A real PostgreSQL 15 primary and streaming standby (Debian's `postgresql-15` package)
//! for the postgres check tests, plus tests proving the harness itself works.
//!
//! Layout of one pair, all under `/tmp/vigil-pg-XXXXXX/` (0755, owned by the PostgreSQL OS
//! user, so that user can traverse it when the tests run as root):
//!
//! ```text
//! primary/  standby/            data dirs (0700)
//! run-primary/  run-standby/    unix_socket_directories
//! archive/                      the default archive_command's target
//! primary.log  standby.log      server logs (pg_ctl -l)
//! ```
//!
//! Teardown: `Drop` stops both servers and removes the dir. A reaper shell per cluster
//! (own process group, so Ctrl-C does not reach it) blocks reading a pipe whose only
//! write end is held by the test process; when that process exits for any reason (normal
//! exit with the `shared()` pair still in its static, panic=abort, SIGKILL) the kernel
//! closes the pipe and the reaper stops the servers and removes the dir.

#![allow(dead_code)]

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::util::{free_port, is_root, poll};

/// Where Debian's postgresql-15 package puts the server binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The physical replication slot the standby streams from (when `ClusterOptions::slot`).
pub const STANDBY_SLOT: &str = "vigil_standby";

/// `cluster_name` (and so the walreceiver's `application_name`) of each node.
pub const PRIMARY_NAME: &str = "vigil_primary";
/// See [`PRIMARY_NAME`]; this is what `pg_stat_replication.application_name` shows.
pub const STANDBY_NAME: &str = "vigil_standby";

/// Deadline for a server start, a stop, or the standby to reach `streaming`.
const PG_WAIT: Duration = Duration::from_secs(30);

/// How often a server start is retried with a fresh port when the one picked was taken
/// in the meantime (another test bound it between `free_port()` and the server's bind).
const PORT_ATTEMPTS: usize = 5;

/// Which server of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    Primary,
    Standby,
}

/// What `Cluster::start` builds.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Also start a streaming standby (default true).
    pub standby: bool,
    /// `archive_command` on the primary (archive_mode is always on). `None`: copy each
    /// segment into `archive_dir()` (via `%f.tmp` and a rename, so a file there is whole). Use e.g. `Some("false".into())` to make archiving fail.
    pub archive_command: Option<String>,
    /// Extra postgresql.conf lines, appended last so they win (e.g. "max_connections = 20").
    /// The standby's postgresql.conf is the primary's (pg_basebackup copies it).
    pub extra_conf: Vec<String>,
    /// Stream through the physical slot `STANDBY_SLOT` (default true). Without a slot the
    /// primary keeps `wal_keep_size = 64MB` so the standby can still catch up.
    pub slot: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            standby: true,
            archive_command: None,
            extra_conf: Vec::new(),
            slot: true,
        }
    }
}

/// One PostgreSQL server of a pair: paths and its loopback port.
#[derive(Debug)]
struct Server {
    data: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    port: u16,
}

/// The OS user the PostgreSQL binaries run as: `postgres` (or `nobody`) when the tests
/// run as root, since the server refuses to run as root; the current user otherwise.
#[derive(Clone, Copy, Debug)]
struct PgUser {
    /// uid and gid to switch to; `None` when not root.
    ids: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
}

impl PgUser {
    fn detect() -> PgUser {
        if !is_root() {
            return PgUser { ids: None };
        }
        let user = ["postgres", "nobody"]
            .iter()
            .find_map(|name| nix::unistd::User::from_name(name).ok().flatten())
            .expect("neither a `postgres` nor a `nobody` OS user to run PostgreSQL as");
        PgUser {
            ids: Some((user.uid, user.gid)),
        }
    }

    /// Gives `path` to the PostgreSQL user (no-op when not root).
    fn own(&self, path: &Path) {
        if let Some((uid, gid)) = self.ids {
            nix::unistd::chown(path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        }
    }
}

/// A running primary and (optionally) a streaming standby; both stopped and removed on drop.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    archive: PathBuf,
    user: PgUser,
    primary: Server,
    /// `None` when started with `standby: false`.
    standby: Option<Server>,
    /// The reaper shell; its stdin is the pipe whose closing triggers the cleanup.
    reaper: Child,
}

/// The pair shared by read-only tests: started on first use, never dropped (statics are
/// not); its reaper stops it when the test process exits. Tests that pause replay, stop a
/// server, fill disks or otherwise change the pair's state start their own with
/// `Cluster::start`.
pub fn shared() -> &'static Cluster {
    static SHARED: OnceLock<Cluster> = OnceLock::new();
    SHARED.get_or_init(|| Cluster::start(ClusterOptions::default()))
}

/// Stops the servers in the data dirs given (standby first) with SIGQUIT, PostgreSQL's
/// immediate shutdown (what `pg_ctl stop -m immediate` sends; signalling needs no change
/// of user, pg_ctl would), waits for them to exit (a zombie counts as exited: the
/// postmaster's parent is PID 1, which may reap late), then removes the cluster dir.
/// `$1` is the cluster dir, the rest are data dirs. Runs only once stdin reaches EOF.
const REAPER_SCRIPT: &str = r#"
cat >/dev/null
alive() {
  s=$(sed -n 's/.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null)
  [ -n "$s" ] && [ "$s" != Z ]
}
top=$1; shift
for d in "$@"; do
  f="$d/postmaster.pid"
  [ -f "$f" ] || continue
  pid=$(head -n 1 "$f")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ] || continue
  kill -QUIT "$pid" 2>/dev/null || continue
  i=0
  while alive "$pid" && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i+1)); done
  kill -KILL "$pid" 2>/dev/null
done
rm -rf "$top"
"#;

impl Cluster {
    /// initdb + start a primary, then (with `opts.standby`) pg_basebackup a standby, start
    /// it and wait until it streams. Panics with the server log on any failure.
    pub fn start(opts: ClusterOptions) -> Cluster {
        let started = Instant::now();
        assert!(
            Path::new(PG_BIN).join("postgres").exists(),
            "{PG_BIN}/postgres missing: install postgresql-15 (.ci/deps)"
        );
        let user = PgUser::detect();
        // Under /tmp, not CARGO_TARGET_TMPDIR: every parent must be traversable by the
        // PostgreSQL user, and socket paths must stay short (107 bytes).
        let dir = tempfile::Builder::new()
            .prefix("vigil-pg-")
            .tempdir_in("/tmp")
            .expect("cluster tempdir")
            .keep();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        user.own(&dir);

        let server = |name: &str| Server {
            data: dir.join(name),
            socket_dir: dir.join(format!("run-{name}")),
            log: dir.join(format!("{name}.log")),
            port: 0,
        };
        let primary = server("primary");
        let standby = server("standby");

        // The reaper comes first, so that even a start that panics half-way is cleaned
        // up; from here on `cluster` owns everything and its Drop runs on panic.
        let reaper = Command::new("sh")
            .arg("-c")
            .arg(REAPER_SCRIPT)
            .arg("vigil-pg-reaper")
            .arg(&dir)
            .arg(&standby.data)
            .arg(&primary.data)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir("/")
            // Its own process group: a Ctrl-C to the test's group must not reach it.
            .process_group(0)
            .spawn()
            .expect("spawn the cluster reaper");

        let archive = dir.join("archive");
        let mut cluster = Cluster {
            dir,
            archive,
            user,
            primary,
            standby: None,
            reaper,
        };
        for d in [
            &cluster.archive,
            &cluster.primary.socket_dir,
            &standby.socket_dir,
        ] {
            cluster.make_dir(d, 0o755);
        }
        cluster.make_dir(&cluster.primary.data, 0o700);
        cluster.make_dir(&standby.data, 0o700);

        cluster.init_primary(&opts);
        let primary_ready = started.elapsed();
        if opts.standby {
            cluster.init_standby(&opts, standby);
            cluster.wait_streaming();
        }
        eprintln!(
            "pgcluster: {} started in {:?} (primary ready after {:?}), dir {}",
            if opts.standby { "pair" } else { "primary" },
            started.elapsed(),
            primary_ready,
            cluster.dir.display()
        );
        cluster
    }

    fn make_dir(&self, path: &Path, mode: u32) {
        std::fs::create_dir_all(path).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        self.user.own(path);
    }

    fn init_primary(&mut self, opts: &ClusterOptions) {
        let data = self.primary.data.clone();
        // -N: no fsync of the new cluster (speed; the dir is thrown away).
        self.run(
            self.pg_cmd("initdb")
                .args(["-N", "-U", "postgres", "-A", "trust", "-E", "UTF8"])
                .args(["--locale=C", "--no-instructions", "-D"])
                .arg(&data),
            "initdb",
        );
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host all all 127.0.0.1/32 trust\n\
             local replication all trust\n\
             host replication all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let archive_command = opts.archive_command.clone().unwrap_or_else(|| {
            format!(
                "test ! -f {dir}/%f && cp %p {dir}/%f.tmp && mv {dir}/%f.tmp {dir}/%f",
                dir = self.archive.display()
            )
        });
        let mut conf = vec![
            "# vigil test harness".to_string(),
            "listen_addresses = '127.0.0.1'".to_string(),
            "wal_level = replica".to_string(),
            "max_wal_senders = 10".to_string(),
            "max_replication_slots = 10".to_string(),
            "hot_standby = on".to_string(),
            // The data is thrown away after the test: durability buys nothing and fsync
            // on a loaded 2-core CI machine makes every commit and checkpoint slow.
            "fsync = off".to_string(),
            "synchronous_commit = off".to_string(),
            "full_page_writes = on".to_string(),
            "shared_buffers = 16MB".to_string(),
            "max_connections = 30".to_string(),
            "archive_mode = on".to_string(),
            format!("archive_command = {}", conf_quote(&archive_command)),
            // Standbys report receive/replay positions every second (default 10 s), so
            // pg_stat_replication on the primary follows quickly.
            "wal_receiver_status_interval = 1s".to_string(),
            format!("cluster_name = '{PRIMARY_NAME}'"),
            format!(
                "unix_socket_directories = {}",
                conf_quote(&self.primary.socket_dir.display().to_string())
            ),
        ];
        if !opts.slot {
            conf.push("wal_keep_size = 64MB".to_string());
        }
        conf.extend(opts.extra_conf.iter().cloned());
        append_conf(&data, &conf);

        let port = self.start_new(&self.primary);
        self.primary.port = port;
    }

    fn init_standby(&mut self, opts: &ClusterOptions, mut standby: Server) {
        let mut cmd = self.pg_cmd("pg_basebackup");
        cmd.args(["-h", "127.0.0.1", "-p", &self.primary.port.to_string()])
            .args(["-U", "postgres", "-R", "-X", "stream", "-c", "fast", "-N"])
            .arg("-D")
            .arg(&standby.data);
        if opts.slot {
            cmd.args(["-C", "-S", STANDBY_SLOT]);
        }
        self.run(&mut cmd, "pg_basebackup");
        append_conf(
            &standby.data,
            &[
                format!("cluster_name = '{STANDBY_NAME}'"),
                format!(
                    "unix_socket_directories = {}",
                    conf_quote(&standby.socket_dir.display().to_string())
                ),
            ],
        );
        standby.port = self.start_new(&standby);
        self.standby = Some(standby);
    }

    /// Starts a server for the first time on a fresh port, retrying with another port
    /// when the picked one was taken meanwhile; returns the port.
    fn start_new(&self, server: &Server) -> u16 {
        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port();
            append_conf(&server.data, &[format!("port = {port}")]);
            match self.pg_ctl_start(server) {
                Ok(()) => return port,
                Err(e) => {
                    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
                    let port_taken = log.contains("could not bind")
                        || log.contains("could not create any TCP/IP sockets");
                    if !port_taken || attempt == PORT_ATTEMPTS {
                        panic!(
                            "starting {}: {e}\n--- log ---\n{log}",
                            server.data.display()
                        );
                    }
                }
            }
        }
        unreachable!("the last attempt panics")
    }

    fn pg_ctl_start(&self, server: &Server) -> Result<(), String> {
        let out = self
            .pg_cmd("pg_ctl")
            .args(["-w", "-t", &PG_WAIT.as_secs().to_string(), "-s", "-D"])
            .arg(&server.data)
            .arg("-l")
            .arg(&server.log)
            .arg("start")
            .output()
            .map_err(|e| format!("spawn pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(describe("pg_ctl start", &out))
        }
    }

    fn pg_ctl_stop(&self, data: &Path, mode: &str) -> Result<(), String> {
        let out = self
            .pg_cmd("pg_ctl")
            .args(["-w", "-t", &PG_WAIT.as_secs().to_string(), "-s", "-m", mode])
            .arg("-D")
            .arg(data)
            .arg("stop")
            .output()
            .map_err(|e| format!("spawn pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(describe("pg_ctl stop", &out))
        }
    }

    /// A command for one of PostgreSQL's binaries, as the PostgreSQL OS user, with a clean
    /// libpq environment (no PG* variables from the caller).
    fn pg_cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(Path::new(PG_BIN).join(program));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("HOME", &self.dir)
            .env("LC_ALL", "C")
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.user.ids {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        cmd
    }

    fn run(&self, cmd: &mut Command, what: &str) -> String {
        let out = cmd.output().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        if !out.status.success() {
            panic!("{}", describe(what, &out));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn server(&self, which: Node) -> &Server {
        match which {
            Node::Primary => &self.primary,
            Node::Standby => self
                .standby
                .as_ref()
                .expect("this cluster was started without a standby"),
        }
    }

    /// The directory holding everything of this pair.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The primary's TCP port on 127.0.0.1.
    pub fn primary_port(&self) -> u16 {
        self.primary.port
    }

    /// The standby's TCP port on 127.0.0.1.
    pub fn standby_port(&self) -> u16 {
        self.server(Node::Standby).port
    }

    /// A node's TCP port on 127.0.0.1.
    pub fn port(&self, which: Node) -> u16 {
        self.server(which).port
    }

    /// libpq key=value DSN over TCP, superuser `postgres`.
    pub fn dsn(&self, which: Node) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.server(which).port
        )
    }

    /// `host=127.0.0.1 port=N user=postgres dbname=postgres` for the primary.
    pub fn primary_dsn(&self) -> String {
        self.dsn(Node::Primary)
    }

    /// `host=127.0.0.1 port=N user=postgres dbname=postgres` for the standby.
    pub fn standby_dsn(&self) -> String {
        self.dsn(Node::Standby)
    }

    /// The primary's unix_socket_directories (a DSN may use `host=<this dir> port=N`).
    pub fn primary_socket_dir(&self) -> &Path {
        &self.primary.socket_dir
    }

    /// The standby's unix_socket_directories.
    pub fn standby_socket_dir(&self) -> &Path {
        &self.server(Node::Standby).socket_dir
    }

    /// A node's data directory.
    pub fn data_dir(&self, which: Node) -> &Path {
        &self.server(which).data
    }

    /// Where the default archive_command copies WAL segments.
    pub fn archive_dir(&self) -> &Path {
        &self.archive
    }

    /// A node's server log so far.
    pub fn log(&self, which: Node) -> String {
        std::fs::read_to_string(&self.server(which).log).unwrap_or_default()
    }

    /// Runs `sql` (one or more statements, each in its own transaction) with
    /// `psql -X -A -t -q -v ON_ERROR_STOP=1`; returns trimmed stdout, `Err` with stderr.
    pub fn try_psql(&self, which: Node, sql: &str) -> Result<String, String> {
        let server = self.server(which);
        let mut child = self
            .pg_cmd("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &server.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-f", "-"])
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn psql: {e}"))?;
        // A write error (psql died early) shows up in its exit status and stderr.
        let _ = child.stdin.take().unwrap().write_all(sql.as_bytes());
        let out = child
            .wait_with_output()
            .map_err(|e| format!("wait psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(describe(&format!("psql on {which:?}: {sql}"), &out))
        }
    }

    /// `try_psql`, panicking with psql's stderr on failure.
    pub fn psql(&self, which: Node, sql: &str) -> String {
        self.try_psql(which, sql).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Polls (30 s) until the standby's WAL receiver is `streaming` and the primary's
    /// `pg_stat_replication` shows it streaming.
    pub fn wait_streaming(&self) {
        self.server(Node::Standby);
        poll(PG_WAIT, "the standby to stream from the primary", || {
            let receiver = self
                .try_psql(Node::Standby, "SELECT status FROM pg_stat_wal_receiver")
                .ok()?;
            let sender = self
                .try_psql(
                    Node::Primary,
                    &format!(
                        "SELECT count(*) FROM pg_stat_replication \
                         WHERE application_name = '{STANDBY_NAME}' AND state = 'streaming'"
                    ),
                )
                .ok()?;
            (receiver == "streaming" && sender == "1").then_some(())
        });
    }

    /// Polls (30 s) until the standby has replayed everything the primary had written
    /// when this was called.
    pub fn wait_replayed(&self) {
        let target = self.psql(Node::Primary, "SELECT pg_current_wal_lsn()");
        poll(PG_WAIT, "the standby to replay up to the primary", || {
            let behind = self
                .try_psql(
                    Node::Standby,
                    &format!("SELECT pg_wal_lsn_diff('{target}', pg_last_wal_replay_lsn()) > 0"),
                )
                .ok()?;
            (behind == "f").then_some(())
        });
    }

    /// Pauses WAL replay on the standby and waits until it is paused.
    pub fn pause_replay(&self) {
        self.psql(Node::Standby, "SELECT pg_wal_replay_pause()");
        poll(PG_WAIT, "replay to pause", || {
            let state = self
                .try_psql(Node::Standby, "SELECT pg_get_wal_replay_pause_state()")
                .ok()?;
            (state == "paused").then_some(())
        });
    }

    /// Resumes WAL replay on the standby.
    pub fn resume_replay(&self) {
        self.psql(Node::Standby, "SELECT pg_wal_replay_resume()");
    }

    /// Writes roughly `mib` MiB of WAL on the primary (1 KiB rows into `vigil_filler`);
    /// returns the primary's `pg_current_wal_lsn()` afterwards.
    pub fn write_wal(&self, mib: u64) -> String {
        self.psql(
            Node::Primary,
            &format!(
                "SET client_min_messages = warning;\n\
                 CREATE TABLE IF NOT EXISTS vigil_filler(x text);\n\
                 INSERT INTO vigil_filler SELECT repeat('x', 1000) FROM generate_series(1, {});\n\
                 SELECT pg_current_wal_lsn();",
                mib * 1024
            ),
        )
    }

    /// Forces a WAL segment switch on the primary; returns the name of the segment that
    /// was completed (the one the archiver will archive next).
    pub fn switch_wal(&self) -> String {
        self.psql(Node::Primary, "SELECT pg_walfile_name(pg_switch_wal())")
    }

    /// Stops a node with `pg_ctl stop -m MODE` (`smart`, `fast` or `immediate`).
    pub fn stop(&self, which: Node, mode: &str) {
        self.pg_ctl_stop(&self.server(which).data, mode)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts a stopped node again (same port, same configuration).
    pub fn start_node(&self, which: Node) {
        let server = self.server(which);
        self.pg_ctl_start(server).unwrap_or_else(|e| {
            panic!("{e}\n--- log ---\n{}", self.log(which));
        });
    }

    /// Stops the standby (`pg_ctl stop -m fast`).
    pub fn stop_standby(&self) {
        self.stop(Node::Standby, "fast");
    }

    /// Starts the standby again; does not wait for streaming (see `wait_streaming`).
    pub fn start_standby(&self) {
        self.start_node(Node::Standby);
    }

    /// Promotes the standby with `pg_ctl promote -w` (returns once it accepts writes).
    pub fn promote_standby(&self) {
        let data = self.server(Node::Standby).data.clone();
        self.run(
            self.pg_cmd("pg_ctl")
                .args(["-w", "-t", &PG_WAIT.as_secs().to_string(), "-s", "-D"])
                .arg(&data)
                .arg("promote"),
            "pg_ctl promote",
        );
    }

    /// The postmaster's pid of a running node (first line of `postmaster.pid`).
    pub fn postmaster_pid(&self, which: Node) -> i32 {
        let path = self.server(which).data.join("postmaster.pid");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        text.lines().next().unwrap().trim().parse().unwrap()
    }
}

impl Drop for Cluster {
    /// Must not panic (it also runs while a failed test unwinds).
    fn drop(&mut self) {
        let datas: Vec<PathBuf> = self
            .standby
            .iter()
            .chain(std::iter::once(&self.primary))
            .map(|s| s.data.clone())
            .collect();
        for data in datas {
            if data.join("postmaster.pid").exists() {
                let _ = self.pg_ctl_stop(&data, "immediate");
            }
        }
        // Closing the pipe lets the reaper run: it finds the servers gone and removes the dir.
        drop(self.reaper.stdin.take());
        let deadline = Instant::now() + PG_WAIT;
        loop {
            match self.reaper.try_wait() {
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    let _ = self.reaper.kill();
                    let _ = self.reaper.wait();
                    break;
                }
                _ => break,
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A postgresql.conf string literal.
fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Appends lines to `data/postgresql.conf` (later settings win).
fn append_conf(data: &Path, lines: &[String]) {
    let path = data.join("postgresql.conf");
    let mut f = OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    for line in lines {
        writeln!(f, "{line}").unwrap();
    }
}

fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Bytes the standby has received but not replayed.
fn replay_gap(c: &Cluster) -> i64 {
    c.psql(
        Node::Standby,
        "SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint",
    )
    .parse()
    .unwrap()
}

#[test]
fn shared_standby_streams_from_the_primary_through_its_slot() {
    let c = shared();
    c.wait_streaming();
    assert_eq!(c.psql(Node::Primary, "SELECT pg_is_in_recovery()"), "f");
    assert_eq!(c.psql(Node::Standby, "SELECT pg_is_in_recovery()"), "t");
    assert_eq!(
        c.psql(
            Node::Primary,
            &format!("SELECT active FROM pg_replication_slots WHERE slot_name = '{STANDBY_SLOT}'")
        ),
        "t"
    );
    assert_eq!(c.psql(Node::Primary, "SELECT current_user"), "postgres");
    assert!(c.primary_port() != c.standby_port());
    assert!(
        c.primary_dsn()
            .contains(&format!("port={}", c.primary_port()))
    );
    assert!(
        c.primary_socket_dir()
            .join(format!(".s.PGSQL.{}", c.primary_port()))
            .exists()
    );
}

#[test]
fn row_written_on_the_primary_appears_on_the_standby() {
    let c = shared();
    let table = format!("vigil_it_row_{}", fastrand::u64(..));
    c.psql(
        Node::Primary,
        &format!("CREATE TABLE {table}(v text); INSERT INTO {table} VALUES ('hello');"),
    );
    poll(PG_WAIT, "the row on the standby", || {
        c.try_psql(Node::Standby, &format!("SELECT v FROM {table}"))
            .ok()
            .filter(|v| v == "hello")
    });
    c.psql(Node::Primary, &format!("DROP TABLE {table}"));
}

#[test]
fn paused_replay_grows_the_received_but_unreplayed_wal() {
    let c = Cluster::start(ClusterOptions::default());
    c.pause_replay();
    let before = replay_gap(&c);
    c.write_wal(4);
    let gap = poll(PG_WAIT, "4 MiB received but not replayed", || {
        let gap = replay_gap(&c);
        (gap >= before + 3 * 1024 * 1024).then_some(gap)
    });
    assert!(gap < 64 * 1024 * 1024, "gap {gap}");
    c.resume_replay();
    poll(PG_WAIT, "replay to catch up", || {
        (replay_gap(&c) == 0).then_some(())
    });
    c.wait_replayed();
}

#[test]
fn standby_stops_and_starts_again() {
    let c = Cluster::start(ClusterOptions {
        slot: false,
        ..ClusterOptions::default()
    });
    let port = c.standby_port();
    c.stop_standby();
    assert!(c.try_psql(Node::Standby, "SELECT 1").is_err());
    poll(PG_WAIT, "the primary to lose its standby", || {
        (c.psql(Node::Primary, "SELECT count(*) FROM pg_stat_replication") == "0").then_some(())
    });
    c.write_wal(1);
    c.start_standby();
    assert_eq!(c.standby_port(), port);
    c.wait_streaming();
    c.wait_replayed();
}

#[test]
fn archiving_puts_completed_segments_in_the_archive_dir() {
    let c = Cluster::start(ClusterOptions {
        standby: false,
        ..ClusterOptions::default()
    });
    c.psql(Node::Primary, "CREATE TABLE t(); ");
    let segment = c.switch_wal();
    let path = c.archive_dir().join(&segment);
    poll(PG_WAIT, "the segment in the archive", || {
        path.exists().then_some(())
    });
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        16 * 1024 * 1024,
        "{segment}"
    );
}

#[test]
fn a_failing_archive_command_is_counted_by_the_archiver() {
    let c = Cluster::start(ClusterOptions {
        standby: false,
        archive_command: Some("false".into()),
        extra_conf: vec!["max_connections = 20".into()],
        ..ClusterOptions::default()
    });
    assert_eq!(c.psql(Node::Primary, "SHOW max_connections"), "20");
    c.psql(Node::Primary, "CREATE TABLE t();");
    c.switch_wal();
    poll(PG_WAIT, "an archive failure", || {
        let failed = c
            .psql(Node::Primary, "SELECT failed_count FROM pg_stat_archiver")
            .parse::<i64>()
            .unwrap();
        (failed > 0).then_some(())
    });
    assert_eq!(std::fs::read_dir(c.archive_dir()).unwrap().count(), 0);
}

#[test]
fn dropping_a_cluster_stops_its_servers_and_removes_its_dir() {
    let c = Cluster::start(ClusterOptions::default());
    let dir = c.dir().to_path_buf();
    let pids: Vec<i32> = [Node::Primary, Node::Standby]
        .iter()
        .map(|&n| {
            let pidfile = std::fs::read_to_string(c.data_dir(n).join("postmaster.pid")).unwrap();
            pidfile.lines().next().unwrap().trim().parse().unwrap()
        })
        .collect();
    drop(c);
    assert!(!dir.exists(), "{} left behind", dir.display());
    for pid in pids {
        poll(Duration::from_secs(5), "the postmaster to exit", || {
            (!is_live_postgres(pid)).then_some(())
        });
    }
}

/// Whether `pid` is a live (not zombie) process named `postgres`. A stopped postmaster
/// stays a zombie until PID 1 reaps it, which some container inits do lazily.
fn is_live_postgres(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let state = stat[close + 1..].trim_start().chars().next();
    &stat[open + 1..close] == "postgres" && state != Some('Z')
}
