//! The durable spool: heartbeat bodies not yet delivered, oldest first.
//!
//! This doc is the spool's design (in the manner of vector's `disk_v2`); the code follows it.
//!
//! # What it holds
//! A FIFO of records `(seq, body)`: the exact bytes of a heartbeat document and its `seq`.
//! Digest and signature are made at each send, so the spool keeps bodies only. `seq`
//! strictly increases from append to append (the [`super::seq`] counter never reuses a
//! value); the spool refuses a `seq` that is not above every `seq` it has seen, including
//! acknowledged ones, so order on disk is `seq` order and a replay never yields a duplicate.
//! `seq` 0 is never valid.
//!
//! # Directory layout
//! One directory (the agent uses `<state_dir>/spool/`, mode 0700), owned by one process:
//! - `<seq:020>.seg`: append-only segment files, named by the `seq` of the first record
//!   written to them, zero-padded so that name order is `seq` order (`ls` shows the queue);
//! - `ack`: the highest acknowledged `seq`, replaced atomically ([`crate::durable`]);
//! - `lock`: held with `flock(LOCK_EX)` while a [`Spool`] is open, so two agents on one
//!   `state_dir` fail at open instead of interleaving records;
//! - `*.bad`: files set aside by recovery (see below), kept for inspection, never read.
//!
//! Anything else in the directory is left alone and logged at open.
//!
//! # On-disk format, version 1 (all integers little-endian)
//! Segment header, 8 bytes: magic `VIGSPL`, then `u16` format version ([`FORMAT_VERSION`]).
//! Then records back to back, each a 20-byte header and the body:
//!
//! | offset | size | field      | meaning                                     |
//! |--------|------|------------|---------------------------------------------|
//! | 0      | 4    | `len`      | body length in bytes                        |
//! | 4      | 8    | `seq`      | the heartbeat's sequence number             |
//! | 12     | 4    | `body_crc` | CRC-32 (IEEE) of the body                   |
//! | 16     | 4    | `head_crc` | CRC-32 of bytes 0..16 (`len`, `seq`, `body_crc`) |
//! | 20     | len  | body       | the heartbeat document, as it will be sent  |
//!
//! The header has its own checksum so that recovery can tell two failures apart: a body
//! that went bad under a good header (the length still frames the next record: skip one
//! record) and a header that went bad (framing is lost: nothing after it in that segment
//! can be trusted). A CRC-32 of a zero-filled header is not zero, so a zero-filled tail
//! (what some file systems show after a power cut) never parses as a record.
//!
//! The `ack` file, 20 bytes: magic `VIGACK`, `u16` version, `u64` acknowledged `seq`,
//! CRC-32 of the preceding 16 bytes.
//!
//! Versions: a reader accepts every version up to its own. A segment or ack file of a
//! newer version is set aside (`*.bad`) with an error in the log; an older agent cannot
//! read it, but it is not destroyed.
//!
//! # Lifecycle
//! - **Write** ([`Spool::append`]): the record is written with one positioned `write_all`
//!   at the end of the newest segment, then `fdatasync`. A new segment is created (header
//!   and first record in one write, `fdatasync`, then an fsync of the directory so the new
//!   name survives a power cut) when there is none, when the newest one was sealed after a
//!   write error, or when the record would take the newest past the segment limit:
//!   `min(1 MiB, max_bytes / 8)`. A record bigger than that limit gets a segment of its
//!   own. `append` returns only once the record is durable.
//! - **Replay** ([`Spool::peek_oldest`]): reads records back in `seq` order without
//!   removing them; each is checked again against both checksums, so bit rot after open is
//!   caught too. An index in memory (24 bytes a record: `seq`, offset, length) saves a scan.
//! - **Delete** ([`Spool::ack`]): acknowledges every record up to a `seq`. Segments whose
//!   records are all acknowledged are deleted (then the directory is fsynced); then the
//!   `ack` file is replaced atomically, which covers the partly acknowledged oldest segment.
//!   Deleting first is safe: a crash in between can only bring back records whose
//!   segments were not deleted, and only ones already delivered (delivery is at least
//!   once; the receiver answers 409 to a duplicate). After a restart, acknowledged records
//!   are not returned again.
//!
//! # Caps
//! `max_bytes` (the config's `spool_max`) bounds the sum of segment file sizes. When an
//! append would exceed it, the **oldest** whole segments are deleted until the record
//! fits, and their unacknowledged records are added to [`Spool::dropped_total`] and logged:
//! the newest heartbeat is never the one dropped. A record that could not fit even in an
//! empty spool (`8 + 20 + len > max_bytes`) is refused with [`SpoolError::TooLarge`].
//!
//! # Recovery (at [`Spool::open`]) and corruption
//! Recovery reads the `ack` file, then scans every segment in name order:
//! - a file shorter than the segment header is the remains of a segment being created
//!   when the process died (no record in it was ever acknowledged as written): deleted;
//! - a bad magic or an unknown version: the whole file is renamed `*.bad`, counted once;
//! - a record whose body checksum fails under a good header: **that record** is skipped
//!   and counted, and the scan goes on at the next record (the length still frames it);
//! - a header whose checksum fails, or a header or body cut short by the end of the file:
//!   framing is lost, so **the rest of that segment** is skipped, counted once, and cut
//!   off the file (`ftruncate`, fsync). In the newest segment this is the torn tail of a
//!   write interrupted by `kill -9` or a power cut: the one record in flight. Cutting it
//!   off lets appends continue on a clean frame;
//! - a record whose `seq` is not above the previous record's is skipped and counted (it
//!   cannot come from this code, and delivering it would break the order).
//!
//! "Counted" means [`Spool::corrupt_skipped_total`] and an error in the log with the file
//! and offset. A corrupt record is never returned as data. After the scan, segments with
//! no unacknowledged record left are deleted. A corrupt `ack` file is set aside as
//! `ack.bad` and counted, and the spool starts from "nothing acknowledged": records that
//! were delivered but are still in a segment are delivered again (the safe direction).
//! A segment file deleted by hand is simply gone; nothing can count what was in it.
//!
//! I/O errors other than corruption (permission denied, EIO) fail the open: guessing
//! there could lose records silently.
//!
//! # Errors while running
//! A failed append (a full disk, `ENOSPC`, most likely) returns an error and leaves the
//! spool as it was: the partial record is cut off again (`ftruncate` needs no free space),
//! or, if even that fails, the segment is sealed and the next append starts a new one, so
//! the torn bytes are at worst a tail that recovery cuts off. A new segment whose first
//! write fails is removed. Nothing already spooled is touched by a failed append; the
//! caller keeps that heartbeat in memory and counts it.
//!
//! # Threads
//! The API is synchronous `std::fs`; the agent calls it from `spawn_blocking` behind one
//! `std::sync::Mutex`. Every method takes `&mut self`.
//!
//! This replaces the one-file-per-record layout sketched in STYLE §4.9: issue #5 asks for
//! append-only segments, which keep an fsync per record and no rename per record.

