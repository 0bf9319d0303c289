//! PostgreSQL connections for the `postgres.*` checks.
//!
//! - **DSN.** libpq's `key=value` form or a `postgresql://` URL. Parameters libpq knows but
//!   tokio-postgres does not (`passfile`, `sslrootcert`, `sslcert`, `sslkey`, the `verify-*`
//!   sslmodes) are taken out here before the rest goes to [`tokio_postgres::Config`]; a
//!   parameter that would change security and that vigil cannot honour (`requirepeer`,
//!   `sslcrl`, `service`, …) is refused rather than silently ignored. With no host the
//!   default is the Debian/RHEL socket directory `/var/run/postgresql`.
//! - **Password.** From the DSN, else from a passfile (`passfile=`, else `$PGPASSFILE`, else
//!   `~/.pgpass`) in libpq's format, read at each connect so a rotated password is picked up.
//!   A passfile readable by group or others is ignored with a warning, as libpq does. A
//!   password never reaches a log, a message, an error or a `Debug` output: [`Dsn`] and
//!   [`Secret`] write `Debug` by hand, and errors name the target without it.
//! - **TLS** only when the DSN asks for it (`sslmode=require`, `verify-ca`, `verify-full`),
//!   with rustls and the `ring` provider, verified against `sslrootcert` (a file, or `system`)
//!   or else `~/.postgresql/root.crt` if present, else the system's roots. **All three modes
//!   verify the chain and the host name**, stricter than libpq (whose `require` does not
//!   verify and whose `verify-ca` skips the name): vigil has no unverified TLS. `disable`,
//!   `allow` and `prefer` connect in plain text (vigil never downgrades a verified TLS to
//!   plain, and cannot do unverified TLS). Unix sockets never use TLS, as in libpq.
//! - **One session per distinct DSN** ([`Connections`], held in the check context), shared by
//!   every check using it. Each check run takes the session for the length of its queries,
//!   so there is never more than one connect attempt in flight per DSN, and the checks'
//!   statements never interleave in one session.
//! - **Reconnect with backoff.** A failed connect is retried no sooner than an exponential,
//!   jittered delay (1s doubling to 30s, from `backon`); a check that runs meanwhile reports
//!   the last error at once, so a dead server never causes a connect storm. A failure is
//!   logged when it first happens or changes, and the recovery once.
//! - **Bounded in time.** The connect and every query run against the check's deadline;
//!   each check's statements run with `SET LOCAL statement_timeout` just under its timeout;
//!   a session whose query was abandoned (a hung server, or the scheduler's timeout dropping
//!   the run) is thrown away and reconnected rather than reused in an unknown state.
//! - **Read-only and identified.** Every session has `application_name = 'vigil'` (unless
//!   the DSN names another) and `default_transaction_read_only = on`.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration as StdDuration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use tokio::sync::OwnedMutexGuard;
use tokio::time::{Instant, timeout_at};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};
use tracing::{debug, info, warn};

/// The oldest server version the checks support (`server_version_num`).
pub const MIN_SERVER_VERSION_NUM: i32 = 120_000;

/// The socket directory used when a DSN names no host (Debian's and PGDG's packages).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// First delay before reconnecting after a failed connect.
const BACKOFF_MIN: StdDuration = StdDuration::from_secs(1);
/// Longest delay between connect attempts: three default intervals, so a server that comes
/// back is seen within half a minute.
const BACKOFF_MAX: StdDuration = StdDuration::from_secs(30);

/// Why a PostgreSQL measurement could not be made. Messages name the target (host, port,
/// user, database) but never a password.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PgError {
    /// The DSN cannot be used.
    #[error("invalid dsn: {0}")]
    Config(String),
    /// Connecting (or the session's setup) failed.
    #[error("cannot connect to {target}: {reason}{}", retry_note(.retry_in))]
    Connect {
        /// The redacted target (`host=… port=… user=… dbname=…`).
        target: String,
        /// What went wrong, with the server's message where there is one.
        reason: String,
        /// The server's SQLSTATE, for matching (e.g. `INVALID_PASSWORD`).
        code: Option<SqlState>,
        /// Set when this error is a cached one and the next attempt waits for the backoff.
        retry_in: Option<StdDuration>,
    },
    /// A query failed or did not answer in time.
    #[error("query `{query_name}` failed: {reason}")]
    Query {
        /// The query's short name.
        query_name: &'static str,
        /// What went wrong, with the server's message where there is one.
        reason: String,
        /// The server's SQLSTATE (`QUERY_CANCELED` for a statement timeout,
        /// `INSUFFICIENT_PRIVILEGE` for a missing grant).
        code: Option<SqlState>,
    },
    /// The server is older than [`MIN_SERVER_VERSION_NUM`].
    #[error("unsupported server version {version} (vigil needs 12 or newer)")]
    Version {
        /// `server_version` as the server reports it.
        version: String,
    },
    /// Another check held the session until this check's deadline.
    #[error("the shared session to {target} stayed busy until the check's deadline")]
    Busy {
        /// The redacted target.
        target: String,
    },
}

fn retry_note(retry_in: &Option<StdDuration>) -> String {
    match retry_in {
        Some(d) => format!(" (next attempt in {}s)", d.as_secs_f64().ceil() as u64),
        None => String::new(),
    }
}

impl PgError {
    /// The server's SQLSTATE, when the error came from the server.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            PgError::Connect { code, .. } | PgError::Query { code, .. } => code.as_ref(),
            _ => None,
        }
    }
}

/// A password or other secret: `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A connection string as written in the config (`dsn = "…"`).
///
/// `Debug` shows the redacted form plus a fingerprint of the whole text, keyed randomly per
/// process: the scheduler notices a changed DSN (a new password) by comparing `Debug`
/// output, and the fingerprint lets it do so without the password being shown.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Dsn(String);

