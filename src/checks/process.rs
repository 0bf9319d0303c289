//! `process`: how many processes of one service are running, and whether they restarted.
//!
//! Processes are matched either by `name` (equal to `/proc/PID/comm`) or by the pid held in
//! a `pidfile`. The primary value is the count, critical outside `[min, max]`. Secondary
//! measures: a restart seen since the previous sample (the pidfile's process, or the oldest
//! matching process, changed identity) is a warning; resident memory summed over the
//! matches; open file descriptors against the soft `RLIMIT_NOFILE`, worst process first.
//!
//! Invariants:
//! - A process is identified by (pid, start time), so a recycled pid is still a restart.
//! - Zombies are not running and are not counted.
//! - A process that vanishes mid-scan, and an fd directory we may not read (another user's
//!   process), are skipped, not errors: both are normal on a live host.
//! - The pidfile read is plain blocking I/O on the blocking pool and is never re-issued
//!   while the previous read has not returned (a pidfile on a hung NFS mount or a FIFO
//!   blocks forever); the same holds for the `/proc` scan.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use nix::unistd::{SysconfVar, sysconf};

use super::disk::{InFlight, format_bytes};
use super::{Check, CheckContext, CheckError, Metric, Observation, Status, Thresholds};
use crate::config::types::{Number, Ratio};

/// `/proc/PID/comm` holds at most this many bytes (`TASK_COMM_LEN` - 1).
const COMM_MAX: usize = 15;
/// Open-fd ratio warning default, applied when neither `fd_warn` nor `fd_crit` is given.
const DEFAULT_FD_WARN: f64 = 0.80;
/// Open-fd ratio critical default, applied when neither `fd_warn` nor `fd_crit` is given.
const DEFAULT_FD_CRIT: f64 = 0.95;
/// Page size when `sysconf` cannot tell (the size on every Linux platform we ship for).
const FALLBACK_PAGE_SIZE: u64 = 4096;

crate::check_config! {
    /// `[check.process.NAME]`: processes matched by `name` or `pidfile` (exactly one).
    ///
    /// `warn`/`crit` are optional counts where more is worse (no defaults). `fd_warn` and
    /// `fd_crit` classify open fds against the soft limit; when both are omitted the defaults
    /// are 80% and 95%, and when only one is given the other is unset and never trips.
    pub struct ProcessConfig: Number {
        /// Match processes whose `/proc/PID/comm` equals this: 1 to 15 bytes, since the
        /// kernel keeps no more of a command name and a longer one could never match.
        #[serde(default)]
        pub name: Option<String>,
        /// Or the process whose pid this file holds; it must exist in `/proc`.
        #[serde(default)]
        pub pidfile: Option<PathBuf>,
        /// Fewer matching processes is critical (default 1).
        #[serde(default)]
        pub min: Option<u32>,
        /// More matching processes is critical (default: no maximum).
        #[serde(default)]
        pub max: Option<u32>,
        /// Open fds at or above this ratio of the soft limit is a warning (default 80%).
        #[serde(default)]
        pub fd_warn: Option<Ratio>,
        /// Open fds at or above this ratio of the soft limit is critical (default 95%).
        #[serde(default)]
        pub fd_crit: Option<Ratio>,
    }
}

impl ProcessConfig {
    /// Checks what serde cannot: exactly one matcher, a `name` that can match a comm,
    /// `min <= max`, `fd_warn <= fd_crit`.
    ///
    /// # Errors
    /// A message naming the offending keys.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        match (&self.name, &self.pidfile) {
            (Some(_), Some(_)) => problems.push((
                "pidfile",
                "give either `name` or `pidfile`, not both".into(),
            )),
            (None, None) => {
                problems.push(("name", "one of `name` or `pidfile` is required".into()))
            }
            (Some(n), None) if n.is_empty() || n.len() > COMM_MAX => {
                problems.push((
                    "name",
                    format!("{n:?} cannot match: a comm is 1 to {COMM_MAX} bytes"),
                ));
            }
            _ => {}
        }
        if let Some((min, max)) = self.min.zip(self.max).filter(|(min, max)| min > max) {
            problems.push((
                "max",
                format!("`min` ({min}) is greater than `max` ({max})"),
            ));
        }
        if let Some((w, c)) = self.fd_warn.zip(self.fd_crit).filter(|(w, c)| w.0 > c.0) {
            problems.push((
                "fd_crit",
                format!("`fd_warn` ({w}) is greater than `fd_crit` ({c})"),
            ));
        }
        problems
    }
}

