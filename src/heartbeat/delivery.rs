//! The delivery loop: one task that turns snapshots into signed heartbeats and gets every
//! one of them to the control plane, in `seq` order, at least once.
//!
//! # When a heartbeat is made
//! - once the first round of checks is done (or one interval after start, whichever is
//!   first), so the first heartbeat describes measured checks;
//! - every `[heartbeat].interval` after the previous one;
//! - at once when the reported state, the lifecycle or the health changes (the task wakes on
//!   every publish of [`Shared`]; a change of anything else waits for the next interval);
//! - on SIGTERM, a last one.
//!
//! Making one takes the next `seq` ([`super::seq`]), serializes the document
//! ([`super::document`]) and keeps the body. The signature is made at each send (a fresh
//! `created`), so a body that waited in the spool for a day still verifies.
//!
//! # Where a heartbeat waits
//! A new heartbeat is sent directly when nothing older is waiting; the happy path writes
//! nothing to disk. When a send fails (connect, TLS, timeout, 5xx, 429, 401/403), the
//! heartbeat and every later one go to the spool ([`super::spool`]) until the spool is
//! drained. Invariant: every `seq` in the spool is below every `seq` held in memory, so
//! draining the spool first, then memory, is `seq` order. Memory holds the heartbeat just
//! made and, while the spool cannot be written (a full disk), those that could not be
//! spooled, bounded by [`MEMORY_MAX_BYTES`] (the oldest dropped and counted beyond it).
//!
//! # How answers are handled (the contract's table)
//! | answer | the heartbeat | then |
//! |---|---|---|
//! | 2xx | delivered, acknowledged | next one at once |
//! | 409 | already received: dropped | skip `seq` past the body's `last_seq` if it is ahead |
//! | 401, 403 | kept | back off; `rejected` in `/health`, metric, error log |
//! | 429, 5xx, 1xx, 3xx, connect/TLS/timeout | kept | back off |
//! | other 4xx | dropped, counted by reason | next one at once |
//!
//! Backoff is exponential (backon's builder: 1 s doubling, capped at `max_backoff`) with
//! full jitter (a uniform draw below the capped delay, floor [`MIN_RETRY`]) so that a fleet
//! coming back after an outage does not retry in lockstep. A delivery resets it.
//!
//! # Blocking work
//! Spool and sequence I/O (fsync) run on the blocking pool. The task moves the [`Spool`] /
//! [`SeqCounter`] into the blocking closure and gets it back, so there is no lock, and such
//! a step is never abandoned half-way by a `select!`: only network sends are raced against
//! shutdown.
//!
//! # What survives what
//! A crash or `kill -9` loses at most the heartbeats only in memory (never sent, never
//! spooled); their `seq` values are never reused (the counter skips past its reservation).
//! A missing key, an unreadable identity file or an unopenable spool stops heartbeats, not
//! the agent: the problem is in `/health` and the log, and setup is retried every interval.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::BackoffBuilder;
use indexmap::IndexMap;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::client::{CONTENT_TYPE, HeartbeatClient, Response, SendError};
use super::document::{Heartbeat, HostIdentity};
use super::keys::{self, HeartbeatKey};
use super::seq::SeqCounter;
use super::sign;
use super::spool::{Spool, SpoolError, SpoolStats};
use crate::config::{Config, HeartbeatConfig};
use crate::lifecycle::{HostState, Lifecycle};
use crate::remediation::Engine;
use crate::state::{Shared, Snapshot};

/// Most bytes of heartbeats held in memory while the spool cannot take them.
pub const MEMORY_MAX_BYTES: usize = 1 << 20;
/// The shortest wait before a retry, whatever the jitter draws.
pub const MIN_RETRY: Duration = Duration::from_millis(100);
/// The longest SIGTERM waits for the last heartbeat (and the spool ahead of it).
pub const SHUTDOWN_BUDGET: Duration = Duration::from_secs(5);
/// Spooled heartbeats read per batch while draining.
const DRAIN_BATCH: usize = 32;
/// Delivered spooled heartbeats acknowledged together: one `ack` file write (an fsync and
/// a rename) per this many, so a crash mid-drain sends at most this many again (the
/// receiver answers 409), and a long drain does not pay an fsync per record.
const ACK_EVERY: usize = 8;
/// How much of an error answer's body goes into a log line or `/health`.
const ANSWER_EXCERPT: usize = 200;

