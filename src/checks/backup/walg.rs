//! `backup.walg`: seconds since the newest WAL-G backup finished.
//!
//! Runs `wal-g backup-list --json --detail` (the binary from `binary`, default `wal-g`;
//! storage settings such as `WALG_S3_PREFIX` or `WALG_FILE_PREFIX` come from `env`) and
//! reads a JSON array with one object per backup. The fields used, as WAL-G prints them
//! (`internal/databases/postgres/backup_detail.go`: `BackupTime` plus
//! `ExtendedMetadataDto`, marshalled by Go's `encoding/json`):
//! - `backup_name`;
//! - `finish_time`: RFC 3339 with fractional seconds, UTC (`2024-01-10T10:15:35.123456Z`);
//!   an offset (`+00:00`) is accepted too. A backup pushed without extended metadata has
//!   Go's zero time `0001-01-01T00:00:00Z` here; its `time` (when the storage last
//!   modified its sentinel, written at the end of the push) is used instead;
//! - `compressed_size` (bytes in storage; 0 when unknown), else `uncompressed_size`.
//!
//! Every other field is ignored, so newer WAL-G versions that add fields still parse. The
//! order of the list is not relied on (WAL-G sorted by storage modification time before
//! 2.0, which a storage lifecycle rule can change): the newest `finish_time` wins.
//!
//! No backups: WAL-G ≥ 2 prints `[]` with `--json`; older versions print nothing on
//! stdout and "No backups found" on stderr, exit 0; `null` is accepted as well. All of
//! these are critical "no backup found", never ok.
//!
//! Defaults when neither `warn` nor `crit` is given: 26h and 48h.

use std::time::Duration as StdDuration;

use indexmap::IndexMap;
use serde::Deserialize;

use super::{
    Newest, age_thresholds, evaluate_age, parse_rfc3339, run_tool, tool_error, tool_request,
    unix_now, validate_tool,
};
use crate::checks::{Check, CheckContext, CheckError, Common, Observation, Thresholds};
use crate::config::types::Duration;
use crate::runner::{Request, Runner};

/// The binary run when `binary` is not set (looked up in the runner's `PATH`).
pub const DEFAULT_BINARY: &str = "wal-g";
/// The arguments: every backup with its extended metadata, as JSON.
pub const ARGS: &[&str] = &["backup-list", "--json", "--detail"];

crate::check_config! {
    /// `[check.backup.walg.NAME]`: seconds since the newest WAL-G backup finished.
    pub struct WalgConfig: Duration {
        /// The WAL-G binary (default "wal-g", looked up in PATH; else an absolute path).
        #[serde(default)]
        pub binary: Option<String>,
        /// Run WAL-G as this user.
        #[serde(default)]
        pub run_as: Option<String>,
        /// Variables added to its cleared environment (its storage settings).
        #[serde(default)]
        pub env: IndexMap<String, String>,
    }
}

impl WalgConfig {
    /// `binary` must be a name or an absolute path. `run_as` is checked by the config's
    /// validation, which knows whether a privileged runner is set.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        validate_tool(self.binary.as_deref())
    }
}

/// A running `backup.walg` check.
pub struct WalgCheck {
    binary: Option<String>,
    run_as: Option<String>,
    env: IndexMap<String, String>,
    timeout: StdDuration,
    thresholds: Thresholds,
    /// Runs the program (in process, or via the privileged runner).
    pub(crate) runner: Runner,
}

impl WalgCheck {
    /// Builds the check, applying the defaults.
    pub fn from_config(c: &WalgConfig, common: &Common) -> Self {
        WalgCheck {
            binary: c.binary.clone(),
            run_as: c.run_as.clone(),
            env: c.env.clone(),
            timeout: common.timeout,
            thresholds: age_thresholds(c.warn, c.crit),
            runner: Runner::in_process(),
        }
    }
}

impl WalgCheck {
    /// The program request, without running it (the privileged runner builds it from its
    /// own config).
    pub fn request(&self) -> Request {
        tool_request(
            self.binary.as_deref(),
            DEFAULT_BINARY,
            ARGS,
            &self.env,
            self.run_as.as_deref(),
            self.timeout,
        )
    }
}

impl Check for WalgCheck {
    async fn run(&mut self, _cx: &CheckContext) -> Result<Observation, CheckError> {
        let req = self.request();
        let out = run_tool(&self.runner, &req).await?;
        let backups = parse_backup_list(&out.stdout)
            .map_err(|e| tool_error(format!("`{}`: {e}", super::command_line(&req))))?;
        Ok(evaluate_walg(&backups, &self.thresholds, unix_now()))
    }
}

/// One backup of `backup-list --json --detail`, as far as the check needs it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WalgBackup {
    /// E.g. `base_000000010000000000000002`.
    pub backup_name: String,
    /// When the storage last modified the backup's sentinel (RFC 3339).
    #[serde(default)]
    pub time: Option<String>,
    /// When the backup finished (RFC 3339; Go's zero time without extended metadata).
    #[serde(default)]
    pub finish_time: Option<String>,
    /// Bytes in storage (0 when the backup did not record it).
    #[serde(default)]
    pub compressed_size: Option<u64>,
    /// Bytes of the data directory backed up (0 when not recorded).
    #[serde(default)]
    pub uncompressed_size: Option<u64>,
}

/// A backup with its end time resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct WalgFinished {
    /// The backup's name.
    pub name: String,
    /// Unix seconds.
    pub finished_at: f64,
    /// Bytes, when known.
    pub size_bytes: Option<f64>,
}

