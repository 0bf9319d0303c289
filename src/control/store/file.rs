//! The embedded file store: enrolment and heartbeats under `state_dir`, crash-safe.
//!
//! This doc is the design; the code follows it.
//!
//! # Directory layout (`state_dir`, mode 0700)
//! - `lock`: `flock(LOCK_EX)` by the one receiver that writes heartbeats here; a second
//!   receiver on the same directory fails at start instead of interleaving records;
//! - `enrollment.log`: the enrolment journal, shared with `vigil control enroll` and
//!   `revoke` under its own `flock` ([`super::enrollment`] explains why and how);
//! - `wal-<gen:020>.log`: heartbeat segments, append-only, one generation each;
//! - `snapshot-<gen:020>.snap`: the latest heartbeat of every host as of the start of
//!   segment `generation`, i.e. everything in the segments before it.
//!
//! # Formats, version 1 (little-endian; frames as in [`super::frame`])
//! A segment starts with 16 bytes: magic `VIGWAL`, `u16` version, `u64` generation. Then one
//! frame per accepted heartbeat, payload: `kind = 1: u8`, `received_at_ms: u64`,
//! `seq: u64`, host id (`u16` length + bytes), key id (`u8` length + bytes), then the body
//! exactly as received. A snapshot starts with magic `VIGSNP`, `u16` version, `u64` generation,
//! then one frame per host (the same payload with `kind = 2`), then an end frame
//! (`kind = 3`, `count: u64`), so a snapshot cut short is told from a complete one. A
//! reader takes every version up to its own and refuses a newer one.
//!
//! # Accepting: group commit on one writer thread
//! [`Store::accept`] sends the heartbeat to the writer thread and waits for its answer.
//! The writer takes every request waiting at that moment (up to [`MAX_BATCH`]), checks
//! each `seq` against the host's last one (including those earlier in the same batch),
//! encodes the accepted ones into one buffer, writes it with one positioned `write_all`
//! and calls `fdatasync` once; only then does it publish the new latest heartbeats to
//! readers and answer. One fsync thus serves every request that arrived while the
//! previous one ran: that is how the store keeps up with 10,000 accepts a second on a
//! disk that does a few hundred fsyncs. The writer is the only place that decides on
//! `seq`, so two accepts of one (host, seq) cannot both succeed. A 409 is also answered
//! after the batch is durable, so it never rests on a record that could still be lost.
//!
//! A failed write or fsync answers an error to the whole batch and cuts the segment back
//! to where the batch began; if even that fails, the store stops accepting
//! ([`StoreError::Failed`]) until a restart recovers from the files. After `fsync` fails
//! the page cache cannot be trusted to say what reached the disk, so guessing on is wrong.
//!
//! # Opening and recovery
//! Opening loads the newest snapshot (a damaged one is refused: it is the only copy of
//! the `seq` high-water marks its segments are gone for), then replays the segments from
//! its generation on, in order. A frame cut short or failing its checksum at the end of
//! the newest segment is the torn write of a crash: it was never answered 200 (the
//! answer waits for the fsync of the whole batch), so it is cut off. Damage inside an
//! older segment loses the rest of that segment: logged as an error, counted in
//! [`FileStore::corrupt_records`], and the replay goes on with the next segment. A
//! segment of a newer version stops the open. Every open starts a new segment, so
//! records are never appended after bytes a crash left behind.
//!
//! # Snapshots, retention and pruning
//! [`Store::prune`] (the receiver calls it every few seconds) asks the writer to start a
//! new segment and hand over the latest heartbeats as of that point, writes them as a
//! snapshot (temp file, fsync, rename, fsync of the directory), then deletes older
//! snapshots and the segments before the snapshot's generation whose newest record is
//! older than `now - retention` (the file's mtime, which is the time of its last
//! append). It snapshots when such a segment is not yet covered, or when more than
//! [`Options::snapshot_every`] segments would have to be replayed at the next open.
//! History is therefore kept at segment granularity ([`Options::segment_max`]); the
//! latest heartbeat of each host lives on in the snapshot. Segments between the snapshot
//! and retention are history only: kept on disk, never replayed.
//!
//! # Webhook bookkeeping
//! `notified.json` holds the derived state last notified to the webhook per host
//! (`{"v": 1, "hosts": {ID: STATE}}`): kept in memory, and replaced atomically (temp file,
//! fsync, rename, fsync of the directory: [`crate::durable::write_atomic`]) by
//! [`Store::flush_notified`] only when it changed, which the state tracker calls once a
//! round, so a burst of changes is one write. A missing file is an empty map; a file this
//! build cannot read is logged and treated as empty (the cost is one round that learns
//! states without calls, never a refused start).
//!
//! # Readers
//! The latest heartbeat of each host is held in memory (the body as [`Bytes`], shared
//! with snapshots without copying). [`FileStore::open_read_only`] (the CLI's `hosts`)
//! replays the files without taking `lock` and without cutting anything; a segment that
//! vanishes under it (a prune) makes it start over.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use nix::fcntl::{Flock, FlockArg};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::enrollment::Journal;
use super::frame::{self, Next, Reader};
use super::{
    AcceptOutcome, BulkEnrolled, HostBrief, HostFilter, HostView, Incoming, LastHeartbeat, Page,
    PruneStats, Store, StoreError, epoch_ms,
};
use crate::control::body;
use crate::heartbeat::keys::PublicKey;
use crate::lifecycle::HostState;

/// The format version written (segments and snapshots).
pub const FORMAT_VERSION: u16 = 1;
/// Most requests committed by one fsync.
pub const MAX_BATCH: usize = 4096;

const WAL_MAGIC: &[u8; 6] = b"VIGWAL";
const SNAP_MAGIC: &[u8; 6] = b"VIGSNP";
const FILE_HEADER_LEN: usize = 16;
const KIND_WAL: u8 = 1;
const KIND_SNAP: u8 = 2;
const KIND_END: u8 = 3;
const LOCK_FILE: &str = "lock";
/// The webhook's last notified state per host (see the module doc).
pub const NOTIFIED_FILE: &str = "notified.json";
const NOTIFIED_VERSION: u32 = 1;

/// `notified.json` as written.
#[derive(serde::Serialize, serde::Deserialize)]
struct NotifiedDoc {
    v: u32,
    hosts: BTreeMap<String, HostState>,
}

