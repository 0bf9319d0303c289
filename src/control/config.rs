//! The control plane's config: `[control]` (and an optional `[log]`, as the agent's).
//!
//! Same conventions as the agent's config ([`crate::config`]): values validate while they
//! are deserialized (durations are [`Duration`]), every table denies unknown keys, relations
//! between keys are checked by [`ControlFile::validate`], which collects every problem, and
//! every problem renders as `FILE:LINE:COL: key.path: message` through
//! [`ConfigError`]. Relative paths are relative to the config file's directory.
//!
//! Defaults: an empty file is a valid development setup (plain HTTP on
//! `127.0.0.1:8443`, the file store in `/var/lib/vigil-control`). Plain HTTP is refused on
//! any address that is not loopback: a heartbeat is signed, but `/v1/hosts` is not, and
//! an operator who forgot `tls_cert` should hear about it before the fleet does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::error::{self, ConfigError, Problem};
use crate::config::types::Duration;
use crate::config::{LogConfig, resolve as resolve_path_in};

/// Where the config is read from when no `-c` is given and `$VIGIL_CONTROL_CONFIG` is unset.
pub const DEFAULT_PATH: &str = "/etc/vigil/control.toml";
/// The environment variable that names the config when no `-c` is given.
pub const ENV_VAR: &str = "VIGIL_CONTROL_CONFIG";

/// The whole control-plane config file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlFile {
    /// `[control]`
    #[serde(default)]
    pub control: ControlConfig,
    /// `[log]`: as the agent's.
    #[serde(default)]
    pub log: LogConfig,
}

/// `[control]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// The address the receiver listens on.
    pub listen: SocketAddr,
    /// PEM certificate chain (with `tls_key`); both omitted: plain HTTP, loopback only.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (with `tls_cert`).
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: when set, every client must present a certificate they sign.
    pub client_ca: Option<PathBuf>,
    /// The URL agents use (`https://control.internal:8443`), when a proxy sits in front:
    /// `@target-uri` is checked against it instead of the address the request reached.
    pub public_url: Option<PublicUrl>,
    /// The file store's directory.
    pub state_dir: PathBuf,
    /// `"file"`, or a `postgresql://` URL.
    pub store: StoreSetting,
    /// No heartbeat for this long: the host is `uncertain`.
    pub overdue_after: Duration,
    /// A signature whose `created` is further off than this (either way) is refused.
    pub max_clock_skew: Duration,
    /// Heartbeat history kept; the latest per host always.
    pub retention: Duration,
    /// POSTed on every change of a host's derived state.
    pub webhook: Option<WebhookUrl>,
    /// Most connections served at once.
    pub max_connections: usize,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            public_url: None,
            state_dir: PathBuf::from("/var/lib/vigil-control"),
            store: StoreSetting::File,
            overdue_after: Duration::from_secs(45),
            max_clock_skew: Duration::from_secs(5 * 60),
            retention: Duration::from_secs(7 * 86_400),
            webhook: None,
            max_connections: 1024,
        }
    }
}

/// Where enrolment and heartbeats are kept.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreSetting {
    /// The embedded file store under `state_dir`.
    File,
    /// A PostgreSQL database, by URL (may hold a password: never logged, see `Debug`).
    Postgres(String),
}

impl std::fmt::Debug for StoreSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSetting::File => f.write_str("File"),
            // The URL may carry a password.
            StoreSetting::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

impl<'de> Deserialize<'de> for StoreSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "file" {
            return Ok(StoreSetting::File);
        }
        if s.starts_with("postgresql://") || s.starts_with("postgres://") {
            // The checks' DSN rules (passfile, sslrootcert, verifying TLS); the message
            // never echoes a value, which could be the password.
            return match crate::pg::Dsn::new(s.as_str()).parse() {
                Ok(_) => Ok(StoreSetting::Postgres(s)),
                Err(e) => Err(serde::de::Error::custom(format!(
                    "invalid PostgreSQL URL: {e}"
                ))),
            };
        }
        Err(serde::de::Error::custom(
            "expected \"file\" or a \"postgresql://USER@HOST/DB\" URL",
        ))
    }
}

