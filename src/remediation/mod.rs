//! Remediation: pre-approved scripts run when a check trips, behind guardrails, with an
//! audit trail.
//!
//! # Design
//!
//! Modules: [`guard`] (what may run, and sealing exactly those bytes), [`audit`] (the
//! append-only log), [`state`] (what the guardrails remember across restarts). This file
//! is the engine: two tasks around one queue.
//!
//! - The **watcher** wakes on every publish of [`Shared`] (one per check sample) and on a
//!   one-second tick. A check with `remediation = "NAME"` that goes from not tripped to
//!   tripped queues NAME at once; while it stays tripped, NAME is queued again once its
//!   *re-consider time* has passed (set after every decision: the cooldown's end, the
//!   budget's freeing, or one cooldown — at least one check interval — after a skip).
//!   A NAME already queued or running is not queued twice (merged, no record).
//! - The **worker** takes one job at a time (one remediation at a time per host) and
//!   decides, in this order: escalated, paused, lifecycle ≠ available, cooldown, budget →
//!   `skipped`; the guard refuses → `refused`; dry run → `skipped` (after the guard, so a
//!   dry run also proves the script would pass it); else `started`, then the outcome;
//!   after a zero exit and `verify_after`, the check is *sampled afresh* (not its
//!   hysteresis) → `verified` / `not_verified`. Failed, timed out and not verified count
//!   as failures; the third in a row escalates.
//! - Every decision is one audit record, fsync'd before the next step. The run is counted
//!   in the persisted state before the script starts. If the audit log or the state file
//!   cannot be written, or the runner cannot start the script, that remediation is
//!   escalated ("stops automation for that remediation and says so") and nothing runs
//!   unaudited.
//! - Manual runs (`POST /remediations/NAME/run`) go through the same queue and every
//!   guardrail, and their caller waits for the final record.
//!
//! Locks: `std::sync::Mutex`es held for a few map operations or one audit append (an
//! fsync of one line), never across an `.await`.

pub mod audit;
pub mod guard;
pub mod state;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::checks::{CheckContext, Status};
use crate::config::{Config, RemediationConfig};
use crate::lifecycle::{self, Lifecycle};
use crate::runner::{Exit, Request, Runner};
use crate::state::Shared;
pub use audit::{Event, Record, Trigger};

/// Consecutive failures that escalate a remediation.
pub const ESCALATE_AFTER: u32 = 3;
/// The marker appended to output cut at the cap.
pub const CUT_MARKER: &str = "\n[vigil: output cut at 64 KiB]";

/// What a caller of [`Engine::run_manual`] gets back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManualError {
    /// No `[remediation.NAME]`.
    Unknown,
    /// The engine stopped before deciding.
    Stopped,
}

/// The automation block of `/health` and heartbeats, and the metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// Paused now.
    pub paused: bool,
    /// Why.
    pub reason: Option<String>,
    /// When a timed pause ends.
    pub until: Option<SystemTime>,
    /// Escalated remediation names.
    pub escalated: Vec<String>,
    /// `(remediation, event) → count` since the agent started.
    pub events: Vec<(String, &'static str, u64)>,
    /// Every configured remediation (for zero-valued gauges).
    pub names: Vec<String>,
}

struct Job {
    name: String,
    check: Option<String>,
    trigger: Trigger,
    run_id: String,
    /// The operator's reason (manual runs).
    reason: Option<String>,
    /// Requested by the caller (`--dry-run`).
    dry_run: bool,
    reply: Option<oneshot::Sender<Record>>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Names queued or running.
    busy: Vec<String>,
    /// When a tripped check may queue this remediation again.
    reconsider: HashMap<String, Instant>,
}

