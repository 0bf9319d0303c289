//! The binary edge: parse the command line, run the subcommand, map errors to exit codes.
//!
//! Every error a user can cause is one line on stderr (`vigil: …`), never a panic.

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use hyper::Method;
use serde_json::{Value, json};

use vigil::checks::{CheckContext, Status};
use vigil::cli::{
    self, AutomationCommand, Cli, Command, ConfigCommand, ControlCommand, ImageCommand,
    LifecycleCommand,
};
use vigil::client::{self, Target};
use vigil::config::{self, Config, ConfigError};
use vigil::{exit, http, scheduler, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    ExitCode::from(match cli.command {
        Command::Agent { config } => agent(config.config.as_deref()),
        Command::Check {
            config,
            json,
            names,
        } => check(config.config.as_deref(), json, &names),
        Command::Config {
            command: ConfigCommand::Check { config },
        } => config_check(config.config.as_deref()),
        Command::Status {
            config,
            target,
            json,
        } => status(config.config.as_deref(), target, json),
        Command::Lifecycle { command } => lifecycle(command),
        Command::Image {
            command: ImageCommand::Prep { config, force },
        } => image_prep(config.config.as_deref(), force),
        Command::Keygen { out, if_missing } => keygen(&out, if_missing),
        Command::Control { config, command } => control(config.config.as_deref(), command),
        Command::Approve { file } => approve(&file),
        Command::Runner {
            config,
            socket,
            agent_user,
        } => runner(config.config.as_deref(), &socket, &agent_user),
        Command::Automation { command } => automation(command),
        Command::Remediate {
            name,
            reason,
            dry_run,
            config,
            socket,
        } => remediate(
            config.config.as_deref(),
            socket.as_deref(),
            &name,
            &reason,
            dry_run,
        ),
    })
}

/// `vigil control [enroll|revoke|hosts]`.
fn control(flag: Option<&Path>, command: Option<ControlCommand>) -> u8 {
    use vigil::control::cmd;
    match command {
        None => cmd::serve(flag),
        Some(ControlCommand::Enroll {
            from: Some(from), ..
        }) => cmd::enroll_from(flag, &from),
        Some(ControlCommand::Enroll { host, pubkey, .. }) => cmd::enroll(
            flag,
            host.as_deref().unwrap_or_default(),
            pubkey.as_deref().unwrap_or_default(),
        ),
        Some(ControlCommand::Revoke { host, key_id }) => {
            cmd::revoke(flag, &host, key_id.as_deref())
        }
        Some(ControlCommand::Hosts { json }) => cmd::hosts(flag, json),
    }
}

fn fail(msg: impl std::fmt::Display) {
    eprintln!("vigil: {msg}");
}

fn load(flag: Option<&Path>) -> Result<Config, ConfigError> {
    config::load(&config::resolve_path(flag))
}

/// Prints a config error, one line per problem.
fn config_error(e: &ConfigError) {
    for line in e.to_string().lines() {
        fail(line);
    }
}

/// The runtime of the agent, the runner and `vigil check`: one thread runs every task.
///
/// Their async work is small (probes that can block go to the blocking pool), so more
/// threads only add wake-ups between them: two workers against one measured idle CPU
/// 0.017 against 0.010 s/min and /health 56,600 against 63,800 req/s (benches/
/// side-by-side.sh, PHASES=vigil). One worker still parked the main thread and kept
/// libm's pages resident (its scheduler statistics call `pow` after every batch of
/// tasks); this runtime does neither, for about 200 KiB less RSS at the same idle CPU
/// and throughput, measured side by side on one cluster.
fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_current_thread()
        // Blocking probes (statvfs, pidfile reads) are short; a small pool bounds the threads
        // a hung filesystem can pin (stuck calls are not re-issued).
        .max_blocking_threads(16)
        // Keep idle blocking threads past a 10s check interval instead of creating a new
        // thread for every probe.
        .thread_keep_alive(std::time::Duration::from_secs(60))
        .enable_all()
        .build()
        .map_err(|e| {
            fail(format!("starting the runtime: {e}"));
            exit::SOFTWARE
        })
}

fn agent(flag: Option<&Path>) -> u8 {
    let path = config::resolve_path(flag);
    let cfg = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            config_error(&e);
            return exit::CONFIG;
        }
    };
    let tel = match telemetry::init(&cfg.log) {
        Ok(t) => t,
        Err(e) => {
            fail(format!("logging: {e}"));
            return exit::CONFIG;
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(vigil::agent::run(path, cfg, Some(tel.level)));
    // A probe stuck in the kernel (statvfs on a dead NFS mount, a read of a FIFO) holds a
    // blocking thread forever; dropping the runtime would wait for it. The agent is done,
    // so abandon such threads after a short grace.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            fail(&e);
            e.exit_code()
        }
    }
}

