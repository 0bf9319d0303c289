//! The heartbeat document (the body the agent POSTs) and the host identity it carries.
//!
//! The body is the contract's JSON object, keys in this order:
//! `v` (1), `host_id`, `seq`, `sent_at` (RFC 3339 UTC), `boot_id`, `agent_version`,
//! `image` (`{"id","version"}`), `kernel`, `labels`, `state`, `lifecycle`, `health`,
//! `checks` (`name`, `kind`, `status`, `tripped`, `value`, `unit`, `message`, in config
//! order), `automation` (`paused`, `reason`, `until`, `escalated`) and `remediations`
//! (at most [`MAX_REMEDIATIONS`] audit records). A receiver validates only `v`,
//! `host_id`, `seq` and `state` and keeps the rest as sent, so the names here are the
//! contract's exactly and nothing is renamed without a new `v`.
//!
//! [`Heartbeat`] borrows the published [`Snapshot`] and serializes straight from it: no
//! intermediate `serde_json::Value`, so building a body is one pass and one buffer. The
//! bytes [`Heartbeat::to_body`] returns are what is spooled, digested and signed; a body
//! is never re-serialized after that, so `sent_at` is the time of the first attempt and a
//! spooled heartbeat tells the receiver how late it is.
//!
//! [`HostIdentity`] is read once at startup from files under roots that are parameters
//! (`/etc` and `/proc` in production, `tests/fixtures/host/` in tests): the host id
//! (`/etc/machine-id` when `[agent].host_id = "auto"`), the boot id, the image from
//! os-release, and the kernel release from `uname(2)`.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use indexmap::IndexMap;
use serde::Serialize;
use serde::ser::Serializer;

use crate::lifecycle::{HostState, Lifecycle, rfc3339};
use crate::state::{CheckView, Snapshot};

/// The document's format version (`v`).
pub const VERSION: u32 = 1;

/// Audit records carried by one heartbeat at most (the contract's limit).
pub const MAX_REMEDIATIONS: usize = 100;

/// A first guess at the body's size, so that serializing rarely grows the buffer: the
/// fixed part is about 450 bytes, a check about 155 (measured with 20 realistic checks).
const BODY_BASE_BYTES: usize = 768;
const BODY_CHECK_BYTES: usize = 192;

/// The `[agent].host_id` value that means "read `/etc/machine-id`".
pub const HOST_ID_AUTO: &str = "auto";

