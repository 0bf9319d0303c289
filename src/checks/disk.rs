//! `disk`: how full one filesystem is, and how soon it will be full.
//!
//! Measured with one `statvfs(2)` of the configured path, read the way `df` reads it:
//! used = `blocks - bfree`, used ratio = used / (used + `bavail`), so blocks reserved for
//! root count as unavailable rather than free. Secondary measures: the inode used ratio
//! (same thresholds; skipped when the filesystem reports no inodes, as btrfs does), the
//! read-only flag (critical when `expect_writable`), and the predicted time to full from a
//! least-squares fit over recent samples (critical only when `full_within` is set).
//!
//! Invariants:
//! - `statvfs` runs on the blocking pool and is never issued twice for one check while the
//!   previous call has not returned: a dead NFS server leaves the thread stuck in the
//!   kernel, and re-issuing every interval would exhaust the pool (`InFlight`).
//! - The fill-rate history is bounded in count and age and is cleared when the
//!   filesystem's size changes (a resize or a different mount makes old samples lie).
//! - Time to full is reported from the second sample on (`vigil_disk_full_in_seconds`,
//!   `+Inf` when not filling) but trips `full_within` only from the third: two points
//!   always fit a line, so one noisy sample must not page anyone.
//!
//! This file also holds the small helpers the `process` and `system` kinds share:
//! `InFlight` and `format_bytes`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration as StdDuration, SystemTime};

use nix::sys::statvfs::{FsFlags, statvfs};
use tokio::time::Instant;

use super::{Check, CheckContext, CheckError, Metric, Observation, Status, Thresholds};
use crate::checks::KindConfig;
use crate::config::types::{Duration, Ratio};

/// Used-ratio warning default, applied when neither `warn` nor `crit` is given.
const DEFAULT_WARN: f64 = 0.80;
/// Used-ratio critical default, applied when neither `warn` nor `crit` is given.
const DEFAULT_CRIT: f64 = 0.90;
/// At most this many samples feed the fill-rate fit (10 minutes at the default 10s interval).
const HISTORY_MAX_SAMPLES: usize = 60;
/// Samples older than this are dropped from the fit, whatever the interval.
const HISTORY_MAX_AGE: StdDuration = StdDuration::from_secs(6 * 3600);
/// Fewest samples for a time-to-full prediction to trip `full_within`: two points always
/// fit a line exactly, so one noisy sample would be enough to page someone.
const MIN_SAMPLES_TO_TRIP: usize = 3;

crate::check_config! {
    /// `[check.disk.NAME]`: used space of the filesystem holding `path`.
    ///
    /// `warn`/`crit` are used ratios (`"80%"`) and apply to both space and inodes. When both
    /// are omitted the defaults are 80% and 90%; when only one is given, the other is unset
    /// and never trips.
    pub struct DiskConfig: Ratio {
        /// A path on the filesystem to watch (the mount point or anything below it).
        pub path: PathBuf,
        /// Whether a read-only mount is critical (default true).
        #[serde(default)]
        pub expect_writable: Option<bool>,
        /// Trip critical when the predicted time to full is at most this (no default: the
        /// prediction is reported but never trips).
        #[serde(default)]
        pub full_within: Option<Duration>,
    }
}

impl DiskConfig {
    /// Host-dependent facts, for an enabled check only: the path must exist, or the check
    /// could never measure (a typo, or a mount point missing on this host).
    pub fn validate(&self, enabled: bool) -> Vec<(&'static str, String)> {
        match std::fs::metadata(&self.path) {
            Err(e) if enabled => vec![("path", format!("{}: {e}", self.path.display()))],
            _ => Vec::new(),
        }
    }
}

/// A running `disk` check: its policy, the fill-rate history and the in-flight `statvfs`.
pub struct DiskCheck {
    path: PathBuf,
    policy: DiskPolicy,
    history: History,
    statvfs: InFlight,
}

