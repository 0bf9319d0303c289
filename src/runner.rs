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
//!   a grace period ([`KILL_GRACE`] by default), SIGKILL: a tool's grandchildren die with
//!   it. Dropping the [`Runner::run`] future before the program ended (the scheduler does
//!   that at a check's timeout) SIGKILLs the group at once;
//! - stdout and stderr are read concurrently and kept up to `max_output` bytes each; the
//!   rest is read and discarded (so the program never blocks on a full pipe) and the
//!   outcome says it was cut. A timed-out outcome keeps what was read before the kill.
//!
//! The group is only ever signalled while its leader is not yet reaped: an unreaped leader
//! (running or a zombie) keeps its pid, and so the group id, from being reused, so a
//! signal can never reach an unrelated process group that happens to get the same number.
//! Leftover members that closed both pipes and outlive a leader that exited on its own are
//! not hunted down (that would need the leader's pid after it was reaped).
//!
//! The request and outcome are plain data (serde) so that the same exchange can cross
//! the privileged `vigil runner`'s socket when `run_as` names another user; the
//! in-process [`Runner`] switches user itself only when the agent runs as root. A runner
//! made [`via`](Runner::via) a [`Remote`] sends a request whose `run_as` it cannot honour
//! itself to `vigil runner` instead, naming only the check or remediation: the runner
//! rebuilds the program from its own (root's) config, so the request's argv is not sent. A switched
//! program gets the user's uid, primary gid and supplementary groups (the `initgroups`
//! list, computed before the fork).
//!
//! [`Runner::run_sealed`] runs a remediation: instead of `argv[0]` it executes a sealed
//! memfd the guard filled with the approved bytes (`/proc/self/fd/N`, the fd handed to
//! the child without close-on-exec so that a `#!` interpreter can open it too).
//!
//! The crate's only `unsafe` is here, in [`pre_exec`]: the code that runs in the child
//! between fork and exec (clearing close-on-exec on the memfd, setgroups/setgid/setuid).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::{Pid, Uid};
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

/// How long to wait for the group's leader to be reaped (and the pipes to close) after
/// the SIGKILL; only a process outside the group holding a pipe, or a leader stuck in
/// uninterruptible sleep, makes this matter.
const REAP_WAIT: Duration = Duration::from_secs(1);
/// How often the grace period looks whether the leader has exited.
const EXIT_POLL: Duration = Duration::from_millis(20);
/// Bytes read from a pipe at once: the default Linux pipe capacity, so a writer that
/// filled its pipe is unblocked in one read.
const READ_CHUNK: usize = 64 * 1024;

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

impl Request {
    /// A request for `argv` with no extra environment, as the agent's user, keeping
    /// [`DEFAULT_MAX_OUTPUT`] bytes of each stream.
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>, timeout: Duration) -> Self {
        Request {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            run_as: None,
            timeout,
            max_output: DEFAULT_MAX_OUTPUT,
        }
    }
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
    /// Standard output, at most `max_output` bytes (what was read until the kill when
    /// it timed out).
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
    /// Whether the program exited with code 0.
    pub fn success(&self) -> bool {
        self.exit == Exit::Code(0)
    }

    /// The first line of stderr (or stdout), at most `max` characters: what a check's
    /// message quotes when a tool fails.
    pub fn first_error_line(&self, max: usize) -> String {
        let line = first_line(&self.stderr)
            .or_else(|| first_line(&self.stdout))
            .unwrap_or_default();
        cut_chars(&line, max)
    }
}

/// The first non-blank line of `b`, trimmed.
fn first_line(b: &[u8]) -> Option<String> {
    String::from_utf8_lossy(b)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

/// `s` cut to `max` characters, with `…` when cut.
pub fn cut_chars(s: &str, max: usize) -> String {
    if s.chars().count() > max {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}…")
    } else {
        s.to_string()
    }
}

