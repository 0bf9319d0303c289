//! `postgres.connections`: how full `max_connections` is.
//!
//! The value is used / `max_connections`, counting the backends that take a connection
//! slot: `pg_stat_activity` rows of type `client backend` (vigil's own included).
//! Walsenders (their own `max_wal_senders` pool since PostgreSQL 12) and background workers
//! do not count. The reserved slots (`superuser_reserved_connections`, and
//! `reserved_connections` from 16) are in the message, and when ordinary roles have no slot
//! left the check is critical by itself, whatever the thresholds say: new application
//! connections are being refused.
//!
//! Defaults when neither `warn` nor `crit` is given: 80% and 90%.

use super::{PgTarget, one_row, parse_err, validate_dsn};
use crate::checks::Common;
use crate::checks::KindConfig;
use crate::checks::{Check, CheckContext, CheckError, Metric, Observation, Status, Thresholds};
use crate::config::types::Ratio;
use crate::pg::{Dsn, TextRow};

/// Warning default (80%).
const DEFAULT_WARN: f64 = 0.80;
/// Critical default (90%).
const DEFAULT_CRIT: f64 = 0.90;

/// PostgreSQL 12+ (`reserved_connections` is read only where it exists, 16+); no privilege
/// needed (`backend_type` is visible to every role).
const CONNECTIONS_SQL: &str = "\
SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend') AS used, \
       current_setting('max_connections')::int AS max_connections, \
       current_setting('superuser_reserved_connections')::int AS superuser_reserved, \
       coalesce(current_setting('reserved_connections', true)::int, 0) AS reserved";

crate::check_config! {
    /// `[check.postgres.connections.NAME]`: used ratio of `max_connections`.
    pub struct ConnectionsConfig: Ratio {
        /// The connection string (libpq `key=value` or URL form).
        pub dsn: Dsn,
    }
}

impl ConnectionsConfig {
    /// The DSN must parse.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        validate_dsn(&self.dsn)
    }
}

/// A running `postgres.connections` check.
pub struct ConnectionsCheck {
    target: PgTarget,
    thresholds: Thresholds,
}

impl ConnectionsCheck {
    /// Builds the check, applying the defaults.
    pub fn from_config(c: &ConnectionsConfig, common: &Common) -> Self {
        let (warn, crit) = KindConfig::thresholds_or(c, DEFAULT_WARN, DEFAULT_CRIT);
        ConnectionsCheck {
            target: PgTarget::new(&c.dsn, common.timeout),
            thresholds: Thresholds::higher(warn, crit),
        }
    }
}

impl Check for ConnectionsCheck {
    async fn run(&mut self, cx: &CheckContext) -> Result<Observation, CheckError> {
        let mut session = self.target.session(cx).await?;
        let sets = session.query("connections", CONNECTIONS_SQL).await?;
        let row = one_row(&sets, 0, "connections").map_err(parse_err("connections"))?;
        let u = parse_connections(row).map_err(parse_err("connections"))?;
        Ok(evaluate_connections(&u, &self.thresholds))
    }
}

/// Connection slot usage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectionUsage {
    /// Client backends.
    pub used: f64,
    /// `max_connections`.
    pub max: f64,
    /// Slots only privileged roles may use.
    pub reserved: f64,
}

/// Reads the row of [`CONNECTIONS_SQL`].
///
/// # Errors
/// A message when a value is NULL or malformed.
pub fn parse_connections(r: &TextRow) -> Result<ConnectionUsage, String> {
    Ok(ConnectionUsage {
        used: r.f64("used")?,
        max: r.f64("max_connections")?,
        reserved: r.f64("superuser_reserved")? + r.f64("reserved")?,
    })
}

/// Judges the usage and writes the message and metrics.
pub fn evaluate_connections(u: &ConnectionUsage, t: &Thresholds) -> Observation {
    let ratio = if u.max > 0.0 { u.used / u.max } else { 0.0 };
    let mut status = t.classify(ratio);
    let ordinary = (u.max - u.reserved).max(0.0);
    let mut message = format!(
        "{} of max_connections {} used ({:.0}%); {} reserved for privileged roles",
        u.used,
        u.max,
        ratio * 100.0,
        u.reserved
    );
    if u.used >= ordinary {
        status = Status::Critical;
        message.push_str("; no slots left for ordinary roles: new connections are refused");
    }
    Observation {
        status,
        value: Some(ratio),
        message,
        metrics: vec![
            Metric::gauge(
                "vigil_pg_connections_used",
                "Client backends using a connection slot",
                u.used,
            ),
            Metric::gauge("vigil_pg_connections_max", "max_connections", u.max),
            Metric::gauge(
                "vigil_pg_connections_reserved",
                "Connection slots reserved for privileged roles",
                u.reserved,
            ),
        ],
        replication: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Thresholds {
        Thresholds::higher(Some(DEFAULT_WARN), Some(DEFAULT_CRIT))
    }

    #[test]
    fn ratio_of_max_connections() {
        let r = TextRow::from_pairs(&[
            ("used", Some("80")),
            ("max_connections", Some("100")),
            ("superuser_reserved", Some("3")),
            ("reserved", Some("0")),
        ]);
        let u = parse_connections(&r).unwrap();
        let o = evaluate_connections(&u, &t());
        assert_eq!(o.value, Some(0.8));
        assert_eq!(o.status, Status::Warning);
        assert_eq!(
            o.message,
            "80 of max_connections 100 used (80%); 3 reserved for privileged roles"
        );
    }

    #[test]
    fn no_ordinary_slot_left_is_critical_by_itself() {
        let u = ConnectionUsage {
            used: 17.0,
            max: 20.0,
            reserved: 3.0,
        };
        let o = evaluate_connections(&u, &Thresholds::higher(None, Some(0.99)));
        assert_eq!(o.status, Status::Critical);
        assert!(o.message.contains("new connections are refused"));
    }

    #[test]
    fn null_is_an_error() {
        let r = TextRow::from_pairs(&[("used", None)]);
        assert!(parse_connections(&r).is_err());
    }
}