/// Why the host's identity could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// `host_id = "auto"` and the machine id is absent, empty or not yet initialized.
    #[error("host_id = \"auto\" but {} is {problem}; set [agent].host_id", path.display())]
    MachineId {
        /// The machine-id file.
        path: PathBuf,
        /// What is wrong: "missing or empty", or "uninitialized" (first boot not done).
        problem: &'static str,
    },
    /// The machine id exists but cannot be read.
    #[error("host_id = \"auto\" but {} cannot be read; set [agent].host_id", path.display())]
    MachineIdRead {
        /// The machine-id file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The kernel's boot id cannot be read.
    #[error("reading the boot id from {}", path.display())]
    BootId {
        /// The boot_id file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The boot id file is empty.
    #[error("the boot id file {} is empty", path.display())]
    BootIdEmpty {
        /// The boot_id file.
        path: PathBuf,
    },
    /// os-release exists but cannot be read (a missing one is not an error).
    #[error("reading {}", path.display())]
    OsRelease {
        /// The os-release file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// `uname(2)` failed.
    #[error("reading the kernel release (uname)")]
    Uname(#[source] nix::Error),
}

/// Who this host is, as every heartbeat says it. Read once at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    /// `[agent].host_id`, or the machine id when that is `"auto"`.
    pub host_id: String,
    /// The kernel's boot id: changes on every boot, so the receiver can tell a reboot.
    pub boot_id: String,
    /// `IMAGE_ID` of os-release, else `ID` (which os-release(5) defaults to `linux`).
    pub image_id: Option<String>,
    /// `IMAGE_VERSION` when `IMAGE_ID` is set, else `VERSION_ID`.
    pub image_version: Option<String>,
    /// The running kernel's release (`uname -r`).
    pub kernel: String,
}

impl HostIdentity {
    /// Reads the identity. `host_id_setting` is `[agent].host_id`; `etc_root` stands for
    /// `/etc` and `proc_root` for `/proc`. os-release is `<etc_root>/os-release`, else
    /// `<etc_root>/../usr/lib/os-release` (os-release(5)'s fallback), else absent.
    ///
    /// # Errors
    /// [`IdentityError::MachineId`] when the setting is `"auto"` and the machine id is
    /// missing, empty or `uninitialized`; the other variants when a file that exists
    /// cannot be read, or the boot id is missing or empty.
    pub fn read(
        host_id_setting: &str,
        etc_root: &Path,
        proc_root: &Path,
    ) -> Result<Self, IdentityError> {
        let host_id = if host_id_setting == HOST_ID_AUTO {
            read_machine_id(&etc_root.join("machine-id"))?
        } else {
            host_id_setting.to_string()
        };

        let boot_path = proc_root.join("sys/kernel/random/boot_id");
        let boot_id = std::fs::read_to_string(&boot_path)
            .map_err(|source| IdentityError::BootId {
                path: boot_path.clone(),
                source,
            })?
            .trim()
            .to_string();
        if boot_id.is_empty() {
            return Err(IdentityError::BootIdEmpty { path: boot_path });
        }

        let os = read_os_release(etc_root)?;
        let (image_id, image_version) = image_of(&os);

        let uts = nix::sys::utsname::uname().map_err(IdentityError::Uname)?;
        let kernel = uts.release().to_string_lossy().into_owned();

        Ok(HostIdentity {
            host_id,
            boot_id,
            image_id,
            image_version,
            kernel,
        })
    }
}

fn read_machine_id(path: &Path) -> Result<String, IdentityError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(IdentityError::MachineIdRead {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let id = text.trim();
    let problem = match id {
        "" => "missing or empty",
        // systemd writes this into images so that the first boot generates the id
        // (machine-id(5)); using it would give every host of the image the same id.
        "uninitialized" => "\"uninitialized\" (the first boot has not completed)",
        _ => return Ok(id.to_string()),
    };
    Err(IdentityError::MachineId {
        path: path.to_path_buf(),
        problem,
    })
}

/// Reads os-release with os-release(5)'s precedence: `/etc/os-release` if it exists (even
/// if it lacks a key), else `/usr/lib/os-release`, else nothing. (`<etc_root>/os-release`,
/// else `<etc_root>/../usr/lib/os-release`.)
///
/// # Errors
/// [`IdentityError::OsRelease`] when a file that exists cannot be read.
pub fn read_os_release(etc_root: &Path) -> Result<HashMap<String, String>, IdentityError> {
    let usr_lib = etc_root
        .parent()
        .unwrap_or(Path::new("/"))
        .join("usr/lib/os-release");
    for path in [etc_root.join("os-release"), usr_lib] {
        match std::fs::read_to_string(&path) {
            Ok(text) => return Ok(parse_os_release(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(IdentityError::OsRelease { path, source }),
        }
    }
    Ok(HashMap::new())
}

/// The contract's `image`: `IMAGE_ID`/`IMAGE_VERSION`, else `ID`/`VERSION_ID`, taken as
/// pairs so that an image id is never shown with the distribution's version.
pub fn image_of(os: &HashMap<String, String>) -> (Option<String>, Option<String>) {
    let get = |k: &str| os.get(k).filter(|v| !v.is_empty()).cloned();
    match get("IMAGE_ID") {
        Some(id) => (Some(id), get("IMAGE_VERSION")),
        // os-release(5): "If not set, a default of ID=linux may be used."
        None => (
            Some(get("ID").unwrap_or_else(|| "linux".into())),
            get("VERSION_ID"),
        ),
    }
}

/// Parses os-release(5): `KEY=value` lines in shell syntax. Values may be unquoted,
/// `"double"` quoted (where `\` escapes `$`, `"`, `\` and `` ` ``) or `'single'` quoted
/// (literal), or a concatenation of those; outside quotes `\` escapes any character.
/// Lines starting with `#`, blank lines, lines that are not assignments and values with
/// an unterminated quote are skipped; a later assignment wins.
pub fn parse_os_release(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, rest)) = line.split_once('=') else {
            continue;
        };
        let valid_key = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_key {
            continue;
        }
        if let Some(value) = shell_word(rest) {
            out.insert(key.to_string(), value);
        }
    }
    out
}

/// One shell word from the start of `s`; `None` on an unterminated quote. Unquoted
/// whitespace ends the word, and whatever follows it (a trailing comment) is ignored.
fn shell_word(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => break,
            '\'' => loop {
                match chars.next()? {
                    '\'' => break,
                    c => out.push(c),
                }
            },
            '"' => loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => match chars.next()? {
                        c @ ('$' | '"' | '\\' | '`') => out.push(c),
                        // In double quotes a backslash before anything else is literal.
                        c => {
                            out.push('\\');
                            out.push(c);
                        }
                    },
                    c => out.push(c),
                }
            },
            '\\' => {
                if let Some(c) = chars.next() {
                    out.push(c);
                }
            }
            c => out.push(c),
        }
    }
    Some(out)
}