/// What `/health` and `/metrics` show of heartbeat delivery; one per agent, kept across
/// reloads so counters only grow.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusView {
    /// `[heartbeat]` is configured.
    pub enabled: bool,
    /// When the control plane last accepted a heartbeat.
    pub last_success: Option<SystemTime>,
    /// Records in the spool (not counting the few held in memory).
    pub spooled: u64,
    /// Bytes of spool segment files.
    pub spool_bytes: u64,
    /// Heartbeats held in memory while delivery is failing (the spool could not take
    /// them, or they wait for the spool write that follows a failed send).
    pub pending: u64,
    /// The control plane answered 401/403 to the last attempt.
    pub rejected: bool,
    /// The current problem, if any (setup, spool, then send, in that order).
    pub error: Option<String>,
    /// The last `seq` made.
    pub seq: Option<u64>,
    /// Heartbeats accepted (2xx).
    pub sent_total: u64,
    /// Heartbeats answered 409 (already received).
    pub duplicate_total: u64,
    /// Failed sends by reason.
    pub failures: BTreeMap<&'static str, u64>,
    /// Heartbeats given up by reason.
    pub dropped: BTreeMap<&'static str, u64>,
}

/// Reasons a send fails, as the `reason` label of `vigil_heartbeat_send_failures_total`.
pub const FAILURE_REASONS: [&str; 7] = [
    "connect",
    "tls",
    "timeout",
    "http",
    "server_error",
    "throttled",
    "rejected",
];
/// Reasons a heartbeat is given up, as the `reason` label of
/// `vigil_heartbeats_dropped_total`.
pub const DROP_REASONS: [&str; 6] = [
    "spool_full",
    "client_error",
    "too_large",
    "corrupt",
    "unspoolable",
    "unsignable",
];

#[derive(Debug, Default)]
struct Problems {
    setup: Option<String>,
    spool: Option<String>,
    send: Option<String>,
}

/// The shared delivery status: written by the loop, read by the API.
#[derive(Debug, Default)]
pub struct Status {
    inner: Mutex<(StatusView, Problems)>,
}

impl Status {
    /// A status for an agent with (`enabled`) or without `[heartbeat]`.
    pub fn new(enabled: bool) -> Status {
        let s = Status::default();
        s.update(|v| v.enabled = enabled);
        s
    }

    /// Marks whether `[heartbeat]` is configured (after a reload).
    pub fn set_enabled(&self, enabled: bool) {
        self.update(|v| {
            v.enabled = enabled;
            if !enabled {
                v.error = None;
            }
        });
        if !enabled {
            self.problem(|p| *p = Problems::default());
        }
    }

    /// A copy of the current view.
    pub fn view(&self) -> StatusView {
        self.lock().0.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (StatusView, Problems)> {
        // A poisoned lock means a writer panicked between two plain field writes; the
        // view is still a valid value, so keep serving it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut StatusView)) {
        f(&mut self.lock().0);
    }

    fn problem(&self, f: impl FnOnce(&mut Problems)) {
        let mut g = self.lock();
        let (view, problems) = &mut *g;
        f(problems);
        view.error = problems
            .setup
            .clone()
            .or_else(|| problems.spool.clone())
            .or_else(|| problems.send.clone());
    }

    fn count_failure(&self, reason: &'static str) {
        self.update(|v| *v.failures.entry(reason).or_default() += 1);
    }

    fn count_dropped(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.update(|v| *v.dropped.entry(reason).or_default() += n);
        }
    }
}

/// Why the loop is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Run,
    /// A reload replaces the task: keep everything, send nothing more.
    Replace,
    /// SIGTERM: a last heartbeat within [`SHUTDOWN_BUDGET`].
    Shutdown,
}

/// The running delivery task.
#[derive(Debug)]
pub struct Handle {
    stop: watch::Sender<Stop>,
    task: JoinHandle<()>,
    config: HeartbeatConfig,
    host_id: String,
    labels: IndexMap<String, String>,
}

impl Handle {
    /// Starts delivery for `config` (which has `[heartbeat]`), reporting into `status`.
    /// `remediation`, when given, supplies the `automation` block and the audit records
    /// each heartbeat carries.
    pub fn start(
        config: &Config,
        shared: Arc<Shared>,
        status: Arc<Status>,
        remediation: Option<Engine>,
    ) -> Option<Handle> {
        let hb = config.heartbeat.clone()?;
        let (stop, stop_rx) = watch::channel(Stop::Run);
        let mut delivery = Delivery::new(config, hb.clone(), shared, status);
        delivery.remediation = remediation;
        let task = tokio::spawn(delivery.run(stop_rx));
        Some(Handle {
            stop,
            task,
            config: hb,
            host_id: config.agent.host_id.clone(),
            labels: config.agent.labels.clone(),
        })
    }

    /// Whether `config` asks for different heartbeats than this task sends.
    pub fn differs(&self, config: &Config) -> bool {
        config.heartbeat.as_ref() != Some(&self.config)
            || config.agent.host_id != self.host_id
            || config.agent.labels != self.labels
    }

    /// Stops the task: with `last_heartbeat`, after one last heartbeat (SIGTERM); else at
    /// once (a reload). Either way the spool is consistent when this returns.
    pub async fn stop(self, last_heartbeat: bool) {
        let _ = self.stop.send(if last_heartbeat {
            Stop::Shutdown
        } else {
            Stop::Replace
        });
        if let Err(e) = self.task.await {
            error!(error = %e, "the heartbeat task ended abnormally");
        }
    }
}

