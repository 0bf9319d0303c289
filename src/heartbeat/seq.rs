//! The heartbeat sequence counter: `seq` strictly increases per host, across restarts and
//! crashes, and no value is ever handed out twice.
//!
//! # On-disk format
//! One small JSON file, [`FILE_NAME`] in `state_dir`, replaced atomically and durably
//! through [`durable::write_atomic`] (temp file, fsync, rename, fsync of the directory):
//!
//! ```json
//! {"v":1,"reserved_until":3000}
//! ```
//!
//! `v` is the format version. `reserved_until` is inclusive: every value this host may
//! have handed out is `<= reserved_until`.
//!
//! # Invariant
//! A value is handed out only when it is `<=` a `reserved_until` that is already on disk.
//! [`SeqCounter::next`] therefore persists a new block of [`BLOCK`] values *before* it
//! hands out the first value of that block, and hands out nothing when that write fails.
//!
//! # Recovery
//! [`SeqCounter::open`] continues at `reserved_until + 1` of the file, skipping whatever
//! was left of the block the previous process held: after a crash the counter jumps
//! forward (a gap the receiver tolerates) instead of ever repeating a value (which the
//! receiver would refuse with 409, or worse, accept for a different body). The cost is
//! at most one block per restart, and one disk write per [`BLOCK`] heartbeats.
//!
//! A missing file is a fresh `state_dir`: the first value is 1. A file that does not
//! parse is an error naming the path, never a silent restart at 1, which would reuse
//! values the control plane has already accepted.
//!
//! Values stay at or below [`MAX_SEQ`] (`i64::MAX`), so a receiver that keeps `seq` in
//! a PostgreSQL `bigint` holds every one of them.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::durable;

/// The file in `state_dir` that holds the reservation.
pub const FILE_NAME: &str = "heartbeat-seq.json";

/// Values reserved by one disk write. At one heartbeat every few seconds a block lasts
/// about an hour, and a restart skips at most this many values.
pub const BLOCK: u64 = 1000;

/// The largest value ever handed out (`i64::MAX`, a PostgreSQL `bigint`).
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// The format version this agent writes and reads.
const FORMAT_VERSION: u32 = 1;

/// The file's content.
#[derive(Debug, Serialize, Deserialize)]
struct Reservation {
    v: u32,
    reserved_until: u64,
}

/// Why the counter could not open, hand out a value or skip forward.
#[derive(Debug, thiserror::Error)]
pub enum SeqError {
    /// The file exists but could not be read.
    #[error("reading the heartbeat sequence file {}", path.display())]
    Read {
        /// The sequence file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file does not hold a reservation this agent understands.
    #[error(
        "the heartbeat sequence file {} is corrupt ({reason}); refusing to restart the \
         sequence at 1, which would reuse values: restore the file, or write \
         {{\"v\":1,\"reserved_until\":N}} with N at or above the control plane's last seq \
         for this host",
        path.display()
    )]
    Corrupt {
        /// The sequence file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file was written by a newer agent in a format this one does not know.
    #[error(
        "the heartbeat sequence file {} has format v{found}; this agent reads up to v{}",
        path.display(),
        FORMAT_VERSION
    )]
    NewerFormat {
        /// The sequence file.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// The next reservation could not be made durable; no value of it was handed out.
    #[error("persisting the heartbeat sequence reservation to {}", path.display())]
    Persist {
        /// The sequence file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Every value up to [`MAX_SEQ`] is used (only reachable by skipping to a huge value).
    #[error(
        "the heartbeat sequence in {} is exhausted (the next value would exceed {})",
        path.display(),
        MAX_SEQ
    )]
    Exhausted {
        /// The sequence file.
        path: PathBuf,
    },
}

/// The per-host heartbeat sequence, backed by a reservation file in `state_dir`.
///
/// Not `Clone`: two counters over one file would hand out the same values. One agent
/// process owns the `state_dir`.
#[derive(Debug)]
pub struct SeqCounter {
    path: PathBuf,
    /// The next value to hand out.
    next: u64,
    /// The end (inclusive) of the reservation on disk; `next > reserved_until` means the
    /// next value needs a new block first.
    reserved_until: u64,
    block: u64,
}

