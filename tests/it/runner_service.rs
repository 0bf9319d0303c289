//! `vigil runner`, the privileged helper, as a real root process on a temp socket with
//! `--agent-user nobody`; its clients are `/usr/bin/python3` processes started with the
//! uid under test (std's `CommandExt::uid`), speaking the one-line JSON protocol.
//!
//! Root only (the runner must own its config and switch users); skipped otherwise.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::{free_port, poll, skip_unless_root, tempdir, try_http, unix_http, vigil};

/// The client: sends argv[2] plus a newline to the socket argv[1], prints the answer.
const CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
out = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    out += b
sys.stdout.write(out.decode())
"#;

const NOBODY: u32 = 65534;

/// Why these tests are root only.
const WHY_ROOT: &str = "the runner owns its config and switches users";

/// A running `vigil runner`, killed on drop.
struct RunnerProc {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl RunnerProc {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the client as `uid` with primary group `gid`.
    fn client(&self, uid: u32, gid: u32, payload: &str) -> std::process::Output {
        Command::new("/usr/bin/python3")
            .args(["-c", CLIENT])
            .arg(&self.socket)
            .arg(payload)
            .current_dir("/")
            .env_clear()
            .uid(uid)
            .gid(gid)
            .output()
            .unwrap()
    }

    /// Sends `payload` as `uid` (with the agent's group, which may open the socket) and
    /// returns the answer.
    fn ask_as(&self, uid: u32, payload: &str) -> Value {
        let out = self.client(uid, uid_gid(NOBODY), payload);
        assert!(
            out.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    fn ask(&self, payload: &Value) -> Value {
        self.ask_as(NOBODY, &payload.to_string())
    }
}

impl Drop for RunnerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn uid_of(user: &str) -> u32 {
    nix::unistd::User::from_name(user)
        .unwrap()
        .unwrap_or_else(|| panic!("no user {user}"))
        .uid
        .as_raw()
}

fn uid_gid(uid: u32) -> u32 {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .unwrap()
        .unwrap()
        .gid
        .as_raw()
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn sha256(p: &Path) -> String {
    let out = vigil().arg("approve").arg(p).output().unwrap();
    let line = String::from_utf8(out.stdout).unwrap();
    line.trim()
        .trim_start_matches("sha256 = \"")
        .trim_end_matches('"')
        .to_string()
}

/// A temp dir (traversable for the clients) with the scripts and the config, and the
/// config's path.
fn setup() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempdir();
    let dir = tmp.path();
    chmod(dir, 0o755);
    let scripts = dir.join("remediations.d");
    std::fs::create_dir(&scripts).unwrap();
    chmod(&scripts, 0o755);
    let whoami = scripts.join("whoami.sh");
    std::fs::write(
        &whoami,
        "#!/bin/sh\nid -u\necho \"check=$VIGIL_CHECK path=$PATH\"\n",
    )
    .unwrap();
    chmod(&whoami, 0o755);
    let edited = scripts.join("edited.sh");
    std::fs::write(&edited, "#!/bin/sh\necho approved\n").unwrap();
    chmod(&edited, 0o755);
    let cfg = dir.join("vigil.toml");
    let text = format!(
        r#"[agent]
state_dir = {state:?}
runner_socket = {socket:?}

[automation]
dir = {scripts:?}

[check.command.as-postgres]
command = ["id", "-u"]
run_as = "postgres"

[check.disk.root]
path = "/"

[remediation.as-postgres]
script = {whoami:?}
sha256 = "{h1}"
run_as = "postgres"
timeout = "10s"

[remediation.as-agent]
script = {whoami:?}
sha256 = "{h1}"

[remediation.edited]
script = {edited:?}
sha256 = "{h2}"
run_as = "postgres"
"#,
        state = dir.join("state").display().to_string(),
        socket = dir.join("runner.sock").display().to_string(),
        scripts = scripts.display().to_string(),
        whoami = whoami.display().to_string(),
        edited = edited.display().to_string(),
        h1 = sha256(&whoami),
        h2 = sha256(&edited),
    );
    std::fs::write(&cfg, text).unwrap();
    chmod(&cfg, 0o644);
    (tmp, cfg)
}

/// `vigil runner` on `cfg`, listening on `dir/runner.sock` for `agent_user`.
fn runner(dir: &Path, cfg: &Path, agent_user: &str) -> Command {
    let mut c = vigil();
    c.arg("runner")
        .arg("-c")
        .arg(cfg)
        .arg("--socket")
        .arg(dir.join("runner.sock"))
        .args(["--agent-user", agent_user]);
    c
}

/// `vigil` as the agent's user (nobody), in `/`.
fn vigil_as_nobody() -> Command {
    let mut c = vigil();
    c.current_dir("/").uid(NOBODY).gid(uid_gid(NOBODY));
    c
}

fn start(dir: &Path, cfg: &Path) -> RunnerProc {
    let socket = dir.join("runner.sock");
    let log = dir.join("runner.log");
    let child = runner(dir, cfg, "nobody")
        .env_remove("NOTIFY_SOCKET")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut r = RunnerProc { child, socket, log };
    poll(Duration::from_secs(10), "the runner's socket", || {
        if let Ok(Some(status)) = r.child.try_wait() {
            panic!("the runner exited with {status}: {}", r.logs());
        }
        r.socket.exists().then_some(())
    });
    r
}

fn stdout_of(answer: &Value) -> String {
    let bytes: Vec<u8> = serde_json::from_value(answer["stdout"].clone())
        .unwrap_or_else(|e| panic!("{e}: {answer}"));
    String::from_utf8(bytes).unwrap()
}

fn error_of(answer: &Value) -> String {
    answer["error"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error answer: {answer}"))
        .to_string()
}

#[test]
fn the_runner_runs_approved_programs_as_their_users_for_the_agent_only() {
    if skip_unless_root(WHY_ROOT) {
        return;
    }
    let (dir, cfg) = setup();
    let r = start(dir.path(), &cfg);
    let postgres = uid_of("postgres");

    // The socket is for the agent's group only.
    let meta = std::fs::metadata(&r.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), uid_gid(NOBODY));

    // A remediation with run_as = "postgres" runs as postgres, with the VIGIL_* given and
    // the fixed PATH.
    let a = r.ask(&json!({"v": 1, "op": "remediation", "name": "as-postgres",
                           "env": {"VIGIL_CHECK": "pg-replication"}}));
    assert_eq!(a["exit"], json!({"code": 0}), "{a}");
    let out = stdout_of(&a);
    assert_eq!(
        out,
        format!("{postgres}\ncheck=pg-replication path=/usr/sbin:/usr/bin:/sbin:/bin\n")
    );

    // Without run_as it runs as the agent's user, never as root.
    let a = r.ask(&json!({"v": 1, "op": "remediation", "name": "as-agent"}));
    assert!(stdout_of(&a).starts_with(&format!("{NOBODY}\n")), "{a}");

    // A command check's program, built from the runner's own config, as postgres.
    let a = r.ask(&json!({"v": 1, "op": "check", "name": "as-postgres"}));
    assert_eq!(stdout_of(&a), format!("{postgres}\n"), "{a}");

    // Refusals, each an error answer with a stable keyword.
    let e = error_of(&r.ask(&json!({"v": 1, "op": "remediation", "name": "nope"})));
    assert!(e.starts_with("unknown: "), "{e}");
    let e = error_of(&r.ask(&json!({"v": 1, "op": "check", "name": "nope"})));
    assert!(e.starts_with("unknown: "), "{e}");
    let e = error_of(&r.ask(&json!({"v": 1, "op": "check", "name": "root"})));
    assert!(e.starts_with("not_a_program: "), "{e}");
    let e = error_of(
        &r.ask(&json!({"v": 1, "op": "remediation", "name": "as-postgres",
                                     "env": {"LD_PRELOAD": "/tmp/evil.so"}})),
    );
    assert!(e.starts_with("bad_env: \"LD_PRELOAD\""), "{e}");
    let e = error_of(&r.ask(&json!({"v": 1, "op": "check", "name": "as-postgres",
                                     "argv": ["/bin/sh", "-c", "id"]})));
    assert!(e.starts_with("bad_request: unknown field `argv`"), "{e}");
    let e = error_of(&r.ask(&json!({"v": 2, "op": "check", "name": "as-postgres"})));
    assert!(e.starts_with("bad_request: protocol version 2"), "{e}");
    let e = error_of(&r.ask_as(NOBODY, "\u{1}garbage{{"));
    assert!(e.starts_with("bad_request: "), "{e}");
    let e = error_of(&r.ask_as(NOBODY, &"x".repeat(70 * 1024)));
    assert!(e.contains("larger than 65536 bytes"), "{e}");

    // Another user cannot even open the socket (mode 0660, the agent's group)...
    let out = r.client(postgres, uid_gid(postgres), "{}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PermissionError"), "{stderr}");
    // ...and one that can (in the agent's group) is refused by SO_PEERCRED and logged,
    // root included (root needs no runner).
    let e = error_of(
        &r.ask_as(
            postgres,
            &json!({"v": 1, "op": "remediation",
                                                 "name": "as-postgres"})
            .to_string(),
        ),
    );
    assert_eq!(
        e,
        format!("forbidden: peer uid {postgres} is not the agent's user")
    );
    let e = error_of(
        &r.ask_as(
            0,
            &json!({"v": 1, "op": "check",
                                          "name": "as-postgres"})
            .to_string(),
        ),
    );
    assert_eq!(e, "forbidden: peer uid 0 is not the agent's user");
    let logs = r.logs();
    assert!(
        logs.contains("refusing a peer that is not the agent's user")
            && logs.contains(&format!("peer_uid=Some({postgres})")),
        "{logs}"
    );

    // A script edited after approval is refused by the runner's own guard.
    let edited = dir.path().join("remediations.d/edited.sh");
    let a = r.ask(&json!({"v": 1, "op": "remediation", "name": "edited"}));
    assert_eq!(stdout_of(&a), "approved\n");
    std::fs::write(&edited, "#!/bin/sh\necho tampered\n").unwrap();
    let e = error_of(&r.ask(&json!({"v": 1, "op": "remediation", "name": "edited"})));
    assert!(e.starts_with("guard: hash_mismatch: "), "{e}");

    // The runner survived every bad request.
    let a = r.ask(&json!({"v": 1, "op": "check", "name": "as-postgres"}));
    assert_eq!(a["exit"], json!({"code": 0}), "{a}");
}

#[test]
fn the_runner_refuses_a_config_others_can_write() {
    if skip_unless_root(WHY_ROOT) {
        return;
    }
    let (dir, cfg) = setup();
    // What a start that must fail (78, a config error) says.
    let refused = |what: &str, agent_user: &str| {
        let out = runner(dir.path(), &cfg, agent_user).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(78), "{what}: {stderr}");
        stderr
    };
    chmod(&cfg, 0o664);
    let e = refused("group-writable", "nobody");
    assert!(
        e.contains("is writable by group or others (mode 0664)"),
        "{e}"
    );
    chmod(&cfg, 0o644);
    std::os::unix::fs::chown(&cfg, Some(NOBODY), None).unwrap();
    let e = refused("owned by nobody", "nobody");
    assert!(e.contains(&format!("is owned by uid {NOBODY}")), "{e}");
    std::os::unix::fs::chown(&cfg, Some(0), None).unwrap();
    // An unknown agent user is a start error too.
    let stderr = refused("unknown agent user", "vigil-no-such-user");
    assert!(
        stderr.contains("--agent-user \"vigil-no-such-user\": no such user"),
        "{stderr}"
    );
}

/// An agent that is not root accepts `run_as` of another user only when a runner is
/// configured; the user must exist either way.
#[test]
fn run_as_another_user_needs_the_runner_socket_when_not_root() {
    if skip_unless_root(WHY_ROOT) {
        return;
    }
    let dir = tempdir();
    chmod(dir.path(), 0o755);
    let check = |runner_socket: bool, user: &str| {
        let cfg = dir.path().join("agent.toml");
        let agent = if runner_socket {
            "[agent]\nrunner_socket = \"/run/vigil/runner.sock\"\n\n"
        } else {
            ""
        };
        let text =
            format!("{agent}[check.command.as-other]\ncommand = [\"true\"]\nrun_as = \"{user}\"\n");
        std::fs::write(&cfg, text).unwrap();
        chmod(&cfg, 0o644);
        let out = vigil_as_nobody()
            .args(["config", "check", "-c"])
            .arg(&cfg)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = check(false, "postgres");
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("check.command.as-other.run_as")
            && err.contains("without root or the vigil runner"),
        "{err}"
    );
    let (code, err) = check(true, "postgres");
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = check(true, "vigil-no-such-user");
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("no such user"), "{err}");
}