struct Inner {
    state_dir: PathBuf,
    host_id: String,
    me: u32,
    shared: Arc<Shared>,
    cx: CheckContext,
    runner: Runner,
    config: Mutex<Arc<Config>>,
    store: Mutex<state::Store>,
    audit: Mutex<audit::Audit>,
    queue: Mutex<Queue>,
    wake: Notify,
    counts: Mutex<HashMap<(String, &'static str), u64>>,
}

/// The remediation engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere mid-update; the data are plain values that
    // each update leaves whole, so carrying on is safer than stopping remediation state.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A new run id: 16 hex digits, time-ordered in its first half.
fn new_run_id() -> String {
    let secs = state::now_ms() / 1000;
    format!("{:08x}{:08x}", secs as u32, fastrand::u32(..))
}

/// The host id the scripts see: `[agent].host_id`, or the machine id for `"auto"`.
fn host_id(config: &Config) -> String {
    if config.agent.host_id != crate::heartbeat::document::HOST_ID_AUTO {
        return config.agent.host_id.clone();
    }
    std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn cut(bytes: &[u8], truncated: bool) -> String {
    let mut s = String::from_utf8_lossy(bytes).into_owned();
    if truncated {
        s.push_str(CUT_MARKER);
    }
    s
}

impl Engine {
    /// Opens the audit log and the persisted state in `config.agent.state_dir`.
    ///
    /// # Errors
    /// The audit log cannot be opened (the agent does not start without it).
    pub fn open(
        config: Arc<Config>,
        shared: Arc<Shared>,
        cx: CheckContext,
    ) -> std::io::Result<Engine> {
        let dir = config.agent.state_dir.clone();
        let audit = audit::Audit::open(&dir, config.heartbeat.is_some())?;
        let (store, problem) = state::Store::load(&dir);
        if let Some(why) = problem {
            error!(error = %why, "remediation state unusable: automation starts paused");
        }
        Ok(Engine {
            inner: Arc::new(Inner {
                state_dir: dir,
                host_id: host_id(&config),
                me: nix::unistd::geteuid().as_raw(),
                shared,
                cx,
                runner: Runner::in_process(),
                config: Mutex::new(config),
                store: Mutex::new(store),
                audit: Mutex::new(audit),
                queue: Mutex::new(Queue::default()),
                wake: Notify::new(),
                counts: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Starts the watcher and the worker; they stop at `cancel`.
    pub fn start(&self, tracker: &tokio_util::task::TaskTracker, cancel: CancellationToken) {
        tracker.spawn(self.clone().watch(cancel.clone()));
        tracker.spawn(self.clone().work(cancel));
    }

    /// A reload: remediations added, removed or changed take effect for the next decision.
    pub fn apply(&self, config: Arc<Config>) {
        lock(&self.inner.audit).set_delivery(config.heartbeat.is_some());
        *lock(&self.inner.config) = config;
    }

    fn config(&self) -> Arc<Config> {
        lock(&self.inner.config).clone()
    }

    // ----- the API the heartbeat and HTTP use (sync, cheap) -----

    /// The automation block of heartbeats (`paused`, `reason`, `until`, `escalated`).
    pub fn automation(&self) -> crate::heartbeat::document::Automation {
        let v = self.view();
        crate::heartbeat::document::Automation {
            paused: v.paused,
            reason: v.reason,
            until: v.until.map(lifecycle::rfc3339),
            escalated: v.escalated,
        }
    }

    /// The automation state and counters.
    pub fn view(&self) -> View {
        let store = lock(&self.inner.store);
        let pause = store.data.pause_at(state::now_ms()).cloned();
        let mut events: Vec<(String, &'static str, u64)> = lock(&self.inner.counts)
            .iter()
            .map(|((n, e), c)| (n.clone(), *e, *c))
            .collect();
        events.sort();
        View {
            paused: pause.is_some(),
            reason: pause.as_ref().map(|p| p.reason.clone()),
            until: pause.and_then(|p| p.until_ms).map(state::from_ms),
            escalated: store.data.escalated(),
            events,
            names: self.config().remediation.keys().cloned().collect(),
        }
    }

    /// Audit records not yet carried by a delivered or spooled heartbeat, oldest first, at
    /// most `max`, without output. Each has the contract's keys plus `n`, its number in
    /// the log: pass the last carried one's `n` to [`mark_delivered`](Self::mark_delivered).
    pub fn undelivered(&self, max: usize) -> Vec<Value> {
        lock(&self.inner.audit).undelivered(max)
    }

    /// Records up to number `n` (inclusive) were carried by a heartbeat that was delivered
    /// or spooled; persisted, so they are not carried again after a restart.
    pub fn mark_delivered(&self, n: u64) {
        if let Err(e) = lock(&self.inner.audit).mark_delivered(n) {
            warn!(error = %e, "audit delivery cursor not saved; records will be sent again");
        }
    }

    /// The audit records, newest first; `with_output` on the admin socket only.
    pub fn records(&self, limit: usize, with_output: bool) -> Vec<Value> {
        lock(&self.inner.audit).newest(limit, with_output)
    }

    /// Pauses automation (persisted).
    ///
    /// # Errors
    /// The state could not be saved.
    pub fn pause(&self, reason: &str, duration: Option<Duration>) -> std::io::Result<View> {
        {
            let mut store = lock(&self.inner.store);
            let now = state::now_ms();
            store.data.pause = Some(state::Pause {
                reason: reason.to_string(),
                since_ms: now,
                until_ms: duration
                    .map(|d| now.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))),
            });
            store.save()?;
        }
        warn!(reason, until = ?duration, "automation paused");
        Ok(self.view())
    }

    /// Resumes automation and clears every escalation and failure count (persisted).
    ///
    /// # Errors
    /// The state could not be saved.
    pub fn resume(&self, reason: &str) -> std::io::Result<View> {
        {
            let mut store = lock(&self.inner.store);
            store.data.pause = None;
            for r in store.data.remediations.values_mut() {
                r.escalated = None;
                r.failures = 0;
            }
            store.save()?;
        }
        // Tripped checks queue their remediation again at once.
        lock(&self.inner.queue).reconsider.clear();
        self.inner.wake.notify_one();
        info!(reason, "automation resumed; escalations cleared");
        Ok(self.view())
    }

    /// Queues a manual run and waits for its final record.
    ///
    /// # Errors
    /// [`ManualError::Unknown`] for a name with no `[remediation.NAME]`.
    pub async fn run_manual(
        &self,
        name: &str,
        reason: &str,
        dry_run: bool,
    ) -> Result<Record, ManualError> {
        let config = self.config();
        if !config.remediation.contains_key(name) {
            return Err(ManualError::Unknown);
        }
        let check = checks_of(&config, name).into_iter().next();
        let (tx, rx) = oneshot::channel();
        let job = Job {
            name: name.to_string(),
            check,
            trigger: Trigger::Manual,
            run_id: new_run_id(),
            reason: Some(reason.to_string()),
            dry_run,
            reply: Some(tx),
        };
        self.enqueue(job, true);
        rx.await.map_err(|_| ManualError::Stopped)
    }

    // ----- queue -----

    /// Queues `job` unless its remediation is queued or running (then merged, unless
    /// `force`: a manual run waits its turn behind the automatic one). Returns whether it
    /// was queued.
    fn enqueue(&self, job: Job, force: bool) -> bool {
        {
            let mut q = lock(&self.inner.queue);
            if !force && q.busy.contains(&job.name) {
                return false;
            }
            q.busy.push(job.name.clone());
        }
        let rec = self.record(&job, Event::Queued, job.reason.clone());
        if let Err(e) = self.append(&job.name, &rec) {
            // Not queued: nothing is decided without a record.
            self.halt(&job.name, &e);
            lock(&self.inner.queue).busy.retain(|n| n != &job.name);
            if let Some(tx) = job.reply {
                let _ = tx.send(rec);
            }
            return false;
        }
        lock(&self.inner.queue).jobs.push_back(job);
        self.inner.wake.notify_one();
        true
    }

    fn record(&self, job: &Job, event: Event, reason: Option<String>) -> Record {
        Record {
            run_id: job.run_id.clone(),
            at: lifecycle::rfc3339(SystemTime::now()),
            remediation: job.name.clone(),
            check: job.check.clone(),
            trigger: job.trigger,
            event,
            reason,
            exit_code: None,
            duration_ms: None,
            stdout: None,
            stderr: None,
            truncated: None,
        }
    }

    /// Appends durably and counts. An error means the decision must not take effect.
    fn append(&self, name: &str, rec: &Record) -> std::io::Result<()> {
        lock(&self.inner.audit).append(rec)?;
        *lock(&self.inner.counts)
            .entry((name.to_string(), rec.event.as_str()))
            .or_default() += 1;
        info!(remediation = name, run_id = %rec.run_id, event = rec.event.as_str(), reason = rec.reason.as_deref().unwrap_or(""), "remediation");
        Ok(())
    }

    /// The runner itself failed (audit, state, spawn): escalate that remediation so that
    /// nothing more runs until an operator looked, and say so loudly.
    fn halt(&self, name: &str, e: &dyn std::fmt::Display) {
        error!(remediation = name, error = %e, "remediation runner failure: automation stopped for this remediation until `vigil automation resume`");
        let mut store = lock(&self.inner.store);
        store.rem(name).escalated = Some(state::Escalation {
            at_ms: state::now_ms(),
            reason: format!("runner failure: {e}"),
        });
        if let Err(e) = store.save() {
            error!(error = %e, "remediation state not saved; the escalation holds until the agent restarts");
        }
    }

    // ----- watcher -----

    async fn watch(self, cancel: CancellationToken) {
        let mut rx = self.inner.shared.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut was_tripped: HashMap<String, bool> = HashMap::new();
        let mut timed = self.scan(&mut was_tripped);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
                // The clock matters only while a tripped check waits for its re-consider
                // time; otherwise a new snapshot is the only news, and an idle agent is
                // not woken every second for nothing.
                _ = tick.tick(), if timed => {}
            }
            timed = self.scan(&mut was_tripped);
        }
    }

    /// One look at the snapshot: queue remediations of checks that just tripped, or that
    /// stay tripped past their re-consider time. Returns whether a tripped check has a
    /// remediation (so a later look may find it due without a new snapshot).
    fn scan(&self, was_tripped: &mut HashMap<String, bool>) -> bool {
        let snap = self.inner.shared.load();
        let config = self.config();
        let now = Instant::now();
        let mut timed = false;
        for c in &snap.checks {
            let tripped = c.hysteresis.tripped;
            let before = match was_tripped.get_mut(&c.name) {
                Some(was) => std::mem::replace(was, tripped),
                None => {
                    was_tripped.insert(c.name.clone(), tripped);
                    false
                }
            };
            if !tripped {
                continue;
            }
            let Some(name) = remediation_of(&config, &c.name) else {
                continue;
            };
            timed = true;
            if !before {
                // The edge: queue at once, whatever the re-consider time.
            } else {
                let q = lock(&self.inner.queue);
                let due = q.reconsider.get(&name).is_none_or(|t| now >= *t);
                if !due || q.busy.contains(&name) {
                    continue;
                }
            }
            let job = Job {
                name,
                check: Some(c.name.clone()),
                trigger: Trigger::Check,
                run_id: new_run_id(),
                reason: Some(format!(
                    "check {} tripped at {}",
                    c.name, c.hysteresis.level
                )),
                dry_run: false,
                reply: None,
            };
            self.enqueue(job, false);
        }
        timed
    }

    // ----- worker -----

    async fn work(self, cancel: CancellationToken) {
        loop {
            let job = lock(&self.inner.queue).jobs.pop_front();
            let Some(job) = job else {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = self.inner.wake.notified() => continue,
                }
            };
            let name = job.name.clone();
            let next = tokio::select! {
                _ = cancel.cancelled() => return,
                n = self.decide(job) => n,
            };
            let mut q = lock(&self.inner.queue);
            if let Some(pos) = q.busy.iter().position(|n| *n == name) {
                q.busy.remove(pos);
            }
            if let Some(t) = next {
                q.reconsider.insert(name, t);
            }
        }
    }

    /// Decides and carries out one job. Returns when a tripped check may queue this
    /// remediation again (`None` for manual jobs, which do not move it).
    async fn decide(&self, mut job: Job) -> Option<Instant> {
        let reply = job.reply.take();
        let (last, next) = self.decide_inner(&job).await;
        if let Some(tx) = reply {
            // The caller may have gone away; the record is in the log either way.
            let _ = tx.send(last);
        }
        (job.trigger == Trigger::Check).then_some(next)
    }

    /// Emits one record, halting the remediation when it cannot be written; returns it
    /// and whether it is on disk (if not, nothing may follow from it).
    fn emit(&self, job: &Job, rec: Record) -> (Record, bool) {
        match self.append(&job.name, &rec) {
            Ok(()) => (rec, true),
            Err(e) => {
                self.halt(&job.name, &e);
                (rec, false)
            }
        }
    }

    async fn decide_inner(&self, job: &Job) -> (Record, Instant) {
        let config = self.config();
        let now = Instant::now();
        let check_interval = job
            .check
            .as_deref()
            .and_then(|c| config.check.iter().find(|(n, _)| *n == c))
            .map(|(_, s)| s.common(config.agent.interval).interval)
            .unwrap_or(config.agent.interval.get());
        let Some(spec) = config.remediation.get(&job.name).cloned() else {
            let rec = self.record(
                job,
                Event::Skipped,
                Some("removed: no such remediation in the config any more".into()),
            );
            let rec = self.emit(job, rec).0;
            return (rec, now + check_interval);
        };
        let cooldown = spec.cooldown.get();
        let after_skip = now + cooldown.max(check_interval);
        let skip = |reason: String, next: Instant| {
            let rec = self.record(job, Event::Skipped, Some(reason));
            (self.emit(job, rec).0, next)
        };
        if spec.enabled == Some(false) {
            return skip("disabled: enabled = false".into(), after_skip);
        }
        let wall = state::now_ms();
        {
            let mut store = lock(&self.inner.store);
            let pause = store.data.pause_at(wall).cloned();
            let lifecycle = self.inner.shared.load().lifecycle.state;
            let rem = store.rem(&job.name).clone();
            drop(store);
            if let Some(e) = &rem.escalated {
                return skip(format!("escalated: {}", e.reason), after_skip);
            }
            if let Some(p) = pause {
                return skip(format!("paused: {}", p.reason), after_skip);
            }
            if lifecycle != Lifecycle::Available {
                return skip(format!("lifecycle: the host is {lifecycle}"), after_skip);
            }
            if let Some(left) = rem.cooldown_left(cooldown, wall) {
                let next = now + left.max(check_interval);
                return skip(
                    format!(
                        "cooldown: {} left",
                        humantime::format_duration(round_s(left))
                    ),
                    next,
                );
            }
            let used = rem.runs_within(spec.per.get(), wall);
            if used >= spec.max_runs as usize {
                let frees = rem
                    .budget_frees_at(spec.per.get(), wall)
                    .map_or(Duration::ZERO, |t| {
                        Duration::from_millis(t.saturating_sub(wall))
                    });
                return skip(
                    format!(
                        "budget: {used} runs within {} (max_runs = {})",
                        spec.per, spec.max_runs
                    ),
                    now + frees.max(check_interval),
                );
            }
        }
        // The guard, also for a dry run: it proves the script would be allowed.
        let guard_started = Instant::now();
        let sealed = match guard::seal(
            &config.automation.dir,
            &spec.script,
            &spec.sha256,
            self.inner.me,
        ) {
            Ok(s) => s,
            Err(refusal) => {
                warn!(remediation = %job.name, reason = %refusal, "remediation refused by the guard");
                let rec = self.record(job, Event::Refused, Some(refusal.to_string()));
                return (self.emit(job, rec).0, after_skip);
            }
        };
        let guard_cost = guard_started.elapsed();
        if job.dry_run || config.automation.dry_run {
            let why = if job.dry_run {
                "--dry-run"
            } else {
                "[automation].dry_run"
            };
            return skip(
                format!(
                    "dry_run ({why}): would run {} (sha256 {}) as {}",
                    spec.script.display(),
                    sealed.sha256,
                    spec.run_as.as_deref().unwrap_or("the agent's user")
                ),
                after_skip,
            );
        }
        // Count the run before it starts: a crash from here on must not refund it.
        {
            let mut store = lock(&self.inner.store);
            let keep = spec.per.get().max(cooldown);
            let rem = store.rem(&job.name);
            rem.prune(keep, wall);
            rem.runs_ms.push(wall);
            if let Err(e) = store.save() {
                drop(store);
                self.halt(&job.name, &format!("saving the remediation state: {e}"));
                let rec = self.record(
                    job,
                    Event::Refused,
                    Some(format!("runner: saving the remediation state: {e}")),
                );
                return (self.emit(job, rec).0, after_skip);
            }
        }
        let started = self.record(
            job,
            Event::Started,
            Some(format!("guard passed in {} µs", guard_cost.as_micros())),
        );
        if let (rec, false) = self.emit(job, started) {
            return (rec, after_skip);
        }
        let req = self.request(job, &spec);
        let run_started = Instant::now();
        // With a privileged runner, a `run_as` this agent cannot become is run by it: it
        // seals the script again under its own guard and ignores our memfd.
        let runner = match &config.agent.runner_socket {
            Some(socket) => self.inner.runner.clone().via(crate::runner::Remote {
                socket: socket.clone(),
                op: crate::runner_service::Op::Remediation,
                name: job.name.clone(),
            }),
            None => self.inner.runner.clone(),
        };
        let outcome = runner.run_sealed(&req, &sealed.fd).await;
        drop(sealed);
        let next = now.max(Instant::now())
            + cooldown
                .saturating_sub(run_started.elapsed())
                .max(check_interval);
        let mut rec = match outcome {
            Ok(o) => {
                let (event, reason) = match o.exit {
                    Exit::Code(0) => (Event::Succeeded, None),
                    Exit::Code(c) => (Event::Failed, Some(format!("exit code {c}"))),
                    Exit::Signal(s) => (Event::Failed, Some(format!("killed by signal {s}"))),
                    Exit::TimedOut => (
                        Event::TimedOut,
                        Some(format!("timeout {}: process group killed", spec.timeout)),
                    ),
                };
                let mut rec = self.record(job, event, reason);
                rec.exit_code = match o.exit {
                    Exit::Code(c) => Some(c),
                    _ => None,
                };
                rec.duration_ms = Some(u64::try_from(o.duration.as_millis()).unwrap_or(u64::MAX));
                rec.stdout = Some(cut(&o.stdout, o.stdout_truncated));
                rec.stderr = Some(cut(&o.stderr, o.stderr_truncated));
                rec.truncated = Some(o.stdout_truncated || o.stderr_truncated);
                rec
            }
            Err(e) => {
                // The runner could not start it: a failure of ours, not of the script.
                self.halt(&job.name, &e);
                self.record(job, Event::Failed, Some(format!("runner: {e}")))
            }
        };
        let succeeded = rec.event == Event::Succeeded;
        rec = match self.emit(job, rec) {
            (r, true) => r,
            (r, false) => return (r, next),
        };
        let mut failed = !succeeded;
        if succeeded {
            if let Some(check) = &job.check {
                tokio::time::sleep(spec.verify_after.get()).await;
                let t = Instant::now();
                let (status, message) = self.sample(&config, check).await;
                let ok = status == Status::Ok;
                failed = !ok;
                let mut v = self.record(
                    job,
                    if ok {
                        Event::Verified
                    } else {
                        Event::NotVerified
                    },
                    Some(format!("fresh sample of {check}: {status}: {message}")),
                );
                v.duration_ms = Some(u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX));
                rec = match self.emit(job, v) {
                    (r, true) => r,
                    (r, false) => return (r, next),
                };
            }
        }
        let escalate = {
            let mut store = lock(&self.inner.store);
            let rem = store.rem(&job.name);
            rem.failures = if failed { rem.failures + 1 } else { 0 };
            let escalate = rem.failures >= ESCALATE_AFTER && rem.escalated.is_none();
            if escalate {
                rem.escalated = Some(state::Escalation {
                    at_ms: state::now_ms(),
                    reason: format!("{} consecutive failures", rem.failures),
                });
            }
            if let Err(e) = store.save() {
                error!(error = %e, "remediation state not saved");
            }
            escalate
        };
        if escalate {
            error!(remediation = %job.name, "remediation escalated: disabled until `vigil automation resume`");
            let e = self.record(
                job,
                Event::Escalated,
                Some(format!(
                    "{ESCALATE_AFTER} consecutive failures: disabled until `vigil automation resume`"
                )),
            );
            // The run's own outcome stays what the caller gets; the escalation is logged.
            let _ = self.emit(job, e);
        }
        (rec, next)
    }

    fn request(&self, job: &Job, spec: &RemediationConfig) -> Request {
        let snap = self.inner.shared.load();
        let view = job.check.as_deref().and_then(|c| snap.check(c));
        let mut argv = vec![spec.script.display().to_string()];
        argv.extend(spec.args.iter().cloned());
        let mut req = Request::new(argv, spec.timeout.get());
        req.run_as = spec.run_as.clone();
        req.env = vec![
            ("VIGIL_CHECK".into(), job.check.clone().unwrap_or_default()),
            (
                "VIGIL_STATUS".into(),
                view.map(|v| v.status.as_str().to_string())
                    .unwrap_or_default(),
            ),
            (
                "VIGIL_VALUE".into(),
                view.and_then(|v| v.value)
                    .map(|x| x.to_string())
                    .unwrap_or_default(),
            ),
            (
                "VIGIL_MESSAGE".into(),
                view.map(|v| v.message.clone()).unwrap_or_default(),
            ),
            ("VIGIL_HOST_ID".into(), self.inner.host_id.clone()),
            ("VIGIL_RUN_ID".into(), job.run_id.clone()),
            // A dry run never reaches the script (it records what would have run), so a
            // script only ever sees 0; the variable is there for scripts shared with
            // other tools and for a future "script-side dry run".
            ("VIGIL_DRY_RUN".into(), "0".into()),
        ];
        req
    }

    /// Runs `check` once, afresh, outside the scheduler (its hysteresis is not touched).
    async fn sample(&self, config: &Config, check: &str) -> (Status, String) {
        match crate::scheduler::run_once(config, &[check.to_string()], self.inner.cx.clone()).await
        {
            Ok(views) => views
                .first()
                .map(|v| (v.status, v.message.clone()))
                .unwrap_or((Status::Unknown, "no sample".into())),
            Err(e) => (Status::Unknown, e),
        }
    }

    /// The state directory (for `image prep`).
    pub fn state_dir(&self) -> &std::path::Path {
        &self.inner.state_dir
    }
}

fn round_s(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// The remediation a check names, if any.
fn remediation_of(config: &Config, check: &str) -> Option<String> {
    config
        .check
        .iter()
        .find(|(n, _)| *n == check)
        .and_then(|(_, s)| s.common(config.agent.interval).remediation)
}

/// Checks that name `remediation`, in config order.
fn checks_of(config: &Config, remediation: &str) -> Vec<String> {
    config
        .check
        .iter()
        .filter(|(_, s)| {
            s.common(config.agent.interval).remediation.as_deref() == Some(remediation)
        })
        .map(|(n, _)| n.to_string())
        .collect()
}
