//! `postgres.replication`: role-aware replication lag.
//!
//! The role comes from `pg_is_in_recovery()`, so one config serves every member of a
//! cluster and follows a failover.
//!
//! **On a standby** (the value is lag in bytes):
//! - bytes = the newest primary position the standby knows (`pg_stat_wal_receiver.
//!   latest_end_lsn`, or the received position if later) minus the replayed position, so a
//!   standby whose receive falls behind is not reported as caught up;
//! - seconds = 0 while the receiver streams and everything received is replayed (also when
//!   no transaction has been replayed yet), so an idle primary is no false alarm; otherwise
//!   `now() - pg_last_xact_replay_timestamp()`, and a NULL there while behind is `unknown`
//!   with that message, never 0;
//! - a WAL receiver that is not streaming (no receiver, or any other status) is critical by
//!   itself: the standby can at best replay from the archive.
//!
//! **On a primary** (the value is the largest lag in bytes over its standbys, 0 with none):
//! per standby (`pg_stat_replication`, physical walsenders only: base backups and logical
//! subscribers are left out) lag bytes = `pg_current_wal_lsn() - replay_lsn` and seconds =
//! `replay_lag` (NULL is 0 when the standby has replayed everything: the server clears it
//! once an idle standby has caught up). Fewer connected standbys than `min_standbys` is
//! critical by itself.
//!
//! `warn`/`crit` apply to bytes (defaults 16MB/256MB when both are omitted), `warn_time`/
//! `crit_time` to seconds on both roles (no default). Every sample that measured sets
//! [`ReplicationFacts`] for the routing endpoints.

use super::{MAX_LABELLED, PgTarget, format_secs, one_row, parse_err, unique_labels, validate_dsn};
use crate::checks::Common;
use crate::checks::KindConfig;
use crate::checks::disk::format_bytes;
use crate::checks::{
    Check, CheckContext, CheckError, Metric, Observation, ReplicationFacts, Role, Status,
    Thresholds,
};
use crate::config::types::{ByteSize, Duration};
use crate::pg::{Dsn, TextRow};

/// Lag warning default, bytes (16MB).
const DEFAULT_WARN: f64 = (16u64 << 20) as f64;
/// Lag critical default, bytes (256MB).
const DEFAULT_CRIT: f64 = (256u64 << 20) as f64;

/// PostgreSQL 12+; `pg_monitor` (without `pg_read_all_stats` the receiver's status and the
/// walsenders' positions read as NULL). The first statement is this server's own facts
/// (the standby ones are NULL on a primary), the second its physical standbys. Role-only
/// functions sit behind `CASE` so that neither statement fails on the other role.
const REPLICATION_SQL: &str = "\
SELECT pg_is_in_recovery() AS in_recovery, \
       r.pid IS NOT NULL AS receiver_present, \
       r.status AS receiver_status, \
       pg_wal_lsn_diff(greatest(r.latest_end_lsn, pg_last_wal_receive_lsn()), \
                       pg_last_wal_replay_lsn())::float8 AS lag_bytes, \
       pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() AS replayed_all, \
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS replay_age, \
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END AS replay_paused \
  FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver AS r ON true; \
SELECT s.application_name AS name, s.state, \
       pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                            ELSE pg_current_wal_lsn() END, s.replay_lsn)::float8 AS lag_bytes, \
       extract(epoch FROM s.replay_lag)::float8 AS replay_lag \
  FROM pg_stat_replication AS s \
 WHERE s.state IS DISTINCT FROM 'backup' \
   AND NOT EXISTS (SELECT 1 FROM pg_replication_slots AS l \
                    WHERE l.active_pid = s.pid AND l.slot_type = 'logical') \
 ORDER BY s.application_name, s.pid";

crate::check_config! {
    /// `[check.postgres.replication.NAME]`: replication lag, bytes; seconds through
    /// `warn_time`/`crit_time`; `min_standbys` on a primary.
    pub struct ReplicationConfig: ByteSize {
        /// The connection string (libpq `key=value` or URL form).
        pub dsn: Dsn,
        /// Warning threshold on lag seconds (no default).
        #[serde(default)]
        pub warn_time: Option<Duration>,
        /// Critical threshold on lag seconds (no default).
        #[serde(default)]
        pub crit_time: Option<Duration>,
        /// On a primary, fewer connected standbys than this is critical (default 0).
        #[serde(default)]
        pub min_standbys: Option<u32>,
    }
}