/// The notified states in memory.
#[derive(Default)]
struct Notified {
    /// `None` until read from the file.
    map: Option<HashMap<String, HostState>>,
    /// Changed since the last write of the file.
    dirty: bool,
}

/// Sizes that tests shrink.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// A segment is sealed and a new one started past this many bytes.
    pub segment_max: u64,
    /// Snapshot when more segments than this would be replayed at the next open.
    pub snapshot_every: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_max: 64 << 20,
            snapshot_every: 8,
        }
    }
}

type Latest = HashMap<String, Arc<LastHeartbeat>>;

/// State shared by the handle and the writer thread.
struct Shared {
    dir: PathBuf,
    /// The latest heartbeat per host: written by the writer thread only (after fsync),
    /// read by every request. A std lock: no `.await` while held, short sections.
    latest: RwLock<Latest>,
    /// The generation of the segment being written.
    active_gen: AtomicU64,
    /// Records skipped as damaged at open.
    corrupt: AtomicU64,
}

/// A request to the writer thread.
enum Op {
    Accept(Incoming, oneshot::Sender<Result<AcceptOutcome, StoreError>>),
    /// Start a new segment and hand over the latest heartbeats as of its start.
    Rotate(oneshot::Sender<Result<(u64, Latest), StoreError>>),
}

/// The file store. Cheap to clone (a handle on shared state).
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    journal: Journal,
    /// To the writer thread; `None` when open for reading only. Dropping the last handle
    /// closes the channel, and the writer thread ends after answering what it holds.
    tx: Option<mpsc::Sender<Op>>,
    /// Serializes prunes (one snapshot at a time).
    maint: Mutex<()>,
    opts: Options,
    /// Held for the life of the store: one writing receiver per directory.
    _lock: Option<Flock<File>>,
    /// The webhook's notified states. A std lock: short sections, never across `.await`
    /// (the file is written after the lock is released).
    notified: Mutex<Notified>,
}

