//! `backup.pgbackrest`: seconds since the newest successful pgBackRest backup ended.
//!
//! Runs `BINARY [--config=CONFIG] --stanza=S info --output=json` through the shared
//! runner (cleared environment plus `env`, optional `run_as`, the check's timeout killing
//! the whole group, stdout kept up to [`super::MAX_TOOL_OUTPUT`]: a cut document is `unknown`,
//! never parsed). The JSON, as pgBackRest 2.45 (Debian bookworm) prints it and as its
//! documentation keeps it stable, is an array with one object per stanza:
//!
//! ```text
//! [{"name": "main",
//!   "status": {"code": 0, "message": "ok", "lock": {"backup": {"held": false}}},
//!   "repo": [{"key": 1, "status": {"code": 0, "message": "ok"}}],
//!   "archive": [{"id": "15-1", "min": "000000010000000000000001", "max": "…06"}],
//!   "backup": [{"label": "20261124-020412F", "type": "full", "error": false,
//!               "timestamp": {"start": 1795485852, "stop": 1795485854},
//!               "info": {"size": 23213823, "delta": 23213823,
//!                        "repository": {"size": 3062552, "delta": 3062552}}}, …]}]
//! ```
//!
//! Status codes (`status.code`): 0 ok, 1 missing stanza path, 2 no valid backups, 3
//! missing stanza data, 4 different across repos, 5 database mismatch across repos, 6
//! requested backup not found, 99 other (the stanza's message is then just "other"; the
//! detail is in `repo[].status.message`, which is what the check quotes).
//!
//! Judgement:
//! - the value is seconds since `timestamp.stop` of the newest backup that counts: not
//!   `error: true` (pgBackRest ≥ 2.36 marks a backup that found page checksum errors),
//!   and of the configured `type` when one is set (exactly that type: `type = "diff"`
//!   ignores full backups);
//! - no backup that counts (status 2 "no valid backups", an empty list, or none of the
//!   type) is critical with "no backup found for stanza 'S'", never ok;
//! - any other non-zero status is critical with pgBackRest's own message (and the age,
//!   when backups are still listed);
//! - the message also names the WAL archive range and a backup that is running.
//!
//! Metrics (the framework adds `check`): `vigil_backup_age_seconds`,
//! `vigil_backup_size_bytes` (the newest backup's size in the repository),
//! `vigil_backup_backups`, `vigil_backup_last_duration_seconds`,
//! `vigil_backup_pgbackrest_status_code`, `vigil_backup_in_progress` and
//! `vigil_backup_wal_min_segment` / `vigil_backup_wal_max_segment` (see
//! [`segment_number`]).
//!
//! A missing binary, a non-zero exit, a timeout or output that is not this JSON is
//! `unknown` with the tool's first `ERROR:` line (or first stderr line).
//!
//! Defaults when neither `warn` nor `crit` is given: 26h and 48h.

use indexmap::IndexMap;
use serde::Deserialize;
use std::path::PathBuf;

use super::{
    ERROR_LINE_MAX, Newest, age_thresholds, check_outcome, command_line, evaluate_age, run_program,
    tool_error, tool_request, unix_now, validate_tool,
};
use crate::checks::postgres::format_secs;
use crate::checks::{
    Check, CheckContext, CheckError, Common, Metric, Observation, Status, Thresholds,
};
use crate::config::types::Duration;
use crate::runner::{Outcome, Request, Runner, cut_chars};

/// The binary run when `binary` is not set (looked up in the runner's `PATH`).
pub const DEFAULT_BINARY: &str = "pgbackrest";

/// pgBackRest's "no valid backups" stanza status.
pub const STATUS_NO_BACKUPS: i64 = 2;
/// pgBackRest's "other" stanza status: the detail is in the repositories' statuses.
pub const STATUS_OTHER: i64 = 99;

crate::check_config! {
    /// `[check.backup.pgbackrest.NAME]`
    pub struct PgbackrestConfig: Duration {
        /// The stanza.
        pub stanza: String,
        /// Only backups of this type count: "full", "diff" or "incr".
        #[serde(default, rename = "type")]
        pub backup_type: Option<String>,
        /// `--config=` for pgbackrest.
        #[serde(default)]
        pub config: Option<PathBuf>,
        /// The pgbackrest binary (default "pgbackrest", looked up in PATH).
        #[serde(default)]
        pub binary: Option<String>,
        /// Run pgbackrest as this user.
        #[serde(default)]
        pub run_as: Option<String>,
        /// Variables added to its cleared environment.
        #[serde(default)]
        pub env: IndexMap<String, String>,
    }
}

