//! [`AnyStore`]: the store the config names, so the binary's receiver and CLI are written
//! once. The server stays generic over [`Store`] (tests and the load generator use a
//! concrete store); this enum only forwards, one `match` per method.

use std::time::{Duration, SystemTime};

use super::file::FileStore;
use super::postgresql::PgStore;
use super::{
    AcceptOutcome, HostBrief, HostFilter, HostView, Incoming, Page, PruneStats, Store, StoreError,
};
use crate::heartbeat::keys::PublicKey;

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
}
