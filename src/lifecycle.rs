//! Host states, the operator's lifecycle and its transition table.
//!
//! The contract's states come from operating a large fleet. The agent derives *health*
//! (`available`, `uncertain`, `unavailable`) from its checks; the operator sets the
//! *lifecycle*; the reported state is the lifecycle unless that is `available`, in which
//! case it is the health. The control plane owns `archived` and `terminated` and adds
//! `uncertain` for silent hosts, so those never come from an agent's lifecycle.
//!
//! The lifecycle is persisted in `state_dir/lifecycle.json` (versioned, written atomically)
//! so an operator's `retiring` survives a restart.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::durable;

/// Every host state of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Being set up.
    Installing,
    /// Serving and healthy.
    Available,
    /// Health not known (an essential check cannot measure, or heartbeats stopped).
    Uncertain,
    /// A tripped check at critical.
    Unavailable,
    /// Being drained.
    Retiring,
    /// Drained.
    Retired,
    /// Kept only as an archive (control plane).
    Archived,
    /// Gone (control plane).
    Terminated,
    /// Being restarted.
    Restart,
    /// Being upgraded.
    Upgrading,
}

impl HostState {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Installing => "installing",
            HostState::Available => "available",
            HostState::Uncertain => "uncertain",
            HostState::Unavailable => "unavailable",
            HostState::Retiring => "retiring",
            HostState::Retired => "retired",
            HostState::Archived => "archived",
            HostState::Terminated => "terminated",
            HostState::Restart => "restart",
            HostState::Upgrading => "upgrading",
        }
    }
}

impl fmt::Display for HostState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The states an operator can set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lifecycle {
    /// Being set up; an image may start here.
    Installing,
    /// In service: the reported state is the derived health.
    Available,
    /// Being upgraded.
    Upgrading,
    /// Being restarted.
    Restart,
    /// Being drained.
    Retiring,
    /// Drained; final.
    Retired,
}

/// Every lifecycle state, in the contract's order.
pub const LIFECYCLES: [Lifecycle; 6] = [
    Lifecycle::Installing,
    Lifecycle::Available,
    Lifecycle::Upgrading,
    Lifecycle::Restart,
    Lifecycle::Retiring,
    Lifecycle::Retired,
];

impl Lifecycle {
    /// The legal next states: the contract's transition table, in one place.
    pub fn legal_next(self) -> &'static [Lifecycle] {
        use Lifecycle::*;
        match self {
            Installing => &[Available, Retiring],
            Available => &[Upgrading, Restart, Retiring],
            Upgrading => &[Available, Restart, Retiring],
            Restart => &[Available, Upgrading],
            Retiring => &[Retired, Available],
            Retired => &[],
        }
    }

    /// Whether `self → to` is legal.
    pub fn can_become(self, to: Lifecycle) -> bool {
        self.legal_next().contains(&to)
    }

    /// The same state as a host state.
    pub fn as_host_state(self) -> HostState {
        match self {
            Lifecycle::Installing => HostState::Installing,
            Lifecycle::Available => HostState::Available,
            Lifecycle::Upgrading => HostState::Upgrading,
            Lifecycle::Restart => HostState::Restart,
            Lifecycle::Retiring => HostState::Retiring,
            Lifecycle::Retired => HostState::Retired,
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        self.as_host_state().as_str()
    }
}

impl fmt::Display for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Lifecycle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        LIFECYCLES
            .iter()
            .copied()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = LIFECYCLES.iter().map(|l| l.as_str()).collect();
                format!(
                    "unknown lifecycle state {s:?}: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// The lifecycle as persisted, with who set it and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleRecord {
    /// On-disk format version.
    pub v: u32,
    /// The state.
    pub state: Lifecycle,
    /// Why it was set.
    pub reason: String,
    /// When it was set (RFC 3339).
    pub changed_at: String,
}

const FORMAT_VERSION: u32 = 1;
const FILE_NAME: &str = "lifecycle.json";