impl PgbackrestConfig {
    /// `stanza` must be set, `type` one of full/diff/incr, `binary` a name or an absolute
    /// path, `env` names valid. `run_as` is checked by the config's validation, which knows
    /// whether a privileged runner is set.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.stanza.trim().is_empty() {
            problems.push(("stanza", "must not be empty".to_string()));
        } else if self.stanza.starts_with('-') || self.stanza.contains(char::is_whitespace) {
            problems.push((
                "stanza",
                format!("{:?} is not a pgBackRest stanza name", self.stanza),
            ));
        }
        if let Some(t) = &self.backup_type {
            if let Err(e) = BackupType::parse(t) {
                problems.push(("type", e));
            }
        }
        if let Some(bad) = self
            .env
            .keys()
            .find(|k| k.is_empty() || k.contains(['=', '\0']))
        {
            problems.push(("env", format!("{bad:?} is not a valid variable name")));
        }
        problems.extend(validate_tool(self.binary.as_deref()));
        problems
    }
}

/// A pgBackRest backup type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupType {
    /// A full copy.
    Full,
    /// Changes since the last full backup.
    Diff,
    /// Changes since the last backup of any type.
    Incr,
}

impl BackupType {
    /// Parses `full`, `diff` or `incr` (pgBackRest's own spelling).
    ///
    /// # Errors
    /// A message naming the accepted values.
    pub fn parse(s: &str) -> Result<BackupType, String> {
        match s {
            "full" => Ok(BackupType::Full),
            "diff" => Ok(BackupType::Diff),
            "incr" => Ok(BackupType::Incr),
            other => Err(format!(
                "{other:?} is not a pgBackRest backup type: use \"full\", \"diff\" or \"incr\""
            )),
        }
    }

    /// pgBackRest's name.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupType::Full => "full",
            BackupType::Diff => "diff",
            BackupType::Incr => "incr",
        }
    }
}

/// A running `backup.pgbackrest` check.
pub struct PgbackrestCheck {
    request: Request,
    stanza: String,
    /// `Err` holds a `type` the config validation should have refused.
    backup_type: Result<Option<BackupType>, String>,
    thresholds: Thresholds,
    /// Runs the program (in process, or via the privileged runner).
    pub(crate) runner: Runner,
}

impl PgbackrestCheck {
    /// Builds the check, applying the defaults.
    pub fn from_config(c: &PgbackrestConfig, common: &Common) -> Self {
        let runner = Runner::in_process();
        let mut args = Vec::with_capacity(4);
        if let Some(config) = &c.config {
            args.push(format!("--config={}", config.display()));
        }
        args.push(format!("--stanza={}", c.stanza));
        args.push("info".to_string());
        args.push("--output=json".to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let request = tool_request(
            c.binary.as_deref(),
            DEFAULT_BINARY,
            &args,
            &c.env,
            c.run_as.as_deref(),
            // `tool_request` leaves room inside it for the runner's SIGTERM grace.
            common.timeout,
        );
        PgbackrestCheck {
            request,
            stanza: c.stanza.clone(),
            backup_type: c.backup_type.as_deref().map(BackupType::parse).transpose(),
            thresholds: age_thresholds(c.warn, c.crit),
            runner,
        }
    }
}

impl PgbackrestCheck {
    /// The program request, without running it (the privileged runner builds it from its
    /// own config).
    pub fn request(&self) -> Request {
        self.request.clone()
    }
}

impl Check for PgbackrestCheck {
    async fn run(&mut self, _cx: &CheckContext) -> Result<Observation, CheckError> {
        let backup_type = self.backup_type.clone().map_err(tool_error)?;
        let outcome = run_program(&self.runner, &self.request).await?;
        // pgBackRest prints WARN lines before its ERROR: quote the error.
        let outcome = check_outcome(&self.request, prefer_error_line(outcome))?;
        let info = parse_info(&outcome.stdout, &self.stanza)
            .map_err(|e| tool_error(format!("`{}`: {e}", command_line(&self.request))))?;
        Ok(evaluate_pgbackrest(
            &info,
            backup_type,
            &self.thresholds,
            unix_now(),
        ))
    }
}

/// Moves pgBackRest's first `ERROR:` line to the front of stderr, so that
/// [`Outcome::first_error_line`] quotes it rather than a warning printed before it.
fn prefer_error_line(mut o: Outcome) -> Outcome {
    let text = String::from_utf8_lossy(&o.stderr).into_owned();
    if let Some(line) = text.lines().map(str::trim).find(|l| l.starts_with("ERROR")) {
        o.stderr = format!("{line}\n{text}").into_bytes();
    }
    o
}

/// One stanza of `pgbackrest info --output=json`, as the check needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct StanzaInfo {
    /// The stanza's name.
    pub name: String,
    /// `status.code` (0 ok).
    pub status_code: i64,
    /// `status.message`.
    pub status_message: String,
    /// Problems of single repositories: `(key, code, message)` for each with a non-zero
    /// code.
    pub repo_problems: Vec<(i64, i64, String)>,
    /// `status.lock.backup.held`: a backup (or expire, stanza-*) is running.
    pub backup_running: bool,
    /// Every backup listed, in pgBackRest's order (oldest first).
    pub backups: Vec<BackupEntry>,
    /// The oldest WAL segment in the archive, over all its database ids.
    pub wal_min: Option<String>,
    /// The newest WAL segment in the archive.
    pub wal_max: Option<String>,
}

