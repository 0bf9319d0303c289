//! Heartbeat signatures: RFC 9530 `Content-Digest` and RFC 9421 HTTP Message Signatures.
//!
//! Pure functions: bytes, a key and a time in, header values out (and back, for the
//! receiver). Nothing here reads a clock, a file or the network, so the spool can keep
//! bodies and sign each at its send time (a heartbeat spooled for a day still verifies).
//!
//! # The profile (CONTRACT.md "Heartbeats")
//! - `Content-Digest: sha-256=:B64:` over the exact body bytes sent (RFC 9530 §2).
//! - One signature, label `vigil`, algorithm `ed25519` (RFC 9421 §3.3.6), covering
//!   `("@method" "@target-uri" "content-type" "content-digest")`, with the parameters
//!   `created`, `keyid`, `alg="ed25519"` and `tag="vigil-heartbeat"`, in that order.
//!
//! # The signature base (RFC 9421 §2.5), built by hand
//! One line per covered component, `"name": value`, each ended by `\n`, then
//! `"@signature-params": ` and the serialized inner list of the `Signature-Input` member,
//! with no trailing newline. HTTP field values are trimmed of leading and trailing
//! SP/HTAB (§2.1); derived components are the values as sent. The base must be ASCII
//! without control characters (other than HTAB inside field values): a value that is
//! not is refused rather than signed, since a newline in a value could forge a line.
//! Structured fields (`Signature-Input`, `Signature`, `Content-Digest`) are serialized
//! and parsed with the `sfv` crate (RFC 9651), so quoting and byte sequences are exact.
//!
//! `@target-uri` is the absolute URI the request is sent to, taken verbatim: the
//! caller must pass the same string the receiver reconstructs (lowercase scheme and
//! host, no default port, `/` for an empty path), because a verifier compares bytes.

use std::time::Duration;

use ed25519_dalek::{Signature, Signer as _};
use sfv::{
    BareItem, DictSerializer, Dictionary, InnerListSerializer, KeyRef, ListEntry, ListSerializer,
    Parser, StringRef, key_ref,
};
use sha2::{Digest, Sha256};

use super::keys::{HeartbeatKey, PublicKey};

/// The signature's label in `Signature-Input` and `Signature`.
pub const LABEL: &str = "vigil";
/// The `tag` parameter: what the signature is for.
pub const TAG: &str = "vigil-heartbeat";
/// The `alg` parameter (RFC 9421 §6.2.2 registry name).
pub const ALG: &str = "ed25519";
/// The covered components, in signing order.
pub const COVERED: [&str; 4] = ["@method", "@target-uri", "content-type", "content-digest"];

/// The three header values to send with a signed body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    /// `Content-Digest`, e.g. `sha-256=:X48E9q...=:`.
    pub content_digest: String,
    /// `Signature-Input`, e.g. `vigil=("@method" ...);created=...;keyid="...";...`.
    pub signature_input: String,
    /// `Signature`, e.g. `vigil=:BASE64:`.
    pub signature: String,
}

/// Why a request could not be signed. Only values from outside (the URL from the config,
/// the clock) can cause one.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// A component value would not make a well-formed signature base.
    #[error("cannot sign {component} {value:?}: {reason}")]
    BadComponent {
        /// The component identifier.
        component: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `created` is beyond the range of a structured-field integer (15 digits).
    #[error("created time {0} is out of range for a signature parameter")]
    Created(u64),
}

