//! The PostgreSQL store (`store = "postgresql://…"`): several receivers behind a load
//! balancer on one shared database.
//!
//! This doc is the design; the code follows it.
//!
//! # Connecting
//! The URL follows the agent's DSN rules ([`crate::pg`]): password from the URL or a
//! passfile, TLS with rustls only when `sslmode` asks for it, always verifying the server
//! (`sslrootcert`, else the system roots). The password never reaches a log or a message:
//! errors name the redacted target (`host=… port=… user=… dbname=…`). Every session runs
//! `synchronous_commit = on` whatever the server's default, so a commit is on the
//! database's disk before it returns, and a `statement_timeout`.
//!
//! # Schema, versioned, migrated by the receiver
//! `schema_version` holds one row per migration applied. [`MIGRATIONS`] is the ordered
//! list; opening the store takes a transaction-scoped advisory lock (two receivers
//! starting together migrate once), applies the missing ones in the same transaction
//! (DDL is transactional in PostgreSQL: a failed migration leaves nothing behind), and
//! refuses a database whose version is newer than this build knows. Tables (v1):
//! - `hosts`: one row per host ever enrolled: `last_seq`, and the latest heartbeat (body
//!   exactly as received, and the fields the `/v1/hosts` filters read). Ids use the "C"
//!   collation, so paging order is byte order, as in the file store.
//! - `host_keys`: enrolment, (host, keyid) → public key. A host is enrolled while it
//!   has a key; revoking keeps its `hosts` row, so its `seq` cannot be replayed.
//! - `heartbeats`: the history, one row per accepted heartbeat, keyed by (host, seq);
//!   a BRIN index on `received_ms` serves pruning at almost no insert cost (rows arrive
//!   in time order).
//!
//! v2 adds `hosts.notified_state` and `hosts.notified_ms`: the derived state last
//! notified to the webhook and when that change was noticed. A receiver claims a change
//! before it calls the webhook with one `UPDATE … WHERE notified_state IS DISTINCT FROM
//! $new AND notified_ms < $noticed`: the row lock makes the claim atomic, so of several
//! receivers noticing the same change exactly one sends it, and the time guard keeps a
//! receiver that lags behind from claiming a change the others have already moved past.
//!
//! `enroll_many` (the CLI's `enroll --from`) runs in one transaction on its own session,
//! [`BULK_CHUNK`] rows per statement: all or nothing.
//!
//! # Accepting: one statement for every request waiting
//! [`Store::accept`] queues the heartbeat to one of [`WRITERS`] writer tasks, each with
//! its own session. A writer takes every request waiting (up to [`MAX_BATCH`]) and stores
//! them with one statement: an `UPDATE hosts … WHERE last_seq < seq AND <key still
//! enrolled>` over the whole group (`unnest` of arrays), and, in the same statement, an
//! `INSERT` into `heartbeats` of exactly the rows the update took. One statement is one
//! transaction and one commit, so one WAL flush serves the whole group, and the answer
//! (200 or 409) waits for that commit. The `seq` check is the row lock and the `WHERE` in
//! SQL: a second receiver updating the same host waits for the first one's commit and
//! then re-checks `last_seq < seq` against the committed row (READ COMMITTED's re-check
//! of updated rows), so two receivers never both accept one (host, seq). A host appears
//! once per statement (a second heartbeat of one host in a group goes in the next
//! statement), and rows are taken in id order so concurrent groups lock in one order; a
//! deadlock or serialization failure is retried. A heartbeat the update did not take is
//! looked up once more: `Stale` with the committed `last_seq`, or `Revoked` when its key
//! is no longer enrolled.
//!
//! # Enrolment
//! `enroll` and `revoke` are single statements on the shared database, so they take
//! effect for every receiver at once. Receivers cache the public keys of hosts they have
//! seen (a lookup per heartbeat would double the database's work); the cache is only a
//! source of keys to verify with, never the authority: a keyid it does not hold is looked
//! up in the database (a rotated key works at once), and a revoked key still in a cache
//! is caught by the accepting statement itself, which answers `Revoked` (401) and drops
//! the cached entry.
//!
//! # A database that goes away
//! Every operation runs under [`QUERY_TIMEOUT`]. A session that fails, closes or times
//! out is dropped and reconnected on next use, no sooner than a backoff (200 ms doubling
//! to 5 s) after a failed connect; until then requests fail at once with
//! [`StoreError::Unavailable`] (503 with the reason: the agent keeps the heartbeat and
//! retries), so a dead database never piles up waiting requests. A statement whose
//! answer was lost may still have committed: the agent's retry then gets a 409, which
//! tells it the heartbeat is stored. The loss is logged once, the recovery once.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::FromSql;
use tokio_postgres::{Client, NoTls, Row, Statement};
use tracing::{info, warn};

use super::{
    AcceptOutcome, BulkEnrolled, EnrolledKey, HostBrief, HostFilter, HostView, Incoming,
    LastHeartbeat, Page, PruneStats, Store, StoreError, epoch_ms,
};
use crate::control::body::{self, Summary};
use crate::control::metrics::ALL_STATES;
use crate::heartbeat::keys::PublicKey;
use crate::lifecycle::HostState;
use crate::pg::{self, DsnSettings};