/// One backup of a stanza.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupEntry {
    /// E.g. `20261124-020412F_20261124-020415I`.
    pub label: String,
    /// `full`, `diff` or `incr` as pgBackRest wrote it.
    pub backup_type: String,
    /// Unix seconds.
    pub start: i64,
    /// Unix seconds.
    pub stop: i64,
    /// `error: true`: the backup found page checksum errors (field absent before 2.36).
    pub error: bool,
    /// Size of this backup set in the repository (compressed, including the files it
    /// references from prior backups), bytes.
    pub repo_size: Option<u64>,
    /// Size of the database it holds, bytes.
    pub db_size: Option<u64>,
}

#[derive(Deserialize)]
struct RawStanza {
    name: String,
    status: RawStatus,
    #[serde(default)]
    repo: Vec<RawRepo>,
    #[serde(default)]
    backup: Vec<RawBackup>,
    #[serde(default)]
    archive: Vec<RawArchive>,
}

#[derive(Deserialize)]
struct RawStatus {
    code: i64,
    #[serde(default)]
    message: String,
    #[serde(default)]
    lock: Option<RawLock>,
}

#[derive(Deserialize)]
struct RawLock {
    #[serde(default)]
    backup: Option<RawHeld>,
}

#[derive(Deserialize)]
struct RawHeld {
    #[serde(default)]
    held: bool,
}

#[derive(Deserialize)]
struct RawRepo {
    key: i64,
    status: RawRepoStatus,
}

