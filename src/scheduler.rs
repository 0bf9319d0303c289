//! The check scheduler: one task per enabled check.
//!
//! - The first round runs at once; later runs come every interval, shifted by a phase per
//!   check so that a round is spread over the first quarter of the interval (at most 5 s)
//!   instead of firing at one instant. The phase is one of [`PHASE_SLOTS`] slots there:
//!   checks that draw the same slot share one wakeup of the agent, which on an idle agent
//!   is most of what a check costs. Checks on the same database share their slot and so
//!   run back to back on their shared session: one wakeup of the server per round
//!   instead of one per check.
//! - A check's runs never overlap: its task awaits each run before scheduling the next, and
//!   a run that overruns its timeout is abandoned and recorded as `unknown`.
//! - A semaphore caps how many checks measure at once, so the agent never hits the database
//!   or the disks with everything at the same moment.
//! - The framework, not the check, times each run, counts failures, feeds the hysteresis,
//!   logs transitions and publishes the result into [`Shared`].
//!
//! Reload: [`Scheduler::apply`] diffs the running checks against a new config by name and
//! resolved settings, stopping removed and changed ones and starting added and changed ones;
//! unchanged checks keep their task, history and hysteresis.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, Semaphore};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::alarm::Alarm;
use crate::checks::{
    AnyCheck, CheckContext, CheckError, CheckSpec, Common, Observation, Status, Unit,
};
use crate::config::Config;
use crate::state::{CheckView, Hysteresis, Shared, Transition};

/// The longest phase added to a check's schedule.
const MAX_PHASE: Duration = Duration::from_secs(5);

/// How many distinct phases the checks of one interval are spread over.
const PHASE_SLOTS: u32 = 4;

/// A spec resolved into what its task needs; compared on reload.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    kind: &'static str,
    common: Common,
    /// Debug rendering of the kind's own config, to notice any change of it.
    fingerprint: String,
    /// `[agent].runner_socket`: a change rebuilds the program-running checks' runners.
    runner_socket: Option<std::path::PathBuf>,
}

struct Running {
    entry: Entry,
    /// Cancels this check's task; owned here, triggered on removal, change or shutdown.
    cancel: CancellationToken,
}

/// Runs the configured checks and publishes their results.
pub struct Scheduler {
    shared: Arc<Shared>,
    cx: Arc<CheckContext>,
    limit: Arc<Semaphore>,
    running: HashMap<String, Running>,
    /// Parent of every check task's token: cancelled at shutdown.
    shutdown: CancellationToken,
    /// Waits for every check task at shutdown.
    tracker: TaskTracker,
    /// Notified whenever a check completes a run (first-round tracking).
    progress: Arc<Notify>,
    /// When the scheduler started; every check's slots are aligned to it.
    epoch: Instant,
}

impl Scheduler {
    /// A scheduler that publishes into `shared`; tasks stop when `shutdown` is cancelled.
    pub fn new(
        shared: Arc<Shared>,
        cx: CheckContext,
        max_concurrent: usize,
        shutdown: CancellationToken,
    ) -> Self {
        Scheduler {
            shared,
            cx: Arc::new(cx),
            limit: Arc::new(Semaphore::new(max_concurrent.max(1))),
            running: HashMap::new(),
            shutdown,
            tracker: TaskTracker::new(),
            progress: Arc::new(Notify::new()),
            epoch: Instant::now(),
        }
    }

