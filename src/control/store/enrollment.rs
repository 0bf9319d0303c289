//! The file store's enrolment journal: `<state_dir>/enrollment.log`.
//!
//! # Why a journal file shared between processes
//! `vigil control enroll` must take effect at once in a running receiver, and must work
//! when none runs. Both processes therefore use the same append-only file, serialized with
//! `flock`: a writer (the CLI, or a receiver) takes `LOCK_EX`, reads any records it has
//! not seen, decides (an already enrolled key or an unknown key id writes nothing),
//! appends one record, `fdatasync`s and unlocks. A reader checks the file's length with
//! one `fstat` of a descriptor it keeps open before every lookup (≈1 µs, cheap beside a
//! 40 µs signature check), and only when the file grew takes `LOCK_SH` and reads the new
//! records. No process ever sees half a record, and no receiver needs a signal or a
//! socket to learn about a change. Talking to the receiver instead would need a second,
//! authenticated API and would not work while it is down.
//!
//! # Format, version 1
//! A header of 8 bytes, magic `VIGENR` and a `u16` version, then frames
//! ([`super::frame`]), each one record, little-endian:
//! - `1` enroll: `at_ms: u64`, host (`u16` length + bytes), the 32 raw public-key bytes;
//! - `2` revoke: `at_ms: u64`, host, key id (`u8` length + bytes; empty = every key).
//!
//! The file is never rewritten (a revoked key stays as two records; 100,000 hosts take a
//! few MB). A frame cut short at the end of the file is the torn write of a writer that
//! died: readers stop before it and the next writer cuts it off under `LOCK_EX`. A bad
//! frame with more data after it is damage, not a torn write: the file is refused rather
//! than cut, since cutting would drop enrolments silently.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock};

use nix::fcntl::{Flock, FlockArg};

use super::frame::{self, Next, Reader};
use super::{EnrolledKey, StoreError};
use crate::heartbeat::keys::PublicKey;

/// The journal's file name under `state_dir`.
pub(crate) const FILE: &str = "enrollment.log";
const MAGIC: &[u8; 6] = b"VIGENR";
/// The format version written.
pub(crate) const VERSION: u16 = 1;
const HEADER_LEN: u64 = 8;
const OP_ENROLL: u8 = 1;
const OP_REVOKE: u8 = 2;

/// Host id → keys, as of the last read of the journal.
pub(crate) type KeyMap = BTreeMap<String, Vec<EnrolledKey>>;

/// The journal and its state in memory.
pub(crate) struct Journal {
    path: PathBuf,
    /// A descriptor kept open for the `fstat` that tells whether the file grew.
    watch: File,
    /// Bytes of the file applied to `map` (always at a frame boundary).
    offset: Mutex<u64>,
    /// The enrolment as of `offset`.
    map: RwLock<KeyMap>,
}