#[derive(Deserialize)]
struct RawRepoStatus {
    code: i64,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct RawBackup {
    label: String,
    #[serde(rename = "type")]
    backup_type: String,
    timestamp: RawTimestamp,
    #[serde(default)]
    error: Option<bool>,
    #[serde(default)]
    info: Option<RawBackupInfo>,
}

#[derive(Deserialize)]
struct RawTimestamp {
    start: i64,
    stop: i64,
}

#[derive(Deserialize)]
struct RawBackupInfo {
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    repository: Option<RawRepoSize>,
}

#[derive(Deserialize)]
struct RawRepoSize {
    #[serde(default)]
    size: Option<u64>,
}

#[derive(Deserialize)]
struct RawArchive {
    #[serde(default)]
    min: Option<String>,
    #[serde(default)]
    max: Option<String>,
}

/// Parses the stdout of `pgbackrest --stanza=S info --output=json` and picks stanza `S`.
///
/// # Errors
/// A message when the output is not pgBackRest's info JSON, or does not list `stanza`.
pub fn parse_info(stdout: &[u8], stanza: &str) -> Result<StanzaInfo, String> {
    let all: Vec<RawStanza> = serde_json::from_slice(stdout).map_err(|e| {
        let start = cut_chars(String::from_utf8_lossy(stdout).trim(), 80);
        format!("output is not pgBackRest's info JSON ({e}); it begins {start:?}")
    })?;
    let listed: Vec<String> = all.iter().map(|s| s.name.clone()).collect();
    let s = all
        .into_iter()
        .find(|s| s.name == stanza)
        .ok_or_else(|| format!("stanza '{stanza}' is not in the output (it lists {listed:?})"))?;
    let backups = s
        .backup
        .into_iter()
        .map(|b| {
            let info = b.info.as_ref();
            BackupEntry {
                label: b.label,
                backup_type: b.backup_type,
                start: b.timestamp.start,
                stop: b.timestamp.stop,
                error: b.error.unwrap_or(false),
                repo_size: info.and_then(|i| i.repository.as_ref()?.size),
                db_size: info.and_then(|i| i.size),
            }
        })
        .collect();
    // Segment names are fixed-width hex (timeline, log, segment), so the string order is
    // the WAL order, across the archive ids of a stanza that saw an upgrade too.
    let wal_min = s.archive.iter().filter_map(|a| a.min.clone()).min();
    let wal_max = s.archive.iter().filter_map(|a| a.max.clone()).max();
    Ok(StanzaInfo {
        name: s.name,
        status_code: s.status.code,
        status_message: s.status.message,
        repo_problems: s
            .repo
            .into_iter()
            .filter(|r| r.status.code != 0)
            .map(|r| (r.key, r.status.code, r.status.message))
            .collect(),
        backup_running: s.status.lock.and_then(|l| l.backup).is_some_and(|b| b.held),
        backups,
        wal_min,
        wal_max,
    })
}

/// The newest backup that counts: not in error and, with `backup_type`, of that type.
pub fn newest_backup(
    backups: &[BackupEntry],
    backup_type: Option<BackupType>,
) -> Option<&BackupEntry> {
    backups
        .iter()
        .filter(|b| !b.error && of_type(b, backup_type))
        .max_by_key(|b| (b.stop, b.start))
}

/// Whether `b` is of `backup_type` (any type when `None`).
fn of_type(b: &BackupEntry, backup_type: Option<BackupType>) -> bool {
    backup_type.is_none_or(|t| b.backup_type == t.as_str())
}

/// A WAL segment name's position in the WAL (timeline excluded): `log × 2³² + segment`,
/// from its last 16 hex digits. Monotonic in the WAL position for any segment size, exact
/// in an `f64` below 2⁵³ (8 PiB of WAL), so a dashboard can see the archive's end advance
/// (`changes()`), which a segment name in a label cannot show without a new series each
/// time.
pub fn segment_number(name: &str) -> Option<f64> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some((log as f64) * 4_294_967_296.0 + seg as f64)
}

/// The stanza's own problem in one line: pgBackRest's message, or for status 99 ("other")
/// the first line of each failing repository's message.
pub fn status_problem(info: &StanzaInfo) -> String {
    let detail: Vec<String> = info
        .repo_problems
        .iter()
        .map(|(key, _, msg)| {
            let first = msg.lines().next().unwrap_or("").trim();
            format!("repo{key}: {}", cut_chars(first, ERROR_LINE_MAX))
        })
        .collect();
    let message = if info.status_code == STATUS_OTHER && !detail.is_empty() {
        detail.join("; ")
    } else {
        info.status_message.clone()
    };
    format!(
        "stanza '{}': pgBackRest status {} ({message})",
        info.name, info.status_code
    )
}

