//! The agent's published state: each check's newest result with its hysteresis, the
//! lifecycle, and the health derived from them.
//!
//! Writers (one task per check, the admin API, reloads) serialize on a small mutex, build a
//! new [`Snapshot`] (a vector of `Arc`s, so cheap to copy) and publish it through an
//! `ArcSwap`; readers (every HTTP request) load the current `Arc<Snapshot>` without taking
//! any lock, so a slow reader never delays a check and a request never waits for one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::checks::{Metric, ReplicationFacts, Status, Unit};
use crate::lifecycle::{HostState, Lifecycle, LifecycleRecord};

/// Samples older than this many intervals are stale.
pub const STALE_INTERVALS: u32 = 3;

/// Trip/clear hysteresis of one check (the contract's `trip_after`/`clear_after`).
///
/// `streak` counts consecutive samples on the current side (ok or non-ok); `unknown` is
/// non-ok. While tripped, `level` is the worst status seen since the check tripped's
/// streak began, with critical ranking above unknown (see [`Status::severity`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Hysteresis {
    trip_after: u32,
    clear_after: u32,
    /// Whether the check is tripped.
    pub tripped: bool,
    /// The worst status of the current non-ok streak (`Ok` when not tripped).
    pub level: Status,
    streak_worst: Status,
    /// Consecutive samples on the current side.
    pub streak: u32,
    streak_ok: bool,
}

/// A change of the tripped state caused by one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The check tripped at this level.
    Tripped(Status),
    /// The check cleared.
    Cleared,
}

impl Hysteresis {
    /// A fresh, untripped check.
    pub fn new(trip_after: u32, clear_after: u32) -> Self {
        Hysteresis {
            trip_after: trip_after.max(1),
            clear_after: clear_after.max(1),
            tripped: false,
            level: Status::Ok,
            streak_worst: Status::Ok,
            streak: 0,
            streak_ok: true,
        }
    }

    /// Feeds one sample; returns the transition it caused, if any.
    pub fn observe(&mut self, s: Status) -> Option<Transition> {
        let ok = s == Status::Ok;
        if ok == self.streak_ok && self.streak > 0 {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.streak = 1;
            self.streak_ok = ok;
            self.streak_worst = Status::Ok;
        }
        if ok {
            if self.tripped && self.streak >= self.clear_after {
                self.tripped = false;
                self.level = Status::Ok;
                return Some(Transition::Cleared);
            }
            return None;
        }
        self.streak_worst = self.streak_worst.worse(s);
        if self.tripped {
            self.level = self.level.worse(s);
            None
        } else if self.streak >= self.trip_after {
            self.tripped = true;
            self.level = self.streak_worst;
            Some(Transition::Tripped(self.level))
        } else {
            None
        }
    }
}

/// One check's state as readers see it.
#[derive(Debug, Clone)]
pub struct CheckView {
    /// The check's name.
    pub name: String,
    /// Its kind.
    pub kind: &'static str,
    /// The unit of `value`.
    pub unit: Unit,
    /// Its interval.
    pub interval: Duration,
    /// Its timeout.
    pub timeout: Duration,
    /// An unknown essential check makes the host `uncertain`.
    pub essential: bool,
    /// Newest sample's status (`Unknown` before the first sample).
    pub status: Status,
    /// Trip/clear state.
    pub hysteresis: Hysteresis,
    /// Newest primary value.
    pub value: Option<f64>,
    /// Newest message.
    pub message: String,
    /// When the current streak began (wall clock).
    pub since: Option<SystemTime>,
    /// When the newest sample was taken (wall clock).
    pub sampled_at: Option<SystemTime>,
    /// When the newest sample was taken (monotonic, for staleness).
    pub sampled_mono: Option<Instant>,
    /// When the check was registered (monotonic; liveness before the first sample).
    pub registered_mono: Instant,
    /// How long the newest run took.
    pub duration: Duration,
    /// Whether the newest run measured (false: `unknown` from an error or a timeout).
    pub success: bool,
    /// Runs so far.
    pub runs: u64,
    /// Runs that could not measure.
    pub failures: u64,
    /// Check-specific metrics of the newest sample.
    pub metrics: Vec<Metric>,
    /// Routing facts of the newest sample (`postgres.replication` only; `None` when it
    /// could not measure).
    pub replication: Option<ReplicationFacts>,
}

impl CheckView {
    /// A check that has not run yet.
    pub fn pending(
        name: &str,
        kind: &'static str,
        unit: Unit,
        interval: Duration,
        timeout: Duration,
        essential: bool,
        h: Hysteresis,
    ) -> Self {
        CheckView {
            name: name.to_string(),
            kind,
            unit,
            interval,
            timeout,
            essential,
            status: Status::Unknown,
            hysteresis: h,
            value: None,
            message: "not sampled yet".into(),
            since: None,
            sampled_at: None,
            sampled_mono: None,
            registered_mono: Instant::now(),
            duration: Duration::ZERO,
            success: false,
            runs: 0,
            failures: 0,
            metrics: Vec::new(),
            replication: None,
        }
    }

    /// Whether the newest sample is older than [`STALE_INTERVALS`] intervals (a check that
    /// has never been sampled is not stale but pending).
    pub fn is_stale(&self, now: Instant) -> bool {
        self.sampled_mono
            .is_some_and(|t| now.saturating_duration_since(t) > self.interval * STALE_INTERVALS)
    }