use std::collections::VecDeque;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tracing::{error, warn};

use crate::durable;

/// The on-disk format version this code writes (segments and the `ack` file).
pub const FORMAT_VERSION: u16 = 1;
/// Bytes of the header at the start of every segment file.
pub const SEGMENT_HEADER_LEN: u64 = 8;
/// Bytes of the header in front of every record's body.
pub const RECORD_HEADER_LEN: u64 = 20;
/// Upper bound of a segment's size, before `max_bytes / 8` lowers it.
pub const SEGMENT_MAX: u64 = 1 << 20;

const SEGMENT_MAGIC: &[u8; 6] = b"VIGSPL";
const ACK_MAGIC: &[u8; 6] = b"VIGACK";
const ACK_FILE_LEN: usize = 20;
const ACK_FILE: &str = "ack";
const LOCK_FILE: &str = "lock";
const SEGMENT_SUFFIX: &str = ".seg";
/// [`durable::write_atomic`]'s temp-file prefix for the ack file; stale ones are removed.
const ACK_TMP_PREFIX: &str = ".ack.tmp.";

/// An error from the spool; every variant names the file or directory involved.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool directory could not be created or listed.
    #[error("spool directory {path}")]
    Dir {
        /// The spool directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the spool's lock.
    #[error("spool directory {path} is in use by another process")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A record that could not fit even in an empty spool.
    #[error("heartbeat {seq} needs {size} bytes in the spool, more than spool_max ({max_bytes})")]
    TooLarge {
        /// The refused record's `seq`.
        seq: u64,
        /// Bytes it would take, segment header included.
        size: u64,
        /// The spool's bound.
        max_bytes: u64,
    },
    /// A `seq` not above every `seq` the spool has seen.
    #[error("heartbeat seq {seq} is not above the spool's newest seq {last}")]
    SeqNotIncreasing {
        /// The refused `seq`.
        seq: u64,
        /// The newest `seq` appended or acknowledged.
        last: u64,
    },
    /// Reading a spool file failed (not corruption: an I/O error).
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Writing, truncating, syncing, renaming or removing a spool file failed.
    #[error("writing {path}")]
    Write {
        /// The file (or the directory, for a failed directory fsync).
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl SpoolError {
    /// True when the cause is a full file system (`ENOSPC`) or a quota (`EDQUOT`).
    pub fn is_disk_full(&self) -> bool {
        match self {
            SpoolError::Write { source, .. } | SpoolError::Dir { source, .. } => {
                matches!(
                    source.kind(),
                    io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
                )
            }
            _ => false,
        }
    }
}

/// A snapshot of the spool's size and counters (for metrics and `/health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolStats {
    /// Records not yet acknowledged.
    pub records: u64,
    /// Bytes of segment files, the quantity bounded by `max_bytes`.
    pub bytes: u64,
    /// Unacknowledged records deleted to keep within `max_bytes`, since open.
    pub dropped_total: u64,
    /// Corrupt records, unframeable tails, set-aside files and a corrupt `ack` file
    /// skipped since open (recovery included).
    pub corrupt_skipped_total: u64,
}

/// Where one readable, unacknowledged record lives.
#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: u64,
    /// Offset of the record header in its segment.
    offset: u64,
    /// Body length.
    len: u32,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// File size as this process wrote or truncated it.
    len: u64,
    /// Unacknowledged readable records, in `seq` order.
    entries: VecDeque<Entry>,
}

/// The durable FIFO of heartbeat bodies; see the module doc for the design.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_max: u64,
    /// Oldest first; every one holds at least one unacknowledged record, except the
    /// newest right after a record was refused (never between calls otherwise).
    segments: VecDeque<Segment>,
    /// The newest segment, open for appends. `None` when there is no segment or the newest
    /// was sealed after a write error; the next append then starts a new segment.
    writer: Option<File>,
    /// Every record with `seq <= acked` has been delivered.
    acked: u64,
    /// The highest `seq` appended, read back or acknowledged; appends must exceed it.
    last_seq: u64,
    bytes: u64,
    records: u64,
    dropped_total: u64,
    corrupt_skipped_total: u64,
    /// Reused encode buffer, so an append allocates nothing in the steady state.
    buf: Vec<u8>,
    /// Held for the spool's lifetime; dropping it (or the process dying) releases the
    /// `flock`, so a SIGKILLed agent does not lock out its successor.
    _lock: Flock<File>,
}

impl Spool {
    /// Opens (creating it if needed) the spool in `dir`, bounded by `max_bytes`, and runs
    /// recovery as the module doc describes.
    ///
    /// # Errors
    /// [`SpoolError::Dir`] when the directory cannot be created or listed,
    /// [`SpoolError::Locked`] when another process has it open, and [`SpoolError::Read`] /
    /// [`SpoolError::Write`] for I/O errors during recovery. Corruption is not an error: it
    /// is skipped and counted.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        let dir_err = |source| SpoolError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(dir_err)?;
        let lock = lock_dir(dir)?;

        let mut corrupt = 0;
        let acked = read_ack(dir, &mut corrupt)?;

        let mut names = Vec::new();
        for dent in fs::read_dir(dir).map_err(dir_err)? {
            let name = dent.map_err(dir_err)?.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = parse_segment_name(&name) {
                names.push((first, name.into_owned()));
            } else if name.starts_with(ACK_TMP_PREFIX) {
                // A temp file of an ack write that died before its rename; we hold the
                // lock, so no writer owns it.
                let path = dir.join(&*name);
                fs::remove_file(&path).map_err(|source| SpoolError::Write { path, source })?;
            } else if name != ACK_FILE && name != LOCK_FILE && !name.ends_with(".bad") {
                warn!(dir = %dir.display(), file = %name, "ignoring a foreign file in the spool");
            }
        }
        names.sort_unstable();

