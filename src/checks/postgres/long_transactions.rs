//! `postgres.long_transactions`: the oldest open transaction.
//!
//! The value is the age in seconds of the oldest open transaction: client backends in
//! `pg_stat_activity` that are not idle and hold a transaction ID or snapshot
//! (`backend_xid`/`backend_xmin`) — these hold back vacuum — and prepared transactions
//! (`pg_prepared_xacts`), which hold it back just the same and are easily forgotten. vigil's
//! own session is left out. 0 when none is open. Autovacuum workers are left out: a long
//! anti-wraparound vacuum is the cure, not the disease.
//!
//! Defaults when neither `warn` nor `crit` is given: 5m and 1h.

use super::{PgTarget, format_secs, parse_err, validate_dsn};
use crate::checks::Common;
use crate::checks::KindConfig;
use crate::checks::{Check, CheckContext, CheckError, Metric, Observation, Thresholds};
use crate::config::types::Duration;
use crate::pg::{Dsn, TextRow};

/// Warning default, seconds (5m).
const DEFAULT_WARN: f64 = 300.0;
/// Critical default, seconds (1h).
const DEFAULT_CRIT: f64 = 3600.0;

/// PostgreSQL 12+; `pg_monitor` (`pg_read_all_stats`: without it other roles' `xact_start`
/// reads as NULL and their transactions go unseen). Exactly one row: the oldest session
/// transaction and the oldest prepared transaction side by side (NULLs when none), in one
/// statement because each statement costs the server a round of its own.
const LONG_TRANSACTIONS_SQL: &str = "\
SELECT s.pid, s.usename, s.application_name, s.state, s.age, \
       p.gid, p.database, p.age AS prepared_age \
  FROM (SELECT 1) AS one \
  LEFT JOIN LATERAL ( \
    SELECT pid, usename, application_name, state, \
           extract(epoch FROM now() - xact_start)::float8 AS age \
      FROM pg_stat_activity \
     WHERE backend_type = 'client backend' AND xact_start IS NOT NULL \
       AND state IS DISTINCT FROM 'idle' \
       AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL) \
       AND pid <> pg_backend_pid() \
     ORDER BY xact_start LIMIT 1) AS s ON true \
  LEFT JOIN LATERAL ( \
    SELECT gid, database, extract(epoch FROM now() - prepared)::float8 AS age \
      FROM pg_prepared_xacts ORDER BY prepared LIMIT 1) AS p ON true";

crate::check_config! {
    /// `[check.postgres.long_transactions.NAME]`: age of the oldest open transaction,
    /// seconds.
    pub struct LongTransactionsConfig: Duration {
        /// The connection string (libpq `key=value` or URL form).
        pub dsn: Dsn,
    }
}

impl LongTransactionsConfig {
    /// The DSN must parse.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        validate_dsn(&self.dsn)
    }
}

/// A running `postgres.long_transactions` check.
pub struct LongTransactionsCheck {
    target: PgTarget,
    thresholds: Thresholds,
}

impl LongTransactionsCheck {
    /// Builds the check, applying the defaults.
    pub fn from_config(c: &LongTransactionsConfig, common: &Common) -> Self {
        let (warn, crit) = KindConfig::thresholds_or(c, DEFAULT_WARN, DEFAULT_CRIT);
        LongTransactionsCheck {
            target: PgTarget::new(&c.dsn, common.timeout),
            thresholds: Thresholds::higher(warn, crit),
        }
    }
}

impl Check for LongTransactionsCheck {
    async fn run(&mut self, cx: &CheckContext) -> Result<Observation, CheckError> {
        let mut session = self.target.session(cx).await?;
        let sets = session
            .query("long_transactions", LONG_TRANSACTIONS_SQL)
            .await?;
        let oldest = parse_oldest(&sets).map_err(parse_err("long_transactions"))?;
        Ok(evaluate_long_transactions(
            oldest.as_ref(),
            &self.thresholds,
        ))
    }
}

/// The oldest open transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum OldestXact {
    /// A session's.
    Session {
        /// Backend pid.
        pid: String,
        /// Role.
        user: String,
        /// `application_name`.
        application: String,
        /// `active`, `idle in transaction`, …
        state: String,
        /// Seconds open.
        age: f64,
    },
    /// A prepared (two-phase) transaction's.
    Prepared {
        /// Its global id.
        gid: String,
        /// Its database.
        database: String,
        /// Seconds since it was prepared.
        age: f64,
    },
}

