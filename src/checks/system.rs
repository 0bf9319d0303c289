//! `system`: host-wide load, memory, pressure stall and OOM kills.
//!
//! The primary value is the 5-minute load average divided by the number of online CPUs.
//! The 5-minute window is classified because the 1-minute one swings with every
//! short burst (a checkpoint, a vacuum, a cron job) and would page on noise, while the
//! 15-minute one reacts too late to a host that is really saturated.
//!
//! Secondary measures:
//! - memory available (`MemAvailable / MemTotal`), lower is worse (`mem_warn`/`mem_crit`);
//! - pressure stall information (PSI) from `pressure/{cpu,memory,io}`, reported always,
//!   classified only when `psi_warn`/`psi_crit` are set, against the worst `some avg60`
//!   of memory and io (cpu pressure is what load already says);
//! - OOM kills: the kernel's `oom_kill` counter; the first sample is the baseline, and any
//!   increase since the agent started is a warning.
//!
//! Invariants: every file comes from `proc_root`/`sys_root`; what old kernels lack (PSI
//! before 4.20, `oom_kill` before 4.13, `MemAvailable` before 3.14) is skipped, not an
//! error; the CPU count is never 0 (a division by it follows).

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::disk::format_bytes;
use super::{Check, CheckContext, CheckError, Metric, Observation, Status, Thresholds};
use crate::checks::KindConfig;
use crate::config::types::{Number, Ratio};

/// Load-per-core warning default, applied when neither `warn` nor `crit` is given.
const DEFAULT_WARN: f64 = 2.0;
/// Load-per-core critical default, applied when neither `warn` nor `crit` is given.
const DEFAULT_CRIT: f64 = 4.0;
/// Memory-available warning default, applied when neither `mem_warn` nor `mem_crit` is given.
const DEFAULT_MEM_WARN: f64 = 0.10;
/// Memory-available critical default, applied when neither `mem_warn` nor `mem_crit` is given.
const DEFAULT_MEM_CRIT: f64 = 0.05;
/// PSI resources, in the order they are reported.
const PSI_RESOURCES: [&str; 3] = ["cpu", "memory", "io"];

crate::check_config! {
    /// `[check.system.NAME]`: load per core, memory, pressure stall and OOM kills.
    ///
    /// `warn`/`crit` are 5-minute load averages per online CPU (defaults 2.0 and 4.0).
    /// `mem_warn`/`mem_crit` are ratios of memory available, lower is worse (defaults 10%
    /// and 5%). `psi_warn`/`psi_crit` have no defaults. For each pair: when both are
    /// omitted the defaults apply; when only one is given, the other is unset and never trips.
    pub struct SystemConfig: Number {
        /// Memory available at or below this ratio is a warning (default 10%).
        #[serde(default)]
        pub mem_warn: Option<Ratio>,
        /// Memory available at or below this ratio is critical (default 5%).
        #[serde(default)]
        pub mem_crit: Option<Ratio>,
        /// The worst `some avg60` pressure of memory and io at or above this is a warning.
        #[serde(default)]
        pub psi_warn: Option<Ratio>,
        /// The worst `some avg60` pressure of memory and io at or above this is critical.
        #[serde(default)]
        pub psi_crit: Option<Ratio>,
    }
}

impl SystemConfig {
    /// Checks the order of the kind's own threshold pairs (`warn`/`crit` are checked by the
    /// loader like every kind's): `mem_warn >= mem_crit` (lower is worse) and
    /// `psi_warn <= psi_crit`.
    ///
    /// # Errors
    /// A message naming the keys in the wrong order.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if let Some((w, c)) = self.mem_warn.zip(self.mem_crit).filter(|(w, c)| w.0 < c.0) {
            problems.push((
                "mem_crit",
                format!("`mem_warn` ({w}) is below `mem_crit` ({c}); less memory available is worse, so warn must be the larger"),
            ));
        }
        if let Some((w, c)) = self.psi_warn.zip(self.psi_crit).filter(|(w, c)| w.0 > c.0) {
            problems.push((
                "psi_crit",
                format!("`psi_warn` ({w}) is greater than `psi_crit` ({c})"),
            ));
        }
        problems
    }
}