        let mut segments = VecDeque::with_capacity(names.len());
        let mut last_file = None;
        let mut last_valid = acked;
        let mut removed_any = false;
        for (_, name) in names {
            let path = dir.join(name);
            let Some((segment, file)) =
                recover_segment(path, acked, &mut last_valid, &mut corrupt)?
            else {
                removed_any = true;
                continue;
            };
            segments.push_back(segment);
            last_file = Some(file);
        }

        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_max: segment_max(max_bytes),
            bytes: segments.iter().map(|s| s.len).sum(),
            records: segments.iter().map(|s| s.entries.len() as u64).sum(),
            segments,
            writer: last_file,
            acked,
            last_seq: last_valid,
            dropped_total: 0,
            corrupt_skipped_total: corrupt,
            buf: Vec::new(),
            _lock: lock,
        };
        removed_any |= spool.remove_empty_segments()?;
        if removed_any {
            spool.sync_dir()?;
        }
        Ok(spool)
    }

    /// Appends one record and makes it durable (fdatasync; plus a directory fsync when a
    /// segment is created). Drops the oldest whole segments first if the record would
    /// take the spool past `max_bytes`.
    ///
    /// # Errors
    /// [`SpoolError::SeqNotIncreasing`], [`SpoolError::TooLarge`], or [`SpoolError::Write`]
    /// (see [`SpoolError::is_disk_full`]). On error the record is not in the spool and
    /// nothing already spooled is lost (drops made to fit the record are kept and counted).
    pub fn append(&mut self, seq: u64, body: &[u8]) -> Result<(), SpoolError> {
        if seq <= self.last_seq {
            return Err(SpoolError::SeqNotIncreasing {
                seq,
                last: self.last_seq,
            });
        }
        let record_len = RECORD_HEADER_LEN + body.len() as u64;
        let body_len = u32::try_from(body.len()).ok();
        let Some(body_len) = body_len.filter(|_| SEGMENT_HEADER_LEN + record_len <= self.max_bytes)
        else {
            return Err(SpoolError::TooLarge {
                seq,
                size: SEGMENT_HEADER_LEN + record_len,
                max_bytes: self.max_bytes,
            });
        };

        let mut dropped = false;
        let new_segment = loop {
            let new_segment = self.needs_new_segment(record_len);
            let needed = record_len + if new_segment { SEGMENT_HEADER_LEN } else { 0 };
            if self.bytes + needed <= self.max_bytes || self.segments.is_empty() {
                // With no segment left, `needed <= max_bytes` by the TooLarge check.
                break new_segment;
            }
            self.drop_oldest()?;
            dropped = true;
        };
        if dropped {
            self.sync_dir()?;
        }

        self.buf.clear();
        if new_segment {
            self.buf.extend_from_slice(SEGMENT_MAGIC);
            self.buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        }
        encode_record(seq, body, &mut self.buf);

        let entry;
        if new_segment {
            let path = self.dir.join(segment_name(seq));
            let file = create_segment(&path, &self.buf)?;
            if let Err(e) = self.sync_dir() {
                // The name may not survive a power cut, so the record is not durable;
                // take it back rather than report a record that could vanish.
                let _ = fs::remove_file(&path);
                return Err(e);
            }
            entry = Entry {
                seq,
                offset: SEGMENT_HEADER_LEN,
                len: body_len,
            };
            self.segments.push_back(Segment {
                path,
                len: self.buf.len() as u64,
                entries: VecDeque::new(),
            });
            self.writer = Some(file);
        } else {
            // `needs_new_segment` is false only with a writer and a newest segment.
            let (Some(writer), Some(segment)) = (&self.writer, self.segments.back()) else {
                return Err(unreachable_state(&self.dir, "append without a writer"));
            };
            let offset = segment.len;
            let written = writer
                .write_all_at(&self.buf, offset)
                .and_then(|()| writer.sync_data());
            if let Err(source) = written {
                // Cut the partial record off so the next record frames cleanly; ftruncate
                // to a smaller size needs no free space. If even that fails, seal the
                // segment: its torn tail is cut off at the next open.
                if writer.set_len(offset).is_err() {
                    self.writer = None;
                }
                return Err(SpoolError::Write {
                    path: segment.path.clone(),
                    source,
                });
            }
            entry = Entry {
                seq,
                offset,
                len: body_len,
            };
        }
        let Some(segment) = self.segments.back_mut() else {
            return Err(unreachable_state(&self.dir, "no segment after append"));
        };
        if !new_segment {
            segment.len += self.buf.len() as u64;
        }
        segment.entries.push_back(entry);
        self.bytes += self.buf.len() as u64;
        self.records += 1;
        self.last_seq = seq;
        Ok(())
    }

    /// Reads up to `n` of the oldest unacknowledged records, in `seq` order, without
    /// removing them. A record that fails its checksums now (bit rot since it was
    /// written) is skipped, counted and forgotten; a segment file that has disappeared
    /// counts all its records as corrupt.
    ///
    /// # Errors
    /// [`SpoolError::Read`] on an I/O error; the spool is unchanged then.
    pub fn peek_oldest(&mut self, n: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let mut out = Vec::new();
        let mut lost = 0;
        for segment in &mut self.segments {
            if out.len() >= n {
                break;
            }
            let file = match File::open(&segment.path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    error!(
                        file = %segment.path.display(),
                        records = segment.entries.len(),
                        "spool segment disappeared; its heartbeats are lost"
                    );
                    lost += segment.entries.len() as u64;
                    segment.entries.clear();
                    continue;
                }
                Err(source) => {
                    return Err(SpoolError::Read {
                        path: segment.path.clone(),
                        source,
                    });
                }
            };
            let mut keep = VecDeque::with_capacity(segment.entries.len());
            let mut failed = None;
            for entry in segment.entries.drain(..) {
                if out.len() >= n || failed.is_some() {
                    keep.push_back(entry);
                    continue;
                }
                match read_entry(&file, &entry) {
                    Ok(Some(body)) => {
                        out.push((entry.seq, body));
                        keep.push_back(entry);
                    }
                    Ok(None) => {
                        error!(
                            file = %segment.path.display(),
                            offset = entry.offset,
                            seq = entry.seq,
                            "spooled heartbeat failed its checksum; skipped"
                        );
                        lost += 1;
                    }
                    Err(source) => {
                        keep.push_back(entry);
                        failed = Some(source);
                    }
                }
            }
            segment.entries = keep;
            if let Some(source) = failed {
                let path = segment.path.clone();
                self.records -= lost;
                self.corrupt_skipped_total += lost;
                return Err(SpoolError::Read { path, source });
            }
        }
        self.records -= lost;
        self.corrupt_skipped_total += lost;
        Ok(out)
    }

    /// Acknowledges every record with `seq <= up_to_seq`: they are never returned again,
    /// also after a restart. Segments left with nothing unacknowledged are deleted. An
    /// `up_to_seq` beyond the newest record is allowed; later appends must exceed it.
    ///
    /// # Errors
    /// [`SpoolError::Write`] when a segment cannot be deleted or the `ack` file cannot be
    /// written. The acknowledgement holds in memory regardless; after a crash at worst some
    /// delivered records are delivered again.
    pub fn ack(&mut self, up_to_seq: u64) -> Result<(), SpoolError> {
        if up_to_seq <= self.acked {
            return Ok(());
        }
        self.acked = up_to_seq;
        self.last_seq = self.last_seq.max(up_to_seq);
        'segments: for segment in &mut self.segments {
            while let Some(entry) = segment.entries.front() {
                if entry.seq > up_to_seq {
                    break 'segments;
                }
                segment.entries.pop_front();
                self.records -= 1;
            }
        }
        if self.remove_empty_segments()? {
            self.sync_dir()?;
        }
        let path = self.dir.join(ACK_FILE);
        durable::write_atomic(&path, &encode_ack(up_to_seq))
            .map_err(|source| SpoolError::Write { path, source })
    }

    /// Size and counters; see [`SpoolStats`].
    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            records: self.records,
            bytes: self.bytes,
            dropped_total: self.dropped_total,
            corrupt_skipped_total: self.corrupt_skipped_total,
        }
    }

    /// Records not yet acknowledged.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Bytes of segment files (bounded by `max_bytes`).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Unacknowledged records deleted to stay within `max_bytes`, since open.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    /// Corrupt records (and set-aside files) skipped since open, recovery included.
    pub fn corrupt_skipped_total(&self) -> u64 {
        self.corrupt_skipped_total
    }

    /// The highest `seq` appended, recovered or acknowledged (0 for a new spool); the next
    /// append must exceed it.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The highest acknowledged `seq` (0 when none).
    pub fn acked_seq(&self) -> u64 {
        self.acked
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn needs_new_segment(&self, record_len: u64) -> bool {
        match (&self.writer, self.segments.back()) {
            (Some(_), Some(segment)) => {
                segment.len > SEGMENT_HEADER_LEN && segment.len + record_len > self.segment_max
            }
            _ => true,
        }
    }

    /// Deletes the oldest segment and counts its unacknowledged records as dropped. The
    /// caller fsyncs the directory.
    fn drop_oldest(&mut self) -> Result<(), SpoolError> {
        let Some(segment) = self.segments.front() else {
            return Ok(());
        };
        remove_file(&segment.path)?;
        let dropped = segment.entries.len() as u64;
        if let (Some(first), Some(last)) = (segment.entries.front(), segment.entries.back()) {
            warn!(
                file = %segment.path.display(),
                dropped,
                first_seq = first.seq,
                last_seq = last.seq,
                max_bytes = self.max_bytes,
                "spool full: dropped the oldest heartbeats"
            );
        }
        self.dropped_total += dropped;
        self.records -= dropped;
        self.bytes -= segment.len;
        self.segments.pop_front();
        if self.segments.is_empty() {
            self.writer = None;
        }
        Ok(())
    }

    /// Deletes every segment without an unacknowledged record; returns whether any was
    /// deleted (the caller fsyncs the directory). A segment that cannot be deleted stays
    /// indexed (empty) and is retried next time.
    fn remove_empty_segments(&mut self) -> Result<bool, SpoolError> {
        let mut removed = false;
        let mut first_err = None;
        let newest = self.segments.len();
        let mut index = 0;
        let mut writer_gone = false;
        self.segments.retain(|segment| {
            index += 1;
            if !segment.entries.is_empty() {
                return true;
            }
            match remove_file(&segment.path) {
                Ok(()) => {
                    removed = true;
                    writer_gone |= index == newest;
                    false
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                    true
                }
            }
        });
        self.bytes = self.segments.iter().map(|s| s.len).sum();
        if writer_gone {
            self.writer = None;
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }

    fn sync_dir(&self) -> Result<(), SpoolError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| SpoolError::Write {
                path: self.dir.clone(),
                source,
            })
    }
}

