//! The agent's configuration: TOML deserialized into typed values, then validated.
//!
//! Validation happens in layers, each as close to the parser as possible:
//! 1. syntax and types: the toml crate, with the value's span;
//! 2. single values: the newtypes of [`types`] validate while deserializing;
//! 3. relations between keys (names, threshold order, references): [`Config::validate`],
//!    which collects every problem at once;
//! 4. host-dependent facts (a disk check's path exists; a remediation's script is inside
//!    `[automation].dir`, safe and unchanged, its `run_as` reachable) for enabled checks
//!    and remediations only.
//!
//! Every struct denies unknown keys, so a typo is an error, never silently ignored.
//! Relative paths are resolved against the config file's directory.

pub mod error;
pub mod types;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use ipnet::IpNet;
use serde::Deserialize;

pub use error::{ConfigError, Problem};
use types::{ByteSize, Duration};

use crate::checks::{self, ChecksConfig, Thresholds};
use crate::lifecycle::Lifecycle;
use crate::runner::Runner;

/// Where the config is read from when no `-c` is given and `$VIGIL_CONFIG` is unset.
pub const DEFAULT_PATH: &str = "/etc/vigil/vigil.toml";

/// The whole agent config.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[agent]`
    #[serde(default)]
    pub agent: AgentConfig,
    /// `[api]`
    #[serde(default)]
    pub api: ApiConfig,
    /// `[log]`
    #[serde(default)]
    pub log: LogConfig,
    /// `[automation]`
    #[serde(default)]
    pub automation: AutomationConfig,
    /// `[check.KIND.NAME]`
    #[serde(default)]
    pub check: ChecksConfig,
    /// `[remediation.NAME]`
    #[serde(default)]
    pub remediation: IndexMap<String, RemediationConfig>,
    /// `[heartbeat]`: absent, the agent sends no heartbeats.
    #[serde(default)]
    pub heartbeat: Option<HeartbeatConfig>,
}

/// `[agent]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// `"auto"` reads `/etc/machine-id`.
    pub host_id: String,
    /// Sequence counter, spool, audit log, lifecycle, cooldowns.
    pub state_dir: PathBuf,
    /// Default check interval.
    pub interval: Duration,
    /// The lifecycle of a fresh `state_dir`.
    pub initial_lifecycle: Lifecycle,
    /// Carried in every heartbeat.
    pub labels: IndexMap<String, String>,
    /// How many checks may run at the same time.
    pub max_concurrent_checks: usize,
    /// The privileged `vigil runner`'s socket: set, a program whose `run_as` names another
    /// user than the agent's is run by the runner (and any existing user is accepted).
    pub runner_socket: Option<PathBuf>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            host_id: "auto".into(),
            state_dir: PathBuf::from("/var/lib/vigil"),
            interval: Duration::from_secs(10),
            initial_lifecycle: Lifecycle::Available,
            labels: IndexMap::new(),
            max_concurrent_checks: 4,
            runner_socket: None,
        }
    }
}

/// `[api]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// The read-only TCP listener.
    pub listen: SocketAddr,
    /// Source networks the TCP listener answers.
    pub allow: Vec<AllowNet>,
    /// The admin Unix socket (mode 0600).
    pub admin_socket: PathBuf,
    /// Most connections served at once on each listener.
    pub max_connections: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9797)),
            allow: vec![
                AllowNet(IpNet::V4(ipnet::Ipv4Net::new_assert(
                    [127, 0, 0, 0].into(),
                    8,
                ))),
                AllowNet(IpNet::V6(ipnet::Ipv6Net::new_assert(
                    std::net::Ipv6Addr::LOCALHOST,
                    128,
                ))),
            ],
            admin_socket: PathBuf::from("/run/vigil/admin.sock"),
            max_connections: 256,
        }
    }
}

/// A network in `[api].allow`: `"10.0.0.0/8"`, or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowNet(pub IpNet);

impl AllowNet {
    /// Whether `ip` is inside. IPv4-mapped IPv6 peers are compared as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.contains(&ip)
    }
}