impl DiskCheck {
    /// Builds the check, applying the defaults.
    pub fn from_config(c: &DiskConfig, _common: &super::Common) -> Self {
        let (warn, crit) = KindConfig::thresholds_or(c, DEFAULT_WARN, DEFAULT_CRIT);
        DiskCheck {
            path: c.path.clone(),
            policy: DiskPolicy {
                thresholds: Thresholds::higher(warn, crit),
                expect_writable: c.expect_writable.unwrap_or(true),
                full_within: c.full_within.map(Duration::get),
            },
            history: History::default(),
            statvfs: InFlight::default(),
        }
    }
}

impl Check for DiskCheck {
    async fn run(&mut self, _cx: &CheckContext) -> Result<Observation, CheckError> {
        let path = self.path.clone();
        let what = format!("statvfs({})", self.path.display());
        let stats = self.statvfs.run(&what, move || gather(&path)).await??;
        let usage = compute_usage(&stats);
        let fill = self.history.observe(Instant::now(), &usage);
        let status = classify_disk(&usage, &fill, &self.policy);
        let message = describe_disk(&self.path, &usage, &fill, &self.policy);
        Ok(Observation {
            status,
            value: Some(usage.used_ratio),
            message,
            metrics: disk_metrics(&self.path, &usage, &fill),
            replication: None,
        })
    }
}

/// What the check needs from `statvfs`, already in plain integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskStats {
    /// Fragment size: the unit of the block counts.
    pub frsize: u64,
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks, including those reserved for root.
    pub bfree: u64,
    /// Blocks free for unprivileged users.
    pub bavail: u64,
    /// Total inodes; 0 when the filesystem has no fixed inode table.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Mounted read-only.
    pub readonly: bool,
}

/// One `statvfs`, on the blocking pool's thread.
fn gather(path: &Path) -> Result<DiskStats, CheckError> {
    let st = statvfs(path).map_err(|e| {
        CheckError::io(
            format!("statvfs({})", path.display()),
            std::io::Error::from(e),
        )
    })?;
    // The counts are `c_ulong`/`fsblkcnt_t`: unsigned and at most 64 bits on every Linux
    // target, so widening with `as` is lossless (and `u64::from` is a no-op on 64-bit).
    // glibc already substitutes f_bsize for a zero f_frsize; repeat it for other libcs.
    let frsize = match st.fragment_size() as u64 {
        0 => st.block_size() as u64,
        n => n,
    };
    Ok(DiskStats {
        frsize,
        blocks: st.blocks() as u64,
        bfree: st.blocks_free() as u64,
        bavail: st.blocks_available() as u64,
        files: st.files() as u64,
        ffree: st.files_free() as u64,
        // ST_RDONLY also comes from a read-only bind of the tree in the agent's own mount
        // namespace (systemd's ProtectSystem=strict) while the filesystem itself is
        // writable; ask the superblock, and keep statvfs's answer when that cannot tell.
        readonly: st.flags().contains(FsFlags::ST_RDONLY)
            && superblock_readonly(path) != Some(false),
    })
}

/// Whether the filesystem holding `path` is read-only for everyone (its superblock: an
/// `ro` mount, or ext4 after `errors=remount-ro`), from the super options of the mount with
/// the path's device in `/proc/self/mountinfo`. `None` when that cannot tell: no such
/// line (btrfs subvolumes report a device of their own), or nothing readable.
fn superblock_readonly(path: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo_super_readonly(
        &text,
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
    )
}

/// Pure part of [`superblock_readonly`]: a mountinfo(5) line is `ID PARENT MAJOR:MINOR ROOT
/// MOUNTPOINT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPER_OPTIONS`; every mount of one
/// device shares its superblock, so the first line with the device answers.
pub fn mountinfo_super_readonly(mountinfo: &str, major: u64, minor: u64) -> Option<bool> {
    let dev = format!("{major}:{minor}");
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(2) == Some(dev.as_str()))?;
    let (_, after) = line.split_once(" - ")?;
    let super_options = after.split(' ').nth(2)?;
    Some(super_options.split(',').any(|o| o == "ro"))
}