impl ReplicationConfig {
    /// The DSN must parse; `warn_time` must not exceed `crit_time`.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        let mut v = validate_dsn(&self.dsn);
        if let (Some(w), Some(c)) = (self.warn_time, self.crit_time) {
            if w > c {
                v.push((
                    "crit_time",
                    "warn_time must not be greater than crit_time (higher is worse)".into(),
                ));
            }
        }
        v
    }
}

/// How a sample is judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicationPolicy {
    /// On lag bytes.
    pub bytes: Thresholds,
    /// On lag seconds; both `None` when not configured.
    pub time: Thresholds,
    /// Least connected standbys on a primary.
    pub min_standbys: u32,
}

impl ReplicationPolicy {
    fn has_time(&self) -> bool {
        self.time.warn.is_some() || self.time.crit.is_some()
    }
}

/// A running `postgres.replication` check.
pub struct ReplicationCheck {
    target: PgTarget,
    policy: ReplicationPolicy,
}

impl ReplicationCheck {
    /// Builds the check, applying the defaults.
    pub fn from_config(c: &ReplicationConfig, common: &Common) -> Self {
        let (warn, crit) = KindConfig::thresholds_or(c, DEFAULT_WARN, DEFAULT_CRIT);
        ReplicationCheck {
            target: PgTarget::new(&c.dsn, common.timeout),
            policy: ReplicationPolicy {
                bytes: Thresholds::higher(warn, crit),
                time: Thresholds::higher(
                    c.warn_time.map(|d| d.get().as_secs_f64()),
                    c.crit_time.map(|d| d.get().as_secs_f64()),
                ),
                min_standbys: c.min_standbys.unwrap_or(0),
            },
        }
    }
}

impl Check for ReplicationCheck {
    async fn run(&mut self, cx: &CheckContext) -> Result<Observation, CheckError> {
        let mut session = self.target.session(cx).await?;
        let sets = session.query("replication", REPLICATION_SQL).await?;
        let facts = parse_replication(&sets).map_err(parse_err("replication"))?;
        evaluate_replication(&facts, &self.policy).map_err(parse_err("replication"))
    }
}

/// A standby's view of its own replication.
#[derive(Debug, Clone, PartialEq)]
pub struct StandbyFacts {
    /// A WAL receiver process exists.
    pub receiver_present: bool,
    /// Its status (`streaming`, `starting`, …); NULL to a role without `pg_monitor`.
    pub receiver_status: Option<String>,
    /// Newest known primary position minus replayed position.
    pub lag_bytes: Option<f64>,
    /// Everything received has been replayed.
    pub replayed_all: Option<bool>,
    /// Seconds since the last replayed transaction's commit.
    pub replay_age: Option<f64>,
    /// Replay is paused (`pg_wal_replay_pause()`).
    pub replay_paused: Option<bool>,
}

/// One physical standby as a primary sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct StandbyRow {
    /// `application_name`.
    pub name: String,
    /// Walsender state (`streaming`, `catchup`, …).
    pub state: Option<String>,
    /// `pg_current_wal_lsn() - replay_lsn`.
    pub lag_bytes: Option<f64>,
    /// `replay_lag` in seconds.
    pub replay_lag: Option<f64>,
}

/// What one sample read.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicationSample {
    /// The server is in recovery.
    Standby(StandbyFacts),
    /// The server accepts writes; its physical standbys.
    Primary(Vec<StandbyRow>),
}

