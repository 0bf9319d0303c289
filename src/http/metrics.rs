//! `GET /metrics`: Prometheus text format 0.0.4, rendered from the cached snapshot.
//!
//! A scrape never runs a check (that would couple Prometheus load to PostgreSQL load); it
//! turns the newest results into metric families and hands them to the `prometheus`
//! crate's text encoder, which does the escaping and the format. Families are sorted by
//! name so the output is stable.
//!
//! Per check (label `check` and `kind`):
//! - `vigil_check_status`: 0 ok, 1 warning, 2 critical, 3 unknown (the Nagios encoding);
//! - `vigil_check_success`: 1 when the newest run measured, 0 when it could not;
//! - `vigil_check_tripped`, `vigil_check_duration_seconds`,
//!   `vigil_check_last_run_timestamp_seconds`, `vigil_check_value` (with `unit`);
//! - `vigil_check_runs_total`, `vigil_check_failures_total`;
//! - every metric the kind itself reports, with the `check` label added.
//!
//! Agent: `vigil_build_info{version}` (always 1), `vigil_host_state{state}` (1 for the
//! reported state), `vigil_config_last_reload_successful`, `vigil_state_write_failures_total`
//! and `vigil_state_files_failing` (writes under `state_dir`, see [`crate::durable`]).
//!
//! Remediation: `vigil_automation_paused`, `vigil_remediation_escalated{remediation}`,
//! `vigil_remediation_runs_total{remediation,outcome}`.

use std::collections::BTreeMap;
use std::time::UNIX_EPOCH;

use prometheus::proto::{Counter, Gauge, LabelPair, Metric as PMetric, MetricFamily, MetricType};

use crate::checks::MetricKind;
use crate::heartbeat::delivery::{DROP_REASONS, FAILURE_REASONS, StatusView};
use crate::lifecycle::HostState;
use crate::remediation::View;
use crate::state::Snapshot;

const ALL_STATES: [HostState; 10] = [
    HostState::Installing,
    HostState::Available,
    HostState::Uncertain,
    HostState::Unavailable,
    HostState::Retiring,
    HostState::Retired,
    HostState::Archived,
    HostState::Terminated,
    HostState::Restart,
    HostState::Upgrading,
];

#[derive(Default)]
struct Families {
    map: BTreeMap<&'static str, MetricFamily>,
}

impl Families {
    fn add(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: MetricKind,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        let fam = self.map.entry(name).or_insert_with(|| {
            let mut f = MetricFamily::default();
            f.set_name(name.to_string());
            f.set_help(help.to_string());
            f.set_field_type(match kind {
                MetricKind::Gauge => MetricType::GAUGE,
                MetricKind::Counter => MetricType::COUNTER,
            });
            f
        });
        let mut m = PMetric::default();
        m.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = LabelPair::default();
                    l.set_name(k.to_string());
                    l.set_value(v.to_string());
                    l
                })
                .collect(),
        );
        // A family's type is fixed by its first sample; a kind that reported one name with
        // two types would otherwise produce an invalid exposition.
        match fam.get_field_type() {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            _ => {
                let mut g = Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        fam.mut_metric().push(m);
    }
}

/// Renders the snapshot as Prometheus text format 0.0.4.
pub fn render(snap: &Snapshot, heartbeat: &StatusView, automation: Option<&View>) -> String {
    let (write_failures, failing) = crate::durable::write_failures();
    render_with(snap, heartbeat, automation, write_failures, failing.len())
}

