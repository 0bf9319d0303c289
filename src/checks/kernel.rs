//! `kernel`: the running kernel release against known-vulnerable builds.
//!
//! After a kernel privilege escalation is announced, a fleet must show within minutes that
//! no host runs an affected build. The release is read from `/proc/sys/kernel/osrelease`
//! (what `uname -r` prints; under the context's `proc_root`, so tests inject it) and held
//! against:
//! - `deny = ["GLOB", …]`: shell globs on the whole release (`6.1.0-9-*`, `5.15.0-91-*`);
//!   the first that matches makes the check critical and is named in the message;
//! - `min_release = "6.1.0-10"`: a release that compares lower is critical. The comparison
//!   is [`compare_versions`]: runs of digits compare as numbers (`6.9` < `6.18`,
//!   `6.1.0-9` < `6.1.0-10`), other runs as text, and a release that extends another
//!   (`6.1.0-10-amd64` against `6.1.0-10`) is the greater, so a flavour suffix passes.
//!   A pre-release tag is not special: `6.9.0-rc1` counts as greater than `6.9.0`.
//!
//! The release is the message (with the rule, when one trips); the value is 0 (allowed)
//! or 1 (denied). Info metrics, always 1: `vigil_kernel_info{release}` and
//! `vigil_image_info{id, version}` (os-release `IMAGE_ID`/`IMAGE_VERSION`, else
//! `ID`/`VERSION_ID`, as every heartbeat carries them), so a dashboard can answer "which
//! hosts run kernel X / image Y" from Prometheus as the control plane does from heartbeats.
//! An os-release that cannot be read costs the image metric, not the check.
//!
//! `warn` and `crit` are refused: the rules decide.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use crate::checks::{Check, CheckContext, CheckError, Common, Metric, Observation, Status};
use crate::config::types::Number;
use crate::heartbeat::document::{image_of, read_os_release};

crate::check_config! {
    /// `[check.kernel.NAME]`: the running kernel release against `deny` and `min_release`.
    pub struct KernelConfig: Number {
        /// Globs of denied releases.
        #[serde(default)]
        pub deny: Vec<String>,
        /// The least release allowed (compared as a version).
        #[serde(default)]
        pub min_release: Option<String>,
    }
}

impl KernelConfig {
    /// Every `deny` entry must be a valid glob; `min_release` must not be empty;
    /// `warn`/`crit` are refused.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        for g in &self.deny {
            if let Err(e) = glob::Pattern::new(g) {
                problems.push(("deny", format!("invalid glob {g:?}: {e}")));
            } else if g.trim().is_empty() {
                problems.push(("deny", "an empty glob matches nothing".to_string()));
            }
        }
        if self
            .min_release
            .as_deref()
            .is_some_and(|m| m.trim().is_empty())
        {
            problems.push(("min_release", "must not be empty".to_string()));
        }
        for (key, set) in [("warn", self.warn.is_some()), ("crit", self.crit.is_some())] {
            if set {
                problems.push((
                    key,
                    "a kernel check is critical when `deny` or `min_release` says so; it has \
                     no thresholds"
                        .to_string(),
                ));
            }
        }
        problems
    }
}

/// The rules, compiled.
#[derive(Debug, Clone)]
pub struct KernelPolicy {
    /// `(glob as written, compiled)`.
    deny: Vec<(String, glob::Pattern)>,
    min_release: Option<String>,
}

impl KernelPolicy {
    /// Compiles the rules; a glob that does not compile (refused by validation) is dropped.
    pub fn new(deny: &[String], min_release: Option<&str>) -> Self {
        KernelPolicy {
            deny: deny
                .iter()
                .filter_map(|g| glob::Pattern::new(g).ok().map(|p| (g.clone(), p)))
                .collect(),
            min_release: min_release.map(|m| m.trim().to_string()),
        }
    }

    /// The first rule `release` breaks, as a message fragment; `None` when allowed.
    pub fn violation(&self, release: &str) -> Option<String> {
        if let Some((g, _)) = self.deny.iter().find(|(_, p)| p.matches(release)) {
            return Some(format!("denied by {g:?}"));
        }
        match &self.min_release {
            Some(min) if compare_versions(release, min) == Ordering::Less => {
                Some(format!("older than min_release {min:?}"))
            }
            _ => None,
        }
    }
}

/// A running `kernel` check.
pub struct KernelCheck {
    policy: KernelPolicy,
    /// Stands for `/etc` (os-release).
    etc_root: PathBuf,
}

impl KernelCheck {
    /// Builds the check.
    pub fn from_config(c: &KernelConfig, _common: &Common) -> Self {
        KernelCheck {
            policy: KernelPolicy::new(&c.deny, c.min_release.as_deref()),
            etc_root: PathBuf::from("/etc"),
        }
    }

