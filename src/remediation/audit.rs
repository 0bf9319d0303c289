//! The audit log: one JSON line per remediation decision, append-only, fsync'd.
//!
//! # Design
//!
//! Invariants:
//! - a record is on disk (`write_all` + `fdatasync`) before [`Audit::append`] returns, and
//!   the engine makes its next decision only after that; a failed append is reported to
//!   the caller, which then runs nothing (a script never runs unaudited);
//! - every record has a number `n`, strictly increasing for the life of the state
//!   directory; `(host_id, n)` identifies a record across heartbeat redeliveries;
//! - a record is deleted only once it is *delivered* (carried by a heartbeat that was sent
//!   or spooled: the heartbeat's own spool keeps it from there), or when delivery is off
//!   (no `[heartbeat]`), or — loudly, counted — when the log passes [`MAX_SEGMENTS`].
//!
//! On disk, under `state_dir/audit/`:
//! - segments `<first n, 20 digits>.jsonl`; the newest is appended to, a new one starts
//!   past [`SEGMENT_BYTES`]. Each line is the record's JSON object with two more keys,
//!   `v` (the format version, 1) and `n`;
//! - `delivered`: `{"v":1,"delivered":N}`, the highest `n` delivered, written atomically.
//!
//! Recovery: a crash can leave a torn last line (no newline); it is cut off at open (it
//! was never acknowledged, so nothing acknowledged is lost). A line that does not parse
//! elsewhere is skipped with a warning, never fatal.
//!
//! In memory: the newest [`RECENT_MAX`] records for `/remediations` (the output of only
//! the newest [`OUTPUT_KEEP`]; older output stays on disk), and the undelivered ones,
//! without output, for heartbeats (capped at [`UNDELIVERED_MAX`]; beyond that the oldest
//! are still on disk but not carried, and counted).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{error, warn};

/// The format version written in every line.
pub const VERSION: u64 = 1;
/// A segment past this size is closed and a new one started.
pub const SEGMENT_BYTES: u64 = 1024 * 1024;
/// Most segments kept; past it the oldest is dropped even if undelivered (counted).
pub const MAX_SEGMENTS: usize = 64;
/// Delivered segments kept for `/remediations` history besides the current one.
const KEEP_DELIVERED: usize = 2;
/// Records kept in memory for `/remediations`.
pub const RECENT_MAX: usize = 1000;
/// Of those, how many keep their stdout/stderr in memory.
pub const OUTPUT_KEEP: usize = 50;
/// Undelivered records kept in memory for heartbeats.
pub const UNDELIVERED_MAX: usize = 10_000;
/// Keys only the admin socket shows.
pub const OUTPUT_KEYS: [&str; 3] = ["stdout", "stderr", "truncated"];

/// Who or what asked for a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// A check tripped.
    Check,
    /// An operator (`vigil remediate`).
    Manual,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Accepted into the queue.
    Queued,
    /// The script was started.
    Started,
    /// It exited 0.
    Succeeded,
    /// It exited non-zero, was killed by a signal, or could not be started.
    Failed,
    /// It overran its timeout; its group was killed.
    TimedOut,
    /// The check's fresh sample after `verify_after` was ok.
    Verified,
    /// The check's fresh sample after `verify_after` was not ok.
    NotVerified,
    /// The guard refused the script (hash, owner, mode, place).
    Refused,
    /// A guardrail held it back (paused, lifecycle, cooldown, budget, escalated, dry run).
    Skipped,
    /// Three consecutive failures: disabled until `vigil automation resume`.
    Escalated,
}

impl Event {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Queued => "queued",
            Event::Started => "started",
            Event::Succeeded => "succeeded",
            Event::Failed => "failed",
            Event::TimedOut => "timed_out",
            Event::Verified => "verified",
            Event::NotVerified => "not_verified",
            Event::Refused => "refused",
            Event::Skipped => "skipped",
            Event::Escalated => "escalated",
        }
    }
}

/// One decision, with the contract's keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The run this decision belongs to (queued … outcome share it).
    pub run_id: String,
    /// When (RFC 3339 UTC).
    pub at: String,
    /// The `[remediation.NAME]`.
    pub remediation: String,
    /// The check that triggered it or that verifies it.
    pub check: Option<String>,
    /// `check` or `manual`.
    pub trigger: Trigger,
    /// What happened.
    pub event: Event,
    /// Why (a refusal's or skip's keyword and detail; the operator's reason when queued).
    pub reason: Option<String>,
    /// The script's exit code.
    pub exit_code: Option<i32>,
    /// How long the script (or the verification) took.
    pub duration_ms: Option<u64>,
    /// Standard output, cut at 64 KiB (admin socket only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stdout: Option<String>,
    /// Standard error, cut at 64 KiB (admin socket only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stderr: Option<String>,
    /// Whether stdout or stderr was cut (admin socket only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub truncated: Option<bool>,
}

