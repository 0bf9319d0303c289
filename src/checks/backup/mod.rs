//! `backup.*` kinds: how old is the newest good backup, from the tool that took it.
//!
//! Every kind that runs a tool does so through [`crate::runner`] (cleared environment plus
//! `env`, optional `run_as`, the check's timeout killing the whole process group, bounded
//! output). A missing binary, a non-zero exit or output that does not parse is `unknown`
//! with the tool's own words; no backup at all is critical, never ok.
//!
//! This module holds what the kinds share:
//! - [`tool_request`] and [`run_tool`]: build the runner's request from a check's keys and
//!   turn everything but a clean exit into a [`CheckError`] quoting the tool's stderr;
//! - [`evaluate_age`]: classify the newest backup's age and build the metrics
//!   `vigil_backup_age_seconds`, `vigil_backup_size_bytes` and `vigil_backup_backups`;
//! - [`age_thresholds`] (defaults 26h / 48h: a daily backup may run late by a couple of
//!   hours before anyone is warned, and a whole missed day is critical);
//! - [`validate_tool`]: the config checks of `binary` and `run_as`;
//! - [`parse_rfc3339`]: the timestamps WAL-G (and pgBackRest's text) print.

use std::time::{Duration as StdDuration, SystemTime, UNIX_EPOCH};

use indexmap::IndexMap;

use crate::checks::disk::format_bytes;
use crate::checks::postgres::format_secs;
use crate::checks::{CheckError, Metric, Observation, Status, Thresholds};
use crate::config::types::Duration;
use crate::runner::{Exit, Outcome, Request, RunError, Runner};

pub mod barman;
pub mod files;
pub mod pgbackrest;
pub mod walg;

/// Warning default for every `backup.*` kind, seconds (26h): a daily backup that runs a
/// little late is no reason to wake anyone.
pub const DEFAULT_WARN_SECS: f64 = 26.0 * 3600.0;
/// Critical default, seconds (48h): a whole day's backup is missing.
pub const DEFAULT_CRIT_SECS: f64 = 48.0 * 3600.0;
/// Most bytes kept of a tool's stdout (and of its stderr). A `backup-list --detail` of a
/// few thousand backups is well under 4 MiB; more than that is a runaway tool, and its cut
/// JSON is reported as such rather than parsed.
pub const MAX_TOOL_OUTPUT: usize = 4 * 1024 * 1024;
/// How many characters of a tool's error line a message quotes.
pub const ERROR_LINE_MAX: usize = 300;

/// `warn`/`crit` as written, or 26h / 48h when both are omitted (one given alone leaves
/// the other unset, as for every kind).
pub fn age_thresholds(warn: Option<Duration>, crit: Option<Duration>) -> Thresholds {
    let (w, c) = crate::checks::threshold::or_defaults(
        warn.map(|d| d.get().as_secs_f64()),
        crit.map(|d| d.get().as_secs_f64()),
        DEFAULT_WARN_SECS,
        DEFAULT_CRIT_SECS,
    );
    Thresholds::higher(w, c)
}

/// The config checks every tool-running kind shares, as `(key, message)`:
/// - `binary` must be a bare name (looked up in the runner's fixed `PATH`) or an absolute
///   path: a relative path would resolve against the runner's working directory `/`,
///   which is never what the author meant;
/// - when `enabled`, `run_as` must be a user this agent can switch to
///   ([`Runner::can_run_as`]).
pub fn validate_tool(
    binary: Option<&str>,
    run_as: Option<&str>,
    enabled: bool,
) -> Vec<(&'static str, String)> {
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
    if let (true, Some(user)) = (enabled, run_as) {
        if let Err(e) = Runner::in_process().can_run_as(user) {
            problems.push(("run_as", e.to_string()));
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
            return Err(CheckError::io(
                format!("running `{cmd}`"),
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer within {}; its process group was killed",
                        humantime::format_duration(req.timeout)
                    ),
                ),
            ));
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

/// The newest backup a tool reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Newest {
    /// What it is and how it ended, for the message: `backup base_0000000100000000000000C4
    /// finished`, `file /backups/x.dump modified`.
    pub what: String,
    /// Unix time (seconds, fractional) at which it ended.
    pub ended_at: f64,
    /// Its size in bytes, when the tool reports one.
    pub size_bytes: Option<f64>,
}

