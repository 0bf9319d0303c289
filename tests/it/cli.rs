//! The command line: exit codes, `vigil check`, `vigil status`, startup failures of
//! `vigil agent`, and `$VIGIL_CONFIG`.

// Test helpers may unwrap freely (STYLE §4.4); clippy only exempts #[test] fns.

use std::net::TcpListener;
use std::process::Output;

use serde_json::Value;

use crate::api::{
    CHECK_KEYS, GHOST_CHECK, assert_check_object, assert_health_document, healthy_checks,
};
use crate::util::{Agent, free_port, run, tempdir, unix_http, vigil, write_config};

fn code(out: &Output) -> i32 {
    out.status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {out:?}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The contract: a user's error is one clear line on stderr, never a panic or a backtrace.
fn assert_one_error_line(out: &Output) -> String {
    let err = stderr(out);
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "a panic:\n{err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{err}");
    lines[0].to_string()
}

fn path_str(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn version_prints_the_crate_version() {
    let out = run(&["--version"]);
    assert_eq!(code(&out), 0);
    assert!(
        stdout(&out).contains(env!("CARGO_PKG_VERSION")),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_bad_command_line_exits_2() {
    for args in [
        &["--no-such-flag"][..],
        &["check", "--bogus"],
        &["frobnicate"],
        &["lifecycle", "set", "retiring"],
        &[],
    ] {
        let out = run(args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{args:?}");
    }
}

#[test]
fn check_prints_an_aligned_table_and_exits_0_when_all_pass() {
    let dir = tempdir();
    let cfg = write_config(dir.path(), &healthy_checks(dir.path()));
    let out = run(&["check", "-c", path_str(&cfg.path)]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "a header and three rows:\n{text}");
    let header = lines[0];
    assert!(header.starts_with("STATUS"), "{header}");
    // Each column starts at the same offset on every line, after at least two spaces.
    let cols: Vec<usize> = ["CHECK", "VALUE", "MESSAGE"]
        .iter()
        .map(|h| header.find(h).unwrap())
        .collect();
    for line in &lines[1..] {
        for &c in &cols {
            let b = line.as_bytes();
            assert!(b.len() > c, "short line {line:?}");
            assert!(
                b[c - 1] == b' ' && b[c - 2] == b' ' && b[c] != b' ',
                "column at {c} misaligned:\n{text}"
            );
        }
        assert!(line.starts_with("OK "), "{line}");
    }
    let names: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l[cols[0]..].split_whitespace().next().unwrap())
        .collect();
    assert_eq!(names, ["scratch", "tests", "host"]);
}

#[test]
fn check_exits_with_the_worst_nagios_code() {
    let dir = tempdir();
    let cfg = write_config(
        dir.path(),
        &format!("{}\n{GHOST_CHECK}", healthy_checks(dir.path())),
    );
    let out = run(&["check", "-c", path_str(&cfg.path)]);
    assert_eq!(code(&out), 2, "{}{}", stdout(&out), stderr(&out));
    let row = stdout(&out)
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("ghost"))
        .map(String::from);
    assert!(
        row.as_deref().is_some_and(|r| r.starts_with("CRITICAL ")),
        "{}",
        stdout(&out)
    );

    // Running only the healthy ones is 0 again; only the critical one is 2.
    let out = run(&["check", "-c", path_str(&cfg.path), "scratch", "tests"]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    let out = run(&["check", "-c", path_str(&cfg.path), "ghost"]);
    assert_eq!(code(&out), 2, "{}", stdout(&out));

    // A pidfile whose process does not exist cannot be measured as "running": not ok.
    let unknown = format!(
        "[check.process.gone]\npidfile = {:?}\n",
        dir.path().join("nothing.pid").display().to_string()
    );
    let cfg = write_config(dir.path(), &unknown);
    let out = run(&["check", "-c", path_str(&cfg.path)]);
    assert_ne!(code(&out), 0, "{}", stdout(&out));
}

#[test]
fn check_json_prints_the_checks_array() {
    let dir = tempdir();
    let cfg = write_config(
        dir.path(),
        &format!("{}\n{GHOST_CHECK}", healthy_checks(dir.path())),
    );
    let out = run(&["check", "-c", path_str(&cfg.path), "--json"]);
    assert_eq!(
        code(&out),
        2,
        "--json keeps the Nagios exit code: {}",
        stderr(&out)
    );
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    let arr = v.as_array().unwrap();
    let mut names: Vec<&str> = arr.iter().map(|c| c["name"].as_str().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(names, ["ghost", "host", "scratch", "tests"]);
    for c in arr {
        assert_check_object(c);
    }
    let ghost = arr.iter().find(|c| c["name"] == "ghost").unwrap();
    assert_eq!(ghost["status"], "critical");
    assert_eq!(ghost["kind"], "process");
    assert_eq!(ghost["value"], 0.0);

    // The same shape as the agent's /checks.
    let agent = Agent::start(&cfg);
    let (_, api) = agent.get_json("/checks");
    for (a, b) in api.as_array().unwrap().iter().zip(arr) {
        let ka: Vec<_> = a.as_object().unwrap().keys().collect();
        let kb: Vec<_> = b.as_object().unwrap().keys().collect();
        assert_eq!(ka, kb);
        assert_eq!(a["name"], b["name"]);
    }
    assert_eq!(CHECK_KEYS.len(), arr[0].as_object().unwrap().len());
}

#[test]
fn check_with_names_runs_only_those_and_an_unknown_name_exits_3() {
    let dir = tempdir();
    let cfg = write_config(
        dir.path(),
        &format!("{}\n{GHOST_CHECK}", healthy_checks(dir.path())),
    );
    let out = run(&["check", "-c", path_str(&cfg.path), "--json", "tests"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tests"]);

    let out = run(&["check", "-c", path_str(&cfg.path), "tests", "nope"]);
    assert_eq!(code(&out), 3);
    let line = assert_one_error_line(&out);
    assert!(line.contains("nope"), "{line}");
    assert!(out.stdout.is_empty(), "nothing ran: {}", stdout(&out));
}

#[test]
fn check_with_a_bad_config_exits_3() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/config/bad-unknown-kind.toml"
    );
    let out = run(&["check", "-c", fixture]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains(fixture), "{}", stderr(&out));
    let dir = tempdir();
    let missing = dir.path().join("missing.toml");
    let out = run(&["check", "-c", path_str(&missing)]);
    assert_eq!(code(&out), 3);
    assert!(assert_one_error_line(&out).contains(path_str(&missing)));
}

#[test]
fn status_exits_0_when_available_and_1_otherwise() {
    let dir = tempdir();
    let cfg = write_config(dir.path(), &healthy_checks(dir.path()));
    let agent = Agent::start(&cfg);
    let url = format!("http://{}", cfg.addr);

    let out = run(&["status", "--url", &url]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("available"), "{}", stdout(&out));

    let out = run(&["status", "--url", &url, "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    assert_health_document(&doc);
    assert_eq!(doc["state"], "available");
    let (_, api) = agent.get_json("/health");
    let mut ka: Vec<_> = api.as_object().unwrap().keys().collect();
    let mut kb: Vec<_> = doc.as_object().unwrap().keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb, "--json prints the /health document");

    // Through the config's admin socket, too.
    let out = run(&["status", "-c", path_str(&cfg.path)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    let (c, body) = unix_http(
        &cfg.socket,
        "POST",
        "/lifecycle",
        Some(r#"{"state":"retiring","reason":"drain"}"#),
    );
    assert_eq!(c, 200, "{body}");
    let out = run(&["status", "--url", &url]);
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    assert!(stdout(&out).contains("retiring"), "{}", stdout(&out));
    let out = run(&["status", "--url", &url, "--json"]);
    assert_eq!(code(&out), 1);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (doc["state"].as_str(), doc["lifecycle"].as_str()),
        (Some("retiring"), Some("retiring"))
    );
}

#[test]
fn status_exits_1_when_a_check_is_tripped_critical() {
    let dir = tempdir();
    let cfg = write_config(
        dir.path(),
        &format!("{}\n{GHOST_CHECK}", healthy_checks(dir.path())),
    );
    let _agent = Agent::start(&cfg);
    let out = run(&["status", "--url", &format!("http://{}", cfg.addr), "--json"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["state"], "unavailable");
}

#[test]
fn status_against_nobody_listening_exits_3_with_one_line() {
    let port = free_port();
    let out = run(&["status", "--url", &format!("http://127.0.0.1:{port}")]);
    assert_eq!(code(&out), 3, "{}", stdout(&out));
    assert_one_error_line(&out);
    assert!(out.stdout.is_empty());

    let dir = tempdir();
    let out = run(&["status", "--socket", path_str(&dir.path().join("no.sock"))]);
    assert_eq!(code(&out), 3);
    assert_one_error_line(&out);
}

#[test]
fn agent_with_its_port_taken_exits_69_with_one_clear_line() {
    let dir = tempdir();
    let cfg = write_config(dir.path(), &healthy_checks(dir.path()));
    let _holder = TcpListener::bind(cfg.addr).expect("hold the agent's port");
    let out = vigil()
        .args(["agent", "-c", path_str(&cfg.path)])
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    let line = assert_one_error_line(&out);
    assert!(
        line.contains(&cfg.addr.to_string()),
        "names the address: {line}"
    );
}

#[test]
fn agent_with_a_state_dir_through_a_file_exits_78_with_one_line() {
    let dir = tempdir();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "").unwrap();
    let cfg = write_config(dir.path(), &healthy_checks(dir.path()));
    let state = blocker.join("state");
    let text = std::fs::read_to_string(&cfg.path).unwrap().replace(
        &format!("state_dir = {:?}", path_str(&cfg.state_dir)),
        &format!("state_dir = {:?}", path_str(&state)),
    );
    assert!(text.contains(path_str(&state)));
    std::fs::write(&cfg.path, text).unwrap();
    let out = vigil()
        .args(["agent", "-c", path_str(&cfg.path)])
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    // A directory that cannot exist where the config puts it: a config error (78), so
    // systemd's RestartPreventExitStatus=78 stops a restart loop.
    assert_eq!(code(&out), 78, "{out:?}");
    let line = assert_one_error_line(&out);
    assert!(
        line.contains(path_str(&state)) && line.contains("[agent].state_dir"),
        "names the directory and the key: {line}"
    );
}

#[test]
fn vigil_config_is_used_when_c_is_absent() {
    let dir = tempdir();
    let cfg = write_config(dir.path(), &healthy_checks(dir.path()));
    let with_env = |args: &[&str], path: &str| {
        vigil()
            .args(args)
            .env("VIGIL_CONFIG", path)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };

    let out = with_env(&["config", "check"], path_str(&cfg.path));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains(path_str(&cfg.path)),
        "{}",
        stdout(&out)
    );

    let out = with_env(&["check", "--json"], path_str(&cfg.path));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);

    let bad = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/config/bad-unknown-kind.toml"
    );
    let out = with_env(&["config", "check"], bad);
    assert_eq!(code(&out), 78);
    assert!(stderr(&out).contains(bad), "{}", stderr(&out));

    // -c wins over $VIGIL_CONFIG.
    let out = vigil()
        .args(["config", "check", "-c", path_str(&cfg.path)])
        .env("VIGIL_CONFIG", bad)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // And `status` finds the agent's socket through it.
    let _agent = Agent::start(&cfg);
    let out = with_env(&["status", "--json"], path_str(&cfg.path));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

/// Two agents on one state directory would hand out the same heartbeat `seq` values: the
/// second refuses to start (73, EX_CANTCREAT) and names the reason; the first keeps serving.
#[test]
fn a_second_agent_on_the_same_state_dir_is_refused() {
    let dir = tempdir();
    let cfg = write_config(&mkdir(dir.path().join("one")), "");
    let first = Agent::start(&cfg);

    let other = mkdir(dir.path().join("two"));
    let cfg2 = write_config(&other, "");
    // Same state_dir as the first agent, its own port and socket.
    let text = std::fs::read_to_string(&cfg2.path).unwrap().replace(
        &format!("{:?}", cfg2.state_dir.display().to_string()),
        &format!("{:?}", cfg.state_dir.display().to_string()),
    );
    std::fs::write(&cfg2.path, text).unwrap();
    let out = run(&["agent", "-c", path_str(&cfg2.path)]);
    assert_eq!(code(&out), 73, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another vigil agent is running with this state directory"),
        "{}",
        stderr(&out)
    );
    assert_eq!(first.get("/health").0, 200, "the first agent keeps serving");
}

fn mkdir(p: std::path::PathBuf) -> std::path::PathBuf {
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// `vigil image prep` refuses while the agent runs, then removes the host-unique state
/// (sequence, spool, key) and keeps what it does not own.
#[test]
fn image_prep_refuses_while_the_agent_runs_then_removes_host_state() {
    let dir = tempdir();
    let key = dir.path().join("hb.key");
    let cfg = write_config(
        dir.path(),
        &format!(
            "[heartbeat]\nurl = \"http://127.0.0.1:{}/hb\"\nkey_file = {:?}\n",
            free_port(),
            key.display().to_string()
        ),
    );
    assert_eq!(code(&run(&["keygen", "--out", path_str(&key)])), 0);
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    std::fs::write(cfg.state_dir.join("operator-notes.txt"), "kept").unwrap();
    let agent = Agent::start(&cfg);

    let out = run(&["image", "prep", "-c", path_str(&cfg.path)]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("an agent is running"),
        "{}",
        stderr(&out)
    );
    assert!(key.exists(), "nothing removed while refused");

    assert_eq!(agent.stop(), Some(0));
    let out = run(&["image", "prep", "-c", path_str(&cfg.path)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let printed = stdout(&out);
    for gone in [
        key,
        cfg.state_dir.join("heartbeat-seq.json"),
        // The control plane's port is closed: the agent spooled.
        cfg.state_dir.join("spool"),
    ] {
        assert!(!gone.exists(), "{} still there", gone.display());
        assert!(
            printed.contains(&format!("removed {}", gone.display())),
            "{printed}"
        );
    }
    assert!(cfg.state_dir.join("operator-notes.txt").exists());
}