/// Space and inode usage as `df` reports them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskUsage {
    /// Total size, bytes.
    pub size_bytes: u64,
    /// Used bytes (`blocks - bfree`).
    pub used_bytes: u64,
    /// Bytes available to unprivileged users (`bavail`).
    pub free_bytes: u64,
    /// used / (used + available); 0 for a filesystem with no blocks.
    pub used_ratio: f64,
    /// Used inode ratio; `None` when the filesystem reports no inodes.
    pub inodes_used_ratio: Option<f64>,
    /// Mounted read-only.
    pub readonly: bool,
}

/// Computes usage from raw counts, as `df` does (coreutils `df.c`, `get_dev`).
pub fn compute_usage(s: &DiskStats) -> DiskUsage {
    // Saturating: a filesystem updating its counters between fields can briefly report
    // bfree > blocks; a wrapped u64 would read as an exabyte used.
    let used_blocks = s.blocks.saturating_sub(s.bfree);
    let denom = used_blocks.saturating_add(s.bavail);
    let used_ratio = if denom == 0 {
        0.0
    } else {
        used_blocks as f64 / denom as f64
    };
    let inodes_used_ratio =
        (s.files > 0).then(|| s.files.saturating_sub(s.ffree) as f64 / s.files as f64);
    DiskUsage {
        size_bytes: s.blocks.saturating_mul(s.frsize),
        used_bytes: used_blocks.saturating_mul(s.frsize),
        free_bytes: s.bavail.saturating_mul(s.frsize),
        used_ratio,
        inodes_used_ratio,
        readonly: s.readonly,
    }
}

/// How the check judges a measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskPolicy {
    /// Used-ratio thresholds for space and inodes.
    pub thresholds: Thresholds,
    /// A read-only mount is critical.
    pub expect_writable: bool,
    /// A predicted time to full at most this is critical.
    pub full_within: Option<StdDuration>,
}

/// The fill-rate prediction for one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FillEstimate {
    /// Samples the fit used, this one included.
    pub samples: usize,
    /// Seconds until full: `None` with fewer than two samples, `+Inf` when not filling.
    pub full_in_seconds: Option<f64>,
}

/// The overall status: the worst of space, inodes, read-only and time to full.
pub fn classify_disk(u: &DiskUsage, fill: &FillEstimate, p: &DiskPolicy) -> Status {
    let mut status = p.thresholds.classify(u.used_ratio);
    if let Some(r) = u.inodes_used_ratio {
        status = status.worse(p.thresholds.classify(r));
    }
    if u.readonly && p.expect_writable {
        status = status.worse(Status::Critical);
    }
    let fills_soon = match (p.full_within, fill.full_in_seconds) {
        (Some(within), Some(full_in)) => {
            fill.samples >= MIN_SAMPLES_TO_TRIP && full_in <= within.as_secs_f64()
        }
        _ => false,
    };
    if fills_soon {
        status = status.worse(Status::Critical);
    }
    status
}

/// The one-line message, e.g.
/// `/data 91.2% used (88.0 MiB free of 1.0 GiB), inodes 0.1% used, read-only; full in ~2h`.
pub fn describe_disk(path: &Path, u: &DiskUsage, fill: &FillEstimate, p: &DiskPolicy) -> String {
    let mut m = format!(
        "{} {:.1}% used ({} free of {})",
        path.display(),
        u.used_ratio * 100.0,
        format_bytes(u.free_bytes),
        format_bytes(u.size_bytes)
    );
    if let Some(r) = u.inodes_used_ratio {
        m.push_str(&format!(", inodes {:.1}% used", r * 100.0));
    }
    if u.readonly {
        m.push_str(if p.expect_writable {
            ", read-only"
        } else {
            ", read-only (expected)"
        });
    }
    match fill.full_in_seconds {
        None => m.push_str("; time to full: needs more samples"),
        Some(s) if s.is_infinite() => m.push_str("; not filling"),
        Some(s) => {
            m.push_str("; full in ");
            m.push_str(&format_approx_duration(s));
        }
    }
    m
}