    /// Whether the scheduler is overdue on this check: no completed run within three
    /// intervals plus its timeout.
    pub fn is_overdue(&self, now: Instant) -> bool {
        let last = self.sampled_mono.unwrap_or(self.registered_mono);
        now.saturating_duration_since(last) > self.interval * STALE_INTERVALS + self.timeout
    }
}

/// Everything the API and heartbeats read, published as one immutable value.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Checks in config order.
    pub checks: Vec<Arc<CheckView>>,
    /// The operator's lifecycle.
    pub lifecycle: LifecycleRecord,
    /// The last refused reload, if the running config is not the file's.
    pub config_error: Option<String>,
    /// Set once every check present at start has been sampled.
    pub first_round_done: bool,
}

impl Snapshot {
    /// Health derived from tripped checks: `unavailable` (tripped at critical), else
    /// `uncertain` (an essential check tripped at unknown), else `available`.
    pub fn health(&self) -> HostState {
        let tripped = || self.checks.iter().filter(|c| c.hysteresis.tripped);
        if tripped().any(|c| c.hysteresis.level == Status::Critical) {
            HostState::Unavailable
        } else if tripped().any(|c| c.essential && c.hysteresis.level == Status::Unknown) {
            HostState::Uncertain
        } else {
            HostState::Available
        }
    }

    /// The reported state: the lifecycle unless it is `available`, then the health.
    pub fn state(&self) -> HostState {
        match self.lifecycle.state {
            Lifecycle::Available => self.health(),
            other => other.as_host_state(),
        }
    }

    /// Names of checks whose newest sample is stale.
    pub fn stale(&self, now: Instant) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| c.is_stale(now))
            .map(|c| c.name.as_str())
            .collect()
    }

    /// Whether the scheduler is making progress on every check.
    pub fn is_live(&self, now: Instant) -> bool {
        !self.checks.iter().any(|c| c.is_overdue(now))
    }

    /// A check by name.
    pub fn check(&self, name: &str) -> Option<&Arc<CheckView>> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// The shared, published state.
pub struct Shared {
    current: ArcSwap<Snapshot>,
    /// Serializes writers so that no update is lost; readers never take it.
    write: Mutex<()>,
    /// Bumped after every publish, so a task can wait for a change instead of polling.
    version: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// Publishes `initial`.
    pub fn new(initial: Snapshot) -> Self {
        Shared {
            current: ArcSwap::from_pointee(initial),
            write: Mutex::new(()),
            version: tokio::sync::watch::Sender::new(0),
        }
    }

    /// A receiver that wakes after each publish (the value is a publish counter).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The current snapshot (lock-free).
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Applies `f` to a copy of the current snapshot and publishes the result.
    pub fn update<R>(&self, f: impl FnOnce(&mut Snapshot) -> R) -> R {
        // A poisoned lock only means another writer panicked mid-update; the snapshot itself
        // is immutable and still whole, so carry on with it.
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = Snapshot::clone(&self.current.load());
        let r = f(&mut next);
        self.current.store(Arc::new(next));
        self.version.send_modify(|v| *v = v.wrapping_add(1));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use Status::*;

    #[test]
    fn trips_after_and_clears_after() {
        let mut h = Hysteresis::new(3, 2);
        assert_eq!(h.observe(Warning), None);
        assert_eq!(h.observe(Critical), None);
        assert_eq!(h.observe(Warning), Some(Transition::Tripped(Critical)));
        assert!(h.tripped);
        assert_eq!(h.observe(Ok), None);
        assert!(
            h.tripped,
            "one ok sample is not enough with clear_after = 2"
        );
        assert_eq!(h.observe(Ok), Some(Transition::Cleared));
        assert_eq!(h.level, Ok);
    }

    #[test]
    fn an_ok_sample_resets_the_trip_count() {
        let mut h = Hysteresis::new(2, 1);
        h.observe(Critical);
        h.observe(Ok);
        assert_eq!(h.observe(Critical), None);
        assert_eq!(h.observe(Critical), Some(Transition::Tripped(Critical)));
    }

    #[test]
    fn unknown_counts_as_non_ok_and_critical_outranks_it() {
        let mut h = Hysteresis::new(2, 1);
        h.observe(Critical);
        assert_eq!(h.observe(Unknown), Some(Transition::Tripped(Critical)));
        let mut h = Hysteresis::new(1, 1);
        assert_eq!(h.observe(Unknown), Some(Transition::Tripped(Unknown)));
    }

    fn status() -> impl Strategy<Value = Status> {
        prop_oneof![Just(Ok), Just(Warning), Just(Critical), Just(Unknown)]
    }

    proptest! {
        /// Model: tripped iff the last `trip_after` samples were all non-ok at some point
        /// and no `clear_after` consecutive ok samples came since.
        #[test]
        fn matches_a_direct_model(trip in 1u32..5, clear in 1u32..5, samples in prop::collection::vec(status(), 0..60)) {
            let mut h = Hysteresis::new(trip, clear);
            let mut tripped = false;
            for (i, s) in samples.iter().enumerate() {
                h.observe(*s);
                let tail = |n: u32, pred: &dyn Fn(&Status) -> bool| {
                    (i + 1) >= n as usize && samples[i + 1 - n as usize..=i].iter().all(pred)
                };
                if !tripped && tail(trip, &|s| *s != Ok) {
                    tripped = true;
                } else if tripped && tail(clear, &|s| *s == Ok) {
                    tripped = false;
                }
                prop_assert_eq!(h.tripped, tripped, "after sample {}", i);
                if !h.tripped {
                    prop_assert_eq!(h.level, Ok);
                } else {
                    prop_assert!(h.level != Ok);
                }
            }
        }
    }
}