/// The segment size limit for a spool bounded by `max_bytes`: small enough that dropping
/// one segment frees at most an eighth of the spool, and at most 1 MiB.
pub fn segment_max(max_bytes: u64) -> u64 {
    SEGMENT_MAX.min(max_bytes / 8)
}

fn unreachable_state(dir: &Path, what: &'static str) -> SpoolError {
    SpoolError::Write {
        path: dir.to_path_buf(),
        source: io::Error::other(format!("spool state: {what}")),
    }
}

fn lock_dir(dir: &Path) -> Result<Flock<File>, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|source| SpoolError::Write {
            path: path.clone(),
            source,
        })?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == Errno::EWOULDBLOCK {
            SpoolError::Locked { path }
        } else {
            SpoolError::Write {
                path,
                source: errno.into(),
            }
        }
    })
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn remove_file(path: &Path) -> Result<(), SpoolError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        // Already gone is what we wanted.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SpoolError::Write {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Creates a segment holding `bytes` (header and first record) durably, or removes it.
fn create_segment(path: &Path, bytes: &[u8]) -> Result<File, SpoolError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| SpoolError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    if let Err(source) = file.write_all_at(bytes, 0).and_then(|()| file.sync_data()) {
        // Best effort: the file holds no record anyone was told about; if it stays,
        // recovery removes or truncates it.
        let _ = fs::remove_file(path);
        return Err(SpoolError::Write {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(file)
}

/// A decoded record header whose own checksum matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RecordHeader {
    len: u32,
    seq: u64,
    body_crc: u32,
}

fn encode_record(seq: u64, body: &[u8], out: &mut Vec<u8>) {
    // The caller checked that the body fits a u32.
    let len = body.len() as u32;
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    let head_crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&head_crc.to_le_bytes());
    out.extend_from_slice(body);
}

fn decode_header(h: &[u8; RECORD_HEADER_LEN as usize]) -> Option<RecordHeader> {
    let [
        l0,
        l1,
        l2,
        l3,
        s0,
        s1,
        s2,
        s3,
        s4,
        s5,
        s6,
        s7,
        b0,
        b1,
        b2,
        b3,
        c0,
        c1,
        c2,
        c3,
    ] = *h;
    if crc32fast::hash(&h[..16]) != u32::from_le_bytes([c0, c1, c2, c3]) {
        return None;
    }
    Some(RecordHeader {
        len: u32::from_le_bytes([l0, l1, l2, l3]),
        seq: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        body_crc: u32::from_le_bytes([b0, b1, b2, b3]),
    })
}

