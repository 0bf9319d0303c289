//! `vigil keygen` with the real binary, and our RFC 9421 signatures checked by an
//! implementation we did not write: PyPI's `http-message-signatures`, driven by
//! `tests/fixtures/signing/verify.py`. `.ci/deps` installs it; without it these tests fail
//! and say so (a verifier that is not there must not look like a verifier that agreed).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};

use vigil::heartbeat::{keys, sign};

use crate::util::{run, tempdir};

const VERIFY_PY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/signing/verify.py"
);
const URL: &str = "https://control.example:8443/v1/heartbeats";

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The two lines of `vigil keygen`, parsed: (public_key, key_id).
fn keygen_lines(o: &Output) -> (String, String) {
    let out = stdout(o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "exactly two lines: {out:?}");
    let value = |line: &str, name: &str| -> String {
        let v = line
            .strip_prefix(&format!("{name} = \""))
            .and_then(|r| r.strip_suffix('"'))
            .unwrap_or_else(|| panic!("not `{name} = \"…\"`: {line:?}"));
        v.to_string()
    };
    (value(lines[0], "public_key"), value(lines[1], "key_id"))
}

/// Runs the Python verifier; panics (fails the test) when python3 or the package is
/// missing, naming the command that installs them.
fn python(args: &[&str]) -> Output {
    let out = Command::new("python3")
        .arg(VERIFY_PY)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 is needed for the independent RFC 9421 verifier ({e}); run .ci/deps")
        });
    if out.status.code() == Some(3) {
        panic!(
            "the independent RFC 9421 verifier needs PyPI's http-message-signatures \
             (run .ci/deps, which CI runs): {}",
            stderr(&out)
        );
    }
    out
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn keygen_writes_a_0600_key_and_prints_its_ids() {
    let dir = tempdir();
    let path = dir.path().join("heartbeat.key");
    let p = path.to_str().unwrap();
    let o = run(&["keygen", "--out", p]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(mode(&path), 0o600);
    let (public_b64, key_id) = keygen_lines(&o);

    // The key id, computed here from the printed public key.
    let raw = STANDARD.decode(&public_b64).unwrap();
    assert_eq!(raw.len(), 32);
    assert_eq!(key_id, URL_SAFE_NO_PAD.encode(Sha256::digest(&raw)));
    // The public key, derived from the file by Python's `cryptography`, not by us.
    let py = python(&["pubkey", p]);
    assert_eq!(py.status.code(), Some(0), "{}", stderr(&py));
    assert_eq!(stdout(&py).trim(), public_b64);
    // And the file is what the agent loads.
    assert_eq!(keys::load(&path).unwrap().info().key_id, key_id);
}

#[test]
fn keygen_refuses_an_existing_file_and_if_missing_keeps_it() {
    let dir = tempdir();
    let path = dir.path().join("heartbeat.key");
    let p = path.to_str().unwrap();
    let first = run(&["keygen", "--out", p]);
    assert_eq!(first.status.code(), Some(0));
    let before = std::fs::read(&path).unwrap();

    let again = run(&["keygen", "--out", p]);
    assert_eq!(again.status.code(), Some(1));
    assert!(again.stdout.is_empty());
    let err = stderr(&again);
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.contains(p), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);

    let kept = run(&["keygen", "--out", p, "--if-missing"]);
    assert_eq!(kept.status.code(), Some(0), "{}", stderr(&kept));
    assert_eq!(stdout(&kept), stdout(&first));
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // --if-missing on a fresh path creates the key.
    let fresh = dir.path().join("fresh.key");
    let o = run(&["keygen", "--out", fresh.to_str().unwrap(), "--if-missing"]);
    assert_eq!(o.status.code(), Some(0));
    keygen_lines(&o);
    assert_eq!(mode(&fresh), 0o600);
}

#[test]
fn keygen_if_missing_refuses_a_key_others_can_read() {
    let dir = tempdir();
    let path = dir.path().join("heartbeat.key");
    let p = path.to_str().unwrap();
    assert_eq!(run(&["keygen", "--out", p]).status.code(), Some(0));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = run(&["keygen", "--out", p, "--if-missing"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o).trim_end(),
        format!("vigil: key file {p} has mode 0644; it must be 0600 (chmod 600 {p})")
    );
}

/// A request as the Python verifier reads it.
fn request_json(
    h: &sign::SignedHeaders,
    content_digest: &str,
    signature: &str,
    body: &[u8],
    public_b64: &str,
) -> String {
    serde_json::json!({
        "method": "POST",
        "url": URL,
        "headers": {
            "Content-Type": "application/json",
            "Content-Digest": content_digest,
            "Signature-Input": h.signature_input,
            "Signature": signature,
        },
        "body_b64": STANDARD.encode(body),
        "public_key_b64": public_b64,
    })
    .to_string()
}