/// Why a program could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The request names no program.
    #[error("empty command")]
    Empty,
    /// The program does not exist or is not executable (or the request holds a NUL byte
    /// or an invalid environment variable name).
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
    /// The privileged runner refused the request, or could not be asked.
    #[error("vigil runner at {socket}: {reason}")]
    Runner {
        /// Its socket.
        socket: String,
        /// Its error answer (`keyword: detail`), or why it could not be asked.
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
#[derive(Debug, Clone)]
pub struct Runner {
    /// Time between SIGTERM and SIGKILL at a timeout.
    kill_grace: Duration,
    /// Where a program this process cannot switch to its `run_as` for is sent.
    remote: Option<Remote>,
}

/// The privileged `vigil runner` and what to ask it for.
#[derive(Debug, Clone, PartialEq)]
pub struct Remote {
    /// Its socket (`[agent].runner_socket`).
    pub socket: std::path::PathBuf,
    /// A check's program or a remediation.
    pub op: crate::runner_service::Op,
    /// The check's or the remediation's name, which the runner looks up in its config.
    pub name: String,
}

impl Default for Runner {
    fn default() -> Self {
        Runner::in_process()
    }
}

impl Runner {
    /// A runner that spawns programs from the agent's own process.
    pub fn in_process() -> Self {
        Runner {
            kill_grace: KILL_GRACE,
            remote: None,
        }
    }

    /// The same runner, sending a request whose `run_as` this process cannot switch to
    /// (another user, and the agent is not root) to the privileged runner at `remote`.
    pub fn via(mut self, remote: Remote) -> Self {
        self.remote = Some(remote);
        self
    }

    /// The same runner with another time between SIGTERM and SIGKILL at a timeout.
    pub fn with_kill_grace(mut self, grace: Duration) -> Self {
        self.kill_grace = grace;
        self
    }

    /// Whether this runner can run programs as `user`: without the privileged runner
    /// only the agent's own user, or any user when the agent runs as root.
    ///
    /// # Errors
    /// [`RunError::User`] naming why not.
    pub fn can_run_as(&self, user: &str) -> Result<(), RunError> {
        resolve_user(user).map(|_| ())
    }

    /// Whether a program may be configured to run as `user`: with the privileged runner
    /// (`[agent].runner_socket` set) any existing user (the runner switches to it);
    /// without it, [`can_run_as`](Self::can_run_as).
    ///
    /// # Errors
    /// [`RunError::User`] naming why not.
    pub fn usable_user(user: &str, via_runner: bool) -> Result<(), RunError> {
        if via_runner {
            // Only that it exists: the runner switches to it.
            return lookup_user(user).map(|_| ());
        }
        Runner::in_process().can_run_as(user)
    }

    /// Runs `req` to completion, killing its process group at the timeout.
    ///
    /// Cancel-safe in the sense that matters here: dropping the future before it finished
    /// SIGKILLs the program's whole group.
    ///
    /// # Errors
    /// The program could not be started (missing, not executable, `run_as` not possible,
    /// an invalid environment variable name), or its pipes failed; a program that ran and
    /// failed is an `Ok` outcome with its exit.
    pub async fn run(&self, req: &Request) -> Result<Outcome, RunError> {
        self.run_program(req, None).await
    }

    /// Runs `req` like [`run`](Self::run), but executes the sealed memfd `exec` (the bytes
    /// the guard verified) instead of looking up `argv[0]`, which only names it (`$0`).
    ///
    /// # Errors
    /// As [`run`](Self::run).
    pub async fn run_sealed(&self, req: &Request, exec: &OwnedFd) -> Result<Outcome, RunError> {
        self.run_program(req, Some(exec.as_raw_fd())).await
    }

    async fn run_program(&self, req: &Request, exec: Option<RawFd>) -> Result<Outcome, RunError> {
        if let (Some(remote), Some(user)) = (&self.remote, &req.run_as) {
            if needs_runner(lookup_user(user)?.uid, nix::unistd::geteuid()) {
                return self.ask_runner(remote, req).await;
            }
        }
        let program = req.argv.first().ok_or(RunError::Empty)?.clone();
        let spawn_err = |source| RunError::Spawn {
            program: program.clone(),
            source,
        };
        if let Some((bad, _)) = req
            .env
            .iter()
            .find(|(k, _)| k.is_empty() || k.contains(['=', '\0']))
        {
            return Err(spawn_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid environment variable name {bad:?}"),
            )));
        }
        let mut cmd = match exec {
            Some(fd) => {
                let mut c = Command::new(format!("/proc/self/fd/{fd}"));
                c.arg0(&program);
                c
            }
            None => Command::new(&program),
        };
        cmd.args(&req.argv[1..])
            .env_clear()
            .env("PATH", SAFE_PATH)
            .envs(req.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            // Covers the direct child only; `GroupGuard` covers the rest of the group.
            .kill_on_drop(true);
        let switch = match &req.run_as {
            Some(user) => resolve_user(user)?,
            None => None,
        };
        if exec.is_some() || switch.is_some() {
            pre_exec(&mut cmd, exec, switch);
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let io_err = |source| RunError::Io {
            program: program.clone(),
            source,
        };
        // `id()` is `None` only once the child was reaped, which nothing has done yet.
        let Some(pgid) = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw)
        else {
            return Err(io_err(io::Error::other("the spawned program has no pid")));
        };
        // Declared after `child`, so it drops first, while the leader is still unreaped.
        let mut guard = GroupGuard { pgid: Some(pgid) };
        let mut out = Capture::new(child.stdout.take(), req.max_output);
        let mut err = Capture::new(child.stderr.take(), req.max_output);

        let finished = tokio::time::timeout_at(started + req.timeout, async {
            tokio::join!(out.drain(), err.drain());
            child.wait().await
        })
        .await;
        let exit = match finished {
            Ok(status) => {
                // Reaped (or waiting failed): the group id may be reused from here on.
                guard.disarm();
                let status = status.map_err(io_err)?;
                match (status.code(), status.signal()) {
                    (Some(c), _) => Exit::Code(c),
                    (None, Some(s)) => Exit::Signal(s),
                    (None, None) => Exit::Signal(0),
                }
            }
            Err(_elapsed) => {
                // SIGTERM first so that a tool can clean up (pgBackRest releases its
                // locks); the output keeps flowing in meanwhile, so nothing blocks on a
                // full pipe and what it says last is kept.
                signal_group(pgid, Signal::SIGTERM);
                let _ = tokio::time::timeout(self.kill_grace, async {
                    tokio::join!(out.drain(), err.drain());
                    leader_exited(pgid).await;
                })
                .await;
                // Also when everything seems gone: members that closed both pipes may be
                // left, and the unreaped leader still pins the group id.
                signal_group(pgid, Signal::SIGKILL);
                let reaped = tokio::time::timeout(REAP_WAIT, async {
                    tokio::join!(out.drain(), err.drain());
                    child.wait().await
                })
                .await;
                if reaped.is_ok() {
                    guard.disarm();
                }
                Exit::TimedOut
            }
        };
        let duration = started.elapsed();
        if let Some(e) = out.error.take().or_else(|| err.error.take()) {
            return Err(io_err(e));
        }
        Ok(Outcome {
            exit,
            stdout: out.kept,
            stderr: err.kept,
            stdout_truncated: out.truncated,
            stderr_truncated: err.truncated,
            duration,
        })
    }
}

