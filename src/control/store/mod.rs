//! Where the control plane keeps enrolment (host id → public keys) and heartbeats.
//!
//! One [`Store`] trait, two implementations: [`file::FileStore`], the embedded default
//! under `state_dir`, and [`postgresql::PgStore`] for several receivers on one database
//! (`store = "postgresql://…"`). [`AnyStore`] is whichever the config names, for the
//! binary.
//!
//! # Why an async trait
//! Both stores are naturally asynchronous: the file store hands accepts to one writer
//! thread that commits them in groups (one `fdatasync` for every accept waiting at that
//! moment) and answers each through a oneshot channel, and tokio-postgres is async
//! throughout. A synchronous trait behind `spawn_blocking` would park one blocking thread
//! per waiting request, which at 10,000 accepts a second is the pool. The trait uses
//! return-position `impl Future` (no boxing, no `async-trait` crate); the server is generic
//! over the store, so no `dyn` is needed.
//!
//! # The invariant every store keeps
//! [`Store::accept`] refuses a `seq` that is not above the host's last accepted one and
//! returns only once an accepted heartbeat is durable: a 200 is never lost, and two
//! accepts of the same (host, seq) can never both succeed.

mod any;
mod enrollment;
pub mod file;
mod frame;
pub mod postgresql;

pub use any::AnyStore;

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::body::Summary;
use crate::heartbeat::keys::PublicKey;
use crate::lifecycle::HostState;

/// A heartbeat that passed every check but the `seq` one, ready to store.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// `host_id` of the body.
    pub host_id: String,
    /// `seq` of the body.
    pub seq: u64,
    /// The key that signed it.
    pub key_id: String,
    /// When it was received (milliseconds since the Unix epoch).
    pub received_at_ms: u64,
    /// The body as received.
    pub body: Bytes,
    /// What the filters read from it.
    pub summary: Summary,
}

/// What [`Store::accept`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptOutcome {
    /// Stored durably.
    Accepted,
    /// `seq` was not above the last accepted one, which is this.
    Stale {
        /// The host's last accepted `seq`.
        last_seq: u64,
    },
    /// The signing key was revoked between the key lookup and the store (the PostgreSQL
    /// store checks enrolment in the same statement that stores): nothing stored.
    Revoked,
}

/// The latest heartbeat of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastHeartbeat {
    /// Its `seq`: the host's last accepted one.
    pub seq: u64,
    /// When it was received (ms since the epoch).
    pub received_at_ms: u64,
    /// The key that signed it.
    pub key_id: String,
    /// The document as sent (valid UTF-8 JSON: it was parsed at receipt).
    pub body: Bytes,
    /// What the filters read from it.
    pub summary: Summary,
}

/// A key enrolled for a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolledKey {
    /// The key.
    pub key: PublicKey,
    /// When it was enrolled (ms since the epoch).
    pub enrolled_at_ms: u64,
}

/// One enrolled host as `/v1/hosts` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    /// The host id.
    pub host_id: String,
    /// Its enrolled keys, oldest first.
    pub keys: Vec<EnrolledKey>,
    /// Its latest heartbeat, if any ever came.
    pub last: Option<LastHeartbeat>,
}

impl HostView {
    /// The derived state: the reported one, or `uncertain` when the heartbeat is overdue
    /// (received longer than `overdue_after` before `now_ms`) or never came.
    pub fn derived_state(&self, now_ms: u64, overdue_after: Duration) -> HostState {
        derive_state(self.last.as_ref(), now_ms, overdue_after)
    }
}

/// See [`HostView::derived_state`].
pub fn derive_state(
    last: Option<&LastHeartbeat>,
    now_ms: u64,
    overdue_after: Duration,
) -> HostState {
    match last {
        Some(l) if now_ms.saturating_sub(l.received_at_ms) <= millis(overdue_after) => {
            l.summary.state
        }
        _ => HostState::Uncertain,
    }
}

/// A duration in whole milliseconds, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `t` in milliseconds since the Unix epoch (0 before it).
pub fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, millis)
}

/// The `/v1/hosts` filters; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct HostFilter {
    /// Derived state.
    pub state: Option<HostState>,
    /// GLOB on the last heartbeat's `kernel`.
    pub kernel: Option<glob::Pattern>,
    /// GLOB on the last heartbeat's `image.id`.
    pub image: Option<glob::Pattern>,
    /// Hosts with a check in this status (a bit of [`super::body::status_bit`]).
    pub check_status: Option<u8>,
    /// "Now" for the derived state (ms since the epoch).
    pub now_ms: u64,
    /// `overdue_after` for the derived state.
    pub overdue_after: Duration,
}