/// `public_url`: `http(s)://HOST[:PORT]` with an optional path prefix, stored without a
/// trailing slash so that `public_url + "/v1/heartbeats"` is the signed `@target-uri`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicUrl(String);

impl PublicUrl {
    /// Parses and canonicalizes (lowercase scheme and host, no default port).
    ///
    /// # Errors
    /// A message when `s` is not an absolute http(s) URL without query or user info.
    pub fn parse(s: &str) -> Result<PublicUrl, String> {
        let uri: hyper::Uri = s.parse().map_err(|e| format!("invalid URL {s:?}: {e}"))?;
        let scheme = uri.scheme_str().map(str::to_ascii_lowercase);
        let default_port = match scheme.as_deref() {
            Some("https") => 443,
            Some("http") => 80,
            _ => return Err(format!("invalid URL {s:?}: expected https://HOST[:PORT]")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("invalid URL {s:?}: no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("invalid URL {s:?}: user info is not allowed"));
        }
        if uri.query().is_some() {
            return Err(format!("invalid URL {s:?}: a query is not allowed"));
        }
        let host = authority.host().to_ascii_lowercase();
        let hostport = match authority.port_u16() {
            Some(p) if p != default_port => format!("{host}:{p}"),
            _ => host,
        };
        let path = uri.path().trim_end_matches('/');
        Ok(PublicUrl(format!(
            "{}://{hostport}{path}",
            scheme.unwrap_or_default()
        )))
    }

    /// The canonical text, without a trailing slash.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for PublicUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PublicUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `webhook`: an absolute `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl(pub hyper::Uri);

impl<'de> Deserialize<'de> for WebhookUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let uri: hyper::Uri = s
            .parse()
            .map_err(|e| serde::de::Error::custom(format!("invalid URL {s:?}: {e}")))?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(h)) if !h.is_empty() => Ok(WebhookUrl(uri)),
            _ => Err(serde::de::Error::custom(format!(
                "invalid URL {s:?}: expected http(s)://HOST[:PORT]/PATH"
            ))),
        }
    }
}

/// The path of the config to use: `-c`, then `$VIGIL_CONTROL_CONFIG`, then
/// [`DEFAULT_PATH`].
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os(ENV_VAR) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

