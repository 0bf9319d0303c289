//! Check kinds: one small trait, one file per kind, and a static registry.
//!
//! The framework (the scheduler) owns timing, timeouts, failure counting, hysteresis and
//! publication; a kind only measures. `Err(CheckError)` means "could not measure" and
//! becomes `unknown`; a bad measurement is an `Ok(Observation)` with a bad status.
//!
//! # Adding a check kind
//! 1. Add `checks/<kind>.rs` with `<Kind>Config` (declared through [`check_config!`]),
//!    `<Kind>Check` (`from_config`, `impl Check`), its pure `parse_*`/`classify_*`
//!    functions and their tests.
//! 2. Add the variant to [`AnyCheck`], the map to [`ChecksConfig`] and the entry to [`KINDS`].
//! 3. Add an example to `config/vigil.toml`; the example-config test fails until you do.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::config::types::{Duration, ThresholdValue};

pub mod backup;
pub mod command;
pub mod disk;
pub mod kernel;
pub mod perfdata;
pub mod postgres;
pub mod process;
pub mod program;
pub mod system;
pub mod threshold;
pub mod tls_certificate;

pub use threshold::{Direction, Thresholds};

/// The status of one sample. Serialized in lowercase, as the contract names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Measured and within thresholds.
    Ok,
    /// Measured at or beyond `warn`.
    Warning,
    /// Measured at or beyond `crit`, or a secondary measure that trips by itself.
    Critical,
    /// Could not be measured.
    Unknown,
}

impl Status {
    /// The Nagios plugin exit code: 0 ok, 1 warning, 2 critical, 3 unknown.
    pub fn nagios_code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Warning => 1,
            Status::Critical => 2,
            Status::Unknown => 3,
        }
    }

    /// Rank for "the worst status in a streak". Critical ranks above unknown: a check that
    /// measured a critical value and then failed to measure must not look better than it was.
    pub fn severity(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Warning => 1,
            Status::Unknown => 2,
            Status::Critical => 3,
        }
    }

    /// The worse of two statuses by [`Status::severity`].
    pub fn worse(self, other: Status) -> Status {
        if other.severity() > self.severity() {
            other
        } else {
            self
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warning => "warning",
            Status::Critical => "critical",
            Status::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The unit of a kind's primary value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Bytes.
    Bytes,
    /// Seconds.
    Seconds,
    /// A ratio between 0 and 1.
    Ratio,
    /// A count of things.
    Count,
    /// Load average divided by the number of CPUs.
    Load,
    /// 0 or 1.
    Boolean,
    /// A Nagios status code a plugin exited with: 0 ok, 1 warning, 2 critical, 3 unknown.
    Status,
}

impl Unit {
    /// The name used in `/checks` and the `unit` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Bytes => "bytes",
            Unit::Seconds => "seconds",
            Unit::Ratio => "ratio",
            Unit::Count => "count",
            Unit::Load => "load",
            Unit::Boolean => "boolean",
            Unit::Status => "status",
        }
    }
}

/// Prometheus metric type of a [`Metric`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// A value that goes up and down.
    Gauge,
    /// A value that only goes up (events).
    Counter,
}

/// One check-specific metric. The framework adds the `check` label.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// Full metric name, `vigil_<area>_<name>_<unit>`.
    pub name: &'static str,
    /// One-line help text.
    pub help: &'static str,
    /// Gauge or counter.
    pub kind: MetricKind,
    /// Extra labels (bounded values only, never error strings).
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: f64,
}

impl Metric {
    /// A gauge without extra labels.
    pub fn gauge(name: &'static str, help: &'static str, value: f64) -> Self {
        Metric {
            name,
            help,
            kind: MetricKind::Gauge,
            labels: Vec::new(),
            value,
        }
    }

    /// A counter without extra labels.
    pub fn counter(name: &'static str, help: &'static str, value: f64) -> Self {
        Metric {
            name,
            help,
            kind: MetricKind::Counter,
            labels: Vec::new(),
            value,
        }
    }

    /// Adds a label.
    pub fn label(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.labels.push((key, value.into()));
        self
    }
}

