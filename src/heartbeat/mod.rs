//! Signed heartbeats to the control plane:
//! - [`keys`]: the Ed25519 signing key on disk (0600) and its key id;
//! - [`sign`]: RFC 9421 HTTP Message Signatures and RFC 9530 `Content-Digest`;
//! - [`document`]: the heartbeat body and the host's identity;
//! - [`seq`]: the sequence counter that never reuses a value, across crashes;
//! - [`spool`]: the durable queue of heartbeats not yet delivered;
//! - [`client`]: the transport, one signed POST over rustls (or loopback HTTP);
//! - [`delivery`]: the loop that ties them together: when to send, spool, back off, drain.

pub mod client;
pub mod delivery;
pub mod document;
pub mod keys;
pub mod seq;
pub mod sign;
pub mod spool;
