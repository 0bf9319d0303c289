//! `backup.files`: seconds since the newest file matching a glob was modified, and its
//! size against `min_size`.
//!
//! For teams that ship `pg_dump` files or snapshot markers: `glob = "/backups/*.dump"`.
//! The newest regular file (by modification time; symlinks are followed, so a `latest`
//! link counts as its target) is the backup; its age is the primary value.
//!
//! - No match is critical ("no file matches /backups/*.dump"): no backup is never ok.
//! - The newest file smaller than `min_size` is critical by itself: a dump that failed
//!   half-way is usually a small or empty file with a fresh mtime. Without `min_size` the
//!   floor is 1 byte, so an empty newest file is still critical.
//! - A directory the glob cannot read is `unknown` with the error: some matches may be
//!   hidden, so neither "fresh" nor "missing" can be claimed.
//!
//! `glob` must be absolute: it is a pattern, not a path, so the loader does not resolve it
//! against the config file's directory, and a relative pattern would be matched against
//! the agent's working directory. Walking the glob and reading metadata is blocking I/O on
//! a backup mount (often NFS): it runs on the blocking pool and is not re-issued while a
//! previous walk is stuck (`InFlight`, as `disk` does).
//!
//! Defaults when neither `warn` nor `crit` is given: 26h and 48h.

use std::path::PathBuf;

use super::{Newest, age_thresholds, evaluate_age, unix_now, unix_seconds};
use crate::checks::disk::{InFlight, format_bytes};
use crate::checks::{
    Check, CheckContext, CheckError, Common, Metric, Observation, Status, Thresholds,
};
use crate::config::types::{ByteSize, Duration};

/// The size floor when `min_size` is not set: an empty file is never a backup.
const DEFAULT_MIN_SIZE: u64 = 1;

crate::check_config! {
    /// `[check.backup.files.NAME]`: seconds since the newest file matching `glob` was
    /// modified; a newest file below `min_size` (default 1 byte) is critical.
    pub struct FilesConfig: Duration {
        /// Files to consider, an absolute pattern, e.g. "/backups/*.dump".
        pub glob: String,
        /// The newest file must be at least this big (default 1 byte).
        #[serde(default)]
        pub min_size: Option<ByteSize>,
    }
}

impl FilesConfig {
    /// `glob` must be a valid, absolute pattern (syntax only: whether anything matches is
    /// what the check measures).
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        match validate_glob(&self.glob) {
            Ok(()) => Vec::new(),
            Err(e) => vec![("glob", e)],
        }
    }
}

/// Checks that `pattern` is an absolute glob.
///
/// # Errors
/// A message saying why not.
pub fn validate_glob(pattern: &str) -> Result<(), String> {
    if !pattern.starts_with('/') {
        return Err(format!(
            "{pattern:?} must be an absolute pattern such as \"/backups/*.dump\" \
             (a glob is not resolved against the config file's directory)"
        ));
    }
    glob::Pattern::new(pattern)
        .map(|_| ())
        .map_err(|e| format!("invalid pattern {pattern:?}: {e}"))
}

/// A running `backup.files` check.
pub struct FilesCheck {
    glob: String,
    min_size: u64,
    thresholds: Thresholds,
    walk: InFlight,
}

impl FilesCheck {
    /// Builds the check, applying the defaults.
    pub fn from_config(c: &FilesConfig, _common: &Common) -> Self {
        FilesCheck {
            glob: c.glob.clone(),
            min_size: c.min_size.map_or(DEFAULT_MIN_SIZE, |s| s.0),
            thresholds: age_thresholds(c.warn, c.crit),
            walk: InFlight::default(),
        }
    }
}

impl Check for FilesCheck {
    async fn run(&mut self, _cx: &CheckContext) -> Result<Observation, CheckError> {
        let pattern = self.glob.clone();
        let what = format!("matching {}", self.glob);
        let found = self.walk.run(&what, move || scan(&pattern)).await??;
        Ok(evaluate_files(
            &self.glob,
            &found,
            self.min_size,
            &self.thresholds,
            unix_now(),
        ))
    }
}

/// What the walk found.
#[derive(Debug, Clone, PartialEq)]
pub struct FilesFound {
    /// Regular files matched.
    pub matched: usize,
    /// The newest of them: path, modification time (Unix seconds), size in bytes.
    pub newest: Option<(PathBuf, f64, u64)>,
}

