//! `postgres.slots`: WAL held back by replication slots.
//!
//! The value is the largest WAL retained by any slot, in bytes: the current position
//! (`pg_current_wal_lsn()` on a primary; on a standby the received position, or the
//! replayed one when nothing was received by streaming) minus the slot's `restart_lsn`. A
//! slot without a `restart_lsn` (never reserved, or invalidated) retains nothing and counts
//! 0. Inactive slots are named in the message: they are what usually retains WAL until the
//! disk fills, but inactivity alone does not trip the check (a standby being rebuilt is
//! briefly inactive too). 0 with no slots.
//!
//! Defaults when neither `warn` nor `crit` is given: 1GB and 10GB.

use super::{MAX_LABELLED, PgTarget, parse_err, validate_dsn};
use crate::checks::Common;
use crate::checks::KindConfig;
use crate::checks::disk::format_bytes;
use crate::checks::{Check, CheckContext, CheckError, Metric, Observation, Status, Thresholds};
use crate::config::types::ByteSize;
use crate::pg::{Dsn, TextRow};

/// Retained-WAL warning default (1GB).
const DEFAULT_WARN: f64 = (1u64 << 30) as f64;
/// Retained-WAL critical default (10GB).
const DEFAULT_CRIT: f64 = (10u64 << 30) as f64;

/// PostgreSQL 12+; no privilege needed for `pg_replication_slots` (`pg_monitor` suffices).
const SLOTS_SQL: &str = "\
SELECT slot_name, slot_type, active, \
       pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() \
                            THEN coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) \
                            ELSE pg_current_wal_lsn() END, restart_lsn)::float8 AS retained_bytes \
  FROM pg_replication_slots ORDER BY slot_name";

crate::check_config! {
    /// `[check.postgres.slots.NAME]`: largest WAL retained by a replication slot, bytes.
    pub struct SlotsConfig: ByteSize {
        /// The connection string (libpq `key=value` or URL form).
        pub dsn: Dsn,
    }
}

impl SlotsConfig {
    /// The DSN must parse.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        validate_dsn(&self.dsn)
    }
}

/// A running `postgres.slots` check.
pub struct SlotsCheck {
    target: PgTarget,
    thresholds: Thresholds,
}

impl SlotsCheck {
    /// Builds the check, applying the defaults.
    pub fn from_config(c: &SlotsConfig, common: &Common) -> Self {
        let (warn, crit) = KindConfig::thresholds_or(c, DEFAULT_WARN, DEFAULT_CRIT);
        SlotsCheck {
            target: PgTarget::new(&c.dsn, common.timeout),
            thresholds: Thresholds::higher(warn, crit),
        }
    }
}

impl Check for SlotsCheck {
    async fn run(&mut self, cx: &CheckContext) -> Result<Observation, CheckError> {
        let mut session = self.target.session(cx).await?;
        let sets = session.query("slots", SLOTS_SQL).await?;
        let slots = parse_slots(sets.first().map(Vec::as_slice).unwrap_or_default())
            .map_err(parse_err("slots"))?;
        Ok(evaluate_slots(&slots, &self.thresholds))
    }
}

/// One replication slot.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotRow {
    /// `slot_name`.
    pub name: String,
    /// `physical` or `logical`.
    pub slot_type: String,
    /// A consumer is connected.
    pub active: bool,
    /// WAL retained, bytes (0 without a `restart_lsn`).
    pub retained_bytes: f64,
}

/// Reads the rows of [`SLOTS_SQL`].
///
/// # Errors
/// A message when a value is malformed.
pub fn parse_slots(rows: &[TextRow]) -> Result<Vec<SlotRow>, String> {
    rows.iter()
        .map(|r| {
            Ok(SlotRow {
                name: r.text("slot_name").unwrap_or("").to_string(),
                slot_type: r.text("slot_type").unwrap_or("").to_string(),
                active: r.opt_bool("active").unwrap_or(false),
                retained_bytes: r.opt_f64("retained_bytes")?.unwrap_or(0.0).max(0.0),
            })
        })
        .collect()
}

/// Judges the slots and writes the message and metrics.
pub fn evaluate_slots(slots: &[SlotRow], t: &Thresholds) -> Observation {
    let worst = slots
        .iter()
        .max_by(|a, b| a.retained_bytes.total_cmp(&b.retained_bytes));
    let value = worst.map_or(0.0, |s| s.retained_bytes);
    let status = t.classify(value);
    let inactive: Vec<String> = slots
        .iter()
        .filter(|s| !s.active)
        .map(|s| format!("'{}'", s.name))
        .collect();
    let mut message = match worst {
        None => "no replication slots".to_string(),
        Some(w) => format!(
            "slot '{}' ({}, {}) retains {} of WAL",
            w.name,
            w.slot_type,
            if w.active { "active" } else { "inactive" },
            format_bytes(w.retained_bytes as u64)
        ),
    };
    if !inactive.is_empty() {
        message.push_str(&format!(
            "; {} inactive slot(s): {}",
            inactive.len(),
            inactive.join(", ")
        ));
    }
    if status != Status::Ok && worst.is_some_and(|w| !w.active) {
        message.push_str(" (drop a slot nobody will use again)");
    }
    let mut metrics = vec![Metric::gauge(
        "vigil_pg_slots_inactive",
        "Replication slots without a connected consumer",
        inactive.len() as f64,
    )];
    for s in slots.iter().take(MAX_LABELLED) {
        metrics.push(
            Metric::gauge(
                "vigil_pg_slot_retained_bytes",
                "WAL retained by a replication slot",
                s.retained_bytes,
            )
            .label("slot", s.name.clone()),
        );
        metrics.push(
            Metric::gauge(
                "vigil_pg_slot_active",
                "1 while a consumer is connected to the replication slot",
                f64::from(u8::from(s.active)),
            )
            .label("slot", s.name.clone()),
        );
    }
    Observation {
        status,
        value: Some(value),
        message,
        metrics,
        replication: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, active: &str, retained: Option<&str>) -> TextRow {
        TextRow::from_pairs(&[
            ("slot_name", Some(name)),
            ("slot_type", Some("physical")),
            ("active", Some(active)),
            ("retained_bytes", retained),
        ])
    }

    #[test]
    fn largest_retention_is_the_value_and_inactive_slots_are_named() {
        let rows = [
            row("replica1", "t", Some("1024")),
            row("old_standby", "f", Some("2147483648")),
            row("unreserved", "f", None),
        ];
        let slots = parse_slots(&rows).unwrap();
        let t = Thresholds::higher(Some(DEFAULT_WARN), Some(DEFAULT_CRIT));
        let o = evaluate_slots(&slots, &t);
        assert_eq!(o.value, Some(2147483648.0));
        assert_eq!(o.status, Status::Warning);
        assert!(
            o.message.starts_with("slot 'old_standby' (physical, inactive) retains 2.0 GiB of WAL; 2 inactive slot(s): 'old_standby', 'unreserved'"),
            "{}",
            o.message
        );
    }

    #[test]
    fn no_slots_is_zero() {
        let t = Thresholds::higher(Some(1.0), Some(2.0));
        let o = evaluate_slots(&[], &t);
        assert_eq!(o.value, Some(0.0));
        assert_eq!(o.status, Status::Ok);
        assert_eq!(o.message, "no replication slots");
    }
}
