//! The shared program runner (`vigil::runner`) against real processes: fixture scripts in
//! `tests/fixtures/scripts/` that fork grandchildren, ignore SIGTERM, flood their pipes,
//! fail, or print the environment they got.
//!
//! Process liveness is read from `/proc` and polled with a deadline; a killed process
//! that is a zombie (its new parent may reap it late) counts as gone.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vigil::runner::{Exit, Outcome, Request, RunError, Runner};

use crate::util::{is_root, poll};

/// A fixture script's absolute path.
fn script(name: &str) -> String {
    let p: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests/fixtures/scripts", name]
        .iter()
        .collect();
    p.display().to_string()
}

/// Runs `fut` on a fresh current-thread runtime.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(fut)
}

/// Runs `req` with a short kill grace, so the SIGTERM-ignoring fixtures end quickly.
fn run(req: &Request) -> Result<Outcome, RunError> {
    block_on(
        Runner::in_process()
            .with_kill_grace(Duration::from_millis(300))
            .run(req),
    )
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next());
    state.is_some_and(|s| s != 'Z')
}

/// Polls until `pid` is gone; panics after 5 s.
fn assert_gone(pid: i32) {
    poll(Duration::from_secs(5), &format!("pid {pid} to die"), || {
        (!alive(pid)).then_some(())
    });
}

/// The pid a fixture printed on its first line of stdout.
fn printed_pid(o: &Outcome) -> i32 {
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in stdout {text:?}"))
}

#[test]
fn timeout_kills_the_whole_group_even_when_it_ignores_sigterm() {
    let started = Instant::now();
    let o = run(&Request::new(
        [script("sleep-with-grandchild.sh")],
        Duration::from_millis(500),
    ))
    .unwrap();
    assert_eq!(o.exit, Exit::TimedOut);
    // The output read before the timeout is kept: it names the grandchild.
    let grandchild = printed_pid(&o);
    assert_gone(grandchild);
    // Timeout + grace + reaping, not the script's 600 s.
    assert!(started.elapsed() < Duration::from_secs(5), "{o:?}");
    assert!(o.duration >= Duration::from_millis(500), "{o:?}");
}

#[test]
fn a_leader_that_exits_while_a_grandchild_holds_stdout_times_out_and_the_group_dies() {
    let o = run(&Request::new(
        [script("orphan-holds-stdout.sh")],
        Duration::from_millis(400),
    ))
    .unwrap();
    assert_eq!(o.exit, Exit::TimedOut);
    assert_gone(printed_pid(&o));
}

#[test]
fn dropping_the_run_mid_way_kills_the_group() {
    let path = script("sleep-with-grandchild.sh");
    // There is no outcome to read the grandchild's pid from: find the script's process
    // group through /proc while it runs.
    let members = block_on(async {
        let runner = Runner::in_process();
        let req = Request::new([path.as_str()], Duration::from_secs(600));
        let mut run = Box::pin(runner.run(&req));
        // Poll the run until the script and its grandchild exist, then drop it.
        let found = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::select! {
                r = run.as_mut() => panic!("ended early: {r:?}"),
                pids = async {
                    loop {
                        if let Some(leader) = group_of_script(&path) {
                            return group_members(leader);
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                } => pids,
            }
        })
        .await
        .expect("the script and its grandchild to start");
        drop(run);
        found
    });
    assert!(members.len() >= 3, "{members:?}");
    for pid in members {
        assert_gone(pid);
    }
}

/// Pids of live processes in process group `pgid` (from /proc).
fn group_members(pgid: i32) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        // After the comm: state ppid pgrp ...
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) {
            pids.push(pid);
        }
    }
    pids
}

/// The process group of the running `script` once it has at least 3 live members (the
/// shell, its background sleeper and its foreground sleeper).
fn group_of_script(script: &str) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let has_script = cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == script.as_bytes());
        if has_script && group_members(pid).len() >= 3 {
            return Some(pid);
        }
    }
    None
}

