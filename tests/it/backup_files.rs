//! The `backup.files`, `backup.walg` and `backup.barman` kinds through the real
//! `vigil check --json`:
//! - `backup.files` on real files whose modification times the tests set;
//! - `backup.walg` against a stand-in `wal-g` script (WAL-G is not packaged for Debian and
//!   cannot be installed here) printing output in WAL-G's documented format
//!   (tests/fixtures/walg/README.md says where that format comes from), and misbehaving:
//!   failing, hanging, flooding;
//! - `backup.barman` against real Barman 3 backups (Debian's `barman` package) of a real
//!   PostgreSQL 15 primary (tests/it/pgcluster.rs).

use std::fs::{File, FileTimes};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::pgcluster::{Cluster, ClusterOptions, PG_BIN};
use crate::util::{run, tempdir, write_config};

/// Runs `vigil check --json -c CFG` on `body` and returns the exit code and the checks
/// by name.
fn check(dir: &Path, body: &str) -> (i32, Vec<Value>) {
    let cfg = write_config(dir, body);
    let out = run(&["check", "--json", "-c", cfg.path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let checks: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {stdout}\nstderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        out.status.code().unwrap(),
        checks.as_array().unwrap().clone(),
    )
}

fn by_name<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {checks:#?}"))
}

fn status(c: &Value) -> &str {
    c["status"].as_str().unwrap()
}

fn value(c: &Value) -> f64 {
    c["value"]
        .as_f64()
        .unwrap_or_else(|| panic!("no value: {c:#}"))
}

fn message(c: &Value) -> &str {
    c["message"].as_str().unwrap()
}

/// Writes `size` bytes to `path` and sets its modification time `age` ago.
fn backup_file(path: &Path, size: usize, age: Duration) {
    std::fs::write(path, vec![b'x'; size]).unwrap();
    let f = File::options().write(true).open(path).unwrap();
    f.set_times(FileTimes::new().set_modified(SystemTime::now() - age))
        .unwrap();
}

const MIN: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// Asserts a measured age lies within a few seconds of `expected` (the file was written
/// a moment before `vigil check` ran).
fn assert_age(c: &Value, expected: Duration) {
    let v = value(c);
    let e = expected.as_secs_f64();
    assert!((e..e + 30.0).contains(&v), "age {v}, expected ~{e}: {c:#}");
}

#[test]
fn files_fresh_warning_critical_and_defaults() {
    let dir = tempdir();
    for (sub, age) in [
        ("fresh", MIN),
        ("late", 90 * MIN),
        ("stale", 3 * HOUR),
        ("day", 30 * HOUR),
    ] {
        let d = dir.path().join(sub);
        std::fs::create_dir(&d).unwrap();
        backup_file(&d.join("db.dump"), 4096, age);
    }
    let body = |sub: &str, thresholds: &str| {
        format!(
            "[check.backup.files.{sub}]\nglob = \"{}/{sub}/*.dump\"\n{thresholds}\n",
            dir.path().display()
        )
    };
    let t = "warn = \"1h\"\ncrit = \"2h\"";
    let doc = [
        body("fresh", t),
        body("late", t),
        body("stale", t),
        // No thresholds: 26h / 48h.
        body("day", ""),
    ]
    .concat();
    let (code, checks) = check(dir.path(), &doc);
    let fresh = by_name(&checks, "fresh");
    assert_eq!(status(fresh), "ok", "{fresh:#}");
    assert_eq!(fresh["unit"], "seconds");
    assert_age(fresh, MIN);
    assert!(message(fresh).contains("fresh/db.dump"), "{fresh:#}");
    let late = by_name(&checks, "late");
    assert_eq!(status(late), "warning", "{late:#}");
    assert_age(late, 90 * MIN);
    let stale = by_name(&checks, "stale");
    assert_eq!(status(stale), "critical", "{stale:#}");
    assert_age(stale, 3 * HOUR);
    let day = by_name(&checks, "day");
    assert_eq!(
        status(day),
        "warning",
        "30h is past the 26h default: {day:#}"
    );
    assert_eq!(code, 2, "the worst status wins");
}

#[test]
fn files_newest_of_several_wins_by_mtime_not_name() {
    let dir = tempdir();
    let b = dir.path().join("backups");
    std::fs::create_dir(&b).unwrap();
    backup_file(&b.join("2024-01-03.dump"), 100, 50 * HOUR);
    backup_file(&b.join("2024-01-01.dump"), 200, 2 * HOUR);
    backup_file(&b.join("2024-01-02.dump"), 300, 27 * HOUR);
    // A directory and a non-matching file do not count.
    std::fs::create_dir(b.join("old.dump")).unwrap();
    backup_file(&b.join("notes.txt"), 10, Duration::ZERO);
    let doc = format!(
        "[check.backup.files.dumps]\nglob = \"{}/*.dump\"\n",
        b.display()
    );
    let (code, checks) = check(dir.path(), &doc);
    let c = by_name(&checks, "dumps");
    assert_eq!((status(c), code), ("ok", 0), "{c:#}");
    assert_age(c, 2 * HOUR);
    assert!(message(c).contains("2024-01-01.dump"), "{c:#}");
    assert!(message(c).contains("3 in total"), "{c:#}");
}

#[test]
fn files_empty_or_small_newest_file_is_critical() {
    let dir = tempdir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    // A good dump yesterday, then an empty one (the dump failed at once).
    backup_file(&a.join("old.dump"), 1 << 20, 20 * HOUR);
    backup_file(&a.join("new.dump"), 0, MIN);
    // Half a MiB against min_size = 1MB.
    backup_file(&b.join("new.dump"), 512 << 10, MIN);
    let doc = format!(
        "[check.backup.files.empty]\nglob = \"{}/*.dump\"\n\n\
         [check.backup.files.small]\nglob = \"{}/*.dump\"\nmin_size = \"1MB\"\n",
        a.display(),
        b.display()
    );
    let (code, checks) = check(dir.path(), &doc);
    assert_eq!(code, 2);
    let empty = by_name(&checks, "empty");
    assert_eq!(status(empty), "critical", "{empty:#}");
    assert_age(empty, MIN);
    assert!(
        message(empty).starts_with(&format!(
            "newest match {}/new.dump is 0 B, below min_size",
            a.display()
        )),
        "{empty:#}"
    );
    let small = by_name(&checks, "small");
    assert_eq!(status(small), "critical", "{small:#}");
    assert!(
        message(small).contains("is 512.0 KiB, below min_size 1.0 MiB"),
        "{small:#}"
    );
}

#[test]
fn files_no_match_is_critical_and_a_relative_glob_is_refused() {
    let dir = tempdir();
    let doc = format!(
        "[check.backup.files.none]\nglob = \"{}/nowhere/*.dump\"\n",
        dir.path().display()
    );
    let (code, checks) = check(dir.path(), &doc);
    let c = by_name(&checks, "none");
    assert_eq!((status(c), code), ("critical", 2), "{c:#}");
    assert!(c["value"].is_null(), "{c:#}");
    assert_eq!(
        message(c),
        format!("no file matches {}/nowhere/*.dump", dir.path().display())
    );

    let cfg = write_config(
        dir.path(),
        "[check.backup.files.rel]\nglob = \"backups/*.dump\"\n",
    );
    let out = run(&["config", "check", "-c", cfg.path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("glob") && err.contains("absolute"), "{err}");
}

/// The stand-in for WAL-G: tests/fixtures/walg/wal-g prints the file named by
/// `FAKE_WALG_OUTPUT` (WAL-G's `backup-list --json --detail` format, see the README next
/// to it) or misbehaves as `FAKE_WALG_MODE` says.
fn fake_walg() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/walg/wal-g")
}

fn walg_check(name: &str, mode: &str, output: &Path, extra: &str) -> String {
    format!(
        "[check.backup.walg.{name}]\nbinary = \"{}\"\n{extra}\n\
         env = {{ FAKE_WALG_MODE = \"{mode}\", FAKE_WALG_OUTPUT = \"{}\" }}\n\n",
        fake_walg().display(),
        output.display()
    )
}

#[test]
fn walg_reads_the_newest_finish_time() {
    let dir = tempdir();
    // A fresh list in WAL-G's format, written now: the fixture's shape with today's times.
    let at = |age: Duration| humantime::format_rfc3339_micros(SystemTime::now() - age);
    let fresh = dir.path().join("fresh.json");
    std::fs::write(
        &fresh,
        format!(
            "[{{\"backup_name\":\"base_000000010000000000000004\",\"time\":\"{t1}\",\
             \"wal_file_name\":\"000000010000000000000004\",\"storage_name\":\"default\",\
             \"start_time\":\"{s1}\",\"finish_time\":\"{t1}\",\"date_fmt\":\"%Y-%m-%dT%H:%M:%S.%fZ\",\
             \"hostname\":\"db1\",\"data_dir\":\"/var/lib/postgresql/15/main\",\"pg_version\":150005,\
             \"start_lsn\":67108904,\"finish_lsn\":67109160,\"is_permanent\":false,\
             \"system_identifier\":7322451178765432109,\"uncompressed_size\":23591712,\
             \"compressed_size\":5140233}},\
             {{\"backup_name\":\"base_000000010000000000000002\",\"time\":\"{t2}\",\
             \"wal_file_name\":\"000000010000000000000002\",\"storage_name\":\"default\",\
             \"start_time\":\"{t2}\",\"finish_time\":\"{t2}\",\"date_fmt\":\"%Y-%m-%dT%H:%M:%S.%fZ\",\
             \"hostname\":\"db1\",\"data_dir\":\"/var/lib/postgresql/15/main\",\"pg_version\":150005,\
             \"start_lsn\":33554472,\"finish_lsn\":33554728,\"is_permanent\":false,\
             \"system_identifier\":7322451178765432109,\"uncompressed_size\":23591000,\
             \"compressed_size\":5140000}}]\n",
            t1 = at(10 * MIN),
            s1 = at(11 * MIN),
            t2 = at(30 * HOUR),
        ),
    )
    .unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/walg");
    let doc = [
        walg_check("fresh", "ok", &fresh, ""),
        walg_check("old", "ok", &fixtures.join("backup-list-detail.json"), ""),
        walg_check("empty", "ok", &fixtures.join("backup-list-empty.json"), ""),
        walg_check("empty-old-walg", "old-empty", &fresh, ""),
    ]
    .concat();
    let (code, checks) = check(dir.path(), &doc);
    assert_eq!(code, 2);
    let c = by_name(&checks, "fresh");
    assert_eq!(status(c), "ok", "{c:#}");
    assert_age(c, 10 * MIN);
    assert!(
        message(c).starts_with("backup base_000000010000000000000004 finished 10m"),
        "{c:#}"
    );
    let c = by_name(&checks, "old");
    assert_eq!(status(c), "critical", "{c:#}");
    assert!(value(c) > 48.0 * 3600.0, "{c:#}");
    for name in ["empty", "empty-old-walg"] {
        let c = by_name(&checks, name);
        assert_eq!(status(c), "critical", "{c:#}");
        assert!(c["value"].is_null(), "{c:#}");
        assert!(message(c).starts_with("no backup found"), "{c:#}");
    }
}

#[test]
fn walg_failures_are_unknown_with_the_tools_words() {
    let dir = tempdir();
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "[{\"backup_name\": \"base_1\", \"finish_time\": ").unwrap();
    let missing = dir.path().join("no-such-wal-g");
    let doc = [
        walg_check("fail", "fail", &garbage, ""),
        walg_check("garbage", "ok", &garbage, ""),
        walg_check("flood", "flood", &garbage, "timeout = \"20s\""),
        format!(
            "[check.backup.walg.missing]\nbinary = \"{}\"\n\n",
            missing.display()
        ),
    ]
    .concat();
    let (code, checks) = check(dir.path(), &doc);
    assert_eq!(code, 3);
    let c = by_name(&checks, "fail");
    assert_eq!(status(c), "unknown", "{c:#}");
    assert!(
        message(c).contains("exited with 1: ERROR:") && message(c).contains("AccessDenied"),
        "{c:#}"
    );
    let c = by_name(&checks, "garbage");
    assert_eq!(status(c), "unknown", "{c:#}");
    assert!(message(c).contains("not WAL-G's backup list JSON"), "{c:#}");
    let c = by_name(&checks, "flood");
    assert_eq!(status(c), "unknown", "{c:#}");
    assert!(message(c).contains("more than 4.0 MiB"), "{c:#}");
    let c = by_name(&checks, "missing");
    assert_eq!(status(c), "unknown", "{c:#}");
    assert!(message(c).contains("no-such-wal-g"), "{c:#}");
}