impl<'de> Deserialize<'de> for AllowNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(n) = s.parse::<IpNet>() {
            return Ok(AllowNet(n));
        }
        s.parse::<IpAddr>()
            .map(|a| AllowNet(IpNet::from(a)))
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "invalid network {s:?}: expected an address or CIDR such as \"10.0.0.0/8\""
                ))
            })
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (journald adds the timestamp).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter such as `"info"` or `"vigil=debug"`; `RUST_LOG` overrides it.
    pub level: String,
    /// `"text"` or `"json"`.
    pub format: LogFormat,
    /// Also write to this file, rotated daily (the directory must exist).
    pub file: Option<PathBuf>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
            file: None,
        }
    }
}

/// `[automation]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutomationConfig {
    /// Remediation scripts must live here.
    pub dir: PathBuf,
    /// Record what would run, run nothing.
    pub dry_run: bool,
}

impl Default for AutomationConfig {
    fn default() -> Self {
        AutomationConfig {
            dir: PathBuf::from("/etc/vigil/remediations.d"),
            dry_run: false,
        }
    }
}

/// `[remediation.NAME]`: a pre-approved script.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemediationConfig {
    /// The script, under `[automation].dir`.
    pub script: PathBuf,
    /// The SHA-256 the script must hash to (64 hex digits).
    pub sha256: String,
    /// Fixed arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// The user it runs as.
    #[serde(default)]
    pub run_as: Option<String>,
    /// Killed (with its process group) after this long.
    #[serde(default = "default_remediation_timeout")]
    pub timeout: Duration,
    /// Least time between two runs.
    #[serde(default = "default_cooldown")]
    pub cooldown: Duration,
    /// Most runs within `per`.
    #[serde(default = "default_max_runs")]
    pub max_runs: u32,
    /// The window of `max_runs`.
    #[serde(default = "default_per")]
    pub per: Duration,
    /// Sample the check again this long after a zero exit.
    #[serde(default = "default_verify_after")]
    pub verify_after: Duration,
    /// `false` keeps it in the file, switched off.
    #[serde(default)]
    pub enabled: Option<bool>,
}

fn default_remediation_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_cooldown() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_max_runs() -> u32 {
    3
}
fn default_per() -> Duration {
    Duration::from_secs(3600)
}
fn default_verify_after() -> Duration {
    Duration::from_secs(30)
}

/// `[heartbeat]`: where and how the agent sends its signed heartbeats.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// The control plane's endpoint: `https://`, or `http://` to a loopback host only.
    pub url: String,
    /// Time between two heartbeats.
    #[serde(default = "default_heartbeat_interval")]
    pub interval: Duration,
    /// The Ed25519 signing key. Omitted (or empty): `<state_dir>/heartbeat.key`, filled in
    /// by [`parse`].
    #[serde(default)]
    pub key_file: PathBuf,
    /// PEM trust anchors for the control plane; omitted: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain for mutual TLS (with `client_key`).
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key for mutual TLS (with `client_cert`).
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Most bytes the spool of undelivered heartbeats may hold.
    #[serde(default = "default_spool_max")]
    pub spool_max: ByteSize,
    /// Cap of the retry backoff.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: Duration,
    /// Limit of one send: connect, TLS handshake, request and response.
    #[serde(default = "default_heartbeat_timeout")]
    pub timeout: Duration,
}

fn default_heartbeat_interval() -> Duration {
    Duration::from_secs(15)
}
fn default_spool_max() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(120)
}
fn default_heartbeat_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The path of the config to use: `-c`, then `$VIGIL_CONFIG`, then [`DEFAULT_PATH`].
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os("VIGIL_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

/// Reads, parses and validates a config file.
///
/// # Errors
/// [`ConfigError::Read`] when the file cannot be read, [`ConfigError::Invalid`] with every
/// problem found otherwise.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let doc = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &doc)
}

