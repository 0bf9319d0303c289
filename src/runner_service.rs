//! `vigil runner`: the small privileged helper that runs a program as another user on the
//! agent's behalf (CONTRACT.md, "Privileges").
//!
//! # Design
//! The agent runs unprivileged (the `vigil` user, no capabilities). A remediation or a
//! program-running check whose `run_as` names another user is sent to this runner, which
//! runs as root in its own unit:
//! - it reads the SAME config file as the agent, and refuses to start unless that file
//!   (and its directory) is owned by root and not writable by group or others: the file is
//!   the allow-list, so only root may write it ([`load_config`]);
//! - it listens on a Unix socket (default [`DEFAULT_SOCKET`], mode 0660, group = the agent user's group, or a socket
//!   handed over by systemd) and answers a connection only when SO_PEERCRED says the peer
//!   is the agent's uid; everyone else (root included: root needs no runner) gets an
//!   error answer and a logged warning;
//! - one JSON request per connection, at most [`MAX_REQUEST`] bytes, versioned
//!   ([`PROTOCOL_VERSION`]), unknown fields refused ([`WireRequest`]); the answer is one
//!   JSON line, the [`Outcome`] or `{"error": "..."}` ([`Answer`]);
//! - `op = "remediation"`: `[remediation.NAME]` is looked up in the runner's own config;
//!   the runner runs [`guard::seal`] itself (its own pinned hash, owner and mode rules, as
//!   root: the script must be owned by root) and executes the sealed bytes as `run_as`
//!   (the agent's user when unset) with only the `VIGIL_*` variables of the contract from
//!   the request; one remediation at a time;
//! - `op = "check"`: `[check.KIND.NAME]` is looked up in the runner's config, the check
//!   is built from it and its program request ([`crate::checks::AnyCheck::program_request`])
//!   is run as `run_as` (the agent's user when unset).
//!
//! # Threat model
//! A compromised agent (anything running as the agent's uid) can connect and ask. It can
//! make the runner run, as their configured users, exactly the programs root wrote in the
//! config: an approved remediation (only bytes hashing to root's pinned SHA-256, owned by
//! root), or a check's command line with root's arguments and environment. It controls
//! only *when* they run and the values of the `VIGIL_*` variables (data, bounded by the
//! request size; a script must treat them as untrusted input). It cannot send an argv, a
//! path, a user, a timeout or another variable; it cannot bypass the remediation's own
//! hash or ownership check; it cannot run two remediations at once. It can ask often: the
//! cooldowns and budgets live in the agent, so a compromised agent can repeat an approved
//! remediation (rate limits in the runner are future work). Connections are bounded
//! ([`MAX_CONNECTIONS`]) and a slow writer is cut after [`READ_TIMEOUT`]. A garbage
//! request gets an error answer, never a panic. A program whose client went away (the
//! agent's check timed out) still runs to its own timeout from the runner's config.
//!
//! Other local users cannot connect (socket mode and SO_PEERCRED), and cannot change what
//! runs (the config and the scripts are root's, checked at start and at each run).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{self, Config, ConfigError};
use crate::remediation::guard;
use crate::runner::{Outcome, Request, RunError, Runner};

/// The protocol version this runner speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest request accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// The runner's socket when `--socket` is not given.
///
/// Not under the agent's `/run/vigil`: each unit has its own `RuntimeDirectory`, and
/// systemd removes a unit's runtime directory when that unit stops.
pub const DEFAULT_SOCKET: &str = "/run/vigil-runner/runner.sock";
/// The agent's user when `--agent-user` is not given.
pub const DEFAULT_AGENT_USER: &str = "vigil";
/// The only variables a remediation request may carry (CONTRACT.md, "Remediation
/// guardrails"); the runner adds `PATH`.
pub const REMEDIATION_ENV: &[&str] = &[
    "VIGIL_CHECK",
    "VIGIL_STATUS",
    "VIGIL_VALUE",
    "VIGIL_MESSAGE",
    "VIGIL_HOST_ID",
    "VIGIL_RUN_ID",
    "VIGIL_DRY_RUN",
];
/// Requests served at the same time; more connections get a `busy` answer. A handful is
/// plenty: the agent runs one remediation at a time and a few checks.
pub const MAX_CONNECTIONS: usize = 8;
/// How long a client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One request, as sent on the socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireRequest {
    /// [`PROTOCOL_VERSION`].
    pub v: u32,
    /// What to run.
    pub op: Op,
    /// The `[remediation.NAME]` or the check's NAME.
    pub name: String,
    /// `VIGIL_*` variables for a remediation; must be empty for a check.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Run an approved remediation.
    Remediation,
    /// Run a program-running check's program.
    Check,
}

