//! `postgres.archiving`: is WAL reaching the archive.
//!
//! The value is seconds since the last successful archive, counted only while something
//! waits to be archived: with no `.ready` segment in `pg_wal/archive_status` the archiver is
//! caught up and the value is 0, so an idle server (no segment completed for hours) is no
//! false alarm. While segments wait, the value is the time since the later of the last
//! success and the moment the oldest waiting segment became ready: the time the archiver
//! has been failing to keep up. A never-archived server is measured the same way (0 while
//! nothing waits), so the value is never NULL once measured.
//!
//! A failure newer than the last success (`pg_stat_archiver`) is critical by itself, with
//! the failing WAL file named. `archive_mode = off` on a primary is a warning ("archiving
//! disabled"; the check was configured, so archiving was expected), value NULL since there
//! is nothing to measure. On a standby `pg_stat_archiver` means something only with
//! `archive_mode = always`; otherwise the primary archives and the check is ok with no value.
//!
//! Defaults when neither `warn` nor `crit` is given: 5m and 15m.

use super::{PgTarget, format_secs, one_row, parse_err, validate_dsn};
use crate::checks::Common;
use crate::checks::KindConfig;
use crate::checks::{Check, CheckContext, CheckError, Metric, Observation, Status, Thresholds};
use crate::config::types::Duration;
use crate::pg::{Dsn, TextRow};

/// Warning default, seconds (5m).
const DEFAULT_WARN: f64 = 300.0;
/// Critical default, seconds (15m).
const DEFAULT_CRIT: f64 = 900.0;

/// PostgreSQL 12+ (`pg_ls_archive_statusdir`); `pg_monitor` (which holds EXECUTE on it).
const ARCHIVING_SQL: &str = "\
WITH ready AS (SELECT modification FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready') \
SELECT pg_is_in_recovery() AS in_recovery, current_setting('archive_mode') AS archive_mode, \
       a.archived_count, a.failed_count, a.last_archived_wal, a.last_failed_wal, \
       extract(epoch FROM now() - a.last_archived_time)::float8 AS archived_age, \
       extract(epoch FROM now() - a.last_failed_time)::float8 AS failed_age, \
       coalesce(a.last_failed_time > a.last_archived_time, a.last_failed_time IS NOT NULL) \
         AS failing, \
       (SELECT count(*) FROM ready) AS pending, \
       (SELECT extract(epoch FROM now() - min(modification))::float8 FROM ready) AS oldest_pending_age \
  FROM pg_stat_archiver AS a";

crate::check_config! {
    /// `[check.postgres.archiving.NAME]`: seconds since the last successful WAL archive
    /// while segments wait.
    pub struct ArchivingConfig: Duration {
        /// The connection string (libpq `key=value` or URL form).
        pub dsn: Dsn,
    }
}

impl ArchivingConfig {
    /// The DSN must parse.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        validate_dsn(&self.dsn)
    }
}

/// A running `postgres.archiving` check.
pub struct ArchivingCheck {
    target: PgTarget,
    thresholds: Thresholds,
}

impl ArchivingCheck {
    /// Builds the check, applying the defaults.
    pub fn from_config(c: &ArchivingConfig, common: &Common) -> Self {
        let (warn, crit) = KindConfig::thresholds_or(c, DEFAULT_WARN, DEFAULT_CRIT);
        ArchivingCheck {
            target: PgTarget::new(&c.dsn, common.timeout),
            thresholds: Thresholds::higher(warn, crit),
        }
    }
}

impl Check for ArchivingCheck {
    async fn run(&mut self, cx: &CheckContext) -> Result<Observation, CheckError> {
        let mut session = self.target.session(cx).await?;
        let sets = session.query("archiving", ARCHIVING_SQL).await?;
        let row = one_row(&sets, 0, "archiving").map_err(parse_err("archiving"))?;
        let a = parse_archiver(row).map_err(parse_err("archiving"))?;
        Ok(evaluate_archiving(&a, &self.thresholds))
    }
}

/// What `pg_stat_archiver` and `archive_status` say.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchiverFacts {
    /// The server is a standby.
    pub in_recovery: bool,
    /// `off`, `on` or `always`.
    pub archive_mode: String,
    /// Segments archived since the statistics reset.
    pub archived_count: f64,
    /// Failed attempts since the statistics reset.
    pub failed_count: f64,
    /// Seconds since the last success (`None`: never).
    pub archived_age: Option<f64>,
    /// Seconds since the last failure (`None`: never).
    pub failed_age: Option<f64>,
    /// The last failure is newer than the last success.
    pub failing: bool,
    /// The WAL file of the last failure.
    pub last_failed_wal: Option<String>,
    /// Segments waiting (`.ready`).
    pub pending: f64,
    /// Seconds since the oldest waiting segment became ready.
    pub oldest_pending_age: Option<f64>,
}

/// Reads the row of [`ARCHIVING_SQL`].
///
/// # Errors
/// A message when a value is NULL or malformed where a number is expected.
pub fn parse_archiver(r: &TextRow) -> Result<ArchiverFacts, String> {
    Ok(ArchiverFacts {
        in_recovery: r.opt_bool("in_recovery").ok_or("`in_recovery` is NULL")?,
        archive_mode: r.text("archive_mode").unwrap_or("off").to_string(),
        archived_count: r.f64("archived_count")?,
        failed_count: r.f64("failed_count")?,
        archived_age: r.opt_f64("archived_age")?,
        failed_age: r.opt_f64("failed_age")?,
        failing: r.opt_bool("failing").unwrap_or(false),
        last_failed_wal: r.text("last_failed_wal").map(str::to_string),
        pending: r.f64("pending")?,
        oldest_pending_age: r.opt_f64("oldest_pending_age")?,
    })
}