/// What one successful measurement found.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// The status, including secondary measures that trip by themselves.
    pub status: Status,
    /// The primary value in the kind's unit; `None` only when there is nothing to measure.
    pub value: Option<f64>,
    /// One line a person can act on.
    pub message: String,
    /// Check-specific metrics.
    pub metrics: Vec<Metric>,
    /// Set by `postgres.replication`: what the routing endpoints decide on.
    pub replication: Option<ReplicationFacts>,
}

/// A server's role, from `pg_is_in_recovery()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Accepts writes.
    Primary,
    /// In recovery (a streaming or archive-replaying standby).
    Standby,
}

/// What the routing endpoints (`/primary`, `/replica?lag=`) need from a
/// `postgres.replication` sample that measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicationFacts {
    /// The server's role.
    pub role: Role,
    /// Standby: its WAL receiver is streaming. Primary: always true.
    pub streaming: bool,
    /// Standby: bytes between the newest primary position it knows and its replay
    /// position. `None` on a primary, or when not measurable.
    pub lag_bytes: Option<f64>,
    /// Standby: seconds of replay lag (0 while streaming and caught up). `None` on a
    /// primary, or when not measurable.
    pub lag_seconds: Option<f64>,
}

/// Why a check could not measure. Every variant becomes status `unknown`.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A system call or file read failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Data was read but could not be understood.
    #[error("{0}")]
    Parse(String),
    /// An external tool ran but failed, or said something that is not an answer.
    #[error("{0}")]
    Tool(String),
    /// A previous call is still blocked in the kernel and is not re-issued.
    #[error("{0}")]
    Stuck(String),
    /// The run exceeded the check's timeout (set by the scheduler).
    #[error("timed out after {0:?}")]
    Timeout(StdDuration),
    /// A blocking task failed to complete.
    #[error("internal error: {0}")]
    Internal(String),
    /// A PostgreSQL connection or query failed (no secret in the message).
    #[error(transparent)]
    Pg(#[from] crate::pg::PgError),
}

impl CheckError {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CheckError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Where checks find the host (`/proc` and `/sys` can be pointed at a fixture tree) and
/// the resources they share.
#[derive(Debug, Clone)]
pub struct CheckContext {
    /// Root of the proc filesystem (`/proc`).
    pub proc_root: PathBuf,
    /// Root of the sys filesystem (`/sys`).
    pub sys_root: PathBuf,
    /// PostgreSQL sessions, one per distinct DSN, shared by the `postgres.*` checks. Lives
    /// as long as the context (the agent's lifetime, across reloads); a DSN's session
    /// closes when the last check using it is dropped.
    pub pg: Arc<crate::pg::Connections>,
}

impl CheckContext {
    /// The running host.
    pub fn host() -> Self {
        CheckContext {
            proc_root: PathBuf::from("/proc"),
            sys_root: PathBuf::from("/sys"),
            pg: Arc::new(crate::pg::Connections::new()),
        }
    }
}

/// One check kind's measurement.
pub trait Check: Send {
    /// Measure once. `Err` means "could not measure"; a bad value is an `Ok` with a bad
    /// status. `&mut self` lets a kind keep state between runs (history, stuck calls).
    fn run(
        &mut self,
        cx: &CheckContext,
    ) -> impl Future<Output = Result<Observation, CheckError>> + Send;
}

/// Settings every kind accepts, resolved against the agent's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Common {
    /// How often the check runs.
    pub interval: StdDuration,
    /// How long one run may take before it is `unknown`.
    pub timeout: StdDuration,
    /// Consecutive non-ok samples before the check trips.
    pub trip_after: u32,
    /// Consecutive ok samples before it clears.
    pub clear_after: u32,
    /// The remediation to queue when the check trips.
    pub remediation: Option<String>,
    /// Whether the check runs.
    pub enabled: bool,
    /// An unknown essential check makes the host `uncertain`.
    pub essential: bool,
}

impl Default for Common {
    /// A check built outside a config: the agent's default interval and timeout.
    fn default() -> Self {
        resolve_common(
            None,
            None,
            None,
            None,
            &None,
            None,
            None,
            Duration::from_secs(10),
        )
    }
}

/// The longest default timeout; an explicit `timeout` may be longer (up to the interval).
const DEFAULT_MAX_TIMEOUT: StdDuration = StdDuration::from_secs(10);