impl Dsn {
    /// Wraps a DSN.
    pub fn new(s: impl Into<String>) -> Self {
        Dsn(s.into())
    }

    /// Parses the DSN into connect settings.
    ///
    /// # Errors
    /// [`PgError::Config`] naming the problem (never a value that could be a password).
    pub fn parse(&self) -> Result<DsnSettings, PgError> {
        DsnSettings::parse(&self.0).map_err(PgError::Config)
    }

    /// The DSN in `key=value` form with any password replaced by `***`; a DSN that does not
    /// parse is shown as `<unparsable dsn>`.
    pub fn redacted(&self) -> String {
        match parse_conninfo(&self.0) {
            Ok(pairs) => pairs
                .iter()
                .map(|(k, v)| {
                    if k == "password" {
                        format!("{k}=***")
                    } else {
                        format!("{k}={}", quote_value(v))
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
            Err(_) => "<unparsable dsn>".into(),
        }
    }

    /// Whether the DSN itself holds a password (a config holding it should not be readable
    /// by others).
    pub fn has_password(&self) -> bool {
        parse_conninfo(&self.0).is_ok_and(|p| p.iter().any(|(k, _)| k == "password"))
    }
}

impl fmt::Debug for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        static KEY: OnceLock<RandomState> = OnceLock::new();
        let fingerprint = KEY.get_or_init(RandomState::new).hash_one(&self.0);
        write!(f, "Dsn({:?} #{fingerprint:016x})", self.redacted())
    }
}

impl<'de> Deserialize<'de> for Dsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dsn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a connection string such as \"host=/var/run/postgresql user=vigil\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dsn, E> {
                Ok(Dsn(v.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

/// How the session is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain text (`sslmode` absent, `disable`, `allow` or `prefer`, or a Unix socket).
    Plain,
    /// TLS, verifying the chain and the host name.
    Verify {
        /// Trust anchors.
        roots: RootSource,
        /// Client certificate and key (`sslcert`, `sslkey`).
        client: Option<(PathBuf, PathBuf)>,
    },
}

/// Where the trust anchors come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    /// A PEM file (`sslrootcert=PATH`).
    File(PathBuf),
    /// `~/.postgresql/root.crt` if it exists, else the system's store (no `sslrootcert`).
    Default,
    /// The system's store (`sslrootcert=system`).
    System,
}

/// A parsed DSN: the tokio-postgres config without the password, and what vigil handles
/// itself.
#[derive(Debug, Clone)]
pub struct DsnSettings {
    config: tokio_postgres::Config,
    password: Option<Secret>,
    passfile: Option<PathBuf>,
    tls: TlsMode,
    /// `host=… port=… user=… dbname=…`, for messages and logs.
    target: String,
    user: String,
    dbname: String,
}

impl DsnSettings {
    fn parse(raw: &str) -> Result<Self, String> {
        let pairs = parse_conninfo(raw)?;
        let mut password = None;
        let mut passfile = None;
        let mut sslmode: Option<String> = None;
        let mut rootcert = None;
        let mut sslcert = None;
        let mut sslkey = None;
        let mut rest: Vec<(String, String)> = Vec::new();
        for (k, v) in pairs {
            match k.as_str() {
                "password" => password = Some(Secret(v)),
                "passfile" => passfile = Some(PathBuf::from(v)),
                "sslmode" => sslmode = Some(v),
                "sslrootcert" => rootcert = Some(v),
                "sslcert" => sslcert = Some(PathBuf::from(v)),
                "sslkey" => sslkey = Some(PathBuf::from(v)),
                // Harmless to ignore: the client encoding is always UTF8 with tokio-postgres,
                // compression is gone from modern libpq, SNI is always sent for a name.
                "fallback_application_name" | "client_encoding" | "sslcompression" | "sslsni" => {}
                "gssencmode" if v != "require" => {}
                "user"
                | "dbname"
                | "host"
                | "hostaddr"
                | "port"
                | "options"
                | "application_name"
                | "connect_timeout"
                | "tcp_user_timeout"
                | "keepalives"
                | "keepalives_idle"
                | "keepalives_interval"
                | "keepalives_retries"
                | "target_session_attrs"
                | "channel_binding"
                | "load_balance_hosts" => rest.push((k, v)),
                "gssencmode"
                | "service"
                | "requirepeer"
                | "sslcrl"
                | "sslcrldir"
                | "sslpassword"
                | "require_auth"
                | "ssl_min_protocol_version"
                | "ssl_max_protocol_version"
                | "krbsrvname"
                | "gsslib"
                | "gssdelegation"
                | "sslcertmode"
                | "sslnegotiation"
                | "replication"
                | "requiressl" => {
                    return Err(format!(
                        "connection parameter `{k}` is not supported by vigil"
                    ));
                }
                _ => return Err(format!("unknown connection parameter `{k}`")),
            }
        }
        let wants_tls = match sslmode.as_deref() {
            None | Some("disable" | "allow" | "prefer") => false,
            Some("require" | "verify-ca" | "verify-full") => true,
            Some(other) => {
                return Err(format!(
                    "invalid sslmode {other:?}: expected disable, allow, prefer, require, \
                     verify-ca or verify-full"
                ));
            }
        };
        let text = rest
            .iter()
            .map(|(k, v)| format!("{k}={}", quote_value(v)))
            .collect::<Vec<_>>()
            .join(" ");
        let mut config = tokio_postgres::Config::from_str(&text).map_err(|e| error_chain(&e))?;
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            config.host(DEFAULT_SOCKET_DIR);
        }
        if config.get_application_name().is_none() {
            config.application_name("vigil");
        }
        let user = match config.get_user() {
            Some(u) => u.to_string(),
            None => {
                let u = os_user_name()?;
                config.user(&u);
                u
            }
        };
        let dbname = config.get_dbname().unwrap_or(&user).to_string();
        let unix = config
            .get_hosts()
            .iter()
            .filter(|h| matches!(h, Host::Unix(_)))
            .count();
        let tls = if !wants_tls || unix == config.get_hosts().len() {
            // libpq never uses TLS over a Unix socket, whatever sslmode says.
            TlsMode::Plain
        } else if unix > 0 {
            return Err(
                "sslmode requires TLS, which a Unix socket host cannot give: list the socket \
                 and the TCP hosts in separate checks"
                    .into(),
            );
        } else {
            let client = match (sslcert, sslkey) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => return Err("sslcert and sslkey must be given together".into()),
            };
            let roots = match rootcert.as_deref() {
                None => RootSource::Default,
                Some("system") => RootSource::System,
                Some(p) => RootSource::File(PathBuf::from(p)),
            };
            TlsMode::Verify { roots, client }
        };
        config.ssl_mode(match tls {
            TlsMode::Plain => SslMode::Disable,
            TlsMode::Verify { .. } => SslMode::Require,
        });
        let target = describe_target(&config, &user, &dbname);
        Ok(DsnSettings {
            config,
            password,
            passfile,
            tls,
            target,
            user,
            dbname,
        })
    }

    /// `host=… port=… user=… dbname=…`: what messages and logs name.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// How the session is protected.
    pub fn tls(&self) -> &TlsMode {
        &self.tls
    }

    /// What a client of vigil's own that does not go through a [`Slot`] (the control
    /// plane's PostgreSQL store, which writes) needs to connect under the same rules as
    /// the checks: the tokio-postgres config with the password from the DSN or the
    /// passfile, and the verifying TLS connector when the DSN asks for TLS. Reads files:
    /// call it off the async worker threads.
    ///
    /// # Errors
    /// A message naming the unusable file (never a password).
    pub fn connect_parts(&self) -> Result<ConnectParts, String> {
        let (password, tls, warning) = prepare_secrets(self.clone())()?;
        let mut config = self.config.clone();
        if let Some(p) = password {
            config.password(p.expose());
        }
        Ok(ConnectParts {
            config,
            tls,
            passfile_warning: warning.map(|(path, why)| format!("{}: {why}", path.display())),
        })
    }
}