/// Reads one indexed record back; `Ok(None)` when it no longer checks out.
fn read_entry(file: &File, entry: &Entry) -> io::Result<Option<Vec<u8>>> {
    let mut head = [0u8; RECORD_HEADER_LEN as usize];
    let mut body = vec![0u8; entry.len as usize];
    let read = file
        .read_exact_at(&mut head, entry.offset)
        .and_then(|()| file.read_exact_at(&mut body, entry.offset + RECORD_HEADER_LEN));
    match read {
        Ok(()) => {}
        // Shortened behind our back: that record is gone, not an I/O failure.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let good = decode_header(&head).is_some_and(|h| {
        h.seq == entry.seq && h.len == entry.len && h.body_crc == crc32fast::hash(&body)
    });
    Ok(good.then_some(body))
}

/// Scans one segment file (module doc, "Recovery"). Returns `None` when the file was
/// removed or set aside, else the segment and the file opened for reading and writing.
fn recover_segment(
    path: PathBuf,
    acked: u64,
    last_valid: &mut u64,
    corrupt: &mut u64,
) -> Result<Option<(Segment, File)>, SpoolError> {
    let read_err = |source| SpoolError::Read {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(read_err)?;
    let file_len = file.metadata().map_err(read_err)?.len();
    if file_len < SEGMENT_HEADER_LEN {
        warn!(
            file = %path.display(),
            bytes = file_len,
            "removing a spool segment cut short at creation"
        );
        remove_file(&path)?;
        return Ok(None);
    }

    let mut reader = BufReader::with_capacity(64 * 1024, &file);
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    reader.read_exact(&mut header).map_err(read_err)?;
    let version = u16::from_le_bytes([header[6], header[7]]);
    if &header[..6] != SEGMENT_MAGIC || version == 0 || version > FORMAT_VERSION {
        let bad = path.with_extension("seg.bad");
        error!(
            file = %path.display(),
            version,
            set_aside = %bad.display(),
            "spool segment has a bad magic or an unknown format version; set aside"
        );
        fs::rename(&path, &bad).map_err(|source| SpoolError::Write {
            path: path.clone(),
            source,
        })?;
        *corrupt += 1;
        return Ok(None);
    }

    let mut entries = VecDeque::new();
    let mut offset = SEGMENT_HEADER_LEN;
    let mut body = Vec::new();
    let torn = loop {
        let remaining = file_len - offset;
        if remaining == 0 {
            break None;
        }
        if remaining < RECORD_HEADER_LEN {
            break Some("record header cut short");
        }
        let mut head = [0u8; RECORD_HEADER_LEN as usize];
        reader.read_exact(&mut head).map_err(read_err)?;
        let Some(h) = decode_header(&head) else {
            break Some("record header checksum mismatch; framing lost");
        };
        if u64::from(h.len) > remaining - RECORD_HEADER_LEN {
            break Some("record body cut short");
        }
        body.resize(h.len as usize, 0);
        reader.read_exact(&mut body).map_err(read_err)?;
        let record_offset = offset;
        offset += RECORD_HEADER_LEN + u64::from(h.len);
        let problem = if crc32fast::hash(&body) != h.body_crc {
            Some("record body checksum mismatch")
        } else if h.seq <= *last_valid && h.seq > acked {
            Some("record seq out of order")
        } else {
            None
        };
        if let Some(problem) = problem {
            error!(
                file = %path.display(),
                offset = record_offset,
                seq = h.seq,
                "{problem}; record skipped"
            );
            *corrupt += 1;
            continue;
        }
        *last_valid = (*last_valid).max(h.seq);
        if h.seq > acked {
            entries.push_back(Entry {
                seq: h.seq,
                offset: record_offset,
                len: h.len,
            });
        }
    };
    drop(reader);

    let mut len = file_len;
    if let Some(problem) = torn {
        error!(
            file = %path.display(),
            offset,
            bytes = file_len - offset,
            "{problem}; the rest of the segment is skipped and cut off"
        );
        *corrupt += 1;
        file.set_len(offset)
            .and_then(|()| file.sync_all())
            .map_err(|source| SpoolError::Write {
                path: path.clone(),
                source,
            })?;
        len = offset;
    }
    Ok(Some((Segment { path, len, entries }, file)))
}

fn encode_ack(acked: u64) -> [u8; ACK_FILE_LEN] {
    let mut out = [0u8; ACK_FILE_LEN];
    out[..6].copy_from_slice(ACK_MAGIC);
    out[6..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[8..16].copy_from_slice(&acked.to_le_bytes());
    let crc = crc32fast::hash(&out[..16]);
    out[16..].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode_ack(bytes: &[u8]) -> Option<u64> {
    let bytes: &[u8; ACK_FILE_LEN] = bytes.try_into().ok()?;
    let version = u16::from_le_bytes([bytes[6], bytes[7]]);
    let crc = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    if &bytes[..6] != ACK_MAGIC || version == 0 || version > FORMAT_VERSION {
        return None;
    }
    if crc32fast::hash(&bytes[..16]) != crc {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[8..16]);
    Some(u64::from_le_bytes(seq))
}

/// The acknowledged `seq` from the `ack` file: 0 when there is none; a corrupt one is set
/// aside, counted, and read as 0.
fn read_ack(dir: &Path, corrupt: &mut u64) -> Result<u64, SpoolError> {
    let path = dir.join(ACK_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(SpoolError::Read { path, source }),
    };
    if let Some(acked) = decode_ack(&bytes) {
        return Ok(acked);
    }
    let bad = dir.join("ack.bad");
    error!(
        file = %path.display(),
        set_aside = %bad.display(),
        "spool ack file is corrupt; set aside, spooled heartbeats may be delivered twice"
    );
    fs::rename(&path, &bad).map_err(|source| SpoolError::Write {
        path: path.clone(),
        source,
    })?;
    *corrupt += 1;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use proptest::prelude::*;

    use super::*;

    fn body(seq: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i as u8))
            .collect()
    }

    fn all(spool: &mut Spool) -> Vec<(u64, Vec<u8>)> {
        spool.peek_oldest(usize::MAX).unwrap()
    }

    fn seqs(spool: &mut Spool) -> Vec<u64> {
        all(spool).into_iter().map(|(s, _)| s).collect()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|d| d.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        v.sort();
        v
    }

    // --- framing ---

    #[test]
    fn record_round_trips_and_header_layout_is_as_documented() {
        let mut buf = Vec::new();
        encode_record(0x0102_0304_0506_0708, b"hello", &mut buf);
        assert_eq!(buf.len() as u64, RECORD_HEADER_LEN + 5);
        assert_eq!(&buf[0..4], &5u32.to_le_bytes());
        assert_eq!(&buf[4..12], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&buf[12..16], &crc32fast::hash(b"hello").to_le_bytes());
        assert_eq!(&buf[20..], b"hello");
        let head: [u8; 20] = buf[..20].try_into().unwrap();
        assert_eq!(
            decode_header(&head),
            Some(RecordHeader {
                len: 5,
                seq: 0x0102_0304_0506_0708,
                body_crc: crc32fast::hash(b"hello"),
            })
        );
    }

    #[test]
    fn every_single_bit_flip_in_a_header_is_detected() {
        let mut buf = Vec::new();
        encode_record(42, b"body", &mut buf);
        for bit in 0..(RECORD_HEADER_LEN as usize * 8) {
            let mut head: [u8; 20] = buf[..20].try_into().unwrap();
            head[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(decode_header(&head), None, "bit {bit}");
        }
    }

    #[test]
    fn a_zero_filled_header_is_not_a_record() {
        assert_eq!(decode_header(&[0; 20]), None);
    }

    #[test]
    fn ack_file_round_trips_and_rejects_damage() {
        let bytes = encode_ack(77);
        assert_eq!(decode_ack(&bytes), Some(77));
        for i in 0..bytes.len() {
            let mut b = bytes;
            b[i] ^= 0x10;
            assert_eq!(decode_ack(&b), None, "byte {i}");
        }
        assert_eq!(decode_ack(&bytes[..19]), None);
        let mut newer = bytes;
        newer[6..8].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let crc = crc32fast::hash(&newer[..16]);
        newer[16..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_ack(&newer), None);
    }

    #[test]
    fn segment_names_sort_in_seq_order_and_foreign_names_are_not_segments() {
        assert_eq!(segment_name(7), "00000000000000000007.seg");
        assert!(segment_name(9) < segment_name(10));
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_name("7.seg"), None);
        assert_eq!(parse_segment_name("0000000000000000000x.seg"), None);
        assert_eq!(parse_segment_name("00000000000000000007.seg.bad"), None);
    }

    #[test]
    fn segment_max_is_an_eighth_capped_at_one_mib() {
        assert_eq!(segment_max(64 << 20), 1 << 20);
        assert_eq!(segment_max(800), 100);
    }

    // --- lifecycle ---

    #[test]
    fn append_peek_ack_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        for seq in 1..=5 {
            spool.append(seq, &body(seq, 10)).unwrap();
        }
        assert_eq!(
            spool.peek_oldest(2).unwrap(),
            vec![(1, body(1, 10)), (2, body(2, 10))]
        );
        spool.ack(2).unwrap();
        assert_eq!(seqs(&mut spool), [3, 4, 5]);
        assert_eq!(
            spool.stats(),
            SpoolStats {
                records: 3,
                bytes: SEGMENT_HEADER_LEN + 5 * (RECORD_HEADER_LEN + 10),
                dropped_total: 0,
                corrupt_skipped_total: 0,
            }
        );
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(seqs(&mut spool), [3, 4, 5]);
        assert_eq!(spool.last_seq(), 5);
        assert_eq!(spool.acked_seq(), 2);
        spool.ack(5).unwrap();
        assert_eq!(spool.stats().records, 0);
        assert_eq!(spool.stats().bytes, 0);
        assert!(
            segment_files(dir.path()).is_empty(),
            "fully acked segments are deleted"
        );
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(seqs(&mut spool).is_empty());
        assert_eq!(spool.last_seq(), 5, "the ack file keeps seq monotonic");
    }

    #[test]
    fn seq_must_increase() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(matches!(
            spool.append(0, b"x"),
            Err(SpoolError::SeqNotIncreasing { seq: 0, last: 0 })
        ));
        spool.append(3, b"x").unwrap();
        assert!(matches!(
            spool.append(3, b"y"),
            Err(SpoolError::SeqNotIncreasing { seq: 3, last: 3 })
        ));
        spool.ack(10).unwrap();
        assert!(matches!(
            spool.append(9, b"y"),
            Err(SpoolError::SeqNotIncreasing { .. })
        ));
        spool.append(11, b"y").unwrap();
        assert_eq!(seqs(&mut spool), [11]);
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(matches!(
            Spool::open(dir.path(), 1 << 20),
            Err(SpoolError::Locked { .. })
        ));
    }

    #[test]
    fn segments_rotate_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        // segment_max = 100: one 8-byte header plus three 30-byte records fit in 98.
        let mut spool = Spool::open(dir.path(), 800).unwrap();
        for seq in 1..=7 {
            spool.append(seq, &body(seq, 10)).unwrap();
        }
        let names: Vec<_> = segment_files(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [segment_name(1), segment_name(4), segment_name(7)],
            "named by their first seq"
        );
    }

    // --- caps ---

    #[test]
    fn overflow_drops_the_oldest_whole_segment_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        // Three 30-byte records a segment (98 bytes); 8 segments fit in 800 bytes.
        let mut spool = Spool::open(dir.path(), 800).unwrap();
        for seq in 1..=24 {
            spool.append(seq, &body(seq, 10)).unwrap();
        }
        assert_eq!(spool.stats().dropped_total, 0);
        assert_eq!(spool.bytes(), 8 * 98);
        spool.append(25, &body(25, 10)).unwrap();
        assert_eq!(spool.dropped_total(), 3);
        assert_eq!(seqs(&mut spool), (4..=25).collect::<Vec<_>>());
        assert!(spool.bytes() <= 800);
    }

    #[test]
    fn acknowledged_records_are_not_counted_as_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 800).unwrap();
        for seq in 1..=24 {
            spool.append(seq, &body(seq, 10)).unwrap();
        }
        spool.ack(2).unwrap();
        spool.append(25, &body(25, 10)).unwrap();
        assert_eq!(
            spool.dropped_total(),
            1,
            "only seq 3 of the first segment was pending"
        );
        assert_eq!(seqs(&mut spool)[0], 4);
    }

    #[test]
    fn a_record_larger_than_the_spool_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 100).unwrap();
        spool.append(1, &body(1, 72)).unwrap(); // 8 + 20 + 72 = 100: fits exactly
        let before = spool.stats();
        assert!(matches!(
            spool.append(2, &body(2, 73)),
            Err(SpoolError::TooLarge {
                seq: 2,
                size: 101,
                max_bytes: 100
            })
        ));
        assert_eq!(spool.stats(), before);
        assert_eq!(seqs(&mut spool), [1]);
    }

    #[test]
    fn a_big_record_replaces_everything_when_it_must() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 400).unwrap();
        for seq in 1..=4 {
            spool.append(seq, &body(seq, 30)).unwrap();
        }
        spool.append(5, &body(5, 372)).unwrap();
        assert_eq!(spool.dropped_total(), 4);
        assert_eq!(all(&mut spool), [(5, body(5, 372))]);
        assert_eq!(spool.bytes(), 400);
    }

    // --- recovery ---

    /// Three records in one segment; returns the segment path and the offsets of records.
    fn three_records(dir: &Path) -> (PathBuf, [u64; 3]) {
        let mut spool = Spool::open(dir, 1 << 20).unwrap();
        for seq in 1..=3 {
            spool.append(seq, &body(seq, 40)).unwrap();
        }
        let rec = RECORD_HEADER_LEN + 40;
        let h = SEGMENT_HEADER_LEN;
        (segment_files(dir).remove(0), [h, h + rec, h + 2 * rec])
    }

    #[test]
    fn a_torn_tail_at_every_cut_point_loses_only_the_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let (seg, offsets) = three_records(dir.path());
        let full = fs::read(&seg).unwrap();
        for cut in offsets[2] + 1..full.len() as u64 {
            fs::write(&seg, &full[..cut as usize]).unwrap();
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(seqs(&mut spool), [1, 2], "cut at {cut}");
            assert_eq!(spool.corrupt_skipped_total(), 1);
            assert_eq!(
                fs::metadata(&seg).unwrap().len(),
                offsets[2],
                "tail cut off"
            );
            // Appends continue on a clean frame and survive a restart.
            spool.append(4, &body(4, 40)).unwrap();
            drop(spool);
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(seqs(&mut spool), [1, 2, 4]);
            assert_eq!(spool.corrupt_skipped_total(), 0);
        }
    }

    #[test]
    fn a_cut_exactly_between_records_is_not_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (seg, offsets) = three_records(dir.path());
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(offsets[2]).unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(seqs(&mut spool), [1, 2]);
        assert_eq!(spool.corrupt_skipped_total(), 0);
    }

    #[test]
    fn every_flipped_byte_is_caught_and_never_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let (seg, offsets) = three_records(dir.path());
        let full = fs::read(&seg).unwrap();
        for i in 0..full.len() {
            let mut damaged = full.clone();
            damaged[i] ^= 0x5a;
            fs::write(&seg, &damaged).unwrap();
            let _ = fs::remove_file(dir.path().join("00000000000000000001.seg.bad"));
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            let got = all(&mut spool);
            for (seq, b) in &got {
                assert_eq!(b, &body(*seq, 40), "byte {i}: garbage delivered");
            }
            let got: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
            let i = i as u64;
            let expected: Vec<u64> = if i < SEGMENT_HEADER_LEN {
                vec![] // segment header: the file is set aside
            } else {
                let hit = offsets.iter().rposition(|&o| o <= i).unwrap();
                let in_header = i < offsets[hit] + RECORD_HEADER_LEN;
                (1..=3u64)
                    .filter(|&s| {
                        let r = s as usize - 1;
                        // A header hit loses the rest of the segment; a body hit loses one.
                        if in_header { r < hit } else { r != hit }
                    })
                    .collect()
            };
            assert_eq!(got, expected, "byte {i}");
            assert_eq!(spool.corrupt_skipped_total(), 1, "byte {i}");
            drop(spool);
            // Recovery may have cut, deleted or set aside the file: restore it.
            fs::write(&seg, &full).unwrap();
        }
    }

    #[test]
    fn an_out_of_order_record_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (seg, _) = three_records(dir.path());
        // A record with a valid frame but an old seq, appended by something that is not us.
        let mut extra = Vec::new();
        encode_record(2, &body(2, 40), &mut extra);
        let mut bytes = fs::read(&seg).unwrap();
        bytes.extend_from_slice(&extra);
        fs::write(&seg, &bytes).unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(seqs(&mut spool), [1, 2, 3]);
        assert_eq!(spool.corrupt_skipped_total(), 1);
    }

    #[test]
    fn bit_rot_after_open_is_caught_at_peek() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        for seq in 1..=3 {
            spool.append(seq, &body(seq, 40)).unwrap();
        }
        let seg = segment_files(dir.path()).remove(0);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[(SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 60 + 5) as usize] ^= 1;
        fs::write(&seg, &bytes).unwrap();
        assert_eq!(seqs(&mut spool), [1, 3]);
        assert_eq!(spool.stats().records, 2);
        assert_eq!(spool.corrupt_skipped_total(), 1);
        assert_eq!(seqs(&mut spool), [1, 3], "counted once");
        assert_eq!(spool.corrupt_skipped_total(), 1);
    }

    #[test]
    fn a_newer_segment_version_is_set_aside_not_destroyed() {
        let dir = tempfile::tempdir().unwrap();
        let (seg, _) = three_records(dir.path());
        let mut bytes = fs::read(&seg).unwrap();
        bytes[6..8].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        fs::write(&seg, &bytes).unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(seqs(&mut spool).is_empty());
        assert_eq!(fs::read(seg.with_extension("seg.bad")).unwrap(), bytes);
        spool.append(4, b"x").unwrap();
    }

    // --- model (vector disk_v2 tests/model style) ---

    #[derive(Debug, Clone)]
    enum Action {
        Append(usize),
        /// Acknowledge up to the k-th oldest record (0: nothing).
        Ack(usize),
        Restart,
        /// Restart with one byte of the newest record's body flipped.
        CorruptTail(usize),
        /// Restart with the newest record's last (n % its size + 1) bytes cut off.
        TruncateTail(usize),
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            12 => (1..400usize).prop_map(Action::Append),
            4 => (0..6usize).prop_map(Action::Ack),
            2 => Just(Action::Restart),
            1 => any::<usize>().prop_map(Action::CorruptTail),
            1 => any::<usize>().prop_map(Action::TruncateTail),
        ]
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum State {
        Pending,
        Acked,
        /// Unreadable on disk; recovery counts it again at every open.
        Dead,
    }

    #[derive(Debug)]
    struct ModelSegment {
        name: u64,
        len: u64,
        /// (seq, body length, state), in file order.
        items: Vec<(u64, usize, State)>,
    }

    /// The documented behaviour, written as simply as possible.
    #[derive(Debug)]
    struct Model {
        max: u64,
        segments: VecDeque<ModelSegment>,
        dropped: u64,
        corrupt: u64,
        /// The newest segment is not open for appends (it was deleted when fully acked,
        /// so the next append starts a new segment even if older ones remain).
        sealed: bool,
    }

    impl Model {
        fn pending(&self) -> Vec<(u64, usize)> {
            self.segments
                .iter()
                .flat_map(|s| s.items.iter())
                .filter(|i| i.2 == State::Pending)
                .map(|i| (i.0, i.1))
                .collect()
        }

        fn append(&mut self, seq: u64, len: usize) -> bool {
            let rec = RECORD_HEADER_LEN + len as u64;
            if SEGMENT_HEADER_LEN + rec > self.max {
                return false;
            }
            loop {
                let new = self.sealed
                    || self.segments.back().is_none_or(|s| {
                        s.len > SEGMENT_HEADER_LEN && s.len + rec > segment_max(self.max)
                    });
                let used: u64 = self.segments.iter().map(|s| s.len).sum();
                let needed = rec + if new { SEGMENT_HEADER_LEN } else { 0 };
                if used + needed <= self.max {
                    if new {
                        self.sealed = false;
                        self.segments.push_back(ModelSegment {
                            name: seq,
                            len: SEGMENT_HEADER_LEN,
                            items: Vec::new(),
                        });
                    }
                    let s = self.segments.back_mut().unwrap();
                    s.len += rec;
                    s.items.push((seq, len, State::Pending));
                    return true;
                }
                let oldest = self.segments.pop_front().unwrap();
                if self.segments.is_empty() {
                    self.sealed = false;
                }
                self.dropped += oldest
                    .items
                    .iter()
                    .filter(|i| i.2 == State::Pending)
                    .count() as u64;
            }
        }

        fn ack(&mut self, up_to: u64) {
            for s in &mut self.segments {
                for i in &mut s.items {
                    if i.2 == State::Pending && i.0 <= up_to {
                        i.2 = State::Acked;
                    }
                }
            }
            self.gc();
        }

        fn gc(&mut self) {
            let live = |s: &ModelSegment| s.items.iter().any(|i| i.2 == State::Pending);
            if self.segments.back().is_some_and(|s| !live(s)) {
                self.sealed = true;
            }
            self.segments.retain(live);
        }

        fn restart(&mut self) {
            self.corrupt += self
                .segments
                .iter()
                .flat_map(|s| s.items.iter())
                .filter(|i| i.2 == State::Dead)
                .count() as u64;
            // Recovery reopens the newest segment for appends, unless gc deletes it.
            self.sealed = false;
            self.gc();
        }
    }

    fn check(spool: &mut Spool, model: &Model, dropped: u64, corrupt: u64) {
        let got = all(spool);
        let want = model.pending();
        assert_eq!(
            got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            want.iter().map(|(s, _)| *s).collect::<Vec<_>>()
        );
        for ((seq, b), (_, len)) in got.iter().zip(&want) {
            assert_eq!(b, &body(*seq, *len), "seq {seq} intact");
        }
        let stats = spool.stats();
        assert_eq!(stats.records, want.len() as u64);
        assert_eq!(
            stats.bytes,
            model.segments.iter().map(|s| s.len).sum::<u64>()
        );
        assert!(stats.bytes <= model.max);
        assert_eq!(dropped + stats.dropped_total, model.dropped, "drops");
        assert_eq!(
            corrupt + stats.corrupt_skipped_total,
            model.corrupt,
            "corrupt"
        );
        assert_eq!(segment_files(spool.dir()).len(), model.segments.len());
    }

    proptest! {
        // Regression seeds live beside this file (spool.proptest-regressions), not in a
        // top-level directory of their own.
        #![proptest_config(ProptestConfig {
            cases: 48,
            failure_persistence: Some(Box::new(
                proptest::test_runner::FileFailurePersistence::SourceParallel("proptest-regressions"),
            )),
            ..ProptestConfig::default()
        })]

        #[test]
        fn spool_agrees_with_the_model(
            max in prop_oneof![Just(450u64), Just(1500), Just(8000)],
            actions in proptest::collection::vec(action(), 1..60),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut model = Model {
                max,
                segments: VecDeque::new(),
                dropped: 0,
                corrupt: 0,
                sealed: false,
            };
            let mut spool = Some(Spool::open(dir.path(), max).unwrap());
            // Counters of earlier incarnations: a real spool's counters start at open.
            let (mut dropped, mut corrupt) = (0, 0);
            let mut next_seq = 1;
            for action in actions {
                let s = spool.as_mut().unwrap();
                match action {
                    Action::Append(len) => {
                        let seq = next_seq;
                        next_seq += 1;
                        let accepted = model.append(seq, len);
                        let result = s.append(seq, &body(seq, len));
                        prop_assert_eq!(result.is_ok(), accepted, "{:?}", result);
                    }
                    Action::Ack(k) => {
                        let pending = model.pending();
                        if k > 0 && !pending.is_empty() {
                            let up_to = pending[(k - 1).min(pending.len() - 1)].0;
                            model.ack(up_to);
                            s.ack(up_to).unwrap();
                        }
                    }
                    Action::Restart | Action::CorruptTail(_) | Action::TruncateTail(_) => {
                        dropped += s.dropped_total();
                        corrupt += s.corrupt_skipped_total();
                        // Close it (releasing the lock) before damaging its files.
                        drop(spool.take());
                        if let Some(seg) = model.segments.back_mut() {
                            let path = dir.path().join(segment_name(seg.name));
                            let (_, len, state) = *seg.items.last().unwrap();
                            let rec = RECORD_HEADER_LEN + len as u64;
                            match action {
                                Action::CorruptTail(n) if state == State::Pending => {
                                    let mut bytes = fs::read(&path).unwrap();
                                    let at = (seg.len - len as u64) as usize + n % len;
                                    bytes[at] ^= 0xff;
                                    fs::write(&path, bytes).unwrap();
                                    seg.items.last_mut().unwrap().2 = State::Dead;
                                }
                                Action::TruncateTail(n) => {
                                    let f = OpenOptions::new().write(true).open(&path).unwrap();
                                    let cut = n as u64 % rec + 1;
                                    f.set_len(seg.len - cut).unwrap();
                                    seg.len -= rec;
                                    seg.items.pop();
                                    // A torn record is counted once, whatever it was; a
                                    // record cut off whole was simply never written.
                                    if cut < rec {
                                        model.corrupt += 1;
                                    }
                                }
                                _ => {}
                            }
                        }
                        model.restart();
                        spool = Some(Spool::open(dir.path(), max).unwrap());
                    }
                }
                check(spool.as_mut().unwrap(), &model, dropped, corrupt);
            }
        }
    }
}
