//! Measures what the agent does for every heartbeat of a host with `CHECKS` checks (20 by
//! default): build and serialize the document, then digest and sign it; and the bytes it
//! puts on the wire.
//!
//! ```text
//! cargo run --release --example heartbeat_cost [CHECKS] [ITERATIONS]
//! ```
//!
//! Built with the release profile the agent ships with, so the numbers are the deployed
//! cost.

use std::hint::black_box;
use std::time::{Instant, SystemTime};

use ed25519_dalek::SigningKey;
use indexmap::IndexMap;
use vigil::heartbeat::document::{Heartbeat, HostIdentity};
use vigil::heartbeat::keys::HeartbeatKey;
use vigil::heartbeat::sign;

#[path = "common/snapshot.rs"]
mod common_snapshot;
use common_snapshot::snapshot;

const URL: &str = "https://control.internal:8443/v1/heartbeats";

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let iterations: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let snap = snapshot(n);
    let identity = HostIdentity {
        host_id: "4f1c2a9e8b7d4c3fa1e2b3c4d5e6f708".into(),
        boot_id: "0e6f3c1a-8d2b-4f7e-9a1c-3b5d7f9e1a2c".into(),
        image_id: Some("vigil-pg15".into()),
        image_version: Some("2026.11.3".into()),
        kernel: "6.1.0-27-amd64".into(),
    };
    let mut labels = IndexMap::new();
    labels.insert("cluster".to_string(), "orders".to_string());
    labels.insert("region".to_string(), "eu-1".to_string());
    let key = HeartbeatKey::from_signing_key(SigningKey::from_bytes(&[7u8; 32]));

    let once = |seq: u64| {
        let body = Heartbeat::new(&identity, &labels, &snap, seq, SystemTime::now()).to_body();
        let h = sign::sign(
            &key,
            "POST",
            URL,
            "application/json",
            &body,
            1_750_000_000 + seq,
        )
        .expect("constant inputs sign");
        (body, h)
    };
    for i in 0..200 {
        black_box(once(i + 1));
    }
    let start = Instant::now();
    for i in 0..u64::from(iterations) {
        black_box(once(i + 1));
    }
    let per = start.elapsed() / iterations;

    let build_start = Instant::now();
    for i in 0..u64::from(iterations) {
        black_box(Heartbeat::new(&identity, &labels, &snap, i + 1, SystemTime::now()).to_body());
    }
    let per_build = build_start.elapsed() / iterations;

    let (body, h) = once(1_000_000);
    // The request as hyper writes it: request line, the headers the client sets, the body.
    let head = format!(
        "POST /v1/heartbeats HTTP/1.1\r\nhost: control.internal:8443\r\ncontent-type: application/json\r\ncontent-digest: {}\r\nsignature-input: {}\r\nsignature: {}\r\ncontent-length: {}\r\n\r\n",
        h.content_digest,
        h.signature_input,
        h.signature,
        body.len()
    );
    println!("{n} checks, {iterations} iterations (release profile):");
    println!("  build + serialize + digest + sign: {per:?} per heartbeat");
    println!("  of which build + serialize: {per_build:?}");
    println!(
        "  on the wire: {} B body + {} B request line and headers = {} B (plus TLS framing)",
        body.len(),
        head.len(),
        body.len() + head.len()
    );
}