/// Why a received request does not carry a valid heartbeat signature.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    /// A header the profile needs is absent.
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    /// A structured header does not parse, or has the wrong shape.
    #[error("malformed {header} header: {reason}")]
    Malformed {
        /// The header.
        header: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// No signature under the label `vigil`.
    #[error("no signature labelled {LABEL:?} (labels: {found:?})")]
    WrongLabel {
        /// The labels present.
        found: Vec<String>,
    },
    /// A component of the profile is not covered.
    #[error("signature does not cover {0:?}")]
    MissingComponent(&'static str),
    /// A covered component outside the profile (or with parameters).
    #[error("signature covers {0}, which this profile does not use")]
    UnexpectedComponent(String),
    /// A component listed twice.
    #[error("signature covers {0:?} twice")]
    DuplicateComponent(String),
    /// A signature parameter outside the profile, or of the wrong type.
    #[error("unexpected signature parameter {0}")]
    UnexpectedParameter(String),
    /// A required signature parameter is absent.
    #[error("signature has no {0:?} parameter")]
    MissingParameter(&'static str),
    /// `alg` is not `ed25519`.
    #[error("signature alg is {0:?}, not \"ed25519\"")]
    WrongAlgorithm(String),
    /// `tag` is not `vigil-heartbeat`.
    #[error("signature tag is {0:?}, not \"vigil-heartbeat\"")]
    WrongTag(String),
    /// `keyid` names another key than the one verified against.
    #[error("signature keyid {found:?} is not the key {expected:?}")]
    KeyIdMismatch {
        /// The key id of the public key given to `verify`.
        expected: String,
        /// The `keyid` in the signature.
        found: String,
    },
    /// `created` is further from `now` than the allowed skew.
    #[error("signature created at {created}, {off_by}s from now ({now}); allowed skew {max_skew}s")]
    CreatedOutOfWindow {
        /// The `created` parameter (Unix seconds).
        created: u64,
        /// The verifier's clock (Unix seconds).
        now: u64,
        /// `|now - created|` in seconds.
        off_by: u64,
        /// The allowed skew in seconds.
        max_skew: u64,
    },
    /// A component value cannot be part of a signature base (control or non-ASCII bytes).
    #[error("{component} value is not signable: {reason}")]
    BadComponent {
        /// The component identifier.
        component: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// `Content-Digest` has no `sha-256` member.
    #[error("Content-Digest has no sha-256 member")]
    NoSha256Digest,
    /// The body's SHA-256 differs from `Content-Digest`.
    #[error("Content-Digest does not match the body")]
    BadDigest,
    /// The Ed25519 signature does not verify over the signature base.
    #[error("signature does not verify")]
    BadSignature,
}

/// What a successful [`verify`] vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedParams {
    /// The `created` parameter (Unix seconds).
    pub created: u64,
    /// The `keyid` parameter (equal to the verifying key's id).
    pub key_id: String,
}

/// A received request as far as the signature sees it. Header values are as received;
/// a header sent on several lines is joined with `", "` (RFC 9110 §5.3) by the caller.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// The request method, e.g. `POST`.
    pub method: &'a str,
    /// The absolute target URI, reconstructed by the receiver.
    pub target_uri: &'a str,
    /// `Content-Type`.
    pub content_type: Option<&'a str>,
    /// `Content-Digest`.
    pub content_digest: Option<&'a str>,
    /// `Signature-Input`.
    pub signature_input: Option<&'a str>,
    /// `Signature`.
    pub signature: Option<&'a str>,
    /// The body bytes as received.
    pub body: &'a [u8],
}

/// The RFC 9530 `Content-Digest` value of `body`: `sha-256=:BASE64:`.
pub fn content_digest(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let mut ser = DictSerializer::new();
    let _ = ser.bare_item(SHA256_KEY, digest.as_slice());
    // One member was written, so `finish` has output (it is `None` only for an empty dict).
    ser.finish().unwrap_or_default()
}

/// Signs a request: the digest of `body`, then an RFC 9421 signature of the profile.
///
/// `created` is the signing time in Unix seconds. Send `content_type` as the
/// `Content-Type` header; it is signed trimmed of SP/HTAB, as a verifier reads it.
///
/// # Errors
/// [`SignError::BadComponent`] for a method, URI or content type that is empty or holds
/// control or non-ASCII characters; [`SignError::Created`] for an absurd `created`.
pub fn sign(
    key: &HeartbeatKey,
    method: &str,
    target_uri: &str,
    content_type: &str,
    body: &[u8],
    created: u64,
) -> Result<SignedHeaders, SignError> {
    let content_digest = content_digest(body);
    let values: [(&'static str, &str); 4] = [
        ("@method", check_derived("@method", method)?),
        ("@target-uri", check_derived("@target-uri", target_uri)?),
        ("content-type", check_field("content-type", content_type)?),
        (
            "content-digest",
            check_field("content-digest", &content_digest)?,
        ),
    ];
    let params = Params {
        components: &COVERED,
        created: i64::try_from(created)
            .ok()
            .filter(|c| *c <= MAX_SF_INTEGER)
            .ok_or(SignError::Created(created))?,
        keyid: &key.info().key_id,
        alg: Some(ALG),
        tag: Some(TAG),
    };
    let params_text = params.serialize();
    let base = signature_base(&values, &params_text);
    let signature: Signature = key.signing_key().sign(base.as_bytes());

    let mut input = DictSerializer::new();
    params.write(input.inner_list(LABEL_KEY));
    let mut sig = DictSerializer::new();
    let _ = sig.bare_item(LABEL_KEY, signature.to_bytes().as_slice());
    Ok(SignedHeaders {
        content_digest,
        // Each dictionary got one member, so each `finish` has output.
        signature_input: input.finish().unwrap_or_default(),
        signature: sig.finish().unwrap_or_default(),
    })
}

/// The `keyid` of the `vigil` signature in a `Signature-Input` value, so a receiver can
/// pick the key (a host may hold several while it rotates) before calling [`verify`].
///
/// # Errors
/// [`VerifyError::Malformed`], [`VerifyError::WrongLabel`] or
/// [`VerifyError::MissingParameter`].
pub fn signature_key_id(signature_input: &str) -> Result<String, VerifyError> {
    let (_, params) = parse_input(signature_input)?;
    params.keyid.ok_or(VerifyError::MissingParameter("keyid"))
}

/// Checks a received request against the profile and `public_key`.
///
/// Order: the `Signature-Input` shape and parameters, `created` within `max_skew` of
/// `now` (Unix seconds, either side), the Ed25519 signature over the rebuilt base (which
/// covers the `Content-Digest` header), then the digest against the body. A changed body
/// is therefore [`VerifyError::BadDigest`]; a changed header, [`VerifyError::BadSignature`].
///
/// # Errors
/// The first [`VerifyError`] met.
pub fn verify(
    public_key: &PublicKey,
    req: &Received<'_>,
    now: u64,
    max_skew: Duration,
) -> Result<VerifiedParams, VerifyError> {
    let (signed, rest) = prepare(public_key, req, now, max_skew)?;
    let ok = public_key
        .verifying_key()
        .verify_strict(&signed.message, &signed.signature)
        .is_ok();
    rest.finish(ok)
}

/// What the Ed25519 check needs: the signature base and the signature.
#[derive(Debug)]
pub struct Signed {
    /// The RFC 9421 signature base rebuilt from the request.
    pub message: Vec<u8>,
    /// The signature from the `Signature` header.
    pub signature: Signature,
}

/// The rest of [`verify`] after the Ed25519 check: the digest against the body.
#[derive(Debug)]
pub struct AfterSignature<'a> {
    digest: &'a str,
    body: &'a [u8],
    params: VerifiedParams,
}

impl AfterSignature<'_> {
    /// Ends the verification with the Ed25519 check's answer.
    ///
    /// # Errors
    /// [`VerifyError::BadSignature`] when `signature_ok` is false, else the digest's
    /// [`VerifyError`].
    pub fn finish(self, signature_ok: bool) -> Result<VerifiedParams, VerifyError> {
        if !signature_ok {
            return Err(VerifyError::BadSignature);
        }
        check_digest(self.digest, self.body)?;
        Ok(self.params)
    }
}