/// Reads, parses and validates a control config file.
///
/// # Errors
/// [`ConfigError::Read`] when the file cannot be read, [`ConfigError::Invalid`] with every
/// problem found otherwise.
pub fn load(path: &Path) -> Result<ControlFile, ConfigError> {
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
pub fn parse(path: &Path, doc: &str) -> Result<ControlFile, ConfigError> {
    let invalid = |problems| ConfigError::Invalid {
        path: path.to_path_buf(),
        problems,
    };
    let mut file: ControlFile =
        toml::from_str(doc).map_err(|e| invalid(vec![error::from_toml(doc, &e)]))?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let c = &mut file.control;
    for p in [&mut c.tls_cert, &mut c.tls_key, &mut c.client_ca]
        .into_iter()
        .flatten()
    {
        resolve_path_in(base, p);
    }
    resolve_path_in(base, &mut c.state_dir);
    if let Some(f) = file.log.file.as_mut() {
        resolve_path_in(base, f);
    }
    let problems = file.validate(doc);
    if problems.is_empty() {
        Ok(file)
    } else {
        Err(invalid(problems))
    }
}

impl ControlFile {
    /// Checks relations between keys; returns every problem, in document order.
    pub fn validate(&self, doc: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut add = |key: &[&str], msg: &str| problems.push(error::at_key(doc, key, msg));
        let c = &self.control;
        match (&c.tls_cert, &c.tls_key) {
            (Some(_), None) => add(
                &["control", "tls_cert"],
                "needs tls_key too (TLS takes both or neither)",
            ),
            (None, Some(_)) => add(
                &["control", "tls_key"],
                "needs tls_cert too (TLS takes both or neither)",
            ),
            (None, None) => {
                if !c.listen.ip().is_loopback() {
                    add(
                        &["control", "listen"],
                        "plain HTTP (no tls_cert/tls_key) may listen on a loopback address \
                         only; set tls_cert and tls_key",
                    );
                }
                if c.client_ca.is_some() {
                    add(
                        &["control", "client_ca"],
                        "client certificates need TLS: set tls_cert and tls_key",
                    );
                }
            }
            (Some(_), Some(_)) => {}
        }
        for (leaf, d) in [
            ("overdue_after", c.overdue_after),
            ("max_clock_skew", c.max_clock_skew),
            ("retention", c.retention),
        ] {
            if d.get().is_zero() {
                add(&["control", leaf], "must be greater than zero");
            }
        }
        if c.retention.get() < c.overdue_after.get() {
            add(
                &["control", "retention"],
                "must not be shorter than overdue_after",
            );
        }
        if c.max_connections == 0 {
            add(&["control", "max_connections"], "must be at least 1");
        }
        if c.state_dir.as_os_str().is_empty() {
            add(&["control", "state_dir"], "must not be empty");
        }
        if let Err(e) = crate::telemetry::parse_filter(&self.log.level) {
            add(
                &["log", "level"],
                &format!("invalid log filter {:?}: {e}", self.log.level),
            );
        }
        problems.sort_by_key(|p| (p.line, p.column));
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/etc/vigil/control.toml";

    fn problems(doc: &str) -> Vec<String> {
        match parse(Path::new(PATH), doc) {
            Ok(_) => Vec::new(),
            Err(e) => e.to_string().lines().map(String::from).collect(),
        }
    }

    #[test]
    fn an_empty_file_gives_the_contract_defaults() {
        let f = parse(Path::new(PATH), "").unwrap();
        let c = f.control;
        assert_eq!(c.listen, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(c.overdue_after, Duration::from_secs(45));
        assert_eq!(c.max_clock_skew, Duration::from_secs(300));
        assert_eq!(c.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.store, StoreSetting::File);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/vigil-control"));
        assert!(c.tls_cert.is_none() && c.webhook.is_none() && c.public_url.is_none());
    }

    #[test]
    fn the_contract_example_parses_and_paths_resolve() {
        let doc = "[control]\nlisten = \"0.0.0.0:8443\"\ntls_cert = \"control.crt\"\n\
                   tls_key = \"/etc/vigil/control.key\"\nclient_ca = \"../ca/agents.pem\"\n\
                   public_url = \"HTTPS://Control.Internal:443/\"\nstate_dir = \"state\"\n\
                   store = \"postgresql://vigil@db/vigil\"\noverdue_after = \"1m\"\n\
                   max_clock_skew = \"30s\"\nretention = \"1d\"\n\
                   webhook = \"https://pager.internal/hooks/vigil\"\n";
        let c = parse(Path::new(PATH), doc).unwrap().control;
        assert_eq!(c.tls_cert, Some(PathBuf::from("/etc/vigil/control.crt")));
        assert_eq!(c.client_ca, Some(PathBuf::from("/etc/ca/agents.pem")));
        assert_eq!(c.state_dir, PathBuf::from("/etc/vigil/state"));
        assert_eq!(
            c.public_url.as_ref().map(PublicUrl::as_str),
            Some("https://control.internal")
        );
        assert!(matches!(c.store, StoreSetting::Postgres(_)));
        assert_eq!(c.overdue_after, Duration::from_secs(60));
        assert_eq!(
            c.webhook.map(|w| w.0.to_string()).as_deref(),
            Some("https://pager.internal/hooks/vigil")
        );
    }

    #[test]
    fn bad_values_name_file_line_column_and_key() {
        assert_eq!(
            problems("[control]\noverdue_after = \"soon\"\n"),
            [format!(
                "{PATH}:2:17: control.overdue_after: invalid duration \"soon\": expected a \
                 number and a unit (ms, s, m, h, d), e.g. \"500ms\", \"10s\", \"15m\", \
                 \"2h\", \"14d\""
            )]
        );
        assert_eq!(
            problems("[control]\nlisten = \"0.0.0.0:8443\"\n"),
            [format!(
                "{PATH}:2:1: control.listen: plain HTTP (no tls_cert/tls_key) may listen on \
                 a loopback address only; set tls_cert and tls_key"
            )]
        );
        assert_eq!(
            problems("[control]\nstore = \"mysql://x\"\n"),
            [format!(
                "{PATH}:2:9: control.store: expected \"file\" or a \
                 \"postgresql://USER@HOST/DB\" URL"
            )]
        );
        let p = problems("[control]\nlistn = \"127.0.0.1:1\"\n");
        assert!(
            p[0].starts_with(&format!("{PATH}:2:1: control.listn: unknown field `listn`")),
            "{p:?}"
        );
        let p = problems("[controll]\n");
        assert!(p[0].contains("unknown field `controll`"), "{p:?}");
        let p = problems("[control]\npublic_url = \"ftp://x\"\n");
        assert!(p[0].contains("control.public_url: invalid URL"), "{p:?}");
        let p = problems("[control]\nwebhook = \"pager\"\n");
        assert!(p[0].contains("control.webhook: invalid URL"), "{p:?}");
    }

    #[test]
    fn tls_takes_both_or_neither_and_client_ca_needs_tls() {
        assert_eq!(
            problems("[control]\ntls_cert = \"c.pem\"\n"),
            [format!(
                "{PATH}:2:1: control.tls_cert: needs tls_key too (TLS takes both or neither)"
            )]
        );
        assert_eq!(
            problems("[control]\ntls_key = \"k.pem\"\n"),
            [format!(
                "{PATH}:2:1: control.tls_key: needs tls_cert too (TLS takes both or neither)"
            )]
        );
        assert_eq!(
            problems("[control]\nclient_ca = \"ca.pem\"\n"),
            [format!(
                "{PATH}:2:1: control.client_ca: client certificates need TLS: set tls_cert \
                 and tls_key"
            )]
        );
        assert!(
            problems(
                "[control]\nlisten = \"[::]:8443\"\ntls_cert = \"c\"\ntls_key = \"k\"\n\
                 client_ca = \"ca\"\n"
            )
            .is_empty()
        );
    }

    #[test]
    fn zero_durations_and_every_problem_at_once() {
        let p = problems(
            "[control]\noverdue_after = \"0s\"\nmax_clock_skew = \"0s\"\nretention = \"0s\"\n",
        );
        assert_eq!(
            p,
            [
                format!("{PATH}:2:1: control.overdue_after: must be greater than zero"),
                format!("{PATH}:3:1: control.max_clock_skew: must be greater than zero"),
                format!("{PATH}:4:1: control.retention: must be greater than zero"),
            ]
        );
        let p = problems("[control]\noverdue_after = \"2h\"\nretention = \"1h\"\n");
        assert_eq!(
            p,
            [format!(
                "{PATH}:3:1: control.retention: must not be shorter than overdue_after"
            )]
        );
    }

    #[test]
    fn a_store_url_with_a_password_is_not_shown_by_debug() {
        let c = parse(
            Path::new(PATH),
            "[control]\nstore = \"postgresql://u:hunter2@db/v\"\n",
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn resolve_path_prefers_the_flag() {
        assert_eq!(
            resolve_path(Some(Path::new("x.toml"))),
            PathBuf::from("x.toml")
        );
    }
}
