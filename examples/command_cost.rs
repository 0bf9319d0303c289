//! Measures the `command` kind: one run of a real plugin from fork/exec to the
//! observation, one perfdata parse, and the agent's memory while a plugin prints 100 MiB.
//!
//! ```text
//! cargo run --release --example command_cost [RUNS]
//! ```
//!
//! - run cost: `check_dummy 0 ok` (Debian's monitoring-plugins-basic; `/bin/true` when it
//!   is missing) run `RUNS` times (default 200) one after another through the check, as
//!   the scheduler would: wall time per run (median, p90) and the CPU time it cost, this
//!   process and its children together (getrusage);
//! - parse cost: `parse_plugin_output` of check_load's line and of the guidelines'
//!   multi-line check_disk example;
//! - memory: this process's peak RSS (VmHWM, reset through `/proc/self/clear_refs` before
//!   the run) while a plugin writes 100 MiB to stdout, against the RSS before it. Bounded
//!   output means the peak barely moves.
//!
//! Built with the release profile the agent ships with, so the numbers are the deployed
//! cost.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use vigil::checks::command::{CommandCheck, CommandConfig};
use vigil::checks::perfdata::parse_plugin_output;
use vigil::checks::{Check, CheckContext, Common, Status};

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let cx = CheckContext::host();

    // 1. One run of a plugin.
    let dummy = "/usr/lib/nagios/plugins/check_dummy";
    let argv: Vec<&str> = if Path::new(dummy).exists() {
        vec![dummy, "0", "ok"]
    } else {
        vec!["/bin/true"]
    };
    let mut check = command(&argv);
    let mut walls = Vec::with_capacity(runs);
    let cpu_before = cpu_seconds();
    for _ in 0..runs {
        let t = Instant::now();
        let o = rt.block_on(check.run(&cx)).expect("the plugin runs");
        walls.push(t.elapsed());
        assert_eq!(o.status, Status::Ok);
    }
    let cpu = cpu_seconds() - cpu_before;
    walls.sort();
    println!("command run ({}), {runs} runs:", argv.join(" "));
    println!(
        "  wall per run: median {:?}, p90 {:?}, max {:?}",
        walls[runs / 2],
        walls[runs * 9 / 10],
        walls[runs - 1]
    );
    println!(
        "  CPU per run (agent + plugin, user + system): {:?}",
        Duration::from_secs_f64(cpu / runs as f64)
    );

    // 2. One perfdata parse.
    let load = "LOAD OK - total load average: 2.39, 2.59, 2.07|load1=2.390;5.000;10.000;0; \
                load5=2.590;4.000;8.000;0; load15=2.070;3.000;6.000;0; \n";
    let disk = "DISK OK - free space: / 3326 MB (56%); | /=2643MB;5948;5958;0;5968\n\
                / 15272 MB (77%);\n/boot 68 MB (69%);\n/home 69357 MB (27%);\n\
                /var/log 819 MB (84%); | /boot=68MB;88;93;0;98\n\
                /home=69357MB;253404;253409;0;253414 \n/var/log=818MB;970;975;0;980\n";
    for (what, text) in [
        ("check_load line, 3 items", load),
        ("check_disk multi-line, 4 items", disk),
    ] {
        let n = 200_000;
        let t = Instant::now();
        for _ in 0..n {
            black_box(parse_plugin_output(black_box(text)));
        }
        println!("perfdata parse ({what}): {:?} per parse", t.elapsed() / n);
    }

    // 3. Memory while a plugin prints 100 MiB.
    let flood = command(&[
        "sh",
        "-c",
        "echo 'FLOOD OK | first=1'; head -c 104857600 /dev/zero | tr '\\0' y; exit 0",
    ]);
    let mut flood = flood;
    let rss_before = status_kib("VmRSS");
    // "5" resets the peak RSS (VmHWM) to the current RSS (proc(5), Linux >= 4.0).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let t = Instant::now();
    let o = rt.block_on(flood.run(&cx)).expect("the flood runs");
    let took = t.elapsed();
    let hwm = status_kib("VmHWM");
    println!(
        "100 MiB plugin: status {}, message {:?}, {took:?}",
        o.status, o.message
    );
    println!(
        "  RSS before {} KiB, peak during the run {} KiB{}: +{} KiB",
        rss_before,
        hwm,
        if reset {
            ""
        } else {
            " (peak not reset: since start)"
        },
        hwm.saturating_sub(rss_before)
    );

    // Control: the same plugin read whole (std's `output()`), to show the method sees
    // memory growth when there is some.
    let rss_before = status_kib("VmRSS");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            "echo 'FLOOD OK | first=1'; head -c 104857600 /dev/zero | tr '\\0' y; exit 0",
        ])
        .output()
        .expect("sh runs");
    let hwm = status_kib("VmHWM");
    println!(
        "  control, read unbounded ({} bytes kept): RSS before {rss_before} KiB, peak {hwm} KiB: \
         +{} KiB",
        black_box(out.stdout.len()),
        hwm.saturating_sub(rss_before)
    );
}

fn command(argv: &[&str]) -> CommandCheck {
    let list: Vec<String> = argv
        .iter()
        .map(|a| toml::Value::String(a.to_string()).to_string())
        .collect();
    let cfg: CommandConfig =
        toml::from_str(&format!("command = [{}]", list.join(", "))).expect("a command config");
    let common = Common {
        timeout: Duration::from_secs(60),
        ..Common::default()
    };
    CommandCheck::from_config(&cfg, &common)
}

/// User + system CPU seconds of this process and its reaped children (utime, stime,
/// cutime, cstime of /proc/self/stat, in clock ticks; getrusage would need another nix
/// feature for an example).
fn cpu_seconds() -> f64 {
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command's closing parenthesis start at field 3 (state);
    // utime..cstime are fields 14..17.
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    stat[close + 1..]
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse::<f64>().ok())
        .sum::<f64>()
        / tick
}

/// A `kB` field of /proc/self/status.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
