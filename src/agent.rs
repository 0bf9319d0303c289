//! The composition root of `vigil agent`: opens everything that can fail, then runs the
//! scheduler and the API until SIGTERM or SIGINT.
//!
//! Startup order: state directory, persisted lifecycle, TCP listener, admin socket (all
//! failures here end the agent with a clear error), then the check tasks, the servers,
//! the heartbeat task, and READY=1 once the first round of checks has run. SIGTERM stops
//! the checks, sends a last heartbeat (bounded), then exits. SIGHUP reloads the config: an
//! invalid file is refused and shown in `/health` while the old config keeps running.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::alarm::Alarm;
use crate::checks::CheckContext;
use crate::config::{self, Config};
use crate::heartbeat::delivery;
use crate::http::{self, ApiState};
use crate::lifecycle;
use crate::remediation::Engine;
use crate::scheduler::Scheduler;
use crate::state::{Shared, Snapshot};
use crate::systemd;
use crate::telemetry::LevelHandle;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state directory cannot be created or written.
    #[error("state directory {} ([agent].state_dir): {source}{}", path.display(), state_dir_hint(source))]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The persisted lifecycle is unreadable.
    #[error(transparent)]
    Lifecycle(#[from] lifecycle::LifecycleError),
    /// A listener could not be opened.
    #[error("{what} {addr}: {source}")]
    Listen {
        /// "listening on" / "admin socket".
        what: &'static str,
        /// The address or path.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// What to do about a state directory the agent may not write: under the packaged unit
/// only `/var/lib/vigil` is writable (`ProtectSystem=strict`, `StateDirectory=vigil`), so a
/// `state_dir` elsewhere fails with a read-only file system, not with a missing directory.
fn state_dir_hint(e: &std::io::Error) -> &'static str {
    if state_dir_is_misconfigured(e) {
        "; the agent's user must be able to create and write it (under the packaged \
             unit only /var/lib/vigil is writable: keep state_dir there, or add the \
             directory to ReadWritePaths= in a drop-in)"
    } else {
        ""
    }
}

/// Whether creating or writing the state directory failed for a reason the config must
/// fix: read-only, no permission, or a path through a file.
fn state_dir_is_misconfigured(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EROFS | Errno::EACCES | Errno::EPERM | Errno::ENOTDIR)
    )
}

impl AgentError {
    /// The sysexits code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            // A state_dir the agent may never write (read-only, not its own, not a
            // directory) is the config's fault, and a restart cannot fix it: 78, which
            // the unit's RestartPreventExitStatus= stops on. Anything else (a full disk,
            // an I/O error, another agent holding the lock) may pass: 73, restarted.
            AgentError::StateDir { source, .. } if state_dir_is_misconfigured(source) => {
                crate::exit::CONFIG
            }
            AgentError::StateDir { .. } | AgentError::Lifecycle(_) => crate::exit::CANTCREAT,
            AgentError::Listen { .. } => crate::exit::UNAVAILABLE,
            AgentError::Signals(_) => crate::exit::SOFTWARE,
        }
    }
}

/// The lock file in `state_dir` an agent holds while it runs (`vigil image prep` checks it).
pub const LOCK_FILE: &str = "agent.lock";

/// Opens the state directory (mode 0700), creating it when missing, proves it writable,
/// and locks it: two agents on one state directory would hand out the same heartbeat
/// `seq` values, so the second one stops here.
fn open_state_dir(dir: &Path) -> Result<Flock<std::fs::File>, AgentError> {
    let err = |source| AgentError::StateDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    // A crash between a state file's temp write and its rename leaves the temp behind.
    for d in [dir.to_path_buf(), dir.join("audit")] {
        let n = crate::durable::remove_stale_temps(&d);
        if n > 0 {
            tracing::info!(dir = %d.display(), files = n, "removed temp files left by a crash");
        }
    }
    let probe = dir.join(".write-probe");
    crate::durable::write_atomic(&probe, b"").map_err(err)?;
    std::fs::remove_file(&probe).map_err(err)?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(LOCK_FILE))
        .map_err(err)?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == Errno::EWOULDBLOCK {
            err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "another vigil agent is running with this state directory",
            ))
        } else {
            err(errno.into())
        }
    })
}