/// What became of one send.
enum Verdict {
    /// Accepted, or already received, or given up: acknowledge it and go on.
    Done,
    /// Keep it and back off.
    Retry,
    /// Shutdown interrupted the send: keep it, stop sending.
    Interrupted,
}

/// The reported state, lifecycle and health: a change of any sends a heartbeat at once.
type StateKey = (HostState, Lifecycle, HostState);

fn state_key(snap: &Snapshot) -> StateKey {
    (snap.state(), snap.lifecycle.state, snap.health())
}

struct Delivery {
    config: HeartbeatConfig,
    host_id_setting: String,
    labels: IndexMap<String, String>,
    state_dir: PathBuf,
    shared: Arc<Shared>,
    status: Arc<Status>,

    client: Option<HeartbeatClient>,
    key: Option<HeartbeatKey>,
    identity: Option<HostIdentity>,
    seq: Option<SeqCounter>,
    spool: Option<Spool>,
    /// Spool counters already added to the status (they restart at each open).
    spool_counted: (u64, u64),
    /// Heartbeats not in the spool, oldest first; all newer than every spooled one.
    memory: VecDeque<(u64, Vec<u8>)>,
    memory_bytes: usize,

    backoff: backon::ExponentialBackoff,
    retry_at: Option<Instant>,
    last_key: Option<StateKey>,
    /// When setup last tried to load a missing piece.
    setup_tried: Option<Instant>,
    /// Where the `automation` block and audit records come from.
    remediation: Option<Engine>,
    /// For each heartbeat made but not yet delivered or spooled: the number (`n`) of the
    /// last audit record it carries. Once that heartbeat is safe (delivered, or durable in
    /// the spool), the audit log may stop offering those records.
    carried_audit: BTreeMap<u64, u64>,
    /// When the next heartbeat is due by the timer.
    next_due: Instant,
    /// Whether the first heartbeat has been made.
    first_done: bool,
}

impl Delivery {
    fn new(
        config: &Config,
        hb: HeartbeatConfig,
        shared: Arc<Shared>,
        status: Arc<Status>,
    ) -> Delivery {
        let backoff = backoff(&hb);
        Delivery {
            host_id_setting: config.agent.host_id.clone(),
            labels: config.agent.labels.clone(),
            state_dir: config.agent.state_dir.clone(),
            config: hb,
            shared,
            status,
            client: None,
            key: None,
            identity: None,
            seq: None,
            spool: None,
            spool_counted: (0, 0),
            memory: VecDeque::new(),
            memory_bytes: 0,
            backoff,
            retry_at: None,
            last_key: None,
            setup_tried: None,
            remediation: None,
            carried_audit: BTreeMap::new(),
            next_due: Instant::now(),
            first_done: false,
        }
    }

