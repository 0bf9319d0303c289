//! Runs external programs for the checks that need one (`backup.*`, later `command` and
//! remediation): a [`Request`] in, an [`Outcome`] out.
//!
//! Invariants, whoever runs the program:
//! - no shell: `argv[0]` is executed with `argv[1..]`, looked up in the cleared
//!   environment's `PATH` (`/usr/sbin:/usr/bin:/sbin:/bin`) when it has no slash;
//! - a cleared environment: `PATH` plus the request's `env`, nothing inherited (no
//!   `PGPASSWORD` or AWS keys leak from the agent);
//! - working directory `/`, stdin `/dev/null`;
//! - its own process group, so that at `timeout` the whole group gets SIGTERM and, after
//!   [`KILL_GRACE`], SIGKILL: a tool's grandchildren die with it;
//! - stdout and stderr are read concurrently and kept up to `max_output` bytes each; the
//!   rest is read and discarded (so the program never blocks on a full pipe) and the
//!   outcome says it was cut.
//!
//! The request and outcome are plain data (serde) so that the same exchange can cross
//! the privileged `vigil runner`'s socket when `run_as` names another user; the
//! in-process [`Runner`] switches user itself only when the agent runs as root.

use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::time::Instant;

/// The `PATH` of every program run.
pub const SAFE_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// Time between SIGTERM and SIGKILL at a timeout.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// The default cap on each of stdout and stderr.
pub const DEFAULT_MAX_OUTPUT: usize = 64 * 1024;

/// What to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// The program and its arguments; no shell.
    pub argv: Vec<String>,
    /// Variables added to the cleared environment (after `PATH`, which they may replace).
    pub env: Vec<(String, String)>,
    /// Run as this user (name); `None`: as the agent.
    pub run_as: Option<String>,
    /// The whole process group is killed after this long.
    pub timeout: Duration,
    /// Most bytes kept of each of stdout and stderr.
    pub max_output: usize,
}

/// How a program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it (not ours).
    Signal(i32),
    /// It overran the timeout and its group was killed.
    TimedOut,
}

/// What a run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// How it ended.
    pub exit: Exit,
    /// Standard output, at most `max_output` bytes.
    pub stdout: Vec<u8>,
    /// Standard error, at most `max_output` bytes.
    pub stderr: Vec<u8>,
    /// Whether stdout was cut.
    pub stdout_truncated: bool,
    /// Whether stderr was cut.
    pub stderr_truncated: bool,
    /// Wall time from spawn to exit.
    pub duration: Duration,
}

impl Outcome {
    /// The first line of stderr (or stdout), at most `max` characters: what a check's
    /// message quotes when a tool fails.
    pub fn first_error_line(&self, max: usize) -> String {
        let pick = |b: &[u8]| {
            String::from_utf8_lossy(b)
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_string)
        };
        let line = pick(&self.stderr)
            .or_else(|| pick(&self.stdout))
            .unwrap_or_default();
        if line.chars().count() > max {
            let cut: String = line.chars().take(max).collect();
            format!("{cut}…")
        } else {
            line
        }
    }
}

/// Why a program could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The request names no program.
    #[error("empty command")]
    Empty,
    /// The program does not exist or is not executable.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// `argv[0]`.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `run_as` cannot be honoured.
    #[error("run_as {user:?}: {reason}")]
    User {
        /// The user asked for.
        user: String,
        /// Why not.
        reason: String,
    },
    /// Waiting for or reading from the program failed.
    #[error("running {program}: {source}")]
    Io {
        /// `argv[0]`.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Runs programs. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Runner {
    _private: (),
}

impl Runner {
    /// A runner that spawns programs from the agent's own process.
    pub fn in_process() -> Self {
        Runner { _private: () }
    }

    /// Whether this runner can run programs as `user`: without the privileged runner
    /// only the agent's own user, or any user when the agent runs as root.
    ///
    /// # Errors
    /// [`RunError::User`] naming why not.
    pub fn can_run_as(&self, user: &str) -> Result<(), RunError> {
        resolve_user(user).map(|_| ())
    }

