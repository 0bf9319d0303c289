//! RFC 9421 verification as the control plane runs it on network input: arbitrary
//! `Signature-Input`, `Signature`, `Content-Digest` and body must be refused cleanly, and
//! nothing but a genuine signature by the key may verify.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vigil::heartbeat::keys::HeartbeatKey;
use vigil::heartbeat::sign;

const URI: &str = "https://control.example:8443/v1/heartbeats";

fuzz_target!(|data: &[u8]| {
    // Split the input into four fields at 0xff bytes (never valid in a header).
    let mut parts = data.splitn(4, |b| *b == 0xff);
    let input = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let signature = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let digest = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let body = parts.next().unwrap_or_default();

    let _ = sign::signature_key_id(&input);
    let key = HeartbeatKey::from_signing_key(ed25519_dalek_key());
    let received = sign::Received {
        method: "POST",
        target_uri: URI,
        content_type: Some("application/json"),
        content_digest: Some(&digest),
        signature_input: Some(&input),
        signature: Some(&signature),
        body,
    };
    let r = sign::verify(
        &key.public_key(),
        &received,
        1_750_000_000,
        Duration::from_secs(300),
    );
    // Random bytes forging an Ed25519 signature would be a finding in itself.
    assert!(r.is_err(), "fuzz input verified: {input:?} {signature:?}");

    // A genuine signature over this body verifies, and the digest covers the exact bytes.
    let h = sign::sign(&key, "POST", URI, "application/json", body, 1_750_000_000)
        .expect("constant components sign");
    let good = sign::Received {
        content_digest: Some(&h.content_digest),
        signature_input: Some(&h.signature_input),
        signature: Some(&h.signature),
        ..received
    };
    assert!(
        sign::verify(
            &key.public_key(),
            &good,
            1_750_000_000,
            Duration::from_secs(300)
        )
        .is_ok()
    );
});

fn ed25519_dalek_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
}