    async fn run(mut self, mut stop: watch::Receiver<Stop>) {
        let mut changes = self.shared.subscribe();
        let interval = self.config.interval.get();
        self.next_due = Instant::now() + interval;
        self.setup().await;
        loop {
            if *stop.borrow() != Stop::Run {
                break;
            }
            let snap = self.shared.load();
            let due = Instant::now() >= self.next_due
                || (!self.first_done && snap.first_round_done)
                || (self.first_done && self.last_key.is_some_and(|k| k != state_key(&snap)));
            if due {
                self.next_due = Instant::now() + interval;
                if self.setup().await && self.produce(&snap).await {
                    self.first_done = true;
                }
            }
            if self.retry_at.is_none_or(|t| Instant::now() >= t) {
                self.deliver(None, &stop, self.next_due).await;
            } else {
                // Backing off: what was just made must be durable before waiting.
                self.spool_memory().await;
            }
            self.publish_spool_stats();

            let wake = match self.retry_at {
                Some(t) if self.has_work() => t.min(self.next_due),
                _ => self.next_due,
            };
            tokio::select! {
                r = stop.changed() => {
                    if r.is_err() {
                        // The handle is gone without asking: stop without a last heartbeat.
                        break;
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
                r = changes.changed() => {
                    if r.is_err() {
                        // The publisher is gone (the agent is stopping): fall back to the timer.
                        tokio::time::sleep_until(wake).await;
                    }
                }
            }
        }

        if *stop.borrow() == Stop::Shutdown {
            self.last_heartbeat(&stop).await;
        }
        self.spool_memory().await;
        self.publish_spool_stats();
        if !self.memory.is_empty() {
            error!(
                heartbeats = self.memory.len(),
                "heartbeats that could not be sent or spooled are lost at shutdown"
            );
            self.status
                .count_dropped("unspoolable", self.memory.len() as u64);
        }
    }

    /// The last heartbeat of SIGTERM: made from the final snapshot and sent within
    /// [`SHUTDOWN_BUDGET`] (the spool ahead of it first); spooled when that is not possible.
    async fn last_heartbeat(&mut self, stop: &watch::Receiver<Stop>) {
        if !self.setup().await {
            return;
        }
        let snap = self.shared.load();
        if !self.produce(&snap).await {
            return;
        }
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            info!("the control plane is failing; the last heartbeat is spooled");
            return;
        }
        let budget = SHUTDOWN_BUDGET.min(self.config.timeout.get());
        let deadline = Instant::now() + budget;
        self.deliver(Some(deadline), stop, deadline).await;
        if self.memory.is_empty() && self.spool_records() == 0 {
            info!("last heartbeat delivered");
        } else {
            warn!("the last heartbeat was not delivered in time; it is spooled");
        }
    }

    fn has_work(&self) -> bool {
        !self.memory.is_empty() || self.spool_records() > 0
    }

    fn spool_records(&self) -> u64 {
        self.spool.as_ref().map_or(0, Spool::records)
    }

    /// Loads whatever is missing (client, key, identity, counter, spool). True when a
    /// heartbeat can be made. Each problem is logged when it first appears.
    async fn setup(&mut self) -> bool {
        let ready = self.client.is_some()
            && self.key.is_some()
            && self.identity.is_some()
            && self.seq.is_some();
        if ready && self.spool.is_some() {
            return true;
        }
        // A missing piece is retried once an interval, not on every wake-up.
        let now = Instant::now();
        if self
            .setup_tried
            .is_some_and(|t| now < t + self.config.interval.get())
        {
            return ready;
        }
        self.setup_tried = Some(now);
        let mut problem: Option<String> = None;
        if self.client.is_none() {
            match HeartbeatClient::new(&self.config) {
                Ok(c) => self.client = Some(c),
                Err(e) => problem = Some(e.to_string()),
            }
        }
        if self.key.is_none() && problem.is_none() {
            let path = self.config.key_file.clone();
            match blocking(move || keys::load(&path)).await {
                Some(Ok(k)) => {
                    info!(key_file = %self.config.key_file.display(), key_id = %k.info().key_id, "heartbeat key loaded");
                    self.key = Some(k);
                }
                Some(Err(e)) => problem = Some(format!("{e} (heartbeats are not sent)")),
                None => problem = Some("loading the heartbeat key failed".into()),
            }
        }
        if self.identity.is_none() && problem.is_none() {
            let setting = self.host_id_setting.clone();
            let read = blocking(move || {
                HostIdentity::read(
                    &setting,
                    std::path::Path::new("/etc"),
                    std::path::Path::new("/proc"),
                )
            });
            match read.await {
                Some(Ok(id)) => self.identity = Some(id),
                Some(Err(e)) => problem = Some(format!("host identity: {e}")),
                None => problem = Some("reading the host identity failed".into()),
            }
        }
        if self.seq.is_none() && problem.is_none() {
            let dir = self.state_dir.clone();
            match blocking(move || SeqCounter::open(&dir)).await {
                Some(Ok(c)) => self.seq = Some(c),
                Some(Err(e)) => problem = Some(format!("heartbeat sequence: {e}")),
                None => problem = Some("opening the heartbeat sequence failed".into()),
            }
        }
        if self.spool.is_none() && problem.is_none() {
            // Without a spool heartbeats still go out; failures wait in memory.
            let dir = self.state_dir.join("spool");
            let max = self.config.spool_max.0;
            match blocking(move || Spool::open(&dir, max)).await {
                Some(Ok(s)) => {
                    if s.records() > 0 {
                        info!(
                            records = s.records(),
                            bytes = s.bytes(),
                            "spooled heartbeats found; delivering them first"
                        );
                    }
                    self.spool_counted = (0, 0);
                    self.spool = Some(s);
                    self.status.problem(|p| p.spool = None);
                    self.publish_spool_stats();
                }
                Some(Err(e)) => self.spool_problem(format!("heartbeat spool: {e}")),
                None => self.spool_problem("opening the heartbeat spool failed".into()),
            }
        }
        let changed = {
            let view = self.status.lock();
            view.1.setup != problem
        };
        if changed {
            match &problem {
                Some(p) => error!(problem = %p, "heartbeats cannot be made"),
                None => info!(url = %self.config.url, "heartbeats ready"),
            }
            self.status.problem(|p| p.setup = problem.clone());
        }
        problem.is_none()
    }

    fn spool_problem(&self, msg: String) {
        let changed = self.status.lock().1.spool.as_deref() != Some(msg.as_str());
        if changed {
            error!(problem = %msg, "heartbeats cannot be spooled; undelivered ones are kept in memory");
        }
        self.status.problem(|p| p.spool = Some(msg));
    }

    /// Makes one heartbeat from `snap` into memory. False when no `seq` could be reserved.
    async fn produce(&mut self, snap: &Arc<Snapshot>) -> bool {
        let (Some(identity), Some(mut counter)) = (self.identity.as_ref(), self.seq.take()) else {
            return false;
        };
        let Some((counter, next)) = blocking(move || {
            let r = counter.next();
            (counter, r)
        })
        .await
        else {
            return false; // reopened at the next setup, past its reservation
        };
        self.seq = Some(counter);
        let seq = match next {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("heartbeat sequence: {e}");
                error!(problem = %msg, "no heartbeat made");
                self.status.problem(|p| p.send = Some(msg));
                return false;
            }
        };
        let (automation, records) = match &self.remediation {
            Some(engine) => (
                engine.automation(),
                engine.undelivered(super::document::MAX_REMEDIATIONS),
            ),
            None => (Default::default(), Vec::new()),
        };
        let doc = Heartbeat::new(identity, &self.labels, snap, seq, SystemTime::now())
            .with_automation(automation)
            .with_remediations(&records);
        let carried = doc.remediations_carried();
        let body = doc.to_body();
        if let Some(n) = carried
            .checked_sub(1)
            .and_then(|i| records.get(i))
            .and_then(|r| r.get("n"))
            .and_then(serde_json::Value::as_u64)
        {
            self.carried_audit.insert(seq, n);
        }
        self.last_key = Some(state_key(snap));
        self.status.update(|v| v.seq = Some(seq));
        self.memory_bytes += body.len();
        self.memory.push_back((seq, body));
        self.trim_memory();
        true
    }