#[derive(Serialize, Deserialize)]
struct Cursor {
    v: u64,
    delivered: u64,
}

/// The open audit log.
#[derive(Debug)]
pub struct Audit {
    dir: PathBuf,
    /// `(first n, path)`, oldest first; the last is being appended to.
    segments: Vec<(u64, PathBuf)>,
    file: Option<File>,
    file_len: u64,
    next_n: u64,
    /// Highest delivered `n` (0: none).
    delivered: u64,
    /// Whether records wait for delivery; without a heartbeat they count as delivered.
    delivery: bool,
    recent: VecDeque<Value>,
    undelivered: VecDeque<Value>,
    /// Records dropped undelivered (segment cap or the in-memory cap).
    dropped: u64,
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.jsonl")
}

impl Audit {
    /// Opens (creating) the log in `state_dir/audit`. `delivery`: whether a heartbeat
    /// will carry the records.
    ///
    /// # Errors
    /// The directory or a segment cannot be created or read.
    pub fn open(state_dir: &Path, delivery: bool) -> io::Result<Audit> {
        let dir = state_dir.join("audit");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode_0700()
            .create(&dir)?;
        let mut segments: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let first = name.strip_suffix(".jsonl")?.parse::<u64>().ok()?;
                Some((first, e.path()))
            })
            .collect();
        segments.sort();
        let delivered = match std::fs::read(dir.join("delivered")) {
            Ok(b) => serde_json::from_slice::<Cursor>(&b)
                .map(|c| c.delivered)
                .unwrap_or_else(|e| {
                    // Resending is harmless (records carry `n`); losing is not.
                    warn!(error = %e, "audit delivery cursor unreadable; resending from the start");
                    0
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let mut audit = Audit {
            dir,
            segments,
            file: None,
            file_len: 0,
            next_n: 1,
            delivered,
            delivery,
            recent: VecDeque::new(),
            undelivered: VecDeque::new(),
            dropped: 0,
        };
        let paths: Vec<PathBuf> = audit.segments.iter().map(|(_, p)| p.clone()).collect();
        let last = paths.len().checked_sub(1);
        for (i, p) in paths.iter().enumerate() {
            audit.load_segment(p, Some(i) == last)?;
        }
        if !delivery {
            audit.delivered = audit.next_n - 1;
            audit.undelivered.clear();
        }
        audit.open_current()?;
        Ok(audit)
    }

    fn load_segment(&mut self, path: &Path, last: bool) -> io::Result<()> {
        let bytes = std::fs::read(path)?;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < bytes.len() && last {
            warn!(segment = %path.display(), "audit log ends in a torn record; cutting it off");
            let f = OpenOptions::new().write(true).open(path)?;
            f.set_len(complete as u64)?;
            f.sync_all()?;
        }
        for line in bytes[..complete].lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(&line) {
                Ok(v) => {
                    let Some(n) = v.get("n").and_then(Value::as_u64) else {
                        warn!(segment = %path.display(), "audit record without a number; skipped");
                        continue;
                    };
                    self.next_n = self.next_n.max(n + 1);
                    self.remember(v);
                }
                Err(e) => {
                    warn!(segment = %path.display(), error = %e, "audit record unreadable; skipped")
                }
            }
        }
        Ok(())
    }

    fn open_current(&mut self) -> io::Result<()> {
        if self.segments.is_empty() {
            let first = self.next_n;
            self.segments
                .push((first, self.dir.join(segment_name(first))));
        }
        let path = match self.segments.last() {
            Some((_, p)) => p.clone(),
            None => return Err(io::Error::other("no audit segment")),
        };
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        self.file_len = f.metadata()?.len();
        self.file = Some(f);
        sync_dir(&self.dir)
    }

    /// Keeps `v` (with its `n`) in the in-memory views.
    fn remember(&mut self, mut v: Value) {
        let n = v.get("n").and_then(Value::as_u64).unwrap_or(0);
        if let Some(o) = v.as_object_mut() {
            o.remove("v");
        }
        if self.delivery && n > self.delivered {
            let mut light = v.clone();
            strip_output(&mut light);
            self.undelivered.push_back(light);
            if self.undelivered.len() > UNDELIVERED_MAX {
                self.undelivered.pop_front();
                self.dropped += 1;
            }
        }
        self.recent.push_back(v);
        if self.recent.len() > RECENT_MAX {
            self.recent.pop_front();
        }
        if self.recent.len() > OUTPUT_KEEP {
            let i = self.recent.len() - OUTPUT_KEEP - 1;
            if let Some(old) = self.recent.get_mut(i) {
                strip_output(old);
            }
        }
    }

    /// Appends `rec` durably; returns its `n`.
    ///
    /// # Errors
    /// The write or the fsync failed: the record may not be on disk, and the caller must
    /// not act on the decision it describes.
    pub fn append(&mut self, rec: &Record) -> io::Result<u64> {
        if self.file_len >= SEGMENT_BYTES {
            self.rotate()?;
        }
        let n = self.next_n;
        let mut v = serde_json::to_value(rec).map_err(io::Error::other)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("v".into(), VERSION.into());
            o.insert("n".into(), n.into());
        }
        let mut line = serde_json::to_vec(&v).map_err(io::Error::other)?;
        line.push(b'\n');
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("audit log not open"))?;
        let written = f.write_all(&line).and_then(|()| f.sync_data());
        crate::durable::note("audit", &written);
        if let Err(e) = written {
            // `write_all` may have put part of the line down before failing (ENOSPC): cut
            // it off, or the next record would be glued to the fragment and both lines
            // lost at the next open. Shrinking needs no free space. If even that fails,
            // close the segment: the next append rotates, and open() cuts the torn tail.
            if f.set_len(self.file_len).is_err() {
                self.file = None;
                self.file_len = SEGMENT_BYTES;
            }
            return Err(e);
        }
        self.file_len += line.len() as u64;
        self.next_n += 1;
        if !self.delivery {
            self.delivered = n;
        }
        self.remember(v);
        Ok(n)
    }

    fn rotate(&mut self) -> io::Result<()> {
        let first = self.next_n;
        self.segments
            .push((first, self.dir.join(segment_name(first))));
        self.open_current()?;
        self.prune();
        Ok(())
    }

    /// Deletes old segments: delivered ones beyond [`KEEP_DELIVERED`], and the oldest
    /// beyond [`MAX_SEGMENTS`] whatever their state.
    fn prune(&mut self) {
        while self.segments.len() > 1 {
            // A segment's last record is the next segment's first minus one.
            let last_n = self.segments[1].0.saturating_sub(1);
            let delivered = last_n <= self.delivered;
            let over_cap = self.segments.len() > MAX_SEGMENTS;
            if !(over_cap || (delivered && self.segments.len() > KEEP_DELIVERED + 1)) {
                break;
            }
            let (first, path) = self.segments.remove(0);
            if !delivered {
                let lost = last_n + 1 - first.max(self.delivered + 1);
                self.dropped += lost;
                error!(
                    records = lost,
                    "audit log over its cap: dropping undelivered records (the heartbeat is not delivering)"
                );
            }
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(segment = %path.display(), error = %e, "removing an old audit segment");
            }
        }
    }

    /// The newest records first, at most `limit`; `with_output`: include stdout/stderr.
    pub fn newest(&self, limit: usize, with_output: bool) -> Vec<Value> {
        self.recent
            .iter()
            .rev()
            .take(limit)
            .map(|v| {
                let mut v = v.clone();
                if !with_output {
                    strip_output(&mut v);
                }
                v
            })
            .collect()
    }

    /// Up to `max` undelivered records, oldest first, without output.
    pub fn undelivered(&self, max: usize) -> Vec<Value> {
        self.undelivered.iter().take(max).cloned().collect()
    }

    /// Marks every record up to `n` delivered, durably.
    ///
    /// # Errors
    /// The cursor could not be written (the records will be sent again: harmless).
    pub fn mark_delivered(&mut self, n: u64) -> io::Result<()> {
        if n <= self.delivered {
            return Ok(());
        }
        let n = n.min(self.next_n - 1);
        let body = serde_json::to_vec(&Cursor {
            v: VERSION,
            delivered: n,
        })
        .map_err(io::Error::other)?;
        crate::durable::write_atomic(&self.dir.join("delivered"), &body)?;
        self.delivered = n;
        while self
            .undelivered
            .front()
            .and_then(|v| v.get("n").and_then(Value::as_u64))
            .is_some_and(|x| x <= n)
        {
            self.undelivered.pop_front();
        }
        self.prune();
        Ok(())
    }

    /// Whether records wait for a heartbeat; off: they count as delivered when written.
    pub fn set_delivery(&mut self, on: bool) {
        if self.delivery == on {
            return;
        }
        self.delivery = on;
        if !on {
            self.delivered = self.next_n - 1;
            self.undelivered.clear();
        }
    }

    /// Records dropped before delivery.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The segment files, oldest first (tests and `image prep`).
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.segments.iter().map(|(_, p)| p.clone()).collect()
    }
}