/// Judges a stanza at `now` (Unix seconds).
pub fn evaluate_pgbackrest(
    info: &StanzaInfo,
    backup_type: Option<BackupType>,
    t: &Thresholds,
    now: f64,
) -> Observation {
    let counted = info
        .backups
        .iter()
        .filter(|b| !b.error && of_type(b, backup_type))
        .count();
    let newest = newest_backup(&info.backups, backup_type);
    let kind = backup_type.map_or("", BackupType::as_str);
    let none_message = match backup_type {
        None => format!("no backup found for stanza '{}'", info.name),
        Some(t) => format!("no {} backup found for stanza '{}'", t.as_str(), info.name),
    };
    let mut obs = evaluate_age(
        newest
            .map(|b| Newest {
                what: format!("{} backup {} ended", b.backup_type, b.label),
                ended_at: b.stop as f64,
                size_bytes: b.repo_size.or(b.db_size).map(|s| s as f64),
            })
            .as_ref(),
        counted,
        t,
        now,
        none_message,
    );
    let mut notes = Vec::new();
    if let Some(b) = newest {
        let took = (b.stop - b.start).max(0) as f64;
        notes.push(format!("took {}", format_secs(took)));
        obs.metrics.push(Metric::gauge(
            "vigil_backup_last_duration_seconds",
            "How long the newest backup that counts took",
            took,
        ));
    }
    // A newer backup of the type that found errors is worth a line: it is why the age
    // did not move.
    if let Some(bad) = info
        .backups
        .iter()
        .filter(|b| b.error && of_type(b, backup_type))
        .filter(|b| newest.is_none_or(|n| b.stop > n.stop))
        .max_by_key(|b| b.stop)
    {
        notes.push(format!(
            "newer {kind}{}backup {} has errors and does not count",
            if kind.is_empty() { "" } else { " " },
            bad.label
        ));
    }
    notes.push(match (&info.wal_min, &info.wal_max) {
        (Some(min), Some(max)) => format!("WAL archive {min}…{max}"),
        _ => "WAL archive empty".to_string(),
    });
    for (name, help, seg) in [
        (
            "vigil_backup_wal_min_segment",
            "Position (log × 2^32 + segment) of the oldest WAL segment in the archive",
            &info.wal_min,
        ),
        (
            "vigil_backup_wal_max_segment",
            "Position (log × 2^32 + segment) of the newest WAL segment in the archive",
            &info.wal_max,
        ),
    ] {
        if let Some(n) = seg.as_deref().and_then(segment_number) {
            obs.metrics.push(Metric::gauge(name, help, n));
        }
    }
    if info.backup_running {
        notes.push("a backup is running".to_string());
    }
    obs.metrics.push(Metric::gauge(
        "vigil_backup_in_progress",
        "1 while a backup is being taken (pgBackRest: the stanza's backup lock is held)",
        f64::from(u8::from(info.backup_running)),
    ));
    obs.metrics.push(Metric::gauge(
        "vigil_backup_pgbackrest_status_code",
        "pgBackRest's stanza status code (0 ok, 2 no valid backups, 99 other, …)",
        info.status_code as f64,
    ));
    // "No valid backups" is the no-backup case above, already critical with its message;
    // any other status is an error of the stanza itself, whatever the backups' age.
    if info.status_code != 0 && !(info.status_code == STATUS_NO_BACKUPS && newest.is_none()) {
        obs.status = Status::Critical;
        obs.message = format!("{}; {}", status_problem(info), obs.message);
    }
    obs.message = format!("{}; {}", obs.message, notes.join("; "));
    obs
}

#[cfg(test)]
mod tests {
    use std::time::Duration as StdDuration;

    use super::super::MAX_TOOL_OUTPUT;
    use super::*;

    const NOW: f64 = 1_795_485_900.0;

    fn fixture(name: &str) -> StanzaInfo {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/pgbackrest")
            .join(name);
        parse_info(&std::fs::read(&path).unwrap(), "main").unwrap()
    }

    fn t() -> Thresholds {
        age_thresholds(None, None)
    }

    fn metric(o: &Observation, name: &str) -> Option<f64> {
        o.metrics.iter().find(|m| m.name == name).map(|m| m.value)
    }

    #[test]
    fn one_full_backup_is_ok_with_its_age_size_and_wal_range() {
        let info = fixture("one-full.json");
        assert_eq!(info.status_code, 0);
        assert_eq!(info.backups.len(), 1);
        assert_eq!(info.backups[0].stop, 1_795_485_854);
        assert_eq!(info.backups[0].repo_size, Some(3_062_552));
        let o = evaluate_pgbackrest(&info, None, &t(), NOW);
        assert_eq!(o.status, Status::Ok);
        assert_eq!(o.value, Some(46.0));
        assert_eq!(metric(&o, "vigil_backup_age_seconds"), Some(46.0));
        assert_eq!(metric(&o, "vigil_backup_size_bytes"), Some(3_062_552.0));
        assert_eq!(metric(&o, "vigil_backup_backups"), Some(1.0));
        assert_eq!(metric(&o, "vigil_backup_last_duration_seconds"), Some(2.0));
        assert_eq!(metric(&o, "vigil_backup_wal_min_segment"), Some(1.0));
        assert_eq!(metric(&o, "vigil_backup_wal_max_segment"), Some(2.0));
        assert_eq!(metric(&o, "vigil_backup_in_progress"), Some(0.0));
        assert!(
            o.message
                .starts_with("full backup 20261124-020412F ended 46.0s ago"),
            "{}",
            o.message
        );
        assert!(
            o.message
                .contains("WAL archive 000000010000000000000001…000000010000000000000002"),
            "{}",
            o.message
        );
    }