/// Implemented by every kind's config struct (through [`check_config!`]).
pub trait KindConfig {
    /// The threshold type in the kind's unit.
    type Threshold: ThresholdValue;
    /// The common keys, resolved against `default_interval`.
    fn common(&self, default_interval: Duration) -> Common;
    /// `warn` and `crit` as written (`None` when omitted).
    fn raw_thresholds(&self) -> (Option<Self::Threshold>, Option<Self::Threshold>);
    /// `trip_after` and `clear_after` as written.
    fn raw_hysteresis(&self) -> (Option<u32>, Option<u32>);

    /// `warn` and `crit` in the kind's base unit, or the kind's defaults when both are
    /// omitted (when only one is given, the other stays unset and never trips).
    fn thresholds_or(&self, default_warn: f64, default_crit: f64) -> (Option<f64>, Option<f64>) {
        let (w, c) = self.raw_thresholds();
        threshold::or_defaults(
            w.map(ThresholdValue::base),
            c.map(ThresholdValue::base),
            default_warn,
            default_crit,
        )
    }
}

/// Resolves the common keys; shared by every kind's generated `common()`.
#[allow(clippy::too_many_arguments)]
pub fn resolve_common(
    interval: Option<Duration>,
    timeout: Option<Duration>,
    trip_after: Option<u32>,
    clear_after: Option<u32>,
    remediation: &Option<String>,
    enabled: Option<bool>,
    essential: Option<bool>,
    default_interval: Duration,
) -> Common {
    let interval = interval.unwrap_or(default_interval).get();
    Common {
        interval,
        timeout: timeout
            .map(Duration::get)
            .unwrap_or_else(|| interval.min(DEFAULT_MAX_TIMEOUT)),
        trip_after: trip_after.unwrap_or(1).max(1),
        clear_after: clear_after.unwrap_or(1).max(1),
        remediation: remediation.clone(),
        enabled: enabled.unwrap_or(true),
        essential: essential.unwrap_or(false),
    }
}

