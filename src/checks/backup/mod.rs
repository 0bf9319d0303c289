//! `backup.*` kinds: how old is the newest good backup, from the tool that took it.
//!
//! Every kind that runs a tool does so through [`crate::runner`] (cleared environment plus
//! `env`, optional `run_as`, the check's timeout killing the whole process group, bounded
//! output). A missing binary, a non-zero exit or output that does not parse is `unknown`
//! with the tool's own words; no backup at all is critical, never ok.
//!
//! This module holds what the kinds share (running the tool itself is
//! [`crate::checks::program`], shared with the `command` kind):
//! - [`evaluate_age`]: classify the newest backup's age and build the metrics
//!   `vigil_backup_age_seconds`, `vigil_backup_size_bytes` and `vigil_backup_backups`;
//! - [`age_thresholds`] (defaults 26h / 48h: a daily backup may run late by a couple of
//!   hours before anyone is warned, and a whole missed day is critical);
//! - [`parse_rfc3339`]: the timestamps WAL-G (and pgBackRest's text) print.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::checks::disk::format_bytes;
use crate::checks::postgres::format_secs;
use crate::checks::{Metric, Observation, Status, Thresholds};
use crate::config::types::Duration;
// The program-running helpers live in `checks::program` (shared with the `command`
// kind); the backup kinds keep reaching them through this module.
pub use crate::checks::program::{
    ERROR_LINE_MAX, MAX_TOOL_OUTPUT, check_outcome, command_line, run_program, run_tool,
    tool_error, tool_request, tool_timeout, validate_tool,
};

pub mod barman;
pub mod files;
pub mod pgbackrest;
pub mod walg;

/// Warning default for every `backup.*` kind, seconds (26h): a daily backup that runs a
/// little late is no reason to wake anyone.
pub const DEFAULT_WARN_SECS: f64 = 26.0 * 3600.0;
/// Critical default, seconds (48h): a whole day's backup is missing.
pub const DEFAULT_CRIT_SECS: f64 = 48.0 * 3600.0;
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
}