impl FileStore {
    /// Opens the store in `dir` for a receiver: takes the directory's lock, recovers,
    /// starts a new segment and the writer thread.
    ///
    /// # Errors
    /// [`StoreError::Locked`] when another receiver has it, [`StoreError::Corrupt`] for
    /// damage that cannot be skipped, [`StoreError::Io`] otherwise.
    pub fn open(dir: &Path, opts: Options) -> Result<FileStore, StoreError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(StoreError::io(format!("creating {}", dir.display())))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(StoreError::io(format!("opening {}", lock_path.display())))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| {
            StoreError::Locked(format!(
                "{} is in use by another vigil control (one receiver per state_dir; \
                 use a PostgreSQL store for several)",
                dir.display()
            ))
        })?;
        remove_crash_leftovers(dir);
        let journal = Journal::open(dir)?;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            latest: RwLock::new(Latest::new()),
            active_gen: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
        });
        let loaded = load(&shared, true)?;
        let generation = loaded.max_gen + 1;
        let writer = Writer::create(shared.clone(), generation, opts)?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("vigil-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(StoreError::io("starting the store writer thread"))?;
        info!(
            dir = %dir.display(),
            hosts = shared.latest.read().unwrap_or_else(PoisonError::into_inner).len(),
            segment = generation,
            "file store open"
        );
        Ok(FileStore {
            inner: Arc::new(Inner {
                shared,
                journal,
                tx: Some(tx),
                maint: Mutex::new(()),
                opts,
                _lock: Some(lock),
                notified: Mutex::new(Notified::default()),
            }),
        })
    }

    /// Opens the store in `dir` to read and to change enrolment, alongside a running
    /// receiver or without one: no lock, nothing cut, no writer; `accept` and `prune`
    /// answer [`StoreError::ReadOnly`]. Without `heartbeats` the segments are not read
    /// (enrolment changes need only the journal), and hosts show no heartbeat.
    ///
    /// # Errors
    /// As [`FileStore::open`], but never `Locked`.
    pub fn open_read_only(dir: &Path, heartbeats: bool) -> Result<FileStore, StoreError> {
        if !dir.is_dir() {
            return Err(StoreError::Io {
                context: format!("opening the store {}", dir.display()),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        let journal = Journal::open(dir)?;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            latest: RwLock::new(Latest::new()),
            active_gen: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
        });
        // A prune of the running receiver may delete a segment between the listing and
        // the read: start over a few times.
        let mut tries = 0;
        while heartbeats && tries <= 5 {
            match load(&shared, false) {
                Err(StoreError::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound && tries < 5 =>
                {
                    tries += 1;
                    shared
                        .latest
                        .write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clear();
                }
                Err(e) => return Err(e),
                Ok(_) => break,
            }
        }
        Ok(FileStore {
            inner: Arc::new(Inner {
                shared,
                journal,
                tx: None,
                maint: Mutex::new(()),
                opts: Options::default(),
                _lock: None,
                notified: Mutex::new(Notified::default()),
            }),
        })
    }

    /// Runs `f` on the notified map, reading the file first if it was not yet.
    fn with_notified<T>(
        &self,
        f: impl FnOnce(&mut HashMap<String, HostState>, &mut bool) -> T,
    ) -> T {
        let mut n = self
            .inner
            .notified
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = &mut *n;
        let map = n
            .map
            .get_or_insert_with(|| read_notified(&self.inner.shared.dir));
        f(map, &mut n.dirty)
    }

    /// Records skipped as damaged when the store was opened.
    pub fn corrupt_records(&self) -> u64 {
        self.inner.shared.corrupt.load(Ordering::Relaxed)
    }

    fn view(&self, host_id: &str, keys: &[super::EnrolledKey]) -> HostView {
        let last = self
            .inner
            .shared
            .latest
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(host_id)
            .map(|l| (**l).clone());
        HostView {
            host_id: host_id.to_string(),
            keys: keys.to_vec(),
            last,
        }
    }

    fn prune_blocking(
        &self,
        retention: Duration,
        now: SystemTime,
    ) -> Result<PruneStats, StoreError> {
        let tx = self.inner.tx.as_ref().ok_or(StoreError::ReadOnly)?;
        let _one_at_a_time = self
            .inner
            .maint
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let dir = &self.inner.shared.dir;
        let cutoff = now.checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
        let files = list(dir)?;
        let active = self.inner.shared.active_gen.load(Ordering::Acquire);
        let mut snap_gen = files.snapshots.last().copied().unwrap_or(0);
        let expired: Vec<&Segment> = files
            .segments
            .iter()
            .filter(|s| s.generation < active && s.mtime < cutoff)
            .collect();
        let uncovered = expired.iter().any(|s| s.generation >= snap_gen);
        if uncovered || active.saturating_sub(snap_gen) > self.inner.opts.snapshot_every {
            let (rtx, rrx) = oneshot::channel();
            tx.send(Op::Rotate(rtx))
                .map_err(|_| StoreError::Failed("the writer thread is gone".into()))?;
            let (generation, latest) = rrx
                .blocking_recv()
                .map_err(|_| StoreError::Failed("the writer thread is gone".into()))??;
            write_snapshot(dir, generation, &latest)?;
            snap_gen = generation;
            for old in files.snapshots.iter().filter(|g| **g < generation) {
                remove(&snapshot_path(dir, *old))?;
            }
        }
        let mut stats = PruneStats::default();
        for s in expired.iter().filter(|s| s.generation < snap_gen) {
            remove(&s.path)?;
            stats.files_removed += 1;
            stats.bytes_removed += s.len;
        }
        if stats.files_removed > 0 || snap_gen != files.snapshots.last().copied().unwrap_or(0) {
            sync_dir(dir)?;
        }
        Ok(stats)
    }
}

impl Store for FileStore {
    async fn enroll(&self, host_id: &str, key: &PublicKey) -> Result<bool, StoreError> {
        body::valid_host_id(host_id)
            .map_err(|e| StoreError::Invalid(format!("host id {host_id:?}: {e}")))?;
        let (s, host, key) = (self.clone(), host_id.to_string(), key.clone());
        blocking(move || {
            s.inner
                .journal
                .enroll(&host, &key, epoch_ms(SystemTime::now()))
        })
        .await
    }

    async fn revoke(&self, host_id: &str, key_id: Option<&str>) -> Result<usize, StoreError> {
        let (s, host, kid) = (self.clone(), host_id.to_string(), key_id.map(String::from));
        blocking(move || {
            s.inner
                .journal
                .revoke(&host, kid.as_deref(), epoch_ms(SystemTime::now()))
        })
        .await
    }

    async fn keys(&self, host_id: &str, _want: Option<&str>) -> Result<Vec<PublicKey>, StoreError> {
        // An fstat (and, when the journal grew, a short read): cheap enough inline.
        self.inner.journal.read(|m| {
            m.get(host_id)
                .map(|ks| ks.iter().map(|k| k.key.clone()).collect())
                .unwrap_or_default()
        })
    }

    async fn accept(&self, hb: Incoming) -> Result<AcceptOutcome, StoreError> {
        let tx = self.inner.tx.as_ref().ok_or(StoreError::ReadOnly)?;
        let (rtx, rrx) = oneshot::channel();
        tx.send(Op::Accept(hb, rtx))
            .map_err(|_| StoreError::Failed("the writer thread is gone".into()))?;
        rrx.await
            .map_err(|_| StoreError::Failed("the writer thread is gone".into()))?
    }

    async fn host(&self, host_id: &str) -> Result<Option<HostView>, StoreError> {
        let keys = self.inner.journal.read(|m| m.get(host_id).cloned())?;
        Ok(keys.map(|k| self.view(host_id, &k)))
    }

    async fn briefs(&self) -> Result<Vec<HostBrief>, StoreError> {
        self.inner.journal.read(|m| {
            // One read lock for the whole walk, and no body, key or summary copied: at
            // 100,000 hosts this runs every second.
            let latest = self
                .inner
                .shared
                .latest
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            m.keys()
                .map(|id| HostBrief {
                    host_id: id.clone(),
                    last: latest
                        .get(id)
                        .map(|l| (l.seq, l.received_at_ms, l.summary.state)),
                })
                .collect()
        })
    }

    async fn hosts(&self, filter: &HostFilter, page: &Page) -> Result<Vec<HostView>, StoreError> {
        use std::ops::Bound;
        self.inner.journal.read(|m| {
            let start = match &page.after {
                Some(a) => Bound::Excluded(a.clone()),
                None => Bound::Unbounded,
            };
            m.range((start, Bound::Unbounded))
                .map(|(id, keys)| self.view(id, keys))
                .filter(|v| filter.matches(v))
                .take(page.limit)
                .collect()
        })
    }

    async fn prune(&self, retention: Duration, now: SystemTime) -> Result<PruneStats, StoreError> {
        let s = self.clone();
        blocking(move || s.prune_blocking(retention, now)).await
    }

    async fn enroll_many(&self, keys: &[(String, PublicKey)]) -> Result<BulkEnrolled, StoreError> {
        for (host, _) in keys {
            body::valid_host_id(host)
                .map_err(|e| StoreError::Invalid(format!("host id {host:?}: {e}")))?;
        }
        // A copy for the blocking thread: a few MB at 100,000 keys, beside a flush.
        let (s, keys) = (self.clone(), keys.to_vec());
        blocking(move || {
            let (new, already) = s
                .inner
                .journal
                .enroll_many(&keys, epoch_ms(SystemTime::now()))?;
            Ok(BulkEnrolled {
                keys: new.len(),
                hosts: new.iter().collect::<HashSet<_>>().len(),
                already,
            })
        })
        .await
    }

    async fn notified(&self) -> Result<HashMap<String, HostState>, StoreError> {
        let s = self.clone();
        blocking(move || Ok(s.with_notified(|m, _| m.clone()))).await
    }

    async fn baseline_notified(
        &self,
        states: Vec<(String, HostState)>,
        _at_ms: u64,
    ) -> Result<(), StoreError> {
        self.with_notified(|m, dirty| {
            for (host, state) in states {
                if let std::collections::hash_map::Entry::Vacant(e) = m.entry(host) {
                    e.insert(state);
                    *dirty = true;
                }
            }
        });
        Ok(())
    }

    async fn claim_notified(
        &self,
        host_id: &str,
        state: HostState,
        _at_ms: u64,
    ) -> Result<bool, StoreError> {
        // One receiver per directory: nobody else claims, only an equal state is "done".
        Ok(self.with_notified(|m, dirty| {
            if m.get(host_id) == Some(&state) {
                return false;
            }
            m.insert(host_id.to_string(), state);
            *dirty = true;
            true
        }))
    }

    async fn release_notified(
        &self,
        host_id: &str,
        claimed: HostState,
        _at_ms: u64,
        previous: HostState,
    ) -> Result<(), StoreError> {
        self.with_notified(|m, dirty| {
            if m.get(host_id) == Some(&claimed) {
                m.insert(host_id.to_string(), previous);
                *dirty = true;
            }
        });
        Ok(())
    }

    async fn flush_notified(&self) -> Result<(), StoreError> {
        let s = self.clone();
        blocking(move || s.flush_notified_blocking()).await
    }
}

impl FileStore {
    fn flush_notified_blocking(&self) -> Result<(), StoreError> {
        let path = self.inner.shared.dir.join(NOTIFIED_FILE);
        // Serialized under the lock (a few ms at 100,000 hosts), written after it.
        let bytes = {
            let mut n = self
                .inner
                .notified
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let (Some(map), true) = (&n.map, n.dirty) else {
                return Ok(());
            };
            let doc = NotifiedDoc {
                v: NOTIFIED_VERSION,
                hosts: map.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            };
            let bytes = serde_json::to_vec(&doc)
                .map_err(|e| StoreError::Failed(format!("encoding {}: {e}", path.display())))?;
            n.dirty = false;
            bytes
        };
        crate::durable::write_atomic(&path, &bytes).map_err(|e| {
            // Written again at the next flush.
            self.inner
                .notified
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .dirty = true;
            StoreError::Io {
                context: format!("writing {}", path.display()),
                source: e,
            }
        })
    }
}

/// The notified states in `dir`'s file; empty when there is none or it cannot be read
/// (logged: see the module doc for why that is not fatal).
fn read_notified(dir: &Path) -> HashMap<String, HostState> {
    let path = dir.join(NOTIFIED_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return HashMap::new(),
        Err(e) => {
            error!(file = %path.display(), error = %e, "cannot read the webhook's notified states; starting from none");
            return HashMap::new();
        }
    };
    match serde_json::from_slice::<NotifiedDoc>(&bytes) {
        Ok(doc) if doc.v <= NOTIFIED_VERSION => doc.hosts.into_iter().collect(),
        Ok(doc) => {
            error!(file = %path.display(), version = doc.v, "the webhook's notified states are of a newer version; starting from none");
            HashMap::new()
        }
        Err(e) => {
            error!(file = %path.display(), error = %e, "the webhook's notified states are damaged; starting from none");
            HashMap::new()
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Failed(format!("store task: {e}")))?
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    file: File,
    generation: u64,
    len: u64,
    opts: Options,
    /// Set after a write error that could not be undone.
    failed: Option<String>,
}

impl Writer {
    fn create(shared: Arc<Shared>, generation: u64, opts: Options) -> Result<Writer, StoreError> {
        let file = new_segment(&shared.dir, generation)?;
        shared.active_gen.store(generation, Ordering::Release);
        Ok(Writer {
            shared,
            file,
            generation,
            len: FILE_HEADER_LEN as u64,
            opts,
            failed: None,
        })
    }

    fn run(mut self, rx: mpsc::Receiver<Op>) {
        let mut batch = Vec::with_capacity(64);
        let mut buf = Vec::with_capacity(1 << 20);
        // Ends when every handle is dropped and the queue is empty.
        while let Ok(first) = rx.recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.commit(&mut batch, &mut buf);
        }
    }

    fn commit(&mut self, batch: &mut Vec<Op>, buf: &mut Vec<u8>) {
        buf.clear();
        let mut accepted: Vec<(Incoming, oneshot::Sender<_>)> = Vec::new();
        let mut stale: Vec<(u64, oneshot::Sender<_>)> = Vec::new();
        let mut rotations = Vec::new();
        {
            let latest = self
                .shared
                .latest
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            let mut pending: HashMap<&str, u64> = HashMap::new();
            // Split borrows: `pending` borrows host ids of `accepted`'s heartbeats, which
            // are moved only after this block; collect decisions by index first.
            let mut decisions = Vec::with_capacity(batch.len());
            for op in batch.iter() {
                if let Op::Accept(hb, _) = op {
                    let last = pending
                        .get(hb.host_id.as_str())
                        .copied()
                        .or_else(|| latest.get(&hb.host_id).map(|l| l.seq))
                        .unwrap_or(0);
                    if hb.seq <= last {
                        decisions.push(Some(last));
                    } else {
                        pending.insert(hb.host_id.as_str(), hb.seq);
                        encode_record(
                            buf,
                            KIND_WAL,
                            &hb.host_id,
                            hb.seq,
                            hb.received_at_ms,
                            &hb.key_id,
                            &hb.body,
                        );
                        decisions.push(None);
                    }
                }
            }
            drop(pending);
            let mut d = decisions.into_iter();
            for op in batch.drain(..) {
                match op {
                    Op::Accept(hb, tx) => match d.next().flatten() {
                        Some(last) => stale.push((last, tx)),
                        None => accepted.push((hb, tx)),
                    },
                    Op::Rotate(tx) => rotations.push(tx),
                }
            }
        }
        let result = match &self.failed {
            Some(why) => Err(why.clone()),
            None if buf.is_empty() => Ok(()),
            None => self.write(buf),
        };
        match result {
            Ok(()) => {
                if !accepted.is_empty() {
                    let mut latest = self
                        .shared
                        .latest
                        .write()
                        .unwrap_or_else(PoisonError::into_inner);
                    for (hb, _) in &accepted {
                        latest.insert(
                            hb.host_id.clone(),
                            Arc::new(LastHeartbeat {
                                seq: hb.seq,
                                received_at_ms: hb.received_at_ms,
                                key_id: hb.key_id.clone(),
                                body: hb.body.clone(),
                                summary: hb.summary.clone(),
                            }),
                        );
                    }
                }
                for (_, tx) in accepted {
                    // The requester may have gone (client disconnected): the heartbeat is
                    // stored all the same, and its retry will get a 409.
                    let _ = tx.send(Ok(AcceptOutcome::Accepted));
                }
                for (last_seq, tx) in stale {
                    let _ = tx.send(Ok(AcceptOutcome::Stale { last_seq }));
                }
            }
            Err(why) => {
                for (_, tx) in accepted {
                    let _ = tx.send(Err(StoreError::Failed(why.clone())));
                }
                // A 409 decided against a record of this failed batch would be wrong.
                for (_, tx) in stale {
                    let _ = tx.send(Err(StoreError::Failed(why.clone())));
                }
            }
        }
        if self.failed.is_none() && self.len > self.opts.segment_max {
            // A failure is logged by `rotate`; the segment grows on and the next batch
            // tries again.
            let _ = self.rotate();
        }
        for tx in rotations {
            let r = match &self.failed {
                Some(why) => Err(StoreError::Failed(why.clone())),
                None => self.rotate().map(|()| {
                    let latest = self
                        .shared
                        .latest
                        .read()
                        .unwrap_or_else(PoisonError::into_inner);
                    (self.generation, latest.clone())
                }),
            };
            let _ = tx.send(r);
        }
    }

    /// Writes and fsyncs `buf` at the end of the segment; on failure cuts it back off, or
    /// stops the store if that fails too.
    fn write(&mut self, buf: &[u8]) -> Result<(), String> {
        let path = segment_path(&self.shared.dir, self.generation);
        match self
            .file
            .write_all_at(buf, self.len)
            .and_then(|()| self.file.sync_data())
        {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                let why = format!("writing {}: {e}", path.display());
                error!(error = %e, file = %path.display(), "heartbeat batch not stored");
                if let Err(e2) = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.sync_data())
                {
                    let stop = format!("{why}; cutting the batch off failed too: {e2}");
                    error!(error = %e2, "store stops accepting until a restart");
                    self.failed = Some(stop.clone());
                    return Err(stop);
                }
                Err(why)
            }
        }
    }

    /// Seals the segment and starts the next one.
    fn rotate(&mut self) -> Result<(), StoreError> {
        let next = self.generation + 1;
        match new_segment(&self.shared.dir, next) {
            Ok(f) => {
                self.file = f;
                self.generation = next;
                self.len = FILE_HEADER_LEN as u64;
                self.shared.active_gen.store(next, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                // Keep writing the current segment; a later rotation tries again.
                warn!(error = %e, "could not start a new segment");
                Err(e)
            }
        }
    }
}

