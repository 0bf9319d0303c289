//! `command`: runs a Nagios-convention plugin and reports what it says.
//!
//! `command = ["/usr/lib/nagios/plugins/check_load", "-r", "-w", "2,1.5,1"]` is an argv:
//! no shell (whoever wants one writes `["sh", "-c", "…"]` themselves). The program runs
//! through the shared [`crate::runner`], as the backup kinds' tools do: a cleared
//! environment (`PATH=/usr/sbin:/usr/bin:/sbin:/bin`) plus `env`, working directory `/`,
//! stdin `/dev/null`, optionally as `run_as`, in its own process group that gets SIGTERM
//! and then SIGKILL at the check's timeout, and at most [`MAX_OUTPUT`] bytes of each of
//! stdout and stderr kept (the rest is read and thrown away, so memory stays bounded
//! whatever the plugin prints).
//!
//! Status: the exit code, per the plugin guidelines: 0 ok, 1 warning, 2 critical, 3
//! unknown. Anything else — another code (a shell's 126 "not executable" or 127 "not
//! found"), a signal, the timeout, a program that cannot be started — is `unknown` with
//! the reason, through a [`CheckError`] (the check "could not measure").
//!
//! The message is the first line of stdout before `|` (the plugin's own words, cut at
//! [`MESSAGE_MAX`] characters); when stdout is empty, the first line of stderr. The
//! primary value is the plugin's status code (0–3, unit `status`).
//!
//! Performance data (see [`super::perfdata`]) becomes metrics, the plugin's label kept in
//! a `label` label, one family per normalised unit:
//! - `vigil_command_perfdata_seconds` (`s`, `ms`, `us`),
//! - `vigil_command_perfdata_bytes` (`B`, `KB`, `MB`, `GB`, `TB`; powers of 1024),
//! - `vigil_command_perfdata_ratio` (`%`, as a ratio 0–1 like every vigil ratio),
//! - `vigil_command_perfdata_total` (`c`, a counter),
//! - `vigil_command_perfdata` (no unit; an unlisted unit is kept as written in `uom`),
//!
//! and `vigil_command_perfdata_skipped` counts the items of the newest run that were not
//! exported (unreadable, a repeated label, beyond [`super::perfdata::MAX_ITEMS`]). A name
//! per unit rather than one name with a `uom` label: a Prometheus metric has one unit, and
//! a plugin that switches from `ms` to `s` keeps its series. When the output was cut at
//! [`MAX_OUTPUT`], only its complete lines are read, so a cut number is never exported.
//!
//! `warn` and `crit` are refused: the plugin decides the status, and thresholds belong in
//! its arguments (`-w`/`-c`). A missing plugin is not a config error (packages may be
//! installed after the agent); it is `unknown` with the reason at every run.

use std::time::Duration as StdDuration;

use indexmap::IndexMap;

use super::perfdata::{Family, PluginOutput, parse_plugin_output};
use crate::checks::program::{run_program, timed_out, tool_timeout};
use crate::checks::{Check, CheckContext, CheckError, Common, Metric, Observation, Status};
use crate::config::types::Number;
use crate::runner::{Exit, Outcome, Request, Runner, cut_chars};

/// Most bytes kept of each of stdout and stderr: Nagios 4 reads at most 64 KiB of a
/// plugin's output too, so a plugin written for it says everything within this.
pub const MAX_OUTPUT: usize = 64 * 1024;
/// Most characters of the message.
pub const MESSAGE_MAX: usize = 500;

crate::check_config! {
    /// `[check.command.NAME]`: a Nagios-convention plugin.
    pub struct CommandConfig: Number {
        /// The program and its arguments (no shell).
        pub command: Vec<String>,
        /// Run the plugin as this user.
        #[serde(default)]
        pub run_as: Option<String>,
        /// Variables added to its cleared environment.
        #[serde(default)]
        pub env: IndexMap<String, String>,
    }
}