/// The archiving delay: 0 when nothing waits, else the time since the later of the last
/// success and the oldest waiting segment becoming ready.
pub fn archive_delay(a: &ArchiverFacts) -> f64 {
    if a.pending <= 0.0 {
        return 0.0;
    }
    let delay = match (a.archived_age, a.oldest_pending_age) {
        (Some(x), Some(y)) => x.min(y),
        (Some(x), None) | (None, Some(x)) => x,
        (None, None) => 0.0,
    };
    delay.max(0.0)
}

/// Judges the archiver and writes the message and metrics.
pub fn evaluate_archiving(a: &ArchiverFacts, t: &Thresholds) -> Observation {
    let mode_applies = if a.in_recovery {
        a.archive_mode == "always"
    } else {
        a.archive_mode != "off"
    };
    if !mode_applies {
        let (status, message) = if a.in_recovery {
            (
                Status::Ok,
                format!(
                    "standby with archive_mode = {}: the primary archives",
                    a.archive_mode
                ),
            )
        } else {
            (
                Status::Warning,
                "archiving disabled (archive_mode = off)".to_string(),
            )
        };
        return Observation {
            status,
            value: None,
            message,
            metrics: Vec::new(),
            replication: None,
        };
    }
    let delay = archive_delay(a);
    let mut status = t.classify(delay);
    let last_success = match a.archived_age {
        Some(s) => format!("last success {} ago", format_secs(s)),
        None => "nothing archived since the statistics reset".to_string(),
    };
    let mut message = if a.pending <= 0.0 {
        format!("archiver caught up; {last_success}")
    } else {
        format!(
            "{} segment(s) waiting to be archived for {}; {last_success}",
            a.pending,
            format_secs(delay)
        )
    };
    if a.failing {
        status = Status::Critical;
        message = format!(
            "archive_command failing: {} failed {} ago ({} failures since the statistics \
             reset); {message}",
            a.last_failed_wal.as_deref().unwrap_or("a WAL file"),
            format_secs(a.failed_age.unwrap_or(0.0)),
            a.failed_count
        );
    }
    let metrics = vec![
        Metric::gauge(
            "vigil_pg_archive_age_seconds",
            "Seconds since the last successful WAL archive while segments wait (0 when caught up)",
            delay,
        ),
        Metric::gauge(
            "vigil_pg_archive_pending_segments",
            "WAL segments waiting to be archived",
            a.pending,
        ),
        Metric::gauge(
            "vigil_pg_archive_failing",
            "1 when the last archive attempt failed after the last success",
            f64::from(u8::from(a.failing)),
        ),
        Metric::counter(
            "vigil_pg_archived_segments_total",
            "WAL files archived since the server's statistics reset",
            a.archived_count,
        ),
        Metric::counter(
            "vigil_pg_archive_failures_total",
            "Failed archive attempts since the server's statistics reset",
            a.failed_count,
        ),
    ];
    Observation {
        status,
        value: Some(delay),
        message,
        metrics,
        replication: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> ArchiverFacts {
        ArchiverFacts {
            in_recovery: false,
            archive_mode: "on".into(),
            archived_count: 10.0,
            failed_count: 0.0,
            archived_age: Some(7200.0),
            failed_age: None,
            failing: false,
            last_failed_wal: None,
            pending: 0.0,
            oldest_pending_age: None,
        }
    }

    fn t() -> Thresholds {
        Thresholds::higher(Some(DEFAULT_WARN), Some(DEFAULT_CRIT))
    }

    #[test]
    fn idle_server_with_nothing_waiting_is_zero() {
        let o = evaluate_archiving(&facts(), &t());
        assert_eq!(o.status, Status::Ok);
        assert_eq!(o.value, Some(0.0));
        assert_eq!(o.message, "archiver caught up; last success 2h 0m ago");
    }

    #[test]
    fn waiting_segments_count_from_the_later_of_success_and_ready() {
        let mut a = facts();
        a.pending = 3.0;
        a.oldest_pending_age = Some(1000.0);
        assert_eq!(archive_delay(&a), 1000.0);
        assert_eq!(evaluate_archiving(&a, &t()).status, Status::Critical);
        a.archived_age = Some(20.0);
        assert_eq!(archive_delay(&a), 20.0);
        a.archived_age = None;
        assert_eq!(archive_delay(&a), 1000.0);
    }

    #[test]
    fn failure_newer_than_success_is_critical_by_itself() {
        let mut a = facts();
        a.failing = true;
        a.failed_count = 4.0;
        a.failed_age = Some(5.0);
        a.last_failed_wal = Some("00000001000000000000000A".into());
        a.pending = 1.0;
        a.oldest_pending_age = Some(6.0);
        let o = evaluate_archiving(&a, &t());
        assert_eq!(o.status, Status::Critical);
        assert!(
            o.message
                .starts_with("archive_command failing: 00000001000000000000000A failed 5.0s ago"),
            "{}",
            o.message
        );
    }

    #[test]
    fn disabled_archiving_and_standbys() {
        let mut a = facts();
        a.archive_mode = "off".into();
        let o = evaluate_archiving(&a, &t());
        assert_eq!((o.status, o.value), (Status::Warning, None));
        a.in_recovery = true;
        a.archive_mode = "on".into();
        let o = evaluate_archiving(&a, &t());
        assert_eq!((o.status, o.value), (Status::Ok, None));
        a.archive_mode = "always".into();
        assert_eq!(evaluate_archiving(&a, &t()).value, Some(0.0));
    }

    #[test]
    fn null_counts_are_errors() {
        let r = TextRow::from_pairs(&[("in_recovery", Some("f")), ("archived_count", None)]);
        assert!(parse_archiver(&r).is_err());
    }
}
