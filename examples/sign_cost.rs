//! Measures the cost of signing one heartbeat-sized body (Content-Digest + RFC 9421
//! Ed25519 signature), as the agent does at every send:
//!
//! ```text
//! cargo run --release --example sign_cost [BODY_BYTES] [ITERATIONS]
//! ```
//!
//! Built with the release profile the agent ships with (`opt-level = "z"`), so the
//! number is the deployed cost, not the best possible one.

use std::hint::black_box;
use std::time::Instant;

use ed25519_dalek::SigningKey;
use vigil::heartbeat::keys::HeartbeatKey;
use vigil::heartbeat::sign;

fn main() {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4096);
    let iterations: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let key = HeartbeatKey::from_signing_key(SigningKey::from_bytes(&[7u8; 32]));
    let body = vec![b'x'; size];
    let url = "https://control.internal:8443/v1/heartbeats";
    let created = 1_750_000_000;
    let sign_once = |created: u64| {
        sign::sign(
            &key,
            "POST",
            url,
            "application/json",
            black_box(&body),
            created,
        )
    };
    // Warm caches and the allocator before timing.
    for i in 0..100 {
        black_box(sign_once(created + i).ok());
    }
    let start = Instant::now();
    for i in 0..u64::from(iterations) {
        black_box(sign_once(created + i).ok());
    }
    let per = start.elapsed() / iterations;
    println!("sign: {size} B body, {iterations} iterations: {per:?} per signature");

    let digest_start = Instant::now();
    for _ in 0..iterations {
        black_box(sign::content_digest(black_box(&body)));
    }
    let per_digest = digest_start.elapsed() / iterations;
    println!("of which Content-Digest (SHA-256 of the body): {per_digest:?}");

    let h = sign_once(created).expect("constant inputs sign");
    let public = key.public_key();
    let received = sign::Received {
        method: "POST",
        target_uri: url,
        content_type: Some("application/json"),
        content_digest: Some(&h.content_digest),
        signature_input: Some(&h.signature_input),
        signature: Some(&h.signature),
        body: &body,
    };
    let verify_start = Instant::now();
    for _ in 0..iterations {
        black_box(
            sign::verify(
                &public,
                &received,
                created,
                std::time::Duration::from_secs(300),
            )
            .ok(),
        );
    }
    let per_verify = verify_start.elapsed() / iterations;
    println!("verify (control plane side): {per_verify:?} per signature");
    println!(
        "header bytes: Content-Digest {}, Signature-Input {}, Signature {}",
        h.content_digest.len(),
        h.signature_input.len(),
        h.signature.len()
    );
}
