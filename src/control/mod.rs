//! `vigil control`: the reference control plane. It verifies every signed heartbeat,
//! refuses replays, stores what it accepts durably, and derives which hosts went silent.
//!
//! - [`config`]: `[control]`, parsed with the agent's error machinery;
//! - [`store`]: enrolment and heartbeats behind one [`store::Store`] trait; the embedded
//!   file store ([`store::file`]) is the default;
//! - [`cmd`]: the `vigil control` subcommands as the binary runs them;
//! - [`body`]: the fields of a heartbeat the receiver reads;
//! - [`routes`]: the endpoints; [`server`]: the listener, TLS, shutdown and background
//!   tasks; [`metrics`]: `/metrics`; [`webhook`]: a POST per change of derived state;
//! - [`verifier`]: Ed25519 checks batched across concurrent requests.
pub mod body;
pub mod cmd;
pub mod config;
pub mod metrics;
pub mod routes;
pub mod server;
pub mod store;
pub mod verifier;
pub mod webhook;
