//! The `command`, `tls.certificate` and `kernel` kinds against the real thing: Debian's
//! monitoring plugins and check_postgres (on the test PostgreSQL), misbehaving plugins,
//! certificates made by `openssl` (including really back-dated ones), and `uname -r`.
//!
//! Statuses come out of `vigil check --json` (the real binary, whose exit code is the
//! worst status) or of the kind's check run in-process when the test needs the error
//! itself; perfdata come out of a real agent's `/metrics`, which promtool must accept.
//! Processes left behind are found through `/proc/PID/environ`: every misbehaving plugin
//! runs with a unique `VIGIL_TEST_MARKER` in its `env`, which all its descendants inherit.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vigil::checks::command::{CommandCheck, CommandConfig, MAX_OUTPUT};
use vigil::checks::{Check, CheckContext, CheckError, Common, Observation, Status};
use vigil::runner::Runner;

use crate::pgcluster;
use crate::util::{Agent, assert_promtool_accepts, poll, tempdir, vigil, write_config};

/// Debian's monitoring-plugins-basic.
const PLUGINS: &str = "/usr/lib/nagios/plugins";

fn plugin(name: &str) -> String {
    let p = format!("{PLUGINS}/{name}");
    assert!(
        Path::new(&p).exists(),
        "{p} missing: install monitoring-plugins-basic (.ci/deps)"
    );
    p
}

/// A TOML array of strings.
fn toml_array(items: &[&str]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| toml::Value::String(s.to_string()).to_string())
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// `[check.command.NAME]` running `argv`.
fn command_check(name: &str, argv: &[&str]) -> String {
    format!("[check.command.{name}]\ncommand = {}\n", toml_array(argv))
}

/// Runs `vigil check --json -c CFG NAMES…`: the exit code and the checks by name.
fn vigil_check(cfg: &Path, names: &[&str]) -> (i32, Vec<Value>) {
    let out = vigil()
        .args(["check", "--json", "-c"])
        .arg(cfg)
        .args(names)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let checks: Vec<Value> = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {text:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().expect("exit code"), checks)
}

fn find<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {checks:?}"))
}

fn status_of(checks: &[Value], name: &str) -> String {
    find(checks, name)["status"].as_str().unwrap().to_string()
}

fn message_of(checks: &[Value], name: &str) -> String {
    find(checks, name)["message"].as_str().unwrap().to_string()
}

/// Writes a config of `body` and returns its dir (kept alive by the caller) and path.
fn config(body: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempdir();
    let cfg = write_config(dir.path(), body);
    (dir, cfg.path)
}

#[test]
fn check_dummy_exit_codes_are_the_statuses_and_the_worst_is_the_exit_code() {
    let dummy = plugin("check_dummy");
    let mut body = String::new();
    for (name, code, text) in [
        ("d-ok", "0", "all good"),
        ("d-warning", "1", "a bit off"),
        ("d-critical", "2", "on fire"),
        ("d-unknown", "3", "no idea"),
    ] {
        body.push_str(&command_check(name, &[&dummy, code, text]));
    }
    let (_dir, cfg) = config(&body);

    let (code, checks) = vigil_check(&cfg, &["d-ok"]);
    assert_eq!(code, 0);
    assert_eq!(status_of(&checks, "d-ok"), "ok");
    // check_dummy prints "OK: <text>": the plugin's own words are the message.
    assert_eq!(message_of(&checks, "d-ok"), "OK: all good");
    assert_eq!(find(&checks, "d-ok")["value"], 0.0);
    assert_eq!(find(&checks, "d-ok")["unit"], "status");

    for (names, want) in [
        (&["d-ok", "d-warning"][..], 1),
        (&["d-ok", "d-warning", "d-critical"], 2),
        (&["d-critical", "d-unknown", "d-ok"], 3),
        (&["d-unknown"], 3),
    ] {
        let (code, checks) = vigil_check(&cfg, names);
        assert_eq!(code, want, "{names:?}: {checks:?}");
        assert_eq!(checks.len(), names.len());
    }
    let (_, checks) = vigil_check(&cfg, &[]);
    for (name, status, message) in [
        ("d-warning", "warning", "WARNING: a bit off"),
        ("d-critical", "critical", "CRITICAL: on fire"),
        ("d-unknown", "unknown", "UNKNOWN: no idea"),
    ] {
        assert_eq!(status_of(&checks, name), status);
        assert_eq!(message_of(&checks, name), message);
    }
}