/// Parses the stdout of `wal-g backup-list --json --detail`.
///
/// # Errors
/// A message when the output is not a JSON array of backups, or a backup has neither a
/// valid `finish_time` nor a valid `time`.
pub fn parse_backup_list(stdout: &[u8]) -> Result<Vec<WalgFinished>, String> {
    let text = String::from_utf8_lossy(stdout);
    if text.trim().is_empty() {
        // WAL-G before 2.0 prints nothing (and "No backups found" on stderr).
        return Ok(Vec::new());
    }
    let list: Option<Vec<WalgBackup>> = serde_json::from_str(text.trim())
        .map_err(|e| format!("output is not WAL-G's backup list JSON: {e}"))?;
    list.unwrap_or_default()
        .into_iter()
        .map(|b| {
            let finished_at = finish_of(&b)?;
            // 0 is Go's zero value: the size was not recorded, not an empty backup.
            let size = [b.compressed_size, b.uncompressed_size]
                .into_iter()
                .flatten()
                .find(|&s| s > 0);
            Ok(WalgFinished {
                name: b.backup_name,
                finished_at,
                size_bytes: size.map(|s| s as f64),
            })
        })
        .collect()
}

/// `finish_time`, or `time` when `finish_time` is absent or Go's zero time.
fn finish_of(b: &WalgBackup) -> Result<f64, String> {
    let parse = |field: &str, v: &str| {
        parse_rfc3339(v).map_err(|e| format!("backup {}: `{field}`: {e}", b.backup_name))
    };
    if let Some(f) = b.finish_time.as_deref() {
        let t = parse("finish_time", f)?;
        // Year 1 (Go's zero `time.Time`) is long before any real backup.
        if t > 0.0 {
            return Ok(t);
        }
    }
    match b.time.as_deref() {
        Some(t) => parse("time", t),
        None => Err(format!(
            "backup {} has neither `finish_time` nor `time`",
            b.backup_name
        )),
    }
}

/// Judges the newest backup at `now` (Unix seconds).
pub fn evaluate_walg(backups: &[WalgFinished], t: &Thresholds, now: f64) -> Observation {
    let newest = backups
        .iter()
        .max_by(|a, b| a.finished_at.total_cmp(&b.finished_at))
        .map(|b| Newest {
            what: format!("backup {} finished", b.name),
            ended_at: b.finished_at,
            size_bytes: b.size_bytes,
        });
    evaluate_age(
        newest.as_ref(),
        backups.len(),
        t,
        now,
        "no backup found by wal-g backup-list".to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::Status;

    // Fixtures in WAL-G's `backup-list --json --detail` format; where the format comes from
    // is written in tests/fixtures/walg/README.md.
    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/walg");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
    }

    fn t() -> Thresholds {
        age_thresholds(None, None)
    }

    #[test]
    fn newest_finish_wins_whatever_the_order() {
        let b = parse_backup_list(&fixture("backup-list-detail.json")).unwrap();
        assert_eq!(b.len(), 3);
        let now = parse_rfc3339("2024-01-12T04:00:00Z").unwrap();
        let o = evaluate_walg(&b, &t(), now);
        assert_eq!(o.status, Status::Ok);
        // The newest is listed second: base_…0C finished at 03:12:47.481223Z.
        let age = o.value.unwrap();
        assert!((age - (47.0 * 60.0 + 12.518777)).abs() < 1e-3, "{age}");
        assert!(
            o.message
                .starts_with("backup base_00000001000000000000000C finished 47m 13s ago"),
            "{}",
            o.message
        );
        let size = o
            .metrics
            .iter()
            .find(|m| m.name == "vigil_backup_size_bytes");
        assert_eq!(size.unwrap().value, 5_226_918.0);
        assert!(evaluate_walg(&b, &t(), now + 26.0 * 3600.0).status == Status::Warning);
        assert!(evaluate_walg(&b, &t(), now + 48.0 * 3600.0).status == Status::Critical);
    }

    #[test]
    fn offsets_and_zero_times() {
        let b = parse_backup_list(&fixture("backup-list-offsets.json")).unwrap();
        // +00:00 and +03:00 parse; a zero finish_time falls back to `time`.
        assert_eq!(
            b[0].finished_at,
            parse_rfc3339("2024-01-11T21:00:05Z").unwrap()
        );
        assert_eq!(
            b[1].finished_at,
            parse_rfc3339("2024-01-11T22:30:00Z").unwrap()
        );
        assert_eq!(
            b[2].finished_at,
            parse_rfc3339("2024-01-09T08:00:01.5Z").unwrap()
        );
        assert_eq!(b[2].size_bytes, None, "a 0 size means not recorded");
    }

    #[test]
    fn empty_lists_are_critical() {
        for out in ["[]\n", "null\n", "", "  \n"] {
            let b = parse_backup_list(out.as_bytes()).unwrap();
            let o = evaluate_walg(&b, &t(), 0.0);
            assert_eq!((o.status, o.value), (Status::Critical, None), "{out:?}");
            assert!(o.message.starts_with("no backup found"), "{}", o.message);
        }
        assert!(
            parse_backup_list(&fixture("backup-list-empty.json"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn malformed_output_is_an_error() {
        for out in [
            &b"{\"backup_name\": \"x\"}"[..],
            b"[{\"backup_name\": \"x\", \"finish_time\": \"soon\"}]",
            b"[{\"backup_name\": \"x\"}]",
            b"[{\"backup_name\": \"x\", \"finish_time\": \"2024-01-10T10:1",
            b"INFO: 2024/01/10 No backups found",
        ] {
            assert!(
                parse_backup_list(out).is_err(),
                "{}",
                String::from_utf8_lossy(out)
            );
        }
    }
}