/// Parses and validates config text read from `path`.
///
/// # Errors
/// [`ConfigError::Invalid`] with every problem found.
pub fn parse(path: &Path, doc: &str) -> Result<Config, ConfigError> {
    let invalid = |problems| ConfigError::Invalid {
        path: path.to_path_buf(),
        problems,
    };
    let mut config: Config =
        toml::from_str(doc).map_err(|e| invalid(vec![error::from_toml(doc, &e)]))?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    config.resolve_paths(base);
    config.check.order = error::check_order(doc);
    let problems = config.validate(doc);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(invalid(problems))
    }
}

/// Makes a relative, non-empty `p` relative to `base` (the config file's directory).
pub fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() && !p.as_os_str().is_empty() {
        *p = normalize(&base.join(&*p));
    }
}

/// Removes `.` and `a/..` lexically so paths in messages read naturally
/// (`target/x`, not `config/../target/x`). Symlinks are not consulted: a config
/// directory reached through a symlink resolves the same way a shell's `cd` would.
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        out
    }
}

impl Config {
    fn resolve_paths(&mut self, base: &Path) {
        resolve(base, &mut self.agent.state_dir);
        resolve(base, &mut self.api.admin_socket);
        if let Some(s) = self.agent.runner_socket.as_mut() {
            resolve(base, s);
        }
        resolve(base, &mut self.automation.dir);
        if let Some(f) = self.log.file.as_mut() {
            resolve(base, f);
        }
        for r in self.remediation.values_mut() {
            resolve(base, &mut r.script);
        }
        if let Some(h) = self.heartbeat.as_mut() {
            if h.key_file.as_os_str().is_empty() {
                h.key_file = self.agent.state_dir.join("heartbeat.key");
            }
            resolve(base, &mut h.key_file);
            for p in [&mut h.ca_file, &mut h.client_cert, &mut h.client_key]
                .into_iter()
                .flatten()
            {
                resolve(base, p);
            }
        }
        for c in self.check.disk.values_mut() {
            resolve(base, &mut c.path);
        }
        for c in self.check.tls.certificate.values_mut() {
            resolve(base, &mut c.path);
        }
        for c in self.check.backup.pgbackrest.values_mut() {
            if let Some(p) = c.config.as_mut() {
                resolve(base, p);
            }
        }
        for c in self.check.process.values_mut() {
            if let Some(p) = c.pidfile.as_mut() {
                resolve(base, p);
            }
        }
    }

