//! `postgres.wraparound`: how close the oldest database is to transaction ID wraparound.
//!
//! The value is the largest `age(datfrozenxid)` over `pg_database`, as a ratio of 2^31 (the
//! server stops assigning XIDs shortly before 1.0). The multixact age
//! (`mxid_age(datminmxid)`) wraps the same way and is judged with the same thresholds; the
//! message names the database that is furthest along.
//!
//! Defaults when neither `warn` nor `crit` is given: 50% and 75% (autovacuum's forced
//! freeze starts at 200 million, about 9%, so 50% means it has been failing for a long
//! time).

use super::{PgTarget, one_row, parse_err, validate_dsn};
use crate::checks::Common;
use crate::checks::KindConfig;
use crate::checks::{Check, CheckContext, CheckError, Metric, Observation, Thresholds};
use crate::config::types::Ratio;
use crate::pg::{Dsn, TextRow};

/// Warning default (50%).
const DEFAULT_WARN: f64 = 0.50;
/// Critical default (75%).
const DEFAULT_CRIT: f64 = 0.75;
/// The distance at which XIDs (and multixacts) wrap.
const WRAP: f64 = 2147483648.0;

/// PostgreSQL 12+; no privilege needed.
const WRAPAROUND_SQL: &str = "\
SELECT x.datname AS xid_database, x.xid_age, m.datname AS mxid_database, m.mxid_age \
  FROM (SELECT datname, age(datfrozenxid) AS xid_age FROM pg_database \
         ORDER BY 2 DESC LIMIT 1) AS x, \
       (SELECT datname, mxid_age(datminmxid) AS mxid_age FROM pg_database \
         ORDER BY 2 DESC LIMIT 1) AS m";

crate::check_config! {
    /// `[check.postgres.wraparound.NAME]`: max `age(datfrozenxid)` as a ratio of 2^31.
    pub struct WraparoundConfig: Ratio {
        /// The connection string (libpq `key=value` or URL form).
        pub dsn: Dsn,
    }
}

impl WraparoundConfig {
    /// The DSN must parse.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        validate_dsn(&self.dsn)
    }
}

/// A running `postgres.wraparound` check.
pub struct WraparoundCheck {
    target: PgTarget,
    thresholds: Thresholds,
}

impl WraparoundCheck {
    /// Builds the check, applying the defaults.
    pub fn from_config(c: &WraparoundConfig, common: &Common) -> Self {
        let (warn, crit) = KindConfig::thresholds_or(c, DEFAULT_WARN, DEFAULT_CRIT);
        WraparoundCheck {
            target: PgTarget::new(&c.dsn, common.timeout),
            thresholds: Thresholds::higher(warn, crit),
        }
    }
}

impl Check for WraparoundCheck {
    async fn run(&mut self, cx: &CheckContext) -> Result<Observation, CheckError> {
        let mut session = self.target.session(cx).await?;
        let sets = session.query("wraparound", WRAPAROUND_SQL).await?;
        let row = one_row(&sets, 0, "wraparound").map_err(parse_err("wraparound"))?;
        let a = parse_wraparound(row).map_err(parse_err("wraparound"))?;
        Ok(evaluate_wraparound(&a, &self.thresholds))
    }
}

/// The oldest databases by XID and by multixact age.
#[derive(Debug, Clone, PartialEq)]
pub struct WraparoundAges {
    /// The database with the oldest `datfrozenxid`.
    pub xid_database: String,
    /// Its `age(datfrozenxid)`.
    pub xid_age: f64,
    /// The database with the oldest `datminmxid`.
    pub mxid_database: String,
    /// Its `mxid_age(datminmxid)`.
    pub mxid_age: f64,
}

/// Reads the row of [`WRAPAROUND_SQL`].
///
/// # Errors
/// A message when an age is NULL or malformed.
pub fn parse_wraparound(r: &TextRow) -> Result<WraparoundAges, String> {
    Ok(WraparoundAges {
        xid_database: r.text("xid_database").unwrap_or("").to_string(),
        xid_age: r.f64("xid_age")?,
        mxid_database: r.text("mxid_database").unwrap_or("").to_string(),
        mxid_age: r.f64("mxid_age")?,
    })
}

/// Judges the ages and writes the message and metrics.
pub fn evaluate_wraparound(a: &WraparoundAges, t: &Thresholds) -> Observation {
    let xid = a.xid_age / WRAP;
    let mxid = a.mxid_age / WRAP;
    let status = t.classify(xid).worse(t.classify(mxid));
    let mut message = format!(
        "oldest XID age {:.0} in database '{}' ({:.1}% of wraparound)",
        a.xid_age,
        a.xid_database,
        xid * 100.0
    );
    if mxid > xid {
        message.push_str(&format!(
            "; oldest multixact age {:.0} in '{}' ({:.1}%)",
            a.mxid_age,
            a.mxid_database,
            mxid * 100.0
        ));
    }
    Observation {
        status,
        value: Some(xid),
        message,
        metrics: vec![
            Metric::gauge(
                "vigil_pg_oldest_xid_age",
                "Largest age(datfrozenxid) over the databases, in transactions",
                a.xid_age,
            ),
            Metric::gauge(
                "vigil_pg_oldest_multixact_age",
                "Largest mxid_age(datminmxid) over the databases, in multixacts",
                a.mxid_age,
            ),
        ],
        replication: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::Status;

    #[test]
    fn ratio_of_two_to_the_31() {
        let r = TextRow::from_pairs(&[
            ("xid_database", Some("orders")),
            ("xid_age", Some("1073741824")),
            ("mxid_database", Some("postgres")),
            ("mxid_age", Some("5")),
        ]);
        let a = parse_wraparound(&r).unwrap();
        let o = evaluate_wraparound(
            &a,
            &Thresholds::higher(Some(DEFAULT_WARN), Some(DEFAULT_CRIT)),
        );
        assert_eq!(o.value, Some(0.5));
        assert_eq!(o.status, Status::Warning);
        assert_eq!(
            o.message,
            "oldest XID age 1073741824 in database 'orders' (50.0% of wraparound)"
        );
    }

    #[test]
    fn multixact_age_trips_too() {
        let a = WraparoundAges {
            xid_database: "a".into(),
            xid_age: 1000.0,
            mxid_database: "b".into(),
            mxid_age: 1.7e9,
        };
        let o = evaluate_wraparound(
            &a,
            &Thresholds::higher(Some(DEFAULT_WARN), Some(DEFAULT_CRIT)),
        );
        assert_eq!(o.status, Status::Critical);
        assert!(
            o.message.contains("multixact age 1700000000 in 'b'"),
            "{}",
            o.message
        );
    }
}
