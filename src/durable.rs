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

/// Removes the temp files [`write_atomic`] leaves behind in `dir` when a process dies
/// between creating one and renaming it (`.NAME.tmp.PID`), for every PID that is no
/// longer running (a live one may be mid-write). Returns how many were removed; a file
/// that cannot be removed stays and is not an error, since it only costs a few bytes.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = stale_temp_pid(&name.to_string_lossy()) else {
            continue;
        };
        if pid != std::process::id()
            && !Path::new("/proc").join(pid.to_string()).exists()
            && fs::remove_file(e.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// The PID in a [`write_atomic`] temp file's name, `.NAME.tmp.PID`.
fn stale_temp_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (base, pid) = rest.rsplit_once(".tmp.")?;
    if base.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_files_of_dead_writers_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // PID 0 is never a process; the running test's own PID is alive.
        fs::write(d.join(".lifecycle.json.tmp.0"), b"torn").unwrap();
        let live = format!(".seq.tmp.{}", std::process::id());
        fs::write(d.join(&live), b"mid-write").unwrap();
        for keep in [
            "lifecycle.json",
            ".tmp.0",
            ".x.tmp.",
            ".x.tmp.12a",
            "x.tmp.0",
        ] {
            fs::write(d.join(keep), b"keep").unwrap();
        }
        assert_eq!(remove_stale_temps(d), 1);
        assert!(!d.join(".lifecycle.json.tmp.0").exists());
        for keep in [
            live.as_str(),
            "lifecycle.json",
            ".tmp.0",
            ".x.tmp.",
            ".x.tmp.12a",
            "x.tmp.0",
        ] {
            assert!(d.join(keep).exists(), "{keep} was removed");
        }
        assert_eq!(remove_stale_temps(&d.join("missing")), 0);
    }
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
