//! Patroni-style routing answers for load balancers: `/primary` (also `/`, `/master`,
//! `/read-write`), `/replica` (with `?lag=`), `/read-only`.
//!
//! They rest on the newest cached sample of a `postgres.replication` check (`?check=NAME`,
//! else the first in the config) and answer 200 only when everything a load balancer
//! should trust holds at once: the sample measured, is fresh (not older than three
//! intervals, so a hung agent can never keep a server in rotation), the lifecycle is
//! `available`, the role matches, and — for a replica — the WAL receiver is streaming (a
//! standby replaying from the archive is not a healthy replica). Otherwise 503 with the
//! reason; an unparsable `lag` is 400 rather than silently ignored.

use serde_json::{Value, json};
use tokio::time::Instant;

use super::routes::{Resp, error, json_ok};
use crate::checks::{ReplicationFacts, Role};
use crate::config::types::{parse_duration, parse_size};
use crate::lifecycle::Lifecycle;
use crate::state::{CheckView, Snapshot};
use hyper::StatusCode;

/// The kind whose samples routing rests on.
const REPLICATION_KIND: &str = "postgres.replication";

/// Which answer is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// `/primary`, `/`, `/master`, `/read-write`.
    Primary,
    /// `/replica`.
    Replica,
    /// `/read-only`: a primary or a replica.
    ReadOnly,
}

/// A `?lag=` limit: a size or a duration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LagLimit {
    /// Bytes of replay lag.
    Bytes(f64),
    /// Seconds of replay lag.
    Seconds(f64),
}

/// Parses `?lag=`: a size (`16MB`, `16MiB`, bare bytes) or a duration (`10s`).
///
/// # Errors
/// A message when the value is neither.
pub fn parse_lag(s: &str) -> Result<LagLimit, String> {
    if let Ok(b) = parse_size(s) {
        return Ok(LagLimit::Bytes(b.0 as f64));
    }
    parse_duration(s)
        .map(|d| LagLimit::Seconds(d.0.as_secs_f64()))
        .map_err(|_| {
            format!("invalid lag {s:?}: expected a size (16MB, 16MiB, bytes) or a duration (10s)")
        })
}

/// Why a routing answer is not 200.
struct Refusal {
    reason: &'static str,
    message: String,
}

fn refuse(reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        message: message.into(),
    }
}

/// Answers a routing request.
pub fn answer(snap: &Snapshot, want: Want, query: Option<&str>, now: Instant) -> Resp {
    let mut check_name = None;
    let mut lag = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "check" => check_name = Some(v.into_owned()),
            "lag" => match parse_lag(&v) {
                Ok(l) => lag = Some(l),
                Err(e) => return error(StatusCode::BAD_REQUEST, &e, "bad_request", json!({})),
            },
            // Patroni accepts other parameters (tags, replication_state); they do not
            // change this answer, and refusing them would break existing health checks.
            _ => {}
        }
    }
    let view = match &check_name {
        Some(n) => snap
            .checks
            .iter()
            .find(|c| c.name == *n && c.kind == REPLICATION_KIND),
        None => snap.checks.iter().find(|c| c.kind == REPLICATION_KIND),
    };
    let Some(view) = view else {
        let msg = match check_name {
            Some(n) => format!("no {REPLICATION_KIND} check named {n:?} is running"),
            None => format!("no {REPLICATION_KIND} check is configured on this host"),
        };
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            &msg,
            "no_replication_check",
            json!({}),
        );
    };
    let details = details(snap, view);
    match decide(snap, view, want, lag, now) {
        Ok(()) => json_ok(&details),
        Err(r) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &r.message,
            r.reason,
            details,
        ),
    }
}

fn details(snap: &Snapshot, view: &CheckView) -> Value {
    let f = view.replication;
    json!({
        "check": view.name,
        "role": f.map(|f| f.role),
        "streaming": f.map(|f| f.streaming),
        "lag_bytes": f.and_then(|f| f.lag_bytes),
        "lag_seconds": f.and_then(|f| f.lag_seconds),
        "tripped": view.hysteresis.tripped,
        "status": view.status,
        "lifecycle": snap.lifecycle.state,
    })
}

