//! `disk` against a real tmpfs (as root): fill past crit, trip after `trip_after`, clear
//! after `clear_after`, read-only remount; and a path that disappears under a running agent.

// Test helpers may unwrap freely (STYLE §4.4); clippy only exempts #[test] fns.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::util::{Agent, is_root, poll, tempdir, write_config};

/// Generous bound for anything that takes a few 200 ms samples.
const WAIT: Duration = Duration::from_secs(20);

/// A small tmpfs mounted on a directory; unmounted (lazily if busy) on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        run_cmd(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir),
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    fn remount_ro(&self) {
        run_cmd(
            Command::new("mount")
                .args(["-o", "remount,ro"])
                .arg(&self.dir),
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn run_cmd(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `GET /checks/NAME`, asserting 200.
fn check(agent: &Agent, name: &str) -> Value {
    let (code, v) = agent.get_json(&format!("/checks/{name}"));
    assert_eq!(code, 200, "/checks/{name}: {v}");
    v
}

/// The value of the sample of metric `name` whose labels include `check="CHECK"`.
fn metric(text: &str, name: &str, check: &str) -> Option<f64> {
    let prefix = format!("{name}{{");
    let label = format!("check=\"{check}\"");
    text.lines()
        .find(|l| l.starts_with(&prefix) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn tmpfs_fills_trips_after_three_clears_after_two_and_read_only_is_critical() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = tempdir();
    let mnt = dir.path().join("mnt");
    let fs = Tmpfs::mount(&mnt, "4m");
    let cfg = write_config(
        dir.path(),
        &format!(
            "[check.disk.scratch]\npath = {:?}\nwarn = \"50%\"\ncrit = \"80%\"\ninterval = \"200ms\"\ntrip_after = 3\nclear_after = 2\n",
            mnt.display().to_string()
        ),
    );
    let agent = Agent::start(&cfg);

    let v = check(&agent, "scratch");
    assert_eq!(v["kind"], "disk");
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["tripped"], false, "{v}");
    assert!(v["value"].as_f64().is_some_and(|x| x < 0.5), "{v}");
    let (code, h) = agent.get_json("/health");
    assert_eq!(code, 200, "{h}");

    // 3.5 MiB of 4 MiB: past crit (80%).
    let fill = mnt.join("fill");
    std::fs::write(&fill, vec![0x5a_u8; 3584 * 1024]).unwrap();

    // Watch every answer until the check trips: while critical and not tripped the streak is
    // below trip_after; the first tripped answer has a streak of at least trip_after.
    let mut critical_untripped = 0;
    let tripped = poll(WAIT, "scratch to trip", || {
        let v = check(&agent, "scratch");
        let streak = v["streak"].as_u64().unwrap();
        match (
            v["status"].as_str().unwrap(),
            v["tripped"].as_bool().unwrap(),
        ) {
            (_, true) => Some(v),
            ("critical", false) => {
                assert!(
                    streak < 3,
                    "critical with streak {streak} but not tripped: {v}"
                );
                critical_untripped += 1;
                None
            }
            _ => None,
        }
    });
    assert_eq!(tripped["status"], "critical", "{tripped}");
    assert!(
        tripped["streak"].as_u64().unwrap() >= 3,
        "tripped before 3 non-ok samples: {tripped}"
    );
    assert!(
        tripped["value"].as_f64().is_some_and(|x| x >= 0.8),
        "{tripped}"
    );
    assert!(
        critical_untripped > 0,
        "never saw the critical-but-not-yet-tripped state (trip_after = 3 at 200ms)"
    );

    let (code, h) = agent.get_json("/health");
    assert_eq!(code, 503, "{h}");
    assert_eq!(h["reason"], "unavailable", "{h}");
    assert_eq!(h["state"], "unavailable", "{h}");
    assert_eq!(h["tripped"], serde_json::json!(["scratch"]), "{h}");

    // Free the space: one ok sample is not enough, the second clears.
    std::fs::remove_file(&fill).unwrap();
    let cleared = poll(WAIT, "scratch to clear", || {
        let v = check(&agent, "scratch");
        let streak = v["streak"].as_u64().unwrap();
        match (
            v["status"].as_str().unwrap(),
            v["tripped"].as_bool().unwrap(),
        ) {
            (_, false) => Some(v),
            ("ok", true) => {
                assert!(streak < 2, "ok with streak {streak} but still tripped: {v}");
                None
            }
            _ => None,
        }
    });
    assert_eq!(cleared["status"], "ok", "{cleared}");
    assert!(
        cleared["streak"].as_u64().unwrap() >= 2,
        "cleared before 2 ok samples: {cleared}"
    );
    let (code, h) = poll(WAIT, "/health 200 after clearing", || {
        let (code, h) = agent.get_json("/health");
        (code == 200).then_some((code, h))
    });
    assert_eq!(code, 200);
    assert_eq!(h["state"], "available", "{h}");
    assert_eq!(h["tripped"], serde_json::json!([]), "{h}");

    // Read-only: critical by itself (expect_writable defaults to true), space is near 0%.
    fs.remount_ro();
    let v = poll(WAIT, "scratch critical on a read-only mount", || {
        let v = check(&agent, "scratch");
        (v["status"] == "critical").then_some(v)
    });
    assert!(
        v["value"].as_f64().is_some_and(|x| x < 0.5),
        "read-only, not full: {v}"
    );
    let (code, text) = agent.get("/metrics");
    assert_eq!(code, 200);
    assert_eq!(
        metric(&text, "vigil_disk_readonly", "scratch"),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn a_path_that_disappears_is_unknown_and_the_agent_keeps_serving() {
    let dir = tempdir();
    let gone = dir.path().join("gone");
    std::fs::create_dir(&gone).unwrap();
    // Thresholds at 100% so the host's own disk cannot make this check critical.
    let cfg = write_config(
        dir.path(),
        &format!(
            "[check.disk.gone]\npath = {:?}\nwarn = \"100%\"\ncrit = \"100%\"\ninterval = \"200ms\"\n",
            gone.display().to_string()
        ),
    );
    let mut agent = Agent::start(&cfg);
    let v = check(&agent, "gone");
    assert_ne!(v["status"], "unknown", "{v}");
    assert!(v["value"].is_f64(), "{v}");

    std::fs::remove_dir(&gone).unwrap();
    let v = poll(WAIT, "gone to become unknown", || {
        let v = check(&agent, "gone");
        (v["status"] == "unknown").then_some(v)
    });
    assert!(v["value"].is_null(), "unknown must not carry a value: {v}");
    let first = v["sampled_at"].as_str().unwrap().to_string();

    // Still sampling (sampled_at has whole seconds, so wait for the next second), still unknown.
    let v = poll(WAIT, "gone to be sampled again", || {
        let v = check(&agent, "gone");
        (v["sampled_at"].as_str() != Some(first.as_str())).then_some(v)
    });
    assert_eq!(v["status"], "unknown", "{v}");

    // A non-essential unknown check does not make the host unavailable or uncertain.
    let (code, h) = agent.get_json("/health");
    assert_eq!(code, 200, "{h}");
    assert_eq!(h["counts"]["unknown"], 1, "{h}");
    let (code, _) = agent.get("/metrics");
    assert_eq!(code, 200);
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited: {}",
        agent.logs()
    );
}