/// [`render`] with the state-write counts given (the process-wide ones vary between unit
/// tests, which share a process).
fn render_with(
    snap: &Snapshot,
    heartbeat: &StatusView,
    automation: Option<&View>,
    write_failures: u64,
    files_failing: usize,
) -> String {
    let mut f = Families::default();
    use MetricKind::{Counter as C, Gauge as G};

    f.add(
        "vigil_build_info",
        "vigil's version; always 1.",
        G,
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    f.add(
        "vigil_state_write_failures_total",
        "Failed writes under state_dir (lifecycle, cooldowns, audit, sequence, spool).",
        MetricKind::Counter,
        &[],
        write_failures as f64,
    );
    f.add(
        "vigil_state_files_failing",
        "State files whose latest write failed (0 when every write succeeds).",
        MetricKind::Gauge,
        &[],
        files_failing as f64,
    );
    let state = snap.state();
    for s in ALL_STATES {
        f.add(
            "vigil_host_state",
            "The reported host state: 1 for the current one.",
            G,
            &[("state", s.as_str())],
            f64::from(u8::from(s == state)),
        );
    }
    f.add(
        "vigil_config_last_reload_successful",
        "0 when the last reload was refused and an older config is running.",
        G,
        &[],
        f64::from(u8::from(snap.config_error.is_none())),
    );

    for c in &snap.checks {
        let l: &[(&str, &str)] = &[("check", &c.name), ("kind", c.kind)];
        f.add(
            "vigil_check_runs_total",
            "Runs of the check.",
            C,
            l,
            c.runs as f64,
        );
        f.add(
            "vigil_check_failures_total",
            "Runs that could not measure (error or timeout).",
            C,
            l,
            c.failures as f64,
        );
        let Some(at) = c.sampled_at else { continue };
        f.add(
            "vigil_check_status",
            "Newest status: 0 ok, 1 warning, 2 critical, 3 unknown.",
            G,
            l,
            f64::from(c.status.nagios_code()),
        );
        f.add(
            "vigil_check_success",
            "1 when the newest run measured, 0 when it could not.",
            G,
            l,
            f64::from(u8::from(c.success)),
        );
        f.add(
            "vigil_check_tripped",
            "1 while the check is tripped (after trip_after non-ok samples).",
            G,
            l,
            f64::from(u8::from(c.hysteresis.tripped)),
        );
        f.add(
            "vigil_check_duration_seconds",
            "How long the newest run took.",
            G,
            l,
            c.duration.as_secs_f64(),
        );
        let ts = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        f.add(
            "vigil_check_last_run_timestamp_seconds",
            "When the newest run started, in Unix seconds.",
            G,
            l,
            ts,
        );
        if let Some(v) = c.value {
            f.add(
                "vigil_check_value",
                "The check's primary value in its unit.",
                G,
                &[
                    ("check", &c.name),
                    ("kind", c.kind),
                    ("unit", c.unit.as_str()),
                ],
                v,
            );
        }
        for m in &c.metrics {
            let mut labels: Vec<(&str, &str)> = vec![("check", &c.name)];
            labels.extend(m.labels.iter().map(|(k, v)| (*k, v.as_str())));
            f.add(m.name, m.help, m.kind, &labels, m.value);
        }
    }

    if heartbeat.enabled {
        heartbeat_families(&mut f, heartbeat);
    }
    if let Some(a) = automation {
        automation_families(&mut f, a);
    }

    let families: Vec<MetricFamily> = f.map.into_values().collect();
    let mut out = String::with_capacity(4096);
    // Every family above has at least one sample and a name, which is all the encoder
    // checks, so this cannot fail; an empty answer would still be valid exposition.
    let _ = prometheus::TextEncoder::new().encode_utf8(&families, &mut out);
    out
}

/// The outcomes `vigil_remediation_runs_total` exports for every remediation.
const OUTCOMES: [&str; 8] = [
    "succeeded",
    "failed",
    "timed_out",
    "verified",
    "not_verified",
    "refused",
    "skipped",
    "escalated",
];

/// Remediation: the pause, escalations, and decisions by outcome (every configured
/// remediation and outcome from the start, 0 until it happens).
fn automation_families(f: &mut Families, a: &View) {
    use MetricKind::{Counter as C, Gauge as G};
    f.add(
        "vigil_automation_paused",
        "1 while automatic remediation is paused (vigil automation pause).",
        G,
        &[],
        f64::from(u8::from(a.paused)),
    );
    for name in &a.names {
        f.add(
            "vigil_remediation_escalated",
            "1 while the remediation is escalated: disabled until automation is resumed.",
            G,
            &[("remediation", name)],
            f64::from(u8::from(a.escalated.contains(name))),
        );
        for outcome in OUTCOMES {
            let n = a
                .events
                .iter()
                .find(|(r, e, _)| r == name && *e == outcome)
                .map_or(0, |(_, _, n)| *n);
            f.add(
                "vigil_remediation_runs_total",
                "Remediation decisions by outcome since the agent started.",
                C,
                &[("remediation", name), ("outcome", outcome)],
                n as f64,
            );
        }
    }
}

/// Heartbeat delivery: present only when `[heartbeat]` is configured. Every reason is
/// always exported (0 until it happens), so `rate()` and alerts see a series from the start.
fn heartbeat_families(f: &mut Families, hb: &StatusView) {
    use MetricKind::{Counter as C, Gauge as G};
    f.add(
        "vigil_heartbeats_sent_total",
        "Heartbeats the control plane accepted (2xx).",
        C,
        &[],
        hb.sent_total as f64,
    );
    f.add(
        "vigil_heartbeats_duplicate_total",
        "Heartbeats answered 409: already received.",
        C,
        &[],
        hb.duplicate_total as f64,
    );
    for reason in FAILURE_REASONS {
        let n = hb.failures.get(reason).copied().unwrap_or(0);
        f.add(
            "vigil_heartbeat_send_failures_total",
            "Failed heartbeat sends by reason; the heartbeat is kept and retried.",
            C,
            &[("reason", reason)],
            n as f64,
        );
    }
    for reason in DROP_REASONS {
        let n = hb.dropped.get(reason).copied().unwrap_or(0);
        f.add(
            "vigil_heartbeats_dropped_total",
            "Heartbeats given up by reason (spool full, refused with a 4xx, unreadable).",
            C,
            &[("reason", reason)],
            n as f64,
        );
    }
    let last = hb
        .last_success
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    f.add(
        "vigil_heartbeat_last_success_timestamp_seconds",
        "When the control plane last accepted a heartbeat, in Unix seconds (0: never).",
        G,
        &[],
        last,
    );
    f.add(
        "vigil_heartbeat_spool_records",
        "Heartbeats waiting in the spool.",
        G,
        &[],
        hb.spooled as f64,
    );
    f.add(
        "vigil_heartbeat_spool_bytes",
        "Bytes of the spool's segment files.",
        G,
        &[],
        hb.spool_bytes as f64,
    );
    f.add(
        "vigil_heartbeat_rejected",
        "1 while the control plane answers 401/403: it rejects this host.",
        G,
        &[],
        f64::from(u8::from(hb.rejected)),
    );
    f.add(
        "vigil_heartbeat_seq",
        "The last heartbeat sequence number made.",
        G,
        &[],
        hb.seq.unwrap_or(0) as f64,
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::checks::{Metric, Status, Unit};
    use crate::lifecycle::{Lifecycle, LifecycleRecord};
    use crate::state::{CheckView, Hysteresis};

    /// node_exporter's e2e-output idea: the whole exposition of a fixed snapshot.
    #[test]
    fn renders_a_stable_exposition() {
        let mut v = CheckView::pending(
            "root",
            "disk",
            Unit::Ratio,
            Duration::from_secs(10),
            Duration::from_secs(3),
            false,
            Hysteresis::new(1, 1),
        );
        v.hysteresis.observe(Status::Warning);
        v.status = Status::Warning;
        v.value = Some(0.85);
        v.sampled_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        v.duration = Duration::from_millis(2);
        v.success = true;
        v.runs = 3;
        v.metrics = vec![
            Metric::gauge("vigil_disk_free_bytes", "Free bytes.", 1024.0)
                .label("mountpoint", "/\"q\""),
        ];
        let snap = Snapshot {
            checks: vec![Arc::new(v)],
            lifecycle: LifecycleRecord {
                v: 1,
                state: Lifecycle::Available,
                reason: String::new(),
                changed_at: String::new(),
            },
            config_error: None,
            first_round_done: true,
        };
        let out = render_with(&snap, &StatusView::default(), None, 0, 0);
        let expected = include_str!("../../tests/fixtures/metrics.golden.txt")
            .replace("VERSION", env!("CARGO_PKG_VERSION"));
        assert_eq!(out, expected, "\n{out}");
    }
}