#[test]
fn ten_megabytes_on_both_pipes_are_capped_and_the_run_finishes() {
    let mut req = Request::new([script("print-10mb.sh")], Duration::from_secs(30));
    req.max_output = 64 * 1024;
    let started = Instant::now();
    let o = run(&req).unwrap();
    assert_eq!(o.exit, Exit::Code(0), "{:?}", o.first_error_line(100));
    assert_eq!(o.stdout.len(), 64 * 1024);
    assert_eq!(o.stderr.len(), 64 * 1024);
    assert!(o.stdout.iter().all(|b| *b == b'o'));
    assert!(o.stderr.iter().all(|b| *b == b'e'));
    assert!(o.stdout_truncated && o.stderr_truncated);
    assert!(started.elapsed() < Duration::from_secs(20));

    // Under the cap nothing is marked cut.
    let o = run(&Request::new(
        [script("exit-3.sh")],
        Duration::from_secs(10),
    ))
    .unwrap();
    assert!(!o.stdout_truncated && !o.stderr_truncated);
}

#[test]
fn exit_code_and_stderr_are_reported() {
    let o = run(&Request::new(
        [script("exit-3.sh")],
        Duration::from_secs(10),
    ))
    .unwrap();
    assert_eq!(o.exit, Exit::Code(3));
    assert!(!o.success());
    assert_eq!(o.stdout, b"partial result\n");
    assert_eq!(
        o.first_error_line(200),
        "ERROR: [003]: something went wrong"
    );
}

#[test]
fn a_signal_that_is_not_ours_is_reported_as_such() {
    let o = run(&Request::new(
        [script("kill-self.sh")],
        Duration::from_secs(10),
    ))
    .unwrap();
    assert_eq!(o.exit, Exit::Signal(9));
}

#[test]
fn a_missing_binary_is_a_spawn_error() {
    for argv in [
        "/nonexistent/vigil-no-such-tool",
        "vigil-no-such-tool-in-path",
    ] {
        match run(&Request::new([argv], Duration::from_secs(5))) {
            Err(RunError::Spawn { program, source }) => {
                assert_eq!(program, argv);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("{argv}: {other:?}"),
        }
    }
    assert!(matches!(
        run(&Request::new(Vec::<String>::new(), Duration::from_secs(5))),
        Err(RunError::Empty)
    ));
}

#[test]
fn the_environment_is_cleared_and_the_working_directory_is_root() {
    // The test process has HOME, CARGO_* and more: none of it may reach the program.
    let mut req = Request::new([script("print-env.sh")], Duration::from_secs(10));
    req.env = vec![
        ("PGBACKREST_REPO1_PATH".into(), "/srv/repo".into()),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    let o = run(&req).unwrap();
    assert_eq!(o.exit, Exit::Code(0));
    let text = String::from_utf8(o.stdout).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.pop(), Some("cwd=/"));
    lines.sort_unstable();
    assert_eq!(
        lines,
        [
            "LANG=C.UTF-8",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "PGBACKREST_REPO1_PATH=/srv/repo"
        ]
    );

    // The request may replace PATH; a bad variable name is refused before spawning.
    req.env = vec![("PATH".into(), "/bin".into())];
    let o = run(&req).unwrap();
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.lines().any(|l| l == "PATH=/bin"), "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("PATH=")).count(), 1);
    req.env = vec![("A=B".into(), "x".into())];
    assert!(matches!(run(&req), Err(RunError::Spawn { .. })));
}

#[test]
fn run_as_switches_user_only_when_root() {
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap()
        .name;
    // Our own user always works, and does not switch.
    let mut req = Request::new(["id", "-u"], Duration::from_secs(10));
    req.run_as = Some(me.clone());
    let o = run(&req).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        nix::unistd::geteuid().to_string()
    );
    assert!(Runner::in_process().can_run_as(&me).is_ok());

    req.run_as = Some("nobody".into());
    if is_root() {
        let o = run(&req).unwrap();
        assert_eq!(o.exit, Exit::Code(0));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "65534");
        assert!(Runner::in_process().can_run_as("nobody").is_ok());
    } else {
        assert!(matches!(run(&req), Err(RunError::User { .. })));
        assert!(matches!(
            Runner::in_process().can_run_as("nobody"),
            Err(RunError::User { .. })
        ));
    }
    req.run_as = Some("vigil-no-such-user-x".into());
    assert!(matches!(run(&req), Err(RunError::User { .. })));
}