/// Declares a kind's config struct with the keys every kind accepts (`warn`, `crit`,
/// `interval`, `timeout`, `trip_after`, `clear_after`, `remediation`, `enabled`,
/// `essential`) followed by the kind's own fields.
///
/// The common keys are written into each struct rather than shared through
/// `#[serde(flatten)]`, because flatten loses the line and column of errors (toml-rs #535).
#[macro_export]
macro_rules! check_config {
    (
        $(#[$meta:meta])*
        pub struct $name:ident : $threshold:ty {
            $( $(#[$fmeta:meta])* pub $field:ident : $fty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// Warning threshold in the kind's unit.
            #[serde(default)]
            pub warn: Option<$threshold>,
            /// Critical threshold in the kind's unit.
            #[serde(default)]
            pub crit: Option<$threshold>,
            /// How often the check runs (default: `[agent].interval`).
            #[serde(default)]
            pub interval: Option<$crate::config::types::Duration>,
            /// How long one run may take (default: the interval, at most 10s).
            #[serde(default)]
            pub timeout: Option<$crate::config::types::Duration>,
            /// Consecutive non-ok samples before the check trips (default 1).
            #[serde(default)]
            pub trip_after: Option<u32>,
            /// Consecutive ok samples before it clears (default 1).
            #[serde(default)]
            pub clear_after: Option<u32>,
            /// The remediation queued when the check trips.
            #[serde(default)]
            pub remediation: Option<String>,
            /// `false` keeps the check in the file, switched off.
            #[serde(default)]
            pub enabled: Option<bool>,
            /// An unknown essential check makes the host `uncertain`.
            #[serde(default)]
            pub essential: Option<bool>,
            $( $(#[$fmeta])* pub $field : $fty, )*
        }

        impl $crate::checks::KindConfig for $name {
            type Threshold = $threshold;
            fn common(&self, default_interval: $crate::config::types::Duration) -> $crate::checks::Common {
                $crate::checks::resolve_common(
                    self.interval,
                    self.timeout,
                    self.trip_after,
                    self.clear_after,
                    &self.remediation,
                    self.enabled,
                    self.essential,
                    default_interval,
                )
            }
            fn raw_thresholds(&self) -> (Option<$threshold>, Option<$threshold>) {
                (self.warn, self.crit)
            }
            fn raw_hysteresis(&self) -> (Option<u32>, Option<u32>) {
                (self.trip_after, self.clear_after)
            }
        }
    };
}

/// Static facts about a kind (ripgrep's `FLAGS` table).
#[derive(Debug, Clone, Copy)]
pub struct KindInfo {
    /// The kind's name, as in `[check.<name>.NAME]`.
    pub name: &'static str,
    /// One line about what it measures.
    pub summary: &'static str,
    /// The unit of the primary value.
    pub unit: Unit,
    /// Which way is worse for `warn`/`crit`.
    pub direction: Direction,
    /// The kind's least default interval (the agent's interval when that is longer):
    /// tools that read a backup repository run every few minutes, not every 10 seconds.
    pub default_interval: Option<StdDuration>,
    /// The kind's default timeout (at most the interval) when `timeout` is not set.
    pub default_timeout: Option<StdDuration>,
}

/// Every kind this build knows, in the order of the contract's table.
pub const KINDS: &[KindInfo] = &[
    KindInfo {
        name: "disk",
        summary: "used ratio of a filesystem; inodes, read-only mount, predicted time to full",
        unit: Unit::Ratio,
        direction: Direction::HigherIsWorse,
        default_interval: None,
        default_timeout: None,
    },
    KindInfo {
        name: "process",
        summary: "count of matching processes against min/max; restarts, RSS, open fds",
        unit: Unit::Count,
        direction: Direction::HigherIsWorse,
        default_interval: None,
        default_timeout: None,
    },
    KindInfo {
        name: "system",
        summary: "load per core; memory available, pressure stall, OOM kills",
        unit: Unit::Load,
        direction: Direction::HigherIsWorse,
        default_interval: None,
        default_timeout: None,
    },
    KindInfo {
        name: "postgres.up",
        summary: "connect + SELECT round-trip time; role",
        unit: Unit::Seconds,
        direction: Direction::HigherIsWorse,
        default_interval: None,
        default_timeout: None,
    },
    KindInfo {
        name: "postgres.replication",
        summary: "role-aware replication lag (bytes; seconds via warn_time/crit_time); standbys connected",
        unit: Unit::Bytes,
        direction: Direction::HigherIsWorse,
        default_interval: None,
        default_timeout: None,
    },
    KindInfo {
        name: "postgres.slots",
        summary: "largest WAL retained by a replication slot; inactive slots named",
        unit: Unit::Bytes,
        direction: Direction::HigherIsWorse,
        default_interval: None,
        default_timeout: None,
    },
    KindInfo {
        name: "postgres.archiving",
        summary: "seconds since the last successful WAL archive while segments wait; failures",
        unit: Unit::Seconds,
        direction: Direction::HigherIsWorse,
        default_interval: None,
        default_timeout: None,
    },
    KindInfo {
        name: "postgres.connections",
        summary: "used ratio of max_connections",
        unit: Unit::Ratio,
        direction: Direction::HigherIsWorse,
        default_interval: None,
        default_timeout: None,
    },
    KindInfo {
        name: "postgres.wraparound",
        summary: "max age(datfrozenxid) (and multixact age) as a ratio of 2^31",
        unit: Unit::Ratio,
        direction: Direction::HigherIsWorse,
        default_interval: None,
        default_timeout: None,
    },
    KindInfo {
        name: "postgres.long_transactions",
        summary: "age in seconds of the oldest open transaction",
        unit: Unit::Seconds,
        direction: Direction::HigherIsWorse,
        default_interval: None,
        default_timeout: None,
    },
    KindInfo {
        name: "backup.pgbackrest",
        summary: "seconds since the newest successful pgBackRest backup ended",
        unit: Unit::Seconds,
        direction: Direction::HigherIsWorse,
        default_interval: Some(StdDuration::from_secs(300)),
        default_timeout: Some(StdDuration::from_secs(120)),
    },
    KindInfo {
        name: "backup.walg",
        summary: "seconds since the newest WAL-G backup finished",
        unit: Unit::Seconds,
        direction: Direction::HigherIsWorse,
        default_interval: Some(StdDuration::from_secs(300)),
        default_timeout: Some(StdDuration::from_secs(120)),
    },
    KindInfo {
        name: "backup.barman",
        summary: "seconds since the newest DONE Barman backup ended",
        unit: Unit::Seconds,
        direction: Direction::HigherIsWorse,
        default_interval: Some(StdDuration::from_secs(300)),
        default_timeout: Some(StdDuration::from_secs(120)),
    },
    KindInfo {
        name: "backup.files",
        summary: "seconds since the newest file matching a glob was modified; its size",
        unit: Unit::Seconds,
        direction: Direction::HigherIsWorse,
        default_interval: Some(StdDuration::from_secs(60)),
        default_timeout: None,
    },
    KindInfo {
        name: "command",
        summary: "a Nagios-convention plugin: exit code is the status, perfdata become metrics",
        unit: Unit::Status,
        // Unused: the plugin decides the status, and `warn`/`crit` are refused.
        direction: Direction::HigherIsWorse,
        // Plugins are written for Nagios's minutes-long cadence, and many start an
        // interpreter (check_postgres is Perl): every 10 seconds would cost real CPU.
        default_interval: Some(StdDuration::from_secs(60)),
        default_timeout: None,
    },
    KindInfo {
        name: "tls.certificate",
        summary: "seconds until a PEM file's certificate (or the earliest of its chain) expires",
        unit: Unit::Seconds,
        direction: Direction::LowerIsWorse,
        // Time left changes by the minute, not the second.
        default_interval: Some(StdDuration::from_secs(60)),
        default_timeout: None,
    },
    KindInfo {
        name: "kernel",
        summary: "running kernel release against deny globs and min_release; 1 when denied",
        unit: Unit::Boolean,
        // Unused: the rules decide, and `warn`/`crit` are refused.
        direction: Direction::HigherIsWorse,
        // The release changes only with a reboot; the rules only with a reload.
        default_interval: Some(StdDuration::from_secs(60)),
        default_timeout: None,
    },
];

/// Looks a kind up by name.
pub fn kind_info(name: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| k.name == name)
}

/// The `[check]` table: one map per kind, from check name to its config, in file order.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksConfig {
    /// Check names in the order the file lists them, across kinds (set by the loader).
    #[serde(skip)]
    pub order: Vec<String>,
    /// `[check.disk.NAME]`
    #[serde(default)]
    pub disk: IndexMap<String, disk::DiskConfig>,
    /// `[check.process.NAME]`
    #[serde(default)]
    pub process: IndexMap<String, process::ProcessConfig>,
    /// `[check.system.NAME]`
    #[serde(default)]
    pub system: IndexMap<String, system::SystemConfig>,
    /// `[check.backup.KIND.NAME]`
    #[serde(default)]
    pub backup: BackupChecks,
    /// `[check.postgres.KIND.NAME]`
    #[serde(default)]
    pub postgres: PostgresChecks,
    /// `[check.command.NAME]`
    #[serde(default)]
    pub command: IndexMap<String, command::CommandConfig>,
    /// `[check.tls.KIND.NAME]`
    #[serde(default)]
    pub tls: TlsChecks,
    /// `[check.kernel.NAME]`
    #[serde(default)]
    pub kernel: IndexMap<String, kernel::KernelConfig>,
}

/// The `[check.tls]` table: `[check.tls.certificate.NAME]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsChecks {
    /// `[check.tls.certificate.NAME]`
    #[serde(default)]
    pub certificate: IndexMap<String, tls_certificate::TlsCertificateConfig>,
}

/// The `[check.backup]` table: one map per `backup.*` kind.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupChecks {
    /// `[check.backup.pgbackrest.NAME]`
    #[serde(default)]
    pub pgbackrest: IndexMap<String, backup::pgbackrest::PgbackrestConfig>,
    /// `[check.backup.walg.NAME]`
    #[serde(default)]
    pub walg: IndexMap<String, backup::walg::WalgConfig>,
    /// `[check.backup.barman.NAME]`
    #[serde(default)]
    pub barman: IndexMap<String, backup::barman::BarmanConfig>,
    /// `[check.backup.files.NAME]`
    #[serde(default)]
    pub files: IndexMap<String, backup::files::FilesConfig>,
}

/// The `[check.postgres]` table: one map per `postgres.*` kind.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresChecks {
    /// `[check.postgres.up.NAME]`
    #[serde(default)]
    pub up: IndexMap<String, postgres::up::UpConfig>,
    /// `[check.postgres.replication.NAME]`
    #[serde(default)]
    pub replication: IndexMap<String, postgres::replication::ReplicationConfig>,
    /// `[check.postgres.slots.NAME]`
    #[serde(default)]
    pub slots: IndexMap<String, postgres::slots::SlotsConfig>,
    /// `[check.postgres.archiving.NAME]`
    #[serde(default)]
    pub archiving: IndexMap<String, postgres::archiving::ArchivingConfig>,
    /// `[check.postgres.connections.NAME]`
    #[serde(default)]
    pub connections: IndexMap<String, postgres::connections::ConnectionsConfig>,
    /// `[check.postgres.wraparound.NAME]`
    #[serde(default)]
    pub wraparound: IndexMap<String, postgres::wraparound::WraparoundConfig>,
    /// `[check.postgres.long_transactions.NAME]`
    #[serde(default)]
    pub long_transactions: IndexMap<String, postgres::long_transactions::LongTransactionsConfig>,
}