    /// Heartbeats up to `up_to_seq` are delivered or spooled: tell the audit log that the
    /// records they carry need not be offered again (at least once: a crash before this
    /// only makes the next heartbeat carry them again, and `n` identifies duplicates).
    async fn audit_safe(&mut self, up_to_seq: u64) {
        let rest = self.carried_audit.split_off(&up_to_seq.saturating_add(1));
        let done = std::mem::replace(&mut self.carried_audit, rest);
        let (Some(n), Some(engine)) = (done.values().max().copied(), self.remediation.clone())
        else {
            return;
        };
        // It writes the cursor with an fsync: keep that off the async workers.
        blocking(move || engine.mark_delivered(n)).await;
    }

    /// Drops the oldest heartbeats held in memory beyond [`MEMORY_MAX_BYTES`].
    fn trim_memory(&mut self) {
        let cap =
            MEMORY_MAX_BYTES.min(usize::try_from(self.config.spool_max.0).unwrap_or(usize::MAX));
        let mut dropped = 0;
        while self.memory_bytes > cap && self.memory.len() > 1 {
            if let Some((_, body)) = self.memory.pop_front() {
                self.memory_bytes -= body.len();
                dropped += 1;
            }
        }
        if dropped > 0 {
            error!(
                dropped,
                "heartbeats dropped: the spool cannot take them and memory is full"
            );
            self.status.count_dropped("unspoolable", dropped);
        }
        let waiting = self.waiting();
        self.status.update(|v| v.pending = waiting);
    }

    /// Heartbeats in memory that wait because delivery is failing (the one being sent
    /// right now on the happy path is not waiting).
    fn waiting(&self) -> u64 {
        if self.retry_at.is_some() {
            self.memory.len() as u64
        } else {
            0
        }
    }

    /// Moves memory into the spool, oldest first, stopping at the first failure (what is
    /// left stays in memory, still newer than everything spooled).
    async fn spool_memory(&mut self) {
        if self.memory.is_empty() {
            return;
        }
        let Some(spool) = self.spool.take() else {
            return;
        };
        let batch: Vec<(u64, Vec<u8>)> = self.memory.drain(..).collect();
        self.memory_bytes = 0;
        let res = blocking(move || {
            let mut spool = spool;
            let mut left = Vec::new();
            let mut failure: Option<SpoolError> = None;
            let mut too_large = 0;
            let mut out_of_order = 0;
            for (seq, body) in batch {
                if failure.is_some() {
                    left.push((seq, body));
                    continue;
                }
                let appended = spool.append(seq, &body);
                if !matches!(
                    appended,
                    Err(SpoolError::TooLarge { .. } | SpoolError::SeqNotIncreasing { .. })
                ) {
                    // Only the outcomes that touched the disk (`/health`'s state writes).
                    crate::durable::note("spool", &appended);
                }
                match appended {
                    Ok(()) => {}
                    Err(SpoolError::TooLarge { .. }) => too_large += 1,
                    Err(e @ SpoolError::SeqNotIncreasing { .. }) => {
                        // Cannot come from this loop (the invariant above); keeping the
                        // record would block the queue, so it is given up loudly.
                        error!(error = %e, "heartbeat not spooled");
                        out_of_order += 1;
                    }
                    Err(e) => {
                        failure = Some(e);
                        left.push((seq, body));
                    }
                }
            }
            (spool, left, failure, too_large, out_of_order)
        })
        .await;
        let Some((spool, left, failure, too_large, out_of_order)) = res else {
            // The spool is reopened (and recovered) at the next setup.
            self.spool_problem("the heartbeat spool task failed".into());
            return;
        };
        self.spool = Some(spool);
        if too_large > 0 {
            error!(
                heartbeats = too_large,
                "heartbeat larger than spool_max dropped"
            );
            self.status.count_dropped("too_large", too_large);
        }
        self.status.count_dropped("unspoolable", out_of_order);
        for (seq, body) in left {
            self.memory_bytes += body.len();
            self.memory.push_back((seq, body));
        }
        // Everything older than what is still in memory is in the spool now (or was given
        // up): the audit records it carries are safe.
        let safe_below = self.memory.front().map_or(u64::MAX, |(seq, _)| *seq);
        self.audit_safe(safe_below.saturating_sub(1)).await;
        match failure {
            Some(e) => {
                let hint = if e.is_disk_full() {
                    " (no space left on the spool's file system)"
                } else {
                    ""
                };
                self.spool_problem(format!("heartbeat spool: {e}{hint}"));
            }
            None => self.status.problem(|p| p.spool = None),
        }
        self.trim_memory();
        self.publish_spool_stats();
    }