fn encode_record(
    out: &mut Vec<u8>,
    kind: u8,
    host: &str,
    seq: u64,
    at_ms: u64,
    key_id: &str,
    body: &[u8],
) {
    let mut p = Vec::with_capacity(32 + host.len() + key_id.len() + body.len());
    p.push(kind);
    p.extend_from_slice(&at_ms.to_le_bytes());
    p.extend_from_slice(&seq.to_le_bytes());
    frame::put_str16(&mut p, host);
    frame::put_str8(&mut p, key_id);
    p.extend_from_slice(body);
    frame::encode(out, &p);
}

/// A heartbeat record's payload, parsed; `None` if it does not parse.
fn decode_record(payload: &[u8], kind: u8) -> Option<(String, LastHeartbeat)> {
    let mut r = Reader::new(payload);
    if r.u8()? != kind {
        return None;
    }
    let received_at_ms = r.u64()?;
    let seq = r.u64()?;
    let host = r.str16()?.to_string();
    let key_id = r.str8()?.to_string();
    let body_bytes = r.rest();
    let summary = body::parse(body_bytes).ok()?.summary;
    Some((
        host,
        LastHeartbeat {
            seq,
            received_at_ms,
            key_id,
            body: Bytes::copy_from_slice(body_bytes),
            summary,
        },
    ))
}