impl Runner {
    /// Asks the privileged runner to run `req`'s check or remediation. Only the name and,
    /// for a remediation, the environment (its `VIGIL_*` variables) are sent.
    async fn ask_runner(&self, remote: &Remote, req: &Request) -> Result<Outcome, RunError> {
        use crate::runner_service::{Answer, Op, PROTOCOL_VERSION, WireRequest};
        let err = |reason: String| RunError::Runner {
            socket: remote.socket.display().to_string(),
            reason,
        };
        let wire = WireRequest {
            v: PROTOCOL_VERSION,
            op: remote.op,
            name: remote.name.clone(),
            env: match remote.op {
                Op::Remediation => req.env.iter().cloned().collect(),
                Op::Check => Default::default(),
            },
        };
        // The runner ends the program at its own timeout; allow for its kill grace and
        // reaping, and for the exchange itself, before giving up on it.
        let patience = req.timeout + self.kill_grace + REAP_WAIT + ANSWER_GRACE;
        match tokio::time::timeout(patience, crate::runner_service::ask(&remote.socket, &wire))
            .await
        {
            Err(_) => Err(err(format!(
                "no answer within {}",
                humantime::format_duration(patience)
            ))),
            Ok(Err(e)) => Err(err(e.to_string())),
            Ok(Ok(Answer::Error { error })) => Err(err(error)),
            Ok(Ok(Answer::Ran(outcome))) => Ok(outcome),
        }
    }
}

/// Whether a program to run as `target` must go to the privileged runner: it is another
/// user and this process (not root) cannot switch to it.
fn needs_runner(target: Uid, me: Uid) -> bool {
    target != me && !me.is_root()
}

/// Time allowed for the exchange with the privileged runner on top of the program's own.
const ANSWER_GRACE: Duration = Duration::from_secs(5);

/// SIGKILLs a process group when dropped armed: a [`Runner::run`] future dropped mid-way
/// (the scheduler's timeout) must not leave the program's grandchildren running, and
/// tokio's `kill_on_drop` reaches the direct child only.
struct GroupGuard {
    /// The group; `None` once disarmed. Disarmed as soon as the leader is reaped, after
    /// which the number may name another group.
    pgid: Option<Pid>,
}

