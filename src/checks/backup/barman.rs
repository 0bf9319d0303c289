//! `backup.barman`: seconds since the newest DONE Barman backup of `server` ended.
//!
//! Runs `barman -f json list-backups SERVER` (Barman ≥ 2.10 has `-f json`; Debian bookworm
//! ships 3.4). Its JSON writer (`barman/output.py`, `JsonOutputWriter.result_list_backup`)
//! prints one object keyed by server name, holding a list of backups:
//!
//! ```json
//! {"pg": [{"backup_id": "20240112T031500", "end_time_timestamp": "1705029330",
//!          "end_time": "Fri Jan 12 03:15:30 2024", "size_bytes": 24117248,
//!          "status": "DONE", "retention_status": "VALID", ...},
//!         {"backup_id": "20240113T031500", "status": "FAILED"}]}
//! ```
//!
//! `end_time_timestamp` (Unix seconds, as a string) is used rather than `end_time`, which
//! is `ctime()` in the Barman host's local zone. The list carries everything the check
//! needs, so `show-backup` is not run (one program per sample, not one per backup).
//!
//! Which backups count: status `DONE` only. `FAILED`, `STARTED`, `EMPTY` and `SYNCING` are
//! not backups one can restore. `WAITING_FOR_WALS` does not count either: its copy is
//! complete but the WAL needed to make it consistent has not been archived yet, so it
//! cannot be restored until it does — and if WAL archiving is broken it never will, which
//! is exactly when the check must not look fresh. A newer backup that does not count is
//! named in the message ("newer backup 20240113T031500 is FAILED").
//!
//! Errors: in JSON mode Barman writes its errors to stdout as `{"_ERROR": [...]}` and
//! exits 1; the check quotes them. Barman refuses to run as any user but its configured
//! `barman_user`, hence `run_as = "barman"` in most setups; `env` can set `HOME` to pick a
//! `~/.barman.conf`.
//!
//! Defaults when neither `warn` nor `crit` is given: 26h and 48h.

use std::time::Duration as StdDuration;

use indexmap::IndexMap;
use serde_json::Value;

use super::{
    Newest, age_thresholds, check_outcome, command_line, evaluate_age, run_program, tool_error,
    tool_request, unix_now, validate_tool,
};
use crate::checks::{Check, CheckContext, CheckError, Common, Observation, Thresholds};
use crate::config::types::Duration;
use crate::runner::{Exit, Request, Runner};

/// The binary run when `binary` is not set (looked up in the runner's `PATH`).
pub const DEFAULT_BINARY: &str = "barman";

crate::check_config! {
    /// `[check.backup.barman.NAME]`: seconds since the newest DONE backup of `server`
    /// ended.
    pub struct BarmanConfig: Duration {
        /// The Barman server name (a section of barman.conf).
        pub server: String,
        /// The Barman binary (default "barman", looked up in PATH; else an absolute path).
        #[serde(default)]
        pub binary: Option<String>,
        /// Run Barman as this user (Barman insists on its `barman_user`).
        #[serde(default)]
        pub run_as: Option<String>,
        /// Variables added to its cleared environment.
        #[serde(default)]
        pub env: IndexMap<String, String>,
    }
}

impl BarmanConfig {
    /// `server` must be a plain name (it becomes an argument); `binary` a name or an
    /// absolute path. `run_as` is checked by the config's validation, which knows whether
    /// a privileged runner is set.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.server.is_empty() || self.server.starts_with('-') || self.server == "all" {
            problems.push((
                "server",
                format!(
                    "{:?} is not a server name (one section of barman.conf; not \"all\")",
                    self.server
                ),
            ));
        }
        problems.extend(validate_tool(self.binary.as_deref()));
        problems
    }
}

/// A running `backup.barman` check.
pub struct BarmanCheck {
    server: String,
    binary: Option<String>,
    run_as: Option<String>,
    env: IndexMap<String, String>,
    timeout: StdDuration,
    thresholds: Thresholds,
    /// Runs the program (in process, or via the privileged runner).
    pub(crate) runner: Runner,
}

impl BarmanCheck {
    /// Builds the check, applying the defaults.
    pub fn from_config(c: &BarmanConfig, common: &Common) -> Self {
        BarmanCheck {
            server: c.server.clone(),
            binary: c.binary.clone(),
            run_as: c.run_as.clone(),
            env: c.env.clone(),
            timeout: common.timeout,
            thresholds: age_thresholds(c.warn, c.crit),
            runner: Runner::in_process(),
        }
    }
}