/// See [`DsnSettings::connect_parts`]. No `Debug`: the config holds the password.
pub struct ConnectParts {
    /// The tokio-postgres config, password included.
    pub config: tokio_postgres::Config,
    /// The TLS connector, `None` for plain text.
    pub tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// A passfile that was ignored, and why (worth a warning).
    pub passfile_warning: Option<String>,
}

fn describe_target(config: &tokio_postgres::Config, user: &str, dbname: &str) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(s) => s.clone(),
            Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let hosts = if hosts.is_empty() {
        config
            .get_hostaddrs()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    } else {
        hosts.join(",")
    };
    let ports = match config.get_ports() {
        [] => "5432".to_string(),
        p => p
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    };
    format!("host={hosts} port={ports} user={user} dbname={dbname}")
}

fn os_user_name() -> Result<String, String> {
    let uid = nix::unistd::geteuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => Ok(u.name),
        _ => Err(format!(
            "no user in the DSN and no name for uid {uid}: set user=… in the dsn"
        )),
    }
}

/// Quotes a value for libpq's `key=value` form when it needs it.
fn quote_value(v: &str) -> String {
    if !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Splits a DSN (`key=value` or URL form) into its parameters, in order. Messages never
/// include a value, which could be a password.
///
/// # Errors
/// A message naming the malformed part.
pub fn parse_conninfo(s: &str) -> Result<Vec<(String, String)>, String> {
    let t = s.trim();
    for scheme in ["postgresql://", "postgres://"] {
        if let Some(rest) = t.strip_prefix(scheme) {
            return parse_url(rest);
        }
    }
    parse_kv(t)
}

fn parse_kv(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.next() != Some('=') {
            return Err(format!("missing \"=\" after {key:?} in connection string"));
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if it.next_if_eq(&'\'').is_some() {
            loop {
                match it.next() {
                    None => return Err(format!("unterminated quoted value for {key:?}")),
                    Some('\\') => {
                        if let Some(c) = it.next() {
                            value.push(c);
                        }
                    }
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = it.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(n) = it.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

fn percent_decode(s: &str, what: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("invalid percent-encoding in the URL's {what}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the URL's {what} is not UTF-8"))
}

fn parse_url(rest: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hostlist) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if let Some(u) = userinfo {
        let (user, pass) = match u.split_once(':') {
            Some((user, pass)) => (user, Some(pass)),
            None => (u, None),
        };
        if !user.is_empty() {
            out.push(("user".into(), percent_decode(user, "user")?));
        }
        if let Some(p) = pass {
            out.push(("password".into(), percent_decode(p, "password")?));
        }
    }
    if !hostlist.is_empty() {
        let (mut hosts, mut ports) = (Vec::new(), Vec::new());
        for spec in hostlist.split(',') {
            let (host, port) = if let Some(v6) = spec.strip_prefix('[') {
                let (h, after) = v6
                    .split_once(']')
                    .ok_or("unterminated [ in the URL's host")?;
                (h, after.strip_prefix(':').unwrap_or(""))
            } else {
                spec.rsplit_once(':').unwrap_or((spec, ""))
            };
            hosts.push(percent_decode(host, "host")?);
            ports.push(port.to_string());
        }
        out.push(("host".into(), hosts.join(",")));
        if ports.iter().any(|p| !p.is_empty()) {
            out.push(("port".into(), ports.join(",")));
        }
    }
    if !path.is_empty() {
        out.push(("dbname".into(), percent_decode(path, "database")?));
    }
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or("a URL parameter without \"=\"")?;
        let k = percent_decode(k, "parameters")?;
        let v = percent_decode(v, "parameters")?;
        out.push((k, v));
    }
    Ok(out)
}

/// Finds the password for a connection in a passfile's text (libpq's
/// `hostname:port:database:username:password`, `*` matching anything, `\:` and `\\`
/// escapes, `#` comments). `hosts` are the names the host may be written as.
pub fn lookup_passfile(
    contents: &str,
    hosts: &[&str],
    port: &str,
    dbname: &str,
    user: &str,
) -> Option<Secret> {
    for line in contents.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::with_capacity(5);
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() < 5 {
            continue;
        }
        let matches = |field: &str, value: &str| field == "*" || field == value;
        if hosts.iter().any(|h| matches(&fields[0], h))
            && matches(&fields[1], port)
            && matches(&fields[2], dbname)
            && matches(&fields[3], user)
        {
            return Some(Secret(fields.swap_remove(4)));
        }
    }
    None
}

/// Whether libpq would use a passfile with this mode: a regular file that neither group nor
/// others can access.
pub fn passfile_mode_ok(mode: u32) -> bool {
    mode & 0o077 == 0
}

/// The rendered error of tokio-postgres: its `Display` omits the cause, so walk the chain;
/// a server error shows severity, message, detail, hint and SQLSTATE.
pub fn error_chain(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{}: {}", db.severity(), db.message());
        if let Some(d) = db.detail() {
            s.push_str(&format!(" ({d})"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        s.push_str(&format!(" [SQLSTATE {}]", db.code().code()));
        return s;
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(&format!(": {cause}"));
        src = cause.source();
    }
    s
}

/// The shared sessions, one per distinct DSN. Held in the check context for the agent's
/// lifetime; a session lives while some check holds its [`Slot`] (the registry keeps only
/// weak references), so removing the last check of a DSN on reload closes its session.
pub struct Connections {
    slots: Mutex<HashMap<Dsn, Weak<Slot>>>,
}

impl fmt::Debug for Connections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.slots.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("Connections").field("dsns", &n).finish()
    }
}

impl Default for Connections {
    fn default() -> Self {
        Self::new()
    }
}

impl Connections {
    /// An empty registry.
    pub fn new() -> Self {
        Connections {
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The slot for `dsn`, shared with every other check using the same DSN.
    ///
    /// # Errors
    /// [`PgError::Config`] when the DSN does not parse.
    pub fn slot(&self, dsn: &Dsn) -> Result<Arc<Slot>, PgError> {
        // A poisoned lock only means another thread panicked while holding it; the map of
        // weak references is still consistent.
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get(dsn).and_then(Weak::upgrade) {
            return Ok(s);
        }
        slots.retain(|_, w| w.strong_count() > 0);
        let slot = Arc::new(Slot {
            settings: dsn.parse()?,
            state: Arc::new(tokio::sync::Mutex::new(SlotState::default())),
        });
        slots.insert(dsn.clone(), Arc::downgrade(&slot));
        Ok(slot)
    }
}

/// One DSN's session and reconnect state.
pub struct Slot {
    settings: DsnSettings,
    /// Held by one check run at a time (across its connect and queries): this is what keeps
    /// connect attempts to one at a time and statements from interleaving. A tokio mutex,
    /// because it is held across `.await`.
    state: Arc<tokio::sync::Mutex<SlotState>>,
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("target", &self.settings.target)
            .finish()
    }
}

#[derive(Default)]
struct SlotState {
    live: Option<Live>,
    backoff: Option<ExponentialBackoff>,
    retry_at: Option<Instant>,
    last_error: Option<PgError>,
    /// The last failure logged, so a repeated one is logged once.
    logged_failure: Option<String>,
    warned_passfile: Option<PathBuf>,
}

struct Live {
    client: Client,
    version_num: i32,
    version: String,
    connect_seconds: f64,
    /// Set while a query is on the wire; still set when a run was dropped mid-query, in
    /// which case the session's state is unknown and it is replaced.
    in_flight: bool,
    /// Statements prepared on this session, by SQL text.
    statements: std::collections::HashMap<String, tokio_postgres::Statement>,
    /// The `statement_timeout` last set on this session (ms).
    statement_timeout_ms: Option<u128>,
}

impl Slot {
    /// The redacted target.
    pub fn target(&self) -> &str {
        &self.settings.target
    }

    /// Takes the session for one check run, connecting first when needed, all before
    /// `deadline`. `statement_timeout` is applied to every statement the run sends.
    ///
    /// # Errors
    /// [`PgError::Busy`] when another check keeps the session past `deadline`,
    /// [`PgError::Connect`] (fresh or cached during the backoff), [`PgError::Version`].
    pub async fn session(
        &self,
        deadline: Instant,
        statement_timeout: StdDuration,
    ) -> Result<Session, PgError> {
        let target = self.settings.target.clone();
        let mut state = timeout_at(deadline, self.state.clone().lock_owned())
            .await
            .map_err(|_| PgError::Busy {
                target: target.clone(),
            })?;
        let reusable = state
            .live
            .as_ref()
            .is_some_and(|l| !l.client.is_closed() && !l.in_flight);
        let mut connected_now = false;
        if !reusable {
            if state.live.take().is_some() {
                debug!(target = %target, "discarding a closed or abandoned session");
            }
            let now = Instant::now();
            if let (Some(at), Some(err)) = (state.retry_at, state.last_error.clone()) {
                if at > now {
                    return Err(match err {
                        PgError::Connect {
                            target,
                            reason,
                            code,
                            ..
                        } => PgError::Connect {
                            target,
                            reason,
                            code,
                            retry_in: Some(at - now),
                        },
                        other => other,
                    });
                }
            }
            match self.connect(&mut state, deadline).await {
                Ok(live) => {
                    if state.logged_failure.take().is_some() {
                        info!(target = %target, "connected to PostgreSQL again");
                    }
                    state.backoff = None;
                    state.retry_at = None;
                    state.last_error = None;
                    state.live = Some(live);
                    connected_now = true;
                }
                Err(e) => {
                    let delay = state
                        .backoff
                        .get_or_insert_with(|| {
                            ExponentialBuilder::default()
                                .with_min_delay(BACKOFF_MIN)
                                .with_max_delay(BACKOFF_MAX)
                                .with_factor(2.0)
                                .with_jitter()
                                .without_max_times()
                                .build()
                        })
                        .next()
                        .unwrap_or(BACKOFF_MAX);
                    state.retry_at = Some(Instant::now() + delay);
                    let text = e.to_string();
                    if state.logged_failure.as_deref() != Some(text.as_str()) {
                        warn!(target = %target, error = %e, retry_in_s = delay.as_secs_f64(), "PostgreSQL connection failed");
                        state.logged_failure = Some(text);
                    } else {
                        debug!(target = %target, error = %e, "PostgreSQL connection still failing");
                    }
                    state.last_error = Some(e.clone());
                    return Err(e);
                }
            }
        }
        let Some(live) = state.live.as_ref() else {
            return Err(PgError::Busy { target });
        };
        if live.version_num < MIN_SERVER_VERSION_NUM {
            return Err(PgError::Version {
                version: live.version.clone(),
            });
        }
        Ok(Session {
            state,
            deadline,
            statement_timeout_ms: statement_timeout.as_millis().max(1),
            target,
            connected_now,
        })
    }

    async fn connect(&self, state: &mut SlotState, deadline: Instant) -> Result<Live, PgError> {
        let s = &self.settings;
        let fail = |reason: String, code: Option<SqlState>| PgError::Connect {
            target: s.target.clone(),
            reason,
            code,
            retry_in: None,
        };
        let mut config = s.config.clone();
        let prep = prepare_secrets(s.clone());
        let prepared = tokio::task::spawn_blocking(prep)
            .await
            .map_err(|e| fail(format!("internal error: {e}"), None))?;
        let (password, tls, passfile_warning) = prepared.map_err(|r| fail(r, None))?;
        if let Some((path, why)) = passfile_warning {
            if state.warned_passfile.as_ref() != Some(&path) {
                warn!(path = %path.display(), "{why}");
                state.warned_passfile = Some(path);
            }
        }
        let has_password = password.is_some();
        if let Some(p) = password {
            config.password(p.expose());
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let budget = match config.get_connect_timeout() {
            Some(t) => remaining.min(*t),
            None => remaining,
        };
        config.connect_timeout(budget);
        let started = Instant::now();
        let attempt = async {
            match tls {
                None => {
                    let (client, conn) = config.connect(NoTls).await?;
                    spawn_connection(conn, s.target.clone());
                    Ok::<_, tokio_postgres::Error>(client)
                }
                Some(tls) => {
                    let (client, conn) = config.connect(tls).await?;
                    spawn_connection(conn, s.target.clone());
                    Ok(client)
                }
            }
        };
        let client = match timeout_at(started + budget, attempt).await {
            Err(_) => {
                return Err(fail(
                    format!("no answer within {:.1}s", budget.as_secs_f64()),
                    None,
                ));
            }
            Ok(Err(e)) => {
                let mut reason = error_chain(&e);
                if !has_password && e.code().is_none() && reason.contains("password missing") {
                    reason
                        .push_str(" (none in the dsn, and no matching line in a usable passfile)");
                }
                return Err(fail(reason, e.code().cloned()));
            }
            Ok(Ok(c)) => c,
        };
        let connect_seconds = started.elapsed().as_secs_f64();
        // Session setup: read-only by default (each check's statements also run in a
        // read-only transaction), and the version once per session.
        let setup = client.simple_query(
            "SET default_transaction_read_only = on; \
             SELECT current_setting('server_version_num'), current_setting('server_version')",
        );
        let msgs = match timeout_at(deadline, setup).await {
            Err(_) => return Err(fail("no answer to the session setup".into(), None)),
            Ok(Err(e)) => return Err(fail(error_chain(&e), e.code().cloned())),
            Ok(Ok(m)) => m,
        };
        let row = msgs.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        });
        let (num, version) = row
            .and_then(|r| Some((r.get(0)?.parse::<i32>().ok()?, r.get(1)?.to_string())))
            .ok_or_else(|| fail("the server did not report its version".into(), None))?;
        debug!(target = %s.target, version = %version, connect_s = connect_seconds, "connected to PostgreSQL");
        Ok(Live {
            client,
            version_num: num,
            version,
            connect_seconds,
            in_flight: false,
            statements: std::collections::HashMap::new(),
            statement_timeout_ms: None,
        })
    }
}

type Prepared = (
    Option<Secret>,
    Option<tokio_postgres_rustls::MakeRustlsConnect>,
    Option<(PathBuf, String)>,
);

/// Reads the passfile and the TLS material (blocking file reads, run on the blocking pool).
fn prepare_secrets(s: DsnSettings) -> impl FnOnce() -> Result<Prepared, String> + Send {
    move || {
        let mut warning = None;
        let password = match &s.password {
            Some(p) => Some(p.clone()),
            None => match passfile_path(s.passfile.as_deref()) {
                Some(path) => match read_passfile(&path) {
                    Ok(Some(text)) => {
                        let (hosts, port) = passfile_host_and_port(&s.config);
                        let names: Vec<&str> = hosts.iter().map(String::as_str).collect();
                        lookup_passfile(&text, &names, &port, &s.dbname, &s.user)
                    }
                    Ok(None) => None,
                    Err(why) => {
                        warning = Some((path, why));
                        None
                    }
                },
                None => None,
            },
        };
        let tls = match &s.tls {
            TlsMode::Plain => None,
            TlsMode::Verify { roots, client } => Some(
                tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(roots, client.as_ref())?),
            ),
        };
        Ok((password, tls, warning))
    }
}

fn passfile_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    match std::env::var_os("PGPASSFILE") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => home_dir().map(|h| h.join(".pgpass")),
    }
}