impl Journal {
    /// Opens (creating it if needed) and reads the journal in `dir`.
    pub(crate) fn open(dir: &Path) -> Result<Journal, StoreError> {
        let path = dir.join(FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(StoreError::io(format!("opening {}", path.display())))?;
        let j = Journal {
            watch: file,
            path,
            offset: Mutex::new(0),
            map: RwLock::new(KeyMap::new()),
        };
        // The header is written by whoever finds the file empty, under the lock.
        j.with_lock(FlockArg::LockExclusive, |f, len| {
            if len == 0 {
                let mut h = MAGIC.to_vec();
                h.extend_from_slice(&VERSION.to_le_bytes());
                f.write_all_at(&h, 0)
                    .and_then(|()| f.sync_data())
                    .map_err(StoreError::io(format!("writing {}", j.path.display())))?;
            }
            Ok(())
        })?;
        j.refresh()?;
        Ok(j)
    }

    /// Runs `f` on a fresh descriptor of the journal holding `flock(how)`, with the
    /// file's length.
    fn with_lock<T>(
        &self,
        how: FlockArg,
        f: impl FnOnce(&File, u64) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(how == FlockArg::LockExclusive)
            .open(&self.path)
            .map_err(StoreError::io(format!("opening {}", self.path.display())))?;
        let locked = Flock::lock(file, how).map_err(|(_, e)| StoreError::Io {
            context: format!("locking {}", self.path.display()),
            source: e.into(),
        })?;
        let len = locked
            .metadata()
            .map_err(StoreError::io(format!("reading {}", self.path.display())))?
            .len();
        // Unlocked when `locked` drops (flock is released with the descriptor).
        f(&locked, len)
    }

    /// Reads records appended since the last read, if the file grew.
    pub(crate) fn refresh(&self) -> Result<(), StoreError> {
        let len = self
            .watch
            .metadata()
            .map_err(StoreError::io(format!("reading {}", self.path.display())))?
            .len();
        if len <= *self.offset.lock().unwrap_or_else(PoisonError::into_inner) {
            return Ok(());
        }
        self.with_lock(FlockArg::LockShared, |f, len| {
            self.read_tail(f, len).map(|_| ())
        })
    }

    /// Applies every whole record between `offset` and `len`; returns where the good
    /// records end (a torn frame may follow).
    fn read_tail(&self, f: &File, len: u64) -> Result<u64, StoreError> {
        let mut offset = self.offset.lock().unwrap_or_else(PoisonError::into_inner);
        if len < HEADER_LEN {
            // An empty file whose header is being written by another process.
            return Ok(*offset);
        }
        if *offset == 0 {
            let mut h = [0u8; HEADER_LEN as usize];
            f.read_exact_at(&mut h, 0)
                .map_err(StoreError::io(format!("reading {}", self.path.display())))?;
            let version = u16::from_le_bytes([h[6], h[7]]);
            if &h[..6] != MAGIC || version == 0 || version > VERSION {
                return Err(StoreError::Corrupt(format!(
                    "{} is not an enrolment journal this version reads (magic {:?}, \
                     version {version})",
                    self.path.display(),
                    String::from_utf8_lossy(&h[..6])
                )));
            }
            *offset = HEADER_LEN;
        }
        if len <= *offset {
            return Ok(*offset);
        }
        let mut buf = vec![0u8; (len - *offset) as usize];
        f.read_exact_at(&mut buf, *offset)
            .map_err(StoreError::io(format!("reading {}", self.path.display())))?;
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        let mut pos = 0usize;
        loop {
            match frame::decode(&buf[pos..]) {
                Next::Frame(payload, n) => {
                    apply(&mut map, payload).ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "{}: record at byte {} is not an enrolment record",
                            self.path.display(),
                            *offset + pos as u64
                        ))
                    })?;
                    pos += n;
                }
                Next::End | Next::Incomplete => break,
                Next::Corrupt => {
                    // The last frame of the file may be a torn write (its length written,
                    // its bytes not): only then is it safe to treat as not there.
                    let torn = match buf[pos..].first_chunk::<4>() {
                        Some(l) => {
                            pos + frame::HEADER + u32::from_le_bytes(*l) as usize >= buf.len()
                        }
                        None => true,
                    };
                    if torn {
                        break;
                    }
                    return Err(StoreError::Corrupt(format!(
                        "{}: damaged record at byte {}; refusing to guess which hosts are \
                         enrolled (restore the file from a backup)",
                        self.path.display(),
                        *offset + pos as u64
                    )));
                }
            }
        }
        *offset += pos as u64;
        Ok(*offset)
    }

    /// Appends one record under `LOCK_EX` if `decide` (given the current map) asks for it.
    fn append(&self, decide: impl FnOnce(&KeyMap) -> Option<Vec<u8>>) -> Result<bool, StoreError> {
        self.with_lock(FlockArg::LockExclusive, |f, len| {
            let end = self.read_tail(f, len)?;
            let payload = {
                let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
                decide(&map)
            };
            let Some(payload) = payload else {
                return Ok(false);
            };
            let ctx = || format!("writing {}", self.path.display());
            if end < len {
                // Cut off a torn frame of a writer that died.
                f.set_len(end).map_err(StoreError::io(ctx()))?;
            }
            let mut rec = Vec::with_capacity(payload.len() + frame::HEADER);
            frame::encode(&mut rec, &payload);
            f.write_all_at(&rec, end)
                .and_then(|()| f.sync_data())
                .map_err(StoreError::io(ctx()))?;
            // Apply through the same path readers take, so the writer's view is theirs.
            self.read_tail(f, end + rec.len() as u64)?;
            Ok(true)
        })
    }

    /// Adds `key` to `host`'s keys; `false` when it is there already.
    pub(crate) fn enroll(
        &self,
        host: &str,
        key: &PublicKey,
        at_ms: u64,
    ) -> Result<bool, StoreError> {
        let kid = key.info().key_id.clone();
        self.append(|map| {
            let present = map
                .get(host)
                .is_some_and(|ks| ks.iter().any(|k| k.key.info().key_id == kid));
            if present {
                return None;
            }
            let mut p = vec![OP_ENROLL];
            p.extend_from_slice(&at_ms.to_le_bytes());
            frame::put_str16(&mut p, host);
            p.extend_from_slice(key.verifying_key().as_bytes());
            Some(p)
        })
    }

    /// Adds every `(host, key)` not enrolled yet with one append (every record in one
    /// `write_all`, one `fdatasync`) under one `LOCK_EX`: 100,000 keys cost one lock and one
    /// flush instead of 100,000 of each. Returns the newly enrolled keys per host, in
    /// order, and how many were skipped as enrolled already (or listed twice).
    ///
    /// A crash before the `fdatasync` leaves a prefix of whole records and at most one
    /// torn one at the end of the file, exactly as a crash during a single enrolment does
    /// (the torn one is cut by the next writer); nothing is answered before the flush,
    /// and enrolling the same file again completes it.
    pub(crate) fn enroll_many<'k>(
        &self,
        keys: &'k [(String, PublicKey)],
        at_ms: u64,
    ) -> Result<(Vec<&'k str>, usize), StoreError> {
        let mut new: Vec<&'k str> = Vec::new();
        let mut already = 0usize;
        let mut buf = Vec::new();
        self.with_lock(FlockArg::LockExclusive, |f, len| {
            let end = self.read_tail(f, len)?;
            {
                let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
                let mut seen = std::collections::HashSet::new();
                for (host, key) in keys {
                    let kid = &key.info().key_id;
                    let present = map
                        .get(host)
                        .is_some_and(|ks| ks.iter().any(|k| &k.key.info().key_id == kid));
                    if present || !seen.insert((host.as_str(), kid.as_str())) {
                        already += 1;
                        continue;
                    }
                    let mut p = vec![OP_ENROLL];
                    p.extend_from_slice(&at_ms.to_le_bytes());
                    frame::put_str16(&mut p, host);
                    p.extend_from_slice(key.verifying_key().as_bytes());
                    frame::encode(&mut buf, &p);
                    new.push(host.as_str());
                }
            }
            if buf.is_empty() {
                return Ok(());
            }
            let ctx = || format!("writing {}", self.path.display());
            if end < len {
                // Cut off a torn frame of a writer that died.
                f.set_len(end).map_err(StoreError::io(ctx()))?;
            }
            f.write_all_at(&buf, end)
                .and_then(|()| f.sync_data())
                .map_err(StoreError::io(ctx()))?;
            self.read_tail(f, end + buf.len() as u64).map(|_| ())
        })?;
        Ok((new, already))
    }

    /// Removes one key or all of `host`'s; returns how many were enrolled and removed.
    pub(crate) fn revoke(
        &self,
        host: &str,
        key_id: Option<&str>,
        at_ms: u64,
    ) -> Result<usize, StoreError> {
        let mut removed = 0;
        self.append(|map| {
            let keys = map.get(host)?;
            removed = match key_id {
                Some(kid) => keys.iter().filter(|k| k.key.info().key_id == kid).count(),
                None => keys.len(),
            };
            if removed == 0 {
                return None;
            }
            let mut p = vec![OP_REVOKE];
            p.extend_from_slice(&at_ms.to_le_bytes());
            frame::put_str16(&mut p, host);
            frame::put_str8(&mut p, key_id.unwrap_or(""));
            Some(p)
        })?;
        Ok(removed)
    }

    /// `f` over the current map (after reading anything new).
    pub(crate) fn read<T>(&self, f: impl FnOnce(&KeyMap) -> T) -> Result<T, StoreError> {
        self.refresh()?;
        Ok(f(&self.map.read().unwrap_or_else(PoisonError::into_inner)))
    }
}