fn strip_output(v: &mut Value) {
    if let Some(o) = v.as_object_mut() {
        for k in OUTPUT_KEYS {
            o.remove(k);
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `DirBuilder::mode` without importing the extension trait at every call.
trait Mode0700 {
    fn mode_0700(&mut self) -> &mut Self;
}

impl Mode0700 for std::fs::DirBuilder {
    fn mode_0700(&mut self) -> &mut Self {
        use std::os::unix::fs::DirBuilderExt;
        self.mode(0o700)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize, out: usize) -> Record {
        Record {
            run_id: format!("r{i}"),
            at: "2024-01-01T00:00:00.000Z".into(),
            remediation: "fix".into(),
            check: Some("c".into()),
            trigger: Trigger::Check,
            event: Event::Started,
            reason: None,
            exit_code: None,
            duration_ms: None,
            stdout: Some("x".repeat(out)),
            stderr: None,
            truncated: Some(false),
        }
    }

    #[test]
    fn records_survive_a_reopen_in_order_and_numbers_keep_growing() {
        let d = tempfile::tempdir().unwrap();
        let mut a = Audit::open(d.path(), true).unwrap();
        assert_eq!(a.append(&rec(1, 3)).unwrap(), 1);
        assert_eq!(a.append(&rec(2, 3)).unwrap(), 2);
        drop(a);
        let mut a = Audit::open(d.path(), true).unwrap();
        assert_eq!(a.append(&rec(3, 3)).unwrap(), 3);
        let newest = a.newest(10, true);
        let ids: Vec<&str> = newest
            .iter()
            .map(|v| v["run_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["r3", "r2", "r1"]);
        assert!(newest[0].get("v").is_none());
        assert_eq!(newest[0]["stdout"], "xxx");
        assert!(a.newest(1, false)[0].get("stdout").is_none());
        assert_eq!(a.undelivered(10).len(), 3);
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_rest_kept() {
        let d = tempfile::tempdir().unwrap();
        let mut a = Audit::open(d.path(), true).unwrap();
        a.append(&rec(1, 0)).unwrap();
        let seg = a.segment_paths()[0].clone();
        drop(a);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"{\"run_id\":\"torn").unwrap();
        let mut a = Audit::open(d.path(), true).unwrap();
        assert_eq!(a.newest(10, false).len(), 1);
        assert_eq!(a.append(&rec(2, 0)).unwrap(), 2);
        let text = std::fs::read_to_string(&seg).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            text.lines()
                .all(|l| serde_json::from_str::<Value>(l).is_ok())
        );
    }

    #[test]
    fn rotation_never_deletes_undelivered_records() {
        let d = tempfile::tempdir().unwrap();
        let mut a = Audit::open(d.path(), true).unwrap();
        // ~100 KiB a record: a new segment every ~10 records.
        for i in 0..60 {
            a.append(&rec(i, 100 * 1024)).unwrap();
        }
        let segs = a.segment_paths().len();
        assert!(segs >= 5, "{segs}");
        assert_eq!(a.undelivered(1000).len(), 60);
        // Nothing delivered: nothing deleted.
        let first = a.segment_paths()[0].clone();
        assert!(first.exists());
        a.mark_delivered(55).unwrap();
        let left = a.undelivered(1000);
        assert_eq!(left.len(), 5);
        assert_eq!(left[0]["n"], 56);
        a.append(&rec(99, 100 * 1024)).unwrap();
        for _ in 0..12 {
            a.append(&rec(100, 100 * 1024)).unwrap();
        }
        assert!(!first.exists(), "a delivered old segment is pruned");
        // Every undelivered record is still on disk.
        let on_disk: Vec<u64> = a
            .segment_paths()
            .iter()
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .map(|l| {
                        serde_json::from_str::<Value>(l).unwrap()["n"]
                            .as_u64()
                            .unwrap()
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        for n in 56..=73 {
            assert!(on_disk.contains(&n), "record {n} lost");
        }
        // The cursor survives a reopen.
        drop(a);
        let a = Audit::open(d.path(), true).unwrap();
        assert_eq!(a.undelivered(1000)[0]["n"], 56);
    }

    #[test]
    fn without_delivery_records_count_as_delivered() {
        let d = tempfile::tempdir().unwrap();
        let mut a = Audit::open(d.path(), false).unwrap();
        a.append(&rec(1, 0)).unwrap();
        assert!(a.undelivered(10).is_empty());
        assert_eq!(a.newest(10, false).len(), 1);
    }
}