impl GroupGuard {
    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            signal_group(pgid, Signal::SIGKILL);
        }
    }
}

/// Sends `sig` to the group.
fn signal_group(pgid: Pid, sig: Signal) {
    // ESRCH (the group is already gone) is the outcome we want; EPERM cannot happen for a
    // group we started (as ourselves, or as another user while we are root).
    let _ = killpg(pgid, sig);
}

/// Returns once the group's leader has exited, without reaping it (`WNOWAIT`), so the
/// group id stays pinned until the caller's SIGKILL.
async fn leader_exited(pid: Pid) {
    loop {
        match waitid(
            Id::Pid(pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) {
            Ok(WaitStatus::StillAlive) => tokio::time::sleep(EXIT_POLL).await,
            // Exited, or not our child any more: nothing left to wait for.
            _ => return,
        }
    }
}

/// One of the program's output streams, read to its end and kept up to a cap.
struct Capture<R> {
    /// `None` once at end of file (or after a read error).
    reader: Option<R>,
    kept: Vec<u8>,
    truncated: bool,
    max: usize,
    /// The first read error; reading stops there (closing the pipe, so the writer gets
    /// EPIPE rather than blocking).
    error: Option<io::Error>,
}

impl<R: AsyncRead + Unpin> Capture<R> {
    fn new(reader: Option<R>, max: usize) -> Self {
        Capture {
            reader,
            kept: Vec::new(),
            truncated: false,
            max,
            error: None,
        }
    }

    /// Reads until end of file. Cancel-safe: a read that has not completed has consumed
    /// nothing, and everything read so far is in `kept`, so it can be called again.
    async fn drain(&mut self) {
        let Some(reader) = self.reader.as_mut() else {
            return;
        };
        let mut buf = vec![0u8; READ_CHUNK];
        let end = loop {
            match reader.read(&mut buf).await {
                Ok(0) => break None,
                Ok(n) => {
                    let room = self.max.saturating_sub(self.kept.len());
                    self.kept.extend_from_slice(&buf[..n.min(room)]);
                    self.truncated |= n > room;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e),
            }
        };
        self.error = self.error.take().or(end);
        self.reader = None;
    }
}

/// The identity a child switches to, resolved in the parent (NSS lookups allocate and
/// take locks, which a forked child of a threaded process must not).
#[derive(Debug, Clone)]
struct Switch {
    uid: Uid,
    gid: nix::unistd::Gid,
    groups: Vec<nix::unistd::Gid>,
}

/// Installs the code that runs in the child between fork and exec.
///
/// This is the crate's one `unsafe` block. `Command::pre_exec` is unsafe because the
/// closure runs in a forked copy of a multi-threaded process, where only
/// async-signal-safe operations are sound. The closure only makes raw system calls on
/// values prepared before the fork: `fcntl(F_SETFD)` on an integer, `setgroups` on a
/// slice allocated by the parent (nix passes its pointer straight to libc), `setgid`,
/// `setuid`; and nix turns a failure into an `io::Error` from the errno alone (no
/// allocation). No lock, no allocation, no unwinding happens in the child.
///
/// Order matters: groups and gid while still root, the uid last (after it, the others are
/// no longer permitted). std applies `process_group(0)`, the working directory and the
/// stdio redirections before this closure runs.
#[allow(unsafe_code)]
fn pre_exec(cmd: &mut Command, exec: Option<RawFd>, switch: Option<Switch>) {
    let child_setup = move || -> io::Result<()> {
        if let Some(fd) = exec {
            // SAFETY: a plain fcntl on a descriptor number this process owns (the sealed
            // memfd, kept open by the parent until the child was reaped).
            let rc = unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) };
            if rc == -1 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(s) = &switch {
            nix::unistd::setgroups(&s.groups)?;
            nix::unistd::setgid(s.gid)?;
            nix::unistd::setuid(s.uid)?;
        }
        Ok(())
    };
    // SAFETY: see the function's doc: the closure is async-signal-safe.
    unsafe {
        cmd.pre_exec(child_setup);
    }
}