/// The answer: one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    /// Refused, or could not run; the message starts with a stable keyword.
    Error {
        /// `keyword: detail`.
        error: String,
    },
    /// The program ran (whatever its exit).
    Ran(Outcome),
}

/// Why a request was not run. The `Display` starts with a stable keyword.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Not JSON, too large, unknown fields, or an unsupported version.
    #[error("bad_request: {0}")]
    Bad(String),
    /// The peer is not the agent's user (`None`: its credentials could not be read).
    #[error("forbidden: peer uid {} is not the agent's user", .0.map_or_else(|| "unknown".to_string(), |u| u.to_string()))]
    Forbidden(Option<u32>),
    /// Too many connections at once.
    #[error("busy: {MAX_CONNECTIONS} requests are already being served")]
    Busy,
    /// The name is not in the runner's config.
    #[error("unknown: no {what} named {name:?} in the runner's config")]
    Unknown {
        /// `[remediation.NAME]` or `check`.
        what: &'static str,
        /// The name asked for.
        name: String,
    },
    /// Configured with `enabled = false`.
    #[error("disabled: {0:?} has enabled = false")]
    Disabled(String),
    /// An environment variable outside [`REMEDIATION_ENV`].
    #[error("bad_env: {0:?} is not one of the VIGIL_* variables a remediation gets")]
    Env(String),
    /// The check does not run a program.
    #[error("not_a_program: check {0:?} does not run a program")]
    NotProgram(String),
    /// `[automation].dry_run` is set in the runner's config.
    #[error("dry_run: [automation].dry_run is set; nothing runs")]
    DryRun,
    /// The guard refused the script.
    #[error("guard: {0}")]
    Guard(guard::Refusal),
    /// The program could not be started.
    #[error("run: {0}")]
    Run(RunError),
}

/// The runner's state: its config and who may ask.
#[derive(Debug)]
pub struct Service {
    /// Swapped whole on SIGHUP (a request in progress keeps the config it started with).
    config: arc_swap::ArcSwap<Config>,
    /// The only uid answered.
    agent_uid: u32,
    /// `run_as` when a program names none (never root by default).
    agent_user: String,
    runner: Runner,
    /// One remediation at a time, also when the agent (compromised) asks for more.
    one_remediation: tokio::sync::Mutex<()>,
}

impl Service {
    /// A service answering `agent_user` (uid `agent_uid`) from `config`.
    pub fn new(config: Config, agent_user: String, agent_uid: u32) -> Self {
        Service {
            config: arc_swap::ArcSwap::from_pointee(config),
            agent_uid,
            agent_user,
            runner: Runner::in_process(),
            one_remediation: tokio::sync::Mutex::new(()),
        }
    }

    /// Replaces the config (SIGHUP): requests from now on are looked up in `config`.
    pub fn reload(&self, config: Config) {
        self.config.store(Arc::new(config));
    }

    /// Runs a parsed request.
    ///
    /// # Errors
    /// A [`RequestError`] saying why it was not run.
    pub async fn handle(&self, req: WireRequest) -> Result<Outcome, RequestError> {
        if req.v != PROTOCOL_VERSION {
            return Err(RequestError::Bad(format!(
                "protocol version {} (this runner speaks {PROTOCOL_VERSION})",
                req.v
            )));
        }
        match req.op {
            Op::Remediation => self.remediation(&req.name, req.env).await,
            Op::Check => self.check(&req.name, &req.env).await,
        }
    }