/// What a check looks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// The `comm` to match.
    Name(String),
    /// The pid in this file.
    Pidfile(PathBuf),
    /// The config did not name exactly one; reported at every run (the loader's
    /// [`ProcessConfig::validate`] normally refuses it first).
    Invalid(String),
}

/// A running `process` check: its policy, the restart tracker and the in-flight reads.
pub struct ProcessCheck {
    target: Target,
    policy: ProcessPolicy,
    page_size: u64,
    restarts: RestartTracker,
    pidfile_read: InFlight,
    scan: InFlight,
}

impl ProcessCheck {
    /// Builds the check, applying the defaults.
    pub fn from_config(c: &ProcessConfig, _common: &super::Common) -> Self {
        let problems = c.validate(true);
        let target = match (&c.name, &c.pidfile, problems.first()) {
            (Some(n), None, None) => Target::Name(n.clone()),
            (None, Some(p), None) => Target::Pidfile(p.clone()),
            (_, _, Some((_, e))) => Target::Invalid(e.clone()),
            // validate() accepted it, so exactly one of name and pidfile is set.
            _ => Target::Invalid("one of `name` or `pidfile` is required".into()),
        };
        let (fd_warn, fd_crit) = crate::checks::threshold::or_defaults(
            c.fd_warn.map(|r| r.0),
            c.fd_crit.map(|r| r.0),
            DEFAULT_FD_WARN,
            DEFAULT_FD_CRIT,
        );
        ProcessCheck {
            target,
            policy: ProcessPolicy {
                min: c.min.unwrap_or(1),
                max: c.max,
                count: Thresholds::higher(c.warn.map(|n| n.0), c.crit.map(|n| n.0)),
                fds: Thresholds::higher(fd_warn, fd_crit),
            },
            page_size: page_size(),
            restarts: RestartTracker::default(),
            pidfile_read: InFlight::default(),
            scan: InFlight::default(),
        }
    }
}

fn page_size() -> u64 {
    match sysconf(SysconfVar::PAGE_SIZE) {
        Ok(Some(n)) if n > 0 => n.unsigned_abs(),
        _ => FALLBACK_PAGE_SIZE,
    }
}

impl Check for ProcessCheck {
    async fn run(&mut self, cx: &CheckContext) -> Result<Observation, CheckError> {
        let proc_root = cx.proc_root.clone();
        let (found, subject) = match &self.target {
            Target::Invalid(e) => {
                return Err(CheckError::Parse(format!("invalid process check: {e}")));
            }
            Target::Name(name) => {
                let comm = name.clone().into_bytes();
                let scan_what = format!("scan of {}", proc_root.display());
                let found = self
                    .scan
                    .run(&scan_what, move || scan_by_name(&proc_root, &comm))
                    .await??;
                (found, format!("named '{name}'"))
            }
            Target::Pidfile(path) => {
                let subject = format!("from pidfile {}", path.display());
                let p = path.clone();
                // A plain blocking read on purpose: a pidfile on a hung mount or a FIFO must
                // block a pool thread we know about, not the runtime.
                let what = format!("read({})", path.display());
                let read = self
                    .pidfile_read
                    .run(&what, move || fs::read_to_string(&p))
                    .await?;
                let found = match read {
                    Ok(text) => {
                        let pid = parse_pidfile(&text).map_err(|e| {
                            CheckError::Parse(format!("pidfile {}: {e}", path.display()))
                        })?;
                        // One pid's few procfs files, read on the async thread as the
                        // kernel check does: procfs does not hang the way the pidfile's
                        // mount can, and a second trip through the blocking pool would
                        // double this check's wakeups.
                        let mut found = scan_pid(&proc_root, pid)?;
                        if found.processes.is_empty() {
                            found.note = Some(format!("pid {pid} is not running"));
                        }
                        found
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound => Found {
                        note: Some("pidfile does not exist".into()),
                        ..Found::default()
                    },
                    Err(e) => {
                        return Err(CheckError::io(
                            format!("read pidfile {}", path.display()),
                            e,
                        ));
                    }
                };
                (found, subject)
            }
        };
        let sample = summarize(&found, self.page_size, &mut self.restarts);
        Ok(Observation {
            status: classify_process(&sample, &self.policy),
            value: Some(sample.count as f64),
            message: describe_process(&subject, &sample, &self.policy, &found),
            metrics: process_metrics(&sample, self.restarts.total),
            replication: None,
        })
    }
}

/// One matching process, as read from `/proc/PID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// The pid.
    pub pid: u32,
    /// Start time in clock ticks after boot (field 22 of `stat`).
    pub start_time: u64,
    /// Resident pages from `statm`, when readable.
    pub resident_pages: Option<u64>,
    /// Entries in `fd/`, when readable.
    pub open_fds: Option<u64>,
    /// Soft `Max open files` from `limits`; `None` when unlimited or unreadable.
    pub fd_limit: Option<u64>,
}