impl SeqCounter {
    /// Opens the counter in `state_dir`, continuing after the reservation on disk (1 when
    /// there is no file yet). Nothing is written until the first [`next`](Self::next).
    ///
    /// # Errors
    /// [`SeqError::Read`] when the file exists but cannot be read,
    /// [`SeqError::Corrupt`] when it does not parse, [`SeqError::NewerFormat`] when a
    /// newer agent wrote it.
    pub fn open(state_dir: &Path) -> Result<Self, SeqError> {
        Self::open_with_block(state_dir, BLOCK)
    }

    /// [`open`](Self::open) with another block size (tests use tiny blocks to cross many
    /// block boundaries).
    fn open_with_block(state_dir: &Path, block: u64) -> Result<Self, SeqError> {
        let path = state_dir.join(FILE_NAME);
        let reserved_until = match std::fs::read(&path) {
            Ok(bytes) => parse(&path, &bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(source) => return Err(SeqError::Read { path, source }),
        };
        if reserved_until >= MAX_SEQ {
            return Err(SeqError::Exhausted { path });
        }
        Ok(SeqCounter {
            path,
            // The rest of the previous process's block may have been handed out before
            // it died, so start past all of it.
            next: reserved_until + 1,
            reserved_until,
            block: block.max(1),
        })
    }

    /// Hands out the next value, first persisting a new block when the current one is
    /// used up.
    ///
    /// # Errors
    /// [`SeqError::Persist`] when the new block cannot be written (nothing is handed out
    /// and the next call tries again); [`SeqError::Exhausted`] past [`MAX_SEQ`].
    // Not `Iterator::next`: a value can fail to be reserved, and that error must reach the
    // caller rather than end the sequence as `None` would.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<u64, SeqError> {
        if self.next > MAX_SEQ {
            return Err(SeqError::Exhausted {
                path: self.path.clone(),
            });
        }
        if self.next > self.reserved_until {
            self.reserve()?;
        }
        let v = self.next;
        self.next += 1;
        Ok(v)
    }

    /// Continues after `n` (a receiver's `last_seq` that is ahead of this counter), so
    /// the next value is `n + 1`. The reservation covering it is persisted before this
    /// returns, so a crash right after still never goes back below `n`.
    ///
    /// Returns whether the counter moved (false when `n` is behind it already).
    ///
    /// # Errors
    /// [`SeqError::Persist`] when the reservation cannot be written (the counter has
    /// still moved in memory, and [`next`](Self::next) retries the write before handing
    /// out anything); [`SeqError::Exhausted`] when `n >= MAX_SEQ`.
    pub fn skip_past(&mut self, n: u64) -> Result<bool, SeqError> {
        if n >= MAX_SEQ {
            return Err(SeqError::Exhausted {
                path: self.path.clone(),
            });
        }
        if n < self.next {
            return Ok(false);
        }
        self.next = n + 1;
        if self.next > self.reserved_until {
            self.reserve()?;
        }
        Ok(true)
    }

    /// The value the next [`next`](Self::next) will hand out.
    pub fn peek(&self) -> u64 {
        self.next
    }

    /// The sequence file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Persists `[next, next + block - 1]` (capped at [`MAX_SEQ`]) as the reservation.
    /// The in-memory end moves only once the file is durable.
    fn reserve(&mut self) -> Result<(), SeqError> {
        let until = self.next.saturating_add(self.block - 1).min(MAX_SEQ);
        let body = format!("{{\"v\":{FORMAT_VERSION},\"reserved_until\":{until}}}\n");
        durable::write_atomic(&self.path, body.as_bytes()).map_err(|source| SeqError::Persist {
            path: self.path.clone(),
            source,
        })?;
        self.reserved_until = until;
        Ok(())
    }
}