fn home_dir() -> Option<PathBuf> {
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => Some(PathBuf::from(h)),
        _ => nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.dir),
    }
}

/// `Ok(None)` when there is no passfile; `Err(warning)` when there is one libpq would ignore.
fn read_passfile(path: &Path) -> Result<Option<String>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("password file unreadable, ignored: {e}")),
    };
    if !meta.is_file() {
        return Err("password file is not a regular file, ignored".into());
    }
    if !passfile_mode_ok(meta.permissions().mode()) {
        return Err("password file has group or world access and is ignored; \
                    permissions should be u=rw (0600) or less"
            .into());
    }
    std::fs::read_to_string(path)
        .map(Some)
        .map_err(|e| format!("password file unreadable, ignored: {e}"))
}

/// The names the first host may appear as in a passfile, and its port. libpq matches a
/// socket directory by its path, and `localhost` for the default socket directory.
fn passfile_host_and_port(config: &tokio_postgres::Config) -> (Vec<String>, String) {
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let hosts = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => vec![h.clone()],
        Some(Host::Unix(p)) => {
            let path = p.display().to_string();
            let default = ["/var/run/postgresql", "/run/postgresql", "/tmp"]
                .contains(&path.trim_end_matches('/'));
            let mut v = vec![path];
            if default {
                v.push("localhost".into());
            }
            v
        }
        None => config
            .get_hostaddrs()
            .first()
            .map(|a| vec![a.to_string()])
            .unwrap_or_else(|| vec!["localhost".into()]),
    };
    (hosts, port)
}