    /// Starts, stops and restarts check tasks so that the running set matches `config`.
    /// Returns `(added, removed, changed)` counts.
    pub fn apply(&mut self, config: &Config) -> (usize, usize, usize) {
        let wanted: Vec<(String, CheckSpec<'_>, Entry)> = config
            .enabled_checks()
            .map(|(name, spec)| {
                let entry = Entry {
                    kind: spec.kind(),
                    common: spec.common(config.agent.interval),
                    fingerprint: format!("{spec:?}"),
                    runner_socket: config.agent.runner_socket.clone(),
                };
                (name.to_string(), spec, entry)
            })
            .collect();
        let (mut added, mut removed, mut changed) = (0, 0, 0);

        let keep: Vec<&str> = wanted.iter().map(|(n, _, _)| n.as_str()).collect();
        self.running.retain(|name, r| {
            if keep.contains(&name.as_str()) {
                return true;
            }
            r.cancel.cancel();
            removed += 1;
            info!(check = %name, "check removed");
            false
        });

        let mut order = Vec::with_capacity(wanted.len());
        for (name, spec, entry) in wanted {
            order.push(name.clone());
            match self.running.get(&name) {
                Some(r) if r.entry == entry => continue,
                Some(r) => {
                    r.cancel.cancel();
                    changed += 1;
                    info!(check = %name, kind = entry.kind, "check changed; restarting it");
                }
                None => {
                    added += 1;
                    debug!(check = %name, kind = entry.kind, "check added");
                }
            }
            let cancel = self.shutdown.child_token();
            let unit = crate::checks::kind_info(entry.kind).map_or(Unit::Count, |k| k.unit);
            let view = CheckView::pending(
                &name,
                entry.kind,
                unit,
                entry.common.interval,
                entry.common.timeout,
                entry.common.essential,
                Hysteresis::new(entry.common.trip_after, entry.common.clear_after),
            );
            self.shared.update(|s| {
                s.checks.retain(|c| c.name != name);
                s.checks.push(Arc::new(view));
            });
            let task = CheckTask {
                group: spec.schedule_group(),
                epoch: self.epoch,
                name: name.clone(),
                check: build(&spec, &entry.common, config, &name),
                common: entry.common.clone(),
                shared: self.shared.clone(),
                cx: self.cx.clone(),
                limit: self.limit.clone(),
                progress: self.progress.clone(),
                cancel: cancel.clone(),
            };
            self.tracker.spawn(task.run());
            self.running.insert(name, Running { entry, cancel });
        }

        // Publish in config order; drop views of removed checks.
        self.shared.update(|s| {
            let mut by_name: HashMap<String, Arc<CheckView>> =
                s.checks.drain(..).map(|c| (c.name.clone(), c)).collect();
            s.checks = order.iter().filter_map(|n| by_name.remove(n)).collect();
        });
        (added, removed, changed)
    }

    /// Waits until every check present now has completed at least one run, then marks the
    /// first round done.
    pub fn first_round(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (shared, progress) = (self.shared.clone(), self.progress.clone());
        async move {
            loop {
                let notified = progress.notified();
                if shared.load().checks.iter().all(|c| c.sampled_at.is_some()) {
                    break;
                }
                notified.await;
            }
            shared.update(|s| s.first_round_done = true);
        }
    }

    /// Stops every check task and waits for them.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

struct CheckTask {
    /// Checks with the same group key (the same database) share a phase, so that they run
    /// back to back on their shared session instead of waking the server separately.
    group: Option<String>,
    /// The scheduler's start: slots are `epoch + phase + k * interval`, so checks keep
    /// their alignment also when one of them restarts after a reload.
    epoch: Instant,
    name: String,
    check: AnyCheck,
    common: Common,
    shared: Arc<Shared>,
    cx: Arc<CheckContext>,
    limit: Arc<Semaphore>,
    progress: Arc<Notify>,
    cancel: CancellationToken,
}

impl CheckTask {
    async fn run(mut self) {
        let interval = self.common.interval;
        let max_phase = (interval / 4).min(MAX_PHASE);
        let fraction = match &self.group {
            Some(key) => group_fraction(key),
            None => fastrand::f64(),
        };
        let phase = phase_slot(max_phase, fraction);
        let mut next = Instant::now();
        let mut alarm = Alarm::new();
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = alarm.sleep_until(next) => {}
            }
            if !self.measure().await {
                return;
            }
            // Skips slots a long run overran rather than running back to back.
            next = next_slot(self.epoch, phase, interval, Instant::now());
        }
    }