/// A running `system` check: its policy and the OOM-kill baseline.
pub struct SystemCheck {
    policy: SystemPolicy,
    /// The kernel's `oom_kill` at the first sample that had one.
    oom_baseline: Option<u64>,
}

impl SystemCheck {
    /// Builds the check, applying the defaults.
    pub fn from_config(c: &SystemConfig, _common: &super::Common) -> Self {
        let (warn, crit) = KindConfig::thresholds_or(c, DEFAULT_WARN, DEFAULT_CRIT);
        let (mem_warn, mem_crit) = crate::checks::threshold::or_defaults(
            c.mem_warn.map(|r| r.0),
            c.mem_crit.map(|r| r.0),
            DEFAULT_MEM_WARN,
            DEFAULT_MEM_CRIT,
        );
        SystemCheck {
            policy: SystemPolicy {
                load: Thresholds::higher(warn, crit),
                memory: Thresholds::lower(mem_warn, mem_crit),
                psi: Thresholds::higher(c.psi_warn.map(|r| r.0), c.psi_crit.map(|r| r.0)),
            },
            oom_baseline: None,
        }
    }
}

impl Check for SystemCheck {
    async fn run(&mut self, cx: &CheckContext) -> Result<Observation, CheckError> {
        // A few small procfs/sysfs reads, on the async thread as the kernel check does:
        // procfs does not hang the way a network mount can, and a trip through the
        // blocking pool costs this check two more wakeups than the reads themselves.
        let raw = gather(&cx.proc_root, &cx.sys_root)?;
        let sample = interpret(&raw)?;
        let oom_since_start = sample.oom_kills.map(|now| {
            let base = *self.oom_baseline.get_or_insert(now);
            // The counter only goes up; a lower value means a different kernel under the
            // same agent (a checkpoint/restore), so start counting again from there.
            if now < base {
                self.oom_baseline = Some(now);
            }
            now.saturating_sub(base)
        });
        Ok(Observation {
            status: classify_system(&sample, oom_since_start, &self.policy),
            value: Some(sample.load_per_core[1]),
            message: describe_system(&sample, oom_since_start),
            metrics: system_metrics(&sample),
            replication: None,
        })
    }
}

/// The files as read; `None` where the kernel does not have them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawSystem {
    /// `/proc/loadavg`.
    pub loadavg: String,
    /// `/sys/devices/system/cpu/online`, or `None` when absent.
    pub cpu_online: Option<String>,
    /// `/proc/stat`, read only when `cpu_online` is unusable.
    pub stat: Option<String>,
    /// `/proc/meminfo`.
    pub meminfo: String,
    /// `/proc/vmstat`, or `None` when absent.
    pub vmstat: Option<String>,
    /// `(resource, pressure file)` for each resource the kernel reports.
    pub pressure: Vec<(&'static str, String)>,
    /// Where the CPU count came from, for error messages.
    pub cpu_source: PathBuf,
}

fn read_required(path: &Path) -> Result<String, CheckError> {
    fs::read_to_string(path).map_err(|e| CheckError::io(format!("read {}", path.display()), e))
}

/// Reads a file the kernel may lack: absent, or PSI compiled in but disabled (`psi=0`
/// makes the read fail with EOPNOTSUPP), is `None`.
fn read_optional(path: &Path) -> Result<Option<String>, CheckError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if e.kind() == ErrorKind::NotFound
                || e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) =>
        {
            Ok(None)
        }
        Err(e) => Err(CheckError::io(format!("read {}", path.display()), e)),
    }
}