impl CommandConfig {
    /// `command` must name a program (a bare name looked up in PATH, or an absolute path);
    /// `env` names must be valid; `warn`/`crit` are refused. `run_as` is checked by the
    /// config's validation, which knows whether a privileged runner is set.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        match self.command.first() {
            None => problems.push((
                "command",
                "must name a program: [\"/path/to/plugin\", \"arg\", …]".to_string(),
            )),
            Some(p) if p.trim().is_empty() => {
                problems.push(("command", "the program must not be empty".to_string()));
            }
            Some(p) if p.contains('/') && !p.starts_with('/') => problems.push((
                "command",
                format!(
                    "{p:?} must be a bare program name (looked up in PATH) or an absolute path"
                ),
            )),
            Some(_) => {}
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            problems.push(("command", "an argument holds a NUL byte".to_string()));
        }
        if let Some(k) = self
            .env
            .keys()
            .find(|k| k.is_empty() || k.contains(['=', '\0']))
        {
            problems.push(("env", format!("invalid environment variable name {k:?}")));
        }
        for (key, set) in [("warn", self.warn.is_some()), ("crit", self.crit.is_some())] {
            if set {
                problems.push((
                    key,
                    "a command check's status is its plugin's exit code; give the plugin its \
                     thresholds in `command` (e.g. -w/-c)"
                        .to_string(),
                ));
            }
        }
        problems
    }
}

/// A running `command` check.
pub struct CommandCheck {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    run_as: Option<String>,
    timeout: StdDuration,
    /// Runs the program (in process, or via the privileged runner).
    pub(crate) runner: Runner,
}

impl CommandCheck {
    /// Builds the check.
    pub fn from_config(c: &CommandConfig, common: &Common) -> Self {
        CommandCheck {
            argv: c.command.clone(),
            env: c.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            run_as: c.run_as.clone(),
            timeout: common.timeout,
            runner: Runner::in_process(),
        }
    }

    /// The runner's request: the runner times out before the scheduler, leaving room for
    /// the SIGTERM → SIGKILL grace, so the message can say the plugin hung.
    pub fn request(&self) -> Request {
        Request {
            argv: self.argv.clone(),
            env: self.env.clone(),
            run_as: self.run_as.clone(),
            timeout: tool_timeout(self.timeout),
            max_output: MAX_OUTPUT,
        }
    }
}

impl Check for CommandCheck {
    async fn run(&mut self, _cx: &CheckContext) -> Result<Observation, CheckError> {
        let req = self.request();
        let outcome = run_program(&self.runner, &req).await?;
        evaluate(&req, &outcome)
    }
}

/// The observation of a finished run (pure, for tests).
///
/// # Errors
/// `unknown` with the reason ([`CheckError`]) when the plugin did not exit 0–3: another
/// code, a signal, or the timeout.
pub fn evaluate(req: &Request, outcome: &Outcome) -> Result<Observation, CheckError> {
    let cmd = command_line(req);
    let said = || match outcome.first_error_line(MESSAGE_MAX) {
        l if l.is_empty() => String::new(),
        l => format!(": {l}"),
    };
    let status = match outcome.exit {
        Exit::Code(0) => Status::Ok,
        Exit::Code(1) => Status::Warning,
        Exit::Code(2) => Status::Critical,
        Exit::Code(3) => Status::Unknown,
        Exit::Code(c) => {
            let why = match c {
                126 => " (a shell's \"found but not executable\")",
                127 => " (a shell's \"command not found\")",
                _ => " (not a plugin status: 0-3)",
            };
            return Err(CheckError::Tool(format!(
                "`{cmd}` exited with {c}{why}{}",
                said()
            )));
        }
        Exit::Signal(s) => {
            let name = nix::sys::signal::Signal::try_from(s)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| format!("signal {s}"));
            return Err(CheckError::Tool(format!(
                "`{cmd}` was killed by {name}{}",
                said()
            )));
        }
        Exit::TimedOut => {
            return Err(timed_out(req));
        }
    };
    let parsed = parse_plugin_output(&complete_text(&outcome.stdout, outcome.stdout_truncated));
    let message = match parsed.message.as_str() {
        "" => match outcome.first_error_line(MESSAGE_MAX) {
            l if l.is_empty() => "(no output)".to_string(),
            l => l,
        },
        m => cut_chars(m, MESSAGE_MAX),
    };
    Ok(Observation {
        status,
        value: Some(f64::from(status.nagios_code())),
        message,
        metrics: perfdata_metrics(&parsed),
        replication: None,
    })
}

/// The command line as messages name it.
fn command_line(req: &Request) -> String {
    cut_chars(&req.argv.join(" "), 200)
}

