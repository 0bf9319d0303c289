//! The `postgres.*` kinds: one file per kind, sharing the session plumbing here.
//!
//! Every kind takes `dsn` (required) and reaches the server through the shared session of
//! [`crate::pg::Connections`] held in the [`CheckContext`]: one session per distinct DSN,
//! reconnected with backoff. A run sends its statements in one round trip, in a read-only
//! transaction with `statement_timeout` at 90% of the check's timeout; the connect and the
//! answer are awaited until 95% of it, so the check reports its own clear error before the
//! scheduler's timeout would cut it off.
//!
//! The SQL of each kind is a `const` with a comment giving the oldest server version and the
//! privileges it needs; every kind works with a role that has only `pg_monitor`.
//! Results are read as text rows ([`TextRow`]) by pure `parse_*`/`evaluate_*` functions that
//! the tests drive with literal rows. A NULL where a number is expected is `unknown`, never 0.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use tokio::time::Instant;

use super::{CheckContext, CheckError};
use crate::pg::{Dsn, Session, Slot, TextRow};

pub mod archiving;
pub mod connections;
pub mod long_transactions;
pub mod replication;
pub mod slots;
pub mod up;
pub mod wraparound;

/// The most per-standby or per-slot series one sample emits, to bound label cardinality.
pub const MAX_LABELLED: usize = 50;

/// What every `postgres.*` check holds: its DSN, its slot in the shared registry (looked up
/// on the first run) and the timeout its budget is derived from.
pub(crate) struct PgTarget {
    dsn: Dsn,
    slot: Option<Arc<Slot>>,
    timeout: StdDuration,
}

impl PgTarget {
    /// `timeout` is the check's resolved timeout (the same the scheduler enforces), so the
    /// statement timeout fires just before the scheduler would cut the run off.
    pub(crate) fn new(dsn: &Dsn, timeout: StdDuration) -> Self {
        PgTarget {
            dsn: dsn.clone(),
            slot: None,
            timeout,
        }
    }

    /// Takes the shared session for this run, connecting if needed.
    pub(crate) async fn session(&mut self, cx: &CheckContext) -> Result<Session, CheckError> {
        let slot = match &self.slot {
            Some(s) => s.clone(),
            None => {
                let s = cx.pg.slot(&self.dsn)?;
                self.slot = Some(s.clone());
                s
            }
        };
        let deadline = Instant::now() + self.timeout.mul_f64(0.95);
        Ok(slot
            .session(deadline, statement_timeout(self.timeout))
            .await?)
    }
}

/// The `statement_timeout` for a check with this timeout: 90% of it, so the server cancels
/// a slow statement (and says so) before the client gives up on the answer.
pub fn statement_timeout(check_timeout: StdDuration) -> StdDuration {
    check_timeout.mul_f64(0.9).max(StdDuration::from_millis(1))
}

/// The problems with a DSN, as config validation reports them.
pub(crate) fn validate_dsn(dsn: &Dsn) -> Vec<(&'static str, String)> {
    match dsn.parse() {
        Ok(_) => Vec::new(),
        Err(e) => vec![("dsn", e.to_string())],
    }
}

/// The single row of result set `set`.
pub(crate) fn one_row<'a>(
    sets: &'a [Vec<TextRow>],
    set: usize,
    query: &str,
) -> Result<&'a TextRow, String> {
    sets.get(set)
        .and_then(|rows| rows.first())
        .ok_or_else(|| format!("query `{query}` returned no row"))
}

/// A parse problem as a check error (`unknown`).
pub(crate) fn parse_err(query: &str) -> impl Fn(String) -> CheckError + '_ {
    move |e| CheckError::Parse(format!("query `{query}`: {e}"))
}

/// Renders seconds for a message: `0.4 ms`, `3.2s`, `5m 3s`, `2h 10m`, `3d 4h`.
pub fn format_secs(s: f64) -> String {
    let s = s.max(0.0);
    if s < 1.0 {
        return format!("{:.1} ms", s * 1000.0);
    }
    if s < 60.0 {
        return format!("{s:.1}s");
    }
    let whole = s.round() as u64;
    let (d, h, m, sec) = (
        whole / 86400,
        whole / 3600 % 24,
        whole / 60 % 60,
        whole % 60,
    );
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else {
        format!("{m}m {sec}s")
    }
}

/// Makes labels unique: a repeated name gets `#2`, `#3`, … in order (two standbys may both
/// be called `walreceiver`, and a repeated label set is invalid in an exposition).
pub fn unique_labels<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    names
        .into_iter()
        .map(|n| {
            let c = seen.entry(n).or_insert(0);
            *c += 1;
            if *c == 1 {
                n.to_string()
            } else {
                format!("{n}#{c}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_read_naturally() {
        assert_eq!(format_secs(0.0004), "0.4 ms");
        assert_eq!(format_secs(3.21), "3.2s");
        assert_eq!(format_secs(303.0), "5m 3s");
        assert_eq!(format_secs(7800.0), "2h 10m");
        assert_eq!(format_secs(3.0 * 86400.0 + 4.0 * 3600.0), "3d 4h");
    }

    #[test]
    fn statement_timeout_is_under_the_check_timeout() {
        assert_eq!(
            statement_timeout(StdDuration::from_secs(3)),
            StdDuration::from_millis(2700)
        );
    }

    #[test]
    fn repeated_labels_are_made_unique() {
        assert_eq!(
            unique_labels(["a", "walreceiver", "walreceiver"]),
            vec!["a", "walreceiver", "walreceiver#2"]
        );
    }
}