    /// Checks relations between keys; returns every problem, in document order.
    pub fn validate(&self, doc: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut add = |key: &[&str], msg: String| problems.push(error::at_key(doc, key, msg));

        if self.agent.interval.get().is_zero() {
            add(&["agent", "interval"], "must be greater than zero".into());
        }
        if self.agent.max_concurrent_checks == 0 {
            add(
                &["agent", "max_concurrent_checks"],
                "must be at least 1".into(),
            );
        }
        if self.agent.host_id.trim().is_empty() {
            add(
                &["agent", "host_id"],
                "must not be empty (use \"auto\" for /etc/machine-id)".into(),
            );
        }
        if let Err(e) = crate::telemetry::parse_filter(&self.log.level) {
            add(
                &["log", "level"],
                format!("invalid log filter {:?}: {e}", self.log.level),
            );
        }
        if self.api.max_connections == 0 {
            add(&["api", "max_connections"], "must be at least 1".into());
        }

        let mut seen: IndexMap<&str, &str> = IndexMap::new();
        for (name, spec) in self.check.iter() {
            let kind = spec.kind();
            let kind_path: Vec<&str> = kind.split('.').collect();
            let key = |leaf: Option<&'static str>| -> Vec<&str> {
                let mut k = vec!["check"];
                k.extend(&kind_path);
                k.push(name);
                k.extend(leaf);
                k
            };
            if !is_valid_name(name) {
                add(
                    &key(None),
                    format!(
                        "invalid check name {name:?}: use lowercase letters, digits, '-' and '_'"
                    ),
                );
            }
            if let Some(other) = seen.insert(name, kind) {
                add(
                    &key(None),
                    format!(
                        "duplicate check name {name:?} (also a {other} check); names are unique across kinds"
                    ),
                );
            }
            let common = spec.common(self.agent.interval);
            if common.interval.is_zero() {
                add(&key(Some("interval")), "must be greater than zero".into());
            }
            if common.timeout.is_zero() {
                add(&key(Some("timeout")), "must be greater than zero".into());
            }
            let (trip_after, clear_after) = spec.raw_hysteresis();
            for (leaf, raw) in [("trip_after", trip_after), ("clear_after", clear_after)] {
                if raw == Some(0) {
                    add(&key(Some(leaf)), "must be at least 1".into());
                }
            }
            if let Some(r) = &common.remediation {
                if !self.remediation.contains_key(r) {
                    add(
                        &key(Some("remediation")),
                        format!("unknown remediation {r:?} (no [remediation.{r}])"),
                    );
                }
            }
            if let Some(info) = checks::kind_info(kind) {
                let (warn, crit) = spec.raw_thresholds();
                let t = Thresholds {
                    warn,
                    crit,
                    direction: info.direction,
                };
                if !t.is_ordered() {
                    let order = match info.direction {
                        checks::Direction::HigherIsWorse => {
                            "warn must not be greater than crit (higher is worse for this kind)"
                        }
                        checks::Direction::LowerIsWorse => {
                            "warn must not be less than crit (lower is worse for this kind)"
                        }
                    };
                    add(&key(Some("crit")), order.into());
                }
            }
            for (leaf, msg) in spec.validate(common.enabled) {
                add(&key(Some(leaf)), msg);
            }
            // Host facts for enabled checks only.
            if let (true, Some(user)) = (common.enabled, spec.run_as()) {
                if let Err(e) = Runner::usable_user(user, self.agent.runner_socket.is_some()) {
                    add(&key(Some("run_as")), e.to_string());
                }
            }
        }

        for (name, r) in &self.remediation {
            let key = |leaf: &'static str| ["remediation", name.as_str(), leaf];
            if !is_valid_name(name) {
                add(
                    &["remediation", name],
                    format!(
                        "invalid remediation name {name:?}: use lowercase letters, digits, '-' and '_'"
                    ),
                );
            }
            if !crate::remediation::guard::is_well_formed(&r.sha256) {
                add(
                    &key("sha256"),
                    "must be 64 hex digits (print it with `vigil approve FILE`)".into(),
                );
            }
            if r.max_runs == 0 {
                add(&key("max_runs"), "must be at least 1".into());
            }
            if r.timeout.get().is_zero() {
                add(&key("timeout"), "must be greater than zero".into());
            }
            if r.per.get().is_zero() {
                add(&key("per"), "must be greater than zero".into());
            }
            // Host-dependent facts for enabled remediations only, as for checks: the
            // script is where it must be, unchanged since approval, and `run_as` is a user
            // this agent can become.
            if r.enabled != Some(false) {
                for (leaf, msg) in crate::remediation::guard::check_at_load(
                    &self.automation.dir,
                    r,
                    nix::unistd::geteuid().as_raw(),
                    self.agent.runner_socket.is_some(),
                ) {
                    add(&key(leaf), msg);
                }
            }
        }
        if let Some(h) = &self.heartbeat {
            let key = |leaf: &'static str| ["heartbeat", leaf];
            if let Err(e) = crate::heartbeat::client::Endpoint::parse(&h.url) {
                add(&key("url"), e);
            }
            for (leaf, d) in [
                ("interval", h.interval),
                ("max_backoff", h.max_backoff),
                ("timeout", h.timeout),
            ] {
                if d.get().is_zero() {
                    add(&key(leaf), "must be greater than zero".into());
                }
            }
            if h.spool_max.0 == 0 {
                add(&key("spool_max"), "must be greater than zero".into());
            }
            match (&h.client_cert, &h.client_key) {
                (Some(_), None) => add(
                    &key("client_cert"),
                    "needs client_key too (mutual TLS takes both or neither)".into(),
                ),
                (None, Some(_)) => add(
                    &key("client_key"),
                    "needs client_cert too (mutual TLS takes both or neither)".into(),
                ),
                _ => {}
            }
        }
        problems.sort_by_key(|p| (p.line, p.column));
        problems
    }

    /// Warnings about a config that is valid but unsafe: a password in a DSN of a file
    /// that group or others can read. Logged once logging is up.
    pub fn secret_warnings(&self, path: &Path) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = std::fs::metadata(path) else {
            return Vec::new();
        };
        let readable_by_others = meta.permissions().mode() & 0o044 != 0;
        self.check
            .iter()
            .filter(|(_, spec)| readable_by_others && spec.dsn().is_some_and(|d| d.has_password()))
            .map(|(name, _)| {
                format!(
                    "{}: check {name:?} has a password in its dsn and the file is readable by \
                     group or others (chmod 0600, or use a passfile)",
                    path.display()
                )
            })
            .collect()
    }

    /// The enabled checks, in config order.
    pub fn enabled_checks(&self) -> impl Iterator<Item = (&str, checks::CheckSpec<'_>)> {
        let d = self.agent.interval;
        self.check.iter().filter(move |(_, s)| s.common(d).enabled)
    }
}