/// `Some(switch)` when the process must switch to `user`; `None` when it already is
/// that user.
fn resolve_user(user: &str) -> Result<Option<Switch>, RunError> {
    let err = |reason: String| RunError::User {
        user: user.to_string(),
        reason,
    };
    let u = lookup_user(user)?;
    if !switch_needed(u.uid, nix::unistd::geteuid()).map_err(err)? {
        return Ok(None);
    }
    let name = std::ffi::CString::new(user).map_err(|_| err("contains a NUL byte".into()))?;
    let groups = nix::unistd::getgrouplist(&name, u.gid)
        .map_err(|e| err(format!("listing the user's groups: {e}")))?;
    Ok(Some(Switch {
        uid: u.uid,
        gid: u.gid,
        groups,
    }))
}

/// The passwd entry of `user`.
fn lookup_user(user: &str) -> Result<nix::unistd::User, RunError> {
    let err = |reason: String| RunError::User {
        user: user.to_string(),
        reason,
    };
    nix::unistd::User::from_name(user)
        .map_err(|e| err(format!("looking up the user: {e}")))?
        .ok_or_else(|| err("no such user".into()))
}

/// Whether a process running as `me` must (and can) switch to `target`: `Ok(false)` when
/// it already is `target`, `Ok(true)` when it must and is root, `Err(reason)` otherwise.
fn switch_needed(target: Uid, me: Uid) -> Result<bool, String> {
    if target == me {
        Ok(false)
    } else if me.is_root() {
        Ok(true)
    } else {
        Err(format!(
            "the agent runs as uid {me} and cannot switch to uid {target} without root or \
             the vigil runner"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switching_users_needs_root_unless_it_is_the_same_user() {
        let (root, me, other) = (Uid::from_raw(0), Uid::from_raw(1000), Uid::from_raw(1001));
        assert_eq!(switch_needed(me, me), Ok(false));
        assert_eq!(switch_needed(other, root), Ok(true));
        assert_eq!(switch_needed(root, root), Ok(false));
        let e = switch_needed(other, me).unwrap_err();
        assert!(e.contains("uid 1000") && e.contains("uid 1001"), "{e}");
        assert!(switch_needed(root, me).is_err());
    }

    #[test]
    fn only_an_unprivileged_agent_asks_the_runner_for_another_user() {
        let (root, me, other) = (Uid::from_raw(0), Uid::from_raw(1000), Uid::from_raw(1001));
        assert!(needs_runner(other, me));
        assert!(needs_runner(root, me));
        assert!(!needs_runner(me, me));
        assert!(!needs_runner(other, root));
    }

    #[test]
    fn with_a_runner_any_existing_user_is_usable() {
        assert!(Runner::usable_user("root", true).is_ok());
        match Runner::usable_user("vigil-no-such-user-x", true) {
            Err(RunError::User { reason, .. }) => assert_eq!(reason, "no such user"),
            other => panic!("{other:?}"),
        }
        assert!(Runner::usable_user("vigil-no-such-user-x", false).is_err());
    }

    #[test]
    fn an_unknown_user_is_a_user_error() {
        match Runner::in_process().can_run_as("vigil-no-such-user-x") {
            Err(RunError::User { user, reason }) => {
                assert_eq!(user, "vigil-no-such-user-x");
                assert_eq!(reason, "no such user");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn first_error_line_prefers_stderr_and_cuts_long_lines() {
        let o = Outcome {
            exit: Exit::Code(1),
            stdout: b"out line\n".to_vec(),
            stderr: b"\n  \nERROR: [055]: unable to open missing file\nmore\n".to_vec(),
            stdout_truncated: false,
            stderr_truncated: false,
            duration: Duration::ZERO,
        };
        assert_eq!(
            o.first_error_line(200),
            "ERROR: [055]: unable to open missing file"
        );
        assert_eq!(o.first_error_line(5), "ERROR…");
        let quiet = Outcome {
            stderr: Vec::new(),
            ..o
        };
        assert_eq!(quiet.first_error_line(200), "out line");
        assert!(!quiet.success());
    }

    #[test]
    fn outcome_round_trips_through_json() {
        let o = Outcome {
            exit: Exit::TimedOut,
            stdout: vec![1, 2],
            stderr: Vec::new(),
            stdout_truncated: true,
            stderr_truncated: false,
            duration: Duration::from_millis(5),
        };
        let back: Outcome = serde_json::from_str(&serde_json::to_string(&o).unwrap()).unwrap();
        assert_eq!(back, o);
        let r = Request::new(["a", "b"], Duration::from_secs(1));
        let back: Request = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(r.max_output, DEFAULT_MAX_OUTPUT);
    }
}