    /// Runs the check once under the concurrency limit and its timeout, and records the
    /// result. Returns false when cancelled meanwhile.
    async fn measure(&mut self) -> bool {
        let permit = tokio::select! {
            _ = self.cancel.cancelled() => return false,
            p = self.limit.clone().acquire_owned() => p,
        };
        let span = info_span!("check", check = %self.name, kind = self.check.kind());
        let started = Instant::now();
        let wall = SystemTime::now();
        let result = tokio::select! {
            _ = self.cancel.cancelled() => return false,
            r = timeout(self.common.timeout, self.check.run(&self.cx)).instrument(span.clone()) => {
                r.unwrap_or(Err(CheckError::Timeout(self.common.timeout)))
            }
        };
        drop(permit);
        let elapsed = started.elapsed();
        span.in_scope(|| self.record(result, wall, started, elapsed));
        self.progress.notify_waiters();
        true
    }

    fn record(
        &self,
        result: Result<Observation, CheckError>,
        wall: SystemTime,
        mono: Instant,
        elapsed: Duration,
    ) {
        let (obs, success) = match result {
            // A kind may return `unknown` with metrics of its own (postgres.up reports
            // `vigil_pg_up 0`); it still did not measure, so it counts as a failure.
            Ok(o) => {
                let measured = o.status != Status::Unknown;
                (o, measured)
            }
            Err(e) => {
                debug!(error = %e, "check could not measure");
                (
                    Observation {
                        status: Status::Unknown,
                        value: None,
                        message: e.to_string(),
                        metrics: Vec::new(),
                        replication: None,
                    },
                    false,
                )
            }
        };
        let name = &self.name;
        let transition = self.shared.update(|s| {
            let slot = s.checks.iter_mut().find(|c| c.name == *name)?;
            let mut v = CheckView::clone(slot);
            let previous = v.status;
            let was_sampled = v.sampled_at.is_some();
            let streak_before = v.hysteresis.streak;
            let t = v.hysteresis.observe(obs.status);
            if v.hysteresis.streak <= streak_before || !was_sampled {
                v.since = Some(wall);
            }
            v.status = obs.status;
            v.value = obs.value.filter(|x| x.is_finite());
            v.message = obs.message.clone();
            v.sampled_at = Some(wall);
            v.sampled_mono = Some(mono);
            v.duration = elapsed;
            v.success = success;
            v.runs += 1;
            if !success {
                v.failures += 1;
            }
            v.metrics = obs.metrics;
            v.replication = obs.replication;
            *slot = Arc::new(v);
            Some((previous, was_sampled, t))
        });
        let Some((previous, was_sampled, t)) = transition else {
            return;
        };
        match t {
            Some(Transition::Tripped(level)) => {
                warn!(status = %obs.status, level = %level, message = %obs.message, "check tripped")
            }
            Some(Transition::Cleared) => info!(message = %obs.message, "check cleared"),
            None if was_sampled && previous != obs.status => {
                info!(from = %previous, to = %obs.status, message = %obs.message, "check status changed")
            }
            None => {}
        }
    }
}

/// The first slot `epoch + phase + k * interval` strictly after `now`.
fn next_slot(
    epoch: Instant,
    phase: std::time::Duration,
    interval: std::time::Duration,
    now: Instant,
) -> Instant {
    let start = epoch + phase;
    if now < start {
        return start;
    }
    let k = (now - start).as_nanos() / interval.as_nanos().max(1) + 1;
    start + interval * u32::try_from(k).unwrap_or(u32::MAX)
}

/// Builds a check; with `[agent].runner_socket` set, a program it cannot run as its
/// `run_as` goes to the privileged runner.
fn build(spec: &CheckSpec<'_>, common: &Common, config: &Config, name: &str) -> AnyCheck {
    let mut check = spec.build(common);
    if let Some(socket) = &config.agent.runner_socket {
        check.via_runner(socket, name);
    }
    check
}

/// The phase slot a fraction in [0, 1) falls in: `k * max_phase / PHASE_SLOTS`.
fn phase_slot(max_phase: Duration, fraction: f64) -> Duration {
    let k = (fraction.clamp(0.0, 1.0) * f64::from(PHASE_SLOTS)) as u32;
    max_phase / PHASE_SLOTS * k.min(PHASE_SLOTS - 1)
}