/// Most heartbeats stored by one statement.
pub const MAX_BATCH: usize = 1024;
/// Writer tasks (sessions) storing heartbeats: while one group commits, the next is
/// already being sent. A receiver holds `WRITERS + 2` sessions (requests' reads, and the
/// background's).
pub const WRITERS: usize = 2;
/// Longest wait for any one database operation.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a connect (TCP, TLS, authentication, session setup).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Rows deleted per pruning statement, and statements per prune: short transactions that
/// never hold many locks.
const PRUNE_CHUNK: i64 = 10_000;
const PRUNE_ROUNDS: usize = 100;
/// Rows per statement of a bulk enrolment or of the webhook's baseline.
pub const BULK_CHUNK: usize = 10_000;
/// Rows read per query while filtering `/v1/hosts`.
const LIST_CHUNK: i64 = 1000;
/// Retries of a group that hit a deadlock or serialization failure.
const RETRIES: usize = 3;
/// The advisory lock serializing migrations ("vigil", 1).
const MIGRATION_LOCK: i64 = 0x0076_6967_696c_0001;

/// Session settings of every connection. `synchronous_commit = on` is what makes a 200
/// durable, whatever the server's default; the statement timeout stays under
/// [`QUERY_TIMEOUT`] so the server gives up first and the session stays usable.
const SESSION_SETUP: &str = "SET synchronous_commit = on; SET statement_timeout = '9s'; \
                             SET lock_timeout = '5s'; SET client_min_messages = warning";

/// The schema migrations, in order: `(version, SQL)`. Append only; never edit a shipped
/// one.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE hosts (
         host_id text COLLATE \"C\" PRIMARY KEY,
         last_seq bigint NOT NULL DEFAULT 0,
         received_ms bigint,
         key_id text,
         body bytea,
         state text,
         kernel text,
         image_id text,
         check_statuses smallint NOT NULL DEFAULT 0
     ) WITH (fillfactor = 70);
     CREATE TABLE host_keys (
         host_id text COLLATE \"C\" NOT NULL REFERENCES hosts (host_id),
         key_id text NOT NULL,
         public_key text NOT NULL,
         enrolled_ms bigint NOT NULL,
         PRIMARY KEY (host_id, key_id)
     );
     CREATE TABLE heartbeats (
         host_id text COLLATE \"C\" NOT NULL,
         seq bigint NOT NULL,
         received_ms bigint NOT NULL,
         key_id text NOT NULL,
         body bytea NOT NULL,
         PRIMARY KEY (host_id, seq)
     );
     CREATE INDEX heartbeats_received_ms ON heartbeats USING brin (received_ms);",
    ),
    (
        2,
        // The webhook's last notified state per host, and when that change was noticed
        // (see the webhook module doc): claimed by one receiver per change.
        "ALTER TABLE hosts ADD COLUMN notified_state text, ADD COLUMN notified_ms bigint;",
    ),
    (
        3,
        // A heartbeat of 20 checks (about 2.5 KB) is over the TOAST threshold, so every
        // accepted one was compressed twice (`hosts` and `heartbeats`) with pglz: most of
        // the database's CPU at fleet scale. lz4 does it several times faster. A server
        // built without lz4 keeps pglz rather than failing the migration.
        "DO $$
         BEGIN
             ALTER TABLE hosts ALTER COLUMN body SET COMPRESSION lz4;
             ALTER TABLE heartbeats ALTER COLUMN body SET COMPRESSION lz4;
         EXCEPTION WHEN feature_not_supported THEN
             RAISE NOTICE 'lz4 is not available: heartbeat bodies stay pglz-compressed';
         END $$;",
    ),
];

// `fillfactor = 70` above: every heartbeat rewrites its host's row; the free space lets
// PostgreSQL keep the new version on the same page (a HOT update, no index write).

/// Stores a group of heartbeats; returns the hosts whose row it updated.
const ACCEPT_SQL: &str = "
WITH i AS (
    SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[], $5::bytea[],
                         $6::text[], $7::text[], $8::text[], $9::int2[])
        AS t(host_id, seq, key_id, received_ms, body, state, kernel, image_id, check_statuses)
), u AS (
    UPDATE hosts h
       SET last_seq = i.seq, received_ms = i.received_ms, key_id = i.key_id, body = i.body,
           state = i.state, kernel = i.kernel, image_id = i.image_id,
           check_statuses = i.check_statuses
      FROM i
     WHERE h.host_id = i.host_id AND h.last_seq < i.seq
       AND EXISTS (SELECT 1 FROM host_keys k
                    WHERE k.host_id = i.host_id AND k.key_id = i.key_id)
    RETURNING h.host_id
), ins AS (
    INSERT INTO heartbeats (host_id, seq, received_ms, key_id, body)
    SELECT i.host_id, i.seq, i.received_ms, i.key_id, i.body FROM i JOIN u USING (host_id)
)
SELECT host_id::text FROM u";

/// Why heartbeats were not taken: the committed `last_seq`, and whether the key is still
/// enrolled.
const REFUSED_SQL: &str = "
SELECT t.host_id, h.last_seq,
       EXISTS (SELECT 1 FROM host_keys k WHERE k.host_id = t.host_id AND k.key_id = t.key_id)
  FROM unnest($1::text[], $2::text[]) AS t(host_id, key_id)
  LEFT JOIN hosts h ON h.host_id = t.host_id";

const KEYS_SQL: &str =
    "SELECT public_key FROM host_keys WHERE host_id = $1 ORDER BY enrolled_ms, key_id";

const VIEW_COLUMNS: &str = "h.host_id::text, h.last_seq, h.received_ms, h.key_id, h.body, \
                            h.state, h.kernel, h.image_id, h.check_statuses";

/// A session and the statements prepared on it.
struct Conn {
    client: Client,
    accept: Statement,
    refused: Statement,
    keys: Statement,
}

/// How to reach the database, and whether its loss was logged.
struct Connector {
    settings: DsnSettings,
    /// Set once a failure was logged; cleared (and the recovery logged) on the next
    /// success, so an outage is two log lines per receiver, not one per request.
    down: AtomicBool,
}