    #[test]
    fn the_type_restricts_which_backups_count() {
        let info = fixture("full-incr-diff.json");
        let types: Vec<&str> = info
            .backups
            .iter()
            .map(|b| b.backup_type.as_str())
            .collect();
        assert_eq!(types, ["full", "incr", "diff"]);
        let age = |ty| evaluate_pgbackrest(&info, ty, &t(), NOW).value;
        assert_eq!(age(None), Some(NOW - 1_795_485_858.0));
        assert_eq!(age(Some(BackupType::Diff)), Some(NOW - 1_795_485_858.0));
        assert_eq!(age(Some(BackupType::Incr)), Some(NOW - 1_795_485_856.0));
        assert_eq!(age(Some(BackupType::Full)), Some(NOW - 1_795_485_854.0));
        let o = evaluate_pgbackrest(&info, Some(BackupType::Full), &t(), NOW);
        assert_eq!(metric(&o, "vigil_backup_backups"), Some(1.0));
        assert_eq!(metric(&o, "vigil_backup_wal_max_segment"), Some(6.0));
    }

    #[test]
    fn thresholds_apply_to_the_age() {
        let info = fixture("one-full.json");
        let crit = Thresholds::higher(None, Some(10.0));
        assert_eq!(
            evaluate_pgbackrest(&info, None, &crit, NOW).status,
            Status::Critical
        );
        let warn = Thresholds::higher(Some(46.0), Some(100.0));
        assert_eq!(
            evaluate_pgbackrest(&info, None, &warn, NOW).status,
            Status::Warning
        );
        let old = NOW + 48.0 * 3600.0;
        assert_eq!(
            evaluate_pgbackrest(&info, None, &t(), old).status,
            Status::Critical
        );
    }

    #[test]
    fn a_backup_with_errors_does_not_count_and_is_named() {
        let info = fixture("diff-with-error.json");
        assert!(info.backups[2].error);
        let o = evaluate_pgbackrest(&info, None, &t(), NOW);
        assert_eq!(o.value, Some(NOW - 1_795_485_856.0), "the incr counts");
        assert!(
            o.message
                .contains("newer backup 20261124-020412F_20261124-020417D has errors"),
            "{}",
            o.message
        );
        let o = evaluate_pgbackrest(&info, Some(BackupType::Diff), &t(), NOW);
        assert_eq!((o.status, o.value), (Status::Critical, None));
        assert!(
            o.message
                .starts_with("no diff backup found for stanza 'main'"),
            "{}",
            o.message
        );
    }

    #[test]
    fn no_valid_backups_is_critical_never_ok() {
        let info = fixture("no-backups.json");
        assert_eq!(info.status_code, STATUS_NO_BACKUPS);
        assert_eq!(
            (info.wal_min.as_deref(), info.wal_max.as_deref()),
            (None, None)
        );
        let o = evaluate_pgbackrest(&info, None, &t(), NOW);
        assert_eq!((o.status, o.value), (Status::Critical, None));
        assert!(
            o.message.starts_with("no backup found for stanza 'main'"),
            "{}",
            o.message
        );
        assert!(o.message.ends_with("WAL archive empty"), "{}", o.message);
        assert_eq!(metric(&o, "vigil_backup_backups"), Some(0.0));
        assert_eq!(metric(&o, "vigil_backup_age_seconds"), None);
    }

    #[test]
    fn a_stanza_error_is_critical_with_pgbackrests_message() {
        let info = fixture("missing-stanza-path.json");
        let o = evaluate_pgbackrest(&info, None, &t(), NOW);
        assert_eq!(o.status, Status::Critical);
        assert!(
            o.message
                .starts_with("stanza 'main': pgBackRest status 1 (missing stanza path)"),
            "{}",
            o.message
        );
        assert_eq!(metric(&o, "vigil_backup_pgbackrest_status_code"), Some(1.0));

        // 99 "other": the repository's own first line is quoted.
        let info = fixture("unreadable-repo.json");
        let o = evaluate_pgbackrest(&info, None, &t(), NOW);
        assert_eq!(o.status, Status::Critical);
        assert!(
            o.message.starts_with(
                "stanza 'main': pgBackRest status 99 (repo1: [FileOpenError] unable to load \
                 info file"
            ),
            "{}",
            o.message
        );
        assert!(!o.message.contains('\n'));

        // A stanza error is critical even when backups are listed and young.
        let mut info = fixture("one-full.json");
        info.status_code = 4;
        info.status_message = "different across repos".into();
        let o = evaluate_pgbackrest(&info, None, &t(), NOW);
        assert_eq!((o.status, o.value), (Status::Critical, Some(46.0)));
    }