    /// Sends what is waiting, spool first, until everything is out, a send fails (then
    /// backs off), a heartbeat falls due at `yield_at`, or the loop is asked to stop.
    /// `deadline` bounds each send (the SIGTERM budget).
    async fn deliver(
        &mut self,
        deadline: Option<Instant>,
        stop: &watch::Receiver<Stop>,
        yield_at: Instant,
    ) {
        let shutting_down = deadline.is_some();
        loop {
            if !shutting_down && (*stop.borrow() != Stop::Run || Instant::now() >= yield_at) {
                // Keep what was made durable before going back to the loop.
                if self.retry_at.is_some() || *stop.borrow() != Stop::Run {
                    self.spool_memory().await;
                }
                return;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return;
            }
            if self.spool_records() > 0 {
                match self.drain_batch(deadline, stop).await {
                    Some(true) => continue,
                    Some(false) => {
                        self.spool_memory().await;
                        return;
                    }
                    None => return,
                }
            }
            let Some((seq, body)) = self.memory.pop_front() else {
                return;
            };
            self.memory_bytes -= body.len();
            match self.send_one(seq, &body, deadline, stop).await {
                Verdict::Done => {
                    let waiting = self.waiting();
                    self.status.update(|v| v.pending = waiting);
                    self.audit_safe(seq).await;
                }
                Verdict::Retry | Verdict::Interrupted => {
                    self.memory_bytes += body.len();
                    self.memory.push_front((seq, body));
                    self.spool_memory().await;
                    return;
                }
            }
        }
    }