/// `vigil runner`: the privileged helper.
fn runner(flag: Option<&Path>, socket: &Path, agent_user: &str) -> u8 {
    let path = config::resolve_path(flag);
    let cfg = match vigil::runner_service::load_config(&path) {
        Ok(c) => c,
        Err(e) => {
            for line in e.to_string().lines() {
                fail(line);
            }
            return e.exit_code();
        }
    };
    if let Err(e) = telemetry::init(&cfg.log) {
        fail(format!("logging: {e}"));
        return exit::CONFIG;
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(vigil::runner_service::run(cfg, &path, socket, agent_user));
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            fail(&e);
            e.exit_code()
        }
    }
}

fn config_check(flag: Option<&Path>) -> u8 {
    let path = config::resolve_path(flag);
    match config::load(&path) {
        Ok(cfg) => {
            for w in cfg.secret_warnings(&path) {
                fail(format!("warning: {w}"));
            }
            let total = cfg.check.iter().count();
            let enabled = cfg.enabled_checks().count();
            println!(
                "{}: configuration OK ({total} checks, {enabled} enabled; {} remediations)",
                path.display(),
                cfg.remediation.len()
            );
            exit::OK
        }
        Err(e) => {
            config_error(&e);
            exit::CONFIG
        }
    }
}

fn check(flag: Option<&Path>, json_out: bool, names: &[String]) -> u8 {
    let cfg = match load(flag) {
        Ok(c) => c,
        Err(e) => {
            config_error(&e);
            return exit::UNKNOWN;
        }
    };
    // Warnings only (a passfile others can read, a refused connection): the table is the
    // answer, the log says what stood in the way.
    let log = config::LogConfig {
        level: "warn".into(),
        ..cfg.log.clone()
    };
    let _telemetry = telemetry::init(&log).ok();
    let Ok(rt) = runtime() else {
        return exit::UNKNOWN;
    };
    let views = match rt.block_on(scheduler::run_once(&cfg, names, CheckContext::host())) {
        Ok(v) => v,
        Err(e) => {
            fail(e);
            return exit::UNKNOWN;
        }
    };
    // A hung probe's blocking thread must not keep the process alive after the answer.
    rt.shutdown_background();
    if json_out {
        let arr: Vec<Value> = views.iter().map(|c| http::routes::check_json(c)).collect();
        println!("{}", serde_json::to_string_pretty(&arr).unwrap_or_default());
    } else {
        let mut rows = vec![vec![
            "STATUS".into(),
            "CHECK".into(),
            "VALUE".into(),
            "MESSAGE".into(),
        ]];
        for c in &views {
            rows.push(vec![
                c.status.as_str().to_uppercase(),
                c.name.clone(),
                cli::format_value(c.unit, c.value),
                c.message.clone(),
            ]);
        }
        print!("{}", cli::table(&rows));
    }
    views
        .iter()
        .map(|c| c.status.nagios_code())
        .max()
        .unwrap_or(Status::Ok.nagios_code())
}

/// `vigil keygen`: the two lines `vigil control enroll` and a config need, or one error line.
fn keygen(out: &Path, if_missing: bool) -> u8 {
    match vigil::heartbeat::keys::generate(out, if_missing) {
        Ok(info) => {
            println!("public_key = \"{}\"", info.public_key_b64);
            println!("key_id = \"{}\"", info.key_id);
            exit::OK
        }
        Err(e) => {
            fail(e);
            exit::FAILURE
        }
    }
}

fn image_prep(flag: Option<&Path>, force: bool) -> u8 {
    let cfg = match load(flag) {
        Ok(c) => c,
        Err(e) => {
            config_error(&e);
            return exit::CONFIG;
        }
    };
    match vigil::image::prep(&cfg, force) {
        Ok(removed) => {
            for p in &removed {
                println!("removed {}", p.display());
            }
            if removed.is_empty() {
                println!("nothing host-unique in {}", cfg.agent.state_dir.display());
            }
            // Not vigil's state, so a warning rather than a removal or a failure.
            for w in vigil::image::machine_id_warnings(Path::new("/")) {
                fail(format!("warning: {w}"));
            }
            exit::OK
        }
        Err(e @ vigil::image::PrepError::AgentRunning { .. }) => {
            fail(e);
            exit::FAILURE
        }
        Err(e) => {
            fail(e);
            exit::CANTCREAT
        }
    }
}