fn file_header(magic: &[u8; 6], generation: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(FILE_HEADER_LEN);
    h.extend_from_slice(magic);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&generation.to_le_bytes());
    h
}

/// Checks a file header; `Err` names what is wrong.
fn check_header(
    bytes: &[u8],
    magic: &[u8; 6],
    generation: u64,
    path: &Path,
) -> Result<(), StoreError> {
    let bad = |why: String| StoreError::Corrupt(format!("{}: {why}", path.display()));
    let h = bytes
        .get(..FILE_HEADER_LEN)
        .ok_or_else(|| bad("shorter than its header".into()))?;
    if &h[..6] != magic {
        return Err(bad("bad magic".into()));
    }
    let version = u16::from_le_bytes([h[6], h[7]]);
    if version == 0 || version > FORMAT_VERSION {
        return Err(bad(format!(
            "format version {version}, newer than this vigil reads ({FORMAT_VERSION})"
        )));
    }
    let g = u64::from_le_bytes(h[8..16].try_into().unwrap_or([0; 8]));
    if g != generation {
        return Err(bad(format!("generation {g} does not match its name")));
    }
    Ok(())
}

fn segment_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("wal-{generation:020}.log"))
}

fn snapshot_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("snapshot-{generation:020}.snap"))
}

fn new_segment(dir: &Path, generation: u64) -> Result<File, StoreError> {
    let path = segment_path(dir, generation);
    let ctx = || format!("creating {}", path.display());
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(StoreError::io(ctx()))?;
    f.write_all_at(&file_header(WAL_MAGIC, generation), 0)
        .and_then(|()| f.sync_data())
        .map_err(StoreError::io(ctx()))?;
    sync_dir(dir)?;
    Ok(f)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(format!("syncing {}", dir.display())))
}

fn remove(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::Io {
            context: format!("removing {}", path.display()),
            source: e,
        }),
    }
}

struct Segment {
    generation: u64,
    path: PathBuf,
    mtime: SystemTime,
    len: u64,
}

struct Listing {
    /// In generation order.
    segments: Vec<Segment>,
    /// Generations, ascending.
    snapshots: Vec<u64>,
}

fn list(dir: &Path) -> Result<Listing, StoreError> {
    let mut out = Listing {
        segments: Vec::new(),
        snapshots: Vec::new(),
    };
    let entries =
        fs::read_dir(dir).map_err(StoreError::io(format!("listing {}", dir.display())))?;
    for e in entries {
        let e = e.map_err(StoreError::io(format!("listing {}", dir.display())))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        let gen_of = |prefix: &str, suffix: &str| {
            name.strip_prefix(prefix)
                .and_then(|n| n.strip_suffix(suffix))
                .filter(|n| n.len() == 20)
                .and_then(|n| n.parse::<u64>().ok())
        };
        if let Some(generation) = gen_of("wal-", ".log") {
            let meta = match e.metadata() {
                Ok(m) => m,
                // Pruned between the listing and here.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => {
                    return Err(StoreError::Io {
                        context: format!("reading {}", e.path().display()),
                        source: err,
                    });
                }
            };
            out.segments.push(Segment {
                generation,
                path: e.path(),
                mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                len: meta.len(),
            });
        } else if let Some(generation) = gen_of("snapshot-", ".snap") {
            out.snapshots.push(generation);
        }
    }
    out.segments.sort_by_key(|s| s.generation);
    out.snapshots.sort_unstable();
    Ok(out)
}