/// Runs a `command` check in-process: `argv` with `VIGIL_TEST_MARKER=marker` and the
/// given check timeout.
fn run_command(argv: &[&str], marker: &str, timeout: Duration) -> Result<Observation, CheckError> {
    let cfg: CommandConfig = toml::from_str(&format!(
        "command = {}\nenv = {{ VIGIL_TEST_MARKER = {:?} }}\n",
        toml_array(argv),
        marker
    ))
    .unwrap();
    let common = Common {
        timeout,
        ..Common::default()
    };
    let mut check = CommandCheck::from_config(&cfg, &common);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(check.run(&CheckContext::host()))
}

/// Live (not zombie) processes whose environment holds `VIGIL_TEST_MARKER=marker`.
fn marked_processes(marker: &str) -> Vec<i32> {
    let needle = format!("VIGIL_TEST_MARKER={marker}");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let marked = env.split(|b| *b == 0).any(|v| v == needle.as_bytes());
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rfind(')')
                    .map(|i| s[i + 1..].trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if marked && !zombie {
            pids.push(pid);
        }
    }
    pids
}

/// Polls until no process carries `marker`; panics after 5 s.
fn assert_none_left(marker: &str) {
    poll(
        Duration::from_secs(5),
        &format!("processes marked {marker} to go"),
        || marked_processes(marker).is_empty().then_some(()),
    );
}

fn marker(what: &str) -> String {
    format!("{what}-{}-{}", std::process::id(), unique_suffix())
}

/// A per-call unique suffix without another dev-dependency.
fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn error_text(r: Result<Observation, CheckError>) -> String {
    match r {
        Err(e) => e.to_string(),
        Ok(o) => panic!("expected unknown with a reason, got {o:?}"),
    }
}