/// The result of one scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// The matching, running processes.
    pub processes: Vec<ProcInfo>,
    /// Processes whose `comm` we were not allowed to read (`hidepid`).
    pub unreadable: usize,
    /// Why nothing was found, when there is more to say than the count.
    pub note: Option<String>,
}

fn is_gone(e: &std::io::Error) -> bool {
    // ESRCH: the task exited between open and read.
    e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(nix::libc::ESRCH)
}

/// Every running process under `proc_root` whose `comm` equals `comm`.
fn scan_by_name(proc_root: &Path, comm: &[u8]) -> Result<Found, CheckError> {
    let entries = fs::read_dir(proc_root)
        .map_err(|e| CheckError::io(format!("read_dir({})", proc_root.display()), e))?;
    let mut found = Found::default();
    for entry in entries {
        let entry =
            entry.map_err(|e| CheckError::io(format!("read_dir({})", proc_root.display()), e))?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        match fs::read(dir.join("comm")) {
            Ok(c) if parse_comm(&c) == comm => {}
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                found.unreadable += 1;
                continue;
            }
            Err(_) => continue,
        }
        if let Some(p) = read_process(&dir, pid)? {
            found.processes.push(p);
        }
    }
    Ok(found)
}

/// The process `pid`, when it is running.
fn scan_pid(proc_root: &Path, pid: u32) -> Result<Found, CheckError> {
    let processes = read_process(&proc_root.join(pid.to_string()), pid)?
        .into_iter()
        .collect();
    Ok(Found {
        processes,
        ..Found::default()
    })
}

/// Reads one process; `None` when it does not exist, has vanished, or is a zombie.
fn read_process(dir: &Path, pid: u32) -> Result<Option<ProcInfo>, CheckError> {
    let stat_path = dir.join("stat");
    let stat = match fs::read_to_string(&stat_path) {
        Ok(s) => s,
        Err(e) if is_gone(&e) => return Ok(None),
        Err(e) => return Err(CheckError::io(format!("read {}", stat_path.display()), e)),
    };
    let stat = parse_stat(&stat)
        .map_err(|e| CheckError::Parse(format!("{}: {e}", stat_path.display())))?;
    if matches!(stat.state, 'Z' | 'X' | 'x') {
        return Ok(None);
    }
    // The rest is best effort: a process may exit between these reads, and another
    // user's fd directory is not ours to read.
    let resident_pages = fs::read_to_string(dir.join("statm"))
        .ok()
        .and_then(|s| parse_statm_resident(&s));
    let open_fds = fs::read_dir(dir.join("fd"))
        .ok()
        .map(|d| d.filter(|e| e.is_ok()).count() as u64);
    let fd_limit = fs::read_to_string(dir.join("limits"))
        .ok()
        .and_then(|s| parse_limits_nofile(&s));
    Ok(Some(ProcInfo {
        pid,
        start_time: stat.start_time,
        resident_pages,
        open_fds,
        fd_limit,
    }))
}

/// The fields of `/proc/PID/stat` this check uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// The command name (between the parentheses).
    pub comm: String,
    /// State letter: `R`, `S`, `D`, `Z`, ...
    pub state: char,
    /// Start time in clock ticks after boot (field 22).
    pub start_time: u64,
}