/// A stable fraction in [0, 1) for a group key.
fn group_fraction(key: &str) -> f64 {
    use std::hash::{Hash, Hasher};
    // DefaultHasher::new() has fixed keys: the same key gives the same phase in every task.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Runs each named check (all enabled ones when `names` is empty) once, concurrently, and
/// returns their views in config order: what `vigil check` prints.
///
/// # Errors
/// The first name that matches no configured check.
pub async fn run_once(
    config: &Config,
    names: &[String],
    cx: CheckContext,
) -> Result<Vec<Arc<CheckView>>, String> {
    for n in names {
        if !config.check.iter().any(|(name, _)| name == n) {
            return Err(format!("no check named {n:?} in the config"));
        }
    }
    let selected: Vec<(&str, CheckSpec<'_>)> = if names.is_empty() {
        config.enabled_checks().collect()
    } else {
        // A check named explicitly runs even when disabled: the operator asked for it.
        config
            .check
            .iter()
            .filter(|(n, _)| names.iter().any(|x| x == n))
            .collect()
    };
    let shared = Arc::new(Shared::new(crate::state::Snapshot {
        checks: Vec::new(),
        lifecycle: crate::lifecycle::LifecycleRecord {
            v: 1,
            state: config.agent.initial_lifecycle,
            reason: String::new(),
            changed_at: String::new(),
        },
        config_error: None,
        first_round_done: false,
    }));
    let cx = Arc::new(cx);
    let limit = Arc::new(Semaphore::new(config.agent.max_concurrent_checks.max(1)));
    let progress = Arc::new(Notify::new());
    let cancel = CancellationToken::new();
    let mut set = tokio::task::JoinSet::new();
    for (name, spec) in selected {
        let common = spec.common(config.agent.interval);
        let unit = crate::checks::kind_info(spec.kind()).map_or(Unit::Count, |k| k.unit);
        let h = Hysteresis::new(common.trip_after, common.clear_after);
        let view = CheckView::pending(
            name,
            spec.kind(),
            unit,
            common.interval,
            common.timeout,
            common.essential,
            h,
        );
        shared.update(|s| s.checks.push(Arc::new(view)));
        let mut task = CheckTask {
            group: None,
            epoch: Instant::now(),
            name: name.to_string(),
            check: build(&spec, &common, config, name),
            common,
            shared: shared.clone(),
            cx: cx.clone(),
            limit: limit.clone(),
            progress: progress.clone(),
            cancel: cancel.clone(),
        };
        set.spawn(async move { task.measure().await });
    }
    while set.join_next().await.is_some() {}
    Ok(shared.load().checks.clone())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn slots_are_aligned_to_the_epoch_and_skip_missed_ones() {
        let epoch = Instant::now();
        let (phase, iv) = (Duration::from_millis(300), Duration::from_secs(1));
        assert_eq!(next_slot(epoch, phase, iv, epoch), epoch + phase);
        assert_eq!(
            next_slot(epoch, phase, iv, epoch + phase),
            epoch + phase + iv
        );
        // A run that overran three slots resumes on the next one, not back to back.
        let late = epoch + Duration::from_millis(3_450);
        assert_eq!(next_slot(epoch, phase, iv, late), epoch + phase + iv * 4);
    }

    #[test]
    fn phases_fall_on_a_few_slots_within_the_spread() {
        let max = Duration::from_millis(3750);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..1000 {
            let p = phase_slot(max, f64::from(i) / 1000.0);
            assert!(p < max, "{p:?}");
            seen.insert(p);
        }
        let want: Vec<_> = (0..PHASE_SLOTS).map(|k| max / PHASE_SLOTS * k).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), want);
        // The edges: a fraction of 1.0 (or above) stays in the last slot.
        assert_eq!(phase_slot(max, 1.0), max / PHASE_SLOTS * (PHASE_SLOTS - 1));
        assert_eq!(phase_slot(max, -0.5), Duration::ZERO);
    }

    #[test]
    fn a_group_shares_its_phase() {
        assert_eq!(group_fraction("db-a"), group_fraction("db-a"));
        assert_ne!(group_fraction("db-a"), group_fraction("db-b"));
        assert!((0.0..1.0).contains(&group_fraction("db-a")));
    }
}