/// The `image` object.
#[derive(Debug, Serialize)]
struct Image<'a> {
    id: Option<&'a str>,
    version: Option<&'a str>,
}

/// The `automation` object: whether remediation is paused, and which remediations are
/// escalated. [`Default`] is the contract's "nothing paused, nothing escalated", which
/// every heartbeat carries until remediation exists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Automation {
    /// Whether automatic remediation is paused.
    pub paused: bool,
    /// Why it was paused.
    pub reason: Option<String>,
    /// When a timed pause ends (RFC 3339).
    pub until: Option<String>,
    /// Names of escalated remediations.
    pub escalated: Vec<String>,
}

/// One heartbeat, borrowing the snapshot and identity it describes.
#[derive(Debug, Serialize)]
pub struct Heartbeat<'a> {
    v: u32,
    host_id: &'a str,
    seq: u64,
    sent_at: String,
    boot_id: &'a str,
    agent_version: &'static str,
    image: Image<'a>,
    kernel: &'a str,
    labels: &'a IndexMap<String, String>,
    state: HostState,
    lifecycle: Lifecycle,
    health: HostState,
    #[serde(serialize_with = "serialize_checks")]
    checks: &'a [Arc<CheckView>],
    automation: Automation,
    remediations: &'a [serde_json::Value],
}

impl<'a> Heartbeat<'a> {
    /// The heartbeat `seq` for `snap`, sent at `sent_at`, with no automation state and no
    /// remediation records (see [`with_automation`](Self::with_automation) and
    /// [`with_remediations`](Self::with_remediations)).
    pub fn new(
        identity: &'a HostIdentity,
        labels: &'a IndexMap<String, String>,
        snap: &'a Snapshot,
        seq: u64,
        sent_at: SystemTime,
    ) -> Self {
        Heartbeat {
            v: VERSION,
            host_id: &identity.host_id,
            seq,
            sent_at: rfc3339(sent_at),
            boot_id: &identity.boot_id,
            agent_version: env!("CARGO_PKG_VERSION"),
            image: Image {
                id: identity.image_id.as_deref(),
                version: identity.image_version.as_deref(),
            },
            kernel: &identity.kernel,
            labels,
            state: snap.state(),
            lifecycle: snap.lifecycle.state,
            health: snap.health(),
            checks: &snap.checks,
            automation: Automation::default(),
            remediations: &[],
        }
    }

    /// Sets the `automation` object.
    pub fn with_automation(mut self, automation: Automation) -> Self {
        self.automation = automation;
        self
    }

    /// Carries the audit records not yet delivered, oldest first; only the first
    /// [`MAX_REMEDIATIONS`] go into this heartbeat (see
    /// [`remediations_carried`](Self::remediations_carried)).
    pub fn with_remediations(mut self, records: &'a [serde_json::Value]) -> Self {
        self.remediations = &records[..records.len().min(MAX_REMEDIATIONS)];
        self
    }

    /// How many audit records this heartbeat carries: once it is delivered, that many of
    /// the oldest undelivered records are.
    pub fn remediations_carried(&self) -> usize {
        self.remediations.len()
    }

    /// The reported state it carries (a change of it triggers a heartbeat at once).
    pub fn state(&self) -> HostState {
        self.state
    }

    /// The JSON body: exactly the bytes to spool, digest and sign.
    pub fn to_body(&self) -> Vec<u8> {
        // Serializing into a Vec cannot hit an I/O error, every map has string keys, and
        // no Serialize impl here returns an error (non-finite floats become null), so
        // serde_json has no failure left to report.
        let mut buf = Vec::with_capacity(BODY_BASE_BYTES + BODY_CHECK_BYTES * self.checks.len());
        serde_json::to_writer(&mut buf, self).expect("a heartbeat always serializes");
        buf
    }
}