/// An agent process running as the agent user (`vigil check`, the scheduler's own code
/// path) runs a `command` check with `run_as = "postgres"` through the runner.
#[test]
fn an_unprivileged_agent_runs_another_users_check_through_the_runner() {
    if skip_unless_root(WHY_ROOT) {
        return;
    }
    let (dir, cfg) = setup();
    let check_as_nobody = || {
        let out = vigil_as_nobody()
            .args(["check", "--json", "-c"])
            .arg(&cfg)
            .arg("as-postgres")
            .env_remove("VIGIL_CONFIG")
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        v[0].clone()
    };
    // No runner listening yet: unknown, and the message says why.
    let v = check_as_nobody();
    assert_eq!(v["status"], "unknown", "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("vigil runner at") && msg.contains("runner.sock"),
        "{v}"
    );

    let r = start(dir.path(), &cfg);
    let v = check_as_nobody();
    assert_eq!(v["status"], "ok", "{v}");
    let postgres = uid_of("postgres").to_string();
    assert!(v["message"].as_str().unwrap().contains(&postgres), "{v}");
    assert!(r.logs().contains("runner: request served"), "{}", r.logs());
}

/// The whole path: an agent running as the agent user (nobody) runs a remediation with
/// `run_as = "postgres"` through the runner; the audit record has postgres's output.
#[test]
fn an_unprivileged_agent_runs_another_users_remediation_through_the_runner() {
    if skip_unless_root(WHY_ROOT) {
        return;
    }
    let (dir, cfg) = setup();
    // The agent's own writable places, as systemd's StateDirectory/RuntimeDirectory give.
    let (state, run) = (dir.path().join("state"), dir.path().join("run"));
    for d in [&state, &run] {
        std::fs::create_dir(d).unwrap();
        std::os::unix::fs::chown(d, Some(NOBODY), Some(uid_gid(NOBODY))).unwrap();
    }
    let port = free_port();
    let admin = run.join("admin.sock");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "\n[api]\nlisten = \"127.0.0.1:{port}\"\nadmin_socket = {:?}\n",
        admin.display().to_string()
    ));
    std::fs::write(&cfg, text).unwrap();

    let r = start(dir.path(), &cfg);
    let log = dir.path().join("agent.log");
    let mut agent = vigil_as_nobody()
        .args(["agent", "-c"])
        .arg(&cfg)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    poll(Duration::from_secs(20), "the agent's first round", || {
        if let Ok(Some(st)) = agent.try_wait() {
            panic!(
                "agent exited with {st}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        match try_http(addr, "GET", "/health", None) {
            Ok((_, body)) if !body.contains("\"starting\"") => Some(()),
            _ => None,
        }
    });
    let out = vigil()
        .args([
            "remediate",
            "as-postgres",
            "--reason",
            "runner test",
            "--socket",
        ])
        .arg(&admin)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    // Newest first; admin access includes the output.
    let (code, body) = unix_http(&admin, "GET", "/remediations", None);
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{said}{}\nagent: {}\nrunner: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default(),
        r.logs()
    );
    assert!(said.contains("as-postgres: succeeded"), "{said}");
    assert_eq!(code, 200, "{body}");
    let records: Value = serde_json::from_str(&body).unwrap();
    let ran = records
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["event"] == "succeeded")
        .unwrap_or_else(|| panic!("no succeeded record: {body}"));
    let postgres = uid_of("postgres");
    let stdout = ran["stdout"].as_str().unwrap();
    assert!(
        stdout.starts_with(&format!("{postgres}\ncheck= path=")),
        "{ran}"
    );
    assert!(
        r.logs().contains("runner: running a remediation"),
        "{}",
        r.logs()
    );
}

