//! systemd notification: READY, STATUS, WATCHDOG, RELOADING, STOPPING.
//!
//! Each call is a silent no-op without `NOTIFY_SOCKET` (a development run), so callers
//! never need to know whether systemd supervises the agent. A failed send is logged at
//! debug level only: it must never stop the agent.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

fn send(states: &[NotifyState<'_>]) {
    if !supervised() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "sd_notify failed");
    }
}

/// Whether systemd (or another supervisor) listens for notifications.
pub fn supervised() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The agent listens and the first round of checks has run.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A one-line summary for `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// The scheduler is making progress.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// A reload finished (systemd 253+ expects RELOADING=1 … READY=1 around it).
pub fn reloaded(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The watchdog period systemd expects, when `WatchdogSec=` is set for this process.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}