fn tls_config(
    roots: &RootSource,
    client: Option<&(PathBuf, PathBuf)>,
) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let mut store = rustls::RootCertStore::empty();
    let load_file = |store: &mut rustls::RootCertStore, p: &Path| -> Result<(), String> {
        let certs = CertificateDer::pem_file_iter(p)
            .map_err(|e| format!("sslrootcert {}: {e}", p.display()))?;
        for c in certs {
            let c = c.map_err(|e| format!("sslrootcert {}: {e}", p.display()))?;
            store
                .add(c)
                .map_err(|e| format!("sslrootcert {}: {e}", p.display()))?;
        }
        Ok(())
    };
    let system = |store: &mut rustls::RootCertStore| {
        let found = rustls_native_certs::load_native_certs();
        store.add_parsable_certificates(found.certs);
    };
    match roots {
        RootSource::File(p) => load_file(&mut store, p)?,
        RootSource::System => system(&mut store),
        RootSource::Default => {
            let libpq_default = home_dir().map(|h| h.join(".postgresql/root.crt"));
            match libpq_default.filter(|p| p.is_file()) {
                Some(p) => load_file(&mut store, &p)?,
                None => system(&mut store),
            }
        }
    }
    if store.is_empty() {
        return Err("no trusted root certificates found (set sslrootcert)".into());
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(store);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("sslcert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("sslkey {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("sslcert/sslkey: {e}"))
        }
    }
}