struct Loaded {
    max_gen: u64,
}

/// Loads the newest snapshot and replays the segments after it into `shared.latest`.
/// `repair`: cut a torn tail off the newest segment (the writing receiver only).
fn load(shared: &Shared, repair: bool) -> Result<Loaded, StoreError> {
    let dir = &shared.dir;
    let files = list(dir)?;
    let mut latest = shared
        .latest
        .write()
        .unwrap_or_else(PoisonError::into_inner);
    let snap_gen = files.snapshots.last().copied().unwrap_or(0);
    if snap_gen > 0 {
        read_snapshot(dir, snap_gen, &mut latest)?;
    }
    let replay: Vec<&Segment> = files
        .segments
        .iter()
        .filter(|s| s.generation >= snap_gen)
        .collect();
    for (i, seg) in replay.iter().enumerate() {
        let newest = i + 1 == replay.len();
        let bytes = fs::read(&seg.path)
            .map_err(StoreError::io(format!("reading {}", seg.path.display())))?;
        if bytes.len() < FILE_HEADER_LEN && newest {
            // A segment being created when the process died: nothing in it was answered.
            if repair {
                remove(&seg.path)?;
            }
            continue;
        }
        check_header(&bytes, WAL_MAGIC, seg.generation, &seg.path)?;
        let mut pos = FILE_HEADER_LEN;
        loop {
            match frame::decode(&bytes[pos..]) {
                Next::Frame(payload, n) => {
                    match decode_record(payload, KIND_WAL) {
                        Some((host, hb)) => {
                            let newer = latest.get(&host).is_none_or(|l| hb.seq > l.seq);
                            if newer {
                                latest.insert(host, Arc::new(hb));
                            } else {
                                shared.corrupt.fetch_add(1, Ordering::Relaxed);
                                warn!(file = %seg.path.display(), offset = pos, "skipping a record whose seq is not above the host's last");
                            }
                        }
                        None => {
                            shared.corrupt.fetch_add(1, Ordering::Relaxed);
                            error!(file = %seg.path.display(), offset = pos, "skipping a record that does not parse");
                        }
                    }
                    pos += n;
                }
                Next::End => break,
                Next::Incomplete | Next::Corrupt if newest => {
                    // The torn tail of a crash: never answered 200 (see the module doc).
                    if repair {
                        warn!(file = %seg.path.display(), offset = pos, bytes = bytes.len() - pos, "cutting off the torn tail of the last segment");
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&seg.path)
                            .map_err(StoreError::io(format!("opening {}", seg.path.display())))?;
                        f.set_len(pos as u64).and_then(|()| f.sync_all()).map_err(
                            StoreError::io(format!("truncating {}", seg.path.display())),
                        )?;
                    }
                    break;
                }
                Next::Incomplete | Next::Corrupt => {
                    shared.corrupt.fetch_add(1, Ordering::Relaxed);
                    error!(file = %seg.path.display(), offset = pos, "damaged record in a sealed segment; the rest of it is skipped");
                    break;
                }
            }
        }
    }
    let max_gen = files
        .segments
        .last()
        .map_or(0, |s| s.generation)
        .max(snap_gen);
    Ok(Loaded { max_gen })
}

fn read_snapshot(dir: &Path, generation: u64, latest: &mut Latest) -> Result<(), StoreError> {
    let path = snapshot_path(dir, generation);
    let bytes = fs::read(&path).map_err(StoreError::io(format!("reading {}", path.display())))?;
    check_header(&bytes, SNAP_MAGIC, generation, &path)?;
    let bad = |why: &str, at: usize| {
        StoreError::Corrupt(format!(
            "{}: {why} at byte {at}; the snapshot holds the last seq of every host and \
             cannot be skipped (restore it from a backup)",
            path.display()
        ))
    };
    let mut pos = FILE_HEADER_LEN;
    let mut count = 0u64;
    loop {
        match frame::decode(&bytes[pos..]) {
            Next::Frame(payload, n) => {
                if payload.first() == Some(&KIND_END) {
                    let mut r = Reader::new(&payload[1..]);
                    if r.u64() != Some(count) || pos + n != bytes.len() {
                        return Err(bad("end record does not match", pos));
                    }
                    return Ok(());
                }
                let (host, hb) =
                    decode_record(payload, KIND_SNAP).ok_or_else(|| bad("bad record", pos))?;
                latest.insert(host, Arc::new(hb));
                count += 1;
                pos += n;
            }
            Next::End | Next::Incomplete => return Err(bad("no end record", pos)),
            Next::Corrupt => return Err(bad("damaged record", pos)),
        }
    }
}

/// Removes what a receiver killed mid-write leaves behind: a snapshot's temp file (only
/// the lock holder writes snapshots, and the caller holds the lock) and
/// [`crate::durable::write_atomic`]'s temps (`notified.json`). Neither is ever read.
fn remove_crash_leftovers(dir: &Path) {
    let mut removed = crate::durable::remove_stale_temps(dir);
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".snapshot-")
                && name.ends_with(".tmp")
                && fs::remove_file(e.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    if removed > 0 {
        info!(dir = %dir.display(), files = removed, "removed temp files left by a crash");
    }
}