/// Reads a reservation, checking the version before the rest so that a newer format is
/// reported as such rather than as corruption.
fn parse(path: &Path, bytes: &[u8]) -> Result<u64, SeqError> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let corrupt = |reason: String| SeqError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(corrupt("the file is empty".into()));
    }
    let version: Version = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if version.v > FORMAT_VERSION {
        return Err(SeqError::NewerFormat {
            path: path.to_path_buf(),
            found: version.v,
        });
    }
    if version.v != FORMAT_VERSION {
        return Err(corrupt(format!("unknown format version {}", version.v)));
    }
    let r: Reservation = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    Ok(r.reserved_until)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs;

    fn on_disk(dir: &Path) -> u64 {
        parse(Path::new("x"), &fs::read(dir.join(FILE_NAME)).unwrap()).unwrap()
    }

    #[test]
    fn a_fresh_state_dir_starts_at_1_and_reserves_before_handing_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = SeqCounter::open(dir.path()).unwrap();
        assert!(!dir.path().join(FILE_NAME).exists(), "open writes nothing");
        assert_eq!(c.next().unwrap(), 1);
        assert_eq!(on_disk(dir.path()), BLOCK);
        assert_eq!(c.next().unwrap(), 2);
        let text = fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(
            text.trim(),
            format!("{{\"v\":1,\"reserved_until\":{BLOCK}}}")
        );
    }

    #[test]
    fn monotonic_across_reopen_skipping_the_rest_of_the_block() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = SeqCounter::open(dir.path()).unwrap();
        let a: Vec<u64> = (0..5).map(|_| c.next().unwrap()).collect();
        assert_eq!(a, [1, 2, 3, 4, 5]);
        drop(c);
        let mut c = SeqCounter::open(dir.path()).unwrap();
        assert_eq!(c.next().unwrap(), BLOCK + 1);
        assert_eq!(c.next().unwrap(), BLOCK + 2);
    }

    #[test]
    fn a_new_block_is_persisted_when_the_current_one_is_used_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = SeqCounter::open_with_block(dir.path(), 3).unwrap();
        for want in 1..=3 {
            assert_eq!(c.next().unwrap(), want);
            assert_eq!(on_disk(dir.path()), 3);
        }
        assert_eq!(c.next().unwrap(), 4);
        assert_eq!(on_disk(dir.path()), 6);
    }

    /// A crash is a drop with no clean close (there is none): every value handed out
    /// before it is covered by the file, so the next process starts past all of them.
    #[test]
    fn a_crash_mid_block_never_reuses_a_value() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = Vec::new();
        for _ in 0..10 {
            let mut c = SeqCounter::open_with_block(dir.path(), 4).unwrap();
            for _ in 0..3 {
                let v = c.next().unwrap();
                assert!(
                    v <= on_disk(dir.path()),
                    "{v} handed out before it was reserved"
                );
                seen.push(v);
            }
            std::mem::forget(c);
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }

    #[test]
    fn an_io_error_hands_out_nothing_and_the_next_call_retries() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        let mut c = SeqCounter::open_with_block(&state, 2).unwrap();
        assert_eq!(c.next().unwrap(), 1);
        assert_eq!(c.next().unwrap(), 2);
        // Removing the directory fails the write even as root, where permissions do not.
        fs::remove_dir_all(&state).unwrap();
        assert!(matches!(c.next(), Err(SeqError::Persist { .. })));
        assert!(matches!(c.next(), Err(SeqError::Persist { .. })));
        fs::create_dir(&state).unwrap();
        assert_eq!(
            c.next().unwrap(),
            3,
            "nothing was handed out by the failed calls"
        );
        assert_eq!(on_disk(&state), 4);
    }

    #[test]
    fn skip_past_continues_after_n_and_persists_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = SeqCounter::open(dir.path()).unwrap();
        assert_eq!(c.next().unwrap(), 1);
        assert!(c.skip_past(5000).unwrap());
        assert!(on_disk(dir.path()) >= 5001, "persisted before returning");
        // Crash right after the skip: still past 5000.
        drop(c);
        let mut c = SeqCounter::open(dir.path()).unwrap();
        assert!(c.next().unwrap() > 5000);
        // Behind or equal to a value already handed out: no move.
        let now = c.peek();
        assert!(!c.skip_past(10).unwrap());
        assert!(!c.skip_past(now - 1).unwrap());
        assert_eq!(c.next().unwrap(), now);
    }

    #[test]
    fn skip_past_within_the_current_block_needs_no_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = SeqCounter::open(dir.path()).unwrap();
        c.next().unwrap();
        assert!(c.skip_past(10).unwrap());
        assert_eq!(on_disk(dir.path()), BLOCK);
        assert_eq!(c.next().unwrap(), 11);
    }

    #[test]
    fn skip_past_the_limit_is_exhausted_not_a_wrap() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = SeqCounter::open(dir.path()).unwrap();
        assert!(matches!(
            c.skip_past(u64::MAX),
            Err(SeqError::Exhausted { .. })
        ));
        assert!(c.skip_past(MAX_SEQ - 1).unwrap());
        assert_eq!(c.next().unwrap(), MAX_SEQ);
        assert!(matches!(c.next(), Err(SeqError::Exhausted { .. })));
        drop(c);
        assert!(matches!(
            SeqCounter::open(dir.path()),
            Err(SeqError::Exhausted { .. })
        ));
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_the_path() {
        for (name, content) in [
            ("garbage", &b"{\"v\":1,\"reserved_unt"[..]),
            ("empty", b""),
            ("not a number", b"{\"v\":1,\"reserved_until\":\"12\"}"),
            ("negative", b"{\"v\":1,\"reserved_until\":-3}"),
            ("no version", b"{\"reserved_until\":12}"),
            ("version 0", b"{\"v\":0,\"reserved_until\":12}"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(FILE_NAME);
            fs::write(&path, content).unwrap();
            let err = SeqCounter::open(dir.path()).unwrap_err();
            assert!(matches!(err, SeqError::Corrupt { .. }), "{name}: {err:?}");
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{name}"
            );
            assert_eq!(fs::read(&path).unwrap(), content, "{name}: file left alone");
        }
    }

    #[test]
    fn a_newer_format_is_refused_as_such() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), b"{\"v\":2,\"next\":7}").unwrap();
        let err = SeqCounter::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, SeqError::NewerFormat { found: 2, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn an_unreadable_file_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory in the file's place fails the read for root too.
        fs::create_dir(dir.path().join(FILE_NAME)).unwrap();
        let err = SeqCounter::open(dir.path()).unwrap_err();
        assert!(matches!(err, SeqError::Read { .. }), "{err:?}");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Next,
        /// Drop the counter (clean or crash: there is no difference) and open again.
        Reopen,
        /// Skip past the last value handed out plus this offset (may be behind).
        SkipPast(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => Just(Op::Next),
            2 => Just(Op::Reopen),
            1 => (-5i64..20).prop_map(Op::SkipPast),
        ]
    }

    proptest! {
        /// Any interleaving of next, reopen and skip_past yields strictly increasing
        /// values, and after skip_past(n) every value is above n.
        #[test]
        fn values_strictly_increase(block in 1u64..6, ops in prop::collection::vec(op(), 1..80)) {
            let dir = tempfile::tempdir().unwrap();
            let mut c = SeqCounter::open_with_block(dir.path(), block).unwrap();
            let mut last: u64 = 0;
            let mut floor: u64 = 0;
            for o in ops {
                match o {
                    Op::Next => {
                        let v = c.next().unwrap();
                        prop_assert!(v > last, "{} after {}", v, last);
                        prop_assert!(v > floor, "{} not past skip {}", v, floor);
                        prop_assert!(v <= on_disk(dir.path()), "{} not reserved", v);
                        last = v;
                    }
                    Op::Reopen => {
                        drop(c);
                        c = SeqCounter::open_with_block(dir.path(), block).unwrap();
                    }
                    Op::SkipPast(d) => {
                        let n = last.saturating_add_signed(d);
                        c.skip_past(n).unwrap();
                        floor = floor.max(n);
                        // A crash right now must still restart past n.
                        let persisted = if dir.path().join(FILE_NAME).exists() {
                            on_disk(dir.path())
                        } else {
                            0
                        };
                        prop_assert!(persisted >= n, "reserved {} < skipped {}", persisted, n);
                    }
                }
            }
        }
    }
}