/// Classifies the age of `newest` (seconds since it ended, at `now`, Unix seconds) against
/// `t` and builds the message and the metrics `vigil_backup_age_seconds`,
/// `vigil_backup_size_bytes` and `vigil_backup_backups` (`count`: backups that count).
///
/// No backup (`None`) is critical with `none_message` and no value: nothing was backed
/// up, which is never ok. An end in the future (clock skew between hosts) counts as age 0
/// and says so, rather than a negative age.
pub fn evaluate_age(
    newest: Option<&Newest>,
    count: usize,
    t: &Thresholds,
    now: f64,
    none_message: String,
) -> Observation {
    let count_metric = Metric::gauge(
        "vigil_backup_backups",
        "Backups that count towards the check (of the configured type or status)",
        count as f64,
    );
    let Some(n) = newest else {
        return Observation {
            status: Status::Critical,
            value: None,
            message: none_message,
            metrics: vec![count_metric],
            replication: None,
        };
    };
    let raw_age = now - n.ended_at;
    let age = raw_age.max(0.0);
    let status = if raw_age.is_nan() {
        Status::Unknown
    } else {
        t.classify(age)
    };
    let mut message = format!("{} {} ago", n.what, format_secs(age));
    if raw_age < 0.0 {
        message = format!(
            "{} in the future ({} ahead of this host's clock)",
            n.what,
            format_secs(-raw_age)
        );
    }
    let mut details = vec![format!("{count} in total")];
    if let Some(size) = n.size_bytes {
        details.insert(0, format_bytes(size.max(0.0) as u64));
    }
    message = format!("{message} ({})", details.join(", "));
    let mut metrics = vec![
        Metric::gauge(
            "vigil_backup_age_seconds",
            "Seconds since the newest backup that counts ended",
            age,
        ),
        count_metric,
    ];
    if let Some(size) = n.size_bytes {
        metrics.push(Metric::gauge(
            "vigil_backup_size_bytes",
            "Size of the newest backup that counts, as its tool reports it",
            size,
        ));
    }
    Observation {
        status,
        value: Some(age),
        message,
        metrics,
        replication: None,
    }
}

/// The current Unix time in seconds.
pub fn unix_now() -> f64 {
    unix_seconds(SystemTime::now())
}