impl OldestXact {
    fn age(&self) -> f64 {
        match self {
            OldestXact::Session { age, .. } | OldestXact::Prepared { age, .. } => *age,
        }
    }
}

/// Reads the row of [`LONG_TRANSACTIONS_SQL`]; `None` when nothing is open.
///
/// # Errors
/// A message when the row is missing, or an age is NULL or malformed.
pub fn parse_oldest(sets: &[Vec<TextRow>]) -> Result<Option<OldestXact>, String> {
    let r = sets
        .first()
        .and_then(|s| s.first())
        .ok_or("the query returned no row")?;
    let mut found: Vec<OldestXact> = Vec::new();
    if r.text("pid").is_some() {
        found.push(OldestXact::Session {
            pid: r.text("pid").unwrap_or("?").to_string(),
            user: r.text("usename").unwrap_or("?").to_string(),
            application: r.text("application_name").unwrap_or("").to_string(),
            state: r.text("state").unwrap_or("?").to_string(),
            age: r.f64("age")?.max(0.0),
        });
    }
    if r.text("gid").is_some() {
        found.push(OldestXact::Prepared {
            gid: r.text("gid").unwrap_or("?").to_string(),
            database: r.text("database").unwrap_or("?").to_string(),
            age: r.f64("prepared_age")?.max(0.0),
        });
    }
    Ok(found.into_iter().max_by(|a, b| a.age().total_cmp(&b.age())))
}

/// Judges the oldest transaction and writes the message and metrics.
pub fn evaluate_long_transactions(oldest: Option<&OldestXact>, t: &Thresholds) -> Observation {
    let age = oldest.map_or(0.0, OldestXact::age);
    let message = match oldest {
        None => "no open transaction".to_string(),
        Some(OldestXact::Session {
            pid,
            user,
            application,
            state,
            age,
        }) => format!(
            "oldest open transaction: pid {pid} (user {user}, application '{application}', \
             {state}) open for {}",
            format_secs(*age)
        ),
        Some(OldestXact::Prepared { gid, database, age }) => format!(
            "oldest open transaction: prepared transaction '{gid}' in database '{database}' \
             open for {} (COMMIT PREPARED or ROLLBACK PREPARED it)",
            format_secs(*age)
        ),
    };
    Observation {
        status: t.classify(age),
        value: Some(age),
        message,
        metrics: vec![Metric::gauge(
            "vigil_pg_oldest_transaction_seconds",
            "Age of the oldest open transaction (0 when none)",
            age,
        )],
        replication: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::Status;

    fn t() -> Thresholds {
        Thresholds::higher(Some(DEFAULT_WARN), Some(DEFAULT_CRIT))
    }

    #[test]
    fn none_open_is_zero() {
        let none = TextRow::from_pairs(&[("pid", None), ("age", None), ("gid", None)]);
        let o = evaluate_long_transactions(parse_oldest(&[vec![none]]).unwrap().as_ref(), &t());
        assert_eq!(o.value, Some(0.0));
        assert_eq!(o.status, Status::Ok);
    }

    #[test]
    fn oldest_of_sessions_and_prepared() {
        let sets = vec![vec![TextRow::from_pairs(&[
            ("pid", Some("4242")),
            ("usename", Some("app")),
            ("application_name", Some("psql")),
            ("state", Some("idle in transaction")),
            ("age", Some("400")),
            ("gid", Some("tx1")),
            ("database", Some("orders")),
            ("prepared_age", Some("10")),
        ])]];
        let oldest = parse_oldest(&sets).unwrap();
        let o = evaluate_long_transactions(oldest.as_ref(), &t());
        assert_eq!(o.status, Status::Warning);
        assert_eq!(
            o.message,
            "oldest open transaction: pid 4242 (user app, application 'psql', idle in \
             transaction) open for 6m 40s"
        );
    }

    #[test]
    fn null_age_is_an_error() {
        let sets = vec![vec![TextRow::from_pairs(&[
            ("pid", Some("1")),
            ("age", None),
        ])]];
        assert!(parse_oldest(&sets).is_err());
    }
}
