//! `GET /metrics`: Prometheus text format 0.0.4, rendered from the cached snapshot.
//!
//! A scrape never runs a check (that would couple Prometheus load to PostgreSQL load); it
//! writes the newest results straight into the page (see [`Exposition`] for why not
//! through the `prometheus` crate's encoder). Families are sorted by name so the output is
//! stable.
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

use std::time::UNIX_EPOCH;

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

/// The page being written: every sample's line goes into one buffer as it is added, and
/// [`Exposition::finish`] puts the lines in family order under their `# HELP`/`# TYPE`
/// headers.
///
/// The text format is three escape rules and a line per sample, so it is written here
/// rather than through the `prometheus` crate's encoder: that one takes its own owned
/// model, a `String` per label and a box per value, which cost a scrape of the full check
/// set about 2,000 allocations and 150 µs; this way it is a few allocations and 55 µs
/// (`cargo bench --bench micro -- metrics/`). The output is the crate's, byte for byte
/// (the `oracle` tests compare the two), except that infinities are `+Inf`/`-Inf` as the
/// format spells them.
#[derive(Default)]
struct Exposition {
    /// Sample lines, in the order they were added.
    lines: String,
    samples: Vec<Sample>,
}

/// One sample: its family and where its line is in [`Exposition::lines`].
struct Sample {
    family: &'static str,
    help: &'static str,
    kind: MetricKind,
    start: usize,
    end: usize,
}

impl Exposition {
    fn add(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: MetricKind,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        self.add_labels(name, help, kind, labels.iter().copied(), value);
    }

    fn add_labels<'l>(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: MetricKind,
        labels: impl IntoIterator<Item = (&'l str, &'l str)>,
        value: f64,
    ) {
        let start = self.lines.len();
        let out = &mut self.lines;
        out.push_str(name);
        let mut sep = '{';
        for (k, v) in labels {
            out.push(sep);
            out.push_str(k);
            out.push_str("=\"");
            escape_into(out, v, true);
            out.push('"');
            sep = ',';
        }
        if sep == ',' {
            out.push('}');
        }
        out.push(' ');
        push_value(out, value);
        out.push('\n');
        self.samples.push(Sample {
            family: name,
            help,
            kind,
            start,
            end: self.lines.len(),
        });
    }

    /// The page: families sorted by name, so the output is stable, each family's samples
    /// in the order they were added. A family's help and type are its first sample's; a
    /// kind that reported one name with two types would otherwise produce an invalid page.
    fn finish(mut self) -> String {
        // A stable sort keeps each family's samples in the order they were added.
        self.samples.sort_by(|a, b| a.family.cmp(b.family));
        // The headers take less than the lines (21 KB for 13 checks, 8 of them
        // headers): one allocation in the usual case.
        let mut out = String::with_capacity(2 * self.lines.len());
        let mut family = "";
        for s in &self.samples {
            if s.family != family {
                family = s.family;
                if !s.help.is_empty() {
                    out.push_str("# HELP ");
                    out.push_str(family);
                    out.push(' ');
                    escape_into(&mut out, s.help, false);
                    out.push('\n');
                }
                out.push_str("# TYPE ");
                out.push_str(family);
                out.push_str(match s.kind {
                    MetricKind::Gauge => " gauge\n",
                    MetricKind::Counter => " counter\n",
                });
            }
            out.push_str(&self.lines[s.start..s.end]);
        }
        out
    }
}

