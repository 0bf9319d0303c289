//! SIGHUP reload: checks added and removed; an invalid config refused while the old one
//! keeps running; a change of `[api].listen` kept until a restart, with a warning.

// Test helpers may unwrap freely (STYLE §4.4); clippy only exempts #[test] fns.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::util::{Agent, TestConfig, poll, tempdir, try_http, write_config};

/// Generous bound for a reload and a few 200 ms samples.
const WAIT: Duration = Duration::from_secs(20);

/// A disk check on `dir` that the host's own disk cannot make non-ok.
fn disk_check(name: &str, dir: &std::path::Path) -> String {
    format!(
        "[check.disk.{name}]\npath = {:?}\nwarn = \"100%\"\ncrit = \"100%\"\ninterval = \"200ms\"\n\n",
        dir.display().to_string()
    )
}

/// Rewrites the config file of `cfg` with the same `[agent]` and `[api]` and a new body.
fn rewrite(cfg: &TestConfig, body: &str) {
    std::fs::write(&cfg.path, header(cfg) + body).unwrap();
}

/// The `[agent]` and `[api]` tables `write_config` wrote, without the checks.
fn header(cfg: &TestConfig) -> String {
    let text = std::fs::read_to_string(&cfg.path).unwrap();
    let end = text.find("[check.").unwrap_or(text.len());
    text[..end].to_string()
}

fn check_names(agent: &Agent) -> Vec<String> {
    let (code, v) = agent.get_json("/checks");
    assert_eq!(code, 200, "{v}");
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

fn sampled_at(agent: &Agent, name: &str) -> String {
    let (code, v) = agent.get_json(&format!("/checks/{name}"));
    assert_eq!(code, 200, "{v}");
    v["sampled_at"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} not sampled: {v}"))
        .to_string()
}

/// Waits until each named check has a newer `sampled_at` than now (whole seconds).
fn keeps_sampling(agent: &Agent, names: &[&str]) {
    for name in names {
        let before = sampled_at(agent, name);
        poll(WAIT, &format!("{name} to be sampled again"), || {
            (sampled_at(agent, name) != before).then_some(())
        });
    }
}

fn health(agent: &Agent) -> Value {
    agent.get_json("/health").1
}

#[test]
fn sighup_adds_and_removes_checks_and_refuses_an_invalid_config() {
    let dir = tempdir();
    let d = dir.path();
    let cfg = write_config(d, &(disk_check("a", d) + &disk_check("b", d)));
    let mut agent = Agent::start(&cfg);
    assert_eq!(check_names(&agent), ["a", "b"]);
    assert!(health(&agent)["config_error"].is_null());

    // b removed, c added.
    rewrite(&cfg, &(disk_check("a", d) + &disk_check("c", d)));
    agent.signal(Signal::SIGHUP);
    poll(WAIT, "checks to become [a, c]", || {
        (check_names(&agent) == ["a", "c"]).then_some(())
    });
    let (code, _) = agent.get_json("/checks/b");
    assert_eq!(code, 404, "a removed check is gone");
    poll(WAIT, "c to be sampled", || {
        let (_, v) = agent.get_json("/checks/c");
        (!v["sampled_at"].is_null()).then_some(())
    });
    let h = health(&agent);
    assert!(h["config_error"].is_null(), "{h}");

    // An unknown key: refused, shown in /health, the old config keeps running.
    rewrite(
        &cfg,
        &(disk_check("a", d)
            + &disk_check("c", d)
            + "[check.disk.d]\npath = \"/\"\nbogus_key = 1\n"),
    );
    agent.signal(Signal::SIGHUP);
    let err = poll(WAIT, "/health config_error to be set", || {
        match &health(&agent)["config_error"] {
            Value::String(s) => Some(s.clone()),
            _ => None,
        }
    });
    assert!(err.contains("bogus_key"), "the error names the key: {err}");
    assert_eq!(check_names(&agent), ["a", "c"]);
    keeps_sampling(&agent, &["a", "c"]);
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited: {}",
        agent.logs()
    );
    let (code, text) = agent.get("/metrics");
    assert_eq!(code, 200);
    assert!(
        text.lines()
            .any(|l| l == "vigil_config_last_reload_successful 0"),
        "{text}"
    );

    // Fixed: accepted, the error is gone.
    rewrite(&cfg, &(disk_check("a", d) + &disk_check("c", d)));
    agent.signal(Signal::SIGHUP);
    poll(WAIT, "/health config_error to be null again", || {
        health(&agent)["config_error"].is_null().then_some(())
    });
    assert_eq!(check_names(&agent), ["a", "c"]);
    let (code, text) = agent.get("/metrics");
    assert_eq!(code, 200);
    assert!(
        text.lines()
            .any(|l| l == "vigil_config_last_reload_successful 1"),
        "{text}"
    );
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited: {}",
        agent.logs()
    );
}

#[test]
fn a_changed_listen_address_needs_a_restart_and_says_so() {
    let dir = tempdir();
    let d = dir.path();
    let cfg = write_config(d, &disk_check("a", d));
    let agent = Agent::start(&cfg);
    assert!(!agent.logs().contains("restart"), "{}", agent.logs());

    // The same file with another listen port and one more check: the check is applied,
    // the listener is not.
    let other_dir = d.join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = write_config(&other_dir, "");
    let text = header(&cfg).replace(&cfg.addr.to_string(), &other.addr.to_string());
    assert_ne!(text, header(&cfg), "the listen address was rewritten");
    std::fs::write(&cfg.path, text + &disk_check("a", d) + &disk_check("b", d)).unwrap();
    agent.signal(Signal::SIGHUP);
    poll(WAIT, "b to be added by the reload", || {
        (check_names(&agent) == ["a", "b"]).then_some(())
    });
    poll(WAIT, "a warning saying a restart is needed", || {
        agent
            .logs()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("restart"))
            .then_some(())
    });

    let (code, h) = agent.get_json("/health");
    assert_eq!(code, 200, "still served on the old address: {h}");
    assert!(
        h["config_error"].is_null(),
        "the rest of the config was applied: {h}"
    );
    assert!(
        try_http(other.addr, "GET", "/health", None).is_err(),
        "nothing listens on the new address before a restart"
    );
}