    /// Sends one batch of the oldest spooled heartbeats. `Some(true)`: all done;
    /// `Some(false)`: one must be retried (backoff set); `None`: the spool is unusable.
    async fn drain_batch(
        &mut self,
        deadline: Option<Instant>,
        stop: &watch::Receiver<Stop>,
    ) -> Option<bool> {
        let spool = self.spool.take()?;
        let read = blocking(move || {
            let mut spool = spool;
            let r = spool.peek_oldest(DRAIN_BATCH);
            (spool, r)
        })
        .await;
        let Some((spool, batch)) = read else {
            self.spool_problem("the heartbeat spool task failed".into());
            return None;
        };
        self.spool = Some(spool);
        self.publish_spool_stats();
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                self.spool_problem(format!("heartbeat spool: {e}"));
                self.schedule_retry();
                return Some(false);
            }
        };
        if batch.is_empty() {
            // Every record left failed its checksum and was skipped (counted above).
            return Some(true);
        }
        let mut done_up_to = None;
        let mut unacked = 0;
        let mut all_done = true;
        for (seq, body) in &batch {
            match self.send_one(*seq, body, deadline, stop).await {
                Verdict::Done => {
                    done_up_to = Some(*seq);
                    unacked += 1;
                    if unacked == ACK_EVERY {
                        self.ack(*seq).await;
                        unacked = 0;
                    }
                }
                Verdict::Retry | Verdict::Interrupted => {
                    all_done = false;
                    break;
                }
            }
            if *stop.borrow() != Stop::Run && deadline.is_none() {
                all_done = false;
                break;
            }
        }
        if let Some(up_to) = done_up_to.filter(|_| unacked > 0) {
            self.ack(up_to).await;
        }
        Some(all_done && self.spool.is_some())
    }

    async fn ack(&mut self, up_to: u64) {
        let Some(spool) = self.spool.take() else {
            return;
        };
        let res = blocking(move || {
            let mut spool = spool;
            let r = spool.ack(up_to);
            (spool, r)
        })
        .await;
        match res {
            Some((spool, r)) => {
                self.spool = Some(spool);
                if let Err(e) = r {
                    // The acknowledgement holds in memory; after a crash at worst these are
                    // sent again and answered 409.
                    warn!(error = %e, "recording delivered heartbeats in the spool failed");
                }
            }
            None => self.spool_problem("the heartbeat spool task failed".into()),
        }
        self.publish_spool_stats();
    }

    /// Signs and sends one heartbeat and applies the contract's answer table.
    async fn send_one(
        &mut self,
        seq: u64,
        body: &[u8],
        deadline: Option<Instant>,
        stop: &watch::Receiver<Stop>,
    ) -> Verdict {
        let (Some(client), Some(key)) = (self.client.clone(), self.key.as_ref()) else {
            self.schedule_retry();
            return Verdict::Retry;
        };
        let created = unix_now();
        let headers = match sign::sign(
            key,
            "POST",
            client.target_uri(),
            CONTENT_TYPE,
            body,
            created,
        ) {
            Ok(h) => h,
            Err(e) => {
                error!(seq, error = %e, "heartbeat cannot be signed; dropped");
                self.status.count_dropped("unsignable", 1);
                return Verdict::Done;
            }
        };
        let mut stop = stop.clone();
        let send = client.post(body, &headers);
        let result = match deadline {
            Some(d) => {
                let limit = d.saturating_duration_since(Instant::now());
                tokio::time::timeout_at(d, send).await.unwrap_or_else(|_| {
                    Err(SendError::Timeout {
                        target: client.target_uri().to_string(),
                        limit,
                    })
                })
            }
            None => {
                let stopping = async move {
                    // The guard `wait_for` returns is not `Send`: drop it at once.
                    let _ = stop.wait_for(|s| *s != Stop::Run).await.is_ok();
                };
                tokio::pin!(send, stopping);
                loop {
                    let due = self.next_due;
                    tokio::select! {
                        r = &mut send => break r,
                        () = &mut stopping => return Verdict::Interrupted,
                        // A send that hangs until its timeout (a silent receiver, a
                        // partition) must not stop heartbeats being made every interval:
                        // they wait in memory behind the one in flight, in `seq` order.
                        _ = tokio::time::sleep_until(due), if self.first_done => {
                            self.next_due = Instant::now() + self.config.interval.get();
                            let snap = self.shared.load();
                            self.produce(&snap).await;
                        }
                    }
                }
            }
        };
        match result {
            Ok(resp) => self.answer(seq, resp).await,
            Err(e) => {
                let reason = match e {
                    SendError::Connect { .. } => "connect",
                    SendError::Tls { .. } => "tls",
                    SendError::Timeout { .. } => "timeout",
                    SendError::Http { .. } => "http",
                };
                self.failed(seq, reason, e.to_string());
                Verdict::Retry
            }
        }
    }

    async fn answer(&mut self, seq: u64, resp: Response) -> Verdict {
        let code = resp.status;
        match code {
            200..=299 => {
                if self.retry_at.is_some() {
                    info!(seq, "the control plane accepts heartbeats again");
                }
                self.retry_at = None;
                self.backoff = backoff(&self.config);
                self.status.update(|v| {
                    v.sent_total += 1;
                    v.last_success = Some(SystemTime::now());
                    v.rejected = false;
                });
                self.status.problem(|p| p.send = None);
                Verdict::Done
            }
            409 => {
                self.status.update(|v| v.duplicate_total += 1);
                let last_seq = serde_json::from_slice::<serde_json::Value>(&resp.body)
                    .ok()
                    .and_then(|v| v.get("last_seq").and_then(serde_json::Value::as_u64));
                if let (Some(last), Some(counter)) = (last_seq, self.seq.take()) {
                    let res = blocking(move || {
                        let mut counter = counter;
                        let r = counter.skip_past(last);
                        (counter, r)
                    })
                    .await;
                    if let Some((counter, r)) = res {
                        match r {
                            Ok(true) => error!(
                                seq,
                                last_seq = last,
                                "the control plane has seen a higher seq than this host made; skipping past it (was the state directory reset?)"
                            ),
                            Ok(false) => {}
                            Err(e) => error!(error = %e, "cannot skip the sequence forward"),
                        }
                        self.seq = Some(counter);
                    }
                }
                Verdict::Done
            }
            401 | 403 => {
                let text = excerpt(&resp.body);
                error!(
                    seq,
                    status = code,
                    answer = %text,
                    "the control plane REJECTS this host's heartbeats; they are kept and retried (is this host enrolled with this key?)"
                );
                self.status.update(|v| v.rejected = true);
                self.count_and_back_off(
                    "rejected",
                    format!("the control plane rejects this host: HTTP {code} {text}"),
                );
                Verdict::Retry
            }
            429 => {
                self.failed(seq, "throttled", "the control plane answered 429".into());
                Verdict::Retry
            }
            400..=499 => {
                let text = excerpt(&resp.body);
                error!(seq, status = code, answer = %text, "the control plane refused this heartbeat; dropped");
                self.status.count_dropped("client_error", 1);
                Verdict::Done
            }
            _ => {
                let reason = if code >= 500 { "server_error" } else { "http" };
                let text = excerpt(&resp.body);
                self.failed(
                    seq,
                    reason,
                    format!("the control plane answered HTTP {code} {text}"),
                );
                Verdict::Retry
            }
        }
    }

    fn failed(&mut self, seq: u64, reason: &'static str, msg: String) {
        warn!(seq, reason, error = %msg, "heartbeat not delivered; it waits in the spool");
        self.count_and_back_off(reason, msg);
    }

    fn count_and_back_off(&mut self, reason: &'static str, msg: String) {
        self.status.count_failure(reason);
        self.status.problem(|p| p.send = Some(msg));
        self.schedule_retry();
    }

    fn schedule_retry(&mut self) {
        let cap = self.config.max_backoff.get();
        let envelope = self.backoff.next().unwrap_or(cap).min(cap);
        // Full jitter: anywhere below the envelope, so a fleet spreads out.
        let delay = envelope.mul_f64(fastrand::f64()).max(MIN_RETRY.min(cap));
        self.retry_at = Some(Instant::now() + delay);
    }

    /// Copies spool size and counters into the status.
    fn publish_spool_stats(&mut self) {
        let Some(stats) = self.spool.as_ref().map(Spool::stats) else {
            return;
        };
        let SpoolStats {
            records,
            bytes,
            dropped_total,
            corrupt_skipped_total,
        } = stats;
        let (dropped_seen, corrupt_seen) = self.spool_counted;
        self.status
            .count_dropped("spool_full", dropped_total.saturating_sub(dropped_seen));
        self.status.count_dropped(
            "corrupt",
            corrupt_skipped_total.saturating_sub(corrupt_seen),
        );
        self.spool_counted = (dropped_total, corrupt_skipped_total);
        let pending = self.waiting();
        self.status.update(|v| {
            v.spooled = records;
            v.spool_bytes = bytes;
            v.pending = pending;
        });
    }
}