impl HostFilter {
    /// Whether `h` passes every filter.
    pub fn matches(&self, h: &HostView) -> bool {
        if let Some(s) = self.state {
            if h.derived_state(self.now_ms, self.overdue_after) != s {
                return false;
            }
        }
        let summary = h.last.as_ref().map(|l| &l.summary);
        let glob_ok = |p: &Option<glob::Pattern>, v: Option<&String>| match p {
            None => true,
            Some(p) => v.is_some_and(|v| p.matches(v)),
        };
        glob_ok(&self.kernel, summary.and_then(|s| s.kernel.as_ref()))
            && glob_ok(&self.image, summary.and_then(|s| s.image_id.as_ref()))
            && self
                .check_status
                .is_none_or(|bit| summary.is_some_and(|s| s.check_statuses & bit != 0))
    }
}

/// A page of `/v1/hosts`: hosts are ordered by id; `after` is the last id of the
/// previous page.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Most hosts returned.
    pub limit: usize,
    /// Start after this host id.
    pub after: Option<String>,
}

/// What a prune did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneStats {
    /// History files removed (file store).
    pub files_removed: usize,
    /// Bytes they held (file store).
    pub bytes_removed: u64,
    /// History rows deleted (PostgreSQL store).
    pub rows_removed: u64,
}

/// What the state tracker needs of a host, without its body or keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBrief {
    /// The host id.
    pub host_id: String,
    /// `(seq, received_at_ms, reported state)` of its latest heartbeat, if any.
    pub last: Option<(u64, u64, HostState)>,
}

