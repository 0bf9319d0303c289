//! The command line (clap derive) and the formatting of its output.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::checks::Unit;

/// vigil: an on-host health agent for database fleets.
#[derive(Debug, Parser)]
#[command(name = "vigil", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The config file option shared by the subcommands.
#[derive(Debug, Args, Clone)]
pub struct ConfigArg {
    /// Config file [default: $VIGIL_CONFIG, then /etc/vigil/vigil.toml]
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The config option of `vigil control` and its subcommands.
#[derive(Debug, Args, Clone)]
pub struct ControlConfigArg {
    /// Config file [default: $VIGIL_CONTROL_CONFIG, then /etc/vigil/control.toml]
    #[arg(short = 'c', long = "config", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
}

/// Where to reach a running agent.
#[derive(Debug, Args, Clone)]
pub struct TargetArgs {
    /// The agent's HTTP address, e.g. http://127.0.0.1:9797
    #[arg(long, value_name = "URL", conflicts_with = "socket")]
    pub url: Option<String>,
    /// The agent's admin socket
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// The subcommands.
// clap turns doc comments into help text; the flattened option groups and nested
// subcommand fields have no help of their own, so they carry no doc comment.
#[allow(missing_docs)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Agent {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run the configured checks once and print the results (Nagios exit codes).
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the JSON array of /checks instead of a table.
        #[arg(long)]
        json: bool,
        /// Only these checks (a disabled check runs when named).
        #[arg(value_name = "NAME")]
        names: Vec<String>,
    },
    /// Validate a config file.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Ask a running agent for its state.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        target: TargetArgs,
        /// Print the /health document.
        #[arg(long)]
        json: bool,
    },
    /// Read or set the operator lifecycle state.
    Lifecycle {
        #[command(subcommand)]
        command: LifecycleCommand,
    },
    /// Prepare a machine image.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Run the reference control plane (heartbeat receiver), or manage its hosts.
    Control {
        #[command(flatten)]
        config: ControlConfigArg,
        #[command(subcommand)]
        command: Option<ControlCommand>,
    },
    /// Print the `sha256 = "..."` line that pins a remediation script.
    Approve {
        /// The script, as it is now (review it first).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Stop or restart automatic remediation (break glass).
    Automation {
        #[command(subcommand)]
        command: AutomationCommand,
    },
    /// Run one approved remediation by hand, through every guardrail but the trigger.
    Remediate {
        /// The [remediation.NAME] to run.
        name: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
        /// Record what would run, run nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        config: ConfigArg,
        /// The agent's admin socket
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Run the privileged helper that runs programs as another user for the agent
    /// (as root, in its own unit).
    Runner {
        #[command(flatten)]
        config: ConfigArg,
        /// The socket to listen on (ignored when systemd passes one)
        #[arg(long, value_name = "PATH", default_value = crate::runner_service::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The only user whose requests are answered (SO_PEERCRED)
        #[arg(long, value_name = "NAME", default_value = crate::runner_service::DEFAULT_AGENT_USER)]
        agent_user: String,
    },
    /// Create the Ed25519 heartbeat signing key (mode 0600) and print its public key and id.
    Keygen {
        /// Where to write the key (PKCS#8 PEM); an existing file is never replaced.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Keep an existing key and print its lines instead of failing.
        #[arg(long)]
        if_missing: bool,
    },
}

/// `vigil config …`
#[allow(missing_docs)]
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config without running anything (exit 0 valid, 78 invalid).
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// `vigil image …`
#[allow(missing_docs)]
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Remove host-unique state (heartbeat key, sequence, spool, lifecycle) before the
    /// image is snapshotted; refused while the agent runs. Warns (on stderr) when the
    /// image still has a machine id (/etc/machine-id not empty, or
    /// /var/lib/dbus/machine-id), which would give every host the same host id.
    Prep {
        #[command(flatten)]
        config: ConfigArg,
        /// Run even while an agent holds the state directory.
        #[arg(long)]
        force: bool,
    },
}