    async fn remediation(
        &self,
        name: &str,
        env: BTreeMap<String, String>,
    ) -> Result<Outcome, RequestError> {
        let config = self.config.load_full();
        let spec = config
            .remediation
            .get(name)
            .ok_or_else(|| RequestError::Unknown {
                what: "[remediation.NAME]",
                name: name.to_string(),
            })?;
        if spec.enabled == Some(false) {
            return Err(RequestError::Disabled(name.to_string()));
        }
        if let Some(bad) = env.keys().find(|k| !REMEDIATION_ENV.contains(&k.as_str())) {
            return Err(RequestError::Env(bad.clone()));
        }
        if config.automation.dry_run {
            return Err(RequestError::DryRun);
        }
        let _one = self.one_remediation.lock().await;
        // The runner's own guard, with its own uid (root): the script must be root's.
        let sealed = guard::seal(
            &config.automation.dir,
            &spec.script,
            &spec.sha256,
            nix::unistd::geteuid().as_raw(),
        )
        .map_err(RequestError::Guard)?;
        let mut argv = vec![spec.script.display().to_string()];
        argv.extend(spec.args.iter().cloned());
        let mut req = Request::new(argv, spec.timeout.get());
        req.run_as = Some(self.run_as(spec.run_as.as_deref()));
        req.env = env.into_iter().collect();
        info!(remediation = name, sha256 = %sealed.sha256, run_as = ?req.run_as, "runner: running a remediation");
        self.runner
            .run_sealed(&req, &sealed.fd)
            .await
            .map_err(RequestError::Run)
    }

    async fn check(
        &self,
        name: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<Outcome, RequestError> {
        if let Some(k) = env.keys().next() {
            return Err(RequestError::Env(k.clone()));
        }
        let unknown = || RequestError::Unknown {
            what: "check",
            name: name.to_string(),
        };
        let config = self.config.load_full();
        let (_, spec) = config
            .check
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(unknown)?;
        let common = spec.common(config.agent.interval);
        if !common.enabled {
            return Err(RequestError::Disabled(name.to_string()));
        }
        let mut req = spec
            .build(&common)
            .program_request()
            .ok_or_else(|| RequestError::NotProgram(name.to_string()))?;
        req.run_as = Some(self.run_as(req.run_as.as_deref()));
        info!(check = name, argv0 = ?req.argv.first(), run_as = ?req.run_as, "runner: running a check's program");
        self.runner.run(&req).await.map_err(RequestError::Run)
    }

    /// The user a program runs as: its `run_as`, else the agent's user (never root by
    /// omission).
    fn run_as(&self, configured: Option<&str>) -> String {
        configured.unwrap_or(&self.agent_user).to_string()
    }
}

/// Why the runner cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config file cannot be read, or the socket or signals cannot be set up.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file (or its directory) may be written by someone other than root.
    #[error("{0}")]
    Unsafe(String),
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The agent's user does not exist.
    #[error("--agent-user {0:?}: {1}")]
    AgentUser(String, String),
}

impl StartError {
    /// The exit code: 78 for a config the runner will not trust or parse.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Io { .. } => crate::exit::FAILURE,
            _ => crate::exit::CONFIG,
        }
    }
}

/// Reads and validates the runner's config. The file is opened once and checked on the
/// open file (owner root, not writable by group or others), as is its directory (owned by
/// root, not writable by group or others, so nobody else can swap the file); then exactly
/// the bytes read are parsed.
///
/// # Errors
/// [`StartError`] naming the file and why.
pub fn load_config(path: &Path) -> Result<Config, StartError> {
    let read_err = |source| StartError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    root_only("config file", path, meta.uid(), meta.mode())?;
    let real = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&file)
    ))
    .map_err(read_err)?;
    if let Some(dir) = real.parent() {
        let d = std::fs::metadata(dir).map_err(read_err)?;
        root_only("directory", dir, d.uid(), d.mode())?;
    }
    let mut doc = String::new();
    file.read_to_string(&mut doc).map_err(read_err)?;
    Ok(config::parse(path, &doc)?)
}

