//! `GET /metrics` of the control plane: Prometheus text format 0.0.4.
//!
//! - `vigil_control_hosts{state}`: enrolled hosts by derived state (every state listed,
//!   0 when none), refreshed by the state tracker every second;
//! - `vigil_control_heartbeats_accepted_total`;
//! - `vigil_control_heartbeats_rejected_total{reason}`: `reason` from a fixed set
//!   ([`REJECT_REASONS`]), never an error string;
//! - `vigil_control_verify_duration_seconds`: the signature check alone (histogram);
//! - `vigil_control_accept_duration_seconds`: from the body read to the durable answer;
//! - `vigil_control_webhook_calls_total{result}`: `ok`, `failed` (after every retry) or
//!   `dropped` (queue full);
//! - `vigil_build_info{version}`: always 1.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::lifecycle::HostState;

/// Every value the `reason` label of rejections takes (the 401/409/4xx reasons of
/// `POST /v1/heartbeats`).
pub const REJECT_REASONS: &[&str] = &[
    "bad_body",
    "unsupported_version",
    "body_too_large",
    "body_timeout",
    "unknown_host",
    "unknown_key",
    "missing_header",
    "missing_component",
    "malformed_signature",
    "bad_digest",
    "bad_signature",
    "created_out_of_window",
    "bad_target",
    "stale_seq",
    "store_error",
];

/// Every host state, in the contract's order.
pub const ALL_STATES: [HostState; 10] = [
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

/// The receiver's metrics, registered once.
pub struct Metrics {
    registry: Registry,
    /// `vigil_control_hosts{state}`.
    pub hosts: IntGaugeVec,
    /// `vigil_control_heartbeats_accepted_total`.
    pub accepted: IntCounter,
    /// `vigil_control_heartbeats_rejected_total{reason}`.
    pub rejected: IntCounterVec,
    /// `vigil_control_verify_duration_seconds`.
    pub verify: Histogram,
    /// `vigil_control_accept_duration_seconds`.
    pub accept: Histogram,
    /// `vigil_control_webhook_calls_total{result}`.
    pub webhook: IntCounterVec,
}

impl Metrics {
    /// Builds and registers every family.
    ///
    /// # Errors
    /// A prometheus error only for an invalid name or a duplicate registration, both
    /// fixed at compile time here.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let hosts = IntGaugeVec::new(
            Opts::new("vigil_control_hosts", "Enrolled hosts by derived state."),
            &["state"],
        )?;
        let accepted = IntCounter::new(
            "vigil_control_heartbeats_accepted_total",
            "Heartbeats verified and stored.",
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "vigil_control_heartbeats_rejected_total",
                "Heartbeats refused, by reason.",
            ),
            &["reason"],
        )?;
        let verify = Histogram::with_opts(
            HistogramOpts::new(
                "vigil_control_verify_duration_seconds",
                "Time to check one heartbeat's digest and signature.",
            )
            .buckets(vec![
                20e-6, 40e-6, 60e-6, 80e-6, 100e-6, 150e-6, 250e-6, 500e-6, 1e-3, 5e-3,
            ]),
        )?;
        let accept = Histogram::with_opts(
            HistogramOpts::new(
                "vigil_control_accept_duration_seconds",
                "Time from the body read to the durable answer of an accepted heartbeat.",
            )
            .buckets(vec![
                100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
                1.0,
            ]),
        )?;
        let webhook = IntCounterVec::new(
            Opts::new(
                "vigil_control_webhook_calls_total",
                "Webhook calls for changes of derived state, by result.",
            ),
            &["result"],
        )?;
        let build = IntGaugeVec::new(
            Opts::new("vigil_build_info", "Always 1; the version in a label."),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for s in ALL_STATES {
            hosts.with_label_values(&[s.as_str()]).set(0);
        }
        for r in REJECT_REASONS {
            rejected.with_label_values(&[r]).reset();
        }
        for r in ["ok", "failed", "dropped"] {
            webhook.with_label_values(&[r]).reset();
        }
        registry.register(Box::new(hosts.clone()))?;
        registry.register(Box::new(accepted.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(verify.clone()))?;
        registry.register(Box::new(accept.clone()))?;
        registry.register(Box::new(webhook.clone()))?;
        registry.register(Box::new(build))?;
        Ok(Metrics {
            registry,
            hosts,
            accepted,
            rejected,
            verify,
            accept,
            webhook,
        })
    }

    /// Counts one rejection; `reason` must be one of [`REJECT_REASONS`].
    pub fn reject(&self, reason: &'static str) {
        debug_assert!(REJECT_REASONS.contains(&reason), "{reason}");
        self.rejected.with_label_values(&[reason]).inc();
    }

    /// The text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec fails only on an invalid family, which registration refused.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_exposed_from_the_start() {
        let m = Metrics::new().unwrap();
        m.reject("bad_signature");
        m.accepted.inc();
        let text = String::from_utf8(m.render()).unwrap();
        for needle in [
            "vigil_control_hosts{state=\"uncertain\"} 0",
            "vigil_control_heartbeats_accepted_total 1",
            "vigil_control_heartbeats_rejected_total{reason=\"bad_signature\"} 1",
            "vigil_control_heartbeats_rejected_total{reason=\"stale_seq\"} 0",
            "# TYPE vigil_control_verify_duration_seconds histogram",
            "vigil_build_info{version=",
        ] {
            assert!(text.contains(needle), "{needle} missing:\n{text}");
        }
    }
}