fn disk_metrics(path: &Path, u: &DiskUsage, fill: &FillEstimate) -> Vec<Metric> {
    let mp = path.display().to_string();
    let mut v = vec![
        Metric::gauge(
            "vigil_disk_used_ratio",
            "Used space ratio, as df computes it.",
            u.used_ratio,
        ),
        Metric::gauge(
            "vigil_disk_free_bytes",
            "Bytes available to unprivileged users.",
            u.free_bytes as f64,
        ),
        Metric::gauge(
            "vigil_disk_size_bytes",
            "Size of the filesystem in bytes.",
            u.size_bytes as f64,
        ),
        Metric::gauge(
            "vigil_disk_readonly",
            "1 when the filesystem is mounted read-only.",
            f64::from(u8::from(u.readonly)),
        ),
    ];
    if let Some(r) = u.inodes_used_ratio {
        v.push(Metric::gauge(
            "vigil_disk_inodes_used_ratio",
            "Used inode ratio.",
            r,
        ));
    }
    // Absent until two samples exist: a missing value is more honest than a guessed +Inf.
    if let Some(s) = fill.full_in_seconds {
        v.push(Metric::gauge(
            "vigil_disk_full_in_seconds",
            "Predicted seconds until the filesystem is full; +Inf when not filling.",
            s,
        ));
    }
    v.into_iter()
        .map(|m| m.label("mountpoint", mp.clone()))
        .collect()
}

/// Recent (time, used bytes) samples for the fill-rate fit.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<(Instant, u64)>,
    size_bytes: Option<u64>,
}

impl History {
    /// Records a sample taken at `now` and returns the prediction from the window.
    pub fn observe(&mut self, now: Instant, u: &DiskUsage) -> FillEstimate {
        if self.size_bytes != Some(u.size_bytes) {
            self.samples.clear();
            self.size_bytes = Some(u.size_bytes);
        }
        self.samples.push_back((now, u.used_bytes));
        while self.samples.len() > HISTORY_MAX_SAMPLES {
            self.samples.pop_front();
        }
        while let Some(&(t, _)) = self.samples.front() {
            if now.saturating_duration_since(t) <= HISTORY_MAX_AGE {
                break;
            }
            self.samples.pop_front();
        }
        // The sample just pushed is at most 0s old, so `samples` is never empty here.
        let Some(&(t0, _)) = self.samples.front() else {
            return FillEstimate {
                samples: 0,
                full_in_seconds: None,
            };
        };
        let points: Vec<(f64, f64)> = self
            .samples
            .iter()
            .map(|&(t, used)| (t.saturating_duration_since(t0).as_secs_f64(), used as f64))
            .collect();
        let full_in_seconds = fill_rate(&points).map(|slope| time_to_full(u.free_bytes, slope));
        FillEstimate {
            samples: points.len(),
            full_in_seconds,
        }
    }
}