/// Drives a connection: without this task the client never sends anything (STYLE pitfall
/// 14). It ends when the server closes or every client handle is dropped.
pub fn spawn_connection<S, T>(conn: tokio_postgres::Connection<S, T>, target: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(target = %target, error = %error_chain(&e), "PostgreSQL session ended");
        }
    });
}

/// One check run's use of a shared session.
pub struct Session {
    state: OwnedMutexGuard<SlotState>,
    deadline: Instant,
    statement_timeout_ms: u128,
    target: String,
    connected_now: bool,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// One result row as text, by column name: what the checks' pure parsers read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TextRow {
    /// `(column, value)`; `None` is SQL NULL.
    pub cols: Vec<(String, Option<String>)>,
}

impl TextRow {
    /// A row from literal pairs (tests and fixtures).
    pub fn from_pairs(pairs: &[(&str, Option<&str>)]) -> Self {
        TextRow {
            cols: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
                .collect(),
        }
    }

    /// The column's text, `None` for NULL or a missing column.
    pub fn text(&self, col: &str) -> Option<&str> {
        self.cols
            .iter()
            .find(|(k, _)| k == col)
            .and_then(|(_, v)| v.as_deref())
    }

    /// The column as a number; `None` for NULL; an error for text that is not a number.
    ///
    /// # Errors
    /// A message naming the column.
    pub fn opt_f64(&self, col: &str) -> Result<Option<f64>, String> {
        match self.text(col) {
            None => Ok(None),
            Some(t) => t
                .trim()
                .parse::<f64>()
                .map(Some)
                .map_err(|_| format!("column `{col}` is not a number: {t:?}")),
        }
    }

    /// The column as a number; NULL is an error (a NULL is never read as 0).
    ///
    /// # Errors
    /// A message naming the column.
    pub fn f64(&self, col: &str) -> Result<f64, String> {
        self.opt_f64(col)?
            .ok_or_else(|| format!("column `{col}` is NULL"))
    }

    /// The column as a boolean (`t`/`f`); `None` for NULL.
    pub fn opt_bool(&self, col: &str) -> Option<bool> {
        match self.text(col) {
            Some("t" | "true" | "on") => Some(true),
            Some("f" | "false" | "off") => Some(false),
            _ => None,
        }
    }
}

impl Session {
    /// The server's `server_version`.
    pub fn server_version(&self) -> &str {
        self.state.live.as_ref().map_or("", |l| l.version.as_str())
    }

    /// How long the session's connect took.
    pub fn connect_seconds(&self) -> Option<f64> {
        self.state.live.as_ref().map(|l| l.connect_seconds)
    }

    /// Whether this run opened the session.
    pub fn connected_now(&self) -> bool {
        self.connected_now
    }

