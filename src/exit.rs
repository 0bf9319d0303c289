//! Exit codes: sysexits(3) for the daemon, Nagios codes for `vigil check`.

/// Success.
pub const OK: u8 = 0;
/// A generic failure (`status`: not available; `lifecycle set`: refused).
pub const FAILURE: u8 = 1;
/// A bad command line (clap's own code).
pub const USAGE: u8 = 2;
/// `vigil check`/`status`: unknown, unreachable, or a bad config.
pub const UNKNOWN: u8 = 3;
/// EX_UNAVAILABLE: a required resource (a listen address) is not available.
pub const UNAVAILABLE: u8 = 69;
/// EX_SOFTWARE: an internal error.
pub const SOFTWARE: u8 = 70;
/// EX_CANTCREAT: the state directory cannot be created or written.
pub const CANTCREAT: u8 = 73;
/// EX_CONFIG: an invalid config. systemd's `RestartPreventExitStatus=78` stops a loop.
pub const CONFIG: u8 = 78;