fn resolve_target(
    flag: Option<&Path>,
    url: Option<&str>,
    socket: Option<&Path>,
) -> Result<Target, u8> {
    if let Some(s) = socket {
        return Ok(Target::Socket(s.to_path_buf()));
    }
    if let Some(u) = url {
        return client::parse_url(u).map_err(|e| {
            fail(e);
            exit::USAGE
        });
    }
    match load(flag) {
        Ok(cfg) => Ok(client::target_from_config(&cfg)),
        Err(e) => {
            config_error(&e);
            Err(exit::UNKNOWN)
        }
    }
}

fn ask(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), u8> {
    ask_within(
        target,
        method,
        path,
        body,
        std::time::Duration::from_secs(5),
    )
}

fn ask_within(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Value>,
    limit: std::time::Duration,
) -> Result<(u16, Value), u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            fail(format!("starting the runtime: {e}"));
            exit::UNKNOWN
        })?;
    let body = body.map(|b| serde_json::to_vec(&b).unwrap_or_default());
    match rt.block_on(client::request_within(target, method, path, body, limit)) {
        Ok((code, bytes)) => match serde_json::from_slice(&bytes) {
            Ok(v) => Ok((code, v)),
            Err(_) => {
                fail(format!(
                    "{target} answered {code} with a body that is not JSON"
                ));
                Err(exit::UNKNOWN)
            }
        },
        Err(e) => {
            fail(e);
            Err(exit::UNKNOWN)
        }
    }
}

fn status(flag: Option<&Path>, target: cli::TargetArgs, json_out: bool) -> u8 {
    let target = match resolve_target(flag, target.url.as_deref(), target.socket.as_deref()) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let (code, v) = match ask(&target, Method::GET, "/health", None) {
        Ok(x) => x,
        Err(code) => return code,
    };
    if code == 403 || v.get("state").is_none() {
        fail(format!(
            "{target} answered {code}: {}",
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("unexpected answer")
        ));
        return exit::UNKNOWN;
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
        let counts = v.get("counts").cloned().unwrap_or(json!({}));
        let n = |k: &str| counts.get(k).and_then(Value::as_u64).unwrap_or(0);
        let tripped: Vec<String> = v
            .get("tripped")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "state:     {} (health {}, lifecycle {})",
            s("state"),
            s("health"),
            s("lifecycle")
        );
        println!(
            "checks:    {} ok, {} warning, {} critical, {} unknown",
            n("ok"),
            n("warning"),
            n("critical"),
            n("unknown")
        );
        println!(
            "tripped:   {}",
            if tripped.is_empty() {
                "none".to_string()
            } else {
                tripped.join(", ")
            }
        );
        if let Some(r) = v.get("reason").and_then(Value::as_str) {
            println!("reason:    {r}");
        }
        if let Some(e) = v.get("config_error").and_then(Value::as_str) {
            println!("config:    reload refused: {e}");
        }
    }
    if code == 200 { exit::OK } else { exit::FAILURE }
}

fn lifecycle(cmd: LifecycleCommand) -> u8 {
    match cmd {
        LifecycleCommand::Get { config, socket } => {
            let target = match resolve_target(config.config.as_deref(), None, socket.as_deref()) {
                Ok(t) => t,
                Err(code) => return code,
            };
            match ask(&target, Method::GET, "/health", None) {
                Ok((_, v)) => match v.get("lifecycle").and_then(Value::as_str) {
                    Some(l) => {
                        println!("{l}");
                        exit::OK
                    }
                    None => {
                        fail(format!(
                            "{target}: {}",
                            v.get("error")
                                .and_then(Value::as_str)
                                .unwrap_or("no lifecycle in the answer")
                        ));
                        exit::UNKNOWN
                    }
                },
                Err(code) => code,
            }
        }
        LifecycleCommand::Set {
            state,
            reason,
            config,
            socket,
        } => {
            let target = match resolve_target(config.config.as_deref(), None, socket.as_deref()) {
                Ok(t) => t,
                Err(code) => return code,
            };
            match ask(
                &target,
                Method::POST,
                "/lifecycle",
                Some(json!({ "state": state, "reason": reason })),
            ) {
                Ok((200, v)) => {
                    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                    println!("lifecycle: {} -> {}", s("previous"), s("state"));
                    exit::OK
                }
                Ok((code, v)) => {
                    let msg = v.get("error").and_then(Value::as_str).unwrap_or("refused");
                    match v.get("legal").and_then(Value::as_array) {
                        Some(legal) => {
                            let l: Vec<&str> = legal.iter().filter_map(Value::as_str).collect();
                            fail(format!(
                                "{msg}; legal: {}",
                                if l.is_empty() {
                                    "none".into()
                                } else {
                                    l.join(", ")
                                }
                            ));
                        }
                        None => fail(format!("{target} answered {code}: {msg}")),
                    }
                    exit::FAILURE
                }
                Err(code) => code,
            }
        }
    }
}