#[test]
fn the_marker_scan_sees_a_marked_process() {
    let m = marker("self-test");
    let mut child = Command::new("sleep")
        .arg("30")
        .env("VIGIL_TEST_MARKER", &m)
        .spawn()
        .unwrap();
    assert_eq!(marked_processes(&m), [child.id() as i32]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(marked_processes(&m).is_empty());
}

#[test]
fn a_hung_plugin_with_a_grandchild_is_unknown_and_its_whole_group_is_gone() {
    let m = marker("hang");
    // A grandchild that would outlive its parent, and a parent that ignores SIGTERM.
    let started = Instant::now();
    let e = error_text(run_command(
        &["sh", "-c", "trap '' TERM; sleep 600 & sleep 600"],
        &m,
        Duration::from_millis(1500),
    ));
    assert!(
        e.contains("no answer within") && e.contains("process group was killed"),
        "{e}"
    );
    assert!(e.contains("sh -c"), "names the command: {e}");
    // Timeout (3/4 of 1.5 s), the 2 s grace, the kill: far from 600 s.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_none_left(&m);
}

#[test]
fn a_plugin_flooding_stdout_is_capped_and_still_read() {
    let m = marker("flood");
    // 100 MiB after a proper first line.
    let script = "echo 'FLOOD OK | first=1'; head -c 104857600 /dev/zero | tr '\\0' y; exit 0";
    let o = run_command(&["sh", "-c", script], &m, Duration::from_secs(60)).unwrap();
    assert_eq!(o.status, Status::Ok);
    assert_eq!(o.message, "FLOOD OK");
    assert!(
        o.metrics
            .iter()
            .any(|x| x.labels.iter().any(|(_, v)| v == "first")),
        "{:?}",
        o.metrics
    );
    assert_none_left(&m);

    // What the check keeps is capped: the same request straight through the runner.
    let cfg: CommandConfig =
        toml::from_str(&format!("command = {}", toml_array(&["sh", "-c", script]))).unwrap();
    let req = CommandCheck::from_config(&cfg, &Common::default()).request();
    assert_eq!(req.max_output, MAX_OUTPUT);
    let out = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(Runner::in_process().run(&req))
        .unwrap();
    assert_eq!(out.stdout.len(), MAX_OUTPUT);
    assert!(out.stdout_truncated);
}

#[test]
fn a_plugin_killed_by_a_signal_is_unknown_with_the_signal() {
    let m = marker("signal");
    let e = error_text(run_command(
        &["sh", "-c", "echo 'about to die'; kill -KILL $$"],
        &m,
        Duration::from_secs(10),
    ));
    assert!(e.contains("was killed by SIGKILL"), "{e}");
    assert_none_left(&m);
}

#[test]
fn a_plugin_that_cannot_run_is_unknown_with_the_reason() {
    let dir = tempdir();
    let not_exec = dir.path().join("check_not_executable");
    std::fs::write(&not_exec, "#!/bin/sh\necho OK\n").unwrap();
    let not_exec = not_exec.to_str().unwrap();
    let missing = dir.path().join("check_missing");
    let missing = missing.to_str().unwrap();
    let m = marker("cannot");
    let e = error_text(run_command(&[not_exec], &m, Duration::from_secs(5)));
    // execve needs an x bit even for root.
    assert!(
        e.contains("Permission denied") && e.contains(not_exec),
        "{e}"
    );
    let e = error_text(run_command(&[missing], &m, Duration::from_secs(5)));
    assert!(e.contains("No such file") && e.contains(missing), "{e}");
    // Through a shell, its 126/127 conventions are named.
    let e = error_text(run_command(
        &["sh", "-c", not_exec],
        &m,
        Duration::from_secs(5),
    ));
    assert!(
        e.contains("exited with 126") && e.contains("not executable"),
        "{e}"
    );
    let e = error_text(run_command(
        &["sh", "-c", missing],
        &m,
        Duration::from_secs(5),
    ));
    assert!(
        e.contains("exited with 127") && e.contains("not found"),
        "{e}"
    );
    assert_none_left(&m);

    // And through the real binary: unknown, exit 3, the reason as the message.
    let (_d, cfg) = config(&command_check("gone", &[missing]));
    let (code, checks) = vigil_check(&cfg, &["gone"]);
    assert_eq!(code, 3);
    assert_eq!(status_of(&checks, "gone"), "unknown");
    assert!(
        message_of(&checks, "gone").contains("No such file"),
        "{checks:?}"
    );
}

/// The value of the sample of `name` whose labels include every pair.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let prefix = format!("{name}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn real_plugins_statuses_messages_and_perfdata_reach_metrics_and_promtool() {
    let pg = pgcluster::shared();
    let mut body = String::new();
    body.push_str(&command_check(
        "load",
        &[
            &plugin("check_load"),
            "-w",
            "1000,1000,1000",
            "-c",
            "2000,2000,2000",
        ],
    ));
    body.push_str(&command_check(
        "disk-root",
        &[&plugin("check_disk"), "-w", "1%", "-c", "0%", "-p", "/"],
    ));
    let port = pg.primary_port().to_string();
    body.push_str(&command_check(
        "pg-connection",
        &[
            "/usr/bin/check_postgres",
            "--action=connection",
            "--host=127.0.0.1",
            &format!("--port={port}"),
            "--dbuser=postgres",
            "--dbname=postgres",
        ],
    ));
    body.push_str(&command_check(
        "pg-backends",
        &[
            "/usr/bin/check_postgres_backends",
            "--host=127.0.0.1",
            &format!("--port={port}"),
            "--dbuser=postgres",
        ],
    ));
    // Every unit the guidelines list, a quoted label with a space and a quote, and junk.
    body.push_str(&command_check(
        "odd-perfdata",
        &[
            "sh",
            "-c",
            "echo \"ODD OK - units | t=250ms;500;1000 'free space /x''s'=50%;80;90;0;100 \
             size=2KB hits=7c plain=3 temp=40C junk\"",
        ],
    ));
    let dir = tempdir();
    let cfg = write_config(dir.path(), &body);

    let (code, checks) = vigil_check(&cfg.path, &[]);
    assert_eq!(code, 0, "{checks:#?}");
    assert!(
        message_of(&checks, "load").starts_with("LOAD OK"),
        "{checks:?}"
    );
    assert!(
        message_of(&checks, "disk-root").starts_with("DISK OK"),
        "{checks:?}"
    );
    assert!(
        message_of(&checks, "pg-connection").starts_with("POSTGRES_CONNECTION OK"),
        "{checks:?}"
    );
    assert!(
        message_of(&checks, "pg-backends").starts_with("POSTGRES_BACKENDS OK"),
        "{checks:?}"
    );
    assert_eq!(message_of(&checks, "odd-perfdata"), "ODD OK - units");

    let agent = Agent::start(&cfg);
    let text = poll(
        Duration::from_secs(30),
        "every command check's first sample",
        || {
            let (code, text) = agent.get("/metrics");
            assert_eq!(code, 200);
            let sampled = [
                "load",
                "disk-root",
                "pg-connection",
                "pg-backends",
                "odd-perfdata",
            ]
            .iter()
            .all(|c| metric(&text, "vigil_check_status", &[("check", c)]).is_some());
            sampled.then_some(text)
        },
    );
    assert_promtool_accepts(&text);
    for c in [
        "load",
        "disk-root",
        "pg-connection",
        "pg-backends",
        "odd-perfdata",
    ] {
        assert_eq!(
            metric(&text, "vigil_check_status", &[("check", c)]),
            Some(0.0),
            "{c}:\n{text}"
        );
    }
    // check_load: load1/5/15, unitless.
    for l in ["load1", "load5", "load15"] {
        let v = metric(
            &text,
            "vigil_command_perfdata",
            &[("check", "load"), ("label", l)],
        );
        assert!(v.is_some_and(|v| v >= 0.0), "{l}: {v:?}\n{text}");
    }
    // check_disk: bytes used on /, which agrees with statvfs.
    let used = metric(
        &text,
        "vigil_command_perfdata_bytes",
        &[("check", "disk-root"), ("label", "/")],
    )
    .unwrap_or_else(|| panic!("no bytes for /:\n{text}"));
    let st = nix::sys::statvfs::statvfs("/").unwrap();
    let total = st.blocks() as f64 * st.fragment_size() as f64;
    assert!(used > 0.0 && used < total, "{used} of {total}");
    // check_postgres: its connection time in seconds, and the backends count.
    let t = metric(
        &text,
        "vigil_command_perfdata_seconds",
        &[("check", "pg-connection")],
    );
    assert!(t.is_some_and(|t| (0.0..30.0).contains(&t)), "{t:?}\n{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("vigil_command_perfdata{check=\"pg-backends\"")),
        "{text}"
    );
    // The odd one: each unit normalised, the label kept verbatim, the junk counted.
    let odd = |name: &str, label: &str| {
        metric(&text, name, &[("check", "odd-perfdata"), ("label", label)])
    };
    assert_eq!(odd("vigil_command_perfdata_seconds", "t"), Some(0.25));
    assert_eq!(
        odd("vigil_command_perfdata_ratio", "free space /x's"),
        Some(0.5)
    );
    assert_eq!(odd("vigil_command_perfdata_bytes", "size"), Some(2048.0));
    assert_eq!(odd("vigil_command_perfdata_total", "hits"), Some(7.0));
    assert_eq!(odd("vigil_command_perfdata", "plain"), Some(3.0));
    assert_eq!(
        metric(
            &text,
            "vigil_command_perfdata",
            &[("check", "odd-perfdata"), ("label", "temp"), ("uom", "C")]
        ),
        Some(40.0)
    );
    assert_eq!(
        metric(
            &text,
            "vigil_command_perfdata_skipped",
            &[("check", "odd-perfdata")]
        ),
        Some(1.0)
    );
    assert!(
        text.contains("# TYPE vigil_command_perfdata_total counter"),
        "{text}"
    );
    agent.stop();
}