impl Connector {
    fn target(&self) -> &str {
        self.settings.target()
    }

    /// A new session with the session settings applied (not yet prepared).
    async fn session(&self) -> Result<Client, String> {
        let settings = self.settings.clone();
        let target = self.target().to_string();
        let parts = tokio::task::spawn_blocking(move || settings.connect_parts())
            .await
            .map_err(|e| format!("cannot connect to {target}: internal error: {e}"))?
            .map_err(|e| format!("cannot connect to {target}: {e}"))?;
        if let Some(w) = &parts.passfile_warning {
            warn!(target = %target, "{w}");
        }
        let mut config = parts.config;
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name() == Some("vigil") {
            config.application_name("vigil-control");
        }
        let attempt = async {
            let client = match parts.tls {
                None => {
                    let (c, conn) = config.connect(NoTls).await?;
                    pg::spawn_connection(conn, target.clone());
                    c
                }
                Some(tls) => {
                    let (c, conn) = config.connect(tls).await?;
                    pg::spawn_connection(conn, target.clone());
                    c
                }
            };
            client.batch_execute(SESSION_SETUP).await?;
            Ok::<_, tokio_postgres::Error>(client)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), attempt).await {
            Err(_) => Err(format!(
                "cannot connect to {target}: no answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => Err(format!(
                "cannot connect to {target}: {}",
                pg::error_chain(&e)
            )),
            Ok(Ok(c)) => Ok(c),
        }
    }

    async fn conn(&self) -> Result<Conn, String> {
        let client = self.session().await?;
        let prepare = async {
            Ok::<_, tokio_postgres::Error>((
                client.prepare(ACCEPT_SQL).await?,
                client.prepare(REFUSED_SQL).await?,
                client.prepare(KEYS_SQL).await?,
            ))
        };
        match tokio::time::timeout(QUERY_TIMEOUT, prepare).await {
            Ok(Ok((accept, refused, keys))) => Ok(Conn {
                client,
                accept,
                refused,
                keys,
            }),
            Ok(Err(e)) => Err(format!(
                "preparing statements on {}: {}",
                self.target(),
                pg::error_chain(&e)
            )),
            Err(_) => Err(format!(
                "preparing statements on {}: no answer within {}s",
                self.target(),
                QUERY_TIMEOUT.as_secs()
            )),
        }
    }

    fn lost(&self, why: &str) {
        if !self.down.swap(true, Ordering::Relaxed) {
            warn!(error = %why, "PostgreSQL store not available; answering 503 until it is back");
        }
    }

    fn recovered(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            info!(target = %self.target(), "PostgreSQL store available again");
        }
    }
}

/// One session, connected on demand and replaced when it fails.
struct Link {
    connector: Arc<Connector>,
    /// The live session, read without a lock on every operation.
    live: ArcSwapOption<Conn>,
    /// Held while connecting (a tokio mutex: held across the connect), so one connect
    /// is in flight per link, and the backoff after a failed one.
    connecting: Mutex<Backoff>,
}

#[derive(Default)]
struct Backoff {
    retry_at: Option<Instant>,
    delay: Duration,
    last_error: String,
}

/// Why an operation failed: the store's error, and whether it is worth retrying the
/// same statement at once (a deadlock or serialization failure).
struct Failure {
    error: StoreError,
    retry: bool,
}

impl Link {
    fn new(connector: Arc<Connector>) -> Link {
        Link {
            connector,
            live: ArcSwapOption::empty(),
            connecting: Mutex::new(Backoff::default()),
        }
    }