/// Parses `/proc/PID/stat`. The command name may contain spaces and `)`, so the fields are
/// split after the *last* `)` (proc(5)).
///
/// # Errors
/// A message when the line is truncated or a field is not a number.
pub fn parse_stat(s: &str) -> Result<Stat, String> {
    let open = s.find('(').ok_or("no '(' before the command name")?;
    let close = s.rfind(')').ok_or("no ')' after the command name")?;
    if close < open {
        return Err("')' before '('".into());
    }
    // '(' and ')' are ASCII, so both offsets are char boundaries and `get` cannot fail.
    let comm = s.get(open + 1..close).unwrap_or_default().to_string();
    // Fields after the name start at field 3 (state), so field N is at index N - 3.
    let rest: Vec<&str> = s
        .get(close + 1..)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let state = rest
        .first()
        .and_then(|f| f.chars().next())
        .ok_or("no state field")?;
    let start = rest.get(22 - 3).ok_or("fewer than 22 fields")?;
    let start_time = start
        .parse()
        .map_err(|_| format!("start time {start:?} is not a number"))?;
    Ok(Stat {
        comm,
        state,
        start_time,
    })
}

/// `comm` without its trailing newline.
pub fn parse_comm(raw: &[u8]) -> &[u8] {
    raw.strip_suffix(b"\n").unwrap_or(raw)
}

/// Resident pages: the second field of `/proc/PID/statm`.
pub fn parse_statm_resident(s: &str) -> Option<u64> {
    s.split_whitespace().nth(1)?.parse().ok()
}

/// The soft `Max open files` from `/proc/PID/limits`; `None` when unlimited or absent.
pub fn parse_limits_nofile(s: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .strip_prefix("Max open files")?
        .split_whitespace()
        .next()?;
    soft.parse().ok().filter(|&n| n > 0)
}

/// The pid in a pidfile: the first line, trimmed, a positive number.
///
/// # Errors
/// A message when the file is empty or the first line is not a pid.
pub fn parse_pidfile(s: &str) -> Result<u32, String> {
    let first = s.lines().next().unwrap_or("").trim();
    if first.is_empty() {
        return Err("empty".into());
    }
    match first.parse::<u32>() {
        Ok(0) | Err(_) => Err(format!("{first:?} is not a pid")),
        Ok(pid) => Ok(pid),
    }
}

/// Remembers the identity of the tracked process between samples.
#[derive(Debug, Default)]
pub struct RestartTracker {
    last: Option<(u32, u64)>,
    /// Restarts seen since the agent started.
    pub total: u64,
}

impl RestartTracker {
    /// Records this sample's (pid, start time); returns `(old pid, new pid)` when it differs
    /// from the previous sample's and both had one.
    pub fn observe(&mut self, current: Option<(u32, u64)>) -> Option<(u32, u32)> {
        let restart = match (self.last, current) {
            (Some(old), Some(new)) if old != new => Some((old.0, new.0)),
            _ => None,
        };
        if restart.is_some() {
            self.total += 1;
        }
        self.last = current;
        restart
    }
}

/// One sample, reduced to what is classified and reported.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSample {
    /// Matching running processes.
    pub count: usize,
    /// The oldest one (the pidfile's process in pidfile mode).
    pub oldest_pid: Option<u32>,
    /// Resident bytes summed over the matches.
    pub resident_bytes: u64,
    /// The highest open-fd ratio among processes whose fds and limit were readable.
    pub fds_used_ratio: Option<f64>,
    /// `(old pid, new pid)` when a restart was seen since the previous sample.
    pub restart: Option<(u32, u32)>,
}

/// Reduces a scan to a sample and feeds the restart tracker.
pub fn summarize(found: &Found, page_size: u64, restarts: &mut RestartTracker) -> ProcessSample {
    let oldest = found.processes.iter().min_by_key(|p| (p.start_time, p.pid));
    let restart = restarts.observe(oldest.map(|p| (p.pid, p.start_time)));
    let resident_bytes = found
        .processes
        .iter()
        .filter_map(|p| p.resident_pages)
        .fold(0u64, |a, n| a.saturating_add(n.saturating_mul(page_size)));
    let fds_used_ratio = found
        .processes
        .iter()
        .filter_map(|p| Some(p.open_fds? as f64 / p.fd_limit? as f64))
        .fold(None, |worst: Option<f64>, r| {
            Some(worst.map_or(r, |w| w.max(r)))
        });
    ProcessSample {
        count: found.processes.len(),
        oldest_pid: oldest.map(|p| p.pid),
        resident_bytes,
        fds_used_ratio,
        restart,
    }
}

/// How the check judges a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessPolicy {
    /// Fewer is critical.
    pub min: u32,
    /// More is critical.
    pub max: Option<u32>,
    /// `warn`/`crit` on the count.
    pub count: Thresholds,
    /// `fd_warn`/`fd_crit` on the open-fd ratio.
    pub fds: Thresholds,
}

