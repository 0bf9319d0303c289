//! The admin socket: lifecycle transitions, their persistence, the socket's mode, and the
//! peer-credential check (SO_PEERCRED) that guards it even when its file mode does not.

// Test helpers may unwrap freely (STYLE §4.4); clippy only exempts #[test] fns.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Output;

use serde_json::{Value, json};

use crate::api::healthy_checks;
use crate::util::{Agent, TestConfig, http, is_root, run, tempdir, unix_http, vigil, write_config};

/// The user the unprivileged peer runs as.
const NOBODY: u32 = 65534;

fn start() -> (tempfile::TempDir, TestConfig, Agent) {
    let dir = tempdir();
    let cfg = write_config(dir.path(), &healthy_checks(dir.path()));
    let agent = Agent::start(&cfg);
    (dir, cfg, agent)
}

fn post_lifecycle(sock: &Path, body: &str) -> (u16, Value) {
    let (code, text) = unix_http(sock, "POST", "/lifecycle", Some(body));
    (
        code,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}")),
    )
}

fn set(sock: &Path, state: &str) -> (u16, Value) {
    post_lifecycle(
        sock,
        &json!({ "state": state, "reason": "test" }).to_string(),
    )
}

fn lifecycle_of(sock: &Path) -> String {
    let (code, body) = unix_http(sock, "GET", "/health", None);
    assert!(code == 200 || code == 503, "{code}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["lifecycle"].as_str().unwrap().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn sock_str(cfg: &TestConfig) -> &str {
    cfg.socket.to_str().unwrap()
}

#[test]
fn retiring_via_the_admin_socket_makes_health_503_retiring() {
    let (_dir, cfg, agent) = start();
    assert_eq!(agent.get_json("/health").0, 200);

    let (code, v) = post_lifecycle(&cfg.socket, r#"{"state":"retiring","reason":"drain"}"#);
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (v["state"].as_str(), v["previous"].as_str()),
        (Some("retiring"), Some("available")),
        "{v}"
    );

    let (code, h) = agent.get_json("/health");
    assert_eq!(code, 503, "{h}");
    assert_eq!(h["lifecycle"], "retiring");
    assert_eq!(h["state"], "retiring");
    assert_eq!(h["health"], "available", "the checks are still fine: {h}");
    // The admin socket serves the same read endpoints.
    let (code, body) = unix_http(&cfg.socket, "GET", "/health", None);
    assert_eq!(code, 503);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["state"],
        "retiring"
    );
}

#[test]
fn an_illegal_transition_is_409_listing_the_legal_states() {
    let (_dir, cfg, _agent) = start();
    assert_eq!(set(&cfg.socket, "retiring").0, 200);
    let (code, v) = set(&cfg.socket, "upgrading");
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].is_string() && v["reason"].is_string(), "{v}");
    assert_eq!(v["legal"], json!(["retired", "available"]));
    assert_eq!(
        lifecycle_of(&cfg.socket),
        "retiring",
        "a refused change changes nothing"
    );

    // Retired is final: nothing is legal from there.
    assert_eq!(set(&cfg.socket, "retired").0, 200);
    let (code, v) = set(&cfg.socket, "available");
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["legal"], json!([]));
}

#[test]
fn bad_bodies_and_unknown_states_are_400() {
    let (_dir, cfg, _agent) = start();
    for body in [
        "",
        "not json",
        "{\"state\":\"retiring\"",
        r#"{"state":"retiring"}"#,
        r#"{"reason":"x"}"#,
        r#"{"state":7,"reason":"x"}"#,
        r#"{"state":"retiring","reason":""}"#,
        r#"{"state":"retiring","reason":"x","extra":1}"#,
        "[]",
    ] {
        let (code, text) = unix_http(&cfg.socket, "POST", "/lifecycle", Some(body));
        assert_eq!(code, 400, "{body:?}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["error"].is_string() && v["reason"].is_string(), "{v}");
    }
    for state in ["archived", "terminated", "uncertain", "RETIRING", "nope"] {
        let (code, v) = set(&cfg.socket, state);
        assert_eq!(code, 400, "{state}: {v}");
    }
    assert_eq!(lifecycle_of(&cfg.socket), "available");
}

#[test]
fn the_lifecycle_survives_an_agent_restart() {
    let (_dir, cfg, agent) = start();
    assert_eq!(set(&cfg.socket, "retiring").0, 200);
    assert_eq!(agent.stop(), Some(0), "clean shutdown");

    let agent = Agent::start(&cfg);
    let (code, h) = agent.get_json("/health");
    assert_eq!(code, 503);
    assert_eq!(
        (h["lifecycle"].as_str(), h["state"].as_str()),
        (Some("retiring"), Some("retiring")),
        "{h}"
    );
    // And it carries on from there with the same table.
    assert_eq!(set(&cfg.socket, "available").0, 200);
    assert_eq!(agent.get_json("/health").0, 200);
}

#[test]
fn the_admin_socket_is_mode_0600_and_tcp_refuses_post() {
    let (_dir, cfg, agent) = start();
    let meta = std::fs::metadata(&cfg.socket).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o600,
        "admin socket mode {:o}",
        meta.permissions().mode()
    );
    assert_eq!(
        meta.uid(),
        nix::unistd::geteuid().as_raw(),
        "owned by the agent's user"
    );

    let (code, body) = http(
        agent.addr,
        "POST",
        "/lifecycle",
        Some(r#"{"state":"retiring","reason":"x"}"#),
    );
    assert_eq!(code, 405, "{body}");
    assert_eq!(lifecycle_of(&cfg.socket), "available");
}

#[test]
fn a_peer_that_is_neither_root_nor_the_agent_is_refused_even_when_the_socket_mode_allows_it() {
    if !is_root() {
        eprintln!("skipped: needs root to connect as another user");
        return;
    }
    // The test dir lives under CARGO_TARGET_TMPDIR (/work/main/target/tmp), whose parents
    // are world-traversable; only the temp dir itself (0700) must be opened up. The binary
    // under target/debug is world-executable.
    let (dir, cfg, _agent) = start();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o666)).unwrap();

    let out = vigil()
        .args([
            "lifecycle",
            "set",
            "retiring",
            "--reason",
            "x",
            "--socket",
            sock_str(&cfg),
        ])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    // 1, not 3: `nobody` reached the socket (the file mode let it in) and got an answer,
    // a refusal; 3 would mean it never connected and the test proved nothing.
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    assert_eq!(
        lifecycle_of(&cfg.socket),
        "available",
        "the lifecycle is unchanged"
    );
}