    async fn conn(&self) -> Result<Arc<Conn>, StoreError> {
        if let Some(c) = self.live.load_full() {
            if !c.client.is_closed() {
                return Ok(c);
            }
        }
        let mut b = self.connecting.lock().await;
        // Another request may have connected while this one waited for the lock.
        if let Some(c) = self.live.load_full() {
            if !c.client.is_closed() {
                return Ok(c);
            }
        }
        self.live.store(None);
        if let Some(at) = b.retry_at {
            if Instant::now() < at {
                return Err(StoreError::Unavailable(b.last_error.clone()));
            }
        }
        match self.connector.conn().await {
            Ok(c) => {
                let c = Arc::new(c);
                self.live.store(Some(c.clone()));
                *b = Backoff::default();
                self.connector.recovered();
                Ok(c)
            }
            Err(e) => {
                b.delay = (b.delay * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                b.retry_at = Some(Instant::now() + b.delay);
                b.last_error = e.clone();
                self.connector.lost(&e);
                Err(StoreError::Unavailable(e))
            }
        }
    }

    /// Drops `c` if it is still the live session (its state is unknown after a timeout).
    fn discard(&self, c: &Arc<Conn>) {
        let current = self.live.load();
        if current.as_ref().is_some_and(|l| Arc::ptr_eq(l, c)) {
            self.live.store(None);
        }
    }

    /// Runs `op` on the session under [`QUERY_TIMEOUT`], retrying a deadlock or a
    /// serialization failure a few times. `what` names the operation in errors.
    async fn run<T, F, Fut>(&self, what: &str, op: F) -> Result<T, StoreError>
    where
        F: Fn(Arc<Conn>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let mut tries = 0;
        loop {
            let c = self.conn().await?;
            match self.once(what, &c, op(c.clone())).await {
                Ok(v) => return Ok(v),
                Err(f) if f.retry && tries < RETRIES => tries += 1,
                Err(f) => return Err(f.error),
            }
        }
    }

    async fn once<T>(
        &self,
        what: &str,
        c: &Arc<Conn>,
        fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, Failure> {
        let target = self.connector.target();
        match tokio::time::timeout(QUERY_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Err(_) => {
                self.discard(c);
                let e = format!(
                    "{what}: no answer from {target} within {}s",
                    QUERY_TIMEOUT.as_secs()
                );
                self.connector.lost(&e);
                Err(Failure {
                    error: StoreError::Unavailable(e),
                    retry: false,
                })
            }
            Ok(Err(e)) => {
                let msg = format!("{what} on {target}: {}", pg::error_chain(&e));
                let code = e.code();
                let retry = code == Some(&SqlState::T_R_DEADLOCK_DETECTED)
                    || code == Some(&SqlState::T_R_SERIALIZATION_FAILURE);
                // No server error (the connection broke), or the server going away
                // (class 57: shutdown; 08: connection; 53: out of resources).
                let gone = c.client.is_closed()
                    || code.is_none_or(|c| {
                        let s = c.code();
                        s.starts_with("57") || s.starts_with("08") || s.starts_with("53")
                    });
                let error = if gone {
                    self.discard(c);
                    self.connector.lost(&msg);
                    StoreError::Unavailable(msg)
                } else {
                    StoreError::Database(msg)
                };
                Err(Failure { error, retry })
            }
        }
    }
}

/// A heartbeat waiting for a writer.
struct Pending {
    hb: Incoming,
    seq: i64,
    received_ms: i64,
    answer: oneshot::Sender<Result<AcceptOutcome, StoreError>>,
}

/// The PostgreSQL store. Cheap to clone (a handle on shared state).
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Reads, enrolment and pruning: one session, used by many requests at once
    /// (tokio-postgres pipelines their statements); never a multi-statement transaction.
    reads: Link,
    /// The state tracker's read of every host each second, and pruning: their own
    /// session, so a 100,000-row answer never queues in front of a request's key lookup.
    background: Link,
    /// Public keys of hosts seen (see the module doc: a cache, not the authority).
    keys: RwLock<HashMap<String, Arc<Vec<PublicKey>>>>,
    /// To the writer tasks; `None` for the CLI. Dropping the last handle closes it, and
    /// each writer ends after answering the group it holds.
    tx: Option<mpsc::Sender<Pending>>,
}

impl PgStore {
    /// Connects to `url`, creates or migrates the schema and starts the writer tasks.
    /// Must run inside a tokio runtime.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a URL that cannot be used, [`StoreError::Unavailable`]
    /// when the database cannot be reached, [`StoreError::Database`] when the migration
    /// fails or the schema is newer than this build.
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        Self::open_with(url, true).await
    }

    /// As [`PgStore::open`], for the CLI: no writers (`accept` answers
    /// [`StoreError::ReadOnly`]).
    ///
    /// # Errors
    /// As [`PgStore::open`].
    pub async fn open_cli(url: &str) -> Result<PgStore, StoreError> {
        Self::open_with(url, false).await
    }

    async fn open_with(url: &str, writers: bool) -> Result<PgStore, StoreError> {
        let settings = pg::Dsn::new(url)
            .parse()
            .map_err(|e| StoreError::Invalid(format!("control.store: {e}")))?;
        let connector = Arc::new(Connector {
            settings,
            down: AtomicBool::new(false),
        });
        let mut client = connector.session().await.map_err(StoreError::Unavailable)?;
        let version = migrate(&mut client, connector.target()).await?;
        drop(client);
        let tx = writers.then(|| {
            let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
            let queue = Arc::new(Mutex::new(rx));
            for _ in 0..WRITERS {
                tokio::spawn(writer(queue.clone(), Link::new(connector.clone())));
            }
            tx
        });
        info!(target = %connector.target(), schema_version = version, "PostgreSQL store open");
        Ok(PgStore {
            inner: Arc::new(Inner {
                reads: Link::new(connector.clone()),
                background: Link::new(connector),
                keys: RwLock::new(HashMap::new()),
                tx,
            }),
        })
    }

    fn cached_keys(&self, host_id: &str) -> Option<Arc<Vec<PublicKey>>> {
        self.inner
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(host_id)
            .cloned()
    }

    fn forget_keys(&self, host_id: &str) {
        self.inner
            .keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(host_id);
    }