/// `vigil approve FILE`: the line that pins the script as it is now.
fn approve(file: &Path) -> u8 {
    match vigil::remediation::guard::approve_line(file) {
        Ok(line) => {
            println!("{line}");
            exit::OK
        }
        Err(e) => {
            fail(format!("{}: {e}", file.display()));
            exit::FAILURE
        }
    }
}

/// The admin socket from `--socket` or the config (never the read-only TCP listener: the
/// mutating endpoints are not there).
fn admin_target(flag: Option<&Path>, socket: Option<&Path>) -> Result<Target, u8> {
    if let Some(s) = socket {
        return Ok(Target::Socket(s.to_path_buf()));
    }
    match load(flag) {
        Ok(cfg) => Ok(Target::Socket(cfg.api.admin_socket)),
        Err(e) => {
            config_error(&e);
            Err(exit::UNKNOWN)
        }
    }
}

fn answer_error(target: &Target, code: u16, v: &Value) {
    fail(format!(
        "{target} answered {code}: {}",
        v.get("error").and_then(Value::as_str).unwrap_or("refused")
    ));
}

fn print_automation(v: &Value) {
    let paused = v.get("paused").and_then(Value::as_bool).unwrap_or(false);
    if paused {
        let reason = v.get("reason").and_then(Value::as_str).unwrap_or("");
        match v.get("until").and_then(Value::as_str) {
            Some(u) => println!("automation: paused until {u} ({reason})"),
            None => println!("automation: paused ({reason})"),
        }
    } else {
        println!("automation: running");
    }
}

/// `vigil automation pause|resume`.
fn automation(cmd: AutomationCommand) -> u8 {
    let (config, socket, path, body) = match cmd {
        AutomationCommand::Pause {
            for_,
            reason,
            config,
            socket,
        } => {
            let mut body = json!({ "reason": reason });
            if let Some(d) = for_ {
                body["for"] = json!(d.to_string());
            }
            (config, socket, "/automation/pause", body)
        }
        AutomationCommand::Resume {
            reason,
            config,
            socket,
        } => (
            config,
            socket,
            "/automation/resume",
            json!({ "reason": reason }),
        ),
    };
    let target = match admin_target(config.config.as_deref(), socket.as_deref()) {
        Ok(t) => t,
        Err(code) => return code,
    };
    match ask(&target, Method::POST, path, Some(body)) {
        Ok((200, v)) => {
            print_automation(&v);
            exit::OK
        }
        Ok((code, v)) => {
            answer_error(&target, code, &v);
            exit::FAILURE
        }
        Err(code) => code,
    }
}

/// Exit code of `vigil remediate` when a guardrail refused the run.
const REFUSED: u8 = 4;

/// `vigil remediate NAME --reason TEXT [--dry-run]`: 0 ran and succeeded (or a dry run
/// passed), 1 failed or timed out, 4 refused by a guardrail.
fn remediate(
    flag: Option<&Path>,
    socket: Option<&Path>,
    name: &str,
    reason: &str,
    dry_run: bool,
) -> u8 {
    let target = match admin_target(flag, socket) {
        Ok(t) => t,
        Err(code) => return code,
    };
    // The agent answers after the script and its verification; their limits are in the
    // agent's config, so wait long and let the agent's timeout decide.
    let limit = std::time::Duration::from_secs(24 * 3600);
    let path = format!("/remediations/{name}/run");
    let body = json!({ "reason": reason, "dry_run": dry_run });
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    match ask_within(&target, Method::POST, &path, Some(body), limit) {
        Ok((200, v)) => {
            let event = s(&v, "event");
            let reason = s(&v, "reason");
            println!(
                "{name}: {event}{}",
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({reason})")
                }
            );
            match event.as_str() {
                "succeeded" | "verified" | "skipped" => exit::OK,
                _ => exit::FAILURE,
            }
        }
        Ok((423, v)) => {
            fail(format!("{name}: refused: {}", s(&v, "reason")));
            REFUSED
        }
        Ok((code, v)) => {
            answer_error(&target, code, &v);
            if code == 404 {
                exit::FAILURE
            } else {
                exit::UNKNOWN
            }
        }
        Err(code) => code,
    }
}

/// The C library's `pow`, from the `libm` crate, for the one caller in the binary: the
/// poll-time average of tokio's multi-thread scheduler, which only `vigil control` runs.
/// Defined here, the linker binds that call inside the binary and `--as-needed` leaves
/// libm.so.6 out: mapped for this one function, it cost every agent about 300 KiB of RSS
/// (README "Performance").
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
// SAFETY: the name and signature are C's `double pow(double, double)`, and the body is a
// plain function of its arguments (musl's pow, within an ulp of glibc's). The symbol is
// exported, so a library the process loads later that calls pow binds to this one too.
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}
