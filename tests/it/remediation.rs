//! Remediation with real scripts and real processes: the whole trip → run → verify loop,
//! the guard (hash, owner, mode, place, a swap race), the guardrails and their
//! persistence, break glass, and what the script's process sees.

// Test helpers may unwrap freely (STYLE §4.4); clippy only exempts #[test] fns.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::{Agent, TestConfig, is_root, poll, run, tempdir, unix_http, vigil, write_config};

const NOBODY: u32 = 65534;

/// `dir/remediations.d` (0755) with each `(file, body)` as a 0755 script.
pub(crate) fn scripts(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    let rd = dir.join("remediations.d");
    std::fs::create_dir_all(&rd).unwrap();
    std::fs::set_permissions(&rd, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (name, body) in files {
        let p = rd.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    rd
}

/// `vigil approve FILE`'s line.
pub(crate) fn approve(p: &Path) -> String {
    let out = run(&["approve", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.starts_with("sha256 = \"") && line.trim_end().len() == 10 + 64 + 1);
    line.trim_end().to_string()
}

/// A `[remediation.NAME]` table for `rd/file`, pinned as it is now, plus `extra` keys.
pub(crate) fn remediation(rd: &Path, name: &str, file: &str, extra: &str) -> String {
    let p = rd.join(file);
    format!(
        "[remediation.{name}]\nscript = {:?}\n{}\n{extra}\n",
        p.display().to_string(),
        approve(&p)
    )
}

pub(crate) fn automation(rd: &Path, extra: &str) -> String {
    format!(
        "[automation]\ndir = {:?}\n{extra}\n",
        rd.display().to_string()
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn remediate(cfg: &TestConfig, name: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "remediate",
        name,
        "--reason",
        "test",
        "--socket",
        cfg.socket.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn records(cfg: &TestConfig) -> Vec<Value> {
    let (code, body) = unix_http(&cfg.socket, "GET", "/remediations", None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str::<Value>(&body)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn events_of(recs: &[Value], name: &str) -> Vec<String> {
    // Newest first on the wire; oldest first here.
    recs.iter()
        .rev()
        .filter(|r| r["remediation"] == name)
        .map(|r| r["event"].as_str().unwrap().to_string())
        .collect()
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

#[test]
fn the_whole_loop_a_missing_file_is_recreated_and_verified() {
    let dir = tempdir();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let rd = scripts(
        dir.path(),
        &[(
            "recreate.sh",
            "#!/bin/sh\necho \"$VIGIL_CHECK $VIGIL_STATUS\"\necho dump > \"$1/latest.dump\"\n",
        )],
    );
    let body = format!(
        "{}\n[check.backup.files.dumps]\nglob = \"{}/*.dump\"\ninterval = \"300ms\"\nremediation = \"recreate\"\n\n{}",
        automation(&rd, ""),
        data.display(),
        remediation(
            &rd,
            "recreate",
            "recreate.sh",
            &format!(
                "args = [{:?}]\nverify_after = \"100ms\"\ncooldown = \"1h\"",
                data.display().to_string()
            )
        ),
    );
    let cfg = write_config(dir.path(), &body);
    let _agent = Agent::start(&cfg);
    let recs = poll(Duration::from_secs(15), "a verified run", || {
        let r = records(&cfg);
        r.iter().any(|x| x["event"] == "verified").then_some(r)
    });
    assert!(data.join("latest.dump").exists());
    let run_id = recs.iter().find(|x| x["event"] == "verified").unwrap()["run_id"].clone();
    let run: Vec<&Value> = recs
        .iter()
        .rev()
        .filter(|x| x["run_id"] == run_id)
        .collect();
    let events: Vec<&str> = run.iter().map(|x| x["event"].as_str().unwrap()).collect();
    assert_eq!(
        events,
        ["queued", "started", "succeeded", "verified"],
        "{recs:#?}"
    );
    for r in &run {
        assert_eq!(r["trigger"], "check");
        assert_eq!(r["check"], "dumps");
        for key in [
            "run_id",
            "at",
            "remediation",
            "check",
            "trigger",
            "event",
            "reason",
            "exit_code",
            "duration_ms",
        ] {
            assert!(r.get(key).is_some(), "{key} missing in {r}");
        }
    }
    assert_eq!(run[2]["exit_code"], 0);
    assert_eq!(
        run[2]["stdout"], "dumps critical\n",
        "the script saw its context"
    );
    // The read-only listener shows the same records without the output.
    let (_, body) = crate::util::http(cfg.addr, "GET", "/remediations", None);
    let tcp: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert!(tcp.iter().all(|r| r.get("stdout").is_none()), "{body}");
}

#[test]
fn a_hanging_script_and_its_grandchild_are_killed_at_the_timeout() {
    let dir = tempdir();
    let pidfile = dir.path().join("pid");
    let rd = scripts(
        dir.path(),
        &[(
            "hang.sh",
            "#!/bin/sh\necho $$ > \"$1\"\nsleep 1000 &\nsleep 1000\n",
        )],
    );
    let body = format!(
        "{}{}",
        automation(&rd, ""),
        remediation(
            &rd,
            "hang",
            "hang.sh",
            &format!(
                "args = [{:?}]\ntimeout = \"1s\"",
                pidfile.display().to_string()
            )
        )
    );
    let cfg = write_config(dir.path(), &body);
    let _agent = Agent::start(&cfg);
    let out = remediate(&cfg, "hang", &[]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    let pgid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let r = &records(&cfg)[0];
    assert_eq!(r["event"], "timed_out", "{r}");
    // No live process of the group is left (zombies waiting for a reaper are dead).
    poll(
        Duration::from_secs(5),
        "the script's group to be gone",
        || {
            let alive: Vec<String> = std::fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
                .filter(|stat| {
                    // pid (comm) state ppid pgrp …: parse after the last ')'.
                    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    f.len() > 2 && f[2] == pgid.to_string() && f[0] != "Z"
                })
                .collect();
            alive.is_empty().then_some(())
        },
    );
}

#[test]
fn a_script_edited_after_approval_is_refused_and_audited() {
    let dir = tempdir();
    let marker = dir.path().join("ran");
    let rd = scripts(dir.path(), &[("fix.sh", "#!/bin/sh\ntouch \"$1\"\n")]);
    let body = format!(
        "{}{}",
        automation(&rd, ""),
        remediation(
            &rd,
            "fix",
            "fix.sh",
            &format!("args = [{:?}]", marker.display().to_string())
        )
    );
    let cfg = write_config(dir.path(), &body);
    let _agent = Agent::start(&cfg);
    std::fs::write(rd.join("fix.sh"), "#!/bin/sh\necho pwned > \"$1\"\n").unwrap();
    let out = remediate(&cfg, "fix", &[]);
    assert_eq!(code(&out), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("hash_mismatch"), "{}", stderr(&out));
    assert!(!marker.exists(), "the edited script must not run");
    let r = &records(&cfg)[0];
    assert_eq!(r["event"], "refused");
    assert!(
        r["reason"].as_str().unwrap().starts_with("hash_mismatch"),
        "{r}"
    );
}

#[test]
fn unsafe_scripts_and_bad_pins_are_refused_at_load_with_key_and_line() {
    let dir = tempdir();
    let outside = tempdir();
    let rd = scripts(
        dir.path(),
        &[
            ("gw.sh", "#!/bin/sh\n"),
            ("nobody.sh", "#!/bin/sh\n"),
            ("ok.sh", "#!/bin/sh\n"),
        ],
    );
    std::fs::set_permissions(rd.join("gw.sh"), std::fs::Permissions::from_mode(0o775)).unwrap();
    let ext = outside.path().join("ext.sh");
    std::fs::write(&ext, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&ext, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(&ext, rd.join("link.sh")).unwrap();
    let mut body = automation(&rd, "");
    body += &remediation(&rd, "gw", "gw.sh", "");
    if is_root() {
        std::os::unix::fs::chown(rd.join("nobody.sh"), Some(NOBODY), Some(NOBODY)).unwrap();
        body += &remediation(&rd, "other-owner", "nobody.sh", "");
    }
    body += &format!(
        "[remediation.link]\nscript = {:?}\n{}\n",
        rd.join("link.sh").display().to_string(),
        approve(&ext)
    );
    body += &format!(
        "[remediation.short-hash]\nscript = {:?}\nsha256 = \"abc\"\n",
        rd.join("ok.sh").display().to_string()
    );
    body += &format!(
        "[remediation.missing]\nscript = {:?}\nsha256 = \"{}\"\n",
        rd.join("nope.sh").display().to_string(),
        "0".repeat(64)
    );
    body += &remediation(&rd, "no-user", "ok.sh", "run_as = \"vigil-no-such-user\"");
    body += "[remediation.off]\nscript = \"/nowhere/x.sh\"\nsha256 = \"abc\"\nenabled = false\n";
    let cfg = write_config(dir.path(), &body);
    let out = run(&["config", "check", "-c", cfg.path.to_str().unwrap()]);
    assert_eq!(code(&out), Some(78), "{}", stderr(&out));
    let err = stderr(&out);
    let file = cfg.path.display().to_string();
    let line_with = |key: &str| -> String {
        err.lines()
            .find(|l| l.contains(&format!(": {key}: ")))
            .unwrap_or_else(|| panic!("no problem for {key}:\n{err}"))
            .to_string()
    };
    assert!(line_with("remediation.gw.script").contains("writable by group or others"));
    if is_root() {
        assert!(line_with("remediation.other-owner.script").contains("owned by uid 65534"));
    }
    assert!(line_with("remediation.link.script").contains("outside [automation].dir"));
    assert!(line_with("remediation.short-hash.sha256").contains("64 hex digits"));
    assert!(line_with("remediation.missing.script").contains("No such file"));
    assert!(line_with("remediation.no-user.run_as").contains("no such user"));
    // Each names the file and a line:column.
    for l in err.lines() {
        let rest = l
            .strip_prefix(&format!("vigil: {file}:"))
            .unwrap_or_else(|| panic!("{l}"));
        let mut parts = rest.splitn(3, ':');
        assert!(parts.next().unwrap().parse::<usize>().unwrap() > 1, "{l}");
        assert!(parts.next().unwrap().parse::<usize>().is_ok(), "{l}");
    }
    // A disabled remediation is checked for syntax only.
    assert!(!err.contains("remediation.off.script"), "{err}");
    // The agent refuses the same config with 78.
    let out = vigil()
        .args(["agent", "-c", cfg.path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(78), "{}", stderr(&out));
}

#[test]
fn a_swap_race_never_runs_unapproved_bytes() {
    let dir = tempdir();
    let log = dir.path().join("log");
    let good = "#!/bin/sh\necho approved >> \"$1\"\n";
    let evil = "#!/bin/sh\necho EVIL >> \"$1\"\n";
    let rd = scripts(
        dir.path(),
        &[("fix.sh", good), ("evil.src", evil), ("good.src", good)],
    );
    let body = format!(
        "{}{}",
        automation(&rd, ""),
        remediation(
            &rd,
            "fix",
            "fix.sh",
            &format!(
                "args = [{:?}]\ncooldown = \"0s\"\nmax_runs = 100000",
                log.display().to_string()
            )
        )
    );
    let cfg = write_config(dir.path(), &body);
    let _agent = Agent::start(&cfg);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for src in ["evil.src", "good.src"] {
                    let tmp = rd.join(format!("{src}.tmp"));
                    std::fs::copy(rd.join(src), &tmp).unwrap();
                    std::fs::rename(&tmp, rd.join("fix.sh")).unwrap();
                    swaps += 1;
                }
            }
            swaps
        })
    };
    let (mut ran, mut refused) = (0, 0);
    for _ in 0..40 {
        let out = remediate(&cfg, "fix", &[]);
        match code(&out) {
            Some(0) => ran += 1,
            Some(4) => {
                assert!(stderr(&out).contains("hash_mismatch"), "{}", stderr(&out));
                refused += 1;
            }
            other => panic!("{other:?}: {}", stderr(&out)),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("EVIL"), "unapproved bytes ran: {text}");
    assert_eq!(
        text.lines().count(),
        ran,
        "every run that succeeded ran the approved bytes"
    );
    assert!(swaps > 100, "the swapper barely ran ({swaps})");
    eprintln!("swap race: {ran} ran, {refused} refused, {swaps} swaps");
}

#[test]
fn cooldown_budget_and_escalation_hold_and_survive_a_restart() {
    let dir = tempdir();
    let rd = scripts(
        dir.path(),
        &[
            ("ok.sh", "#!/bin/sh\nexit 0\n"),
            ("bad.sh", "#!/bin/sh\nexit 3\n"),
        ],
    );
    let body = format!(
        "{}{}{}{}",
        automation(&rd, ""),
        remediation(&rd, "cool", "ok.sh", "cooldown = \"1h\""),
        remediation(
            &rd,
            "budget",
            "ok.sh",
            "cooldown = \"0s\"\nmax_runs = 2\nper = \"1h\""
        ),
        remediation(&rd, "flaky", "bad.sh", "cooldown = \"0s\"\nmax_runs = 100"),
    );
    let cfg = write_config(dir.path(), &body);
    let agent = Agent::start(&cfg);
    assert_eq!(code(&remediate(&cfg, "cool", &[])), Some(0));
    let out = remediate(&cfg, "cool", &[]);
    assert_eq!(code(&out), Some(4));
    assert!(stderr(&out).contains("cooldown"), "{}", stderr(&out));

    assert_eq!(code(&remediate(&cfg, "budget", &[])), Some(0));
    assert_eq!(code(&remediate(&cfg, "budget", &[])), Some(0));
    let out = remediate(&cfg, "budget", &[]);
    assert_eq!(code(&out), Some(4));
    assert!(stderr(&out).contains("budget"), "{}", stderr(&out));

    for _ in 0..3 {
        assert_eq!(code(&remediate(&cfg, "flaky", &[])), Some(1));
    }
    let ev = events_of(&records(&cfg), "flaky");
    assert_eq!(ev.iter().filter(|e| *e == "failed").count(), 3);
    assert_eq!(ev.last().map(String::as_str), Some("escalated"), "{ev:?}");
    let out = remediate(&cfg, "flaky", &[]);
    assert_eq!(code(&out), Some(4));
    assert!(stderr(&out).contains("escalated"), "{}", stderr(&out));
    let (_, h) = agent.get_json("/health");
    assert_eq!(h["automation"]["escalated"], json!(["flaky"]), "{h}");
    let (_, m) = agent.get("/metrics");
    assert!(
        m.contains("vigil_remediation_escalated{remediation=\"flaky\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("vigil_remediation_runs_total{remediation=\"flaky\",outcome=\"failed\"} 3"),
        "{m}"
    );
    crate::util::assert_promtool_accepts(&m);

    // A restart keeps all three in force.
    assert_eq!(agent.stop(), Some(0));
    let agent = Agent::start(&cfg);
    for (name, why) in [
        ("cool", "cooldown"),
        ("budget", "budget"),
        ("flaky", "escalated"),
    ] {
        let out = remediate(&cfg, name, &[]);
        assert_eq!(code(&out), Some(4), "{name}");
        assert!(stderr(&out).contains(why), "{name}: {}", stderr(&out));
    }
    assert_eq!(
        agent.get_json("/health").1["automation"]["escalated"],
        json!(["flaky"])
    );
    // Resume clears the escalation: the script runs (and fails) again.
    let out = run(&[
        "automation",
        "resume",
        "--socket",
        cfg.socket.to_str().unwrap(),
    ]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(code(&remediate(&cfg, "flaky", &[])), Some(1));
    assert_eq!(
        agent.get_json("/health").1["automation"]["escalated"],
        json!([])
    );
}

#[test]
fn paused_upgrading_and_dry_run_run_nothing_and_say_why() {
    let dir = tempdir();
    let marker = dir.path().join("ran");
    let rd = scripts(dir.path(), &[("fix.sh", "#!/bin/sh\ntouch \"$1\"\n")]);
    let extra = format!(
        "args = [{:?}]\ncooldown = \"0s\"",
        marker.display().to_string()
    );
    let body = format!(
        "{}{}",
        automation(&rd, ""),
        remediation(&rd, "fix", "fix.sh", &extra)
    );
    let cfg = write_config(dir.path(), &body);
    let agent = Agent::start(&cfg);
    let sock = cfg.socket.to_str().unwrap();

    let out = run(&[
        "automation",
        "pause",
        "--for",
        "1h",
        "--reason",
        "maintenance",
        "--socket",
        sock,
    ]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let (_, h) = agent.get_json("/health");
    assert_eq!(h["automation"]["paused"], true);
    assert_eq!(h["automation"]["reason"], "maintenance");
    assert!(h["automation"]["until"].is_string(), "{h}");
    let out = remediate(&cfg, "fix", &[]);
    assert_eq!(code(&out), Some(4));
    assert!(
        stderr(&out).contains("paused: maintenance"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        run(&["automation", "resume", "--socket", sock])
            .status
            .code(),
        Some(0)
    );

    let (c, _) = unix_http(
        &cfg.socket,
        "POST",
        "/lifecycle",
        Some(r#"{"state":"upgrading","reason":"test"}"#),
    );
    assert_eq!(c, 200);
    let out = remediate(&cfg, "fix", &[]);
    assert_eq!(code(&out), Some(4));
    assert!(
        stderr(&out).contains("lifecycle: the host is upgrading"),
        "{}",
        stderr(&out)
    );
    let (c, _) = unix_http(
        &cfg.socket,
        "POST",
        "/lifecycle",
        Some(r#"{"state":"available","reason":"test"}"#),
    );
    assert_eq!(c, 200);

    let out = remediate(&cfg, "fix", &["--dry-run"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("would run"));
    assert!(!marker.exists(), "nothing ran");
    let reasons: Vec<String> = records(&cfg)
        .iter()
        .filter(|r| r["event"] == "skipped")
        .map(|r| r["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].starts_with("dry_run (--dry-run): would run"),
        "{reasons:?}"
    );
    assert!(reasons[1].starts_with("lifecycle"), "{reasons:?}");
    assert!(reasons[2].starts_with("paused"), "{reasons:?}");
    drop(agent);

    // [automation].dry_run with a tripping check: queued, then skipped as a dry run.
    let dir = tempdir();
    let marker = dir.path().join("ran");
    let rd = scripts(dir.path(), &[("fix.sh", "#!/bin/sh\ntouch \"$1\"\n")]);
    let body = format!(
        "{}{}\n[check.process.ghost]\nname = \"no-such-comm-x\"\nmin = 1\nremediation = \"fix\"\n",
        automation(&rd, "dry_run = true"),
        remediation(
            &rd,
            "fix",
            "fix.sh",
            &format!("args = [{:?}]", marker.display().to_string())
        ),
    );
    let cfg = write_config(dir.path(), &body);
    let _agent = Agent::start(&cfg);
    let recs = poll(Duration::from_secs(10), "a dry-run record", || {
        let r = records(&cfg);
        r.iter().any(|x| x["event"] == "skipped").then_some(r)
    });
    assert_eq!(events_of(&recs, "fix")[..2], ["queued", "skipped"]);
    assert!(recs.iter().any(|r| {
        r["reason"]
            .as_str()
            .is_some_and(|s| s.starts_with("dry_run ([automation].dry_run)"))
    }));
    assert!(!marker.exists());
}

#[test]
fn the_admin_socket_refuses_a_pause_from_another_uid() {
    if !is_root() {
        eprintln!("skipped: needs root to connect as another user");
        return;
    }
    let dir = tempdir();
    let cfg = write_config(dir.path(), "");
    let agent = Agent::start(&cfg);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = vigil()
        .args([
            "automation",
            "pause",
            "--reason",
            "x",
            "--socket",
            cfg.socket.to_str().unwrap(),
        ])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    // 1: it reached the socket and was answered 403 (3 would mean it never connected).
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));
    assert_eq!(agent.get_json("/health").1["automation"]["paused"], false);
}

#[test]
fn the_script_sees_only_path_and_vigil_variables_in_a_sealed_copy() {
    let dir = tempdir();
    let out_file = dir.path().join("env.txt");
    // perl adds nothing to the environment it was given (a shell would add PWD and the
    // like); $0 shows what was executed.
    let rd = scripts(
        dir.path(),
        &[(
            "env.pl",
            "#!/usr/bin/perl\nuse Cwd;\nopen(my $f, '>', $ARGV[0]) or die;\n\
             print $f \"$_=$ENV{$_}\\n\" for sort keys %ENV;\nprint $f \"cwd=\", getcwd(), \"\\n\";\n",
        )],
    );
    let body = format!(
        "{}{}",
        automation(&rd, ""),
        remediation(
            &rd,
            "env",
            "env.pl",
            &format!("args = [{:?}]", out_file.display().to_string())
        )
    );
    let cfg = write_config(dir.path(), &body);
    let _agent = Agent::start(&cfg);
    let out = vigil()
        .args([
            "remediate",
            "env",
            "--reason",
            "t",
            "--socket",
            cfg.socket.to_str().unwrap(),
        ])
        .env("SECRET_TOKEN", "leak")
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(&out_file).unwrap();
    let keys: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("cwd="))
        .map(|l| l.split('=').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "PATH",
            "VIGIL_CHECK",
            "VIGIL_DRY_RUN",
            "VIGIL_HOST_ID",
            "VIGIL_MESSAGE",
            "VIGIL_RUN_ID",
            "VIGIL_STATUS",
            "VIGIL_VALUE"
        ],
        "{text}"
    );
    assert!(
        text.contains("PATH=/usr/sbin:/usr/bin:/sbin:/bin\n"),
        "{text}"
    );
    assert!(text.contains("VIGIL_DRY_RUN=0\n"), "{text}");
    assert!(text.contains("cwd=/\n"), "{text}");
    let run_id = records(&cfg)[0]["run_id"].as_str().unwrap().to_string();
    assert!(text.contains(&format!("VIGIL_RUN_ID={run_id}\n")), "{text}");
}