/// [`verify`] in two halves, for a receiver that checks many Ed25519 signatures in one
/// batch: everything before the Ed25519 check (same order, same errors), and what it
/// needs. Check [`Signed`] with `public_key`, then call [`AfterSignature::finish`].
///
/// # Errors
/// The first [`VerifyError`] met before the Ed25519 check.
pub fn prepare<'a>(
    public_key: &PublicKey,
    req: &Received<'a>,
    now: u64,
    max_skew: Duration,
) -> Result<(Signed, AfterSignature<'a>), VerifyError> {
    let input_text = req
        .signature_input
        .ok_or(VerifyError::MissingHeader("Signature-Input"))?;
    let (components, params) = parse_input(input_text)?;

    let expected_id = &public_key.info().key_id;
    let key_id = params.keyid.ok_or(VerifyError::MissingParameter("keyid"))?;
    if &key_id != expected_id {
        return Err(VerifyError::KeyIdMismatch {
            expected: expected_id.clone(),
            found: key_id,
        });
    }
    let created = params
        .created
        .ok_or(VerifyError::MissingParameter("created"))?;
    let off_by = now.abs_diff(created);
    if off_by > max_skew.as_secs() {
        return Err(VerifyError::CreatedOutOfWindow {
            created,
            now,
            off_by,
            max_skew: max_skew.as_secs(),
        });
    }

    let signature = parse_signature(
        req.signature
            .ok_or(VerifyError::MissingHeader("Signature"))?,
    )?;
    let content_type = req
        .content_type
        .ok_or(VerifyError::MissingHeader("Content-Type"))?;
    let digest_text = req
        .content_digest
        .ok_or(VerifyError::MissingHeader("Content-Digest"))?;
    let bad = |component, e: SignError| match e {
        SignError::BadComponent { reason, .. } => VerifyError::BadComponent { component, reason },
        SignError::Created(_) => VerifyError::BadComponent {
            component,
            reason: "out of range",
        },
    };
    let mut values: Vec<(&'static str, &str)> = Vec::with_capacity(components.len());
    for name in &components {
        let value = match *name {
            "@method" => check_derived(name, req.method),
            "@target-uri" => check_derived(name, req.target_uri),
            "content-type" => check_field(name, content_type),
            _ => check_field(name, digest_text),
        };
        values.push((name, value.map_err(|e| bad(name, e))?));
    }
    let base = signature_base(&values, &params.serialized);
    Ok((
        Signed {
            message: base.into_bytes(),
            signature,
        },
        AfterSignature {
            digest: digest_text,
            body: req.body,
            params: VerifiedParams { created, key_id },
        },
    ))
}

/// RFC 9651 §3.3.1: integers have at most 15 digits.
const MAX_SF_INTEGER: i64 = 999_999_999_999_999;

// Structured-field keys checked at compile time (`key_ref` is a `const fn` that rejects
// an invalid key), so serializing them cannot fail at run time.
const LABEL_KEY: &KeyRef = key_ref(LABEL);
const SHA256_KEY: &KeyRef = key_ref("sha-256");
const CREATED_KEY: &KeyRef = key_ref("created");
const KEYID_KEY: &KeyRef = key_ref("keyid");
const ALG_KEY: &KeyRef = key_ref("alg");
const TAG_KEY: &KeyRef = key_ref("tag");

/// Signature parameters, serialized in field order: `created`, `keyid`, `alg`, `tag`.
/// `alg` and `tag` are optional so the RFC's own examples (which omit them) can be
/// reproduced exactly.
struct Params<'a> {
    components: &'a [&'a str],
    created: i64,
    keyid: &'a str,
    alg: Option<&'a str>,
    tag: Option<&'a str>,
}