/// A scratch CA directory for `openssl ca`, which can back-date a certificate (the
/// installed OpenSSL 3.0's `x509`/`req` cannot set notBefore).
struct OpenSsl {
    dir: tempfile::TempDir,
}

impl OpenSsl {
    fn new() -> OpenSsl {
        let dir = tempdir();
        let p = dir.path();
        std::fs::write(p.join("index.txt"), "").unwrap();
        std::fs::write(p.join("serial"), "1000\n").unwrap();
        std::fs::create_dir(p.join("newcerts")).unwrap();
        std::fs::write(
            p.join("ca.cnf"),
            "[ca]\ndefault_ca = ca_default\n[ca_default]\ndir = .\ndatabase = ./index.txt\n\
             new_certs_dir = ./newcerts\nserial = ./serial\ndefault_md = sha256\n\
             policy = policy_any\nunique_subject = no\n[policy_any]\ncommonName = supplied\n",
        )
        .unwrap();
        OpenSsl { dir }
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("openssl (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A self-signed certificate for `CN=cn`, valid from `start` to `end`
    /// (`YYYYMMDDHHMMSSZ`), signed by `openssl ca -selfsign`; returns its path.
    fn cert(&self, cn: &str, start: &str, end: &str) -> PathBuf {
        let (key, csr, out) = (
            format!("{cn}.key"),
            format!("{cn}.csr"),
            format!("{cn}.pem"),
        );
        self.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-subj",
            &format!("/CN={cn}"),
            "-out",
            &csr,
        ]);
        self.openssl(&[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-selfsign",
            "-keyfile",
            &key,
            "-in",
            &csr,
            "-startdate",
            start,
            "-enddate",
            end,
            "-notext",
            "-out",
            &out,
        ]);
        self.dir.path().join(out)
    }