/// Applies one record to the map; `None` if it does not parse.
fn apply(map: &mut KeyMap, payload: &[u8]) -> Option<()> {
    let mut r = Reader::new(payload);
    let op = r.u8()?;
    let at_ms = r.u64()?;
    let host = r.str16()?.to_string();
    match op {
        OP_ENROLL => {
            let raw: [u8; 32] = r.bytes(32)?.try_into().ok()?;
            let key =
                PublicKey::from_verifying_key(ed25519_dalek::VerifyingKey::from_bytes(&raw).ok()?);
            let keys = map.entry(host).or_default();
            if !keys.iter().any(|k| k.key == key) {
                keys.push(EnrolledKey {
                    key,
                    enrolled_at_ms: at_ms,
                });
            }
        }
        OP_REVOKE => {
            let kid = r.str8()?;
            if let Some(keys) = map.get_mut(&host) {
                if kid.is_empty() {
                    keys.clear();
                } else {
                    keys.retain(|k| k.key.info().key_id != kid);
                }
                if keys.is_empty() {
                    map.remove(&host);
                }
            }
        }
        _ => return None,
    }
    r.rest().is_empty().then_some(())
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::heartbeat::keys::HeartbeatKey;

    fn key(n: u8) -> PublicKey {
        HeartbeatKey::from_signing_key(SigningKey::from_bytes(&[n; 32])).public_key()
    }

    fn ids(j: &Journal, host: &str) -> Vec<String> {
        j.read(|m| {
            m.get(host)
                .map(|ks| ks.iter().map(|k| k.key.info().key_id.clone()).collect())
                .unwrap_or_default()
        })
        .unwrap()
    }

    #[test]
    fn two_handles_see_each_others_changes_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let receiver = Journal::open(dir.path()).unwrap();
        let cli = Journal::open(dir.path()).unwrap();
        assert!(cli.enroll("h1", &key(1), 1).unwrap());
        assert!(!cli.enroll("h1", &key(1), 2).unwrap(), "already enrolled");
        assert!(cli.enroll("h1", &key(2), 3).unwrap());
        assert_eq!(
            ids(&receiver, "h1"),
            [key(1).info().key_id.clone(), key(2).info().key_id.clone()]
        );
        assert_eq!(cli.revoke("h1", Some(&key(1).info().key_id), 4).unwrap(), 1);
        assert_eq!(cli.revoke("h1", Some("nope"), 5).unwrap(), 0);
        assert_eq!(ids(&receiver, "h1"), [key(2).info().key_id.clone()]);
        assert_eq!(receiver.revoke("h1", None, 6).unwrap(), 1);
        assert!(ids(&cli, "h1").is_empty());
        // Reopened: the same state from the file alone.
        let again = Journal::open(dir.path()).unwrap();
        assert!(ids(&again, "h1").is_empty());
        assert!(again.enroll("h1", &key(3), 7).unwrap());
        assert_eq!(ids(&receiver, "h1"), [key(3).info().key_id.clone()]);
    }

    #[test]
    fn a_bulk_enrolment_is_one_append_that_skips_what_is_enrolled() {
        let dir = tempfile::tempdir().unwrap();
        let receiver = Journal::open(dir.path()).unwrap();
        let cli = Journal::open(dir.path()).unwrap();
        assert!(cli.enroll("h1", &key(1), 1).unwrap());
        let keys = vec![
            ("h1".to_string(), key(1)),
            ("h2".to_string(), key(2)),
            ("h2".to_string(), key(3)),
            ("h2".to_string(), key(2)),
            ("h3".to_string(), key(4)),
        ];
        let (new, already) = cli.enroll_many(&keys, 2).unwrap();
        assert_eq!((new, already), (vec!["h2", "h2", "h3"], 2));
        assert_eq!(ids(&receiver, "h2").len(), 2);
        assert_eq!(ids(&Journal::open(dir.path()).unwrap(), "h3").len(), 1);
        let len = std::fs::metadata(dir.path().join(FILE)).unwrap().len();
        let (new, already) = cli.enroll_many(&keys, 3).unwrap();
        assert_eq!((new.len(), already), (0, 5));
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE)).unwrap().len(),
            len,
            "nothing new: nothing written"
        );
    }

    #[test]
    fn a_torn_tail_is_ignored_then_cut_by_the_next_writer() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.enroll("h1", &key(1), 1).unwrap();
        let path = dir.path().join(FILE);
        let good = std::fs::metadata(&path).unwrap().len();
        // Half a record, as a writer killed mid-write leaves it.
        let mut rec = Vec::new();
        frame::encode(&mut rec, b"\x01whatever-this-was");
        let f = OpenOptions::new().append(true).open(&path).unwrap();
        use std::io::Write as _;
        (&f).write_all(&rec[..rec.len() / 2]).unwrap();
        let reader = Journal::open(dir.path()).unwrap();
        assert_eq!(ids(&reader, "h1").len(), 1);
        j.enroll("h2", &key(2), 2).unwrap();
        assert_eq!(ids(&reader, "h2").len(), 1);
        assert!(std::fs::metadata(&path).unwrap().len() > good);
        assert_eq!(ids(&Journal::open(dir.path()).unwrap(), "h1").len(), 1);
    }

    #[test]
    fn damage_before_the_end_is_refused_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.enroll("h1", &key(1), 1).unwrap();
        j.enroll("h2", &key(2), 2).unwrap();
        let path = dir.path().join(FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN as usize + 12] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Journal::open(dir.path()),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was cut");
    }

    #[test]
    fn a_newer_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&(VERSION + 1).to_le_bytes());
        std::fs::write(dir.path().join(FILE), h).unwrap();
        assert!(matches!(
            Journal::open(dir.path()),
            Err(StoreError::Corrupt(_))
        ));
    }
}