impl BarmanCheck {
    /// The program request, without running it (the privileged runner builds it from its
    /// own config).
    pub fn request(&self) -> Request {
        tool_request(
            self.binary.as_deref(),
            DEFAULT_BINARY,
            &["-f", "json", "list-backups", &self.server],
            &self.env,
            self.run_as.as_deref(),
            self.timeout,
        )
    }
}

impl Check for BarmanCheck {
    async fn run(&mut self, _cx: &CheckContext) -> Result<Observation, CheckError> {
        let req = self.request();
        let outcome = run_program(&self.runner, &req).await?;
        // In JSON mode Barman's own errors are on stdout ({"_ERROR": [...]}), where
        // `first_error_line` would quote the JSON braces; quote the messages instead.
        if let (Exit::Code(c), Some(errors)) = (outcome.exit, json_errors(&outcome.stdout)) {
            if c != 0 {
                return Err(tool_error(format!(
                    "`{}` exited with {c}: {errors}",
                    command_line(&req)
                )));
            }
        }
        let outcome = check_outcome(&req, outcome)?;
        let backups = parse_list_backups(&outcome.stdout, &self.server)
            .map_err(|e| tool_error(format!("`{}`: {e}", command_line(&req))))?;
        Ok(evaluate_barman(
            &self.server,
            &backups,
            &self.thresholds,
            unix_now(),
        ))
    }
}

/// One backup of `list-backups`.
#[derive(Debug, Clone, PartialEq)]
pub struct BarmanBackup {
    /// `YYYYMMDDTHHMMSS` (sorts by time).
    pub id: String,
    /// `DONE`, `FAILED`, `WAITING_FOR_WALS`, `STARTED`, `EMPTY`, `SYNCING`.
    pub status: String,
    /// Unix seconds (present for DONE and WAITING_FOR_WALS).
    pub end_time: Option<f64>,
    /// Bytes of the base backup, when reported.
    pub size_bytes: Option<f64>,
}

/// The `_ERROR` messages of a Barman JSON document, joined; `None` if there are none or
/// the output is not JSON.
fn json_errors(stdout: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdout).ok()?;
    let errors: Vec<&str> = v
        .get("_ERROR")?
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    (!errors.is_empty()).then(|| {
        let joined = errors.join("; ");
        if joined.chars().count() > super::ERROR_LINE_MAX {
            let cut: String = joined.chars().take(super::ERROR_LINE_MAX).collect();
            format!("{cut}…")
        } else {
            joined
        }
    })
}

/// Parses the stdout of `barman -f json list-backups SERVER`.
///
/// # Errors
/// A message when the output is not Barman's JSON, has no list for `server`, or a
/// DONE backup has no valid `end_time_timestamp`.
pub fn parse_list_backups(stdout: &[u8], server: &str) -> Result<Vec<BarmanBackup>, String> {
    let v: Value =
        serde_json::from_slice(stdout).map_err(|e| format!("output is not Barman's JSON: {e}"))?;
    let Some(list) = v.get(server) else {
        let errors = json_errors(stdout).unwrap_or_else(|| "no list in the output".into());
        return Err(format!("no backup list for server {server:?}: {errors}"));
    };
    let list = list
        .as_array()
        .ok_or_else(|| format!("backups of server {server:?} are not a list"))?;
    list.iter()
        .map(|b| {
            let id = b
                .get("backup_id")
                .and_then(Value::as_str)
                .ok_or("a backup without a `backup_id`")?
                .to_string();
            let status = b
                .get("status")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("backup {id} has no `status`"))?
                .to_string();
            let end_time = match b.get("end_time_timestamp") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.trim().parse::<f64>().map_err(|_| {
                    format!("backup {id}: `end_time_timestamp` {s:?} is not a number")
                })?),
                Some(Value::Number(n)) => n.as_f64(),
                Some(other) => {
                    return Err(format!(
                        "backup {id}: `end_time_timestamp` {other} is not a number"
                    ));
                }
            };
            if status == "DONE" && end_time.is_none() {
                return Err(format!("DONE backup {id} has no `end_time_timestamp`"));
            }
            let size_bytes = b.get("size_bytes").and_then(Value::as_f64);
            Ok(BarmanBackup {
                id,
                status,
                end_time,
                size_bytes,
            })
        })
        .collect()
}