/// The worst of: count outside `[min, max]` (critical), count thresholds, a restart
/// (warning) and the open-fd ratio.
pub fn classify_process(s: &ProcessSample, p: &ProcessPolicy) -> Status {
    let count = s.count as u64;
    let mut status = if count < u64::from(p.min) || p.max.is_some_and(|m| count > u64::from(m)) {
        Status::Critical
    } else {
        Status::Ok
    };
    status = status.worse(p.count.classify(s.count as f64));
    if s.restart.is_some() {
        status = status.worse(Status::Warning);
    }
    if let Some(r) = s.fds_used_ratio {
        status = status.worse(p.fds.classify(r));
    }
    status
}

/// The one-line message, e.g.
/// `2 processes named 'postgres' (min 1), oldest pid 812, RSS 1.2 GiB, fds 3.1% of limit`.
pub fn describe_process(
    subject: &str,
    s: &ProcessSample,
    p: &ProcessPolicy,
    found: &Found,
) -> String {
    let noun = if s.count == 1 { "process" } else { "processes" };
    let mut m = format!("{} {noun} {subject} (min {}", s.count, p.min);
    if let Some(max) = p.max {
        m.push_str(&format!(", max {max}"));
    }
    m.push(')');
    if let Some(pid) = s.oldest_pid {
        m.push_str(&format!(
            ", {} {pid}",
            if s.count == 1 { "pid" } else { "oldest pid" }
        ));
        m.push_str(&format!(", RSS {}", format_bytes(s.resident_bytes)));
    }
    if let Some(r) = s.fds_used_ratio {
        m.push_str(&format!(", fds {:.1}% of limit", r * 100.0));
    }
    if let Some(note) = &found.note {
        m.push_str(&format!(": {note}"));
    }
    if found.unreadable > 0 && s.count < p.min as usize {
        m.push_str(&format!(
            "; {} processes not readable (hidepid?)",
            found.unreadable
        ));
    }
    if let Some((old, new)) = s.restart {
        m.push_str(&format!("; restarted: pid {old} -> {new}"));
    }
    m
}

