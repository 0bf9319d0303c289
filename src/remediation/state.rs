//! What the guardrails remember across restarts: the pause, and per remediation its runs
//! (for the cooldown and the budget), consecutive failures and escalation.
//!
//! Persisted in `state_dir/remediation.json` (`{"v":1, …}`, written atomically through
//! [`crate::durable`]) *before* the decision it records takes effect: a run is counted
//! before the script starts, so an agent that crashes in a loop cannot reset a budget.
//! Times are wall-clock milliseconds since the epoch (they must survive a reboot); a clock
//! stepped backwards makes a cooldown last longer, never shorter.
//!
//! A file that cannot be read or is of a newer version is not silently replaced: the
//! engine starts paused with the reason, and an operator's `resume` writes a fresh one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The format version this agent writes (and the newest it reads).
pub const VERSION: u32 = 1;
/// The file name in `state_dir`.
pub const FILE: &str = "remediation.json";

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    to_ms(SystemTime::now())
}

/// A time as milliseconds since the epoch (0 before it).
pub fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Milliseconds since the epoch as a time.
pub fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The operator's pause.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pause {
    /// Why.
    pub reason: String,
    /// When it was paused.
    pub since_ms: u64,
    /// When it resumes by itself (`--for`).
    pub until_ms: Option<u64>,
}

/// One remediation's memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RemState {
    /// Start times of runs within the budget window (older ones are pruned).
    pub runs_ms: Vec<u64>,
    /// Consecutive failures since the last success.
    pub failures: u32,
    /// Set when escalated: why and when.
    pub escalated: Option<Escalation>,
}

/// A remediation disabled until an operator resumes automation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Escalation {
    /// When.
    pub at_ms: u64,
    /// Why (three failures, or the runner itself failed).
    pub reason: String,
}

impl RemState {
    /// The newest run's start.
    pub fn last_run_ms(&self) -> Option<u64> {
        self.runs_ms.iter().copied().max()
    }

    /// Time left of the cooldown at `now`, if any.
    pub fn cooldown_left(&self, cooldown: Duration, now: u64) -> Option<Duration> {
        let last = self.last_run_ms()?;
        let end = last.saturating_add(u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX));
        (now < end).then(|| Duration::from_millis(end - now))
    }

    /// Runs started within `per` before `now`.
    pub fn runs_within(&self, per: Duration, now: u64) -> usize {
        let per = u64::try_from(per.as_millis()).unwrap_or(u64::MAX);
        self.runs_ms
            .iter()
            .filter(|&&t| now.saturating_sub(t) < per || t > now)
            .count()
    }

    /// When the oldest run in the window leaves it (the budget frees up).
    pub fn budget_frees_at(&self, per: Duration, now: u64) -> Option<u64> {
        let per_ms = u64::try_from(per.as_millis()).unwrap_or(u64::MAX);
        self.runs_ms
            .iter()
            .filter(|&&t| now.saturating_sub(t) < per_ms || t > now)
            .min()
            .map(|t| t.saturating_add(per_ms))
    }

    /// Drops runs older than `keep` (the longest window still needed).
    pub fn prune(&mut self, keep: Duration, now: u64) {
        let keep = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
        self.runs_ms
            .retain(|&t| now.saturating_sub(t) < keep || t > now);
    }
}

/// Everything persisted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    /// Format version.
    pub v: u32,
    /// The pause, if paused.
    pub pause: Option<Pause>,
    /// Per remediation name.
    pub remediations: BTreeMap<String, RemState>,
}

impl Persisted {
    /// The pause in force at `now` (an expired timed pause is none).
    pub fn pause_at(&self, now: u64) -> Option<&Pause> {
        self.pause
            .as_ref()
            .filter(|p| p.until_ms.is_none_or(|u| now < u))
    }

