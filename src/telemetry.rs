//! Logging through `tracing`: text or JSON to stderr (journald), optionally also to a file
//! rotated daily. The level comes from `RUST_LOG` when set, else `[log].level`; a reload
//! may change `[log].level` at run time, while the format and file need a restart.

use std::path::Path;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry, reload};

use crate::config::{LogConfig, LogFormat};

/// Changes the log filter at run time.
pub struct LevelHandle {
    handle: reload::Handle<Targets, Registry>,
    /// `RUST_LOG` wins over the config, also across reloads.
    from_env: bool,
}

impl LevelHandle {
    /// Applies `[log].level` unless `RUST_LOG` is in force.
    ///
    /// # Errors
    /// An invalid filter (the config validation normally catches it first).
    pub fn set(&self, level: &str) -> Result<(), String> {
        if self.from_env {
            return Ok(());
        }
        let filter = parse_filter(level)?;
        self.handle.reload(filter).map_err(|e| e.to_string())
    }
}

/// Parses a log filter: a level (`info`) and/or `target=level` pairs
/// (`warn,vigil=debug`), as `RUST_LOG` is commonly written.
///
/// `Targets` rather than `EnvFilter`: the span and field matching `EnvFilter` adds needs
/// a regex engine, about 200 KiB of code the agent would carry for a feature nobody
/// sets in `[log].level`.
///
/// # Errors
/// A directive that is not a level or `target=level`.
pub fn parse_filter(level: &str) -> Result<Targets, String> {
    level.parse::<Targets>().map_err(|e| e.to_string())
}

/// Keeps the file writer flushing; drop it last.
pub struct Telemetry {
    /// Flushes the file log when dropped.
    _guard: Option<WorkerGuard>,
    /// Runtime level changes.
    pub level: LevelHandle,
}

/// Installs the global subscriber.
///
/// # Errors
/// The log file's directory cannot be used, or a subscriber is already installed.
pub fn init(cfg: &LogConfig) -> Result<Telemetry, String> {
    let env = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    let from_env = env.is_some();
    let directive = env.unwrap_or_else(|| cfg.level.clone());
    let filter = parse_filter(&directive).map_err(|e| format!("log filter {directive:?}: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);

    let stderr = match cfg.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            // Colour only on a terminal: journald and log files get plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let (file, guard) = match &cfg.file {
        Some(path) => {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let name = path
                .file_name()
                .ok_or_else(|| format!("[log].file {} has no file name", path.display()))?;
            let appender = tracing_appender::rolling::RollingFileAppender::builder()
                .rotation(tracing_appender::rolling::Rotation::DAILY)
                .filename_prefix(name.to_string_lossy().into_owned())
                .build(dir)
                .map_err(|e| format!("[log].file {}: {e}", path.display()))?;
            let (w, g) = tracing_appender::non_blocking(appender);
            let layer = match cfg.format {
                LogFormat::Text => tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(w)
                    .boxed(),
                LogFormat::Json => tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(w)
                    .boxed(),
            };
            (Some(layer), Some(g))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(file)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(Telemetry {
        _guard: guard,
        level: LevelHandle { handle, from_env },
    })
}