/// Check and remediation names: `[a-z0-9_-]+`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_password_in_a_file_others_can_read_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vigil.toml");
        let doc = "[check.postgres.up.db]\nenabled = false\ndsn = \"host=/tmp user=v password=hunter2\"\n";
        std::fs::write(&path, doc).unwrap();
        let cfg = load(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let w = cfg.secret_warnings(&path);
        assert_eq!(w.len(), 1);
        assert!(!w[0].contains("hunter2"), "{}", w[0]);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(cfg.secret_warnings(&path).is_empty());
    }

    #[test]
    fn relative_paths_are_resolved_against_the_config_directory() {
        let cfg = parse(
            Path::new("/etc/vigil/vigil.toml"),
            "[agent]\nstate_dir = \"../lib/x\"\n",
        )
        .unwrap();
        assert_eq!(cfg.agent.state_dir, PathBuf::from("/etc/lib/x"));
    }

    #[test]
    fn run_as_must_exist_when_enabled() {
        let problems = |doc: &str| match parse(Path::new("/etc/vigil/vigil.toml"), doc) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems
                .iter()
                .map(|p| format!("{}: {}", p.key, p.message))
                .collect(),
            Err(e) => panic!("{e}"),
        };
        for kind in [
            "[check.command.x]\ncommand = [\"/x\"]",
            "[check.backup.walg.x]",
            "[check.backup.barman.x]\nserver = \"pg\"",
            "[check.backup.pgbackrest.x]\nstanza = \"main\"",
        ] {
            for runner in ["", "[agent]\nrunner_socket = \"/run/vigil/runner.sock\"\n"] {
                let doc = format!("{runner}{kind}\nrun_as = \"vigil-no-such-user-x\"\n");
                let p = problems(&doc);
                assert_eq!(p.len(), 1, "{doc}: {p:?}");
                assert!(
                    p[0].contains(".x.run_as: run_as \"vigil-no-such-user-x\": no such user"),
                    "{p:?}"
                );
                // Host facts are not looked at for a disabled check.
                assert!(
                    problems(&format!("{doc}enabled = false\n")).is_empty(),
                    "{doc}"
                );
            }
        }
        let cfg = parse(
            Path::new("/etc/vigil/vigil.toml"),
            "[agent]\nrunner_socket = \"run/runner.sock\"\n",
        )
        .unwrap();
        assert_eq!(
            cfg.agent.runner_socket,
            Some(PathBuf::from("/etc/vigil/run/runner.sock"))
        );
    }

    fn heartbeat_problems(table: &str) -> Vec<String> {
        let doc = format!("[heartbeat]\n{table}");
        match parse(Path::new("/etc/vigil/vigil.toml"), &doc) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems
                .iter()
                .map(|p| format!("{}: {}", p.key, p.message))
                .collect(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn heartbeat_defaults_and_paths() {
        let cfg = parse(
            Path::new("/etc/vigil/vigil.toml"),
            "[agent]\nstate_dir = \"/srv/state\"\n[heartbeat]\nurl = \"https://c.example/hb\"\n",
        )
        .unwrap();
        let h = cfg.heartbeat.unwrap();
        assert_eq!(h.interval, Duration::from_secs(15));
        assert_eq!(h.key_file, PathBuf::from("/srv/state/heartbeat.key"));
        assert_eq!(h.ca_file, None);
        assert_eq!(h.spool_max, ByteSize(64 * 1024 * 1024));
        assert_eq!(h.max_backoff, Duration::from_secs(120));
        assert_eq!(h.timeout, Duration::from_secs(10));

        let cfg = parse(
            Path::new("/etc/vigil/vigil.toml"),
            "[heartbeat]\nurl = \"https://c.example/hb\"\nkey_file = \"keys/hb.key\"\n\
             ca_file = \"ca.pem\"\nclient_cert = \"../tls/c.pem\"\nclient_key = \"/k/c.key\"\n",
        )
        .unwrap();
        let h = cfg.heartbeat.unwrap();
        assert_eq!(h.key_file, PathBuf::from("/etc/vigil/keys/hb.key"));
        assert_eq!(h.ca_file, Some(PathBuf::from("/etc/vigil/ca.pem")));
        assert_eq!(h.client_cert, Some(PathBuf::from("/etc/tls/c.pem")));
        assert_eq!(h.client_key, Some(PathBuf::from("/k/c.key")));
        assert!(parse(Path::new("x.toml"), "").unwrap().heartbeat.is_none());
    }

    #[test]
    fn heartbeat_url_must_be_https_or_loopback_http() {
        assert!(heartbeat_problems("url = \"https://c.example:8443/v1/heartbeats\"\n").is_empty());
        for ok in [
            "http://127.0.0.1:8080/hb",
            "http://localhost/hb",
            "http://[::1]:9/hb",
        ] {
            assert!(
                heartbeat_problems(&format!("url = \"{ok}\"\n")).is_empty(),
                "{ok}"
            );
        }
        let p = heartbeat_problems("url = \"http://control.internal/hb\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("heartbeat.url: plain http://"), "{p:?}");
        let p = heartbeat_problems("url = \"ftp://c.example/hb\"\n");
        assert!(p[0].starts_with("heartbeat.url: invalid URL"), "{p:?}");
    }

    #[test]
    fn heartbeat_url_is_required_and_unknown_keys_are_refused() {
        let p = heartbeat_problems("interval = \"5s\"\n");
        assert!(p[0].contains("missing field `url`"), "{p:?}");
        let p = heartbeat_problems("url = \"https://c.example/hb\"\nca = \"x\"\n");
        assert!(p[0].contains("unknown field `ca`"), "{p:?}");
    }

    #[test]
    fn heartbeat_durations_and_spool_max_must_be_positive() {
        let p = heartbeat_problems(
            "url = \"https://c.example/hb\"\ninterval = \"0s\"\nspool_max = \"0B\"\n\
             max_backoff = \"0s\"\ntimeout = \"0s\"\n",
        );
        assert_eq!(
            p,
            [
                "heartbeat.interval: must be greater than zero",
                "heartbeat.spool_max: must be greater than zero",
                "heartbeat.max_backoff: must be greater than zero",
                "heartbeat.timeout: must be greater than zero",
            ]
        );
    }

    #[test]
    fn heartbeat_client_cert_and_key_go_together() {
        let p = heartbeat_problems("url = \"https://c.example/hb\"\nclient_cert = \"c.pem\"\n");
        assert_eq!(
            p,
            ["heartbeat.client_cert: needs client_key too (mutual TLS takes both or neither)"]
        );
        let p = heartbeat_problems("url = \"https://c.example/hb\"\nclient_key = \"c.key\"\n");
        assert_eq!(
            p,
            ["heartbeat.client_key: needs client_cert too (mutual TLS takes both or neither)"]
        );
    }
}