fn heartbeat_body(seq: u64) -> Vec<u8> {
    let checks: Vec<_> = (0..20)
        .map(|i| {
            serde_json::json!({"name": format!("check_{i}"), "kind": "disk", "status": "ok",
                "tripped": false, "value": 0.42, "unit": "ratio", "message": "fine"})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({"v": 1, "host_id": "h1", "seq": seq,
        "state": "available", "checks": checks}))
    .unwrap()
}

#[test]
fn python_http_message_signatures_verifies_ours_and_rejects_tampering() {
    let dir = tempdir();
    let key_path = dir.path().join("heartbeat.key");
    let o = run(&["keygen", "--out", key_path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (public_b64, key_id) = keygen_lines(&o);
    let key = keys::load(&key_path).unwrap();

    let body = heartbeat_body(7);
    let h = sign::sign(&key, "POST", URL, "application/json", &body, now()).unwrap();
    let req = dir.path().join("req.json");
    let verify = |json: String| {
        std::fs::write(&req, json).unwrap();
        python(&["verify", req.to_str().unwrap()])
    };

    // Accepted as sent.
    let ok = verify(request_json(
        &h,
        &h.content_digest,
        &h.signature,
        &body,
        &public_b64,
    ));
    assert_eq!(ok.status.code(), Some(0), "{}{}", stdout(&ok), stderr(&ok));
    assert!(
        stdout(&ok).starts_with(&format!("OK label=vigil keyid={key_id} created=")),
        "{}",
        stdout(&ok)
    );

    // A changed body: the digest no longer matches.
    let tampered = heartbeat_body(8);
    let bad_body = verify(request_json(
        &h,
        &h.content_digest,
        &h.signature,
        &tampered,
        &public_b64,
    ));
    assert_eq!(bad_body.status.code(), Some(1), "{}", stderr(&bad_body));
    assert!(
        stdout(&bad_body).starts_with("REJECTED: Content-Digest does not match"),
        "{}",
        stdout(&bad_body)
    );

    // The digest recomputed for the changed body: the signature no longer matches.
    let forged = sign::content_digest(&tampered);
    let bad_digest = verify(request_json(
        &h,
        &forged,
        &h.signature,
        &tampered,
        &public_b64,
    ));
    assert_eq!(bad_digest.status.code(), Some(1), "{}", stderr(&bad_digest));
    assert!(
        stdout(&bad_digest).starts_with("REJECTED"),
        "{}",
        stdout(&bad_digest)
    );
    assert!(
        !stdout(&bad_digest).contains("Content-Digest"),
        "{}",
        stdout(&bad_digest)
    );

    // A flipped bit in the signature.
    let mut raw = STANDARD
        .decode(
            h.signature
                .trim_start_matches("vigil=:")
                .trim_end_matches(':'),
        )
        .unwrap();
    raw[0] ^= 0x01;
    let flipped = format!("vigil=:{}:", STANDARD.encode(&raw));
    let bad_sig = verify(request_json(
        &h,
        &h.content_digest,
        &flipped,
        &body,
        &public_b64,
    ));
    assert_eq!(bad_sig.status.code(), Some(1), "{}", stderr(&bad_sig));
    assert!(stdout(&bad_sig).starts_with("REJECTED"));

    // Another host's public key.
    let other = dir.path().join("other.key");
    let (other_b64, _) = keygen_lines(&run(&["keygen", "--out", other.to_str().unwrap()]));
    let bad_key = verify(request_json(
        &h,
        &h.content_digest,
        &h.signature,
        &body,
        &other_b64,
    ));
    assert_eq!(bad_key.status.code(), Some(1), "{}", stderr(&bad_key));
}

#[test]
fn a_heartbeat_spooled_long_ago_verifies_when_signed_at_send_time() {
    // The spool keeps bodies and signs at each send: a body from an hour ago signed now
    // verifies; the same body signed an hour ago (a replayed signature) does not.
    let dir = tempdir();
    let key_path = dir.path().join("heartbeat.key");
    let o = run(&["keygen", "--out", key_path.to_str().unwrap()]);
    let (public_b64, _) = keygen_lines(&o);
    let key = keys::load(&key_path).unwrap();
    let body = heartbeat_body(1);
    let req = dir.path().join("req.json");
    for (created, want) in [(now(), 0), (now() - 3600, 1)] {
        let h = sign::sign(&key, "POST", URL, "application/json", &body, created).unwrap();
        std::fs::write(
            &req,
            request_json(&h, &h.content_digest, &h.signature, &body, &public_b64),
        )
        .unwrap();
        let out = python(&["verify", req.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(want),
            "{}{}",
            stdout(&out),
            stderr(&out)
        );
    }
}