fn root_only(what: &str, path: &Path, uid: u32, mode: u32) -> Result<(), StartError> {
    if uid != 0 {
        return Err(StartError::Unsafe(format!(
            "{what} {} is owned by uid {uid}; the runner's config is its allow-list and must be owned by root",
            path.display()
        )));
    }
    if mode & 0o022 != 0 {
        return Err(StartError::Unsafe(format!(
            "{what} {} is writable by group or others (mode {:04o}); chmod go-w",
            path.display(),
            mode & 0o7777
        )));
    }
    Ok(())
}

/// The uid and primary gid of `user`.
///
/// # Errors
/// [`StartError::AgentUser`] when it cannot be looked up.
pub fn agent_ids(user: &str) -> Result<(u32, u32), StartError> {
    match nix::unistd::User::from_name(user) {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        Ok(None) => Err(StartError::AgentUser(user.into(), "no such user".into())),
        Err(e) => Err(StartError::AgentUser(user.into(), e.to_string())),
    }
}

/// Runs `vigil runner` until SIGTERM or SIGINT: binds `socket` (mode 0660, owned by root
/// and the agent user's group), answers the agent user's requests. SIGHUP reads `path`
/// again (with the same ownership rules); a config that fails is logged and the old one
/// stays, as in the agent.
///
/// The runner binds its socket itself rather than taking one from systemd's socket
/// activation: adopting an inherited descriptor needs `unsafe` (`OwnedFd::from_raw_fd`),
/// and the crate keeps its one `unsafe` block in [`crate::runner`]; ordering the agent's
/// unit after the runner's gives the same guarantee.
///
/// # Errors
/// [`StartError`]: the agent user is unknown, or the socket cannot be set up.
pub async fn run(
    config: Config,
    path: &Path,
    socket: &Path,
    agent_user: &str,
) -> Result<(), StartError> {
    let (uid, gid) = agent_ids(agent_user)?;
    let listener = bind(socket, gid)?;
    let service = Arc::new(Service::new(config, agent_user.to_string(), uid));
    let cancel = CancellationToken::new();
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        let sig_err = |source| StartError::Io {
            path: socket.to_path_buf(),
            source,
        };
        let mut term = signal(SignalKind::terminate()).map_err(sig_err)?;
        let mut int = signal(SignalKind::interrupt()).map_err(sig_err)?;
        let mut hup = signal(SignalKind::hangup()).map_err(sig_err)?;
        let cancel = cancel.clone();
        let (service, path) = (service.clone(), path.to_path_buf());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => { info!("SIGTERM: stopping"); break; }
                    _ = int.recv() => { info!("SIGINT: stopping"); break; }
                    _ = hup.recv() => match load_config(&path) {
                        Ok(c) => {
                            service.reload(c);
                            info!(config = %path.display(), "SIGHUP: config reloaded");
                            crate::systemd::reloaded("config reloaded");
                        }
                        Err(e) => {
                            tracing::error!(config = %path.display(), error = %e, "SIGHUP: config refused; the old one stays");
                            crate::systemd::reloaded("config refused; the old one stays");
                        }
                    },
                }
            }
            cancel.cancel();
        })
    };
    info!(socket = %socket.display(), agent_user, agent_uid = uid, "runner: listening");
    crate::systemd::ready(&format!("answering uid {uid} on {}", socket.display()));
    serve(listener, service, cancel).await;
    signals.abort();
    crate::systemd::stopping();
    // Leave no socket behind that a later agent would connect to in vain.
    let _ = std::fs::remove_file(socket);
    Ok(())
}