fn process_metrics(s: &ProcessSample, restarts_total: u64) -> Vec<Metric> {
    let mut v = vec![
        Metric::gauge(
            "vigil_process_matching",
            "Matching running processes.",
            s.count as f64,
        ),
        Metric::counter(
            "vigil_process_restarts_total",
            "Restarts seen since the agent started.",
            restarts_total as f64,
        ),
        Metric::gauge(
            "vigil_process_resident_bytes",
            "Resident memory summed over the matching processes.",
            s.resident_bytes as f64,
        ),
    ];
    if let Some(r) = s.fds_used_ratio {
        v.push(Metric::gauge(
            "vigil_process_fds_used_ratio",
            "Highest ratio of open fds to the soft limit among the matching processes.",
            r,
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};
    use std::time::Duration as StdDuration;

    use super::*;

    fn fixture_cx() -> CheckContext {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        CheckContext {
            proc_root: root.join("proc"),
            sys_root: root.join("sys"),
            pg: Default::default(),
        }
    }

    fn check(toml_text: &str) -> ProcessCheck {
        let c: ProcessConfig = toml::from_str(toml_text).unwrap();
        ProcessCheck::from_config(&c, &Default::default())
    }

    fn metric(o: &Observation, name: &str) -> Option<f64> {
        o.metrics.iter().find(|m| m.name == name).map(|m| m.value)
    }

    #[test]
    fn stat_is_split_after_the_last_parenthesis() {
        let s = parse_stat("1203 (odd) name (x) S 1 1203 1203 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 900 1000000 100").unwrap();
        assert_eq!(
            s,
            Stat {
                comm: "odd) name (x".into(),
                state: 'S',
                start_time: 900
            }
        );
        let s = parse_stat("7 (a b) Z 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 36935 0 0\n").unwrap();
        assert_eq!((s.state, s.start_time), ('Z', 36935));
        assert!(parse_stat("7 (short) S 1 2 3").is_err());
        assert!(parse_stat("garbage").is_err());
        assert!(parse_stat("7 (x) S 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 soon 0").is_err());
    }

    #[test]
    fn small_proc_files() {
        assert_eq!(parse_comm(b"postgres\n"), b"postgres");
        assert_eq!(parse_statm_resident("765 434 406 5 0 123 0\n"), Some(434));
        assert_eq!(parse_statm_resident("765"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             96365                96365                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_limits_nofile(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files     \n";
        assert_eq!(parse_limits_nofile(unlimited), None);
        assert_eq!(parse_limits_nofile(""), None);
    }

    #[test]
    fn pidfiles() {
        assert_eq!(parse_pidfile("812\n"), Ok(812));
        assert_eq!(
            parse_pidfile("  812  \n/var/lib/postgresql\n5432\n"),
            Ok(812),
            "postmaster.pid layout"
        );
        for bad in ["", "\n", "abc", "0", "-5", "99999999999"] {
            assert!(parse_pidfile(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn restarts_need_a_process_before_and_after() {
        let mut t = RestartTracker::default();
        assert_eq!(
            t.observe(Some((10, 100))),
            None,
            "first sample is the baseline"
        );
        assert_eq!(t.observe(Some((10, 100))), None);
        assert_eq!(t.observe(Some((11, 200))), Some((10, 11)));
        assert_eq!(
            t.observe(Some((11, 300))),
            Some((11, 11)),
            "a recycled pid is a restart"
        );
        assert_eq!(t.observe(None), None);
        assert_eq!(
            t.observe(Some((12, 400))),
            None,
            "down then up is reported as the count"
        );
        assert_eq!(t.total, 2);
    }

    fn policy() -> ProcessPolicy {
        ProcessPolicy {
            min: 1,
            max: Some(3),
            count: Thresholds::higher(None, None),
            fds: Thresholds::higher(Some(0.8), Some(0.95)),
        }
    }

    fn sample(count: usize) -> ProcessSample {
        ProcessSample {
            count,
            oldest_pid: Some(1),
            resident_bytes: 0,
            fds_used_ratio: None,
            restart: None,
        }
    }

    #[test]
    fn count_bounds_restarts_and_fds_classify() {
        let p = policy();
        assert_eq!(classify_process(&sample(0), &p), Status::Critical);
        assert_eq!(classify_process(&sample(1), &p), Status::Ok);
        assert_eq!(classify_process(&sample(3), &p), Status::Ok);
        assert_eq!(classify_process(&sample(4), &p), Status::Critical);
        let warned = ProcessPolicy {
            count: Thresholds::higher(Some(2.0), None),
            ..p
        };
        assert_eq!(classify_process(&sample(2), &warned), Status::Warning);
        assert_eq!(
            classify_process(
                &ProcessSample {
                    restart: Some((1, 2)),
                    ..sample(1)
                },
                &p
            ),
            Status::Warning
        );
        assert_eq!(
            classify_process(
                &ProcessSample {
                    fds_used_ratio: Some(0.85),
                    ..sample(1)
                },
                &p
            ),
            Status::Warning
        );
        assert_eq!(
            classify_process(
                &ProcessSample {
                    fds_used_ratio: Some(0.95),
                    ..sample(1)
                },
                &p
            ),
            Status::Critical
        );
    }

    #[test]
    fn summary_picks_the_oldest_and_the_worst_fd_ratio() {
        let found = Found {
            processes: vec![
                ProcInfo {
                    pid: 20,
                    start_time: 5,
                    resident_pages: Some(10),
                    open_fds: Some(5),
                    fd_limit: Some(10),
                },
                ProcInfo {
                    pid: 30,
                    start_time: 2,
                    resident_pages: None,
                    open_fds: None,
                    fd_limit: Some(10),
                },
                ProcInfo {
                    pid: 40,
                    start_time: 9,
                    resident_pages: Some(1),
                    open_fds: Some(9),
                    fd_limit: None,
                },
            ],
            ..Found::default()
        };
        let mut t = RestartTracker::default();
        let s = summarize(&found, 4096, &mut t);
        assert_eq!(s.count, 3);
        assert_eq!(s.oldest_pid, Some(30));
        assert_eq!(s.resident_bytes, 11 * 4096);
        assert_eq!(s.fds_used_ratio, Some(0.5));
    }

    #[test]
    fn message_reads_as_a_sentence() {
        let s = ProcessSample {
            count: 2,
            oldest_pid: Some(812),
            resident_bytes: 1288490188,
            fds_used_ratio: None,
            restart: Some((123, 456)),
        };
        let p = ProcessPolicy {
            max: None,
            ..policy()
        };
        assert_eq!(
            describe_process("named 'postgres'", &s, &p, &Found::default()),
            "2 processes named 'postgres' (min 1), oldest pid 812, RSS 1.2 GiB; restarted: pid 123 -> 456"
        );
    }

    #[test]
    fn validation_names_the_keys() {
        let c = |t: &str| {
            let v = toml::from_str::<ProcessConfig>(t).unwrap().validate(true);
            match v.first() {
                None => Ok(()),
                Some((_, m)) => Err(m.clone()),
            }
        };
        assert!(c("name = \"postgres\"").is_ok());
        assert!(c("pidfile = \"/run/x.pid\"").is_ok());
        assert!(c("").unwrap_err().contains("required"));
        let long = c("name = \"postgres_exporter\"").unwrap_err();
        assert!(long.contains("cannot match"), "{long}");
        assert!(
            c("name = \"a\"\npidfile = \"/b\"")
                .unwrap_err()
                .contains("not both")
        );
        assert!(
            c("name = \"a\"\nmin = 3\nmax = 2")
                .unwrap_err()
                .contains("`min`")
        );
        assert!(
            c("name = \"a\"\nfd_warn = \"90%\"\nfd_crit = \"80%\"")
                .unwrap_err()
                .contains("`fd_warn`")
        );
    }

    #[tokio::test]
    async fn an_invalid_config_is_unknown_not_ok() {
        let e = check("").run(&fixture_cx()).await.unwrap_err();
        assert!(matches!(e, CheckError::Parse(_)), "{e:?}");
    }

    #[tokio::test]
    async fn counts_by_name_in_the_fixture_tree() {
        let mut c = check("name = \"postgres\"");
        let o = c.run(&fixture_cx()).await.unwrap();
        // 812 and 845; 990 is a zombie.
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert_eq!(o.value, Some(2.0));
        let ps = page_size() as f64;
        assert_eq!(
            metric(&o, "vigil_process_resident_bytes"),
            Some((2560.0 + 1024.0) * ps)
        );
        assert_eq!(metric(&o, "vigil_process_fds_used_ratio"), Some(0.75));
        assert_eq!(metric(&o, "vigil_process_restarts_total"), Some(0.0));
        assert!(
            o.message
                .starts_with("2 processes named 'postgres' (min 1), oldest pid 812, RSS "),
            "{}",
            o.message
        );
        assert!(o.metrics.iter().all(|m| m.labels.is_empty()));

        let o = check("name = \"postgres\"\nfd_warn = \"70%\"")
            .run(&fixture_cx())
            .await
            .unwrap();
        assert_eq!(o.status, Status::Warning);
        let o = check("name = \"postgres\"\nmax = 1")
            .run(&fixture_cx())
            .await
            .unwrap();
        assert_eq!(o.status, Status::Critical);
        let o = check("name = \"odd) name (x\"")
            .run(&fixture_cx())
            .await
            .unwrap();
        assert_eq!((o.status, o.value), (Status::Ok, Some(1.0)));
        assert_eq!(
            metric(&o, "vigil_process_fds_used_ratio"),
            None,
            "unlimited is skipped"
        );
        let o = check("name = \"pgbouncer\"")
            .run(&fixture_cx())
            .await
            .unwrap();
        assert_eq!((o.status, o.value), (Status::Critical, Some(0.0)));
    }

    #[tokio::test]
    async fn follows_a_pidfile_in_the_fixture_tree() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pg.pid");
        let mut c = check(&format!("pidfile = {:?}", pidfile.to_str().unwrap()));
        let o = c.run(&fixture_cx()).await.unwrap();
        assert_eq!((o.status, o.value), (Status::Critical, Some(0.0)));
        assert!(
            o.message.ends_with(": pidfile does not exist"),
            "{}",
            o.message
        );

        fs::write(&pidfile, "812\n/var/lib/postgresql/15/main\n").unwrap();
        let o = c.run(&fixture_cx()).await.unwrap();
        assert_eq!(
            (o.status, o.value),
            (Status::Ok, Some(1.0)),
            "{}",
            o.message
        );
        assert!(o.message.contains(", pid 812,"), "{}", o.message);

        fs::write(&pidfile, "845\n").unwrap();
        let o = c.run(&fixture_cx()).await.unwrap();
        assert_eq!(o.status, Status::Warning, "{}", o.message);
        assert!(
            o.message.ends_with("restarted: pid 812 -> 845"),
            "{}",
            o.message
        );
        assert_eq!(metric(&o, "vigil_process_restarts_total"), Some(1.0));

        fs::write(&pidfile, "990\n").unwrap();
        let o = c.run(&fixture_cx()).await.unwrap();
        assert_eq!(o.value, Some(0.0), "a zombie is not running");
        assert!(
            o.message.ends_with(": pid 990 is not running"),
            "{}",
            o.message
        );

        fs::write(&pidfile, "\n").unwrap();
        let e = c.run(&fixture_cx()).await.unwrap_err();
        assert!(
            matches!(e, CheckError::Parse(ref m) if m.contains("pg.pid")),
            "{e:?}"
        );
    }

    /// Waits, with a deadline, for a fresh child to have exec'd (its comm changes then).
    async fn run_until(c: &mut ProcessCheck, cx: &CheckContext, want: f64) -> Observation {
        let deadline = std::time::Instant::now() + StdDuration::from_secs(10);
        loop {
            let o = c.run(cx).await.unwrap();
            if o.value == Some(want) || std::time::Instant::now() > deadline {
                return o;
            }
            tokio::time::sleep(StdDuration::from_millis(10)).await;
        }
    }

    fn spawn_named(exe: &Path) -> Child {
        Command::new(exe).arg("30").spawn().unwrap()
    }

    fn stop(mut child: Child) {
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn sees_real_processes_come_and_go() {
        // The kernel names a process after the file it exec'd, so a symlink to sleep gives a
        // comm no other process on this host has.
        let dir = tempfile::tempdir().unwrap();
        let name = format!("vgl{}", fastrand::u32(..));
        let exe = dir.path().join(&name);
        std::os::unix::fs::symlink("/bin/sleep", &exe).unwrap();
        let cx = CheckContext::host();
        let mut c = check(&format!("name = {name:?}"));

        let first = spawn_named(&exe);
        let o = run_until(&mut c, &cx, 1.0).await;
        assert_eq!(
            (o.status, o.value),
            (Status::Ok, Some(1.0)),
            "{}",
            o.message
        );
        assert!(metric(&o, "vigil_process_resident_bytes").unwrap() > 0.0);
        assert!(
            metric(&o, "vigil_process_fds_used_ratio").is_some(),
            "our own child's fds are readable"
        );

        let second = spawn_named(&exe);
        let o = run_until(&mut c, &cx, 2.0).await;
        assert_eq!(
            (o.status, o.value),
            (Status::Ok, Some(2.0)),
            "the oldest is unchanged: {}",
            o.message
        );

        let (old, new) = (first.id(), second.id());
        stop(first);
        let o = run_until(&mut c, &cx, 1.0).await;
        assert_eq!(o.status, Status::Warning, "{}", o.message);
        assert!(
            o.message
                .ends_with(&format!("restarted: pid {old} -> {new}")),
            "{}",
            o.message
        );
        assert_eq!(metric(&o, "vigil_process_restarts_total"), Some(1.0));
        let o = c.run(&cx).await.unwrap();
        assert_eq!(
            o.status,
            Status::Ok,
            "a restart warns for one sample: {}",
            o.message
        );

        stop(second);
        let o = run_until(&mut c, &cx, 0.0).await;
        assert_eq!(o.status, Status::Critical, "{}", o.message);
    }

    #[tokio::test]
    async fn a_pidfile_that_blocks_is_not_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("hung.pid");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let mut c = check(&format!("pidfile = {:?}", fifo.to_str().unwrap()));
        let cx = CheckContext::host();

        // Opening a FIFO with no writer blocks for real, like a read on a dead NFS server.
        let first = tokio::time::timeout(StdDuration::from_millis(200), c.run(&cx)).await;
        assert!(first.is_err(), "the read should have blocked");
        let e = c.run(&cx).await.unwrap_err();
        let CheckError::Stuck(m) = &e else {
            panic!("expected Stuck, got {e:?}")
        };
        assert!(
            m.starts_with(&format!("read({}) has not returned since", fifo.display())),
            "{m}"
        );
        assert!(m.ends_with("not re-issued"), "{m}");

        // Release the blocked thread so the runtime can shut down, then wait for the flag.
        let mut w = fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        std::io::Write::write_all(&mut w, format!("{}\n", std::process::id()).as_bytes()).unwrap();
        drop(w);
        let deadline = std::time::Instant::now() + StdDuration::from_secs(10);
        while c.pidfile_read.is_busy() {
            assert!(
                std::time::Instant::now() < deadline,
                "the released read never returned"
            );
            tokio::time::sleep(StdDuration::from_millis(5)).await;
        }
    }
}