    /// The same check reading os-release under `etc_root` (tests).
    pub fn with_etc_root(mut self, etc_root: impl Into<PathBuf>) -> Self {
        self.etc_root = etc_root.into();
        self
    }
}

impl Check for KernelCheck {
    async fn run(&mut self, cx: &CheckContext) -> Result<Observation, CheckError> {
        // Two small procfs/etc reads: cheap enough for the async thread, and procfs does
        // not hang the way a network mount can.
        let path = cx.proc_root.join("sys/kernel/osrelease");
        let release = std::fs::read_to_string(&path)
            .map_err(|e| CheckError::io(format!("reading {}", path.display()), e))?;
        let release = release.trim();
        if release.is_empty() {
            return Err(CheckError::Parse(format!("{} is empty", path.display())));
        }
        let image = read_image(&self.etc_root);
        Ok(evaluate(release, &self.policy, image))
    }
}

/// `(id, version)` of the image, or `None` when os-release cannot be read.
fn read_image(etc_root: &Path) -> Option<(String, String)> {
    let os = read_os_release(etc_root).ok()?;
    let (id, version) = image_of(&os);
    Some((id.unwrap_or_default(), version.unwrap_or_default()))
}

/// Judges `release` (pure, for tests).
pub fn evaluate(
    release: &str,
    policy: &KernelPolicy,
    image: Option<(String, String)>,
) -> Observation {
    let violation = policy.violation(release);
    let (status, message) = match &violation {
        Some(why) => (Status::Critical, format!("kernel {release} is {why}")),
        None => (Status::Ok, format!("kernel {release}")),
    };
    let mut metrics = vec![
        Metric::gauge(
            "vigil_kernel_info",
            "The running kernel release (uname -r); always 1",
            1.0,
        )
        .label("release", release),
    ];
    if let Some((id, version)) = image {
        metrics.push(
            Metric::gauge(
                "vigil_image_info",
                "The host image (os-release IMAGE_ID/IMAGE_VERSION, else ID/VERSION_ID); always 1",
                1.0,
            )
            .label("id", id)
            .label("version", version),
        );
    }
    Observation {
        status,
        value: Some(if violation.is_some() { 1.0 } else { 0.0 }),
        message,
        metrics,
        replication: None,
    }
}

/// Compares two release strings as versions: each is split into runs of ASCII digits and
/// runs of anything else; runs are compared in turn, digits as numbers (any length, no
/// overflow), other runs byte-wise, a digit run before a non-digit run. When one runs out
/// first, it is the lesser (`6.1` < `6.1.0`).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (runs(a), runs(b));
    loop {
        match (x.next(), y.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(p), Some(q)) => {
                let by = match (is_digits(p), is_digits(q)) {
                    (true, true) => compare_numbers(p, q),
                    (true, false) => Ordering::Less,
                    (false, true) => Ordering::Greater,
                    (false, false) => p.cmp(q),
                };
                if by != Ordering::Equal {
                    return by;
                }
            }
        }
    }
}

fn is_digits(s: &str) -> bool {
    s.as_bytes().first().is_some_and(u8::is_ascii_digit)
}

/// Two digit runs as numbers: leading zeros dropped, then the longer is larger, then
/// byte-wise (so `18446744073709551616` needs no u64).
fn compare_numbers(p: &str, q: &str) -> Ordering {
    let (p, q) = (p.trim_start_matches('0'), q.trim_start_matches('0'));
    p.len().cmp(&q.len()).then_with(|| p.cmp(q))
}