/// Binds the socket: a stale socket file is replaced (anything else at the path is
/// refused), then the file gets mode 0660 and group `gid`. The moment between bind and
/// chmod is harmless: a peer that connects then is still checked by SO_PEERCRED.
fn bind(path: &Path, gid: u32) -> Result<UnixListener, StartError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |source| StartError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => {
            return Err(StartError::Unsafe(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::os::unix::fs::chown(path, Some(0), Some(gid)).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

/// Serves requests on `listener` until `cancel`, then waits for the runs in progress
/// (each ends by its own timeout).
pub async fn serve(listener: UnixListener, service: Arc<Service>, cancel: CancellationToken) {
    let tracker = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { crate::http::accept_error(e).await; continue; }
            },
        };
        let service = service.clone();
        // Taken before the spawn, held by the task until the connection is done.
        let permit = limit.clone().try_acquire_owned().ok();
        tracker.spawn(async move {
            let admitted = permit.is_some();
            connection(stream, &service, admitted).await;
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Serves one connection: reads one request, checks the peer, answers.
///
/// The request is read (bounded) also from a peer that is refused, so that its client
/// reads the error answer rather than a reset connection; it is parsed only for the
/// agent's user.
async fn connection(mut stream: UnixStream, service: &Service, admitted: bool) {
    let (uid, pid) = match stream.peer_cred() {
        Ok(c) => (Some(c.uid()), c.pid()),
        Err(_) => (None, None),
    };
    let line = read_line(&mut stream).await;
    let answer = if uid != Some(service.agent_uid) {
        warn!(peer_uid = ?uid, peer_pid = ?pid, "runner: refusing a peer that is not the agent's user");
        Err(RequestError::Forbidden(uid))
    } else if !admitted {
        warn!("runner: too many requests at once; refusing one");
        Err(RequestError::Busy)
    } else {
        match line.and_then(|l| parse_request(&l)) {
            Ok(req) => {
                let (op, name) = (req.op, req.name.clone());
                let r = service.handle(req).await;
                match &r {
                    Ok(o) => {
                        info!(?op, name = %name, peer_pid = ?pid, exit = ?o.exit, "runner: request served")
                    }
                    Err(e) => {
                        warn!(?op, name = %name, peer_pid = ?pid, error = %e, "runner: request refused")
                    }
                }
                r
            }
            Err(e) => {
                warn!(peer_pid = ?pid, error = %e, "runner: bad request");
                Err(e)
            }
        }
    };
    let answer = match answer {
        Ok(o) => Answer::Ran(o),
        Err(e) => Answer::Error {
            error: e.to_string(),
        },
    };
    if let Err(e) = write_answer(&mut stream, &answer).await {
        warn!(error = %e, "runner: the answer could not be sent");
    }
}

/// Reads one request line: up to a newline or the end of the stream, at most
/// [`MAX_REQUEST`] bytes kept, within [`READ_TIMEOUT`].
///
/// The bytes of an oversized request are read on (and dropped) up to its newline, so that
/// the client reads the error answer instead of a connection reset: closing a socket that
/// still holds unread input resets it.
async fn read_line(stream: &mut UnixStream) -> Result<Vec<u8>, RequestError> {
    let mut buf = Vec::with_capacity(1024);
    let mut oversized = false;
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            let got = &chunk[..n];
            if !oversized {
                buf.extend_from_slice(got);
                oversized = buf.len() > MAX_REQUEST;
            }
            if got.contains(&b'\n') {
                return Ok(());
            }
        }
    })
    .await;
    if oversized {
        return Err(RequestError::Bad(format!(
            "the request is larger than {MAX_REQUEST} bytes"
        )));
    }
    match read {
        Err(_) => Err(RequestError::Bad(format!(
            "no complete request within {}",
            humantime::format_duration(READ_TIMEOUT)
        ))),
        Ok(Err(e)) => Err(RequestError::Bad(format!("reading the request: {e}"))),
        Ok(Ok(())) => Ok(buf),
    }
}

/// Parses the first line of `buf` as a [`WireRequest`].
fn parse_request(buf: &[u8]) -> Result<WireRequest, RequestError> {
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    serde_json::from_slice(line).map_err(|e| RequestError::Bad(e.to_string()))
}

async fn write_answer(stream: &mut UnixStream, answer: &Answer) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(answer).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    stream.shutdown().await
}