fn decide(
    snap: &Snapshot,
    view: &CheckView,
    want: Want,
    lag: Option<LagLimit>,
    now: Instant,
) -> Result<(), Refusal> {
    if snap.lifecycle.state != Lifecycle::Available {
        return Err(refuse(
            "lifecycle",
            format!("lifecycle is {}", snap.lifecycle.state),
        ));
    }
    if view.sampled_at.is_none() {
        return Err(refuse(
            "starting",
            format!("check {:?} has not been sampled yet", view.name),
        ));
    }
    if view.is_stale(now) {
        return Err(refuse(
            "stale",
            format!(
                "the newest sample of {:?} is older than three intervals",
                view.name
            ),
        ));
    }
    let Some(facts) = view.replication else {
        return Err(refuse(
            "unknown",
            format!("check {:?} could not measure: {}", view.name, view.message),
        ));
    };
    match want {
        Want::Primary => primary(view, facts),
        Want::Replica => replica(view, facts, lag),
        Want::ReadOnly => primary(view, facts).or_else(|_| replica(view, facts, lag)),
    }
}

fn primary(view: &CheckView, f: ReplicationFacts) -> Result<(), Refusal> {
    if f.role != Role::Primary {
        return Err(refuse("not_primary", "this server is a standby"));
    }
    if view.hysteresis.tripped {
        return Err(refuse(
            "tripped",
            format!("check {:?} is tripped: {}", view.name, view.message),
        ));
    }
    Ok(())
}

