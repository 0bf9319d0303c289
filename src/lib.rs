//! vigil: an on-host health agent for database fleets.
//!
//! The map of the crate:
//! - [`cli`]: the command line; [`exit`]: exit codes;
//! - [`config`]: the TOML config, its value types and its errors;
//! - [`checks`]: the `Check` trait, the registry of kinds, one module per kind;
//! - [`scheduler`]: runs the checks on their intervals and publishes into [`state`];
//! - [`state`]: each check's newest result, hysteresis, and the derived health;
//! - [`lifecycle`]: host states and the operator's lifecycle with its transition table;
//! - [`http`]: the local API (TCP, read-only; admin Unix socket);
//! - [`agent`]: the composition root of `vigil agent`, signals and reload;
//! - [`control`]: `vigil control`, the reference control plane that receives heartbeats;
//! - [`client`]: talks to a running agent for `status` and `lifecycle`;
//! - [`pg`]: PostgreSQL sessions shared by the postgres kinds; [`runner`]: runs external
//!   programs (backup tools) with a timeout, a cleared environment and bounded output;
//!   [`runner_service`]: `vigil runner`, the privileged helper that runs them as another user;
//! - [`heartbeat`]: signed heartbeats: keys, signing, the document, sequence, spool,
//!   transport and the delivery loop; [`image`]: `vigil image prep`;
//! - [`remediation`]: pre-approved scripts run when a check trips: guard, guardrails, audit;
//! - [`alarm`]: long sleeps with one wakeup (timerfd); [`durable`]: crash-safe file writes;
//!   [`systemd`]: sd_notify; [`telemetry`]: logging.

pub mod agent;
pub mod alarm;
pub mod checks;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod durable;
pub mod exit;
pub mod heartbeat;
pub mod http;
pub mod image;
pub mod lifecycle;
pub mod pg;
pub mod remediation;
pub mod runner;
pub mod runner_service;
pub mod scheduler;
pub mod state;
pub mod systemd;
pub mod telemetry;