impl Params<'_> {
    /// The inner list as it appears after `"@signature-params": ` and after `label=`.
    fn serialize(&self) -> String {
        let mut list = ListSerializer::new();
        self.write(list.inner_list());
        // One inner list was written, so `finish` has output.
        list.finish().unwrap_or_default()
    }

    fn write(&self, mut inner: InnerListSerializer<'_>) {
        for c in self.components {
            // Component names and the key id are ASCII without quotes or backslashes
            // (constants, or base64url); `sf_string` falls back to an empty string, which
            // would only make a signature that no verifier accepts, never a forged one.
            let _ = inner.bare_item(sf_string(c));
        }
        let mut p = inner
            .finish()
            .parameter(CREATED_KEY, self.created_integer())
            .parameter(KEYID_KEY, sf_string(self.keyid));
        if let Some(alg) = self.alg {
            p = p.parameter(ALG_KEY, sf_string(alg));
        }
        if let Some(tag) = self.tag {
            p = p.parameter(TAG_KEY, sf_string(tag));
        }
        let _ = p.finish();
    }

    fn created_integer(&self) -> sfv::Integer {
        // `sign` checked the range; the fallback is unreachable.
        sfv::Integer::try_from(self.created).unwrap_or(sfv::Integer::constant(0))
    }
}

fn sf_string(s: &str) -> &StringRef {
    StringRef::from_str(s).unwrap_or(StringRef::constant(""))
}

/// RFC 9421 §2.5: `"name": value\n` per component, then the `@signature-params` line.
fn signature_base(values: &[(&str, &str)], params: &str) -> String {
    let len = values
        .iter()
        .map(|(n, v)| n.len() + v.len() + 5)
        .sum::<usize>()
        + params.len()
        + 22;
    let mut base = String::with_capacity(len);
    for (name, value) in values {
        base.push('"');
        base.push_str(name);
        base.push_str("\": ");
        base.push_str(value);
        base.push('\n');
    }
    base.push_str("\"@signature-params\": ");
    base.push_str(params);
    base
}

/// An HTTP field value for the base: trimmed of SP/HTAB (§2.1), visible ASCII, SP and
/// HTAB only (so no line can be injected into the base).
fn check_field<'v>(component: &'static str, value: &'v str) -> Result<&'v str, SignError> {
    let v = value.trim_matches([' ', '\t']);
    let bad = |reason| SignError::BadComponent {
        component,
        value: value.to_string(),
        reason,
    };
    if v.bytes()
        .any(|b| !(b == b'\t' || (0x20..0x7f).contains(&b)))
    {
        return Err(bad("control or non-ASCII characters"));
    }
    Ok(v)
}

/// A derived component (`@method`, `@target-uri`): non-empty visible ASCII, no spaces.
fn check_derived<'v>(component: &'static str, value: &'v str) -> Result<&'v str, SignError> {
    let bad = |reason| SignError::BadComponent {
        component,
        value: value.to_string(),
        reason,
    };
    if value.is_empty() {
        return Err(bad("empty"));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("spaces, control or non-ASCII characters"));
    }
    Ok(value)
}