/// Appends `v` escaped for the text format: `\\` and newline always, `"` in label values.
/// The scan is by byte: the three are ASCII, which never occurs inside a multi-byte UTF-8
/// sequence, so every index found is a char boundary.
fn escape_into(out: &mut String, v: &str, quote: bool) {
    let mut rest = v;
    while let Some(i) = rest
        .bytes()
        .position(|b| b == b'\\' || b == b'\n' || (quote && b == b'"'))
    {
        out.push_str(&rest[..i]);
        out.push_str(match rest.as_bytes()[i] {
            b'\\' => "\\\\",
            b'\n' => "\\n",
            _ => "\\\"",
        });
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
}

/// Appends a sample value: Rust's shortest round-trip decimal, which Prometheus parses,
/// and the format's own spelling of the infinities (`NaN` is the same in both). Most
/// values are counts, written as integers: the same digits, without the float formatter.
fn push_value(out: &mut String, v: f64) {
    use std::fmt::Write;
    // Writing to a String cannot fail.
    if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 && !(v == 0.0 && v.is_sign_negative()) {
        // Exact: every integer below 2^53 is an f64, and the float formatter writes such a
        // value as its integer digits (`-0` is left to it).
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
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
    let mut f = Exposition {
        // About what a check's samples take (1 KiB with its kind's metrics), plus the
        // agent's own: one allocation, not a doubling series.
        lines: String::with_capacity(4096 + 1024 * snap.checks.len()),
        samples: Vec::with_capacity(64 + 16 * snap.checks.len()),
    };
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
            let labels = m.labels.iter().map(|(k, v)| (*k, v.as_str()));
            let labels = std::iter::once(("check", c.name.as_str())).chain(labels);
            f.add_labels(m.name, m.help, m.kind, labels, m.value);
        }
    }

    if heartbeat.enabled {
        heartbeat_families(&mut f, heartbeat);
    }
    if let Some(a) = automation {
        automation_families(&mut f, a);
    }

    f.finish()
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
fn automation_families(f: &mut Exposition, a: &View) {
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
fn heartbeat_families(f: &mut Exposition, hb: &StatusView) {
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

/// The page against the `prometheus` crate's text encoder (the control plane's, kept as
/// the oracle): the same samples give the same bytes, escaping and ordering included.
#[cfg(test)]
mod oracle {
    use prometheus::proto::{
        Counter, Gauge, LabelPair, Metric as PMetric, MetricFamily, MetricType,
    };
    use proptest::prelude::*;

    use super::*;

    /// Short names, and long ones that share their first 16 bytes (or are that prefix).
    const NAMES: [&str; 6] = [
        "vigil_b_total",
        "vigil_a",
        "vigil_c_ratio",
        "vigil_pg_archive_failing",
        "vigil_pg_archive",
        "vigil_pg_archive_age_seconds",
    ];
    const HELPS: [&str; 6] = [
        "Plain help.",
        "Back\\slash and\nnewline.",
        "\"Quoted\" help.",
        "Ünïcode help.",
        "",
        "Help.",
    ];
    const KEYS: [&str; 2] = ["check", "mountpoint"];

    /// (family index, kind is counter, label values, value)
    type Spec = (usize, bool, Vec<String>, f64);

    fn oracle(samples: &[Spec]) -> String {
        let mut fams: Vec<MetricFamily> = Vec::new();
        for (i, counter, labels, value) in samples {
            let name = NAMES[*i];
            let pos = match fams.iter().position(|f| f.name() == name) {
                Some(p) => p,
                None => {
                    let mut f = MetricFamily::default();
                    f.set_name(name.to_string());
                    f.set_help(HELPS[*i].to_string());
                    f.set_field_type(if *counter {
                        MetricType::COUNTER
                    } else {
                        MetricType::GAUGE
                    });
                    fams.push(f);
                    fams.len() - 1
                }
            };
            let fam = &mut fams[pos];
            let mut m = PMetric::default();
            m.set_label(
                KEYS.iter()
                    .zip(labels)
                    .map(|(k, v)| {
                        let mut l = LabelPair::default();
                        l.set_name(k.to_string());
                        l.set_value(v.clone());
                        l
                    })
                    .collect(),
            );
            if fam.get_field_type() == MetricType::COUNTER {
                let mut c = Counter::default();
                c.set_value(*value);
                m.set_counter(c);
            } else {
                let mut g = Gauge::default();
                g.set_value(*value);
                m.set_gauge(g);
            }
            fam.mut_metric().push(m);
        }
        fams.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&fams, &mut out)
            .unwrap_or_else(|e| panic!("oracle encoder: {e}"));
        out
    }

    fn ours(samples: &[Spec]) -> String {
        let mut f = Exposition::default();
        for (i, counter, labels, value) in samples {
            let kind = if *counter {
                MetricKind::Counter
            } else {
                MetricKind::Gauge
            };
            let l = KEYS.iter().copied().zip(labels.iter().map(String::as_str));
            f.add_labels(NAMES[*i], HELPS[*i], kind, l, *value);
        }
        f.finish()
    }

    fn value() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<u32>().prop_map(f64::from),
            any::<f64>().prop_filter("the oracle writes inf, the format +Inf", |v| v.is_finite()),
            Just(f64::NAN),
            Just(0.1),
            Just(1e21),
            Just(-3.5e-9),
            Just(-0.0),
            Just(-42.0),
            Just(999_999_999_999_999.0),
            Just(1e15),
        ]
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (
            0..NAMES.len(),
            any::<bool>(),
            prop::collection::vec("(\\PC|[\\\\\"\n]){0,12}", 0..=KEYS.len()),
            value(),
        )
    }

    proptest! {
        #[test]
        fn matches_the_crate_encoder(samples in prop::collection::vec(spec(), 1..12)) {
            prop_assert_eq!(ours(&samples), oracle(&samples));
        }
    }

    #[test]
    fn writes_infinities_as_the_format_spells_them() {
        let samples: Vec<Spec> = vec![
            (1, false, vec![], f64::INFINITY),
            (1, false, vec!["x".into()], f64::NEG_INFINITY),
        ];
        assert_eq!(
            ours(&samples),
            "# HELP vigil_a Back\\\\slash and\\nnewline.\n# TYPE vigil_a gauge\n\
             vigil_a +Inf\nvigil_a{check=\"x\"} -Inf\n"
        );
    }
}
