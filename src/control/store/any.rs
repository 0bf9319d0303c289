//! [`AnyStore`]: the store the config names, so the binary's receiver and CLI are written
//! once. The server stays generic over [`Store`] (tests and the load generator use a
//! concrete store); this enum only forwards, one `match` per method.

use std::time::{Duration, SystemTime};

use super::file::FileStore;
use super::postgresql::PgStore;
use std::collections::HashMap;

use super::{
    AcceptOutcome, BulkEnrolled, HostBrief, HostFilter, HostView, Incoming, Page, PruneStats,
    Store, StoreError,
};
use crate::heartbeat::keys::PublicKey;
use crate::lifecycle::HostState;

/// The file store or the PostgreSQL store.
#[derive(Clone)]
pub enum AnyStore {
    /// `store = "file"`.
    File(FileStore),
    /// `store = "postgresql://…"`.
    Postgres(PgStore),
}

macro_rules! forward {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::File($s) => $call.await,
            AnyStore::Postgres($s) => $call.await,
        }
    };
}

impl Store for AnyStore {
    async fn enroll(&self, host_id: &str, key: &PublicKey) -> Result<bool, StoreError> {
        forward!(self, s => s.enroll(host_id, key))
    }

    async fn revoke(&self, host_id: &str, key_id: Option<&str>) -> Result<usize, StoreError> {
        forward!(self, s => s.revoke(host_id, key_id))
    }

    async fn keys(&self, host_id: &str, want: Option<&str>) -> Result<Vec<PublicKey>, StoreError> {
        forward!(self, s => s.keys(host_id, want))
    }

    async fn accept(&self, hb: Incoming) -> Result<AcceptOutcome, StoreError> {
        forward!(self, s => s.accept(hb))
    }

    async fn host(&self, host_id: &str) -> Result<Option<HostView>, StoreError> {
        forward!(self, s => s.host(host_id))
    }

    async fn briefs(&self) -> Result<Vec<HostBrief>, StoreError> {
        forward!(self, s => s.briefs())
    }

    async fn hosts(&self, filter: &HostFilter, page: &Page) -> Result<Vec<HostView>, StoreError> {
        forward!(self, s => s.hosts(filter, page))
    }

    async fn prune(&self, retention: Duration, now: SystemTime) -> Result<PruneStats, StoreError> {
        forward!(self, s => s.prune(retention, now))
    }

    async fn enroll_many(&self, keys: &[(String, PublicKey)]) -> Result<BulkEnrolled, StoreError> {
        forward!(self, s => s.enroll_many(keys))
    }

    async fn notified(&self) -> Result<HashMap<String, HostState>, StoreError> {
        forward!(self, s => s.notified())
    }

    async fn baseline_notified(
        &self,
        states: Vec<(String, HostState)>,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        forward!(self, s => s.baseline_notified(states, at_ms))
    }

    async fn claim_notified(
        &self,
        host_id: &str,
        state: HostState,
        at_ms: u64,
    ) -> Result<bool, StoreError> {
        forward!(self, s => s.claim_notified(host_id, state, at_ms))
    }

    async fn release_notified(
        &self,
        host_id: &str,
        claimed: HostState,
        at_ms: u64,
        previous: HostState,
    ) -> Result<(), StoreError> {
        forward!(self, s => s.release_notified(host_id, claimed, at_ms, previous))
    }

    async fn flush_notified(&self) -> Result<(), StoreError> {
        forward!(self, s => s.flush_notified())
    }
}