/// The parameters of a parsed `Signature-Input` member, and its re-serialization.
struct ParsedParams {
    created: Option<u64>,
    keyid: Option<String>,
    /// The member re-serialized (RFC 9421 §3.2: the verifier uses the serialized value
    /// of the parsed parameters, which normalises optional whitespace).
    serialized: String,
}

fn parse_input(text: &str) -> Result<(Vec<&'static str>, ParsedParams), VerifyError> {
    const H: &str = "Signature-Input";
    let malformed = |reason: String| VerifyError::Malformed { header: H, reason };
    let dict: Dictionary = Parser::new(text)
        .parse()
        .map_err(|e| malformed(e.to_string()))?;
    let entry = dict.get(LABEL).ok_or_else(|| VerifyError::WrongLabel {
        found: dict.keys().map(|k| k.as_str().to_string()).collect(),
    })?;
    let ListEntry::InnerList(inner) = entry else {
        return Err(malformed(format!("member {LABEL} is not an inner list")));
    };

    let mut components: Vec<&'static str> = Vec::with_capacity(COVERED.len());
    for item in &inner.items {
        let name = match &item.bare_item {
            BareItem::String(s) if item.params.is_empty() => s.as_str(),
            _ => return Err(VerifyError::UnexpectedComponent(serialize_entry(item))),
        };
        let Some(known) = COVERED.iter().find(|c| **c == name) else {
            return Err(VerifyError::UnexpectedComponent(format!("{name:?}")));
        };
        if components.contains(known) {
            return Err(VerifyError::DuplicateComponent(name.to_string()));
        }
        components.push(known);
    }
    if let Some(missing) = COVERED.iter().find(|c| !components.contains(c)) {
        return Err(VerifyError::MissingComponent(missing));
    }

    let mut created = None;
    let mut keyid = None;
    for (name, value) in &inner.params {
        match (name.as_str(), value) {
            ("created", BareItem::Integer(i)) => {
                let v = i64::from(*i);
                created = Some(u64::try_from(v).map_err(|_| {
                    VerifyError::UnexpectedParameter(format!("created={v} (negative)"))
                })?);
            }
            ("keyid", BareItem::String(s)) => keyid = Some(s.as_str().to_string()),
            ("alg", BareItem::String(s)) if s.as_str() == ALG => {}
            ("alg", BareItem::String(s)) => {
                return Err(VerifyError::WrongAlgorithm(s.as_str().to_string()));
            }
            ("tag", BareItem::String(s)) if s.as_str() == TAG => {}
            ("tag", BareItem::String(s)) => {
                return Err(VerifyError::WrongTag(s.as_str().to_string()));
            }
            (other, _) => return Err(VerifyError::UnexpectedParameter(other.to_string())),
        }
    }
    if !inner.params.contains_key("alg") {
        return Err(VerifyError::MissingParameter("alg"));
    }
    if !inner.params.contains_key("tag") {
        return Err(VerifyError::MissingParameter("tag"));
    }

    let mut list = ListSerializer::new();
    list.members([entry]);
    let serialized = list.finish().unwrap_or_default();
    Ok((
        components,
        ParsedParams {
            created,
            keyid,
            serialized,
        },
    ))
}

fn serialize_entry(item: &sfv::Item) -> String {
    let mut list = ListSerializer::new();
    list.members([&ListEntry::Item(item.clone())]);
    list.finish().unwrap_or_default()
}

fn parse_signature(text: &str) -> Result<Signature, VerifyError> {
    const H: &str = "Signature";
    let malformed = |reason: String| VerifyError::Malformed { header: H, reason };
    let dict: Dictionary = Parser::new(text)
        .parse()
        .map_err(|e| malformed(e.to_string()))?;
    let entry = dict.get(LABEL).ok_or_else(|| VerifyError::WrongLabel {
        found: dict.keys().map(|k| k.as_str().to_string()).collect(),
    })?;
    let bytes = match entry {
        ListEntry::Item(item) => item.bare_item.as_byte_sequence(),
        ListEntry::InnerList(_) => None,
    }
    .ok_or_else(|| malformed(format!("member {LABEL} is not a byte sequence")))?;
    let raw: [u8; 64] = bytes
        .try_into()
        .map_err(|_| malformed(format!("{} bytes, not 64", bytes.len())))?;
    Ok(Signature::from_bytes(&raw))
}

