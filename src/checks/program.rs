//! Running an external program for a check: the `backup.*` kinds and `command` share this,
//! on top of [`crate::runner`] (cleared environment plus `env`, optional `run_as`, the
//! check's timeout killing the whole process group, bounded output).
//!
//! - [`tool_request`]: the runner's request from a check's keys;
//! - [`run_tool`] / [`run_program`] + [`check_outcome`]: run it, and turn everything but a
//!   clean exit into a [`CheckError`] quoting the program's own words;
//! - [`validate_tool`]: the config check of `binary` (`run_as` is checked once for every
//!   kind in the config's validation, which knows whether a privileged runner is set);
//! - [`tool_timeout`]: the runner's timeout inside the scheduler's.

use std::time::Duration as StdDuration;

use indexmap::IndexMap;

use crate::checks::CheckError;
use crate::checks::disk::format_bytes;
use crate::runner::{Exit, Outcome, Request, RunError, Runner};

/// Most bytes kept of a tool's stdout (and of its stderr). A `backup-list --detail` of a
/// few thousand backups is well under 4 MiB; more than that is a runaway tool, and its cut
/// JSON is reported as such rather than parsed.
pub const MAX_TOOL_OUTPUT: usize = 4 * 1024 * 1024;
/// How many characters of a tool's error line a message quotes.
pub const ERROR_LINE_MAX: usize = 300;

/// The config check every tool-running kind shares, as `(key, message)`: `binary` must be
/// a bare name (looked up in the runner's fixed `PATH`) or an absolute path: a relative
/// path would resolve against the runner's working directory `/`, which is never what the
/// author meant.
pub fn validate_tool(binary: Option<&str>) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if let Some(b) = binary {
        if b.trim().is_empty() {
            problems.push(("binary", "must not be empty".to_string()));
        } else if b.contains('/') && !b.starts_with('/') {
            problems.push((
                "binary",
                format!(
                    "{b:?} must be a bare program name (looked up in PATH) or an absolute path"
                ),
            ));
        }
    }
    problems
}

/// The runner's timeout for a check allowed `check_timeout`: earlier than the scheduler's,
/// with room for the runner's SIGTERM → SIGKILL grace, so that the tool gets its SIGTERM
/// and the message says which tool hung. (Should the scheduler's timeout fire first, it
/// drops the run and the runner's guard kills the whole group; only the message is
/// poorer.)
pub fn tool_timeout(check_timeout: StdDuration) -> StdDuration {
    let margin = crate::runner::KILL_GRACE + StdDuration::from_millis(500);
    match check_timeout.checked_sub(margin) {
        Some(t) if t >= check_timeout / 2 => t,
        _ => check_timeout * 3 / 4,
    }
}

/// Builds the runner's request: `binary` (or `default_binary`) followed by `args`, the
/// check's `env` (in file order), `run_as`, [`tool_timeout`] of the check's timeout, and
/// [`MAX_TOOL_OUTPUT`].
pub fn tool_request(
    binary: Option<&str>,
    default_binary: &str,
    args: &[&str],
    env: &IndexMap<String, String>,
    run_as: Option<&str>,
    timeout: StdDuration,
) -> Request {
    let mut argv = Vec::with_capacity(args.len() + 1);
    argv.push(binary.unwrap_or(default_binary).to_string());
    argv.extend(args.iter().map(|a| a.to_string()));
    Request {
        argv,
        env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        run_as: run_as.map(str::to_string),
        timeout: tool_timeout(timeout),
        max_output: MAX_TOOL_OUTPUT,
    }
}

/// The command line as a message names it (`wal-g backup-list --json --detail`).
pub fn command_line(req: &Request) -> String {
    req.argv.join(" ")
}

/// Runs `req` and returns its stdout when the tool exited 0.
///
/// # Errors
/// A [`CheckError`] (the check is `unknown`) when the program cannot be started (missing
/// binary, `run_as` refused), overran its timeout, was killed by a signal or exited
/// non-zero (quoting the first line of its stderr, or of its stdout when stderr is empty,
/// cut at [`ERROR_LINE_MAX`]), or when its stdout was cut at `max_output` (a truncated
/// document must not be parsed as if it were whole).
pub async fn run_tool(runner: &Runner, req: &Request) -> Result<Outcome, CheckError> {
    let outcome = run_program(runner, req).await?;
    check_outcome(req, outcome)
}

/// Runs `req` and returns its outcome whatever its exit, for a kind that reads the output
/// of a failed run itself (Barman's JSON errors); follow with [`check_outcome`].
///
/// # Errors
/// A [`CheckError`] when the program cannot be started (missing binary, `run_as` refused).
pub async fn run_program(runner: &Runner, req: &Request) -> Result<Outcome, CheckError> {
    runner.run(req).await.map_err(|e| run_error(req, e))
}