    /// The full views of `ids` (enrolled ones only), in id order.
    async fn views(&self, ids: &[String]) -> Result<Vec<HostView>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (rows, key_rows) = self
            .inner
            .reads
            .run("reading hosts", |c| async move {
                let sql = format!(
                    "SELECT {VIEW_COLUMNS} FROM hosts h WHERE h.host_id = ANY($1) \
                     ORDER BY h.host_id"
                );
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&ids];
                let hosts = c.client.query(&sql, &params);
                let keys = c.client.query(
                    "SELECT host_id::text, public_key, enrolled_ms FROM host_keys \
                     WHERE host_id = ANY($1) ORDER BY host_id, enrolled_ms, key_id",
                    &params,
                );
                // Both on the wire at once (pipelined).
                tokio::try_join!(hosts, keys)
            })
            .await?;
        let mut keys: HashMap<String, Vec<EnrolledKey>> = HashMap::new();
        for r in &key_rows {
            let host: String = col(r, 0)?;
            let text: String = col(r, 1)?;
            let key = PublicKey::from_b64(&text)
                .map_err(|e| StoreError::Corrupt(format!("host_keys row of {host:?}: {e}")))?;
            keys.entry(host).or_default().push(EnrolledKey {
                key,
                enrolled_at_ms: to_u64(col(r, 2)?),
            });
        }
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let host_id: String = col(r, 0)?;
            let Some(k) = keys.remove(&host_id) else {
                continue;
            };
            out.push(HostView {
                last: last_heartbeat(r)?,
                host_id,
                keys: k,
            });
        }
        Ok(out)
    }

    /// Stores one group in which each host appears once; answers each.
    async fn store_group(link: &Link, mut group: Vec<Pending>) {
        group.sort_by(|a, b| a.hb.host_id.cmp(&b.hb.host_id));
        match Self::store_group_inner(link, &group).await {
            Ok(outcomes) => {
                for (p, o) in group.into_iter().zip(outcomes) {
                    // The requester may have gone (client disconnected): nothing to tell.
                    let _ = p.answer.send(o);
                }
            }
            Err(e) => {
                for p in group {
                    let _ = p.answer.send(Err(same_error(&e)));
                }
            }
        }
    }

    async fn store_group_inner(
        link: &Link,
        group: &[Pending],
    ) -> Result<Vec<Result<AcceptOutcome, StoreError>>, StoreError> {
        let ids: Vec<&str> = group.iter().map(|p| p.hb.host_id.as_str()).collect();
        let seqs: Vec<i64> = group.iter().map(|p| p.seq).collect();
        let kids: Vec<&str> = group.iter().map(|p| p.hb.key_id.as_str()).collect();
        let received: Vec<i64> = group.iter().map(|p| p.received_ms).collect();
        let bodies: Vec<&[u8]> = group.iter().map(|p| &p.hb.body[..]).collect();
        let states: Vec<&str> = group.iter().map(|p| p.hb.summary.state.as_str()).collect();
        let kernels: Vec<Option<&str>> = group
            .iter()
            .map(|p| p.hb.summary.kernel.as_deref())
            .collect();
        let images: Vec<Option<&str>> = group
            .iter()
            .map(|p| p.hb.summary.image_id.as_deref())
            .collect();
        let statuses: Vec<i16> = group
            .iter()
            .map(|p| i16::from(p.hb.summary.check_statuses))
            .collect();
        let taken: HashSet<String> = link
            .run("storing heartbeats", |c| {
                let (ids, seqs, kids, received) = (&ids, &seqs, &kids, &received);
                let (bodies, states, kernels, images, statuses) =
                    (&bodies, &states, &kernels, &images, &statuses);
                async move {
                    c.client
                        .query(
                            &c.accept,
                            &[
                                ids, seqs, kids, received, bodies, states, kernels, images,
                                statuses,
                            ],
                        )
                        .await
                }
            })
            .await?
            .iter()
            .map(|r| col::<String>(r, 0))
            .collect::<Result<_, _>>()?;
        let refused: Vec<&Pending> = group
            .iter()
            .filter(|p| !taken.contains(&p.hb.host_id))
            .collect();
        let mut why: HashMap<String, (Option<i64>, bool)> = HashMap::new();
        if !refused.is_empty() {
            let ids: Vec<&str> = refused.iter().map(|p| p.hb.host_id.as_str()).collect();
            let kids: Vec<&str> = refused.iter().map(|p| p.hb.key_id.as_str()).collect();
            let rows = link
                .run("reading last_seq", |c| {
                    let (ids, kids) = (&ids, &kids);
                    async move { c.client.query(&c.refused, &[ids, kids]).await }
                })
                .await?;
            for r in &rows {
                why.insert(col(r, 0)?, (col(r, 1)?, col(r, 2)?));
            }
        }
        Ok(group
            .iter()
            .map(|p| {
                if taken.contains(&p.hb.host_id) {
                    return Ok(AcceptOutcome::Accepted);
                }
                match why.get(&p.hb.host_id) {
                    Some((Some(last), true)) if *last >= p.seq => Ok(AcceptOutcome::Stale {
                        last_seq: to_u64(*last),
                    }),
                    Some((_, false)) | Some((None, _)) | None => Ok(AcceptOutcome::Revoked),
                    // Not taken, yet below the committed last_seq with its key enrolled:
                    // never answer a 409 for a heartbeat that is not stored (the agent
                    // would drop it); a retry settles it.
                    Some((Some(_), true)) => Err(StoreError::Unavailable(format!(
                        "host {:?} seq {}: not stored, retry",
                        p.hb.host_id, p.seq
                    ))),
                }
            })
            .collect())
    }
}

/// A writer task: takes every waiting heartbeat, stores them, answers; ends when every
/// store handle is gone.
async fn writer(queue: Arc<Mutex<mpsc::Receiver<Pending>>>, link: Link) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        // The queue's lock is held only while taking a group, so the other writer takes
        // the next group while this one commits.
        let n = queue.lock().await.recv_many(&mut batch, MAX_BATCH).await;
        if n == 0 {
            return;
        }
        let mut rest = std::mem::take(&mut batch);
        // One statement per round, each host at most once per round, in arrival order.
        while !rest.is_empty() {
            let mut seen = HashSet::new();
            let first: Vec<bool> = rest
                .iter()
                .map(|p| seen.insert(p.hb.host_id.clone()))
                .collect();
            let mut group = Vec::with_capacity(rest.len());
            let mut later = Vec::new();
            for (p, first) in rest.into_iter().zip(first) {
                if first {
                    group.push(p);
                } else {
                    later.push(p);
                }
            }
            PgStore::store_group(&link, group).await;
            rest = later;
        }
    }
}