/// Walks `pattern` (on the blocking pool) and keeps the newest regular file.
///
/// # Errors
/// [`CheckError::Io`] when a directory on the way cannot be read, or a matched entry's
/// metadata cannot (a file deleted between listing and `stat` is skipped: rotation).
fn scan(pattern: &str) -> Result<FilesFound, CheckError> {
    let paths = glob::glob(pattern)
        .map_err(|e| CheckError::Parse(format!("invalid glob {pattern:?}: {e}")))?;
    let mut found = FilesFound {
        matched: 0,
        newest: None,
    };
    for entry in paths {
        let path = match entry {
            Ok(p) => p,
            Err(e) => {
                let context = format!("reading {} (matching {pattern})", e.path().display());
                return Err(CheckError::io(context, std::io::Error::from(e)));
            }
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            // Deleted between the listing and the stat (a retention job), or a dangling
            // symlink: not a backup.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(CheckError::io(format!("stat {}", path.display()), e)),
        };
        if !meta.is_file() {
            continue;
        }
        let mtime = meta
            .modified()
            .map_err(|e| CheckError::io(format!("mtime of {}", path.display()), e))?;
        found.matched += 1;
        let t = unix_seconds(mtime);
        // Ties go to the lexically later path (glob yields sorted paths): with names
        // carrying a date, that is the newer backup.
        if found.newest.as_ref().is_none_or(|(_, best, _)| t >= *best) {
            found.newest = Some((path, t, meta.len()));
        }
    }
    Ok(found)
}

/// Judges what the walk found at `now` (Unix seconds).
pub fn evaluate_files(
    pattern: &str,
    found: &FilesFound,
    min_size: u64,
    t: &Thresholds,
    now: f64,
) -> Observation {
    let newest = found.newest.as_ref().map(|(path, mtime, size)| Newest {
        what: format!("newest match {} modified", path.display()),
        ended_at: *mtime,
        size_bytes: Some(*size as f64),
    });
    let mut o = evaluate_age(
        newest.as_ref(),
        found.matched,
        t,
        now,
        format!("no file matches {pattern}"),
    );
    if let Some((path, _, size)) = &found.newest {
        if *size < min_size {
            o.status = Status::Critical;
            o.message = format!(
                "newest match {} is {}, below min_size {}; {}",
                path.display(),
                format_bytes(*size),
                format_bytes(min_size),
                o.message
            );
        }
    }
    o.metrics.push(Metric::gauge(
        "vigil_backup_files_matched",
        "Regular files matching the check's glob",
        found.matched as f64,
    ));
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Thresholds {
        age_thresholds(None, None)
    }

    fn found(age: f64, size: u64, matched: usize) -> FilesFound {
        FilesFound {
            matched,
            newest: Some((PathBuf::from("/backups/x.dump"), 1_000_000.0 - age, size)),
        }
    }

    #[test]
    fn fresh_old_and_missing() {
        let o = evaluate_files("/backups/*.dump", &found(60.0, 4096, 2), 1, &t(), 1e6);
        assert_eq!((o.status, o.value), (Status::Ok, Some(60.0)));
        assert_eq!(
            o.message,
            "newest match /backups/x.dump modified 1m 0s ago (4.0 KiB, 2 in total)"
        );
        assert!(
            o.metrics
                .iter()
                .any(|m| m.name == "vigil_backup_files_matched" && m.value == 2.0)
        );
        let o = evaluate_files("/b/*", &found(26.0 * 3600.0, 9, 1), 1, &t(), 1e6);
        assert_eq!(o.status, Status::Warning);
        let o = evaluate_files("/b/*", &found(50.0 * 3600.0, 9, 1), 1, &t(), 1e6);
        assert_eq!(o.status, Status::Critical);
        let none = FilesFound {
            matched: 0,
            newest: None,
        };
        let o = evaluate_files("/backups/*.dump", &none, 1, &t(), 1e6);
        assert_eq!((o.status, o.value), (Status::Critical, None));
        assert_eq!(o.message, "no file matches /backups/*.dump");
    }

    #[test]
    fn small_newest_file_is_critical() {
        let o = evaluate_files("/b/*", &found(60.0, 0, 1), 1, &t(), 1e6);
        assert_eq!((o.status, o.value), (Status::Critical, Some(60.0)));
        assert!(
            o.message
                .starts_with("newest match /backups/x.dump is 0 B, below min_size 1 B")
        );
        let o = evaluate_files("/b/*", &found(60.0, 0, 1), 1 << 20, &t(), 1e6);
        assert!(
            o.message
                .starts_with("newest match /backups/x.dump is 0 B, below min_size 1.0 MiB"),
            "{}",
            o.message
        );
        let o = evaluate_files("/b/*", &found(60.0, 1 << 20, 1), 1 << 20, &t(), 1e6);
        assert_eq!(o.status, Status::Ok, "equal to min_size is enough");
    }

    #[test]
    fn glob_must_be_absolute_and_valid() {
        assert!(validate_glob("/backups/*.dump").is_ok());
        assert!(validate_glob("backups/*.dump").is_err());
        assert!(validate_glob("*.dump").is_err());
        assert!(validate_glob("/backups/[.dump").is_err());
    }
}