/// SIGHUP reads the config again: a remediation added is served; a config others can
/// write is refused and logged, and the one in force stays.
#[test]
fn sighup_reloads_the_runners_config_and_refuses_an_unsafe_one() {
    if skip_unless_root(WHY_ROOT) {
        return;
    }
    let (dir, cfg) = setup();
    let r = start(dir.path(), &cfg);
    let ask_new = || r.ask(&json!({"v": 1, "op": "remediation", "name": "added"}));
    assert!(error_of(&ask_new()).starts_with("unknown: "));
    let text = std::fs::read_to_string(&cfg).unwrap();
    let whoami = dir.path().join("remediations.d/whoami.sh");
    let added = format!(
        "{text}\n[remediation.added]\nscript = {:?}\nsha256 = \"{}\"\nrun_as = \"postgres\"\n",
        whoami.display().to_string(),
        sha256(&whoami)
    );
    std::fs::write(&cfg, &added).unwrap();
    let hup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(r.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    hup();
    let a = poll(Duration::from_secs(10), "the added remediation", || {
        let a = ask_new();
        a.get("exit").is_some().then_some(a)
    });
    assert_eq!(a["exit"], json!({"code": 0}), "{a}");
    assert!(stdout_of(&a).starts_with(&format!("{}\n", uid_of("postgres"))));

    // Group-writable: refused on reload, the config in force stays.
    chmod(&cfg, 0o664);
    std::fs::write(&cfg, &text).unwrap();
    hup();
    poll(Duration::from_secs(10), "the refusal in the log", || {
        r.logs().contains("SIGHUP: config refused").then_some(())
    });
    assert!(r.logs().contains("mode 0664"), "{}", r.logs());
    assert_eq!(ask_new()["exit"], json!({"code": 0}));
}
