//! `backup.pgbackrest` end to end: real pgBackRest (Debian's `pgbackrest` package, see
//! `.ci/deps`) backing up a real PostgreSQL 15 primary from `pgcluster` into a posix
//! repository in a temp dir, judged by `vigil check --json` (one-shot, the same code path
//! as the agent's scheduler).
//!
//! One cluster and one stanza serve the whole scenario, in order: no backup yet
//! (critical), a full backup (ok, an age of seconds), `crit` below the age (critical), an
//! incremental backup (the age drops for an any-type check, not for a `type = "full"`
//! one), the same checks' metrics on a running agent's `/metrics` (promtool-clean), the
//! repository removed (critical with pgBackRest's message). The cluster's
//! `archive_command` is `pgbackrest archive-push`, so the backups are real ones, with
//! their WAL archived and checked by pgBackRest.
//!
//! Bad tools (hanging, flooding, failing, printing garbage, missing) need no cluster and
//! are a separate test.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::pgcluster::{Cluster, ClusterOptions, Node};
use crate::util::{Agent, TestConfig, is_root, poll, run, tempdir, write_config};

/// The OS user PostgreSQL (and so pgBackRest) runs as: what `pgcluster` picks when the
/// tests run as root; `None` (ourselves) otherwise.
fn pg_os_user() -> Option<nix::unistd::User> {
    if !is_root() {
        return None;
    }
    ["postgres", "nobody"]
        .iter()
        .find_map(|name| nix::unistd::User::from_name(name).ok().flatten())
}

/// A pgBackRest setup for one cluster: config, repository, log and lock dirs under a
/// temp dir in /tmp that the PostgreSQL user owns (it must traverse every parent, which
/// the target dir may not allow).
struct Pgbr {
    dir: tempfile::TempDir,
    user: Option<nix::unistd::User>,
}

impl Pgbr {
    fn new() -> Pgbr {
        let dir = tempfile::Builder::new()
            .prefix("vigil-pgbr-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let pgbr = Pgbr {
            dir,
            user: pg_os_user(),
        };
        pgbr.own(pgbr.dir.path());
        pgbr
    }

    fn own(&self, path: &Path) {
        if let Some(u) = &self.user {
            nix::unistd::chown(path, Some(u.uid), Some(u.gid)).unwrap();
        }
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("pgbackrest.conf")
    }

    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// The `archive_command` that pushes WAL into this repository.
    fn archive_command(&self) -> String {
        format!(
            "pgbackrest --config={} --stanza=main archive-push %p",
            self.conf().display()
        )
    }