/// Reads every file the check needs, on the blocking pool's thread.
fn gather(proc_root: &Path, sys_root: &Path) -> Result<RawSystem, CheckError> {
    let online_path = sys_root.join("devices/system/cpu/online");
    // Any failure here (a container without /sys) falls back to /proc/stat below.
    let cpu_online = fs::read_to_string(&online_path).ok();
    let (stat, cpu_source) = if cpu_online
        .as_deref()
        .and_then(|s| parse_cpu_list(s).ok())
        .is_some()
    {
        (None, online_path)
    } else {
        let stat_path = proc_root.join("stat");
        (Some(read_required(&stat_path)?), stat_path)
    };
    let mut pressure = Vec::new();
    for resource in PSI_RESOURCES {
        if let Some(text) = read_optional(&proc_root.join("pressure").join(resource))? {
            pressure.push((resource, text));
        }
    }
    Ok(RawSystem {
        loadavg: read_required(&proc_root.join("loadavg"))?,
        cpu_online,
        stat,
        meminfo: read_required(&proc_root.join("meminfo"))?,
        vmstat: read_optional(&proc_root.join("vmstat"))?,
        pressure,
        cpu_source,
    })
}

/// One interpreted sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SystemSample {
    /// Online CPUs (at least 1).
    pub cpus: u32,
    /// 1, 5 and 15-minute load averages per CPU.
    pub load_per_core: [f64; 3],
    /// Memory, when `meminfo` has both `MemTotal` and `MemAvailable`.
    pub memory: Option<Memory>,
    /// PSI lines of each resource the kernel reports.
    pub pressure: Vec<(&'static str, Vec<PsiLine>)>,
    /// The kernel's `oom_kill` counter, when it has one.
    pub oom_kills: Option<u64>,
}

/// Memory totals from `/proc/meminfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// `MemTotal`, bytes.
    pub total_bytes: u64,
    /// `MemAvailable`, bytes.
    pub available_bytes: u64,
}

impl Memory {
    /// Available / total; 0 for a zero total.
    pub fn available_ratio(&self) -> f64 {
        if self.total_bytes == 0 {
            0.0
        } else {
            self.available_bytes as f64 / self.total_bytes as f64
        }
    }
}

/// Turns the files into a sample.
///
/// # Errors
/// [`CheckError::Parse`] naming the file when `loadavg` or the CPU count cannot be read.
pub fn interpret(raw: &RawSystem) -> Result<SystemSample, CheckError> {
    let load =
        parse_loadavg(&raw.loadavg).map_err(|e| CheckError::Parse(format!("loadavg: {e}")))?;
    let cpus = match (&raw.cpu_online, &raw.stat) {
        (_, Some(stat)) => count_stat_cpus(stat),
        (Some(online), None) => parse_cpu_list(online)
            .map_err(|e| CheckError::Parse(format!("{}: {e}", raw.cpu_source.display())))?,
        (None, None) => 0,
    };
    if cpus == 0 {
        return Err(CheckError::Parse(format!(
            "{}: no online CPU listed",
            raw.cpu_source.display()
        )));
    }
    let per = |l: f64| l / f64::from(cpus);
    Ok(SystemSample {
        cpus,
        load_per_core: [per(load[0]), per(load[1]), per(load[2])],
        memory: parse_meminfo(&raw.meminfo),
        pressure: raw
            .pressure
            .iter()
            .map(|(r, text)| (*r, parse_psi(text)))
            .collect(),
        oom_kills: raw.vmstat.as_deref().and_then(parse_vmstat_oom_kill),
    })
}

/// The three load averages from `/proc/loadavg` (`0.13 0.19 0.09 1/81 4506`).
///
/// # Errors
/// A message when fewer than three numbers lead the line.
pub fn parse_loadavg(s: &str) -> Result<[f64; 3], String> {
    let mut out = [0.0; 3];
    let mut fields = s.split_whitespace();
    for slot in &mut out {
        let f = fields
            .next()
            .ok_or_else(|| format!("expected three load averages in {s:?}"))?;
        *slot = f
            .parse()
            .map_err(|_| format!("load average {f:?} is not a number"))?;
    }
    Ok(out)
}