    /// The redacted target.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Runs `sql` (one or more statements separated by `;`) and returns the rows of each.
    ///
    /// Each statement is prepared once per session and executed through the extended
    /// protocol: parsing and planning the catalog views every run was most of what a round
    /// of checks cost the server (about 4 ms against 0.9 ms prepared, measured with
    /// `benches/measure-postgres.sh` and pgbench). The session is read-only by default
    /// (`default_transaction_read_only`, set at connect), and its `statement_timeout` is set
    /// to this check's only when it differs from the last one set, so checks with equal
    /// timeouts on one DSN never pay for it. Columns must be of the types
    /// [`text_value`] renders (the SQL casts numerics to `float8`).
    ///
    /// # Errors
    /// [`PgError::Query`] with the server's message, or when no answer came before the
    /// deadline (the session is then discarded).
    pub async fn query(
        &mut self,
        query_name: &'static str,
        sql: &str,
    ) -> Result<Vec<Vec<TextRow>>, PgError> {
        let Some(live) = self.state.live.as_mut() else {
            return Err(PgError::Busy {
                target: self.target.clone(),
            });
        };
        live.in_flight = true;
        let started = Instant::now();
        let timeout_ms = self.statement_timeout_ms;
        let run = async {
            if live.statement_timeout_ms != Some(timeout_ms) {
                live.client
                    .simple_query(&format!("SET statement_timeout = {timeout_ms}"))
                    .await?;
                live.statement_timeout_ms = Some(timeout_ms);
            }
            let mut sets = Vec::new();
            for part in sql.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                let stmt = match live.statements.get(part) {
                    Some(s) => s.clone(),
                    None => {
                        let s = live.client.prepare(part).await?;
                        live.statements.insert(part.to_string(), s.clone());
                        s
                    }
                };
                let rows = live.client.query(&stmt, &[]).await?;
                sets.push(rows.iter().map(text_row).collect::<Result<Vec<_>, _>>()?);
            }
            Ok::<_, tokio_postgres::Error>(sets)
        };
        let res = timeout_at(self.deadline, run).await;
        let fail = |reason: String, code| PgError::Query {
            query_name,
            reason,
            code,
        };
        match res {
            Err(_) => {
                // The session is now in an unknown state (a hung server, or an answer still
                // on its way): replace it on the next run.
                self.state.live = None;
                Err(fail(
                    format!("no answer within {:.1}s", started.elapsed().as_secs_f64()),
                    None,
                ))
            }
            Ok(Err(e)) => {
                live.in_flight = false;
                if e.as_db_error().is_none() {
                    self.state.live = None;
                }
                Err(fail(error_chain(&e), e.code().cloned()))
            }
            Ok(Ok(sets)) => {
                live.in_flight = false;
                Ok(sets)
            }
        }
    }
}

/// Renders a typed row as text, the way the checks read values (`t`/`f` for booleans).
fn text_row(row: &tokio_postgres::Row) -> Result<TextRow, tokio_postgres::Error> {
    let cols = row
        .columns()
        .iter()
        .enumerate()
        .map(|(i, c)| Ok((c.name().to_string(), text_value(row, i, c.type_())?)))
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    Ok(TextRow { cols })
}

