//! One integration-test binary (ripgrep's layout); one module per area.

// A test that cannot set up its scratch files or processes should stop right there;
// clippy's test exemption covers #[test] functions only, not the harness.
#![allow(clippy::unwrap_used)]

/// The admin socket: peer credentials, lifecycle transitions.
mod admin;
/// The real `vigil agent` over HTTP: every endpoint, status codes, JSON, promtool.
mod api;
/// backup.files on real files; backup.walg and backup.barman through their CLIs.
mod backup_files;
/// Command line: exit codes, `vigil check`, `status`, `lifecycle`, config errors.
mod cli;
/// Config files: the shipped ones load; bad ones fail with file, key and line.
mod config;
/// `vigil control`: signed heartbeats over real TLS, rejections, restarts, kill -9.
mod control;
/// `disk` against a real tmpfs: trip, clear, read-only remount.
mod disk;
/// Fault injection: hung database, failover, SIGHUP storm, abusive clients, full state
/// dir, kill -9 while persisting.
mod faults;
/// HAProxy's httpchk against /replica?lag= takes a lagging standby out and back.
mod haproxy;
/// Heartbeat delivery by the real agent to a control-plane stand-in: signatures, spool,
/// drain order, 409/401/4xx answers, crashes, SIGTERM, bad keys, TLS and a full disk.
mod heartbeat;
/// Agent and control plane in two network namespaces: loss, latency, a partition, and a
/// receiver that never answers.
mod network;
/// backup.pgbackrest against real pgBackRest backups of a real PostgreSQL.
mod pgbackrest;
/// A real PostgreSQL 15 primary and streaming standby for the postgres tests.
mod pgcluster;
/// command (real monitoring plugins, check_postgres, misbehaving plugins),
/// tls.certificate (openssl-made certificates) and kernel (uname -r).
mod plugins;
/// postgres.* checks and the routing endpoints against a real primary and standby.
mod postgres;
/// `process` against real processes; a hung check does not delay others or the API.
mod process;
/// The control-plane stand-in the heartbeat tests post to.
mod receiver;
/// SIGHUP reload: checks added and removed; an invalid config refused.
mod reload;
/// Remediation: trip → run → verify, the guard, guardrails, break glass, audit.
mod remediation;
/// The program runner: process groups, timeouts, bounded output, cleared environment.
mod runner;
/// `vigil runner`, the privileged helper: SO_PEERCRED, its own allow-list and guard.
mod runner_service;
/// Heartbeat keys (`vigil keygen`) and RFC 9421 signatures checked by another implementation.
mod signing;
/// The heartbeat spool: crash recovery, corruption, overflow.
mod spool;
mod util;