/// Counts the CPUs in a kernel CPU list such as `0-3,5` (cpuset(7) "List format").
///
/// # Errors
/// A message when an element is not `N` or `N-M` with `N <= M`, or the list is empty.
pub fn parse_cpu_list(s: &str) -> Result<u32, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty CPU list".into());
    }
    let mut n = 0u32;
    for part in s.split(',') {
        let num = |x: &str| {
            x.trim()
                .parse::<u32>()
                .map_err(|_| format!("{part:?} is not a CPU number or range"))
        };
        let count = match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range {part:?} runs backwards"));
                }
                b - a + 1
            }
            None => num(part).map(|_| 1)?,
        };
        n = n.saturating_add(count);
    }
    Ok(n)
}

/// Counts `cpuN` lines in `/proc/stat` (the aggregate `cpu` line is not one).
pub fn count_stat_cpus(s: &str) -> u32 {
    let n = s
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.strip_prefix("cpu"))
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// `MemTotal` and `MemAvailable` from `/proc/meminfo`, in bytes; `None` if either is missing.
pub fn parse_meminfo(s: &str) -> Option<Memory> {
    let field = |name: &str| {
        let line = s.lines().find(|l| l.split(':').next() == Some(name))?;
        let mut parts = line.split(':').nth(1)?.split_whitespace();
        let v: u64 = parts.next()?.parse().ok()?;
        // meminfo says "kB" and means KiB.
        Some(match parts.next() {
            Some("kB") => v.saturating_mul(1024),
            _ => v,
        })
    };
    Some(Memory {
        total_bytes: field("MemTotal")?,
        available_bytes: field("MemAvailable")?,
    })
}

/// One line of a PSI file, averages as ratios.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PsiLine {
    /// `some` (at least one task stalled) or `full` (all non-idle tasks stalled).
    pub kind: &'static str,
    /// `avg10`, `avg60` and `avg300` divided by 100.
    pub avg: [f64; 3],
}

/// Parses a PSI file (`some avg10=0.23 avg60=0.67 avg300=0.98 total=7158427`); lines it
/// does not understand are skipped, so a kernel that adds fields does not break the check.
pub fn parse_psi(s: &str) -> Vec<PsiLine> {
    s.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let kind = match f.next()? {
                "some" => "some",
                "full" => "full",
                _ => return None,
            };
            let mut avg = [None; 3];
            for kv in f {
                let (k, v) = kv.split_once('=')?;
                let slot = match k {
                    "avg10" => 0,
                    "avg60" => 1,
                    "avg300" => 2,
                    _ => continue,
                };
                avg[slot] = Some(v.parse::<f64>().ok()? / 100.0);
            }
            Some(PsiLine {
                kind,
                avg: [avg[0]?, avg[1]?, avg[2]?],
            })
        })
        .collect()
}

/// The `oom_kill` counter from `/proc/vmstat`.
pub fn parse_vmstat_oom_kill(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
}

/// The worst `some avg60` of memory and io, the stalls load does not already show.
pub fn worst_psi(s: &SystemSample) -> Option<f64> {
    s.pressure
        .iter()
        .filter(|(r, _)| matches!(*r, "memory" | "io"))
        .flat_map(|(_, lines)| lines.iter().filter(|l| l.kind == "some").map(|l| l.avg[1]))
        .fold(None, |worst: Option<f64>, v| {
            Some(worst.map_or(v, |w| w.max(v)))
        })
}

/// How the check judges a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SystemPolicy {
    /// On the 5-minute load per core.
    pub load: Thresholds,
    /// On memory available (lower is worse).
    pub memory: Thresholds,
    /// On [`worst_psi`].
    pub psi: Thresholds,
}

/// The worst of load, memory, pressure and OOM kills since start (any is a warning).
pub fn classify_system(s: &SystemSample, oom_since_start: Option<u64>, p: &SystemPolicy) -> Status {
    let mut status = p.load.classify(s.load_per_core[1]);
    if let Some(m) = s.memory {
        status = status.worse(p.memory.classify(m.available_ratio()));
    }
    if let Some(v) = worst_psi(s) {
        status = status.worse(p.psi.classify(v));
    }
    if oom_since_start.is_some_and(|n| n > 0) {
        status = status.worse(Status::Warning);
    }
    status
}