    /// A plain `openssl req -x509 -days N` certificate.
    fn cert_days(&self, cn: &str, days: u32) -> PathBuf {
        let (key, out) = (format!("{cn}.key"), format!("{cn}.pem"));
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-subj",
            &format!("/CN={cn}"),
            "-days",
            &days.to_string(),
            "-out",
            &out,
        ]);
        self.dir.path().join(out)
    }
}

/// `YYYYMMDDHHMMSSZ`, `secs` from now, as `openssl ca -startdate/-enddate` take it.
fn asn1_time(offset_secs: i64) -> String {
    let out = Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}", now_secs() + offset_secs),
            "+%Y%m%d%H%M%SZ",
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn certificates_made_by_openssl_valid_expiring_expired_and_garbage() {
    let ssl = OpenSsl::new();
    let valid = ssl.cert_days("valid.test", 90);
    // Issued 89 days ago with 1 day left: below warn = 14d, above crit = 2h (the
    // contract's example thresholds), so a warning.
    let soon = ssl.cert("soon.test", &asn1_time(-89 * 86_400), &asn1_time(86_400));
    let expired = ssl.cert("expired.test", "20200101000000Z", "20200401000000Z");
    let garbage = ssl.dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let bundle = ssl.dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        [
            std::fs::read(&valid).unwrap(),
            std::fs::read(&soon).unwrap(),
        ]
        .concat(),
    )
    .unwrap();
    let tls = |name: &str, path: &Path, extra: &str| {
        format!(
            "[check.tls.certificate.{name}]\npath = {:?}\nwarn = \"14d\"\ncrit = \"2h\"\n{extra}\n",
            path.display().to_string()
        )
    };
    let body = [
        tls("valid", &valid, ""),
        tls("soon", &soon, ""),
        tls("expired", &expired, ""),
        tls("garbage", &garbage, ""),
        tls("missing", &ssl.dir.path().join("nope.pem"), ""),
        tls("leaf-only", &bundle, ""),
        tls("whole-chain", &bundle, "chain = true"),
    ]
    .concat();
    let (_d, cfg) = config(&body);
    let (code, checks) = vigil_check(&cfg, &[]);
    assert_eq!(code, 3, "worst is the unreadable one: {checks:#?}");

    let value = |n: &str| find(&checks, n)["value"].as_f64();
    assert_eq!(status_of(&checks, "valid"), "ok");
    let left = value("valid").unwrap();
    assert!(
        (89.0 * 86_400.0..=90.0 * 86_400.0).contains(&left),
        "{left}"
    );
    // 90 days less the seconds since openssl made it: "89d 23h", or "90d 0h" within a second.
    let m = message_of(&checks, "valid");
    assert!(
        m.starts_with("CN=valid.test expires in 89d 23h")
            || m.starts_with("CN=valid.test expires in 90d 0h"),
        "{m}"
    );
    assert_eq!(find(&checks, "valid")["unit"], "seconds");

    assert_eq!(status_of(&checks, "soon"), "warning");
    assert!(value("soon").unwrap() <= 86_400.0);

    assert_eq!(status_of(&checks, "expired"), "critical");
    assert!(value("expired").unwrap() < -86_400.0 * 365.0);
    let m = message_of(&checks, "expired");
    assert!(
        m.starts_with("CN=expired.test expired ") && m.contains("2020-04-01T00:00:00Z"),
        "{m}"
    );

    assert_eq!(status_of(&checks, "garbage"), "critical");
    assert_eq!(find(&checks, "garbage")["value"], Value::Null);
    assert!(
        message_of(&checks, "garbage").contains("not a valid certificate"),
        "{checks:?}"
    );

    assert_eq!(status_of(&checks, "missing"), "unknown");
    assert!(
        message_of(&checks, "missing").contains("nope.pem"),
        "{checks:?}"
    );

    assert_eq!(status_of(&checks, "leaf-only"), "ok");
    assert_eq!(status_of(&checks, "whole-chain"), "warning");
    assert!(
        message_of(&checks, "whole-chain").contains("CN=soon.test (certificate 2 of 2)"),
        "{checks:?}"
    );

    // Worst wins among the rest too.
    assert_eq!(vigil_check(&cfg, &["valid", "soon"]).0, 1);
    assert_eq!(vigil_check(&cfg, &["valid", "expired", "soon"]).0, 2);
    assert_eq!(vigil_check(&cfg, &["valid", "leaf-only"]).0, 0);
}