    /// Writes the config for the cluster's primary (its port is known only once started;
    /// until then an archive-push fails and PostgreSQL retries it).
    fn configure(&self, c: &Cluster) {
        for d in ["repo", "log", "lock"] {
            let p = self.dir.path().join(d);
            std::fs::create_dir(&p).unwrap();
            self.own(&p);
        }
        let d = self.dir.path().display();
        let conf = format!(
            "[global]\n\
             repo1-path={d}/repo\n\
             log-path={d}/log\n\
             lock-path={d}/lock\n\
             start-fast=y\n\
             # Keeps every full backup without the warning an unset retention prints.\n\
             repo1-retention-full=9999\n\
             log-level-console=warn\n\
             archive-timeout=30\n\
             \n\
             [main]\n\
             pg1-path={data}\n\
             pg1-port={port}\n\
             pg1-socket-path={sock}\n\
             pg1-user=postgres\n",
            data = c.data_dir(Node::Primary).display(),
            port = c.primary_port(),
            sock = c.primary_socket_dir().display(),
        );
        std::fs::write(self.conf(), conf).unwrap();
        std::fs::set_permissions(self.conf(), std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    /// Runs `pgbackrest --config=CONF --stanza=main ARGS…` as the PostgreSQL user;
    /// panics with its output on failure.
    fn run(&self, args: &[&str]) {
        let mut cmd = Command::new("pgbackrest");
        cmd.arg(format!("--config={}", self.conf().display()))
            .arg("--stanza=main")
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        if let Some(u) = &self.user {
            cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        }
        let started = Instant::now();
        let out = cmd.output().expect("run pgbackrest (install it: .ci/deps)");
        assert!(
            out.status.success(),
            "pgbackrest {args:?} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("pgbackrest {args:?} took {:?}", started.elapsed());
    }
}

/// `[check.backup.pgbackrest.NAME]` on stanza `main` of `pgbr`, with `extra` keys.
fn pgbr_check(pgbr: &Pgbr, name: &str, extra: &str) -> String {
    let run_as = pgbr
        .user
        .as_ref()
        .map(|u| format!("run_as = {:?}\n", u.name))
        .unwrap_or_default();
    format!(
        "[check.backup.pgbackrest.{name}]\nstanza = \"main\"\nconfig = {:?}\n{run_as}{extra}\n",
        pgbr.conf().display().to_string()
    )
}

/// Runs `vigil check --json -c CFG` once; returns the checks by name and the exit code.
fn check_once(cfg: &TestConfig) -> (Vec<Value>, i32) {
    let out = run(&["check", "--json", "-c", cfg.path.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        v.as_array().unwrap().clone(),
        out.status.code().unwrap_or(-1),
    )
}

/// The check called `name` in a `check_once` answer.
fn named<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {checks:?}"))
}

fn status(c: &Value) -> &str {
    c["status"].as_str().unwrap()
}

fn message(c: &Value) -> &str {
    c["message"].as_str().unwrap()
}

fn value(c: &Value) -> f64 {
    c["value"]
        .as_f64()
        .unwrap_or_else(|| panic!("no value: {c}"))
}

#[test]
fn real_backups_drive_the_age_and_the_status() {
    let started = Instant::now();
    let pgbr = Pgbr::new();
    let c = Cluster::start(ClusterOptions {
        standby: false,
        archive_command: Some(pgbr.archive_command()),
        ..ClusterOptions::default()
    });
    pgbr.configure(&c);
    pgbr.run(&["stanza-create"]);

    let dir = tempdir();
    let cfg = write_config(
        dir.path(),
        &[
            pgbr_check(&pgbr, "any", ""),
            pgbr_check(&pgbr, "full", "type = \"full\""),
            pgbr_check(&pgbr, "incr", "type = \"incr\""),
        ]
        .concat(),
    );

    // A stanza with no backup is critical, with no value (never ok, never 0).
    let (checks, code) = check_once(&cfg);
    assert_eq!(code, 2, "{checks:?}");
    for name in ["any", "full", "incr"] {
        let ch = named(&checks, name);
        assert_eq!(status(ch), "critical", "{ch}");
        assert!(ch["value"].is_null(), "{ch}");
    }
    assert!(
        message(named(&checks, "any")).starts_with("no backup found for stanza 'main'"),
        "{checks:?}"
    );

    // A real full backup: ok, an age of seconds, the WAL archive named.
    pgbr.run(&["backup", "--type=full"]);
    let (checks, _) = check_once(&cfg);
    let any = named(&checks, "any");
    assert_eq!(status(any), "ok", "{any}");
    assert!((0.0..60.0).contains(&value(any)), "{any}");
    assert!(message(any).starts_with("full backup "), "{any}");
    assert!(message(any).contains("WAL archive 0000000"), "{any}");
    assert_eq!(status(named(&checks, "full")), "ok");
    assert_eq!(status(named(&checks, "incr")), "critical");
    assert!(
        message(named(&checks, "incr")).starts_with("no incr backup found for stanza 'main'"),
        "{checks:?}"
    );

    // crit below the age: critical once more than a second has passed.
    let strict_dir = tempdir();
    let strict = write_config(
        strict_dir.path(),
        &pgbr_check(&pgbr, "strict", "crit = \"1s\""),
    );
    let (checks, code) = poll(Duration::from_secs(15), "the age to pass crit = 1s", || {
        let (checks, code) = check_once(&strict);
        (status(&checks[0]) == "critical").then_some((checks, code))
    });
    assert_eq!(code, 2);
    assert!(value(&checks[0]) >= 1.0, "{checks:?}");

    // An incremental backup moves the age of an any-type check back down; a full-only
    // check keeps ageing.
    let (before, _) = check_once(&cfg);
    let full_before = value(named(&before, "full"));
    pgbr.run(&["backup", "--type=incr"]);
    let (after, code) = check_once(&cfg);
    assert_eq!(code, 0, "{after:?}");
    let (any, full, incr) = (
        value(named(&after, "any")),
        value(named(&after, "full")),
        value(named(&after, "incr")),
    );
    assert!(
        full >= full_before,
        "full-only age moved back: {full_before} → {full}"
    );
    assert!(any < full, "any {any} should be younger than full {full}");
    // The same backup, sampled a moment apart.
    assert!((any - incr).abs() < 5.0, "any {any}, incr {incr}");
    assert!(message(named(&after, "any")).starts_with("incr backup "));
    assert!(message(named(&after, "full")).starts_with("full backup "));

    // The running agent publishes the same sample as metrics promtool accepts.
    let agent = Agent::start(&cfg);
    let (code, text) = agent.get("/metrics");
    assert_eq!(code, 200);
    for (metric, check) in [
        ("vigil_backup_age_seconds", "any"),
        ("vigil_backup_age_seconds", "full"),
        ("vigil_backup_size_bytes", "any"),
        ("vigil_backup_backups", "any"),
        ("vigil_backup_last_duration_seconds", "any"),
        ("vigil_backup_wal_max_segment", "any"),
    ] {
        let prefix = format!("{metric}{{check=\"{check}\"}} ");
        assert!(
            text.lines().any(|l| l.starts_with(&prefix)),
            "no {prefix:?} in /metrics:\n{text}"
        );
    }
    let count = text
        .lines()
        .find_map(|l| l.strip_prefix("vigil_backup_backups{check=\"full\"} "))
        .unwrap();
    assert_eq!(count, "1");
    crate::util::assert_promtool_accepts(&text);
    drop(agent);

    // The repository removed: pgBackRest says so, and the check is critical (or unknown)
    // with its words.
    std::fs::remove_dir_all(pgbr.repo()).unwrap();
    let (checks, code) = check_once(&cfg);
    let any = named(&checks, "any");
    assert!(matches!(status(any), "critical" | "unknown"), "{any}");
    assert!(code >= 2, "{checks:?}");
    assert!(message(any).contains("missing stanza path"), "{any}");
    eprintln!("pgbackrest scenario took {:?}", started.elapsed());
    drop(c);
}

/// A fixture script standing in for pgBackRest (it ignores the arguments it is given).
fn script(name: &str) -> String {
    format!(
        "{}/tests/fixtures/scripts/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn a_bad_tool_is_unknown_bounded_and_explained() {
    let dir = tempdir();
    let tool = |name: &str, binary: &str, extra: &str| {
        format!(
            "[check.backup.pgbackrest.{name}]\nstanza = \"main\"\nbinary = {binary:?}\n{extra}\n"
        )
    };
    let cfg = write_config(
        dir.path(),
        &[
            tool("missing", "/nonexistent/pgbackrest", ""),
            tool("failing", &script("exit-3.sh"), ""),
            tool("garbage", &script("print-env.sh"), ""),
            tool("flood", &script("print-10mb.sh"), ""),
            tool(
                "hang",
                &script("sleep-with-grandchild.sh"),
                "timeout = \"5s\"",
            ),
        ]
        .concat(),
    );
    let started = Instant::now();
    let (checks, code) = check_once(&cfg);
    let took = started.elapsed();
    assert_eq!(code, 3, "{checks:?}");
    for c in &checks {
        assert_eq!(status(c), "unknown", "{c}");
        assert!(c["value"].is_null(), "{c}");
    }
    let says = |name: &str, what: &str| {
        let m = message(named(&checks, name));
        assert!(m.contains(what), "{name}: {m:?} should say {what:?}");
    };
    says("missing", "/nonexistent/pgbackrest");
    says("failing", "exited with 3");
    says("failing", "ERROR: [003]: something went wrong");
    says("garbage", "not pgBackRest's info JSON");
    says("flood", "more than 4.0 MiB");
    says("hang", "no answer within");
    says("hang", "process group was killed");
    // The hang ends within its 5 s timeout (it ignores SIGTERM: SIGKILL after the grace),
    // not after the script's 600 s.
    assert!(took < Duration::from_secs(20), "{took:?}");
}