/// Generates the registry from one table: [`CheckSpec`] (a configured check borrowed from
/// the config), [`AnyCheck`] (a runnable check) and [`ChecksConfig::iter`], each an
/// exhaustive `match` over the kinds, so that adding a kind is one line here.
///
/// Each row: `Variant => "kind.name", ConfigType, CheckType, config.field.path` and, for
/// kinds that connect to PostgreSQL, `dsn` (the config's `dsn` field).
macro_rules! registry {
    ( $( $variant:ident => $name:literal, $cfg:ty, $check:ty, $($field:ident).+ $(, $dsn:ident)? ; )* ) => {
        /// One configured check of any kind, borrowed from the config.
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub enum CheckSpec<'a> {
            $(
                #[doc = concat!("A `", $name, "` check.")]
                $variant(&'a $cfg),
            )*
        }

        impl CheckSpec<'_> {
            /// The kind's name.
            pub fn kind(&self) -> &'static str {
                match self { $( CheckSpec::$variant(_) => $name, )* }
            }

            /// The common keys, resolved against the agent's interval and the kind's own
            /// defaults ([`KindInfo::default_interval`], [`KindInfo::default_timeout`]).
            pub fn common(&self, default_interval: Duration) -> Common {
                let info = kind_info(self.kind());
                let interval = match info.and_then(|k| k.default_interval) {
                    Some(i) => Duration(i.max(default_interval.get())),
                    None => default_interval,
                };
                let (mut common, timeout_set) = match self {
                    $( CheckSpec::$variant(c) => (c.common(interval), c.timeout.is_some()), )*
                };
                if let (false, Some(t)) = (timeout_set, info.and_then(|k| k.default_timeout)) {
                    common.timeout = t.min(common.interval);
                }
                common
            }

            /// `warn` and `crit` in the kind's base unit, as written.
            pub fn raw_thresholds(&self) -> (Option<f64>, Option<f64>) {
                fn base<T: ThresholdValue>((w, c): (Option<T>, Option<T>)) -> (Option<f64>, Option<f64>) {
                    (w.map(T::base), c.map(T::base))
                }
                match self { $( CheckSpec::$variant(c) => base(c.raw_thresholds()), )* }
            }

            /// `trip_after` and `clear_after` as written.
            pub fn raw_hysteresis(&self) -> (Option<u32>, Option<u32>) {
                match self { $( CheckSpec::$variant(c) => c.raw_hysteresis(), )* }
            }

            /// Kind-specific problems as `(key, message)`; host-dependent facts only when
            /// `enabled`.
            pub fn validate(&self, enabled: bool) -> Vec<(&'static str, String)> {
                match self { $( CheckSpec::$variant(c) => c.validate(enabled), )* }
            }

            /// The PostgreSQL DSN of a `postgres.*` check.
            pub fn dsn(&self) -> Option<&crate::pg::Dsn> {
                match self { $( CheckSpec::$variant(_c) => registry!(@dsn _c $($dsn)?), )* }
            }

            /// Builds the runnable check.
            pub fn build(&self, common: &Common) -> AnyCheck {
                match self { $( CheckSpec::$variant(c) => AnyCheck::$variant(<$check>::from_config(c, common)), )* }
            }
        }

        /// A runnable check of any kind (the registry's enum; mini-redis's `Command`).
        pub enum AnyCheck {
            $(
                #[doc = concat!("A `", $name, "` check.")]
                $variant($check),
            )*
        }

        impl AnyCheck {
            /// The kind's name.
            pub fn kind(&self) -> &'static str {
                match self { $( AnyCheck::$variant(_) => $name, )* }
            }

            /// Measures once.
            pub async fn run(&mut self, cx: &CheckContext) -> Result<Observation, CheckError> {
                match self { $( AnyCheck::$variant(c) => c.run(cx).await, )* }
            }
        }

        impl ChecksConfig {
            /// Every configured check as `(name, spec)`, in the order of the file.
            pub fn iter(&self) -> impl Iterator<Item = (&str, CheckSpec<'_>)> {
                let mut all: Vec<(&str, CheckSpec<'_>)> = Vec::new();
                $( all.extend(self.$($field).+.iter().map(|(n, c)| (n.as_str(), CheckSpec::$variant(c)))); )*
                // Names are unique across kinds in a valid config; a name missing from
                // `order` (a config built in code) keeps its place after the ordered ones.
                all.sort_by_key(|(n, _)| self.order.iter().position(|o| o == n).unwrap_or(usize::MAX));
                all.into_iter()
            }
        }
    };
    (@dsn $c:ident dsn) => { Some(&$c.dsn) };
    (@dsn $c:ident) => { None };
}

