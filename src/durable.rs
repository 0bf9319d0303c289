//! Crash-safe file writes: temp file, `write_all`, fsync, rename, fsync of the directory.
//!
//! Without the directory fsync a crash after `rename` can lose the new name (and with it
//! the record) on ext4 and xfs, so every small state file of the agent goes through here.
//!
//! Also the record of failed writes under `state_dir` ([`note`], [`write_failures`]) that
//! `/health` and `/metrics` show: a full or read-only state directory must be visible, not
//! only logged. It is process-wide because the writers (lifecycle, cooldowns, audit log,
//! sequence counter, spool) live in different parts of the agent and each would otherwise
//! need its own plumbing to the API for one shared concern.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Failed state writes since the agent started.
static FAILURES: AtomicU64 = AtomicU64::new(0);
/// The newest error of each state file whose latest write failed (cleared by a success).
static FAILING: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// Records the outcome of a write of the state file (or kind of file) `what`.
pub fn note<T, E: std::fmt::Display>(what: &str, result: &Result<T, E>) {
    let mut failing = match FAILING.lock() {
        Ok(f) => f,
        // The map holds only strings; a panic elsewhere cannot leave it inconsistent.
        Err(poisoned) => poisoned.into_inner(),
    };
    match result {
        Ok(_) => {
            failing.remove(what);
        }
        Err(e) => {
            FAILURES.fetch_add(1, Ordering::Relaxed);
            failing.insert(what.to_string(), e.to_string());
        }
    }
}

/// Failed state writes since start, and the state files whose latest write failed (name →
/// error).
pub fn write_failures() -> (u64, BTreeMap<String, String>) {
    let failing = match FAILING.lock() {
        Ok(f) => f.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    (FAILURES.load(Ordering::Relaxed), failing)
}

/// Replaces `path` with `bytes` atomically and durably (mode 0600).
///
/// # Errors
/// Any I/O error; on error `path` still holds its previous content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        // Best effort: the temp file is ours and useless after a failure.
        let _ = fs::remove_file(&tmp);
    }
    note(&name.to_string_lossy(), &result);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn failure_keeps_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing-dir").join("x");
        assert!(write_atomic(&p, b"x").is_err());
    }

    #[test]
    fn a_failed_write_is_counted_and_listed_until_a_success() {
        let dir = tempfile::tempdir().unwrap();
        let name = "durable-test-failing-file";
        let bad = dir.path().join("missing-dir").join(name);
        let (before, _) = write_failures();
        assert!(write_atomic(&bad, b"x").is_err());
        let (after, failing) = write_failures();
        assert!(after > before);
        assert!(failing.contains_key(name), "{failing:?}");
        write_atomic(&dir.path().join(name), b"x").unwrap();
        assert!(!write_failures().1.contains_key(name));
    }
}