    #[test]
    fn a_running_backup_is_reported() {
        let info = fixture("backup-running.json");
        assert!(info.backup_running);
        let o = evaluate_pgbackrest(&info, None, &t(), NOW + 100.0);
        assert_eq!(o.status, Status::Ok);
        assert!(o.message.ends_with("a backup is running"), "{}", o.message);
        assert_eq!(metric(&o, "vigil_backup_in_progress"), Some(1.0));
    }

    #[test]
    fn bad_output_is_an_error() {
        for bad in [
            &b""[..],
            b"not json",
            b"{\"name\":\"main\"}",
            b"[{\"name\":\"main\"}]",
        ] {
            assert!(
                parse_info(bad, "main").is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let e = parse_info(b"[]", "main").unwrap_err();
        assert!(e.contains("stanza 'main' is not in the output"), "{e}");
        let text = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/pgbackrest/one-full.json"),
        )
        .unwrap();
        assert!(parse_info(&text[..text.len() / 2], "main").is_err());
        assert!(parse_info(&text, "other").is_err());
    }

    #[test]
    fn segment_numbers_follow_the_wal() {
        assert_eq!(segment_number("000000010000000000000001"), Some(1.0));
        assert_eq!(
            segment_number("0000000200000001000000FF"),
            Some(4_294_967_296.0 + 255.0)
        );
        assert_eq!(segment_number("00000001000000000000000"), None);
        assert_eq!(segment_number("00000001000000000000000G"), None);
    }

    #[test]
    fn validation_names_the_key() {
        let cfg = |extra: &str| -> PgbackrestConfig {
            toml::from_str(&format!("stanza = \"main\"\n{extra}")).unwrap()
        };
        assert!(cfg("").validate(true).is_empty());
        assert!(cfg("type = \"full\"").validate(true).is_empty());
        let p = cfg("type = \"weekly\"").validate(false);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, "type");
        // `run_as` is the config's business (config::tests::run_as_must_exist_when_enabled).
        assert!(
            cfg("run_as = \"vigil-no-such-user-x\"")
                .validate(true)
                .is_empty()
        );
        let p = cfg("binary = \"bin/pgbackrest\"").validate(true);
        assert_eq!(p[0].0, "binary");
        let p = cfg("[env]\n\"A=B\" = \"x\"").validate(true);
        assert_eq!(p[0].0, "env");
        let p: PgbackrestConfig = toml::from_str("stanza = \"\"").unwrap();
        assert_eq!(p.validate(true)[0].0, "stanza");
    }

    #[test]
    fn the_command_line_and_request() {
        let c: PgbackrestConfig = toml::from_str(
            "stanza = \"main\"\nconfig = \"/etc/pgbackrest/pgbackrest.conf\"\n\
             run_as = \"postgres\"\n[env]\nPGBACKREST_LOG_LEVEL_CONSOLE = \"warn\"\n",
        )
        .unwrap();
        let common = Common {
            timeout: StdDuration::from_secs(120),
            ..Common::default()
        };
        let check = PgbackrestCheck::from_config(&c, &common);
        assert_eq!(
            check.request.argv,
            [
                "pgbackrest",
                "--config=/etc/pgbackrest/pgbackrest.conf",
                "--stanza=main",
                "info",
                "--output=json"
            ]
        );
        assert_eq!(check.request.run_as.as_deref(), Some("postgres"));
        assert_eq!(check.request.max_output, MAX_TOOL_OUTPUT);
        assert_eq!(
            check.request.env,
            [("PGBACKREST_LOG_LEVEL_CONSOLE".into(), "warn".into())]
        );
        assert_eq!(
            check.request.timeout,
            super::super::tool_timeout(common.timeout)
        );
    }

    #[test]
    fn the_error_line_is_preferred_over_warnings() {
        let o = Outcome {
            exit: crate::runner::Exit::Code(55),
            stdout: Vec::new(),
            stderr: b"WARN: option 'x' is deprecated\nERROR: [055]: unable to open missing file\n"
                .to_vec(),
            stdout_truncated: false,
            stderr_truncated: false,
            duration: StdDuration::ZERO,
        };
        assert_eq!(
            prefer_error_line(o).first_error_line(200),
            "ERROR: [055]: unable to open missing file"
        );
    }
}
