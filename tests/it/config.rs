//! Config files: the shipped ones load; bad ones fail with file, key and line:column.
//!
//! The error messages are the product here, so every bad fixture's full rendered message
//! is snapshotted below: a change of wording shows up in review.

// Test helpers may unwrap freely (STYLE §4.4); clippy only exempts #[test] fns.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::util::{is_root, run, tempdir, vigil};

/// The exit code of an invalid config (EX_CONFIG).
const EX_CONFIG: i32 = 78;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn fixture(name: &str) -> PathBuf {
    repo(&format!("tests/fixtures/config/{name}.toml"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every bad fixture and the exact stderr of `vigil config check -c FILE` (and of
/// `vigil agent -c FILE`), with the fixture's path written `{file}`.
const SNAPSHOTS: &[(&str, &[&str])] = &[
    (
        "bad-unknown-top-level-key",
        &[
            r#"vigil: {file}:2:2: agnet: unknown field `agnet`, expected one of `agent`, `api`, `log`, `automation`, `check`, `remediation`, `heartbeat`"#,
        ],
    ),
    (
        "bad-unknown-check-key",
        &[
            r#"vigil: {file}:4:1: check.disk.root.wran: unknown field `wran`, expected one of `warn`, `crit`, `interval`, `timeout`, `trip_after`, `clear_after`, `remediation`, `enabled`, `essential`, `path`, `expect_writable`, `full_within`"#,
        ],
    ),
    (
        "bad-unknown-kind",
        &[
            r#"vigil: {file}:2:8: check.dsk: unknown field `dsk`, expected one of `disk`, `process`, `system`, `backup`, `postgres`, `command`, `tls`, `kernel`"#,
        ],
    ),
    (
        "bad-duration",
        &[
            r#"vigil: {file}:3:12: agent.interval: invalid duration "10 parsecs": expected a number and a unit (ms, s, m, h, d), e.g. "500ms", "10s", "15m", "2h", "14d""#,
        ],
    ),
    (
        "bad-ratio",
        &[
            r#"vigil: {file}:4:8: check.disk.root.warn: invalid ratio "150%": a percentage must be between 0% and 100%"#,
        ],
    ),
    (
        "bad-ratio-syntax",
        &[
            r#"vigil: {file}:4:11: check.process.postgres.fd_warn: invalid ratio "80": expected a percentage such as "80%""#,
        ],
    ),
    (
        "bad-warn-after-crit",
        &[
            r#"vigil: {file}:5:1: check.disk.root.crit: warn must not be greater than crit (higher is worse for this kind)"#,
        ],
    ),
    (
        "bad-mem-order",
        &[
            r#"vigil: {file}:4:1: check.system.host.mem_crit: `mem_warn` (5%) is below `mem_crit` (10%); less memory available is worse, so warn must be the larger"#,
        ],
    ),
    (
        "bad-duplicate-name",
        &[
            r#"vigil: {file}:5:16: check.process.main: duplicate check name "main" (also a disk check); names are unique across kinds"#,
        ],
    ),
    (
        "bad-unknown-remediation",
        &[
            r#"vigil: {file}:4:1: check.disk.root.remediation: unknown remediation "clean-tmp" (no [remediation.clean-tmp])"#,
        ],
    ),
    (
        "bad-wrong-type",
        &[
            r#"vigil: {file}:3:12: agent.interval: invalid type: integer `10`, expected a duration string such as "10s""#,
        ],
    ),
    (
        "bad-uppercase-name",
        &[
            r#"vigil: {file}:2:13: check.disk.Root: invalid check name "Root": use lowercase letters, digits, '-' and '_'"#,
        ],
    ),
    (
        "bad-name-and-pidfile",
        &[
            r#"vigil: {file}:4:1: check.process.postgres.pidfile: give either `name` or `pidfile`, not both"#,
        ],
    ),
    (
        "bad-process-min-max",
        &[r#"vigil: {file}:5:1: check.process.workers.max: `min` (4) is greater than `max` (2)"#],
    ),
    (
        "bad-trip-after-zero",
        &[r#"vigil: {file}:4:1: check.disk.root.trip_after: must be at least 1"#],
    ),
    (
        "bad-syntax",
        &[r#"vigil: {file}:3:16: agent.interval: invalid basic string, expected `"`"#],
    ),
    (
        "bad-missing-path",
        &[r#"vigil: {file}:2:1: check.disk.root: missing field `path`"#],
    ),
    (
        "bad-allow-network",
        &[
            r#"vigil: {file}:3:9: api.allow: invalid network "10.0.0.0/33": expected an address or CIDR such as "10.0.0.0/8""#,
        ],
    ),
    (
        "bad-heartbeat-http",
        &[
            r#"vigil: {file}:3:1: heartbeat.url: plain http:// is allowed only to a loopback address (127.0.0.0/8, ::1 or localhost), not "control.internal": use https://"#,
        ],
    ),
];

/// The key path each message must name (the syntax error has its own test below).
const KEYS: &[(&str, &str)] = &[
    ("bad-unknown-top-level-key", "agnet"),
    ("bad-unknown-check-key", "check.disk.root.wran"),
    ("bad-unknown-kind", "check.dsk"),
    ("bad-duration", "agent.interval"),
    ("bad-ratio", "check.disk.root.warn"),
    ("bad-ratio-syntax", "check.process.postgres.fd_warn"),
    ("bad-warn-after-crit", "check.disk.root.crit"),
    ("bad-mem-order", "check.system.host.mem_crit"),
    ("bad-duplicate-name", "check.process.main"),
    ("bad-unknown-remediation", "check.disk.root.remediation"),
    ("bad-wrong-type", "agent.interval"),
    ("bad-uppercase-name", "check.disk.Root"),
    ("bad-name-and-pidfile", "check.process.postgres.pidfile"),
    ("bad-process-min-max", "check.process.workers.max"),
    ("bad-trip-after-zero", "check.disk.root.trip_after"),
    ("bad-missing-path", "check.disk.root"),
    ("bad-allow-network", "api.allow"),
    ("bad-heartbeat-http", "heartbeat.url"),
];

fn rendered(out: &Output, file: &Path) -> Vec<String> {
    stderr(out)
        .replace(file.to_str().unwrap(), "{file}")
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn every_bad_fixture_has_a_snapshot_and_the_snapshots_cover_the_contract() {
    let dir = repo("tests/fixtures/config");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("bad-") && n.ends_with(".toml"))
        .map(|n| n.trim_end_matches(".toml").to_string())
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = SNAPSHOTS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(
        on_disk, listed,
        "each tests/fixtures/config/bad-*.toml needs a snapshot, and each snapshot a file"
    );
    assert!(listed.len() >= 12);
}

#[test]
fn bad_configs_exit_78_from_config_check_with_the_snapshotted_message() {
    let mut mismatches = Vec::new();
    for (name, expected) in SNAPSHOTS {
        let file = fixture(name);
        let out = run(&["config", "check", "-c", file.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(EX_CONFIG),
            "{name}: {}",
            stderr(&out)
        );
        assert!(out.stdout.is_empty(), "{name}: nothing on stdout");
        let got = rendered(&out, &file);
        if got != *expected {
            mismatches.push(format!(
                "{name}:\n  expected {expected:#?}\n  got      {got:#?}"
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "config error messages changed:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn bad_configs_exit_78_from_agent_with_the_same_message() {
    for (name, expected) in SNAPSHOTS {
        let file = fixture(name);
        let out = vigil()
            .args(["agent", "-c", file.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(EX_CONFIG),
            "{name}: {}",
            stderr(&out)
        );
        assert_eq!(rendered(&out, &file), *expected, "{name}");
    }
}

#[test]
fn each_message_names_the_file_the_key_path_and_line_column() {
    for (name, key) in KEYS {
        let file = fixture(name);
        let out = run(&["config", "check", "-c", file.to_str().unwrap()]);
        let err = stderr(&out);
        let line = err
            .lines()
            .next()
            .unwrap_or_else(|| panic!("{name}: no message"));
        let rest = line
            .strip_prefix(&format!("vigil: {}:", file.display()))
            .unwrap_or_else(|| panic!("{name}: does not start with the file: {line}"));
        let mut parts = rest.splitn(3, ':');
        let l: usize = parts
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("{name}: no line: {line}"));
        let c: usize = parts
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("{name}: no column: {line}"));
        assert!(
            l >= 2 && c >= 1,
            "{name}: {l}:{c} (line 1 of every fixture is a comment)"
        );
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            l <= text.lines().count(),
            "{name}: line {l} is past the end"
        );
        assert!(
            parts.next().unwrap().starts_with(&format!(" {key}: ")),
            "{name}: does not name {key:?} after line:column: {line}"
        );
    }
}

/// `interval = "10s` (unterminated) is a syntax error on the line of `agent.interval`; the
/// message should name that key like every other config error does.
#[test]
fn a_syntax_error_names_the_key_being_parsed() {
    let file = fixture("bad-syntax");
    let out = run(&["config", "check", "-c", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!("vigil: {}:3:", file.display())),
        "{err}"
    );
    assert!(
        err.contains("agent.interval"),
        "the key is not named: {err}"
    );
}

#[test]
fn the_shipped_configs_pass_config_check() {
    for rel in ["config/dev.toml", "config/vigil.toml"] {
        let path = repo(rel);
        assert!(
            path.exists(),
            "{rel} is missing (the packaged config is part of the contract)"
        );
        let out = run(&["config", "check", "-c", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{rel}: {}", stderr(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(path.to_str().unwrap()),
            "{rel}"
        );
    }
}

#[test]
fn an_empty_config_is_valid() {
    let dir = tempdir();
    let path = dir.path().join("empty.toml");
    std::fs::write(&path, "").unwrap();
    let out = run(&["config", "check", "-c", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    std::fs::write(&path, "# only a comment\n\n").unwrap();
    let out = run(&["config", "check", "-c", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn a_missing_file_exits_78_with_one_line_naming_it() {
    let dir = tempdir();
    let path = dir.path().join("nope.toml");
    for args in [&["config", "check", "-c"][..], &["agent", "-c"]] {
        let out = vigil()
            .args(args)
            .arg(&path)
            .env_remove("VIGIL_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(EX_CONFIG), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(path.to_str().unwrap()), "{args:?}: {err}");
    }
}

#[test]
fn an_unreadable_file_exits_78() {
    if !is_root() {
        eprintln!("skipped: needs root to run vigil as another user");
        return;
    }
    let dir = tempdir();
    // The temp dir is 0700; let `nobody` reach the file but not read it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("secret.toml");
    std::fs::copy(repo("config/dev.toml"), &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    for args in [&["config", "check", "-c"][..], &["agent", "-c"]] {
        let out = vigil()
            .args(args)
            .arg(&path)
            .env_remove("VIGIL_CONFIG")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(EX_CONFIG),
            "{args:?}: {}",
            stderr(&out)
        );
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(path.to_str().unwrap()), "{args:?}: {err}");
    }
}