/// One column as text. The checks' SQL produces only these types; any other is reported
/// as a query error naming the type rather than guessed at.
fn text_value(
    row: &tokio_postgres::Row,
    i: usize,
    ty: &tokio_postgres::types::Type,
) -> Result<Option<String>, tokio_postgres::Error> {
    use tokio_postgres::types::Type;
    Ok(match *ty {
        Type::BOOL => row
            .try_get::<_, Option<bool>>(i)?
            .map(|b| if b { "t" } else { "f" }.to_string()),
        Type::INT2 => row.try_get::<_, Option<i16>>(i)?.map(|v| v.to_string()),
        Type::INT4 => row.try_get::<_, Option<i32>>(i)?.map(|v| v.to_string()),
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(|v| v.to_string()),
        Type::OID => row.try_get::<_, Option<u32>>(i)?.map(|v| v.to_string()),
        Type::FLOAT4 => row.try_get::<_, Option<f32>>(i)?.map(|v| v.to_string()),
        Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map(|v| v.to_string()),
        // TEXT, VARCHAR, NAME, BPCHAR and anything else that decodes as a string; a type
        // that does not is an error from try_get naming it.
        _ => row.try_get::<_, Option<String>>(i)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_form_parses_quotes_and_escapes() {
        let p = parse_conninfo(r"host=/tmp  port = 5433 password='a b\'c' user=x\ y").unwrap();
        assert_eq!(
            p,
            vec![
                ("host".into(), "/tmp".into()),
                ("port".into(), "5433".into()),
                ("password".into(), "a b'c".into()),
                ("user".into(), "x y".into()),
            ]
        );
        assert!(parse_conninfo("host").is_err());
        let e = parse_conninfo("password='secret").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn url_form_parses_userinfo_hosts_and_params() {
        let p = parse_conninfo(
            "postgresql://vigil:p%40ss@db1:5433,[::1]:5434/postgres?sslmode=require&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            p,
            vec![
                ("user".into(), "vigil".into()),
                ("password".into(), "p@ss".into()),
                ("host".into(), "db1,::1".into()),
                ("port".into(), "5433,5434".into()),
                ("dbname".into(), "postgres".into()),
                ("sslmode".into(), "require".into()),
                ("connect_timeout".into(), "3".into()),
            ]
        );
        let p = parse_conninfo("postgres://%2Fvar%2Frun%2Fpostgresql/db").unwrap();
        assert_eq!(p[0], ("host".into(), "/var/run/postgresql".into()));
    }

    #[test]
    fn settings_take_out_what_tokio_postgres_does_not_know() {
        let s = Dsn::new(
            "host=db.example port=5433 user=vigil password=hunter2 sslmode=verify-full \
             sslrootcert=/etc/ca.pem passfile=/x/.pgpass dbname=postgres",
        )
        .parse()
        .unwrap();
        assert_eq!(s.password, Some(Secret::new("hunter2")));
        assert_eq!(s.passfile, Some(PathBuf::from("/x/.pgpass")));
        assert_eq!(
            s.tls,
            TlsMode::Verify {
                roots: RootSource::File("/etc/ca.pem".into()),
                client: None
            }
        );
        assert_eq!(
            s.target(),
            "host=db.example port=5433 user=vigil dbname=postgres"
        );
        assert_eq!(s.config.get_application_name(), Some("vigil"));
        assert_eq!(s.config.get_password(), None);
    }

    #[test]
    fn unix_sockets_never_use_tls_and_default_host_is_the_socket_dir() {
        let s = Dsn::new("user=vigil sslmode=require").parse().unwrap();
        assert_eq!(s.tls, TlsMode::Plain);
        assert!(s.target().starts_with("host=/var/run/postgresql port=5432"));
        let s = Dsn::new("host=db sslmode=prefer user=v").parse().unwrap();
        assert_eq!(s.tls, TlsMode::Plain);
        assert!(
            Dsn::new("host=/tmp,db sslmode=require user=v")
                .parse()
                .is_err()
        );
    }

    #[test]
    fn unknown_and_unsupported_parameters_are_refused() {
        let e = Dsn::new("host=/tmp usr=x").parse().unwrap_err().to_string();
        assert!(e.contains("unknown connection parameter `usr`"), "{e}");
        let e = Dsn::new("host=/tmp requirepeer=postgres")
            .parse()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not supported"), "{e}");
        let e = Dsn::new("host=/tmp sslmode=sometimes user=v")
            .parse()
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid sslmode"), "{e}");
        let e = Dsn::new("host=/tmp port=notaport password=hunter2 user=v")
            .parse()
            .unwrap_err()
            .to_string();
        assert!(e.contains("port"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn passwords_never_show_in_debug_or_redacted_forms() {
        for raw in [
            "host=/tmp user=vigil password=hunter2",
            "postgresql://vigil:hunter2@db/postgres",
        ] {
            let d = Dsn::new(raw);
            assert!(!format!("{d:?}").contains("hunter2"));
            assert!(!d.redacted().contains("hunter2"));
            assert!(d.redacted().contains("password=***"));
            assert!(d.has_password());
            let s = d.parse().unwrap();
            assert!(!format!("{s:?}").contains("hunter2"), "{s:?}");
        }
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "Secret(***)");
        // A changed password changes the Debug fingerprint (so a reload notices it).
        let a = format!("{:?}", Dsn::new("host=/tmp password=a"));
        let b = format!("{:?}", Dsn::new("host=/tmp password=b"));
        assert_ne!(a, b);
        assert!(!Dsn::new("host=/tmp user=x").has_password());
    }

    #[test]
    fn passfile_lookup_follows_libpq() {
        let text = "# comment\n\
                    db1:5432:*:vigil:first\n\
                    *:*:app:vigil:sec\\:ond\n\
                    /var/run/postgresql:5432:*:other:third\n\
                    localhost:*:*:*:fourth\n\
                    short:line\n";
        let get = |hosts: &[&str], port, db, user| {
            lookup_passfile(text, hosts, port, db, user).map(|s| s.expose().to_string())
        };
        assert_eq!(
            get(&["db1"], "5432", "postgres", "vigil"),
            Some("first".into())
        );
        assert_eq!(
            get(&["db2"], "5433", "app", "vigil"),
            Some("sec:ond".into())
        );
        assert_eq!(
            get(&["/var/run/postgresql", "localhost"], "5432", "x", "other"),
            Some("third".into())
        );
        assert_eq!(
            get(&["/var/run/postgresql", "localhost"], "5432", "x", "nobody"),
            Some("fourth".into())
        );
        assert_eq!(get(&["db9"], "5432", "x", "nobody"), None);
        assert!(passfile_mode_ok(0o100600));
        assert!(passfile_mode_ok(0o100400));
        assert!(!passfile_mode_ok(0o100640));
        assert!(!passfile_mode_ok(0o100604));
    }

    #[test]
    fn passfile_host_names_for_the_default_socket_include_localhost() {
        let s = Dsn::new("host=/var/run/postgresql user=v").parse().unwrap();
        let (hosts, port) = passfile_host_and_port(&s.config);
        assert_eq!(hosts, vec!["/var/run/postgresql", "localhost"]);
        assert_eq!(port, "5432");
        let s = Dsn::new("host=/srv/pg port=6000 user=v").parse().unwrap();
        assert_eq!(passfile_host_and_port(&s.config).0, vec!["/srv/pg"]);
    }

    #[test]
    fn text_rows_never_read_null_as_zero() {
        let r = TextRow::from_pairs(&[("a", Some("1.5")), ("b", None), ("c", Some("t"))]);
        assert_eq!(r.f64("a"), Ok(1.5));
        assert!(r.f64("b").unwrap_err().contains("NULL"));
        assert_eq!(r.opt_f64("b"), Ok(None));
        assert_eq!(r.opt_bool("c"), Some(true));
        assert!(r.f64("missing").is_err());
    }

    #[test]
    fn errors_name_no_secret_and_carry_a_retry_note() {
        let e = PgError::Connect {
            target: "host=/tmp port=5432 user=v dbname=v".into(),
            reason: "connection refused".into(),
            code: None,
            retry_in: Some(StdDuration::from_millis(2500)),
        };
        assert_eq!(
            e.to_string(),
            "cannot connect to host=/tmp port=5432 user=v dbname=v: connection refused \
             (next attempt in 3s)"
        );
        let e = PgError::Version {
            version: "11.22".into(),
        };
        assert_eq!(
            e.to_string(),
            "unsupported server version 11.22 (vigil needs 12 or newer)"
        );
    }
}