registry! {
    Disk => "disk", disk::DiskConfig, disk::DiskCheck, disk;
    Process => "process", process::ProcessConfig, process::ProcessCheck, process;
    System => "system", system::SystemConfig, system::SystemCheck, system;
    PgUp => "postgres.up", postgres::up::UpConfig, postgres::up::UpCheck, postgres.up, dsn;
    PgReplication => "postgres.replication", postgres::replication::ReplicationConfig,
        postgres::replication::ReplicationCheck, postgres.replication, dsn;
    PgSlots => "postgres.slots", postgres::slots::SlotsConfig, postgres::slots::SlotsCheck,
        postgres.slots, dsn;
    PgArchiving => "postgres.archiving", postgres::archiving::ArchivingConfig,
        postgres::archiving::ArchivingCheck, postgres.archiving, dsn;
    PgConnections => "postgres.connections", postgres::connections::ConnectionsConfig,
        postgres::connections::ConnectionsCheck, postgres.connections, dsn;
    PgWraparound => "postgres.wraparound", postgres::wraparound::WraparoundConfig,
        postgres::wraparound::WraparoundCheck, postgres.wraparound, dsn;
    PgLongTransactions => "postgres.long_transactions",
        postgres::long_transactions::LongTransactionsConfig,
        postgres::long_transactions::LongTransactionsCheck, postgres.long_transactions, dsn;
    BackupPgbackrest => "backup.pgbackrest", backup::pgbackrest::PgbackrestConfig,
        backup::pgbackrest::PgbackrestCheck, backup.pgbackrest;
    BackupWalg => "backup.walg", backup::walg::WalgConfig, backup::walg::WalgCheck, backup.walg;
    BackupBarman => "backup.barman", backup::barman::BarmanConfig, backup::barman::BarmanCheck,
        backup.barman;
    BackupFiles => "backup.files", backup::files::FilesConfig, backup::files::FilesCheck,
        backup.files;
    Command => "command", command::CommandConfig, command::CommandCheck, command;
    TlsCertificate => "tls.certificate", tls_certificate::TlsCertificateConfig,
        tls_certificate::TlsCertificateCheck, tls.certificate;
    Kernel => "kernel", kernel::KernelConfig, kernel::KernelCheck, kernel;
}

