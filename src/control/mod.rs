//! `vigil control`: the reference control plane. It verifies every signed heartbeat,
//! refuses replays, stores what it accepts durably, and derives which hosts went silent.
//!
//! - [`config`]: `[control]`, parsed with the agent's error machinery.

pub mod config;