/// Reads the two result sets of [`REPLICATION_SQL`].
///
/// # Errors
/// A message when a row is missing or a value is malformed.
pub fn parse_replication(sets: &[Vec<TextRow>]) -> Result<ReplicationSample, String> {
    let me = one_row(sets, 0, "replication")?;
    match me.opt_bool("in_recovery") {
        Some(true) => Ok(ReplicationSample::Standby(StandbyFacts {
            receiver_present: me.opt_bool("receiver_present").unwrap_or(false),
            receiver_status: me.text("receiver_status").map(str::to_string),
            lag_bytes: me.opt_f64("lag_bytes")?,
            replayed_all: me.opt_bool("replayed_all"),
            replay_age: me.opt_f64("replay_age")?,
            replay_paused: me.opt_bool("replay_paused"),
        })),
        Some(false) => {
            let rows = sets.get(1).map(Vec::as_slice).unwrap_or_default();
            rows.iter()
                .map(|r| {
                    Ok(StandbyRow {
                        name: r.text("name").unwrap_or("").to_string(),
                        state: r.text("state").map(str::to_string),
                        lag_bytes: r.opt_f64("lag_bytes")?,
                        replay_lag: r.opt_f64("replay_lag")?,
                    })
                })
                .collect::<Result<_, String>>()
                .map(ReplicationSample::Primary)
        }
        None => Err("`in_recovery` is NULL".into()),
    }
}

/// A standby's lag in seconds: 0 while streaming with everything received replayed,
/// otherwise the age of the last replayed transaction (`None` when there is none).
pub fn standby_lag_seconds(f: &StandbyFacts) -> Option<f64> {
    let streaming = f.receiver_status.as_deref() == Some("streaming");
    if streaming && f.replayed_all == Some(true) {
        return Some(0.0);
    }
    f.replay_age.map(|a| a.max(0.0))
}

/// Judges a sample.
///
/// # Errors
/// A message when the sample cannot be judged (a receiver whose status is hidden from the
/// check's role).
pub fn evaluate_replication(
    sample: &ReplicationSample,
    p: &ReplicationPolicy,
) -> Result<Observation, String> {
    match sample {
        ReplicationSample::Standby(f) => evaluate_standby(f, p),
        ReplicationSample::Primary(rows) => Ok(evaluate_primary(rows, p)),
    }
}

fn is_standby_metric(v: f64) -> Metric {
    Metric::gauge(
        "vigil_pg_is_standby",
        "1 when the server is in recovery (a standby), 0 on a primary",
        v,
    )
}

fn evaluate_standby(f: &StandbyFacts, p: &ReplicationPolicy) -> Result<Observation, String> {
    if f.receiver_present && f.receiver_status.is_none() {
        return Err(
            "the WAL receiver's status is hidden from this role; grant it pg_monitor".into(),
        );
    }
    let streaming = f.receiver_status.as_deref() == Some("streaming");
    let lag_bytes = f.lag_bytes.map(|b| b.max(0.0));
    let lag_seconds = standby_lag_seconds(f);
    let caught_up = lag_bytes == Some(0.0) || (streaming && f.replayed_all == Some(true));

    let mut status = Status::Ok;
    let mut parts: Vec<String> = Vec::new();
    let receiver = match (&f.receiver_status, streaming) {
        (_, true) => "receiver streaming".to_string(),
        (Some(s), false) => {
            format!("WAL receiver not streaming (status: {s}); replaying from archive")
        }
        (None, false) => "WAL receiver not streaming (status: none); replaying from archive".into(),
    };
    if !streaming {
        status = Status::Critical;
    }
    match lag_bytes {
        Some(b) => {
            status = status.worse(p.bytes.classify(b));
            if b == 0.0 {
                parts.push("standby is caught up (0 B behind in replay)".into());
            } else {
                parts.push(format!(
                    "standby is {} behind in replay",
                    format_bytes(b as u64)
                ));
            }
        }
        None => {
            status = status.worse(Status::Unknown);
            parts.push(
                "standby's replay lag in bytes is unknown (no WAL received by streaming)".into(),
            );
        }
    }
    match lag_seconds {
        Some(s) => {
            if p.has_time() {
                status = status.worse(p.time.classify(s));
            }
            if s > 0.0 {
                parts.push(format!("last replayed transaction {} ago", format_secs(s)));
            }
        }
        None if !caught_up => {
            status = status.worse(Status::Unknown);
            parts.push(
                "replay lag in seconds unknown: no transaction replayed yet while behind".into(),
            );
        }
        None => {}
    }
    if f.replay_paused == Some(true) {
        parts.push("replay is paused".into());
    }
    let message = format!("{}; {receiver}", parts.join(", "));

    let mut metrics = vec![
        is_standby_metric(1.0),
        Metric::gauge(
            "vigil_pg_wal_receiver_streaming",
            "1 while this standby's WAL receiver is streaming",
            f64::from(u8::from(streaming)),
        ),
    ];
    if let Some(b) = lag_bytes {
        metrics.push(Metric::gauge(
            "vigil_pg_standby_lag_bytes",
            "This standby's replay lag behind the newest primary position it knows",
            b,
        ));
    }
    if let Some(s) = lag_seconds {
        metrics.push(Metric::gauge(
            "vigil_pg_standby_lag_seconds",
            "This standby's replay lag in seconds (0 while streaming and caught up)",
            s,
        ));
    }
    Ok(Observation {
        status,
        value: lag_bytes,
        message,
        metrics,
        replication: Some(ReplicationFacts {
            role: Role::Standby,
            streaming,
            lag_bytes,
            lag_seconds,
        }),
    })
}