/// `vigil control …`
#[allow(missing_docs)]
#[derive(Debug, Subcommand)]
pub enum ControlCommand {
    /// Enroll a host's public key (takes effect at once, also in a running receiver), or
    /// many at once with --from.
    Enroll {
        /// The host id, as the agent's heartbeats carry it.
        #[arg(long = "host", value_name = "ID", required_unless_present = "from")]
        host: Option<String>,
        /// The public key as `vigil keygen` prints it (standard base64 of 32 bytes).
        #[arg(long, value_name = "B64", required_unless_present = "from")]
        pubkey: Option<String>,
        /// Enroll every `HOST_ID PUBKEY_B64` line of FILE (`-`: standard input; blank lines
        /// and `#` comments are skipped) in one durable write. Every line is checked
        /// first: a bad one is reported as FILE:LINE and nothing is enrolled.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["host", "pubkey"])]
        from: Option<PathBuf>,
    },
    /// Revoke one key of a host (--key-id), or all of them.
    Revoke {
        /// The host id.
        #[arg(long = "host", value_name = "ID")]
        host: String,
        /// The key id (`key_id` as `vigil keygen` prints it); omitted: every key.
        #[arg(long, value_name = "KID")]
        key_id: Option<String>,
    },
    /// List enrolled hosts and their derived state.
    Hosts {
        /// Print the JSON array of /v1/hosts.
        #[arg(long)]
        json: bool,
    },
}

/// `vigil lifecycle …`
#[allow(missing_docs)]
#[derive(Debug, Subcommand)]
pub enum LifecycleCommand {
    /// Print the lifecycle state.
    Get {
        #[command(flatten)]
        config: ConfigArg,
        /// The agent's admin socket
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Set the lifecycle state (legal transitions only).
    Set {
        /// installing, available, upgrading, restart, retiring or retired
        state: String,
        /// Why (recorded with the state).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        config: ConfigArg,
        /// The agent's admin socket
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
}

/// `vigil automation …`
#[allow(missing_docs)]
#[derive(Debug, Subcommand)]
pub enum AutomationCommand {
    /// Stop automatic remediation (until resumed, or for a while).
    Pause {
        /// Resume by itself after this long, e.g. "2h".
        #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration_arg)]
        for_: Option<crate::config::types::Duration>,
        /// Why (shown in /health and heartbeats).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        config: ConfigArg,
        /// The agent's admin socket
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Restart automatic remediation; also clears escalations.
    Resume {
        /// Why (logged).
        #[arg(long, default_value = "resumed by an operator")]
        reason: String,
        #[command(flatten)]
        config: ConfigArg,
        /// The agent's admin socket
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
}

fn parse_duration_arg(s: &str) -> Result<crate::config::types::Duration, String> {
    crate::config::types::parse_duration(s)
}

/// A value in its unit, for people: `43.2%`, `12.0 MiB`, `3.2s`.
pub fn format_value(unit: Unit, v: Option<f64>) -> String {
    let Some(v) = v else { return "-".into() };
    match unit {
        Unit::Ratio => format!("{:.1}%", v * 100.0),
        Unit::Bytes => format_bytes(v),
        Unit::Seconds => format_seconds(v),
        Unit::Count | Unit::Boolean | Unit::Status => format!("{v:.0}"),
        Unit::Load => format!("{v:.2}"),
    }
}

/// Bytes with binary units.
pub fn format_bytes(v: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut x = v;
    let mut i = 0;
    while x.abs() >= 1024.0 && i + 1 < UNITS.len() {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{x:.0} B")
    } else {
        format!("{x:.1} {}", UNITS[i])
    }
}

/// Seconds as the largest sensible unit.
pub fn format_seconds(v: f64) -> String {
    match v.abs() {
        s if s < 1.0 => format!("{:.0}ms", v * 1000.0),
        s if s < 120.0 => format!("{v:.1}s"),
        s if s < 7200.0 => format!("{:.1}m", v / 60.0),
        s if s < 172_800.0 => format!("{:.1}h", v / 3600.0),
        _ => format!("{:.1}d", v / 86400.0),
    }
}

/// Renders rows as left-aligned columns separated by two spaces; the last column is free.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_formatted_in_their_unit() {
        assert_eq!(format_value(Unit::Ratio, Some(0.432)), "43.2%");
        assert_eq!(
            format_value(Unit::Bytes, Some(12.0 * 1024.0 * 1024.0)),
            "12.0 MiB"
        );
        assert_eq!(format_value(Unit::Seconds, Some(3.2)), "3.2s");
        assert_eq!(format_value(Unit::Count, None), "-");
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&[
            vec!["a".into(), "bbb".into(), "x".into()],
            vec!["cc".into(), "d".into(), "y".into()],
        ]);
        assert_eq!(t, "a   bbb  x\ncc  d    y\n");
    }

    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