/// The maximal runs of ASCII digits and of other characters of `s`.
fn runs(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = s;
    std::iter::from_fn(move || {
        let first = rest.as_bytes().first()?;
        let digit = first.is_ascii_digit();
        let end = rest
            .find(|c: char| c.is_ascii_digit() != digit)
            .unwrap_or(rest.len());
        let (run, tail) = rest.split_at(end);
        rest = tail;
        Some(run)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::{Equal, Greater, Less};
    use proptest::prelude::*;

    #[test]
    fn versions_compare_numerically_by_run() {
        for (a, b, want) in [
            ("6.1.0-9", "6.1.0-10", Less),
            ("6.9", "6.18", Less),
            ("6.1.0-10-amd64", "6.1.0-10", Greater),
            ("6.1.0-28-amd64", "6.1.0-10", Greater),
            ("5.15.0-91-generic", "6.1", Less),
            ("6.1", "6.1.0", Less),
            ("6.01", "6.1", Equal),
            (
                "5.14.0-362.8.1.el9_3.x86_64",
                "5.14.0-362.13.1.el9_3.x86_64",
                Less,
            ),
            ("6.9.0-rc1", "6.9.0", Greater),
            ("99999999999999999999999", "100000000000000000000000", Less),
            ("", "", Equal),
            ("", "1", Less),
            ("a", "1", Greater),
        ] {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn deny_globs_win_and_are_named() {
        let p = KernelPolicy::new(
            &["6.1.0-9-*".into(), "5.15.0-91-generic".into()],
            Some("6.1.0-10"),
        );
        let o = evaluate("6.1.0-9-amd64", &p, None);
        assert_eq!((o.status, o.value), (Status::Critical, Some(1.0)));
        assert_eq!(o.message, "kernel 6.1.0-9-amd64 is denied by \"6.1.0-9-*\"");
        let o = evaluate("5.15.0-91-generic", &p, None);
        assert!(
            o.message.ends_with("denied by \"5.15.0-91-generic\""),
            "{}",
            o.message
        );
        // Globs match the whole release.
        assert_eq!(p.violation("16.1.0-9-amd64"), None);
        let o = evaluate("6.1.0-8-cloud-amd64", &p, None);
        assert_eq!(o.status, Status::Critical);
        assert_eq!(
            o.message,
            "kernel 6.1.0-8-cloud-amd64 is older than min_release \"6.1.0-10\""
        );
        let o = evaluate("6.1.0-28-amd64", &p, Some(("debian".into(), "12".into())));
        assert_eq!((o.status, o.value), (Status::Ok, Some(0.0)));
        assert_eq!(o.message, "kernel 6.1.0-28-amd64");
        let labels: Vec<_> = o
            .metrics
            .iter()
            .map(|m| (m.name, m.labels.clone()))
            .collect();
        assert_eq!(
            labels,
            [
                (
                    "vigil_kernel_info",
                    vec![("release", "6.1.0-28-amd64".to_string())]
                ),
                (
                    "vigil_image_info",
                    vec![("id", "debian".to_string()), ("version", "12".to_string())]
                ),
            ]
        );
    }

    #[test]
    fn no_rules_allow_everything() {
        let o = evaluate("4.19.0-1", &KernelPolicy::new(&[], None), None);
        assert_eq!(o.status, Status::Ok);
        assert_eq!(o.metrics.len(), 1);
    }

    #[test]
    fn config_is_validated() {
        let c = |t: &str| -> Vec<&'static str> {
            toml::from_str::<KernelConfig>(t)
                .unwrap()
                .validate(true)
                .iter()
                .map(|p| p.0)
                .collect()
        };
        assert!(c("deny = [\"6.1.0-9-*\"]\nmin_release = \"6.1\"").is_empty());
        assert_eq!(c("deny = [\"6.1.[\"]"), ["deny"]);
        assert_eq!(c("deny = [\"\"]"), ["deny"]);
        assert_eq!(c("min_release = \" \""), ["min_release"]);
        assert_eq!(c("warn = 1"), ["warn"]);
    }

    #[tokio::test]
    async fn reads_the_release_and_image_from_injected_roots() {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        std::fs::create_dir_all(proc_root.join("sys/kernel")).unwrap();
        std::fs::write(proc_root.join("sys/kernel/osrelease"), "6.1.0-9-amd64\n").unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("os-release"),
            "ID=debian\nVERSION_ID=\"12\"\nIMAGE_ID=pg-fleet\nIMAGE_VERSION=2024.06.1\n",
        )
        .unwrap();
        let cfg: KernelConfig = toml::from_str("min_release = \"6.1.0-10\"").unwrap();
        let mut check = KernelCheck::from_config(&cfg, &Common::default()).with_etc_root(&etc);
        let cx = CheckContext {
            proc_root: proc_root.clone(),
            ..CheckContext::host()
        };
        let o = check.run(&cx).await.unwrap();
        assert_eq!(o.status, Status::Critical);
        assert_eq!(
            o.metrics[1].labels,
            [
                ("id", "pg-fleet".to_string()),
                ("version", "2024.06.1".to_string())
            ]
        );
        std::fs::remove_file(proc_root.join("sys/kernel/osrelease")).unwrap();
        let e = check.run(&cx).await.unwrap_err();
        assert!(e.to_string().contains("sys/kernel/osrelease"), "{e}");
    }

    proptest! {
        #[test]
        fn comparison_is_a_total_order(a in "[0-9a-z.-]{0,12}", b in "[0-9a-z.-]{0,12}", c in "[0-9a-z.-]{0,12}") {
            prop_assert_eq!(compare_versions(&a, &b), compare_versions(&b, &a).reverse());
            if compare_versions(&a, &b) != Greater && compare_versions(&b, &c) != Greater {
                prop_assert_ne!(compare_versions(&a, &c), Greater);
            }
        }

        #[test]
        fn numbers_compare_as_numbers(x in 0u64..1_000_000, y in 0u64..1_000_000) {
            prop_assert_eq!(compare_versions(&format!("6.1.0-{x}"), &format!("6.1.0-{y}")), x.cmp(&y));
        }
    }
}