/// stdout as text; when it was cut, only up to its last complete line (a cut line's
/// number could be wrong), unless the first line itself was cut (the message is still
/// worth showing, its perfdata is dropped).
fn complete_text(stdout: &[u8], truncated: bool) -> String {
    let text = String::from_utf8_lossy(stdout);
    if !truncated {
        return text.into_owned();
    }
    match text.rfind('\n') {
        Some(i) => text[..i].to_string(),
        None => text.split('|').next().unwrap_or("").to_string(),
    }
}

/// The metrics of the performance data (see the module docs for the names).
fn perfdata_metrics(parsed: &PluginOutput) -> Vec<Metric> {
    let mut metrics = Vec::with_capacity(parsed.perfdata.items.len() + 1);
    for item in &parsed.perfdata.items {
        let Some((family, value)) = item.normalised() else {
            continue;
        };
        let m = match family {
            Family::Seconds => Metric::gauge(
                "vigil_command_perfdata_seconds",
                "A plugin's performance data in seconds (from s, ms, us)",
                value,
            ),
            Family::Bytes => Metric::gauge(
                "vigil_command_perfdata_bytes",
                "A plugin's performance data in bytes (from B, KB, MB, GB, TB; powers of 1024)",
                value,
            ),
            Family::Ratio => Metric::gauge(
                "vigil_command_perfdata_ratio",
                "A plugin's performance data given in %, as a ratio 0-1",
                value,
            ),
            Family::Counter => Metric::counter(
                "vigil_command_perfdata_total",
                "A plugin's performance data of unit c (a counter)",
                value,
            ),
            Family::Plain => Metric::gauge(
                "vigil_command_perfdata",
                "A plugin's performance data without a unit (an unlisted unit is in uom)",
                value,
            ),
        };
        let m = m.label("label", item.label.as_str());
        metrics.push(if family == Family::Plain && !item.uom.is_empty() {
            m.label("uom", item.uom.as_str())
        } else {
            m
        });
    }
    metrics.push(Metric::gauge(
        "vigil_command_perfdata_skipped",
        "Performance data items of the newest run not exported (unreadable, repeated, too many)",
        parsed.perfdata.skipped as f64,
    ));
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> Request {
        Request::new(
            ["/usr/lib/nagios/plugins/check_x", "-w", "1"],
            StdDuration::from_secs(5),
        )
    }

    fn outcome(exit: Exit, stdout: &str, stderr: &str) -> Outcome {
        Outcome {
            exit,
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
            stdout_truncated: false,
            stderr_truncated: false,
            duration: StdDuration::ZERO,
        }
    }

    fn config(toml_text: &str) -> CommandConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn exit_codes_zero_to_three_are_the_status() {
        for (code, status) in [
            (0, Status::Ok),
            (1, Status::Warning),
            (2, Status::Critical),
            (3, Status::Unknown),
        ] {
            let o = evaluate(&req(), &outcome(Exit::Code(code), "X - fine|a=1\n", "")).unwrap();
            assert_eq!(o.status, status);
            assert_eq!(o.value, Some(f64::from(code)));
            assert_eq!(o.message, "X - fine");
        }
    }

    #[test]
    fn anything_else_is_unknown_with_the_reason() {
        let e = evaluate(
            &req(),
            &outcome(Exit::Code(127), "", "sh: 1: nope: not found\n"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "`/usr/lib/nagios/plugins/check_x -w 1` exited with 127 (a shell's \"command not \
             found\"): sh: 1: nope: not found"
        );
        let e = evaluate(&req(), &outcome(Exit::Code(4), "", ""))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("exited with 4 (not a plugin status: 0-3)"),
            "{e}"
        );
        let e = evaluate(&req(), &outcome(Exit::Signal(9), "", ""))
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("was killed by SIGKILL"), "{e}");
        let e = evaluate(&req(), &outcome(Exit::TimedOut, "", ""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no answer within 5s; its process group was killed"),
            "{e}"
        );
    }

    #[test]
    fn message_falls_back_to_stderr_and_is_cut() {
        let o = evaluate(&req(), &outcome(Exit::Code(3), "", "\nUsage: check_x -w\n")).unwrap();
        assert_eq!(o.message, "Usage: check_x -w");
        let o = evaluate(&req(), &outcome(Exit::Code(0), "", "")).unwrap();
        assert_eq!(o.message, "(no output)");
        let long = "y".repeat(MESSAGE_MAX + 10);
        let o = evaluate(&req(), &outcome(Exit::Code(0), &long, "")).unwrap();
        assert_eq!(o.message.chars().count(), MESSAGE_MAX + 1);
    }

    #[test]
    fn perfdata_becomes_one_family_per_unit() {
        let o = evaluate(
            &req(),
            &outcome(
                Exit::Code(0),
                "PING OK|rta=0.5ms;100;500;0 pl=0%;20;60 'free /'=2MB n=3c load=1.5 t=4C x=U bad\n",
                "",
            ),
        )
        .unwrap();
        let got: Vec<_> = o
            .metrics
            .iter()
            .map(|m| (m.name, m.labels.clone(), m.value))
            .collect();
        let l = |v: &str| vec![("label", v.to_string())];
        assert_eq!(
            got,
            [
                ("vigil_command_perfdata_seconds", l("rta"), 0.0005),
                ("vigil_command_perfdata_ratio", l("pl"), 0.0),
                (
                    "vigil_command_perfdata_bytes",
                    l("free /"),
                    2.0 * 1024.0 * 1024.0
                ),
                ("vigil_command_perfdata_total", l("n"), 3.0),
                ("vigil_command_perfdata", l("load"), 1.5),
                (
                    "vigil_command_perfdata",
                    vec![("label", "t".into()), ("uom", "C".into())],
                    4.0
                ),
                ("vigil_command_perfdata_skipped", vec![], 1.0),
            ]
        );
        assert_eq!(o.metrics[3].kind, crate::checks::MetricKind::Counter);
    }

    #[test]
    fn cut_output_is_read_up_to_its_last_whole_line() {
        let mut out = outcome(Exit::Code(0), "OK | a=1\nlong | b=2\nc=3", "");
        out.stdout_truncated = true;
        let o = evaluate(&req(), &out).unwrap();
        let labels: Vec<_> = o.metrics.iter().flat_map(|m| m.labels.clone()).collect();
        assert_eq!(labels, [("label", "a".into()), ("label", "b".into())]);
        // A first line cut mid-way: its message stays, its perfdata goes.
        let mut out = outcome(Exit::Code(0), "OK | a=12", "");
        out.stdout_truncated = true;
        let o = evaluate(&req(), &out).unwrap();
        assert_eq!(o.message, "OK");
        assert_eq!(
            o.metrics.len(),
            1,
            "only the skipped count: {:?}",
            o.metrics
        );
    }

    #[test]
    fn config_is_validated() {
        let ok = config("command = [\"check_dummy\", \"0\"]\nenv = { LANG = \"C\" }");
        assert!(ok.validate(true).is_empty(), "{:?}", ok.validate(true));
        let keys =
            |c: &str| -> Vec<&str> { config(c).validate(false).iter().map(|p| p.0).collect() };
        assert_eq!(keys("command = []"), ["command"]);
        assert_eq!(keys("command = [\"\"]"), ["command"]);
        assert_eq!(keys("command = [\"bin/check\"]"), ["command"]);
        assert_eq!(
            keys("command = [\"/x\"]\nenv = { \"A=B\" = \"1\" }"),
            ["env"]
        );
        assert_eq!(
            keys("command = [\"/x\"]\nwarn = 1\ncrit = 2"),
            ["warn", "crit"]
        );
        // `run_as` is the config's business (config::tests::run_as_must_exist_when_enabled).
        assert!(
            config("command = [\"/x\"]\nrun_as = \"no-such-user-vigil\"")
                .validate(true)
                .is_empty()
        );
        assert!(toml::from_str::<CommandConfig>("command = \"/bin/true\"").is_err());
        assert!(toml::from_str::<CommandConfig>("command = [\"/x\"]\nshell = true").is_err());
    }

    #[test]
    fn the_runner_gets_the_check_settings() {
        let c = config("command = [\"/p\", \"a b\"]\nrun_as = \"postgres\"\nenv = { A = \"1\" }");
        let common = Common {
            timeout: StdDuration::from_secs(10),
            ..Common::default()
        };
        let r = CommandCheck::from_config(&c, &common).request();
        assert_eq!(r.argv, ["/p", "a b"]);
        assert_eq!(r.env, [("A".to_string(), "1".to_string())]);
        assert_eq!(r.run_as.as_deref(), Some("postgres"));
        assert_eq!(r.timeout, StdDuration::from_millis(7_500));
        assert_eq!(r.max_output, MAX_OUTPUT);
    }
}