/// Creates or migrates the schema in one transaction (see the module doc); returns the
/// version now in place.
async fn migrate(client: &mut Client, target: &str) -> Result<i32, StoreError> {
    let fail = |e: tokio_postgres::Error| {
        StoreError::Database(format!(
            "migrating the schema on {target}: {}",
            pg::error_chain(&e)
        ))
    };
    let work = async {
        let tx = client.transaction().await.map_err(fail)?;
        tx.query("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(fail)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(fail)?;
        let row = tx
            .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
            .await
            .map_err(fail)?;
        let current: i32 = col(&row, 0)?;
        let newest = MIGRATIONS.last().map_or(0, |m| m.0);
        if current > newest {
            return Err(StoreError::Database(format!(
                "the schema on {target} is version {current}, newer than this vigil knows \
                 ({newest}): upgrade vigil"
            )));
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            tx.batch_execute(sql).await.map_err(fail)?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(fail)?;
            info!(version, "applied schema migration");
        }
        tx.commit().await.map_err(fail)?;
        Ok(newest)
    };
    tokio::time::timeout(QUERY_TIMEOUT, work)
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "migrating the schema on {target}: no answer within {}s",
                QUERY_TIMEOUT.as_secs()
            ))
        })?
}

/// A column, or [`StoreError::Corrupt`] naming it (`Row::get` would panic).
fn col<'a, T: FromSql<'a>>(r: &'a Row, i: usize) -> Result<T, StoreError> {
    r.try_get(i)
        .map_err(|e| StoreError::Corrupt(format!("reading column {i}: {e}")))
}

/// Stored integers were written from `u64`s below 2^63; a negative one (a hand-edited
/// row) reads as 0.
fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn parse_state(s: Option<&str>) -> HostState {
    // Written by this store from a HostState; anything else (a hand-edited row) is
    // shown as not known.
    ALL_STATES
        .into_iter()
        .find(|st| Some(st.as_str()) == s)
        .unwrap_or(HostState::Uncertain)
}

/// The latest heartbeat of a [`VIEW_COLUMNS`] row, `None` if it never sent one.
fn last_heartbeat(r: &Row) -> Result<Option<LastHeartbeat>, StoreError> {
    let Some(received) = col::<Option<i64>>(r, 2)? else {
        return Ok(None);
    };
    let statuses: i16 = col(r, 8)?;
    Ok(Some(LastHeartbeat {
        seq: to_u64(col(r, 1)?),
        received_at_ms: to_u64(received),
        key_id: col::<Option<String>>(r, 3)?.unwrap_or_default(),
        body: Bytes::from(col::<Option<Vec<u8>>>(r, 4)?.unwrap_or_default()),
        summary: Summary {
            state: parse_state(col::<Option<&str>>(r, 5)?),
            kernel: col(r, 6)?,
            image_id: col(r, 7)?,
            check_statuses: u8::try_from(statuses).unwrap_or(0),
        },
    }))
}

/// The same error again, for each request of a group that failed together.
fn same_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
        StoreError::Invalid(m) => StoreError::Invalid(m.clone()),
        StoreError::Locked(m) => StoreError::Locked(m.clone()),
        StoreError::Failed(m) => StoreError::Failed(m.clone()),
        StoreError::ReadOnly => StoreError::ReadOnly,
        other => StoreError::Database(other.to_string()),
    }
}

fn ms_i64(ms: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(ms).map_err(|_| StoreError::Invalid(format!("{what} {ms} is above 2^63-1")))
}

impl Store for PgStore {
    async fn enroll(&self, host_id: &str, key: &PublicKey) -> Result<bool, StoreError> {
        body::valid_host_id(host_id)
            .map_err(|e| StoreError::Invalid(format!("host id {host_id:?}: {e}")))?;
        let now = ms_i64(epoch_ms(SystemTime::now()), "time")?;
        let info = key.info();
        // One statement: the host row (kept forever, with its last_seq) and the key. The
        // foreign key is checked at the end of the statement, after the CTE's insert.
        let n = self
            .inner
            .reads
            .run("enrolling", |c| async move {
                c.client
                    .execute(
                        "WITH h AS (INSERT INTO hosts (host_id) VALUES ($1) \
                                    ON CONFLICT DO NOTHING) \
                         INSERT INTO host_keys (host_id, key_id, public_key, enrolled_ms) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                        &[&host_id, &info.key_id, &info.public_key_b64, &now],
                    )
                    .await
            })
            .await?;
        Ok(n > 0)
    }