/// Turns an [`Outcome`] that is not a clean exit into a [`CheckError`] (pure, for tests).
///
/// # Errors
/// As [`run_tool`].
pub fn check_outcome(req: &Request, outcome: Outcome) -> Result<Outcome, CheckError> {
    let cmd = command_line(req);
    let said = || match outcome.first_error_line(ERROR_LINE_MAX) {
        l if l.is_empty() => String::from("(no output)"),
        l => l,
    };
    match outcome.exit {
        Exit::Code(0) => {}
        Exit::Code(c) => return Err(tool_error(format!("`{cmd}` exited with {c}: {}", said()))),
        Exit::Signal(s) => {
            return Err(tool_error(format!(
                "`{cmd}` was killed by signal {s}: {}",
                said()
            )));
        }
        Exit::TimedOut => {
            return Err(timed_out(req));
        }
    }
    if outcome.stdout_truncated {
        return Err(tool_error(format!(
            "`{cmd}` printed more than {}; its output was cut and is not parsed",
            format_bytes(req.max_output as u64)
        )));
    }
    Ok(outcome)
}

/// The program overran its timeout and its process group was killed.
pub fn timed_out(req: &Request) -> CheckError {
    CheckError::io(
        format!("running `{}`", command_line(req)),
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no answer within {}; its process group was killed",
                humantime::format_duration(req.timeout)
            ),
        ),
    )
}

/// A tool that ran but failed, or whose answer makes no sense.
///
/// `CheckError` has no variant for "an external tool failed"; `Parse` carries its message
/// verbatim, which is what the operator needs. One place to change if a `Tool` variant is
/// added.
pub fn tool_error(message: String) -> CheckError {
    CheckError::Tool(message)
}

/// The runner could not start the program at all.
fn run_error(req: &Request, e: RunError) -> CheckError {
    let cmd = command_line(req);
    match e {
        RunError::Spawn { source, .. } | RunError::Io { source, .. } => {
            CheckError::io(format!("cannot run `{cmd}`"), source)
        }
        other => tool_error(format!("cannot run `{cmd}`: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> Request {
        tool_request(
            None,
            "wal-g",
            &["backup-list", "--json"],
            &IndexMap::new(),
            None,
            StdDuration::from_secs(5),
        )
    }

    fn outcome(exit: Exit, stdout: &str, stderr: &str) -> Outcome {
        Outcome {
            exit,
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
            stdout_truncated: false,
            stderr_truncated: false,
            duration: StdDuration::ZERO,
        }
    }

    #[test]
    fn failures_quote_the_tool() {
        let r = req();
        assert_eq!(r.argv, ["wal-g", "backup-list", "--json"]);
        assert_eq!(r.max_output, MAX_TOOL_OUTPUT);
        let e = check_outcome(&r, outcome(Exit::Code(1), "", "ERROR: no storage\nmore\n"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "`wal-g backup-list --json` exited with 1: ERROR: no storage"
        );
        let e = check_outcome(&r, outcome(Exit::TimedOut, "", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no answer within 2s 500ms"), "{e}");
        let e = check_outcome(&r, outcome(Exit::Signal(9), "", ""))
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("signal 9: (no output)"), "{e}");
        let mut cut = outcome(Exit::Code(0), "[{", "");
        cut.stdout_truncated = true;
        let e = check_outcome(&r, cut).unwrap_err().to_string();
        assert!(e.contains("more than 4.0 MiB"), "{e}");
        assert!(check_outcome(&r, outcome(Exit::Code(0), "[]", "")).is_ok());
    }

    #[test]
    fn the_runner_times_out_before_the_scheduler() {
        let s = StdDuration::from_secs;
        assert_eq!(tool_timeout(s(120)), StdDuration::from_millis(117_500));
        assert_eq!(tool_timeout(s(5)), StdDuration::from_millis(2_500));
        assert_eq!(tool_timeout(s(1)), StdDuration::from_millis(750));
        assert_eq!(tool_timeout(StdDuration::ZERO), StdDuration::ZERO);
    }

    #[test]
    fn binary_must_be_a_name_or_absolute() {
        assert!(validate_tool(Some("wal-g")).is_empty());
        assert!(validate_tool(Some("/usr/local/bin/wal-g")).is_empty());
        assert_eq!(validate_tool(Some("bin/wal-g"))[0].0, "binary");
        assert_eq!(validate_tool(Some(" "))[0].0, "binary");
    }
}