fn write_snapshot(dir: &Path, generation: u64, latest: &Latest) -> Result<(), StoreError> {
    let path = snapshot_path(dir, generation);
    let tmp = dir.join(format!(".snapshot-{generation:020}.tmp"));
    let ctx = || format!("writing {}", tmp.display());
    let result = (|| -> io::Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        w.write_all(&file_header(SNAP_MAGIC, generation))?;
        let mut buf = Vec::new();
        for (host, hb) in latest {
            buf.clear();
            encode_record(
                &mut buf,
                KIND_SNAP,
                host,
                hb.seq,
                hb.received_at_ms,
                &hb.key_id,
                &hb.body,
            );
            w.write_all(&buf)?;
        }
        buf.clear();
        let mut end = vec![KIND_END];
        end.extend_from_slice(&(latest.len() as u64).to_le_bytes());
        frame::encode(&mut buf, &end);
        w.write_all(&buf)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    })();
    if let Err(e) = result {
        // Best effort: the temp file is ours and useless after a failure.
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::Io {
            context: ctx(),
            source: e,
        });
    }
    sync_dir(dir)?;
    info!(file = %path.display(), hosts = latest.len(), "snapshot written");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::store::HostFilter;

    fn hb(host: &str, seq: u64) -> Incoming {
        let body = format!(
            r#"{{"v":1,"host_id":"{host}","seq":{seq},"state":"available","kernel":"6.1"}}"#
        );
        let parsed = body::parse(body.as_bytes()).unwrap();
        Incoming {
            host_id: host.into(),
            seq,
            key_id: "kid".into(),
            received_at_ms: epoch_ms(SystemTime::now()),
            body: Bytes::from(body),
            summary: parsed.summary,
        }
    }

    fn small() -> Options {
        Options {
            segment_max: 4096,
            snapshot_every: 1_000,
        }
    }

    async fn last_seq(s: &FileStore, host: &str) -> Option<u64> {
        s.inner
            .shared
            .latest
            .read()
            .unwrap()
            .get(host)
            .map(|l| l.seq)
    }

    #[tokio::test]
    async fn accepts_refuses_stale_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = FileStore::open(dir.path(), Options::default()).unwrap();
            assert_eq!(
                s.accept(hb("h1", 1)).await.unwrap(),
                AcceptOutcome::Accepted
            );
            assert_eq!(
                s.accept(hb("h1", 5)).await.unwrap(),
                AcceptOutcome::Accepted
            );
            assert_eq!(
                s.accept(hb("h1", 5)).await.unwrap(),
                AcceptOutcome::Stale { last_seq: 5 }
            );
            assert_eq!(
                s.accept(hb("h1", 3)).await.unwrap(),
                AcceptOutcome::Stale { last_seq: 5 }
            );
            assert!(matches!(
                FileStore::open(dir.path(), Options::default()),
                Err(StoreError::Locked(_))
            ));
        }
        let s = FileStore::open(dir.path(), Options::default()).unwrap();
        assert_eq!(last_seq(&s, "h1").await, Some(5));
        assert_eq!(
            s.accept(hb("h1", 5)).await.unwrap(),
            AcceptOutcome::Stale { last_seq: 5 }
        );
        assert_eq!(
            s.accept(hb("h1", 6)).await.unwrap(),
            AcceptOutcome::Accepted
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_accepts_of_one_seq_succeed_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path(), Options::default()).unwrap();
        let mut tasks = Vec::new();
        for seq in 1..=50u64 {
            for _ in 0..4 {
                let s = s.clone();
                tasks.push(tokio::spawn(
                    async move { (seq, s.accept(hb("h", seq)).await) },
                ));
            }
        }
        let mut accepted = std::collections::BTreeMap::<u64, usize>::new();
        for t in tasks {
            let (seq, r) = t.await.unwrap();
            if r.unwrap() == AcceptOutcome::Accepted {
                *accepted.entry(seq).or_default() += 1;
            }
        }
        // Out-of-order arrival may refuse a lower seq after a higher one, never accept one
        // twice; and the highest is always accepted.
        assert!(accepted.values().all(|n| *n == 1), "{accepted:?}");
        assert_eq!(accepted.get(&50), Some(&1));
        assert_eq!(last_seq(&s, "h").await, Some(50));
    }

    #[tokio::test]
    async fn temp_files_of_a_receiver_killed_mid_write_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join(".snapshot-00000000000000000003.tmp");
        let notified = dir.path().join(".notified.json.tmp.0");
        fs::write(&snap, b"torn").unwrap();
        fs::write(&notified, b"torn").unwrap();
        let s = FileStore::open(dir.path(), Options::default()).unwrap();
        assert!(!snap.exists() && !notified.exists());
        s.accept(hb("h", 1)).await.unwrap();
        assert_eq!(last_seq(&s, "h").await, Some(1));
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = FileStore::open(dir.path(), Options::default()).unwrap();
            s.accept(hb("h1", 1)).await.unwrap();
            s.accept(hb("h2", 1)).await.unwrap();
        }
        let seg = list(dir.path()).unwrap().segments.pop().unwrap();
        let good = seg.len;
        let mut rec = Vec::new();
        encode_record(&mut rec, KIND_WAL, "h1", 2, 0, "kid", b"{}");
        let f = OpenOptions::new().append(true).open(&seg.path).unwrap();
        (&f).write_all(&rec[..rec.len() - 3]).unwrap();
        drop(f);
        let s = FileStore::open(dir.path(), Options::default()).unwrap();
        assert_eq!(last_seq(&s, "h1").await, Some(1));
        assert_eq!(last_seq(&s, "h2").await, Some(1));
        assert_eq!(fs::metadata(&seg.path).unwrap().len(), good);
        assert_eq!(s.corrupt_records(), 0, "a torn tail is not damage");
    }

    #[tokio::test]
    async fn damage_in_a_sealed_segment_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = FileStore::open(dir.path(), Options::default()).unwrap();
            s.accept(hb("h1", 1)).await.unwrap();
            s.accept(hb("h2", 1)).await.unwrap();
        }
        // Reopening starts a new segment, so the first is sealed.
        let _ = FileStore::open(dir.path(), Options::default()).unwrap();
        let first = list(dir.path()).unwrap().segments.remove(0);
        let mut bytes = fs::read(&first.path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0xff; // inside h2's record
        fs::write(&first.path, &bytes).unwrap();
        let s = FileStore::open(dir.path(), Options::default()).unwrap();
        assert_eq!(last_seq(&s, "h1").await, Some(1));
        assert_eq!(last_seq(&s, "h2").await, None);
        assert_eq!(s.corrupt_records(), 1);
        assert_eq!(
            fs::read(&first.path).unwrap(),
            bytes,
            "a sealed segment is not cut"
        );
    }

    #[tokio::test]
    async fn a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = FileStore::open(dir.path(), Options::default()).unwrap();
            s.accept(hb("h1", 1)).await.unwrap();
        }
        let seg = list(dir.path()).unwrap().segments.pop().unwrap();
        let mut bytes = fs::read(&seg.path).unwrap();
        bytes[6] = 9;
        fs::write(&seg.path, &bytes).unwrap();
        let e = FileStore::open(dir.path(), Options::default())
            .err()
            .unwrap();
        assert!(e.to_string().contains("newer than this vigil reads"), "{e}");
    }

    #[tokio::test]
    async fn prune_drops_old_history_and_keeps_the_latest_per_host() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path(), small()).unwrap();
        for seq in 1..=60 {
            s.accept(hb("busy", seq)).await.unwrap();
        }
        s.accept(hb("quiet", 1)).await.unwrap();
        for seq in 61..=120 {
            s.accept(hb("busy", seq)).await.unwrap();
        }
        let before = list(dir.path()).unwrap();
        assert!(
            before.segments.len() > 3,
            "{} segments",
            before.segments.len()
        );
        // Age every sealed segment by two days.
        let old = SystemTime::now() - Duration::from_secs(2 * 86_400);
        let active = s.inner.shared.active_gen.load(Ordering::Acquire);
        for seg in before.segments.iter().filter(|g| g.generation < active) {
            File::options()
                .write(true)
                .open(&seg.path)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let stats = s
            .prune(Duration::from_secs(86_400), SystemTime::now())
            .await
            .unwrap();
        assert_eq!(stats.files_removed, before.segments.len() - 1);
        let after = list(dir.path()).unwrap();
        assert_eq!(after.snapshots.len(), 1);
        assert!(after.segments.iter().all(|g| g.generation >= active));
        // Nothing left to do: a second prune removes nothing and writes no snapshot.
        let again = s
            .prune(Duration::from_secs(86_400), SystemTime::now())
            .await
            .unwrap();
        assert_eq!(again.files_removed, 0);
        drop(s);
        let s = FileStore::open(dir.path(), small()).unwrap();
        assert_eq!(
            last_seq(&s, "quiet").await,
            Some(1),
            "the latest of a quiet host is kept"
        );
        assert_eq!(last_seq(&s, "busy").await, Some(120));
        assert_eq!(
            s.accept(hb("quiet", 1)).await.unwrap(),
            AcceptOutcome::Stale { last_seq: 1 }
        );
    }

    #[tokio::test]
    async fn a_damaged_snapshot_refuses_the_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = FileStore::open(
                dir.path(),
                Options {
                    snapshot_every: 0,
                    ..small()
                },
            )
            .unwrap();
            s.accept(hb("h1", 1)).await.unwrap();
            s.prune(Duration::from_secs(86_400), SystemTime::now())
                .await
                .unwrap();
        }
        let snap = snapshot_path(
            dir.path(),
            *list(dir.path()).unwrap().snapshots.last().unwrap(),
        );
        let mut bytes = fs::read(&snap).unwrap();
        bytes.truncate(bytes.len() - 5);
        fs::write(&snap, &bytes).unwrap();
        assert!(matches!(
            FileStore::open(dir.path(), Options::default()),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn notified_states_survive_a_restart_and_are_written_only_when_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NOTIFIED_FILE);
        {
            let s = FileStore::open(dir.path(), Options::default()).unwrap();
            assert!(s.notified().await.unwrap().is_empty());
            s.baseline_notified(
                vec![
                    ("h1".into(), HostState::Available),
                    ("h2".into(), HostState::Uncertain),
                ],
                1,
            )
            .await
            .unwrap();
            assert!(
                s.claim_notified("h1", HostState::Uncertain, 2)
                    .await
                    .unwrap()
            );
            assert!(
                !s.claim_notified("h1", HostState::Uncertain, 3)
                    .await
                    .unwrap()
            );
            assert!(
                s.claim_notified("h2", HostState::Available, 4)
                    .await
                    .unwrap()
            );
            // A call cut short gives the claim back.
            s.release_notified("h2", HostState::Available, 4, HostState::Uncertain)
                .await
                .unwrap();
            // A baseline never overrides a notified state.
            s.baseline_notified(vec![("h1".into(), HostState::Available)], 5)
                .await
                .unwrap();
            assert!(!path.exists(), "nothing written before a flush");
            s.flush_notified().await.unwrap();
            let mtime = fs::metadata(&path).unwrap().modified().unwrap();
            s.flush_notified().await.unwrap();
            assert_eq!(
                fs::metadata(&path).unwrap().modified().unwrap(),
                mtime,
                "unchanged: not written again"
            );
        }
        let s = FileStore::open(dir.path(), Options::default()).unwrap();
        let n = s.notified().await.unwrap();
        assert_eq!(n.get("h1"), Some(&HostState::Uncertain));
        assert_eq!(n.get("h2"), Some(&HostState::Uncertain));
        drop(s);
        fs::write(&path, b"{not json").unwrap();
        let s = FileStore::open(dir.path(), Options::default()).unwrap();
        assert!(s.notified().await.unwrap().is_empty(), "damaged: none");
    }

    #[tokio::test]
    async fn a_read_only_handle_sees_enrolment_and_heartbeats_of_the_receiver() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path(), Options::default()).unwrap();
        let key = crate::heartbeat::keys::HeartbeatKey::from_signing_key(
            ed25519_dalek::SigningKey::from_bytes(&[3; 32]),
        )
        .public_key();
        let cli = FileStore::open_read_only(dir.path(), true).unwrap();
        assert!(cli.enroll("h1", &key).await.unwrap());
        assert_eq!(
            s.keys("h1", None).await.unwrap(),
            vec![key.clone()],
            "at once"
        );
        s.accept(hb("h1", 4)).await.unwrap();
        let ro = FileStore::open_read_only(dir.path(), true).unwrap();
        let h = ro.host("h1").await.unwrap().unwrap();
        assert_eq!(h.last.map(|l| l.seq), Some(4));
        assert!(matches!(
            ro.accept(hb("h1", 5)).await,
            Err(StoreError::ReadOnly)
        ));
        let page = Page {
            limit: 10,
            after: None,
        };
        let all = ro.hosts(&HostFilter::default(), &page).await.unwrap();
        assert_eq!(all.len(), 1);
        assert!(cli.enroll("bad/id", &key).await.is_err());
        assert_eq!(s.revoke("h1", None).await.unwrap(), 1);
        assert!(
            ro.host("h1").await.unwrap().is_none(),
            "revoked: not enrolled"
        );
    }
}