impl AnyCheck {
    /// The program a program-running kind (`command`, `backup.pgbackrest`, `backup.walg`,
    /// `backup.barman`) runs, built but not run: what the privileged `vigil runner` runs
    /// for the agent from its own config. `None` for the kinds that run no program.
    pub fn program_request(&self) -> Option<crate::runner::Request> {
        match self {
            AnyCheck::Command(c) => Some(c.request()),
            AnyCheck::BackupPgbackrest(c) => Some(c.request()),
            AnyCheck::BackupWalg(c) => Some(c.request()),
            AnyCheck::BackupBarman(c) => Some(c.request()),
            _ => None,
        }
    }

    /// Makes a program-running check send a program it cannot run as its `run_as` to the
    /// privileged runner at `socket`, as check `name`; other kinds are left alone.
    pub fn via_runner(&mut self, socket: &std::path::Path, name: &str) {
        let runner = crate::runner::Runner::in_process().via(crate::runner::Remote {
            socket: socket.to_path_buf(),
            op: crate::runner_service::Op::Check,
            name: name.to_string(),
        });
        match self {
            AnyCheck::Command(c) => c.runner = runner,
            AnyCheck::BackupPgbackrest(c) => c.runner = runner,
            AnyCheck::BackupWalg(c) => c.runner = runner,
            AnyCheck::BackupBarman(c) => c.runner = runner,
            _ => {}
        }
    }
}