/// A standby's seconds of lag as a primary sees it: `replay_lag`, or 0 when it is NULL and
/// the standby has replayed everything.
fn row_seconds(r: &StandbyRow) -> Option<f64> {
    match (r.replay_lag, r.lag_bytes) {
        (Some(s), _) => Some(s.max(0.0)),
        (None, Some(b)) if b <= 0.0 => Some(0.0),
        _ => None,
    }
}

fn evaluate_primary(rows: &[StandbyRow], p: &ReplicationPolicy) -> Observation {
    let connected = rows.len();
    let mut status = Status::Ok;
    let mut worst: Option<(&StandbyRow, f64)> = None;
    let mut notes: Vec<String> = Vec::new();
    for r in rows {
        let state = r.state.as_deref().unwrap_or("unknown");
        match r.lag_bytes {
            Some(b) => {
                let b = b.max(0.0);
                status = status.worse(p.bytes.classify(b));
                if worst.is_none_or(|(_, w)| b > w) {
                    worst = Some((r, b));
                }
            }
            // A walsender still starting up has not reported a position yet; one that says
            // it streams must have.
            None if state == "streaming" => {
                status = status.worse(Status::Unknown);
                notes.push(format!("standby '{}' reports no replay position", r.name));
            }
            None => notes.push(format!(
                "standby '{}' is {state}, no replay position yet",
                r.name
            )),
        }
        if p.has_time() {
            match row_seconds(r) {
                Some(s) => status = status.worse(p.time.classify(s)),
                None if r.lag_bytes.is_some() => {
                    status = status.worse(Status::Unknown);
                    notes.push(format!("standby '{}' reports no replay_lag", r.name));
                }
                None => {}
            }
        }
    }
    let min = p.min_standbys as usize;
    let count = if min > 0 {
        format!("{connected} standby(s) connected (min {min})")
    } else {
        format!("{connected} standby(s) connected")
    };
    let mut message = if connected < min {
        status = Status::Critical.worse(status);
        format!("primary: only {count}")
    } else {
        format!("primary: {count}")
    };
    if let Some((r, b)) = worst {
        let state = r.state.as_deref().unwrap_or("unknown");
        let secs = row_seconds(r)
            .filter(|s| *s > 0.0)
            .map(|s| format!(" ({})", format_secs(s)))
            .unwrap_or_default();
        if b > 0.0 {
            message.push_str(&format!(
                "; standby '{}' is {} behind in replay{secs}; receiver {state}",
                r.name,
                format_bytes(b as u64)
            ));
        } else if connected == 1 {
            message.push_str(&format!(
                "; standby '{}' is caught up; receiver {state}",
                r.name
            ));
        } else {
            message.push_str("; all caught up");
        }
    }
    for n in &notes {
        message.push_str("; ");
        message.push_str(n);
    }

    let mut metrics = vec![
        is_standby_metric(0.0),
        Metric::gauge(
            "vigil_pg_standbys_connected",
            "Physical standbys connected to this primary",
            connected as f64,
        ),
    ];
    let labels = unique_labels(rows.iter().map(|r| r.name.as_str()));
    for (r, label) in rows.iter().zip(labels).take(MAX_LABELLED) {
        if let Some(b) = r.lag_bytes {
            metrics.push(
                Metric::gauge(
                    "vigil_pg_replication_lag_bytes",
                    "Replay lag of a standby behind this primary's current WAL position",
                    b.max(0.0),
                )
                .label("standby", label.clone()),
            );
        }
        if let Some(s) = row_seconds(r) {
            metrics.push(
                Metric::gauge(
                    "vigil_pg_replication_lag_seconds",
                    "Replay lag of a standby in seconds (replay_lag)",
                    s,
                )
                .label("standby", label.clone()),
            );
        }
        metrics.push(
            Metric::gauge(
                "vigil_pg_standby_streaming",
                "1 while the standby's walsender is streaming",
                f64::from(u8::from(r.state.as_deref() == Some("streaming"))),
            )
            .label("standby", label),
        );
    }
    Observation {
        status,
        value: Some(worst.map_or(0.0, |(_, b)| b)),
        message,
        metrics,
        replication: Some(ReplicationFacts {
            role: Role::Primary,
            streaming: true,
            lag_bytes: None,
            lag_seconds: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1048576.0;

    fn policy() -> ReplicationPolicy {
        ReplicationPolicy {
            bytes: Thresholds::higher(Some(16.0 * MIB), Some(256.0 * MIB)),
            time: Thresholds::higher(None, None),
            min_standbys: 0,
        }
    }

    fn standby_rows(pairs: &[(&str, Option<&str>)]) -> Vec<Vec<TextRow>> {
        vec![vec![TextRow::from_pairs(pairs)], vec![]]
    }

    fn streaming(lag: &str, replayed_all: &str, age: Option<&str>) -> Vec<Vec<TextRow>> {
        standby_rows(&[
            ("in_recovery", Some("t")),
            ("receiver_present", Some("t")),
            ("receiver_status", Some("streaming")),
            ("lag_bytes", Some(lag)),
            ("replayed_all", Some(replayed_all)),
            ("replay_age", age),
            ("replay_paused", Some("f")),
        ])
    }

    fn eval(sets: &[Vec<TextRow>], p: &ReplicationPolicy) -> Observation {
        evaluate_replication(&parse_replication(sets).unwrap(), p).unwrap()
    }

    #[test]
    fn idle_caught_up_standby_is_zero_seconds_even_without_a_replayed_transaction() {
        let o = eval(&streaming("0", "t", None), &policy());
        assert_eq!(o.status, Status::Ok);
        assert_eq!(o.value, Some(0.0));
        let f = o.replication.unwrap();
        assert_eq!(f.lag_seconds, Some(0.0));
        assert!(f.streaming);
        assert_eq!(f.role, Role::Standby);
        // An old replay timestamp on an idle primary is no false alarm either.
        let o = eval(&streaming("0", "t", Some("86400")), &policy());
        assert_eq!(o.replication.unwrap().lag_seconds, Some(0.0));
        assert!(o.message.contains("caught up"), "{}", o.message);
    }

    #[test]
    fn behind_standby_reports_bytes_and_seconds() {
        let o = eval(&streaming("222298112", "f", Some("4.5")), &policy());
        assert_eq!(o.status, Status::Warning);
        assert_eq!(
            o.message,
            "standby is 212.0 MiB behind in replay, last replayed transaction 4.5s ago; \
             receiver streaming"
        );
        let f = o.replication.unwrap();
        assert_eq!(f.lag_bytes, Some(222298112.0));
        assert_eq!(f.lag_seconds, Some(4.5));
    }

    #[test]
    fn null_replay_timestamp_while_behind_is_unknown_never_zero() {
        let o = eval(&streaming("1000", "f", None), &policy());
        assert_eq!(o.status, Status::Unknown);
        assert!(
            o.message.contains("no transaction replayed yet"),
            "{}",
            o.message
        );
        assert_eq!(o.replication.unwrap().lag_seconds, None);
    }

    #[test]
    fn receiver_not_streaming_is_critical_not_lag_zero() {
        let sets = standby_rows(&[
            ("in_recovery", Some("t")),
            ("receiver_present", Some("f")),
            ("receiver_status", None),
            ("lag_bytes", Some("0")),
            ("replayed_all", Some("t")),
            ("replay_age", Some("30")),
            ("replay_paused", Some("f")),
        ]);
        let o = eval(&sets, &policy());
        assert_eq!(o.status, Status::Critical);
        assert!(
            o.message
                .contains("WAL receiver not streaming (status: none); replaying from archive"),
            "{}",
            o.message
        );
        let f = o.replication.unwrap();
        assert!(!f.streaming);
        // Not streaming: the seconds come from the replay timestamp, not the 0 rule.
        assert_eq!(f.lag_seconds, Some(30.0));
    }

    #[test]
    fn hidden_receiver_status_is_a_privilege_error() {
        let sets = standby_rows(&[
            ("in_recovery", Some("t")),
            ("receiver_present", Some("t")),
            ("receiver_status", None),
            ("lag_bytes", None),
            ("replayed_all", None),
            ("replay_age", None),
            ("replay_paused", Some("f")),
        ]);
        let e = evaluate_replication(&parse_replication(&sets).unwrap(), &policy()).unwrap_err();
        assert!(e.contains("pg_monitor"));
    }

    #[test]
    fn time_thresholds_apply_on_a_standby() {
        let mut p = policy();
        p.time = Thresholds::higher(Some(10.0), Some(60.0));
        let o = eval(&streaming("100", "f", Some("75")), &p);
        assert_eq!(o.status, Status::Critical);
    }

    fn primary(rows: &[(&str, &str, Option<&str>, Option<&str>)]) -> Vec<Vec<TextRow>> {
        vec![
            vec![TextRow::from_pairs(&[("in_recovery", Some("f"))])],
            rows.iter()
                .map(|(n, s, b, l)| {
                    TextRow::from_pairs(&[
                        ("name", Some(n)),
                        ("state", Some(s)),
                        ("lag_bytes", *b),
                        ("replay_lag", *l),
                    ])
                })
                .collect(),
        ]
    }

    #[test]
    fn primary_value_is_the_worst_standby_and_message_names_it() {
        let sets = primary(&[
            ("replica1", "streaming", Some("222298112"), Some("4.1")),
            ("replica2", "streaming", Some("0"), None),
        ]);
        let o = eval(&sets, &policy());
        assert_eq!(o.value, Some(222298112.0));
        assert_eq!(o.status, Status::Warning);
        assert_eq!(
            o.message,
            "primary: 2 standby(s) connected; standby 'replica1' is 212.0 MiB behind in \
             replay (4.1s); receiver streaming"
        );
        let f = o.replication.unwrap();
        assert_eq!(f.role, Role::Primary);
        let lag: Vec<_> = o
            .metrics
            .iter()
            .filter(|m| m.name == "vigil_pg_replication_lag_seconds")
            .collect();
        assert_eq!(
            lag.len(),
            2,
            "NULL replay_lag with 0 bytes behind is 0 seconds"
        );
    }

    #[test]
    fn too_few_standbys_is_critical_and_none_is_zero() {
        let mut p = policy();
        p.min_standbys = 1;
        let o = eval(&primary(&[]), &p);
        assert_eq!(o.status, Status::Critical);
        assert_eq!(o.value, Some(0.0));
        assert_eq!(o.message, "primary: only 0 standby(s) connected (min 1)");
        p.min_standbys = 0;
        assert_eq!(eval(&primary(&[]), &p).status, Status::Ok);
    }

    #[test]
    fn a_streaming_standby_without_position_is_unknown() {
        let o = eval(&primary(&[("r", "streaming", None, None)]), &policy());
        assert_eq!(o.status, Status::Unknown);
        let o = eval(&primary(&[("r", "startup", None, None)]), &policy());
        assert_eq!(o.status, Status::Ok);
        assert!(o.message.contains("no replay position yet"));
    }

    #[test]
    fn config_checks_time_order() {
        let c: ReplicationConfig = toml::from_str(
            "dsn = \"host=/tmp user=v\"\nwarn_time = \"1m\"\ncrit_time = \"10s\"\nmin_standbys = 1",
        )
        .unwrap();
        assert_eq!(c.validate(true).len(), 1);
        let chk = ReplicationCheck::from_config(
            &c,
            &crate::checks::KindConfig::common(&c, crate::config::types::Duration::from_secs(10)),
        );
        assert_eq!(chk.policy.min_standbys, 1);
        assert_eq!(chk.policy.bytes.warn, Some(DEFAULT_WARN));
    }
}