#[test]
fn walg_that_hangs_is_killed_at_the_timeout() {
    let dir = tempdir();
    let doc = walg_check("hang", "hang", dir.path(), "timeout = \"1s\"");
    let started = Instant::now();
    let (code, checks) = check(dir.path(), &doc);
    let c = by_name(&checks, "hang");
    assert_eq!((status(c), code), ("unknown", 3), "{c:#}");
    // The runner's own timeout (before the scheduler's) killed it and names the tool.
    assert!(
        message(c).contains("backup-list --json --detail`: no answer within"),
        "{c:#}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}

/// Runs `barman ARGS…` with `home` (holding `.barman.conf`) as HOME; panics on failure.
fn barman(home: &Path, args: &[&str]) -> String {
    let out = Command::new("barman")
        .args(args)
        .env("HOME", home)
        .current_dir(home)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run barman ({e}): install Debian's `barman` package (.ci/deps)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "barman {args:?}: {text}");
    text
}

fn barman_check(name: &str, server: &str, home: &Path, thresholds: &str) -> String {
    format!(
        "[check.backup.barman.{name}]\nserver = \"{server}\"\n{thresholds}\n\
         env = {{ HOME = \"{}\" }}\ntimeout = \"60s\"\n\n",
        home.display()
    )
}

/// A real Barman 3 (Debian bookworm's package), `backup_method = postgres`, backing up a
/// real primary whose `archive_command` feeds Barman's incoming directory.
#[test]
fn barman_real_backups() {
    // Under /tmp rather than target/: the PostgreSQL OS user must reach `incoming`.
    let home = tempfile::Builder::new()
        .prefix("vigil-barman-")
        .tempdir_in("/tmp")
        .unwrap();
    let incoming = home.path().join("pg/incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for (p, mode) in [
        (home.path().to_path_buf(), 0o755),
        (home.path().join("pg"), 0o755),
        (incoming.clone(), 0o1777),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let cluster = Cluster::start(ClusterOptions {
        standby: false,
        archive_command: Some(format!(
            "cp %p {dir}/%f.tmp && mv {dir}/%f.tmp {dir}/%f",
            dir = incoming.display()
        )),
        ..ClusterOptions::default()
    });
    // Barman refuses to run as any user but `barman_user`: the one running the tests.
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap()
        .name;
    let port = cluster.primary_port();
    std::fs::write(
        home.path().join(".barman.conf"),
        format!(
            "[barman]\nbarman_home = {home}\nbarman_user = {me}\nlog_file = {home}/barman.log\n\
             log_level = INFO\npath_prefix = {PG_BIN}\n\n\
             [pg]\ndescription = \"vigil test\"\n\
             conninfo = host=127.0.0.1 port={port} user=postgres dbname=postgres\n\
             streaming_conninfo = host=127.0.0.1 port={port} user=postgres\n\
             backup_method = postgres\narchiver = on\n",
            home = home.path().display()
        ),
    )
    .unwrap();
    let scratch = tempdir();

    // Configured, reachable, but no backup yet.
    let doc = [
        barman_check("pg", "pg", home.path(), ""),
        barman_check("nosuch", "nosuch", home.path(), ""),
    ]
    .concat();
    let (_, checks) = check(scratch.path(), &doc);
    let c = by_name(&checks, "pg");
    assert_eq!(status(c), "critical", "{c:#}");
    assert!(c["value"].is_null(), "{c:#}");
    assert_eq!(message(c), "no DONE backup found for server 'pg'");
    let c = by_name(&checks, "nosuch");
    assert_eq!(status(c), "unknown", "{c:#}");
    assert!(message(c).contains("Unknown server 'nosuch'"), "{c:#}");

    // One WAL segment must reach Barman before it accepts a backup; --wait lets the backup
    // end DONE (its WAL archived) rather than WAITING_FOR_WALS.
    barman(
        home.path(),
        &[
            "switch-wal",
            "--force",
            "--archive",
            "--archive-timeout",
            "60",
            "pg",
        ],
    );
    barman(
        home.path(),
        &["backup", "--wait", "--wait-timeout", "60", "pg"],
    );
    let doc = [
        barman_check("pg", "pg", home.path(), ""),
        // Any real age is past 1ms.
        barman_check("strict", "pg", home.path(), "crit = \"1ms\""),
    ]
    .concat();
    let (_, checks) = check(scratch.path(), &doc);
    let c = by_name(&checks, "pg");
    assert_eq!(status(c), "ok", "{c:#}");
    assert!((0.0..120.0).contains(&value(c)), "{c:#}");
    assert!(message(c).contains("1 in total"), "{c:#}");
    assert_eq!(status(by_name(&checks, "strict")), "critical");
}