impl CheckSpec<'_> {
    /// The `run_as` of a program-running kind.
    pub fn run_as(&self) -> Option<&str> {
        match self {
            CheckSpec::Command(c) => c.run_as.as_deref(),
            CheckSpec::BackupPgbackrest(c) => c.run_as.as_deref(),
            CheckSpec::BackupWalg(c) => c.run_as.as_deref(),
            CheckSpec::BackupBarman(c) => c.run_as.as_deref(),
            _ => None,
        }
    }

    /// Checks with the same key are scheduled together (the postgres kinds: their DSN).
    pub fn schedule_group(&self) -> Option<String> {
        self.dsn().map(|d| format!("{d:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_unique_and_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for k in KINDS {
            assert!(seen.insert(k.name), "duplicate kind {}", k.name);
            assert!(k.name.len() <= 32);
            assert!(
                k.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_')
            );
        }
    }

    #[test]
    fn every_kind_parses_from_a_minimal_table_and_agrees_with_the_registry() {
        let minimal = |kind: &str| match kind {
            "disk" => "path = \"/\"",
            "process" => "name = \"init\"",
            "backup.pgbackrest" => "stanza = \"main\"",
            "backup.barman" => "server = \"main\"",
            "backup.files" => "glob = \"/x/*\"",
            "command" => "command = [\"/bin/true\"]",
            "tls.certificate" => "path = \"/etc/ssl/certs/x.pem\"",
            k if k.starts_with("postgres.") => "dsn = \"host=/var/run/postgresql user=vigil\"",
            _ => "",
        };
        for k in KINDS {
            let doc = format!("[{}.x]\n{}\n", k.name, minimal(k.name));
            let cfg: ChecksConfig =
                toml::from_str(&doc).unwrap_or_else(|e| panic!("{}: {e}", k.name));
            let specs: Vec<_> = cfg.iter().collect();
            assert_eq!(specs.len(), 1, "{}", k.name);
            assert_eq!(specs[0].1.kind(), k.name);
            assert_eq!(
                specs[0]
                    .1
                    .build(&specs[0].1.common(Duration::from_secs(10)))
                    .kind(),
                k.name
            );
        }
    }

    #[test]
    fn severity_ranks_critical_above_unknown() {
        assert_eq!(Status::Unknown.worse(Status::Critical), Status::Critical);
        assert_eq!(Status::Ok.worse(Status::Warning), Status::Warning);
        assert_eq!(Status::Unknown.nagios_code(), 3);
    }

    #[test]
    fn every_kind_has_an_example_in_the_shipped_config() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/vigil.toml");
        let doc = std::fs::read_to_string(&path).unwrap();
        let cfg = crate::config::parse(&path, &doc).unwrap();
        for k in KINDS {
            assert!(
                cfg.check.iter().any(|(_, s)| s.kind() == k.name),
                "config/vigil.toml has no [check.{}.…] example",
                k.name
            );
        }
    }
}