    /// Names of escalated remediations, sorted.
    pub fn escalated(&self) -> Vec<String> {
        self.remediations
            .iter()
            .filter(|(_, r)| r.escalated.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// The persisted state and where it lives.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    /// The current value (what is on disk once [`save`](Self::save) returned).
    pub data: Persisted,
}

impl Store {
    /// Loads `state_dir/remediation.json`. A file that exists but cannot be used gives a
    /// fallback that is paused with the reason, and the problem's text.
    pub fn load(state_dir: &Path) -> (Store, Option<String>) {
        let path = state_dir.join(FILE);
        let fresh = |data| Store {
            path: path.clone(),
            data,
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return (
                    fresh(Persisted {
                        v: VERSION,
                        ..Persisted::default()
                    }),
                    None,
                );
            }
            Err(e) => return unusable(fresh, format!("{}: {e}", path.display())),
        };
        let problem = match serde_json::from_slice::<Persisted>(&bytes) {
            Ok(p) if p.v <= VERSION => return (fresh(p), None),
            Ok(p) => format!(
                "{} has format version {}, newer than this agent's {VERSION}",
                path.display(),
                p.v
            ),
            Err(e) => format!("{}: {e}", path.display()),
        };
        unusable(fresh, problem)
    }

    /// Writes the current value durably.
    ///
    /// # Errors
    /// The write failed; the file keeps its previous value.
    pub fn save(&mut self) -> std::io::Result<()> {
        self.data.v = VERSION;
        let body = serde_json::to_vec_pretty(&self.data).map_err(std::io::Error::other)?;
        crate::durable::write_atomic(&self.path, &body)
    }

    /// One remediation's memory (created empty).
    pub fn rem(&mut self, name: &str) -> &mut RemState {
        self.data.remediations.entry(name.to_string()).or_default()
    }
}

fn unusable(fresh: impl Fn(Persisted) -> Store, problem: String) -> (Store, Option<String>) {
    // Fail safe: with the budgets unknown, nothing runs until an operator looks.
    let data = Persisted {
        v: VERSION,
        pause: Some(Pause {
            reason: format!("remediation state unreadable ({problem}); resume to start afresh"),
            since_ms: now_ms(),
            until_ms: None,
        }),
        remediations: BTreeMap::new(),
    };
    (fresh(data), Some(problem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cooldown_and_budget_arithmetic() {
        let r = RemState {
            runs_ms: vec![1_000, 5_000],
            ..RemState::default()
        };
        let s = Duration::from_secs;
        assert_eq!(
            r.cooldown_left(s(10), 6_000),
            Some(Duration::from_millis(9_000))
        );
        assert_eq!(r.cooldown_left(s(10), 15_000), None);
        assert_eq!(r.runs_within(s(10), 6_000), 2);
        assert_eq!(r.runs_within(s(10), 12_000), 1);
        assert_eq!(r.budget_frees_at(s(10), 6_000), Some(11_000));
        // A clock stepped back: the run is "in the future" and still counts.
        assert_eq!(r.runs_within(s(1), 500), 2);
        assert!(r.cooldown_left(s(1), 500).is_some());
    }

    #[test]
    fn round_trips_and_refuses_a_newer_version_by_pausing() {
        let d = tempfile::tempdir().unwrap();
        let (mut st, problem) = Store::load(d.path());
        assert_eq!(problem, None);
        st.rem("fix").runs_ms.push(42);
        st.rem("fix").failures = 2;
        st.data.pause = Some(Pause {
            reason: "x".into(),
            since_ms: 1,
            until_ms: Some(10),
        });
        st.save().unwrap();
        let back = Store::load(d.path()).0;
        assert_eq!(back.data, st.data);
        assert!(back.data.pause_at(5).is_some());
        assert!(back.data.pause_at(10).is_none(), "a timed pause expires");

        std::fs::write(
            d.path().join(FILE),
            br#"{"v":99,"pause":null,"remediations":{}}"#,
        )
        .unwrap();
        let (fallback, why) = Store::load(d.path());
        let why = why.unwrap();
        assert!(why.contains("newer"), "{why}");
        assert!(fallback.data.pause.is_some());
        std::fs::write(d.path().join(FILE), b"{not json").unwrap();
        assert!(Store::load(d.path()).1.is_some());
    }
}