/// Least-squares slope of `(seconds, bytes)` points, bytes per second. `None` with fewer
/// than two points or when all points share one time.
pub fn fill_rate(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for &(x, y) in points {
        sxy += (x - mean_x) * (y - mean_y);
        sxx += (x - mean_x) * (x - mean_x);
    }
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Seconds until `available` bytes are used at `slope` bytes per second; `+Inf` unless
/// the filesystem is filling.
pub fn time_to_full(available: u64, slope: f64) -> f64 {
    if slope > 0.0 {
        available as f64 / slope
    } else {
        f64::INFINITY
    }
}

/// Renders seconds as a rough human span: `~45s`, `~20min`, `~3h`, `~4d`.
pub fn format_approx_duration(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 90.0 {
        format!("~{:.0}s", s)
    } else if s < 90.0 * 60.0 {
        format!("~{:.0}min", s / 60.0)
    } else if s < 48.0 * 3600.0 {
        format!("~{:.0}h", s / 3600.0)
    } else {
        format!("~{:.0}d", s / 86400.0)
    }
}

// ---- Helpers shared with the `process` and `system` kinds ----------------------------

/// Renders a byte count with binary units: `512 B`, `88.0 MiB`, `1.2 GiB`.
pub(crate) fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// Remembers one blocking call that may never return (`statvfs` on a dead NFS mount, a
/// read of a pidfile that is a FIFO) so that it is not issued again while it is stuck.
///
/// The scheduler's timeout drops the future, but the thread on the blocking pool stays in
/// the kernel; the flag is cleared by that thread itself when the call finally returns.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    /// Shared with the closure on the blocking pool, which clears it on return (or panic).
    busy: Arc<AtomicBool>,
    /// Wall-clock start of the current call, for the message.
    since: Option<SystemTime>,
}

impl InFlight {
    /// Runs `f` on the blocking pool unless the previous call has not returned yet.
    ///
    /// # Errors
    /// [`CheckError::Stuck`] naming `what` while the previous call is still in the kernel;
    /// [`CheckError::Internal`] when the closure panicked.
    pub(crate) async fn run<T, F>(&mut self, what: &str, f: F) -> Result<T, CheckError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if self.busy.load(Ordering::Acquire) {
            let since = self.since.unwrap_or_else(SystemTime::now);
            let ago = SystemTime::now().duration_since(since).unwrap_or_default();
            return Err(CheckError::Stuck(format!(
                "{what} has not returned since {} ({}s ago); not re-issued",
                humantime::format_rfc3339_seconds(since),
                ago.as_secs()
            )));
        }
        self.busy.store(true, Ordering::Release);
        self.since = Some(SystemTime::now());
        let guard = ClearOnDrop(Arc::clone(&self.busy));
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            f()
        })
        .await
        .map_err(|e| CheckError::Internal(format!("{what}: {e}")))
    }

    /// Whether a call is still running (for tests and diagnostics).
    #[cfg(test)]
    pub(crate) fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }
}