/// Binds the admin socket with mode 0600. A socket file left by a crashed agent is
/// replaced; one that a running agent still answers on is an error, not stolen.
async fn bind_admin(path: &Path) -> Result<UnixListener, AgentError> {
    let err = |source| AgentError::Listen {
        what: "admin socket",
        addr: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(err)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another agent is answering on this socket",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

fn summary(snap: &Snapshot) -> String {
    let tripped: Vec<&str> = snap
        .checks
        .iter()
        .filter(|c| c.hysteresis.tripped)
        .map(|c| c.name.as_str())
        .collect();
    let mut s = format!("{}: {} checks", snap.state(), snap.checks.len());
    if tripped.is_empty() {
        s.push_str(", none tripped");
    } else {
        s.push_str(&format!(", tripped: {}", tripped.join(", ")));
    }
    if snap.config_error.is_some() {
        s.push_str("; config reload refused");
    }
    s
}

/// Runs the agent until SIGTERM/SIGINT.
///
/// # Errors
/// Startup failures only; once running, errors are logged and the agent carries on.
pub async fn run(
    config_path: PathBuf,
    mut config: Config,
    level: Option<LevelHandle>,
) -> Result<(), AgentError> {
    for w in config.secret_warnings(&config_path) {
        warn!("{w}");
    }
    // Held until the agent exits; the kernel releases it even after a kill -9.
    let _state_lock = open_state_dir(&config.agent.state_dir)?;
    let lifecycle = lifecycle::load(&config.agent.state_dir, config.agent.initial_lifecycle)?;

    let tcp =
        crate::http::slots::listen_tcp(config.api.listen).map_err(|source| AgentError::Listen {
            what: "listening on",
            addr: config.api.listen.to_string(),
            source,
        })?;
    let admin = bind_admin(&config.api.admin_socket).await?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(AgentError::Signals)?;

    let shared = Arc::new(Shared::new(Snapshot {
        checks: Vec::new(),
        lifecycle,
        config_error: None,
        first_round_done: false,
    }));
    let shutdown = CancellationToken::new();
    let cx = CheckContext::host();
    let remediation =
        Engine::open(Arc::new(config.clone()), shared.clone(), cx.clone()).map_err(|source| {
            AgentError::StateDir {
                path: config.agent.state_dir.join("audit"),
                source,
            }
        })?;
    let mut scheduler = Scheduler::new(
        shared.clone(),
        cx,
        config.agent.max_concurrent_checks,
        shutdown.child_token(),
    );
    scheduler.apply(&config);

    let heartbeat_status = Arc::new(delivery::Status::new(config.heartbeat.is_some()));
    let api = Arc::new(ApiState {
        shared: shared.clone(),
        state_dir: config.agent.state_dir.clone(),
        heartbeat: heartbeat_status.clone(),
        remediation: Some(remediation.clone()),
    });
    let servers = tokio_util::task::TaskTracker::new();
    // Started after the scheduler's first apply, so the first trips are seen as edges.
    remediation.start(&servers, shutdown.child_token());
    servers.spawn(http::serve_tcp(
        tcp,
        api.clone(),
        config.api.allow.clone(),
        config.api.max_connections,
        shutdown.clone(),
    ));
    servers.spawn(http::serve_unix(
        admin,
        api,
        config.api.max_connections,
        shutdown.clone(),
    ));
    servers.close();
    info!(listen = %config.api.listen, admin_socket = %config.api.admin_socket.display(), checks = shared.load().checks.len(), "agent started");
    let mut heartbeat = delivery::Handle::start(
        &config,
        shared.clone(),
        heartbeat_status.clone(),
        Some(remediation.clone()),
    );
    if heartbeat.is_none() {
        info!("no [heartbeat] configured: no heartbeats are sent");
    }

    let first_round = scheduler.first_round();
    tokio::pin!(first_round);
    let mut ready = false;
    let watchdog = systemd::watchdog_period();
    // The tick feeds systemd (WATCHDOG=1, STATUS=); with nobody listening it is not run,
    // and an idle agent is not woken for it.
    let supervised = systemd::supervised();
    let period = watchdog
        .map_or(Duration::from_secs(10), |p| p / 2)
        .min(Duration::from_secs(10));
    let mut alarm = Alarm::new();
    let mut next_tick = Instant::now() + period;
    let mut last_status = String::new();

    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => {
                reload(&config_path, &mut config, &mut scheduler, &shared, level.as_ref());
                remediation.apply(Arc::new(config.clone()));
                let restart = heartbeat
                    .as_ref()
                    .map_or(config.heartbeat.is_some(), |h| h.differs(&config));
                if restart {
                    if let Some(h) = heartbeat.take() {
                        h.stop(false).await;
                    }
                    heartbeat_status.set_enabled(config.heartbeat.is_some());
                    heartbeat = delivery::Handle::start(
                        &config,
                        shared.clone(),
                        heartbeat_status.clone(),
                        Some(remediation.clone()),
                    );
                    info!(enabled = heartbeat.is_some(), "heartbeat settings changed; delivery restarted");
                }
                let s = summary(&shared.load());
                systemd::reloaded(&s);
                last_status = s;
            }
            _ = &mut first_round, if !ready => {
                ready = true;
                let s = summary(&shared.load());
                info!(status = %s, "first round of checks done; ready");
                systemd::ready(&s);
                last_status = s;
            }
            _ = alarm.sleep_until(next_tick), if supervised => {
                next_tick = Instant::now() + period;
                let snap = shared.load();
                // WATCHDOG=1 only while every check is being run on schedule: a wedged
                // scheduler gets the agent restarted instead of serving old answers.
                if watchdog.is_some() && snap.is_live(Instant::now()) {
                    systemd::watchdog();
                }
                let s = summary(&snap);
                if ready && s != last_status {
                    systemd::status(&s);
                    last_status = s;
                }
            }
        }
    }

    systemd::stopping();
    shutdown.cancel();
    scheduler.stop().await;
    if let Some(h) = heartbeat.take() {
        h.stop(true).await;
    }
    servers.wait().await;
    if let Err(e) = std::fs::remove_file(&config.api.admin_socket) {
        warn!(error = %e, "removing the admin socket");
    }
    info!("stopped");
    Ok(())
}