    /// Runs `req` to completion, killing its process group at the timeout.
    ///
    /// # Errors
    /// The program could not be started, or its pipes failed; a program that ran and
    /// failed is an `Ok` outcome with its exit.
    pub async fn run(&self, req: &Request) -> Result<Outcome, RunError> {
        let program = req.argv.first().ok_or(RunError::Empty)?.clone();
        let mut cmd = Command::new(&program);
        cmd.args(&req.argv[1..])
            .env_clear()
            .env("PATH", SAFE_PATH)
            .envs(req.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(user) = &req.run_as {
            if let Some((uid, gid)) = resolve_user(user)? {
                cmd.uid(uid).gid(gid);
            }
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|source| RunError::Spawn {
            program: program.clone(),
            source,
        })?;
        let pgid = child.id().and_then(|id| i32::try_from(id).ok());
        let io = |source| RunError::Io {
            program: program.clone(),
            source,
        };
        let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(io(std::io::Error::other("child pipes missing")));
        };
        let max = req.max_output;
        let reading = async { tokio::join!(read_capped(out, max), read_capped(err, max)) };
        let waiting = async {
            let (o, e) = reading.await;
            let status = child.wait().await;
            (o, e, status)
        };
        match tokio::time::timeout(req.timeout, waiting).await {
            Ok((o, e, status)) => {
                let (stdout, stdout_truncated) = o.map_err(io)?;
                let (stderr, stderr_truncated) = e.map_err(io)?;
                let status = status.map_err(io)?;
                use std::os::unix::process::ExitStatusExt;
                let exit = match (status.code(), status.signal()) {
                    (Some(c), _) => Exit::Code(c),
                    (None, Some(s)) => Exit::Signal(s),
                    (None, None) => Exit::Signal(0),
                };
                Ok(Outcome {
                    exit,
                    stdout,
                    stderr,
                    stdout_truncated,
                    stderr_truncated,
                    duration: started.elapsed(),
                })
            }
            Err(_) => {
                if let Some(pgid) = pgid {
                    kill_group(pgid).await;
                }
                Ok(Outcome {
                    exit: Exit::TimedOut,
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                    stdout_truncated: false,
                    stderr_truncated: false,
                    duration: started.elapsed(),
                })
            }
        }
    }
}

/// SIGTERM to the group, then SIGKILL after [`KILL_GRACE`] if any member is left.
async fn kill_group(pgid: i32) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    let pg = Pid::from_raw(pgid);
    // ESRCH (the group is already gone) is the outcome we want.
    let _ = killpg(pg, Signal::SIGTERM);
    let deadline = Instant::now() + KILL_GRACE;
    while Instant::now() < deadline {
        // Signal 0 probes whether any member of the group is left.
        if killpg(pg, None).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = killpg(pg, Signal::SIGKILL);
}

/// Reads `r` to its end, keeping at most `max` bytes; returns them and whether more came.
async fn read_capped<R: AsyncRead + Unpin>(
    mut r: R,
    max: usize,
) -> std::io::Result<(Vec<u8>, bool)> {
    let mut kept = Vec::with_capacity(max.min(8192));
    let mut buf = vec![0u8; 8192];
    let mut truncated = false;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((kept, truncated));
        }
        let room = max.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
        truncated |= n > room;
    }
}

/// `Some((uid, gid))` when the process must switch to `user`; `None` when it already is
/// that user.
fn resolve_user(user: &str) -> Result<Option<(u32, u32)>, RunError> {
    let err = |reason: String| RunError::User {
        user: user.to_string(),
        reason,
    };
    let u = nix::unistd::User::from_name(user)
        .map_err(|e| err(e.to_string()))?
        .ok_or_else(|| err("no such user".into()))?;
    let me = nix::unistd::geteuid();
    if u.uid == me {
        return Ok(None);
    }
    if !me.is_root() {
        return Err(err(format!(
            "the agent runs as uid {me} and cannot switch users without root or the vigil runner"
        )));
    }
    Ok(Some((u.uid.as_raw(), u.gid.as_raw())))
}
