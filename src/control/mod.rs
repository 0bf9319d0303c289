//! `vigil control`: the reference control plane. It verifies every signed heartbeat,
//! refuses replays, stores what it accepts durably, and derives which hosts went silent.
//!
//! - [`config`]: `[control]`, parsed with the agent's error machinery;
//! - [`store`]: enrolment and heartbeats behind one [`store::Store`] trait; the embedded
//!   file store ([`store::file`]) is the default.
pub mod body;
pub mod config;
pub mod store;