fn replica(view: &CheckView, f: ReplicationFacts, lag: Option<LagLimit>) -> Result<(), Refusal> {
    if f.role != Role::Standby {
        return Err(refuse("not_replica", "this server is a primary"));
    }
    if !f.streaming {
        return Err(refuse("not_streaming", "the WAL receiver is not streaming"));
    }
    match lag {
        // `?lag=` replaces the check's thresholds and tripped state.
        Some(LagLimit::Bytes(max)) => match f.lag_bytes {
            Some(b) if b <= max => Ok(()),
            Some(b) => Err(refuse(
                "lagging",
                format!("replay lag {b} bytes exceeds {max}"),
            )),
            None => Err(refuse("unknown", "replay lag in bytes is not known")),
        },
        Some(LagLimit::Seconds(max)) => match f.lag_seconds {
            Some(s) if s <= max => Ok(()),
            Some(s) => Err(refuse(
                "lagging",
                format!("replay lag {s:.1}s exceeds {max}s"),
            )),
            None => Err(refuse("unknown", "replay lag in seconds is not known")),
        },
        None if view.hysteresis.tripped => Err(refuse(
            "tripped",
            format!("check {:?} is tripped: {}", view.name, view.message),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::checks::{Status, Unit};
    use crate::lifecycle::LifecycleRecord;
    use crate::state::Hysteresis;

    fn snap(
        facts: Option<ReplicationFacts>,
        status: Status,
        age: Duration,
        lifecycle: Lifecycle,
    ) -> Snapshot {
        let mut v = CheckView::pending(
            "repl",
            REPLICATION_KIND,
            Unit::Bytes,
            Duration::from_secs(1),
            Duration::from_secs(1),
            false,
            Hysteresis::new(1, 1),
        );
        v.hysteresis.observe(status);
        v.status = status;
        v.replication = facts;
        v.sampled_at = Some(SystemTime::now());
        v.sampled_mono = Some(Instant::now() - age);
        Snapshot {
            checks: vec![Arc::new(v)],
            lifecycle: LifecycleRecord {
                v: 1,
                state: lifecycle,
                reason: String::new(),
                changed_at: String::new(),
            },
            config_error: None,
            first_round_done: true,
        }
    }

    fn standby(lag_bytes: f64, streaming: bool) -> Option<ReplicationFacts> {
        Some(ReplicationFacts {
            role: Role::Standby,
            streaming,
            lag_bytes: Some(lag_bytes),
            lag_seconds: Some(2.0),
        })
    }

    fn primary_facts() -> Option<ReplicationFacts> {
        Some(ReplicationFacts {
            role: Role::Primary,
            streaming: true,
            lag_bytes: None,
            lag_seconds: None,
        })
    }

    fn code(s: &Snapshot, want: Want, q: Option<&str>) -> StatusCode {
        answer(s, want, q, Instant::now()).status()
    }

    #[test]
    fn primary_and_replica_answer_by_role() {
        let p = snap(
            primary_facts(),
            Status::Ok,
            Duration::ZERO,
            Lifecycle::Available,
        );
        assert_eq!(code(&p, Want::Primary, None), StatusCode::OK);
        assert_eq!(
            code(&p, Want::Replica, None),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(code(&p, Want::ReadOnly, None), StatusCode::OK);
        let r = snap(
            standby(0.0, true),
            Status::Ok,
            Duration::ZERO,
            Lifecycle::Available,
        );
        assert_eq!(
            code(&r, Want::Primary, None),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(code(&r, Want::Replica, None), StatusCode::OK);
        assert_eq!(code(&r, Want::ReadOnly, None), StatusCode::OK);
    }

    #[test]
    fn lag_replaces_thresholds_and_tripped_state() {
        let r = snap(
            standby(5.0 * 1024.0 * 1024.0, true),
            Status::Critical,
            Duration::ZERO,
            Lifecycle::Available,
        );
        assert_eq!(
            code(&r, Want::Replica, None),
            StatusCode::SERVICE_UNAVAILABLE,
            "tripped"
        );
        assert_eq!(
            code(&r, Want::Replica, Some("lag=1MB")),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(code(&r, Want::Replica, Some("lag=1GB")), StatusCode::OK);
        assert_eq!(
            code(&r, Want::Replica, Some("lag=5MiB")),
            StatusCode::OK,
            "equal is within"
        );
        assert_eq!(code(&r, Want::Replica, Some("lag=10s")), StatusCode::OK);
        assert_eq!(
            code(&r, Want::Replica, Some("lag=1s")),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            code(&r, Want::Replica, Some("lag=lots")),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn not_streaming_stale_unknown_and_lifecycle_are_refused() {
        let archive = snap(
            standby(0.0, false),
            Status::Ok,
            Duration::ZERO,
            Lifecycle::Available,
        );
        assert_eq!(
            code(&archive, Want::Replica, Some("lag=1GB")),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let stale = snap(
            primary_facts(),
            Status::Ok,
            Duration::from_secs(4),
            Lifecycle::Available,
        );
        assert_eq!(
            code(&stale, Want::Primary, None),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let unknown = snap(None, Status::Unknown, Duration::ZERO, Lifecycle::Available);
        assert_eq!(
            code(&unknown, Want::ReadOnly, None),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let draining = snap(
            primary_facts(),
            Status::Ok,
            Duration::ZERO,
            Lifecycle::Retiring,
        );
        assert_eq!(
            code(&draining, Want::Primary, None),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn without_a_replication_check_the_answer_says_why() {
        let mut s = snap(
            primary_facts(),
            Status::Ok,
            Duration::ZERO,
            Lifecycle::Available,
        );
        assert_eq!(
            code(&s, Want::Primary, Some("check=other")),
            StatusCode::SERVICE_UNAVAILABLE
        );
        s.checks.clear();
        assert_eq!(
            code(&s, Want::Primary, None),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn lag_values_take_sizes_and_durations() {
        assert_eq!(
            parse_lag("16MB"),
            Ok(LagLimit::Bytes(16.0 * 1024.0 * 1024.0))
        );
        assert_eq!(parse_lag("4096"), Ok(LagLimit::Bytes(4096.0)));
        assert_eq!(parse_lag("10s"), Ok(LagLimit::Seconds(10.0)));
        assert!(parse_lag("16mb").is_err());
    }
}