/// A refused lifecycle change.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// Not in the transition table.
    #[error("illegal transition from {from} to {to}; legal: {}", legal_list(*from))]
    Illegal {
        /// Current state.
        from: Lifecycle,
        /// Requested state.
        to: Lifecycle,
    },
    /// Could not persist.
    #[error("persisting lifecycle to {}: {source}", path.display())]
    Persist {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The persisted file is unreadable or from an unknown format.
    #[error("reading {}: {message}", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

fn legal_list(from: Lifecycle) -> String {
    let v: Vec<_> = from.legal_next().iter().map(|l| l.as_str()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Reads the persisted lifecycle, or `initial` (unsaved) when `state_dir` has none.
///
/// # Errors
/// A file that exists but cannot be read or parsed: the agent must not silently put a
/// retired host back into service.
pub fn load(state_dir: &Path, initial: Lifecycle) -> Result<LifecycleRecord, LifecycleError> {
    let path = state_dir.join(FILE_NAME);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let rec: LifecycleRecord =
                serde_json::from_slice(&bytes).map_err(|e| LifecycleError::Load {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            if rec.v > FORMAT_VERSION {
                return Err(LifecycleError::Load {
                    path,
                    message: format!(
                        "format version {} is newer than this agent's {FORMAT_VERSION}",
                        rec.v
                    ),
                });
            }
            Ok(rec)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LifecycleRecord {
            v: FORMAT_VERSION,
            state: initial,
            reason: "initial lifecycle from config".into(),
            changed_at: rfc3339(SystemTime::now()),
        }),
        Err(source) => Err(LifecycleError::Load {
            path,
            message: source.to_string(),
        }),
    }
}

/// Validates `from → to` and persists the new state atomically.
///
/// # Errors
/// [`LifecycleError::Illegal`] outside the table; [`LifecycleError::Persist`] when the
/// file cannot be written (the change is then not made).
pub fn transition(
    state_dir: &Path,
    from: Lifecycle,
    to: Lifecycle,
    reason: &str,
) -> Result<LifecycleRecord, LifecycleError> {
    if !from.can_become(to) {
        return Err(LifecycleError::Illegal { from, to });
    }
    let rec = LifecycleRecord {
        v: FORMAT_VERSION,
        state: to,
        reason: reason.to_string(),
        changed_at: rfc3339(SystemTime::now()),
    };
    let path = state_dir.join(FILE_NAME);
    // Serializing a struct of strings and an enum cannot fail.
    let body = serde_json::to_vec_pretty(&rec).unwrap_or_default();
    durable::write_atomic(&path, &body)
        .map_err(|source| LifecycleError::Persist { path, source })?;
    Ok(rec)
}

/// RFC 3339 UTC with millisecond precision (samples may come several a second).
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract's table, written out independently of `legal_next`.
    const TABLE: &[(&str, &[&str])] = &[
        ("installing", &["available", "retiring"]),
        ("available", &["upgrading", "restart", "retiring"]),
        ("upgrading", &["available", "restart", "retiring"]),
        ("restart", &["available", "upgrading"]),
        ("retiring", &["retired", "available"]),
        ("retired", &[]),
    ];

    #[test]
    fn every_pair_follows_the_contract_table() {
        let dir = tempfile::tempdir().unwrap();
        for from in LIFECYCLES {
            for to in LIFECYCLES {
                let legal = TABLE
                    .iter()
                    .find(|(f, _)| *f == from.as_str())
                    .unwrap()
                    .1
                    .contains(&to.as_str());
                let res = transition(dir.path(), from, to, "test");
                assert_eq!(res.is_ok(), legal, "{from} -> {to}");
                if let Err(LifecycleError::Illegal { .. }) = res {
                    assert!(!legal);
                }
            }
        }
    }

    #[test]
    fn transition_persists_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            load(dir.path(), Lifecycle::Installing).unwrap().state,
            Lifecycle::Installing
        );
        transition(
            dir.path(),
            Lifecycle::Available,
            Lifecycle::Retiring,
            "drain",
        )
        .unwrap();
        let rec = load(dir.path(), Lifecycle::Available).unwrap();
        assert_eq!(rec.state, Lifecycle::Retiring);
        assert_eq!(rec.reason, "drain");
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        assert!(load(dir.path(), Lifecycle::Available).is_err());
    }

    #[test]
    fn names_round_trip() {
        for l in LIFECYCLES {
            assert_eq!(l.as_str().parse::<Lifecycle>(), Ok(l));
        }
        assert!("archived".parse::<Lifecycle>().is_err());
    }
}