/// Clears the in-flight flag when the blocking closure ends, including by unwinding.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_sandbox_read_only_bind_is_not_a_read_only_filesystem() {
        // "/" as systemd's ProtectSystem=strict leaves it: mounted ro, superblock rw; and
        // a filesystem that ext4 remounted read-only after an error.
        let mi = "\
26 1 8:1 / / ro,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
27 26 8:2 / /var/lib/postgresql rw,relatime shared:2 - ext4 /dev/sda2 ro,errors=remount-ro
28 26 0:23 / /proc rw,nosuid shared:3 - proc proc rw
";
        assert_eq!(super::mountinfo_super_readonly(mi, 8, 1), Some(false));
        assert_eq!(super::mountinfo_super_readonly(mi, 8, 2), Some(true));
        assert_eq!(super::mountinfo_super_readonly(mi, 8, 9), None);
        assert_eq!(super::mountinfo_super_readonly("garbage", 8, 1), None);
    }

    use super::*;

    fn policy() -> DiskPolicy {
        DiskPolicy {
            thresholds: Thresholds::higher(Some(0.8), Some(0.9)),
            expect_writable: true,
            full_within: Some(StdDuration::from_secs(6 * 3600)),
        }
    }

    fn stats(blocks: u64, bfree: u64, bavail: u64) -> DiskStats {
        DiskStats {
            frsize: 4096,
            blocks,
            bfree,
            bavail,
            files: 1000,
            ffree: 999,
            readonly: false,
        }
    }

    const NO_FILL: FillEstimate = FillEstimate {
        samples: 5,
        full_in_seconds: Some(f64::INFINITY),
    };

    #[test]
    fn usage_matches_df() {
        // A real ext4 root: df printed 1K-blocks 51290592, Used 20135812, Available 28516952, Use% 42%.
        let s = DiskStats {
            frsize: 4096,
            blocks: 12822648,
            bfree: 7788695,
            bavail: 7129238,
            files: 3276800,
            ffree: 3000000,
            readonly: false,
        };
        let u = compute_usage(&s);
        assert_eq!(u.size_bytes, 12822648 * 4096);
        assert_eq!(u.used_bytes, (12822648 - 7788695) * 4096);
        assert_eq!(u.free_bytes, 7129238 * 4096);
        assert_eq!((u.used_ratio * 100.0).ceil(), 42.0);
        assert!((u.inodes_used_ratio.unwrap() - 276800.0 / 3276800.0).abs() < 1e-12);
    }

    #[test]
    fn reserved_blocks_count_as_unavailable() {
        // 100 blocks, 10 free of which 5 are reserved for root: 90 used of 95 usable.
        let u = compute_usage(&stats(100, 10, 5));
        assert!((u.used_ratio - 90.0 / 95.0).abs() < 1e-12);
    }

    #[test]
    fn no_inodes_and_no_blocks_do_not_divide_by_zero() {
        let u = compute_usage(&DiskStats {
            files: 0,
            ffree: 0,
            ..stats(0, 0, 0)
        });
        assert_eq!(u.inodes_used_ratio, None);
        assert_eq!(u.used_ratio, 0.0);
        let u = compute_usage(&stats(10, 20, 20));
        assert_eq!(u.used_bytes, 0, "bfree > blocks must not wrap");
    }

    #[test]
    fn space_inodes_and_readonly_each_trip() {
        let p = policy();
        assert_eq!(
            classify_disk(&compute_usage(&stats(100, 50, 50)), &NO_FILL, &p),
            Status::Ok
        );
        assert_eq!(
            classify_disk(&compute_usage(&stats(100, 20, 20)), &NO_FILL, &p),
            Status::Warning
        );
        assert_eq!(
            classify_disk(&compute_usage(&stats(100, 10, 10)), &NO_FILL, &p),
            Status::Critical
        );
        let inodes = DiskStats {
            files: 100,
            ffree: 5,
            ..stats(100, 50, 50)
        };
        assert_eq!(
            classify_disk(&compute_usage(&inodes), &NO_FILL, &p),
            Status::Critical
        );
        let ro = DiskStats {
            readonly: true,
            ..stats(100, 50, 50)
        };
        assert_eq!(
            classify_disk(&compute_usage(&ro), &NO_FILL, &p),
            Status::Critical
        );
        let relaxed = DiskPolicy {
            expect_writable: false,
            ..p
        };
        assert_eq!(
            classify_disk(&compute_usage(&ro), &NO_FILL, &relaxed),
            Status::Ok
        );
    }

    #[test]
    fn time_to_full_trips_only_when_configured_and_with_enough_samples() {
        let u = compute_usage(&stats(100, 50, 50));
        let soon = FillEstimate {
            samples: 3,
            full_in_seconds: Some(3600.0),
        };
        assert_eq!(classify_disk(&u, &soon, &policy()), Status::Critical);
        let two = FillEstimate { samples: 2, ..soon };
        assert_eq!(classify_disk(&u, &two, &policy()), Status::Ok);
        let later = FillEstimate {
            samples: 10,
            full_in_seconds: Some(7.0 * 3600.0),
        };
        assert_eq!(classify_disk(&u, &later, &policy()), Status::Ok);
        let unset = DiskPolicy {
            full_within: None,
            ..policy()
        };
        assert_eq!(classify_disk(&u, &soon, &unset), Status::Ok);
    }

    #[test]
    fn least_squares_slope() {
        assert_eq!(fill_rate(&[]), None);
        assert_eq!(fill_rate(&[(0.0, 1.0)]), None);
        assert_eq!(fill_rate(&[(5.0, 1.0), (5.0, 9.0)]), None);
        let line: Vec<_> = (0..10)
            .map(|i| (f64::from(i) * 10.0, 1000.0 + f64::from(i) * 50.0))
            .collect();
        assert!((fill_rate(&line).unwrap() - 5.0).abs() < 1e-9);
        // Noise around a rising line still gives a positive slope near the truth.
        let noisy = [
            (0.0, 100.0),
            (10.0, 130.0),
            (20.0, 110.0),
            (30.0, 160.0),
            (40.0, 140.0),
        ];
        let s = fill_rate(&noisy).unwrap();
        assert!(s > 0.0 && s < 3.0, "{s}");
        assert_eq!(time_to_full(1000, 5.0), 200.0);
        assert_eq!(time_to_full(1000, 0.0), f64::INFINITY);
        assert_eq!(time_to_full(1000, -1.0), f64::INFINITY);
    }

    #[test]
    fn history_is_bounded_in_count_and_age_and_resets_on_resize() {
        let t0 = Instant::now();
        let mut h = History::default();
        let at = |used: u64| {
            compute_usage(&DiskStats {
                bfree: 1000 - used,
                bavail: 1000 - used,
                ..stats(1000, 0, 0)
            })
        };
        let first = h.observe(t0, &at(100));
        assert_eq!(
            first,
            FillEstimate {
                samples: 1,
                full_in_seconds: None
            }
        );
        for i in 1..100u64 {
            h.observe(t0 + StdDuration::from_secs(i * 10), &at(100 + i));
        }
        assert_eq!(h.samples.len(), HISTORY_MAX_SAMPLES);
        // One block (4 KiB) per 10s; 800 blocks left at the last sample.
        let e = h.observe(t0 + StdDuration::from_secs(1000), &at(200));
        assert!((e.full_in_seconds.unwrap() - 8000.0).abs() < 1.0, "{e:?}");
        // Seven hours later, everything before is too old.
        let e = h.observe(t0 + StdDuration::from_secs(1000 + 7 * 3600), &at(200));
        assert_eq!(e.samples, 1);
        h.observe(t0 + StdDuration::from_secs(1010 + 7 * 3600), &at(200));
        let grown = DiskStats {
            blocks: 2000,
            ..stats(2000, 1800, 1800)
        };
        let e = h.observe(
            t0 + StdDuration::from_secs(1020 + 7 * 3600),
            &compute_usage(&grown),
        );
        assert_eq!(e.samples, 1, "a resized filesystem starts a new history");
    }

    #[test]
    fn message_names_what_to_act_on() {
        let u = DiskUsage {
            size_bytes: 1 << 30,
            used_bytes: 979_000_000,
            free_bytes: 88 << 20,
            used_ratio: 0.912,
            inodes_used_ratio: Some(0.001),
            readonly: true,
        };
        let fill = FillEstimate {
            samples: 5,
            full_in_seconds: Some(7200.0),
        };
        assert_eq!(
            describe_disk(Path::new("/data"), &u, &fill, &policy()),
            "/data 91.2% used (88.0 MiB free of 1.0 GiB), inodes 0.1% used, read-only; full in ~2h"
        );
        let u = DiskUsage {
            inodes_used_ratio: None,
            readonly: false,
            ..u
        };
        assert_eq!(
            describe_disk(Path::new("/d"), &u, &NO_FILL, &policy()),
            "/d 91.2% used (88.0 MiB free of 1.0 GiB); not filling"
        );
    }

    #[test]
    fn human_formats() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(1 << 30), "1.0 GiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(format_approx_duration(30.0), "~30s");
        assert_eq!(format_approx_duration(1200.0), "~20min");
        assert_eq!(format_approx_duration(3.0 * 3600.0), "~3h");
        assert_eq!(format_approx_duration(5.0 * 86400.0), "~5d");
        assert_eq!(
            crate::checks::threshold::or_defaults(None, None, 0.8, 0.9),
            (Some(0.8), Some(0.9))
        );
        assert_eq!(
            crate::checks::threshold::or_defaults(Some(0.5), None, 0.8, 0.9),
            (Some(0.5), None)
        );
    }

    fn config(toml_text: &str) -> DiskConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn config_defaults_apply_only_when_both_thresholds_are_omitted() {
        let c = DiskCheck::from_config(&config("path = \"/\""), &Default::default());
        assert_eq!(
            c.policy.thresholds,
            Thresholds::higher(Some(0.8), Some(0.9))
        );
        assert!(c.policy.expect_writable);
        assert_eq!(c.policy.full_within, None);
        let c = DiskCheck::from_config(
            &config("path = \"/\"\ncrit = \"95%\"\nexpect_writable = false\nfull_within = \"6h\""),
            &Default::default(),
        );
        assert_eq!(c.policy.thresholds, Thresholds::higher(None, Some(0.95)));
        assert!(!c.policy.expect_writable);
        assert_eq!(c.policy.full_within, Some(StdDuration::from_secs(6 * 3600)));
    }

    #[tokio::test]
    async fn measures_a_real_filesystem() {
        let mut c = DiskCheck::from_config(
            &config(&format!("path = {:?}", env!("CARGO_MANIFEST_DIR"))),
            &Default::default(),
        );
        let cx = CheckContext::host();
        let o = c.run(&cx).await.unwrap();
        let v = o.value.unwrap();
        assert!((0.0..=1.0).contains(&v), "{v}");
        let names: Vec<_> = o.metrics.iter().map(|m| m.name).collect();
        for n in [
            "vigil_disk_used_ratio",
            "vigil_disk_free_bytes",
            "vigil_disk_size_bytes",
            "vigil_disk_readonly",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        assert!(
            !names.contains(&"vigil_disk_full_in_seconds"),
            "one sample cannot predict"
        );
        assert!(
            o.metrics
                .iter()
                .all(|m| m.labels == vec![("mountpoint", env!("CARGO_MANIFEST_DIR").to_string())])
        );
        let o = c.run(&cx).await.unwrap();
        assert!(
            o.metrics
                .iter()
                .any(|m| m.name == "vigil_disk_full_in_seconds")
        );
    }

    #[tokio::test]
    async fn a_missing_path_is_an_error_naming_it() {
        let mut c = DiskCheck::from_config(
            &config("path = \"/nonexistent/vigil-test\""),
            &Default::default(),
        );
        let e = c.run(&CheckContext::host()).await.unwrap_err();
        assert!(matches!(e, CheckError::Io { .. }), "{e:?}");
        assert!(
            e.to_string().contains("statvfs(/nonexistent/vigil-test)"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_call_that_has_not_returned_is_not_reissued() {
        let mut f = InFlight::default();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        // Stands in for a statvfs on a dead NFS server: the scheduler's timeout drops the
        // future, the thread stays blocked.
        let hung = tokio::time::timeout(
            StdDuration::from_millis(50),
            f.run("statvfs(/nfs)", move || wait.recv()),
        )
        .await;
        assert!(hung.is_err());
        let e = f.run("statvfs(/nfs)", || ()).await.unwrap_err();
        assert!(
            matches!(e, CheckError::Stuck(ref m) if m.starts_with("statvfs(/nfs) has not returned since")),
            "{e}"
        );
        release.send(()).unwrap();
        let deadline = std::time::Instant::now() + StdDuration::from_secs(10);
        while f.is_busy() {
            assert!(
                std::time::Instant::now() < deadline,
                "the blocked call never cleared its flag"
            );
            tokio::time::sleep(StdDuration::from_millis(5)).await;
        }
        assert_eq!(f.run("statvfs(/nfs)", || 7).await.unwrap(), 7);
    }
}