#[test]
fn lifecycle_set_and_get_through_the_cli() {
    let (_dir, cfg, agent) = start();
    let sock = sock_str(&cfg);

    let out = run(&["lifecycle", "get", "--socket", sock]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "available");

    // Legal: available -> upgrading.
    let out = run(&[
        "lifecycle",
        "set",
        "upgrading",
        "--reason",
        "kernel update",
        "--socket",
        sock,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(&["lifecycle", "get", "--socket", sock]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "upgrading");
    assert_eq!(agent.get_json("/health").1["state"], "upgrading");

    // Illegal: upgrading -> retired; exit 1 and the legal ones on stderr.
    let out = run(&[
        "lifecycle",
        "set",
        "retired",
        "--reason",
        "x",
        "--socket",
        sock,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    for legal in ["available", "restart", "retiring"] {
        assert!(err.contains(legal), "stderr does not list {legal}: {err}");
    }
    let out = run(&["lifecycle", "get", "--socket", sock]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "upgrading");

    // The config's admin socket is found without --socket.
    let out = run(&["lifecycle", "get", "-c", cfg.path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "upgrading");

    // An unknown state is refused, not silently accepted.
    let out = run(&[
        "lifecycle",
        "set",
        "archived",
        "--reason",
        "x",
        "--socket",
        sock,
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&run(&["lifecycle", "get", "--socket", sock]).stdout).trim(),
        "upgrading"
    );
}

#[test]
fn the_whole_transition_table_holds_through_the_admin_socket() {
    // From each lifecycle state (reached by a legal path), every target is accepted exactly
    // when the contract's table allows it. Each probe uses a fresh agent state, so a
    // successful probe does not disturb the next one.
    const TABLE: &[(&str, &[&str])] = &[
        ("available", &["upgrading", "restart", "retiring"]),
        ("upgrading", &["available", "restart", "retiring"]),
        ("restart", &["available", "upgrading"]),
        ("retiring", &["retired", "available"]),
        ("retired", &[]),
    ];
    const PATH_TO: &[(&str, &[&str])] = &[
        ("available", &[]),
        ("upgrading", &["upgrading"]),
        ("restart", &["restart"]),
        ("retiring", &["retiring"]),
        ("retired", &["retiring", "retired"]),
    ];
    const ALL: [&str; 6] = [
        "installing",
        "available",
        "upgrading",
        "restart",
        "retiring",
        "retired",
    ];
    let (_dir, cfg, agent) = start();
    let state_file = cfg.state_dir.join("lifecycle.json");
    let mut agent = Some(agent);
    for (from, legal) in TABLE {
        for to in ALL {
            // Reset: a fresh state dir starts `available`.
            if let Some(a) = agent.take() {
                assert_eq!(a.stop(), Some(0));
            }
            let _ = std::fs::remove_file(&state_file);
            agent = Some(Agent::start(&cfg));
            for step in PATH_TO.iter().find(|(s, _)| s == from).unwrap().1 {
                assert_eq!(set(&cfg.socket, step).0, 200, "reaching {from} via {step}");
            }
            assert_eq!(lifecycle_of(&cfg.socket), *from);
            let (code, v) = set(&cfg.socket, to);
            if legal.contains(&to) {
                assert_eq!(code, 200, "{from} -> {to}: {v}");
                assert_eq!(lifecycle_of(&cfg.socket), to);
            } else {
                assert_eq!(code, 409, "{from} -> {to}: {v}");
                assert_eq!(v["legal"], json!(legal), "{from} -> {to}");
                assert_eq!(lifecycle_of(&cfg.socket), *from);
            }
        }
    }
}

#[test]
fn installing_as_the_initial_lifecycle_only_leads_to_available_or_retiring() {
    let dir = tempdir();
    let body = format!("{}\n", healthy_checks(dir.path()));
    let cfg = write_config(dir.path(), &body);
    let text = std::fs::read_to_string(&cfg.path)
        .unwrap()
        .replace("[agent]\n", "[agent]\ninitial_lifecycle = \"installing\"\n");
    std::fs::write(&cfg.path, text).unwrap();
    let agent = Agent::start(&cfg);
    let (code, h) = agent.get_json("/health");
    assert_eq!(
        (code, h["state"].as_str()),
        (503, Some("installing")),
        "{h}"
    );
    let (code, v) = set(&cfg.socket, "upgrading");
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["legal"], json!(["available", "retiring"]));
    assert_eq!(set(&cfg.socket, "available").0, 200);
    assert_eq!(agent.get_json("/health").0, 200);
}