/// Reloads the config from `path`. Checks and remediations take effect at once; keys that
/// need a restart keep their running values and say so.
fn reload(
    path: &Path,
    running: &mut Config,
    scheduler: &mut Scheduler,
    shared: &Shared,
    level: Option<&LevelHandle>,
) {
    let mut new = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            let msg = e.to_string().replace('\n', "; ");
            error!(error = %msg, "config reload refused; the running config stays in force");
            shared.update(|s| s.config_error = Some(msg));
            return;
        }
    };
    for w in new.secret_warnings(path) {
        warn!("{w}");
    }
    let mut needs_restart = Vec::new();
    if new.api != running.api {
        needs_restart.push("[api]");
        new.api = running.api.clone();
    }
    if new.agent.state_dir != running.agent.state_dir {
        needs_restart.push("agent.state_dir");
        new.agent.state_dir = running.agent.state_dir.clone();
    }
    if new.agent.max_concurrent_checks != running.agent.max_concurrent_checks {
        needs_restart.push("agent.max_concurrent_checks");
        new.agent.max_concurrent_checks = running.agent.max_concurrent_checks;
    }
    if new.log.format != running.log.format || new.log.file != running.log.file {
        needs_restart.push("log.format/log.file");
        new.log.format = running.log.format;
        new.log.file = running.log.file.clone();
    }
    if !needs_restart.is_empty() {
        warn!(keys = %needs_restart.join(", "), "these changes take effect only after a restart");
    }
    if let Some(h) = level {
        if let Err(e) = h.set(&new.log.level) {
            warn!(error = %e, "log level not changed");
        }
    }
    let (added, removed, changed) = scheduler.apply(&new);
    shared.update(|s| s.config_error = None);
    info!(added, removed, changed, "config reloaded");
    *running = new;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_dir_error(errno: Errno) -> AgentError {
        AgentError::StateDir {
            path: PathBuf::from("/srv/vigil"),
            source: std::io::Error::from_raw_os_error(errno as i32),
        }
    }

    #[test]
    fn a_state_dir_the_agent_may_not_write_is_a_config_error() {
        for errno in [Errno::EROFS, Errno::EACCES, Errno::EPERM, Errno::ENOTDIR] {
            let e = state_dir_error(errno);
            assert_eq!(e.exit_code(), crate::exit::CONFIG, "{errno}");
            let msg = e.to_string();
            assert!(
                msg.starts_with("state directory /srv/vigil ([agent].state_dir): "),
                "{msg}"
            );
            assert!(msg.contains("ReadWritePaths="), "{msg}");
        }
        // A full disk may pass: restarted (73), and no hint about the config.
        let e = state_dir_error(Errno::ENOSPC);
        assert_eq!(e.exit_code(), crate::exit::CANTCREAT);
        assert!(!e.to_string().contains("ReadWritePaths="), "{e}");
    }
}