/// A [`SystemTime`] as Unix seconds (negative before 1970).
pub fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Parses an RFC 3339 timestamp into Unix seconds: `2024-01-10T10:15:35.123456Z`,
/// `2024-01-10T10:15:35+02:00`, with any number of fractional digits, `T`, `t` or a space
/// between date and time, `Z` or `z`. (`humantime::parse_rfc3339_weak` accepts no offset
/// other than UTC, and Go's `time.Time` marshals a non-UTC time with its offset.)
///
/// # Errors
/// A message quoting `s` when it is not such a timestamp.
pub fn parse_rfc3339(s: &str) -> Result<f64, String> {
    let bad = |why: &str| format!("invalid timestamp {s:?}: {why}");
    let b = s.trim().as_bytes();
    let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
        let part = b.get(range).ok_or_else(|| bad("too short"))?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return Err(bad("expected digits"));
        }
        // Digits only, at most 4 of them: always fits.
        Ok(part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let sep = |i: usize, allowed: &[u8]| -> Result<(), String> {
        match b.get(i) {
            Some(c) if allowed.contains(c) => Ok(()),
            _ => Err(bad("expected YYYY-MM-DDTHH:MM:SS")),
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    sep(4, b"-")?;
    sep(7, b"-")?;
    sep(10, b"Tt ")?;
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    sep(13, b":")?;
    sep(16, b":")?;
    if !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(bad("field out of range"));
    }
    let mut i = 19;
    let mut frac = 0.0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return Err(bad("expected digits after '.'"));
        }
        // ASCII digits: valid UTF-8 and a valid float after "0.".
        let digits = std::str::from_utf8(&b[start..i]).map_err(|_| bad("bad fraction"))?;
        frac = format!("0.{digits}")
            .parse::<f64>()
            .map_err(|_| bad("bad fraction"))?;
    }
    let offset = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() => {
            sep(i + 3, b":")?;
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return Err(bad("offset out of range"));
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'-' { -o } else { o }
        }
        _ => return Err(bad("expected 'Z' or an offset such as +02:00")),
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86400 + hour * 3600 + minute * 60 + second - offset;
    Ok(secs as f64 + frac)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`, <https://howardhinnant.github.io/date_algorithms.html>).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_forms() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0.0));
        assert_eq!(parse_rfc3339("2024-01-10T10:15:35Z"), Ok(1_704_881_735.0));
        let f = parse_rfc3339("2024-01-10T10:15:35.123456Z").unwrap();
        assert!((f - 1_704_881_735.123456).abs() < 1e-6);
        assert_eq!(
            parse_rfc3339("2024-01-10T12:15:35+02:00"),
            Ok(1_704_881_735.0)
        );
        assert_eq!(
            parse_rfc3339("2024-01-10T10:15:35+00:00"),
            Ok(1_704_881_735.0)
        );
        assert_eq!(
            parse_rfc3339("2024-01-10 05:15:35-05:00"),
            Ok(1_704_881_735.0)
        );
        assert_eq!(parse_rfc3339("2024-02-29T00:00:00z"), Ok(1_709_164_800.0));
        // Go's zero time, which WAL-G prints for a backup without extended metadata.
        assert!(parse_rfc3339("0001-01-01T00:00:00Z").unwrap() < 0.0);
        for bad in [
            "",
            "2024-01-10",
            "2024-01-10T10:15:35",
            "2024-01-10T10:15:35.Z",
            "2024-13-10T10:15:35Z",
            "2023-02-29T10:15:35Z",
            "2024-01-10T10:15:35+0200",
            "2024-01-10T10:15:35Zjunk",
            "yesterday",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?}");
        }
    }

    fn newest(ended_at: f64) -> Newest {
        Newest {
            what: "backup b1 finished".into(),
            ended_at,
            size_bytes: Some(2048.0),
        }
    }

    #[test]
    fn age_is_classified_and_reported() {
        let t = age_thresholds(None, None);
        let now = 1_000_000.0;
        let o = evaluate_age(Some(&newest(now - 3600.0)), 3, &t, now, "none".into());
        assert_eq!((o.status, o.value), (Status::Ok, Some(3600.0)));
        assert_eq!(
            o.message,
            "backup b1 finished 1h 0m ago (2.0 KiB, 3 in total)"
        );
        let names: Vec<_> = o.metrics.iter().map(|m| m.name).collect();
        assert_eq!(
            names,
            [
                "vigil_backup_age_seconds",
                "vigil_backup_backups",
                "vigil_backup_size_bytes"
            ]
        );
        let at =
            |age: f64| evaluate_age(Some(&newest(now - age)), 1, &t, now, String::new()).status;
        assert_eq!(at(DEFAULT_WARN_SECS - 1.0), Status::Ok);
        assert_eq!(at(DEFAULT_WARN_SECS), Status::Warning);
        assert_eq!(at(DEFAULT_CRIT_SECS), Status::Critical);
    }

    #[test]
    fn no_backup_is_critical_and_a_future_end_is_age_zero() {
        let t = age_thresholds(None, None);
        let o = evaluate_age(None, 0, &t, 0.0, "no backup found".into());
        assert_eq!((o.status, o.value), (Status::Critical, None));
        assert_eq!(o.message, "no backup found");
        assert_eq!(o.metrics[0].value, 0.0);
        let o = evaluate_age(Some(&newest(100.0)), 1, &t, 40.0, String::new());
        assert_eq!((o.status, o.value), (Status::Ok, Some(0.0)));
        assert!(o.message.contains("in the future"), "{}", o.message);
    }

    #[test]
    fn explicit_thresholds_replace_both_defaults() {
        let t = age_thresholds(Some(Duration::from_secs(60)), None);
        assert_eq!((t.warn, t.crit), (Some(60.0), None));
    }

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
        assert!(validate_tool(Some("wal-g"), None, true).is_empty());
        assert!(validate_tool(Some("/usr/local/bin/wal-g"), None, true).is_empty());
        assert_eq!(validate_tool(Some("bin/wal-g"), None, true)[0].0, "binary");
        assert_eq!(validate_tool(Some(" "), None, true)[0].0, "binary");
        // Host facts only for enabled checks.
        assert!(validate_tool(None, Some("no-such-user-vigil"), false).is_empty());
        assert_eq!(
            validate_tool(None, Some("no-such-user-vigil"), true)[0].0,
            "run_as"
        );
    }
}