/// The one-line message, e.g. `load 0.55 per core over 5m (4 CPUs), memory 8.3% available
/// (2.0 GiB of 23.5 GiB), pressure memory 4.6% io 7.2% (some, 60s); 2 OOM kills since start`.
pub fn describe_system(s: &SystemSample, oom_since_start: Option<u64>) -> String {
    let mut m = format!(
        "load {:.2} per core over 5m ({} CPUs)",
        s.load_per_core[1], s.cpus
    );
    match s.memory {
        Some(mem) => m.push_str(&format!(
            ", memory {:.1}% available ({} of {})",
            mem.available_ratio() * 100.0,
            format_bytes(mem.available_bytes),
            format_bytes(mem.total_bytes)
        )),
        None => m.push_str(", memory available unknown (no MemAvailable)"),
    }
    let psi: Vec<String> = s
        .pressure
        .iter()
        .filter(|(r, _)| matches!(*r, "memory" | "io"))
        .filter_map(|(r, lines)| {
            let some = lines.iter().find(|l| l.kind == "some")?;
            Some(format!("{r} {:.1}%", some.avg[1] * 100.0))
        })
        .collect();
    if !psi.is_empty() {
        m.push_str(&format!(", pressure {} (some, 60s)", psi.join(" ")));
    }
    if let Some(n) = oom_since_start.filter(|&n| n > 0) {
        m.push_str(&format!(
            "; {n} OOM kill{} since start",
            if n == 1 { "" } else { "s" }
        ));
    }
    m
}