/// Sends `req` to the runner at `socket` and waits for its answer (the agent's side).
///
/// # Errors
/// The socket cannot be reached, or the answer is not one.
pub async fn ask(socket: &Path, req: &WireRequest) -> std::io::Result<Answer> {
    let mut stream = UnixStream::connect(socket).await?;
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    let mut buf = Vec::new();
    // The answer carries at most two capped streams plus a little JSON; bound the read
    // anyway, as the runner's socket could be anything.
    (&mut stream).take(ANSWER_MAX).read_to_end(&mut buf).await?;
    serde_json::from_slice(&buf).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the runner's answer: {e}"),
        )
    })
}

/// The largest answer read: two 4 MiB streams JSON-encoded as arrays of numbers (up to
/// four bytes per byte) plus room.
const ANSWER_MAX: u64 = 40 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let r: WireRequest = serde_json::from_str(
            r#"{"v":1,"op":"remediation","name":"x","env":{"VIGIL_CHECK":"c"}}"#,
        )
        .unwrap();
        assert_eq!(r.op, Op::Remediation);
        assert_eq!(r.env["VIGIL_CHECK"], "c");
        let r: WireRequest = serde_json::from_str(r#"{"v":1,"op":"check","name":"y"}"#).unwrap();
        assert!(r.env.is_empty());
        // An argv is not part of the protocol.
        assert!(
            serde_json::from_str::<WireRequest>(r#"{"v":1,"op":"check","name":"y","argv":["sh"]}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<WireRequest>(r#"{"v":1,"op":"exec","name":"y"}"#).is_err());
    }

    #[test]
    fn answers_round_trip() {
        let e = Answer::Error {
            error: "unknown: x".into(),
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"error":"unknown: x"}"#);
        assert_eq!(serde_json::from_str::<Answer>(&s).unwrap(), e);
        let o = Answer::Ran(Outcome {
            exit: crate::runner::Exit::Code(3),
            stdout: b"hi".to_vec(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            duration: Duration::from_millis(7),
        });
        let back: Answer = serde_json::from_str(&serde_json::to_string(&o).unwrap()).unwrap();
        assert_eq!(back, o);
    }

    #[tokio::test]
    async fn a_remediation_env_outside_vigil_is_refused_and_versions_are_checked() {
        let svc = Service::new(Config::default(), "nobody".into(), 65534);
        let mut env = BTreeMap::new();
        env.insert("LD_PRELOAD".to_string(), "/tmp/x.so".to_string());
        let bad_version = WireRequest {
            v: 2,
            op: Op::Check,
            name: "x".into(),
            env: BTreeMap::new(),
        };
        let e = svc.handle(bad_version).await.unwrap_err().to_string();
        assert!(e.starts_with("bad_request: protocol version 2"), "{e}");
        let unknown = WireRequest {
            v: 1,
            op: Op::Remediation,
            name: "nope".into(),
            env: env.clone(),
        };
        let e = svc.handle(unknown).await.unwrap_err().to_string();
        assert!(e.starts_with("unknown: "), "{e}");
    }

    #[test]
    fn only_root_may_own_or_write_the_allow_list() {
        let p = Path::new("/etc/vigil/vigil.toml");
        assert!(root_only("config file", p, 0, 0o100644).is_ok());
        let e = root_only("config file", p, 1000, 0o100600)
            .unwrap_err()
            .to_string();
        assert!(e.contains("owned by uid 1000"), "{e}");
        let e = root_only("config file", p, 0, 0o100664)
            .unwrap_err()
            .to_string();
        assert!(e.contains("mode 0664"), "{e}");
    }
}