    async fn revoke(&self, host_id: &str, key_id: Option<&str>) -> Result<usize, StoreError> {
        let n = self
            .inner
            .reads
            .run("revoking", |c| async move {
                c.client
                    .execute(
                        "DELETE FROM host_keys WHERE host_id = $1 \
                         AND ($2::text IS NULL OR key_id = $2)",
                        &[&host_id, &key_id],
                    )
                    .await
            })
            .await?;
        self.forget_keys(host_id);
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn keys(&self, host_id: &str, want: Option<&str>) -> Result<Vec<PublicKey>, StoreError> {
        if let (Some(cached), Some(kid)) = (self.cached_keys(host_id), want) {
            if cached.iter().any(|k| k.info().key_id == kid) {
                return Ok(cached.to_vec());
            }
        }
        let rows = self
            .inner
            .reads
            .run("reading keys", |c| async move {
                c.client.query(&c.keys, &[&host_id]).await
            })
            .await?;
        let keys = rows
            .iter()
            .map(|r| {
                let text: &str = col(r, 0)?;
                PublicKey::from_b64(text)
                    .map_err(|e| StoreError::Corrupt(format!("host_keys row of {host_id:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut cache = self
            .inner
            .keys
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if keys.is_empty() {
            cache.remove(host_id);
        } else {
            cache.insert(host_id.to_string(), Arc::new(keys.clone()));
        }
        Ok(keys)
    }

    async fn accept(&self, hb: Incoming) -> Result<AcceptOutcome, StoreError> {
        let tx = self.inner.tx.as_ref().ok_or(StoreError::ReadOnly)?;
        let seq = ms_i64(hb.seq, "seq")?;
        let received_ms = ms_i64(hb.received_at_ms, "received_at")?;
        let host = hb.host_id.clone();
        let (answer, rx) = oneshot::channel();
        tx.send(Pending {
            hb,
            seq,
            received_ms,
            answer,
        })
        .await
        .map_err(|_| StoreError::Failed("the store writers are gone".into()))?;
        let outcome = rx
            .await
            .map_err(|_| StoreError::Failed("the store writers are gone".into()))??;
        if outcome == AcceptOutcome::Revoked {
            self.forget_keys(&host);
        }
        Ok(outcome)
    }

    async fn host(&self, host_id: &str) -> Result<Option<HostView>, StoreError> {
        Ok(self.views(&[host_id.to_string()]).await?.pop())
    }

    async fn briefs(&self) -> Result<Vec<HostBrief>, StoreError> {
        let rows = self
            .inner
            .background
            .run("reading host states", |c| async move {
                c.client
                    .query(
                        "SELECT h.host_id::text, h.last_seq, h.received_ms, h.state FROM hosts h \
                         WHERE EXISTS (SELECT 1 FROM host_keys k WHERE k.host_id = h.host_id) \
                         ORDER BY h.host_id",
                        &[],
                    )
                    .await
            })
            .await?;
        rows.iter()
            .map(|r| {
                let last = match col::<Option<i64>>(r, 2)? {
                    Some(at) => Some((
                        to_u64(col(r, 1)?),
                        to_u64(at),
                        parse_state(col::<Option<&str>>(r, 3)?),
                    )),
                    None => None,
                };
                Ok(HostBrief {
                    host_id: col(r, 0)?,
                    last,
                })
            })
            .collect()
    }

    async fn hosts(&self, filter: &HostFilter, page: &Page) -> Result<Vec<HostView>, StoreError> {
        // The state and check-status filters run in SQL; the GLOBs (kernel, image) in
        // Rust with the same code as the file store, over bodiless rows read a chunk at a
        // time; then the full rows of the page.
        let now = ms_i64(filter.now_ms, "time")?;
        let overdue = ms_i64(super::millis(filter.overdue_after), "overdue_after")?;
        let state = filter.state.map(HostState::as_str);
        let bit = i16::from(filter.check_status.unwrap_or(0));
        let limit = page.limit.max(1);
        let chunk = LIST_CHUNK.max(i64::try_from(limit).unwrap_or(LIST_CHUNK).min(10_000));
        let mut after = page.after.clone().unwrap_or_default();
        let mut ids = Vec::new();
        let sql = "SELECT h.host_id::text, h.last_seq, h.received_ms, NULL::text, NULL::bytea, \
                   h.state, h.kernel, h.image_id, h.check_statuses FROM hosts h \
                   WHERE h.host_id > $1 \
                   AND EXISTS (SELECT 1 FROM host_keys k WHERE k.host_id = h.host_id) \
                   AND ($2::text IS NULL OR (CASE WHEN h.received_ms IS NULL \
                        OR $3::int8 - h.received_ms > $4::int8 THEN 'uncertain' \
                        ELSE h.state END) = $2) \
                   AND ($5::int2 = 0 OR h.check_statuses & $5 <> 0) \
                   ORDER BY h.host_id LIMIT $6";
        loop {
            let rows = self
                .inner
                .reads
                .run("listing hosts", |c| {
                    let after = &after;
                    async move {
                        c.client
                            .query(sql, &[after, &state, &now, &overdue, &bit, &chunk])
                            .await
                    }
                })
                .await?;
            for r in &rows {
                let view = HostView {
                    host_id: col(r, 0)?,
                    keys: Vec::new(),
                    last: last_heartbeat(r)?,
                };
                if filter.matches(&view) {
                    ids.push(view.host_id.clone());
                    if ids.len() == limit {
                        break;
                    }
                }
                after = view.host_id;
            }
            if ids.len() == limit || (rows.len() as i64) < chunk {
                break;
            }
        }
        self.views(&ids).await
    }

    async fn prune(&self, retention: Duration, now: SystemTime) -> Result<PruneStats, StoreError> {
        let cutoff = ms_i64(
            epoch_ms(now.checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH)),
            "time",
        )?;
        let mut stats = PruneStats::default();
        for _ in 0..PRUNE_ROUNDS {
            // The latest heartbeat of each host (seq = last_seq) is never deleted.
            let n = self
                .inner
                .background
                .run("pruning history", |c| async move {
                    c.client
                        .execute(
                            "DELETE FROM heartbeats WHERE ctid = ANY(ARRAY(
                                 SELECT hb.ctid FROM heartbeats hb
                                   JOIN hosts h ON h.host_id = hb.host_id
                                  WHERE hb.received_ms < $1 AND hb.seq < h.last_seq
                                  LIMIT $2))",
                            &[&cutoff, &PRUNE_CHUNK],
                        )
                        .await
                })
                .await?;
            stats.rows_removed += n;
            if n < PRUNE_CHUNK as u64 {
                break;
            }
        }
        Ok(stats)
    }

    async fn enroll_many(&self, keys: &[(String, PublicKey)]) -> Result<BulkEnrolled, StoreError> {
        for (host, _) in keys {
            body::valid_host_id(host)
                .map_err(|e| StoreError::Invalid(format!("host id {host:?}: {e}")))?;
        }
        // Minutes at most for millions of keys; the server's statement timeout bounds
        // each chunk.
        self.enroll_many_inner(keys).await
    }

    async fn notified(&self) -> Result<HashMap<String, HostState>, StoreError> {
        let rows = self
            .inner
            .background
            .run("reading notified states", |c| async move {
                c.client
                    .query(
                        "SELECT host_id::text, notified_state FROM hosts \
                         WHERE notified_state IS NOT NULL",
                        &[],
                    )
                    .await
            })
            .await?;
        rows.iter()
            .map(|r| Ok((col(r, 0)?, parse_state(col::<Option<&str>>(r, 1)?))))
            .collect()
    }

    async fn baseline_notified(
        &self,
        states: Vec<(String, HostState)>,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let at = ms_i64(at_ms, "time")?;
        for chunk in states.chunks(BULK_CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(|(h, _)| h.as_str()).collect();
            let sts: Vec<&str> = chunk.iter().map(|(_, s)| s.as_str()).collect();
            self.inner
                .background
                .run("recording notified states", |c| {
                    let (ids, sts) = (&ids, &sts);
                    async move {
                        c.client
                            .execute(
                                "UPDATE hosts h SET notified_state = t.s, notified_ms = $3 \
                                 FROM unnest($1::text[], $2::text[]) AS t(host_id, s) \
                                 WHERE h.host_id = t.host_id AND h.notified_state IS NULL",
                                &[ids, sts, &at],
                            )
                            .await
                    }
                })
                .await?;
        }
        Ok(())
    }

    async fn claim_notified(
        &self,
        host_id: &str,
        state: HostState,
        at_ms: u64,
    ) -> Result<bool, StoreError> {
        let at = ms_i64(at_ms, "time")?;
        let n = self
            .inner
            .background
            .run("claiming a webhook call", |c| async move {
                c.client
                    .execute(
                        "UPDATE hosts SET notified_state = $2, notified_ms = $3 \
                         WHERE host_id = $1 AND notified_state IS DISTINCT FROM $2 \
                         AND coalesce(notified_ms, 0) < $3",
                        &[&host_id, &state.as_str(), &at],
                    )
                    .await
            })
            .await?;
        Ok(n > 0)
    }

    async fn release_notified(
        &self,
        host_id: &str,
        claimed: HostState,
        at_ms: u64,
        previous: HostState,
    ) -> Result<(), StoreError> {
        let at = ms_i64(at_ms, "time")?;
        self.inner
            .background
            .run("giving back a webhook call", |c| async move {
                c.client
                    .execute(
                        "UPDATE hosts SET notified_state = $4 \
                         WHERE host_id = $1 AND notified_state = $2 AND notified_ms = $3",
                        &[&host_id, &claimed.as_str(), &at, &previous.as_str()],
                    )
                    .await
            })
            .await?;
        Ok(())
    }

    async fn flush_notified(&self) -> Result<(), StoreError> {
        // Every claim is committed when it is made.
        Ok(())
    }
}

impl PgStore {
    async fn enroll_many_inner(
        &self,
        keys: &[(String, PublicKey)],
    ) -> Result<BulkEnrolled, StoreError> {
        let connector = &self.inner.reads.connector;
        let target = connector.target().to_string();
        let fail = |e: tokio_postgres::Error| {
            StoreError::Database(format!("enrolling on {target}: {}", pg::error_chain(&e)))
        };
        let now = ms_i64(epoch_ms(SystemTime::now()), "time")?;
        // Its own session: a transaction must not share the pipelined one.
        let mut client = connector.session().await.map_err(StoreError::Unavailable)?;
        let tx = client.transaction().await.map_err(fail)?;
        let mut hosts = HashSet::new();
        let mut new = 0usize;
        for chunk in keys.chunks(BULK_CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(|(h, _)| h.as_str()).collect();
            let kids: Vec<&str> = chunk
                .iter()
                .map(|(_, k)| k.info().key_id.as_str())
                .collect();
            let pubs: Vec<&str> = chunk
                .iter()
                .map(|(_, k)| k.info().public_key_b64.as_str())
                .collect();
            // One statement per chunk: the host rows, then the keys (the foreign key is
            // checked at the end of the statement, after the CTE's insert).
            let rows = tx
                .query(
                    "WITH t AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) \
                                AS t(host_id, key_id, public_key)), \
                          h AS (INSERT INTO hosts (host_id) SELECT DISTINCT host_id FROM t \
                                ON CONFLICT DO NOTHING) \
                     INSERT INTO host_keys (host_id, key_id, public_key, enrolled_ms) \
                     SELECT DISTINCT ON (host_id, key_id) host_id, key_id, public_key, $4 \
                       FROM t ON CONFLICT DO NOTHING RETURNING host_id::text",
                    &[&ids, &kids, &pubs, &now],
                )
                .await
                .map_err(fail)?;
            new += rows.len();
            for r in &rows {
                hosts.insert(col::<String>(r, 0)?);
            }
        }
        tx.commit().await.map_err(fail)?;
        Ok(BulkEnrolled {
            keys: new,
            hosts: hosts.len(),
            already: keys.len() - new,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        for (i, (v, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(usize::try_from(*v).unwrap(), i + 1);
        }
    }

    #[test]
    fn stored_states_read_back_and_unknown_ones_are_uncertain() {
        for s in ALL_STATES {
            assert_eq!(parse_state(Some(s.as_str())), s);
        }
        assert_eq!(parse_state(Some("asleep")), HostState::Uncertain);
        assert_eq!(parse_state(None), HostState::Uncertain);
    }
}