fn system_metrics(s: &SystemSample) -> Vec<Metric> {
    const LOAD_HELP: &str = "Load average divided by the number of online CPUs.";
    let mut v = Vec::new();
    for (window, load) in ["1m", "5m", "15m"].into_iter().zip(s.load_per_core) {
        v.push(
            Metric::gauge("vigil_system_load_per_core", LOAD_HELP, load).label("window", window),
        );
    }
    v.push(Metric::gauge(
        "vigil_system_cpus",
        "Online CPUs.",
        f64::from(s.cpus),
    ));
    if let Some(mem) = s.memory {
        v.push(Metric::gauge(
            "vigil_system_memory_available_ratio",
            "MemAvailable / MemTotal.",
            mem.available_ratio(),
        ));
        v.push(Metric::gauge(
            "vigil_system_memory_total_bytes",
            "MemTotal in bytes.",
            mem.total_bytes as f64,
        ));
    }
    for (resource, lines) in &s.pressure {
        for line in lines {
            for (window, avg) in ["10s", "60s", "300s"].into_iter().zip(line.avg) {
                v.push(
                    Metric::gauge(
                        "vigil_system_pressure_ratio",
                        "Share of time tasks stalled on the resource (PSI average).",
                        avg,
                    )
                    .label("resource", *resource)
                    .label("kind", line.kind)
                    .label("window", window),
                );
            }
        }
    }
    if let Some(n) = s.oom_kills {
        v.push(Metric::counter(
            "vigil_system_oom_kills_total",
            "OOM kills since boot (the kernel's counter).",
            n as f64,
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    fn fixture_cx() -> CheckContext {
        CheckContext {
            proc_root: fixtures().join("proc"),
            sys_root: fixtures().join("sys"),
            pg: Default::default(),
        }
    }

    fn check(toml_text: &str) -> SystemCheck {
        let c: SystemConfig = toml::from_str(toml_text).unwrap();
        SystemCheck::from_config(&c, &Default::default())
    }

    fn metric(o: &Observation, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        o.metrics
            .iter()
            .find(|m| {
                m.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| m.labels.iter().any(|(mk, mv)| mk == k && mv == v))
            })
            .map(|m| m.value)
    }

    /// A copy of the fixture `/proc` files in a temp dir, to change between runs.
    fn scratch_proc() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in ["loadavg", "meminfo", "stat", "vmstat"] {
            fs::copy(fixtures().join("proc").join(f), dir.path().join(f)).unwrap();
        }
        dir
    }

    #[test]
    fn loadavg() {
        assert_eq!(
            parse_loadavg("0.13 0.19 0.09 1/81 4506\n"),
            Ok([0.13, 0.19, 0.09])
        );
        assert!(parse_loadavg("0.13 0.19").is_err());
        assert!(parse_loadavg("a b c").is_err());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,5\n"), Ok(5));
        assert_eq!(parse_cpu_list("0"), Ok(1));
        assert_eq!(parse_cpu_list("0-1"), Ok(2));
        assert_eq!(parse_cpu_list("0,2,4-7"), Ok(6));
        for bad in ["", "\n", "3-1", "a", "0-", "0,,1"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
        let stat = "cpu  8098 0 2339\ncpu0 3655 0 963\ncpu1 4443 0 1375\ncpufreq 1\nintr 1\n";
        assert_eq!(count_stat_cpus(stat), 2);
    }

    #[test]
    fn meminfo_and_vmstat() {
        let m = parse_meminfo(
            "MemTotal:       24684092 kB\nMemFree:  1 kB\nMemAvailable:   2468409 kB\n",
        )
        .unwrap();
        assert_eq!(
            m,
            Memory {
                total_bytes: 24684092 * 1024,
                available_bytes: 2468409 * 1024
            }
        );
        assert!((m.available_ratio() - 0.1).abs() < 1e-6);
        assert_eq!(
            parse_meminfo("MemTotal: 1 kB\nMemFree: 1 kB\n"),
            None,
            "kernels before 3.14"
        );
        assert_eq!(parse_vmstat_oom_kill("pgfault 5\noom_kill 3\n"), Some(3));
        assert_eq!(parse_vmstat_oom_kill("pgfault 5\n"), None);
    }

    #[test]
    fn psi_lines() {
        let lines = parse_psi(
            "some avg10=0.23 avg60=0.67 avg300=0.98 total=7158427\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        );
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].kind, "some");
        assert!((lines[0].avg[1] - 0.0067).abs() < 1e-12);
        assert_eq!(
            lines[1],
            PsiLine {
                kind: "full",
                avg: [0.0; 3]
            }
        );
        assert!(parse_psi("some avg10=x avg60=1 avg300=1 total=0\nweird line\n").is_empty());
    }

    fn sample() -> SystemSample {
        SystemSample {
            cpus: 4,
            load_per_core: [0.5, 0.5, 0.5],
            memory: Some(Memory {
                total_bytes: 100,
                available_bytes: 50,
            }),
            pressure: vec![
                (
                    "cpu",
                    vec![PsiLine {
                        kind: "some",
                        avg: [0.9; 3],
                    }],
                ),
                (
                    "memory",
                    vec![
                        PsiLine {
                            kind: "some",
                            avg: [0.0, 0.2, 0.0],
                        },
                        PsiLine {
                            kind: "full",
                            avg: [0.5; 3],
                        },
                    ],
                ),
                (
                    "io",
                    vec![PsiLine {
                        kind: "some",
                        avg: [0.0, 0.3, 0.0],
                    }],
                ),
            ],
            oom_kills: Some(0),
        }
    }

    fn policy() -> SystemPolicy {
        SystemPolicy {
            load: Thresholds::higher(Some(2.0), Some(4.0)),
            memory: Thresholds::lower(Some(0.1), Some(0.05)),
            psi: Thresholds::higher(None, None),
        }
    }

    #[test]
    fn each_measure_trips_by_itself() {
        let p = policy();
        assert_eq!(classify_system(&sample(), Some(0), &p), Status::Ok);
        let loaded = SystemSample {
            load_per_core: [9.0, 2.0, 0.1],
            ..sample()
        };
        assert_eq!(
            classify_system(&loaded, None, &p),
            Status::Warning,
            "the 5-minute value is classified"
        );
        let spike = SystemSample {
            load_per_core: [9.0, 0.1, 0.1],
            ..sample()
        };
        assert_eq!(
            classify_system(&spike, None, &p),
            Status::Ok,
            "a 1-minute spike is not"
        );
        let low = SystemSample {
            memory: Some(Memory {
                total_bytes: 100,
                available_bytes: 5,
            }),
            ..sample()
        };
        assert_eq!(classify_system(&low, None, &p), Status::Critical);
        assert_eq!(classify_system(&sample(), Some(1), &p), Status::Warning);
        // Worst some avg60 of memory and io is 0.3; cpu's 0.9 is ignored.
        assert_eq!(worst_psi(&sample()), Some(0.3));
        let psi = SystemPolicy {
            psi: Thresholds::higher(Some(0.25), Some(0.5)),
            ..p
        };
        assert_eq!(classify_system(&sample(), None, &psi), Status::Warning);
    }

    #[test]
    fn message_reads_as_a_sentence() {
        let s = SystemSample {
            memory: Some(Memory {
                total_bytes: 4 << 30,
                available_bytes: 1 << 30,
            }),
            ..sample()
        };
        assert_eq!(
            describe_system(&s, Some(3)),
            "load 0.50 per core over 5m (4 CPUs), memory 25.0% available (1.0 GiB of 4.0 GiB), \
             pressure memory 20.0% io 30.0% (some, 60s); 3 OOM kills since start"
        );
        let bare = SystemSample {
            memory: None,
            pressure: vec![],
            ..sample()
        };
        assert_eq!(
            describe_system(&bare, None),
            "load 0.50 per core over 5m (4 CPUs), memory available unknown (no MemAvailable)"
        );
    }

    #[test]
    fn validation_names_the_keys() {
        let c = |t: &str| {
            let v = toml::from_str::<SystemConfig>(t).unwrap().validate(true);
            match v.first() {
                None => Ok(()),
                Some((_, m)) => Err(m.clone()),
            }
        };
        assert!(c("mem_warn = \"10%\"\nmem_crit = \"5%\"").is_ok());
        assert!(
            c("mem_warn = \"5%\"\nmem_crit = \"10%\"")
                .unwrap_err()
                .contains("`mem_warn`")
        );
        assert!(
            c("psi_warn = \"50%\"\npsi_crit = \"10%\"")
                .unwrap_err()
                .contains("`psi_warn`")
        );
    }

    #[test]
    fn defaults_apply_only_when_both_are_omitted() {
        let c = check("");
        assert_eq!(c.policy.load, Thresholds::higher(Some(2.0), Some(4.0)));
        assert_eq!(c.policy.memory, Thresholds::lower(Some(0.1), Some(0.05)));
        assert_eq!(c.policy.psi, Thresholds::higher(None, None));
        let c = check("warn = 1.5\nmem_crit = \"2%\"\npsi_warn = \"20%\"");
        assert_eq!(c.policy.load, Thresholds::higher(Some(1.5), None));
        assert_eq!(c.policy.memory, Thresholds::lower(None, Some(0.02)));
        assert_eq!(c.policy.psi, Thresholds::higher(Some(0.2), None));
    }

    #[tokio::test]
    async fn measures_the_fixture_tree() {
        let mut c = check("");
        let o = c.run(&fixture_cx()).await.unwrap();
        // loadavg 3.20 9.60 6.40 on CPUs 0-3; MemAvailable 2057516 of 24684092 kB (8.3%).
        assert_eq!(o.value, Some(2.4));
        assert_eq!(o.status, Status::Warning, "{}", o.message);
        assert_eq!(metric(&o, "vigil_system_cpus", &[]), Some(4.0));
        assert_eq!(
            metric(&o, "vigil_system_load_per_core", &[("window", "15m")]),
            Some(1.6)
        );
        assert_eq!(
            metric(&o, "vigil_system_memory_total_bytes", &[]),
            Some(24684092.0 * 1024.0)
        );
        let io_full_10 = metric(
            &o,
            "vigil_system_pressure_ratio",
            &[("resource", "io"), ("kind", "full"), ("window", "10s")],
        );
        assert_eq!(io_full_10, Some(0.1));
        assert_eq!(
            o.metrics
                .iter()
                .filter(|m| m.name == "vigil_system_pressure_ratio")
                .count(),
            3 * 2 * 3
        );
        assert_eq!(metric(&o, "vigil_system_oom_kills_total", &[]), Some(2.0));
        assert!(
            !o.message.contains("OOM"),
            "kills before the agent started are the baseline: {}",
            o.message
        );
        assert_eq!(
            o.message,
            "load 2.40 per core over 5m (4 CPUs), memory 8.3% available (2.0 GiB of 23.5 GiB), \
             pressure memory 4.6% io 7.2% (some, 60s)"
        );
        let o = check("psi_crit = \"7%\"").run(&fixture_cx()).await.unwrap();
        assert_eq!(o.status, Status::Critical);
    }

    #[tokio::test]
    async fn oom_kills_after_start_warn_and_missing_extras_are_fine() {
        let proc_dir = scratch_proc();
        let cx = CheckContext {
            proc_root: proc_dir.path().to_path_buf(),
            sys_root: fixtures().join("sys"),
            pg: Default::default(),
        };
        let mut c = check("warn = 5.0\nmem_warn = \"1%\"");
        let o = c.run(&cx).await.unwrap();
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert_eq!(
            metric(&o, "vigil_system_pressure_ratio", &[]),
            None,
            "no pressure/ here"
        );

        fs::write(proc_dir.path().join("vmstat"), "pgfault 1\noom_kill 5\n").unwrap();
        let o = c.run(&cx).await.unwrap();
        assert_eq!(o.status, Status::Warning);
        assert!(
            o.message.ends_with("; 3 OOM kills since start"),
            "{}",
            o.message
        );
        assert_eq!(metric(&o, "vigil_system_oom_kills_total", &[]), Some(5.0));

        fs::write(proc_dir.path().join("vmstat"), "pgfault 1\n").unwrap();
        let o = c.run(&cx).await.unwrap();
        assert_eq!(
            o.status,
            Status::Ok,
            "kernels before 4.13 have no oom_kill: {}",
            o.message
        );
        assert_eq!(metric(&o, "vigil_system_oom_kills_total", &[]), None);
    }

    #[tokio::test]
    async fn cpu_count_falls_back_to_proc_stat() {
        let cx = CheckContext {
            proc_root: fixtures().join("proc"),
            sys_root: fixtures().join("no-such-sys"),
            pg: Default::default(),
        };
        let o = check("").run(&cx).await.unwrap();
        assert_eq!(metric(&o, "vigil_system_cpus", &[]), Some(4.0));

        let proc_dir = scratch_proc();
        fs::write(proc_dir.path().join("stat"), "cpu  1 2 3\nintr 0\n").unwrap();
        let cx = CheckContext {
            proc_root: proc_dir.path().to_path_buf(),
            sys_root: fixtures().join("no-such-sys"),
            pg: Default::default(),
        };
        let e = check("").run(&cx).await.unwrap_err();
        assert!(
            matches!(e, CheckError::Parse(ref m) if m.contains("no online CPU")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_missing_loadavg_is_an_error_naming_it() {
        let cx = CheckContext {
            proc_root: fixtures().join("no-such-proc"),
            sys_root: fixtures().join("sys"),
            pg: Default::default(),
        };
        let e = check("").run(&cx).await.unwrap_err();
        assert!(e.to_string().contains("no-such-proc"), "{e}");
    }

    #[tokio::test]
    async fn measures_this_host() {
        let o = check("").run(&CheckContext::host()).await.unwrap();
        assert!(o.value.is_some_and(|v| v.is_finite() && v >= 0.0), "{o:?}");
        assert!(metric(&o, "vigil_system_cpus", &[]).is_some_and(|n| n >= 1.0));
        assert!(metric(&o, "vigil_system_memory_available_ratio", &[]).is_some());
    }
}