#[test]
fn the_real_kernel_release_against_rules() {
    let out = Command::new("uname").arg("-r").output().unwrap();
    let release = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let body = format!(
        "[check.kernel.any]\n\
         [check.kernel.denied]\ndeny = [\"0.0.1-*\", {release:?}]\n\
         [check.kernel.denied-glob]\ndeny = [\"*\"]\n\
         [check.kernel.old-enough]\nmin_release = \"2.6.32\"\n\
         [check.kernel.too-old]\nmin_release = \"999.0\"\n"
    );
    let (_d, cfg) = config(&body);
    let (code, checks) = vigil_check(&cfg, &[]);
    assert_eq!(code, 2, "{checks:#?}");
    assert_eq!(status_of(&checks, "any"), "ok");
    assert_eq!(message_of(&checks, "any"), format!("kernel {release}"));
    assert_eq!(find(&checks, "any")["value"], 0.0);
    assert_eq!(status_of(&checks, "denied"), "critical");
    assert_eq!(
        message_of(&checks, "denied"),
        format!("kernel {release} is denied by {release:?}")
    );
    assert_eq!(find(&checks, "denied")["value"], 1.0);
    assert!(message_of(&checks, "denied-glob").ends_with("denied by \"*\""));
    assert_eq!(status_of(&checks, "old-enough"), "ok");
    assert_eq!(
        message_of(&checks, "too-old"),
        format!("kernel {release} is older than min_release \"999.0\"")
    );
    assert_eq!(vigil_check(&cfg, &["any", "old-enough"]).0, 0);

    // The info metrics, and promtool's blessing.
    let dir = tempdir();
    let cfg = write_config(dir.path(), "[check.kernel.kernel]\n");
    let agent = Agent::start(&cfg);
    let (_, text) = agent.get("/metrics");
    assert_eq!(
        metric(
            &text,
            "vigil_kernel_info",
            &[("check", "kernel"), ("release", &release)]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("vigil_image_info{")),
        "{text}"
    );
    assert_promtool_accepts(&text);
    agent.stop();
}