/// One entry of `checks`: the contract's seven keys, as `/checks` spells them.
#[derive(Serialize)]
struct CheckEntry<'a> {
    name: &'a str,
    kind: &'a str,
    status: crate::checks::Status,
    tripped: bool,
    value: Option<f64>,
    unit: &'static str,
    message: &'a str,
}

fn serialize_checks<S: Serializer>(checks: &&[Arc<CheckView>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(checks.iter().map(|c| CheckEntry {
        name: &c.name,
        kind: c.kind,
        status: c.status,
        tripped: c.hysteresis.tripped,
        value: c.value,
        unit: c.unit.as_str(),
        message: &c.message,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::{Status, Unit};
    use crate::lifecycle::LifecycleRecord;
    use crate::state::Hysteresis;
    use serde_json::Value;
    use std::time::{Duration, Instant};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/host")
    }

    fn read(variant: &str, host_id: &str) -> Result<HostIdentity, IdentityError> {
        let f = fixtures();
        HostIdentity::read(host_id, &f.join(variant).join("etc"), &f.join("proc"))
    }

    fn os_release(variant: &str) -> HashMap<String, String> {
        let p = fixtures().join(variant).join("etc/os-release");
        parse_os_release(&std::fs::read_to_string(p).unwrap())
    }

    #[test]
    fn image_id_present_wins_over_the_distribution() {
        let id = read("image", "auto").unwrap();
        assert_eq!(id.host_id, "4f1c0b6e2a9d4e7f8a3b5c6d7e8f9012");
        assert_eq!(id.boot_id, "0b7e4d2a-5c1f-4e8b-9a3d-6f2e1c0b9a87");
        assert_eq!(id.image_id.as_deref(), Some("pg-fleet"));
        assert_eq!(id.image_version.as_deref(), Some("2024.11.3"));
        assert!(!id.kernel.is_empty());
    }

    #[test]
    fn without_image_id_the_distribution_id_and_version_are_used() {
        let id = read("distro", "auto").unwrap();
        assert_eq!(id.image_id.as_deref(), Some("debian"));
        assert_eq!(id.image_version.as_deref(), Some("12"));
    }

    #[test]
    fn image_id_without_image_version_does_not_borrow_version_id() {
        let os = parse_os_release("ID=debian\nVERSION_ID=12\nIMAGE_ID=builder\n");
        assert_eq!(image_of(&os), (Some("builder".into()), None));
    }

    #[test]
    fn usr_lib_os_release_is_the_fallback() {
        let id = read("usrlib", "auto").unwrap();
        assert_eq!(id.image_id.as_deref(), Some("fedora"));
        assert_eq!(id.image_version.as_deref(), Some("41"));
    }

    #[test]
    fn no_os_release_at_all_is_id_linux() {
        let id = read("no-machine-id", "db-17").unwrap();
        assert_eq!(id.image_id.as_deref(), Some("linux"));
        assert_eq!(id.image_version, None);
    }

    #[test]
    fn quoting_escapes_and_comments() {
        let os = os_release("quoting");
        let get = |k: &str| os.get(k).map(String::as_str);
        assert_eq!(get("NAME"), Some("Fleet Linux"));
        assert_eq!(get("SINGLE"), Some("it is $literal \\n"));
        assert_eq!(get("ESCAPED"), Some("say \"hi\" for $5 \\ `x`"));
        assert_eq!(get("LITERAL_BACKSLASH"), Some("a\\nb"));
        assert_eq!(get("UNQUOTED_ESCAPE"), Some("a b"));
        assert_eq!(get("CONCAT"), Some("abc def"));
        assert_eq!(get("TRAILING"), Some("value"));
        assert_eq!(get("EMPTY"), Some(""));
        assert_eq!(get("LATER"), Some("second"));
        assert_eq!(get("INDENTED"), Some("yes"));
        assert_eq!(get("COMMENTED"), None, "a commented-out line");
        assert_eq!(get("UNTERMINATED"), None);
        assert_eq!(get("BAD KEY"), None);
        assert_eq!(get("BAD"), None);
        assert_eq!(get("1ST"), None);
    }

    #[test]
    fn a_real_world_debian_file_parses() {
        let os = os_release("distro");
        assert_eq!(os["PRETTY_NAME"], "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(os["HOME_URL"], "https://www.debian.org/");
        assert_eq!(os["VERSION_CODENAME"], "bookworm");
    }

    #[test]
    fn machine_id_missing_empty_or_uninitialized_is_a_clear_error() {
        for variant in ["no-machine-id", "empty-machine-id", "uninitialized"] {
            let err = read(variant, "auto").unwrap_err();
            assert!(
                matches!(err, IdentityError::MachineId { .. }),
                "{variant}: {err:?}"
            );
            let msg = err.to_string();
            let path = fixtures().join(variant).join("etc/machine-id");
            assert!(
                msg.starts_with(&format!("host_id = \"auto\" but {}", path.display())),
                "{msg}"
            );
            assert!(msg.ends_with("; set [agent].host_id"), "{msg}");
        }
        let msg = read("no-machine-id", "auto").unwrap_err().to_string();
        assert!(msg.contains(" is missing or empty; "), "{msg}");
    }

    #[test]
    fn an_explicit_host_id_needs_no_machine_id() {
        let id = read("no-machine-id", "db-eu-1-17").unwrap();
        assert_eq!(id.host_id, "db-eu-1-17");
    }

    #[test]
    fn a_missing_boot_id_is_an_error_naming_the_file() {
        let f = fixtures();
        let err = HostIdentity::read("x", &f.join("image/etc"), &f.join("missing")).unwrap_err();
        assert!(matches!(err, IdentityError::BootId { .. }), "{err:?}");
        assert!(err.to_string().contains("sys/kernel/random/boot_id"));
    }

    fn identity() -> HostIdentity {
        HostIdentity {
            host_id: "4f1c0b6e2a9d4e7f8a3b5c6d7e8f9012".into(),
            boot_id: "0b7e4d2a-5c1f-4e8b-9a3d-6f2e1c0b9a87".into(),
            image_id: Some("pg-fleet".into()),
            image_version: Some("2024.11.3".into()),
            kernel: "6.1.0-28-amd64".into(),
        }
    }

    fn labels() -> IndexMap<String, String> {
        [("cluster", "orders"), ("region", "eu-1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A check sampled once with `status`, tripping at once.
    fn check(name: &str, kind: &'static str, status: Status, value: Option<f64>) -> Arc<CheckView> {
        let mut c = CheckView::pending(
            name,
            kind,
            Unit::Ratio,
            Duration::from_secs(10),
            Duration::from_secs(3),
            false,
            Hysteresis::new(1, 1),
        );
        c.status = status;
        c.hysteresis.observe(status);
        c.value = value;
        c.message = format!("{name} is {}", status.as_str());
        c.sampled_at = Some(SystemTime::now());
        Arc::new(c)
    }

    fn snapshot(checks: Vec<Arc<CheckView>>, lifecycle: Lifecycle) -> Snapshot {
        Snapshot {
            checks,
            lifecycle: LifecycleRecord {
                v: 1,
                state: lifecycle,
                reason: "test".into(),
                changed_at: rfc3339(SystemTime::now()),
            },
            config_error: None,
            first_round_done: true,
        }
    }

    fn body(hb: &Heartbeat) -> Value {
        serde_json::from_slice(&hb.to_body()).unwrap()
    }

    fn keys(v: &Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    const STATES: &[&str] = &[
        "installing",
        "available",
        "uncertain",
        "unavailable",
        "retiring",
        "retired",
        "archived",
        "terminated",
        "restart",
        "upgrading",
    ];

    #[test]
    fn every_contract_key_with_the_right_type() {
        let id = identity();
        let labels = labels();
        let snap = snapshot(
            vec![
                check("root", "disk", Status::Ok, Some(0.42)),
                check(
                    "pg-replication",
                    "postgres.replication",
                    Status::Critical,
                    None,
                ),
            ],
            Lifecycle::Available,
        );
        let hb = Heartbeat::new(&id, &labels, &snap, 42, SystemTime::now());
        let b = body(&hb);
        // serde_json's Map without preserve_order sorts keys; compare as sets.
        let mut got = keys(&b);
        got.sort_unstable();
        let mut want = vec![
            "v",
            "host_id",
            "seq",
            "sent_at",
            "boot_id",
            "agent_version",
            "image",
            "kernel",
            "labels",
            "state",
            "lifecycle",
            "health",
            "checks",
            "automation",
            "remediations",
        ];
        want.sort_unstable();
        assert_eq!(got, want);

        assert_eq!(b["v"], 1);
        assert_eq!(b["host_id"], "4f1c0b6e2a9d4e7f8a3b5c6d7e8f9012");
        assert_eq!(b["seq"].as_u64(), Some(42));
        humantime::parse_rfc3339(b["sent_at"].as_str().unwrap()).unwrap();
        assert!(b["sent_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(b["boot_id"], "0b7e4d2a-5c1f-4e8b-9a3d-6f2e1c0b9a87");
        assert_eq!(b["agent_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(
            b["image"],
            serde_json::json!({"id": "pg-fleet", "version": "2024.11.3"})
        );
        assert_eq!(b["kernel"], "6.1.0-28-amd64");
        assert_eq!(
            b["labels"],
            serde_json::json!({"cluster": "orders", "region": "eu-1"})
        );
        for k in ["state", "lifecycle", "health"] {
            assert!(STATES.contains(&b[k].as_str().unwrap()), "{k}: {}", b[k]);
        }
        assert_eq!(b["state"], "unavailable", "a tripped critical check");
        assert_eq!(b["health"], "unavailable");
        assert_eq!(b["lifecycle"], "available");
        assert_eq!(
            b["automation"],
            serde_json::json!({"paused": false, "reason": null, "until": null, "escalated": []})
        );
        assert_eq!(b["remediations"], serde_json::json!([]));

        let checks = b["checks"].as_array().unwrap();
        assert_eq!(checks.len(), 2);
        for c in checks {
            let mut k = keys(c);
            k.sort_unstable();
            assert_eq!(
                k,
                [
                    "kind", "message", "name", "status", "tripped", "unit", "value"
                ]
            );
            assert!(c["name"].is_string() && c["kind"].is_string() && c["unit"].is_string());
            assert!(c["status"].is_string() && c["message"].is_string());
            assert!(c["tripped"].is_boolean());
            assert!(c["value"].is_number() || c["value"].is_null());
        }
        assert_eq!(
            checks[0],
            serde_json::json!({"name": "root", "kind": "disk", "status": "ok", "tripped": false,
                "value": 0.42, "unit": "ratio", "message": "root is ok"})
        );
        assert_eq!(checks[1]["status"], "critical");
        assert_eq!(checks[1]["tripped"], true);
        assert_eq!(checks[1]["value"], Value::Null);
    }

    #[test]
    fn the_body_keys_come_in_the_contract_order() {
        let (id, labels) = (identity(), labels());
        let snap = snapshot(vec![], Lifecycle::Available);
        let text =
            String::from_utf8(Heartbeat::new(&id, &labels, &snap, 1, SystemTime::now()).to_body())
                .unwrap();
        let order = [
            "\"v\"",
            "\"host_id\"",
            "\"seq\"",
            "\"sent_at\"",
            "\"boot_id\"",
            "\"agent_version\"",
            "\"image\"",
            "\"kernel\"",
            "\"labels\"",
            "\"state\"",
            "\"lifecycle\"",
            "\"health\"",
            "\"checks\"",
            "\"automation\"",
            "\"remediations\"",
        ];
        let at: Vec<usize> = order.iter().map(|k| text.find(k).unwrap()).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
    }

    #[test]
    fn checks_are_listed_in_snapshot_order() {
        let (id, labels) = (identity(), labels());
        let names = ["zeta", "alpha", "mid", "beta"];
        let snap = snapshot(
            names
                .iter()
                .map(|n| check(n, "disk", Status::Ok, Some(0.1)))
                .collect(),
            Lifecycle::Available,
        );
        let b = body(&Heartbeat::new(&id, &labels, &snap, 1, SystemTime::now()));
        let got: Vec<&str> = b["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(got, names);
    }

    #[test]
    fn a_lifecycle_other_than_available_is_the_state() {
        let (id, labels) = (identity(), labels());
        let snap = snapshot(
            vec![check("root", "disk", Status::Critical, Some(0.99))],
            Lifecycle::Upgrading,
        );
        let hb = Heartbeat::new(&id, &labels, &snap, 1, SystemTime::now());
        assert_eq!(hb.state(), HostState::Upgrading);
        let b = body(&hb);
        assert_eq!(b["state"], "upgrading");
        assert_eq!(b["lifecycle"], "upgrading");
        assert_eq!(b["health"], "unavailable");
    }

    #[test]
    fn a_non_finite_value_is_null_not_an_error() {
        let (id, labels) = (identity(), labels());
        let snap = snapshot(
            vec![
                check("a", "disk", Status::Unknown, Some(f64::NAN)),
                check("b", "disk", Status::Ok, Some(f64::INFINITY)),
            ],
            Lifecycle::Available,
        );
        let b = body(&Heartbeat::new(&id, &labels, &snap, 1, SystemTime::now()));
        assert_eq!(b["checks"][0]["value"], Value::Null);
        assert_eq!(b["checks"][1]["value"], Value::Null);
    }

    #[test]
    fn automation_and_at_most_100_remediations_are_carried() {
        let (id, labels) = (identity(), labels());
        let snap = snapshot(vec![], Lifecycle::Available);
        let records: Vec<Value> = (0..150)
            .map(|i| serde_json::json!({"run_id": format!("r{i}"), "event": "queued"}))
            .collect();
        let hb = Heartbeat::new(&id, &labels, &snap, 1, SystemTime::now())
            .with_automation(Automation {
                paused: true,
                reason: Some("maintenance".into()),
                until: Some("2025-01-01T00:00:00Z".into()),
                escalated: vec!["restart-walreceiver".into()],
            })
            .with_remediations(&records);
        assert_eq!(hb.remediations_carried(), MAX_REMEDIATIONS);
        let b = body(&hb);
        assert_eq!(b["automation"]["paused"], true);
        assert_eq!(b["automation"]["escalated"][0], "restart-walreceiver");
        let r = b["remediations"].as_array().unwrap();
        assert_eq!(r.len(), 100);
        assert_eq!(r[0]["run_id"], "r0", "oldest first");
        assert_eq!(r[99]["run_id"], "r99");
    }

    /// Twenty checks with realistic names and messages: the body size the issue asks
    /// about (printed; run with `--nocapture`), far under the receiver's 1 MiB limit.
    #[test]
    fn twenty_checks_body_size() {
        let (id, labels) = (identity(), labels());
        let snap = twenty_check_snapshot();
        let body = Heartbeat::new(&id, &labels, &snap, 123_456, SystemTime::now()).to_body();
        println!("heartbeat body with 20 checks: {} bytes", body.len());
        assert!(body.len() < 8 * 1024, "{} bytes", body.len());

        // A rough cost check in the unoptimized test build; the real number is measured
        // with --release (see the note).
        let start = Instant::now();
        let n = 200;
        for seq in 0..n {
            let b = Heartbeat::new(&id, &labels, &snap, seq, SystemTime::now()).to_body();
            std::hint::black_box(b);
        }
        println!(
            "build + serialize (debug build): {:?} each",
            start.elapsed() / n as u32
        );
    }

    fn twenty_check_snapshot() -> Snapshot {
        let kinds: [(&str, &'static str, &str); 10] = [
            (
                "root",
                "disk",
                "/ 42.0% used (41.9 GiB of 99.8 GiB), inodes 3.1%",
            ),
            (
                "pgdata",
                "disk",
                "/var/lib/postgresql 61.2% used (612 GiB of 1000 GiB)",
            ),
            (
                "postgres",
                "process",
                "1 process named postgres (pid 812), rss 1.2 GiB",
            ),
            (
                "system",
                "system",
                "load 0.41 per core, memory available 62%",
            ),
            ("pg-up", "postgres.up", "SELECT 1 in 0.8 ms; role primary"),
            (
                "pg-replication",
                "postgres.replication",
                "2 standbys, max replay lag 1.1 MiB",
            ),
            (
                "pg-slots",
                "postgres.slots",
                "largest slot retains 12 MiB (standby_1)",
            ),
            (
                "pg-archiving",
                "postgres.archiving",
                "last WAL archived 14 s ago",
            ),
            (
                "pgbackrest",
                "backup.pgbackrest",
                "newest full backup ended 9 h 12 min ago",
            ),
            ("kernel", "kernel", "6.1.0-28-amd64"),
        ];
        let checks = (0..20)
            .map(|i| {
                let (name, kind, msg) = kinds[i % kinds.len()];
                let mut c =
                    (*check(&format!("{name}-{i}"), kind, Status::Ok, Some(0.4213))).clone();
                c.message = msg.into();
                Arc::new(c)
            })
            .collect();
        snapshot(checks, Lifecycle::Available)
    }
}