fn backoff(config: &HeartbeatConfig) -> backon::ExponentialBackoff {
    let cap = config.max_backoff.get();
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1).min(cap))
        .with_max_delay(cap)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

/// Runs `f` on the blocking pool; `None` if it panicked (or the runtime is going away).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => Some(v),
        Err(e) => {
            error!(error = %e, "heartbeat I/O task failed");
            None
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A short, single-line, printable excerpt of an answer body for logs and `/health`.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(ANSWER_EXCERPT)]);
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_short_and_single_line() {
        let long = vec![b'x'; 1000];
        assert_eq!(excerpt(&long).len(), ANSWER_EXCERPT);
        assert_eq!(excerpt(b"{\"error\":\n\"no\"}\r\n"), "{\"error\": \"no\"}");
        assert_eq!(excerpt(&[0xff, b'a']), "\u{fffd}a");
    }

    #[test]
    fn problems_show_setup_before_spool_before_send() {
        let s = Status::new(true);
        s.problem(|p| p.send = Some("send".into()));
        assert_eq!(s.view().error.as_deref(), Some("send"));
        s.problem(|p| p.spool = Some("spool".into()));
        assert_eq!(s.view().error.as_deref(), Some("spool"));
        s.problem(|p| p.setup = Some("setup".into()));
        assert_eq!(s.view().error.as_deref(), Some("setup"));
        s.problem(|p| {
            p.setup = None;
            p.spool = None;
        });
        assert_eq!(s.view().error.as_deref(), Some("send"));
        s.problem(|p| p.send = None);
        assert_eq!(s.view().error, None);
    }

    #[test]
    fn retries_are_jittered_below_the_cap() {
        let mut cfg: HeartbeatConfig = toml::from_str("url = \"http://127.0.0.1:1/hb\"").unwrap();
        cfg.max_backoff = crate::config::types::Duration(Duration::from_millis(800));
        let mut b = backoff(&cfg);
        let delays: Vec<Duration> = (0..20).map(|_| b.next().unwrap()).collect();
        assert_eq!(
            delays[0],
            Duration::from_millis(800),
            "min delay is capped too"
        );
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(800)));

        let mut cfg2 = cfg;
        cfg2.max_backoff = crate::config::types::Duration(Duration::from_secs(120));
        let mut b = backoff(&cfg2);
        let d: Vec<u64> = (0..9).map(|_| b.next().unwrap().as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 8, 16, 32, 64, 120, 120]);
    }
}