/// Judges the newest DONE backup at `now` (Unix seconds).
pub fn evaluate_barman(
    server: &str,
    backups: &[BarmanBackup],
    t: &Thresholds,
    now: f64,
) -> Observation {
    let done: Vec<&BarmanBackup> = backups.iter().filter(|b| b.status == "DONE").collect();
    let newest = done
        .iter()
        .filter_map(|b| b.end_time.map(|e| (*b, e)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    // Backup ids are start timestamps, so the lexically greatest is the latest attempt.
    let latest = backups.iter().max_by(|a, b| a.id.cmp(&b.id));
    let newer_failed = match (latest, newest) {
        (Some(l), Some((n, _))) if l.id > n.id => Some(l),
        (Some(l), None) => Some(l),
        _ => None,
    };
    let n = newest.map(|(b, end)| Newest {
        what: format!("backup {} of server {server} ended", b.id),
        ended_at: end,
        size_bytes: b.size_bytes,
    });
    let mut o = evaluate_age(
        n.as_ref(),
        done.len(),
        t,
        now,
        format!("no DONE backup found for server '{server}'"),
    );
    if let Some(l) = newer_failed {
        o.message = format!("{}; newer backup {} is {}", o.message, l.id, l.status);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::Status;

    // Fixtures are real `barman -f json list-backups` output of Barman 3.4 (Debian
    // bookworm), or that output edited to add statuses; see tests/fixtures/barman/README.md.
    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/barman");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
    }

    fn t() -> Thresholds {
        age_thresholds(None, None)
    }

    #[test]
    fn newest_done_counts_and_newer_failures_are_named() {
        let b = parse_list_backups(&fixture("list-backups-mixed.json"), "pg").unwrap();
        assert_eq!(b.len(), 4);
        let o = evaluate_barman("pg", &b, &t(), 1_705_029_330.0 + 3600.0);
        assert_eq!((o.status, o.value), (Status::Ok, Some(3600.0)));
        assert!(
            o.message
                .starts_with("backup 20240112T031500 of server pg ended 1h 0m ago"),
            "{}",
            o.message
        );
        assert!(
            o.message
                .ends_with("; newer backup 20240113T031500 is FAILED"),
            "{}",
            o.message
        );
        let count = o.metrics.iter().find(|m| m.name == "vigil_backup_backups");
        assert_eq!(count.unwrap().value, 2.0);
    }

    #[test]
    fn waiting_for_wals_does_not_count() {
        let b = parse_list_backups(&fixture("list-backups-waiting.json"), "pg").unwrap();
        let o = evaluate_barman("pg", &b, &t(), 2e9);
        assert_eq!((o.status, o.value), (Status::Critical, None));
        assert_eq!(
            o.message,
            "no DONE backup found for server 'pg'; newer backup 20240114T031500 is \
             WAITING_FOR_WALS"
        );
    }

    #[test]
    fn empty_list_is_critical() {
        let b = parse_list_backups(&fixture("list-backups-empty.json"), "pg").unwrap();
        assert!(b.is_empty());
        let o = evaluate_barman("pg", &b, &t(), 0.0);
        assert_eq!((o.status, o.value), (Status::Critical, None));
        assert_eq!(o.message, "no DONE backup found for server 'pg'");
    }

    #[test]
    fn errors_and_malformed_output() {
        let unknown = fixture("unknown-server.json");
        assert_eq!(
            json_errors(&unknown).as_deref(),
            Some("Unknown server 'nosuch'")
        );
        let e = parse_list_backups(&unknown, "nosuch").unwrap_err();
        assert!(e.contains("Unknown server 'nosuch'"), "{e}");
        for out in [
            &b"pg 20240112T031500 - Fri Jan 12 03:15:30 2024 - Size: 23.0 MiB"[..],
            b"{\"pg\": {}}",
            b"{\"pg\": [{\"backup_id\": \"x\", \"status\": \"DONE\"}]}",
            b"{\"pg\": [{\"backup_id\": \"x\", \"status\": \"DONE\", \"end_time_timestamp\": \"soon\"}]}",
            b"{\"pg\": [{\"status\": \"DONE\"}]}",
            b"{\"pg\": [",
        ] {
            assert!(
                parse_list_backups(out, "pg").is_err(),
                "{}",
                String::from_utf8_lossy(out)
            );
        }
    }

    #[test]
    fn server_names_are_validated() {
        let mut c: BarmanConfig = toml::from_str("server = \"pg\"").unwrap();
        assert!(c.validate(false).is_empty());
        for bad in ["", "all", "--help"] {
            c.server = bad.into();
            assert_eq!(c.validate(false)[0].0, "server", "{bad:?}");
        }
    }
}
