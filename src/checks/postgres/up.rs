//! `postgres.up`: can vigil reach the server, and how fast does it answer.
//!
//! The value is the round trip of one `SELECT` on the shared session, in seconds; a run that
//! had to open the session adds the connect time, so the first sample after an outage shows
//! what a new client would wait. (A fresh connection every run would measure connects
//! exactly but cost the server a backend fork per interval; exhaustion of new connections is
//! what `postgres.connections` watches.) The role and version are in the message.
//!
//! A connection failure is `unknown` with the error, as for every kind, but reported as an
//! observation so that `vigil_pg_up` can say 0.
//!
//! Defaults when neither `warn` nor `crit` is given: 1s and 5s.

use std::time::Duration as StdDuration;

use tokio::time::Instant;

use super::{PgTarget, format_secs, one_row, parse_err, validate_dsn};
use crate::checks::Common;
use crate::checks::KindConfig;
use crate::checks::{
    Check, CheckContext, CheckError, Metric, Observation, Role, Status, Thresholds,
};
use crate::config::types::Duration;
use crate::pg::{Dsn, PgError};

/// Round-trip warning default (seconds).
const DEFAULT_WARN: f64 = 1.0;
/// Round-trip critical default (seconds).
const DEFAULT_CRIT: f64 = 5.0;

/// PostgreSQL 12+; no privilege needed.
const UP_SQL: &str = "SELECT pg_is_in_recovery() AS in_recovery";

crate::check_config! {
    /// `[check.postgres.up.NAME]`: connect and `SELECT` round trip, seconds.
    pub struct UpConfig: Duration {
        /// The connection string (libpq `key=value` or URL form).
        pub dsn: Dsn,
    }
}

impl UpConfig {
    /// The DSN must parse.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        validate_dsn(&self.dsn)
    }
}

/// A running `postgres.up` check.
pub struct UpCheck {
    target: PgTarget,
    thresholds: Thresholds,
}

impl UpCheck {
    /// Builds the check, applying the defaults.
    pub fn from_config(c: &UpConfig, common: &Common) -> Self {
        let (warn, crit) = KindConfig::thresholds_or(c, DEFAULT_WARN, DEFAULT_CRIT);
        UpCheck {
            target: PgTarget::new(&c.dsn, common.timeout),
            thresholds: Thresholds::higher(warn, crit),
        }
    }
}

impl Check for UpCheck {
    async fn run(&mut self, cx: &CheckContext) -> Result<Observation, CheckError> {
        let started = Instant::now();
        let mut session = match self.target.session(cx).await {
            Ok(s) => s,
            Err(CheckError::Pg(e @ PgError::Connect { .. })) => return Ok(down(&e)),
            Err(e) => return Err(e),
        };
        let connect = session.connected_now().then(|| started.elapsed());
        let t0 = Instant::now();
        let sets = session.query("up", UP_SQL).await?;
        let rtt = t0.elapsed();
        let row = one_row(&sets, 0, "up").map_err(parse_err("up"))?;
        let role = match row.opt_bool("in_recovery") {
            Some(true) => Role::Standby,
            Some(false) => Role::Primary,
            None => return Err(parse_err("up")("`in_recovery` is NULL".into())),
        };
        let value = rtt + connect.unwrap_or(StdDuration::ZERO);
        Ok(evaluate_up(
            role,
            session.server_version(),
            value,
            connect,
            session.connect_seconds(),
            &self.thresholds,
        ))
    }
}

fn down(e: &PgError) -> Observation {
    Observation {
        status: Status::Unknown,
        value: None,
        message: e.to_string(),
        metrics: vec![Metric::gauge(
            "vigil_pg_up",
            "1 when the server answered the check's query, 0 when it could not be reached",
            0.0,
        )],
        replication: None,
    }
}

/// Classifies one successful round trip and writes its message and metrics.
pub fn evaluate_up(
    role: Role,
    version: &str,
    value: StdDuration,
    connect: Option<StdDuration>,
    last_connect_seconds: Option<f64>,
    thresholds: &Thresholds,
) -> Observation {
    let secs = value.as_secs_f64();
    let status = thresholds.classify(secs);
    let role_name = match role {
        Role::Primary => "primary",
        Role::Standby => "standby",
    };
    let mut message = format!(
        "{role_name}: PostgreSQL {version} answered in {}",
        format_secs(secs)
    );
    if let Some(c) = connect {
        message.push_str(&format!(
            " (connecting took {})",
            format_secs(c.as_secs_f64())
        ));
    }
    let mut metrics = vec![
        Metric::gauge(
            "vigil_pg_up",
            "1 when the server answered the check's query, 0 when it could not be reached",
            1.0,
        ),
        Metric::gauge(
            "vigil_pg_is_standby",
            "1 when the server is in recovery (a standby), 0 on a primary",
            f64::from(u8::from(role == Role::Standby)),
        ),
        Metric::gauge(
            "vigil_pg_query_seconds",
            "Round-trip time of the check's query on the shared session",
            secs - connect.map_or(0.0, |c| c.as_secs_f64()),
        ),
    ];
    if let Some(c) = last_connect_seconds {
        metrics.push(Metric::gauge(
            "vigil_pg_connect_seconds",
            "Time the current session took to connect",
            c,
        ));
    }
    Observation {
        status,
        value: Some(secs),
        message,
        metrics,
        replication: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_role_and_version() {
        let t = Thresholds::higher(Some(1.0), Some(5.0));
        let o = evaluate_up(
            Role::Standby,
            "15.6",
            StdDuration::from_micros(400),
            None,
            Some(0.01),
            &t,
        );
        assert_eq!(o.status, Status::Ok);
        assert_eq!(o.message, "standby: PostgreSQL 15.6 answered in 0.4 ms");
        assert!(
            o.metrics
                .iter()
                .any(|m| m.name == "vigil_pg_is_standby" && m.value == 1.0)
        );
        let o = evaluate_up(
            Role::Primary,
            "15.6",
            StdDuration::from_secs(2),
            Some(StdDuration::from_millis(1900)),
            Some(1.9),
            &t,
        );
        assert_eq!(o.status, Status::Warning);
        assert!(o.message.contains("connecting took"), "{}", o.message);
    }

    #[test]
    fn down_is_unknown_with_the_error() {
        let e = PgError::Connect {
            target: "host=/tmp port=5432 user=v dbname=v".into(),
            reason: "connection refused".into(),
            code: None,
            retry_in: None,
        };
        let o = down(&e);
        assert_eq!(o.status, Status::Unknown);
        assert_eq!(o.value, None);
        assert!(o.message.contains("connection refused"));
    }
}