impl HostBrief {
    /// As [`HostView::derived_state`].
    pub fn derived_state(&self, now_ms: u64, overdue_after: Duration) -> HostState {
        match self.last {
            Some((_, at, state)) if now_ms.saturating_sub(at) <= millis(overdue_after) => state,
            _ => HostState::Uncertain,
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the file.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A store file is damaged in a way that cannot be skipped safely.
    #[error("{0}")]
    Corrupt(String),
    /// Another receiver holds the store.
    #[error("{0}")]
    Locked(String),
    /// The store opened for reading only (the CLI's `hosts`) was asked to write.
    #[error("the store is open for reading only")]
    ReadOnly,
    /// The store stopped accepting writes after an error it could not undo; a restart
    /// recovers from what is on disk.
    #[error("the store stopped after a write error: {0}")]
    Failed(String),
    /// An argument is invalid (a host id, a key id, a `seq` the store cannot hold).
    #[error("{0}")]
    Invalid(String),
    /// The database cannot be reached or did not answer in time; the operation may be
    /// retried (a receiver answers 503 meanwhile and reconnects with backoff).
    #[error("{0}")]
    Unavailable(String),
    /// The database answered with an error, with what was being done.
    #[error("{0}")]
    Database(String),
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
        let context = context.into();
        move |source| StoreError::Io { context, source }
    }
}

/// Enrolment and heartbeats. See the module doc for the invariant of [`Store::accept`].
pub trait Store: Send + Sync + 'static {
    /// Adds `key` to `host_id`'s keys; `false` when it was already enrolled. Takes effect
    /// at once in every receiver on this store.
    fn enroll(
        &self,
        host_id: &str,
        key: &PublicKey,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Removes one key (by key id) or, with `None`, every key of `host_id`; returns how
    /// many were removed. The host's `seq` history stays, so a re-enrolled host cannot
    /// have old heartbeats replayed.
    fn revoke(
        &self,
        host_id: &str,
        key_id: Option<&str>,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// The keys enrolled for `host_id` now (empty: not enrolled). `want` is the keyid the
    /// request names, if it names one: a store that caches keys may answer from its cache
    /// only when the cache holds that key, and must ask its source otherwise (`None`:
    /// always ask), so a key enrolled a moment ago is found.
    fn keys(
        &self,
        host_id: &str,
        want: Option<&str>,
    ) -> impl Future<Output = Result<Vec<PublicKey>, StoreError>> + Send;

    /// Stores a verified heartbeat if its `seq` is above the host's last one; returns
    /// once it is durable.
    fn accept(
        &self,
        hb: Incoming,
    ) -> impl Future<Output = Result<AcceptOutcome, StoreError>> + Send;

    /// One enrolled host, `None` when it is not enrolled.
    fn host(
        &self,
        host_id: &str,
    ) -> impl Future<Output = Result<Option<HostView>, StoreError>> + Send;

    /// Every enrolled host, in id order, with only what its derived state needs: what the
    /// state tracker reads every second, so no body and no key is copied.
    fn briefs(&self) -> impl Future<Output = Result<Vec<HostBrief>, StoreError>> + Send;

    /// Enrolled hosts in id order, filtered and paged.
    fn hosts(
        &self,
        filter: &HostFilter,
        page: &Page,
    ) -> impl Future<Output = Result<Vec<HostView>, StoreError>> + Send;

    /// Drops heartbeat history received before `now - retention`; the latest heartbeat of
    /// every host is always kept.
    fn prune(
        &self,
        retention: Duration,
        now: SystemTime,
    ) -> impl Future<Output = Result<PruneStats, StoreError>> + Send;

    /// Adds every `(host, key)` of `keys` at once (validated by the caller): one durable
    /// write for the file store, one transaction for PostgreSQL, so either all are
    /// enrolled or, on an error, none is. A key already enrolled (or listed twice) is
    /// skipped and counted.
    fn enroll_many(
        &self,
        keys: &[(String, PublicKey)],
    ) -> impl Future<Output = Result<BulkEnrolled, StoreError>> + Send;

    /// The derived state last notified to the webhook per host, as persisted (hosts never
    /// notified are absent). The webhook's module doc has the design.
    fn notified(
        &self,
    ) -> impl Future<Output = Result<HashMap<String, HostState>, StoreError>> + Send;

    /// Records `states` as notified for the hosts that have no notified state yet: the
    /// baseline the first tracker round learns, without a webhook call.
    fn baseline_notified(
        &self,
        states: Vec<(String, HostState)>,
        at_ms: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Claims the change of `host_id` to `state`, noticed at `at_ms`, for this receiver to
    /// send: `false` when it is notified already (by another receiver on the same
    /// database, or a change noticed later was claimed first), and the caller must not
    /// send it.
    fn claim_notified(
        &self,
        host_id: &str,
        state: HostState,
        at_ms: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Gives back a claim whose call was cut short (the receiver stopping): `host_id` is
    /// notified as `previous` again, unless a later claim took it meanwhile, so the
    /// change is sent after the restart.
    fn release_notified(
        &self,
        host_id: &str,
        claimed: HostState,
        at_ms: u64,
        previous: HostState,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Makes the notified states recorded so far durable where they are not already
    /// (the file store batches them into one atomic file write; PostgreSQL commits each
    /// claim at once).
    fn flush_notified(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// What [`Store::enroll_many`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BulkEnrolled {
    /// Keys newly enrolled.
    pub keys: usize,
    /// Distinct hosts those keys belong to.
    pub hosts: usize,
    /// Keys that were enrolled already (or listed twice).
    pub already: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(state: HostState, at: u64, kernel: &str) -> HostView {
        HostView {
            host_id: "h".into(),
            keys: Vec::new(),
            last: Some(LastHeartbeat {
                seq: 1,
                received_at_ms: at,
                key_id: "k".into(),
                body: Bytes::new(),
                summary: Summary {
                    state,
                    kernel: Some(kernel.into()),
                    image_id: None,
                    check_statuses: 0b0100,
                },
            }),
        }
    }

    #[test]
    fn derived_state_is_uncertain_when_overdue_or_never_seen() {
        let od = Duration::from_secs(45);
        let h = view(HostState::Available, 100_000, "6.1");
        assert_eq!(h.derived_state(145_000, od), HostState::Available);
        assert_eq!(h.derived_state(145_001, od), HostState::Uncertain);
        let never = HostView {
            last: None,
            ..h.clone()
        };
        assert_eq!(never.derived_state(0, od), HostState::Uncertain);
        // A clock that went back does not make the host overdue.
        assert_eq!(h.derived_state(50_000, od), HostState::Available);
    }

    #[test]
    fn filters_combine() {
        let h = view(HostState::Unavailable, 1000, "6.1.0-18-amd64");
        let mut f = HostFilter {
            now_ms: 1000,
            overdue_after: Duration::from_secs(45),
            ..HostFilter::default()
        };
        assert!(f.matches(&h));
        f.kernel = Some(glob::Pattern::new("6.1.*").unwrap());
        f.check_status = super::super::body::status_bit("critical");
        f.state = Some(HostState::Unavailable);
        assert!(f.matches(&h));
        f.image = Some(glob::Pattern::new("*").unwrap());
        assert!(!f.matches(&h), "no image id: a GLOB does not match");
        f.image = None;
        f.check_status = super::super::body::status_bit("ok");
        assert!(!f.matches(&h));
    }
}