fn check_digest(text: &str, body: &[u8]) -> Result<(), VerifyError> {
    let dict: Dictionary = Parser::new(text)
        .parse()
        .map_err(|e| VerifyError::Malformed {
            header: "Content-Digest",
            reason: e.to_string(),
        })?;
    let Some(ListEntry::Item(item)) = dict.get("sha-256") else {
        return Err(VerifyError::NoSha256Digest);
    };
    // The digest is of public data; a timing side channel on it reveals nothing.
    match item.bare_item.as_byte_sequence() {
        Some(d) if d == Sha256::digest(body).as_slice() => Ok(()),
        Some(_) => Err(VerifyError::BadDigest),
        None => Err(VerifyError::Malformed {
            header: "Content-Digest",
            reason: "sha-256 is not a byte sequence".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use ed25519_dalek::pkcs8::DecodePublicKey as _;
    use ed25519_dalek::{SigningKey, VerifyingKey};

    // ---- RFC 9421 Appendix B.2.6, "Signing a Request Using ed25519" ----
    // Key: Appendix B.1.4 `test-key-ed25519` (PKCS#8 and SPKI PEM as printed there).
    // Base, Signature-Input and Signature: Appendix B.2.6, unfolded from RFC 8792 `\`
    // line wrapping (https://www.rfc-editor.org/rfc/rfc9421#appendix-B.2.6).
    const B14_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----\n\
        MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n\
        -----END PRIVATE KEY-----\n";
    const B14_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----\n\
        MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=\n\
        -----END PUBLIC KEY-----\n";
    const B26_BASE: &str = "\"date\": Tue, 20 Apr 2021 02:07:55 GMT\n\
        \"@method\": POST\n\
        \"@path\": /foo\n\
        \"@authority\": example.com\n\
        \"content-type\": application/json\n\
        \"content-length\": 18\n\
        \"@signature-params\": (\"date\" \"@method\" \"@path\" \"@authority\" \
        \"content-type\" \"content-length\");created=1618884473\
        ;keyid=\"test-key-ed25519\"";
    const B26_SIGNATURE_INPUT: &str = "sig-b26=(\"date\" \"@method\" \"@path\" \"@authority\" \
        \"content-type\" \"content-length\");created=1618884473;keyid=\"test-key-ed25519\"";
    const B26_SIGNATURE: &str = "sig-b26=:wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1\
        u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw==:";

    #[test]
    fn rfc9421_b26_ed25519_test_vector() {
        let key = HeartbeatKey::from_pkcs8_pem(B14_PRIVATE_PEM).unwrap();
        let public = VerifyingKey::from_public_key_pem(B14_PUBLIC_PEM).unwrap();
        assert_eq!(key.signing_key().verifying_key(), public);

        // The test-request of B.2, as far as B.2.6's components see it.
        let values = [
            ("date", "Tue, 20 Apr 2021 02:07:55 GMT"),
            ("@method", "POST"),
            ("@path", "/foo"),
            ("@authority", "example.com"),
            ("content-type", "application/json"),
            ("content-length", "18"),
        ];
        let names: Vec<&str> = values.iter().map(|(n, _)| *n).collect();
        let params = Params {
            components: &names,
            created: 1_618_884_473,
            keyid: "test-key-ed25519",
            alg: None,
            tag: None,
        };
        let params_text = params.serialize();
        assert_eq!(format!("sig-b26={params_text}"), B26_SIGNATURE_INPUT);
        let base = signature_base(&values, &params_text);
        assert_eq!(base, B26_BASE);

        // Ed25519 is deterministic: our signature over the RFC's base is the RFC's.
        let sig = key.signing_key().sign(base.as_bytes());
        let mut ser = DictSerializer::new();
        let _ = ser.bare_item(key_ref("sig-b26"), sig.to_bytes().as_slice());
        assert_eq!(ser.finish().unwrap(), B26_SIGNATURE);
        // And the RFC's signature verifies with the RFC's public key through our parser.
        let dict: Dictionary = Parser::new(B26_SIGNATURE).parse().unwrap();
        let Some(ListEntry::Item(item)) = dict.get("sig-b26") else {
            panic!("no sig-b26")
        };
        let raw: [u8; 64] = item
            .bare_item
            .as_byte_sequence()
            .unwrap()
            .try_into()
            .unwrap();
        public
            .verify_strict(base.as_bytes(), &Signature::from_bytes(&raw))
            .unwrap();
    }

    #[test]
    fn rfc9530_content_digest_example() {
        // RFC 9530 §2: the digest of `{"hello": "world"}`.
        assert_eq!(
            content_digest(b"{\"hello\": \"world\"}"),
            "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
        );
        // Empty content has a digest too (RFC 9530 §2: it is of the content, even empty).
        assert_eq!(
            content_digest(b""),
            "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
        );
    }

    const URI: &str = "https://control.example:8443/v1/heartbeats";
    const CT: &str = "application/json";
    const NOW: u64 = 1_750_000_000;
    const SKEW: Duration = Duration::from_secs(300);

    fn key() -> HeartbeatKey {
        HeartbeatKey::from_signing_key(SigningKey::from_bytes(&[42u8; 32]))
    }

    fn received<'a>(h: &'a SignedHeaders, body: &'a [u8]) -> Received<'a> {
        Received {
            method: "POST",
            target_uri: URI,
            content_type: Some(CT),
            content_digest: Some(&h.content_digest),
            signature_input: Some(&h.signature_input),
            signature: Some(&h.signature),
            body,
        }
    }

    #[test]
    fn headers_and_base_have_the_contract_shape() {
        let k = key();
        let body = br#"{"v":1,"seq":7}"#;
        let h = sign(&k, "POST", URI, CT, body, NOW).unwrap();
        let kid = &k.info().key_id;
        let params = format!(
            "(\"@method\" \"@target-uri\" \"content-type\" \"content-digest\");created={NOW}\
             ;keyid=\"{kid}\";alg=\"ed25519\";tag=\"vigil-heartbeat\""
        );
        assert_eq!(h.signature_input, format!("vigil={params}"));
        assert_eq!(h.content_digest, content_digest(body));
        let base = format!(
            "\"@method\": POST\n\"@target-uri\": {URI}\n\"content-type\": {CT}\n\
             \"content-digest\": {}\n\"@signature-params\": {params}",
            h.content_digest
        );
        let sig = k.signing_key().sign(base.as_bytes());
        assert_eq!(
            h.signature,
            format!("vigil=:{}:", STANDARD.encode(sig.to_bytes()))
        );
    }

    #[test]
    fn sign_then_verify_round_trips() {
        let k = key();
        let body = vec![b'x'; 4096];
        let h = sign(&k, "POST", URI, CT, &body, NOW).unwrap();
        let v = verify(&k.public_key(), &received(&h, &body), NOW + 299, SKEW).unwrap();
        assert_eq!(
            v,
            VerifiedParams {
                created: NOW,
                key_id: k.info().key_id.clone()
            }
        );
        assert_eq!(
            signature_key_id(&h.signature_input).unwrap(),
            k.info().key_id
        );
        // Empty bodies sign and verify too.
        let h = sign(&k, "POST", URI, CT, b"", NOW).unwrap();
        verify(&k.public_key(), &received(&h, b""), NOW, SKEW).unwrap();
    }

    #[test]
    fn verify_tolerates_optional_whitespace_in_fields() {
        let k = key();
        let h = sign(&k, "POST", URI, CT, b"{}", NOW).unwrap();
        let spaced = h.signature_input.replace(";created", " ;created");
        let input = h.signature_input.replacen("\" \"", "\"  \"", 1);
        let mut r = received(&h, b"{}");
        let ct = format!("  {CT}\t");
        r.content_type = Some(&ct);
        r.signature_input = Some(&input);
        verify(&k.public_key(), &r, NOW, SKEW).unwrap();
        // `;created` after a space is not valid SF syntax: refused as malformed.
        r.signature_input = Some(&spaced);
        assert!(matches!(
            verify(&k.public_key(), &r, NOW, SKEW),
            Err(VerifyError::Malformed { .. })
        ));
    }

    #[test]
    fn tampering_is_detected() {
        let k = key();
        let body = br#"{"v":1,"seq":7,"state":"available"}"#;
        let h = sign(&k, "POST", URI, CT, body, NOW).unwrap();
        let p = k.public_key();
        let check = |r: Received<'_>| verify(&p, &r, NOW, SKEW);

        let tampered_body = br#"{"v":1,"seq":8,"state":"available"}"#;
        assert_eq!(
            check(Received {
                body: tampered_body,
                ..received(&h, body)
            }),
            Err(VerifyError::BadDigest)
        );
        // A digest recomputed for the tampered body no longer matches the signature.
        let forged = content_digest(tampered_body);
        assert_eq!(
            check(Received {
                body: tampered_body,
                content_digest: Some(&forged),
                ..received(&h, body)
            }),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            check(Received {
                target_uri: "https://control.example:8443/v1/other",
                ..received(&h, body)
            }),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            check(Received {
                method: "PUT",
                ..received(&h, body)
            }),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            check(Received {
                content_type: Some("text/plain"),
                ..received(&h, body)
            }),
            Err(VerifyError::BadSignature)
        );
        // `created` moved within the window: the signature covers it.
        let moved = h
            .signature_input
            .replace(&format!("created={NOW}"), &format!("created={}", NOW + 1));
        assert_eq!(
            check(Received {
                signature_input: Some(&moved),
                ..received(&h, body)
            }),
            Err(VerifyError::BadSignature)
        );
        // A flipped signature byte.
        let mut raw = STANDARD
            .decode(
                h.signature
                    .trim_start_matches("vigil=:")
                    .trim_end_matches(':'),
            )
            .unwrap();
        raw[10] ^= 1;
        let flipped = format!("vigil=:{}:", STANDARD.encode(&raw));
        assert_eq!(
            check(Received {
                signature: Some(&flipped),
                ..received(&h, body)
            }),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn created_outside_the_window_is_refused() {
        let k = key();
        let h = sign(&k, "POST", URI, CT, b"{}", NOW).unwrap();
        let r = received(&h, b"{}");
        for now in [NOW + 301, NOW - 301] {
            assert!(matches!(
                verify(&k.public_key(), &r, now, SKEW),
                Err(VerifyError::CreatedOutOfWindow { off_by: 301, .. })
            ));
        }
        verify(&k.public_key(), &r, NOW - 300, SKEW).unwrap();
    }

    #[test]
    fn profile_violations_have_their_own_errors() {
        let k = key();
        let p = k.public_key();
        let h = sign(&k, "POST", URI, CT, b"{}", NOW).unwrap();
        let with_input = |input: &str| {
            verify(
                &p,
                &Received {
                    signature_input: Some(input),
                    ..received(&h, b"{}")
                },
                NOW,
                SKEW,
            )
        };
        let i = &h.signature_input;
        assert_eq!(
            with_input(&i.replace("vigil=", "other=")),
            Err(VerifyError::WrongLabel {
                found: vec!["other".into()]
            })
        );
        assert_eq!(
            with_input(&i.replace("alg=\"ed25519\"", "alg=\"rsa-pss-sha512\"")),
            Err(VerifyError::WrongAlgorithm("rsa-pss-sha512".into()))
        );
        assert_eq!(
            with_input(&i.replace(";alg=\"ed25519\"", "")),
            Err(VerifyError::MissingParameter("alg"))
        );
        assert_eq!(
            with_input(&i.replace("vigil-heartbeat", "other")),
            Err(VerifyError::WrongTag("other".into()))
        );
        assert_eq!(
            with_input(&i.replace(" \"content-digest\"", "")),
            Err(VerifyError::MissingComponent("content-digest"))
        );
        assert_eq!(
            with_input(&i.replace("\"@method\"", "\"@method\" \"@method\"")),
            Err(VerifyError::DuplicateComponent("@method".into()))
        );
        assert_eq!(
            with_input(&i.replace("\"@method\"", "\"@method\" \"date\"")),
            Err(VerifyError::UnexpectedComponent("\"date\"".into()))
        );
        assert_eq!(
            with_input(&i.replace(";tag=", ";nonce=\"x\";tag=")),
            Err(VerifyError::UnexpectedParameter("nonce".into()))
        );
        assert!(matches!(
            with_input(&i.replace(&k.info().key_id, "someone-else")),
            Err(VerifyError::KeyIdMismatch { .. })
        ));
        assert!(matches!(
            with_input("vigil=(\"@method\""),
            Err(VerifyError::Malformed { .. })
        ));
        // Another host's key.
        let other = HeartbeatKey::from_signing_key(SigningKey::from_bytes(&[1u8; 32]));
        assert!(matches!(
            verify(&other.public_key(), &received(&h, b"{}"), NOW, SKEW),
            Err(VerifyError::KeyIdMismatch { .. })
        ));
        assert_eq!(
            verify(
                &p,
                &Received {
                    content_digest: None,
                    ..received(&h, b"{}")
                },
                NOW,
                SKEW
            ),
            Err(VerifyError::MissingHeader("Content-Digest"))
        );
        assert_eq!(
            verify(
                &p,
                &Received {
                    content_digest: Some("sha-512=:AAAA:"),
                    ..received(&h, b"{}")
                },
                NOW,
                SKEW
            ),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn values_that_could_forge_base_lines_are_refused() {
        let k = key();
        for (uri, ct) in [
            ("https://x/a\n\"@method\": GET", CT),
            ("https://x/a b", CT),
            ("", CT),
            (URI, "application/json\r\nx: y"),
            (URI, "application/jsön"),
        ] {
            assert!(
                matches!(
                    sign(&k, "POST", uri, ct, b"{}", NOW),
                    Err(SignError::BadComponent { .. })
                ),
                "{uri:?} {ct:?}"
            );
        }
        assert!(matches!(
            sign(&k, "POST", URI, CT, b"{}", u64::MAX),
            Err(SignError::Created(_))
        ));
    }
}
