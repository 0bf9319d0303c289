//! The host's Ed25519 heartbeat signing key on disk, and the ids derived from it.
//!
//! # File format
//! One PKCS#8 private key (RFC 5208/5958 `OneAsymmetricKey`, with the Ed25519 algorithm
//! identifier of RFC 8410) in PEM armour, `-----BEGIN PRIVATE KEY-----`. We chose it over
//! a home-made "seed in base64" file because it is versioned and self-describing (the
//! structure carries a version number and the algorithm OID, so a future key type cannot
//! be mistaken for this one), and because every standard tool reads it: an operator can
//! check a key with `openssl pkey -in heartbeat.key -pubout` without trusting vigil. We
//! write version 1 (the 32-byte seed only), exactly what `openssl genpkey -algorithm
//! ed25519` writes, because OpenSSL 3.0 and Python's `cryptography` refuse version 2
//! (seed plus public key). Reading accepts both; a v2 file whose public key does not match
//! its seed is refused as malformed.
//!
//! # Invariants
//! - A key file is written only by [`generate`], mode 0600 from the moment it exists (the
//!   temp file is created 0600 before any byte is written), fsync'd, and published with
//!   a hard link, which fails rather than replaces: an existing key is never overwritten,
//!   not even by two `vigil keygen` racing each other.
//! - [`load`] refuses a file that group or others may read or write, naming the path and
//!   its mode: a key others can read is a key others can sign heartbeats with.
//! - Key material never reaches `Debug`, `Display` or a log: [`HeartbeatKey`]'s `Debug`
//!   shows only the key id, and no error carries file content.
//!
//! # Ids
//! [`KeyInfo::public_key_b64`] is the standard base64 of the 32 raw public-key bytes (what
//! `vigil control enroll --pubkey` takes); [`KeyInfo::key_id`] is the unpadded base64url
//! SHA-256 of those 32 bytes, the `keyid` signature parameter of the contract.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, KeypairBytes};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// A PEM-armoured PKCS#8 Ed25519 key is about 170 bytes; anything much larger is not one,
/// and reading it whole would let a wrong `key_file` (a log, a device) eat memory.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// Why a key could not be created or loaded. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// `generate` without `if_missing` found a file (or anything) at the path.
    #[error(
        "key file {} already exists; refusing to replace it (--if-missing keeps it)",
        .path.display()
    )]
    Exists {
        /// The key file.
        path: PathBuf,
    },
    /// The key file does not exist.
    #[error(
        "key file {} does not exist (create it with `vigil keygen --out {}`)",
        .path.display(), .path.display()
    )]
    Missing {
        /// The key file.
        path: PathBuf,
    },
    /// Group or others may read or write the key file.
    #[error(
        "key file {} has mode {mode:04o}; it must be 0600 (chmod 600 {})",
        .path.display(), .path.display()
    )]
    LoosePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The path is a directory, device or other non-regular file.
    #[error("key file {} is not a regular file", .path.display())]
    NotAFile {
        /// The key file.
        path: PathBuf,
    },
    /// The file could not be opened or read.
    #[error("reading key file {}: {source}", .path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is not an Ed25519 PKCS#8 PEM private key.
    #[error("key file {} is not an Ed25519 PKCS#8 PEM private key: {reason}", .path.display())]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// What is wrong (never any of the file's content).
        reason: String,
    },
    /// The new key could not be written.
    #[error("writing key file {}: {source}", .path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The operating system gave no randomness for a new key.
    #[error("no randomness from the operating system for a new key: {0}")]
    Random(String),
    /// A public key given as text (enrolment) is not 32 bytes of standard base64.
    #[error("public key {text:?} is not the standard base64 of 32 bytes: {reason}")]
    BadPublicKey {
        /// The text as given (a public key is not a secret).
        text: String,
        /// What is wrong.
        reason: String,
    },
}

/// The public identity of a key, as `vigil keygen` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Standard (padded) base64 of the 32 raw public-key bytes.
    pub public_key_b64: String,
    /// Unpadded base64url of SHA-256 of the 32 raw public-key bytes: the `keyid`.
    pub key_id: String,
}

impl KeyInfo {
    /// The ids of a raw 32-byte Ed25519 public key.
    pub fn of_public_key(public: &[u8; 32]) -> KeyInfo {
        KeyInfo {
            public_key_b64: STANDARD.encode(public),
            key_id: key_id(public),
        }
    }
}

/// The `keyid` of a raw 32-byte public key: unpadded base64url of its SHA-256.
pub fn key_id(public: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(public))
}

/// A verification key, as a control plane holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    info: KeyInfo,
}

impl PublicKey {
    /// Parses the standard base64 of 32 raw bytes (`public_key` as `vigil keygen` prints it).
    ///
    /// # Errors
    /// [`KeyError::BadPublicKey`] when the text is not base64 of 32 bytes, or the bytes are
    /// not a valid Ed25519 point, or a small-order one.
    pub fn from_b64(text: &str) -> Result<PublicKey, KeyError> {
        let bad = |reason: String| KeyError::BadPublicKey {
            text: text.to_string(),
            reason,
        };
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|e| bad(e.to_string()))?;
        let raw: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| bad(format!("{} bytes", bytes.len())))?;
        let key = VerifyingKey::from_bytes(&raw).map_err(|_| bad("not an Ed25519 point".into()))?;
        // A small-order key verifies forged signatures with a fair chance under the
        // batched (cofactorless) check the control plane uses, and no real key is one:
        // refuse it where it enters, at enrolment.
        if key.is_weak() {
            return Err(bad("a small-order (weak) Ed25519 point".into()));
        }
        Ok(PublicKey::from_verifying_key(key))
    }

    /// Wraps a verifying key.
    pub fn from_verifying_key(key: VerifyingKey) -> PublicKey {
        PublicKey {
            info: KeyInfo::of_public_key(key.as_bytes()),
            key,
        }
    }

    /// The key for signature checks.
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.key
    }

    /// The printable ids.
    pub fn info(&self) -> &KeyInfo {
        &self.info
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey")
            .field("key_id", &self.info.key_id)
            .finish_non_exhaustive()
    }
}

/// The host's signing key, loaded. Deliberately not `Clone` (one copy of the secret per
/// process; share it behind an `Arc`), and its `Debug` shows only the key id.
pub struct HeartbeatKey {
    signing: SigningKey,
    info: KeyInfo,
}

impl HeartbeatKey {
    /// Wraps a signing key (tests, and keys parsed by [`load`]).
    pub fn from_signing_key(signing: SigningKey) -> HeartbeatKey {
        let info = KeyInfo::of_public_key(signing.verifying_key().as_bytes());
        HeartbeatKey { signing, info }
    }

    /// Parses a PKCS#8 PEM private key (the key file's content).
    ///
    /// # Errors
    /// The reason the text is not an Ed25519 PKCS#8 PEM key (no key material in it).
    pub fn from_pkcs8_pem(pem: &str) -> Result<HeartbeatKey, String> {
        SigningKey::from_pkcs8_pem(pem)
            .map(HeartbeatKey::from_signing_key)
            .map_err(|e| e.to_string())
    }

    /// The public key and key id.
    pub fn info(&self) -> &KeyInfo {
        &self.info
    }

    /// The public half, for verifying our own signatures.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from_verifying_key(self.signing.verifying_key())
    }

    /// The secret, for [`super::sign`] only.
    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.signing
    }
}

impl fmt::Debug for HeartbeatKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeartbeatKey")
            .field("key_id", &self.info.key_id)
            .finish_non_exhaustive()
    }
}

/// Creates a new key at `path` (mode 0600, durable) and returns its ids.
///
/// With `if_missing`, an existing file is kept and the ids of the key in it returned (it
/// must load: a loose mode or a malformed file is an error, not a reason to replace it).
///
/// # Errors
/// [`KeyError::Exists`] when something is at `path` and `if_missing` is false; the
/// [`load`] errors for an existing file with `if_missing`; [`KeyError::Write`] or
/// [`KeyError::Random`] when the new key cannot be made.
pub fn generate(path: &Path, if_missing: bool) -> Result<KeyInfo, KeyError> {
    // Cheap early answer; the hard link below is what actually refuses to replace.
    if fs::symlink_metadata(path).is_ok() {
        return existing(path, if_missing);
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    let signing = SigningKey::from_bytes(&seed);
    // `SigningKey` zeroizes itself on drop; the stack copy of the seed is ours to clear.
    seed.fill(0);
    let key = HeartbeatKey::from_signing_key(signing);
    // PKCS#8 v1 (the seed only), byte for byte what `openssl genpkey -algorithm ed25519`
    // writes: OpenSSL 3.0 and Python's `cryptography` refuse the v2 form with the public
    // key appended ("extra data"), and the public key is derived from the seed anyway.
    let v1 = KeypairBytes {
        secret_key: key.signing.to_bytes(),
        public_key: None,
    };
    let pem = v1
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::Write {
            path: path.to_path_buf(),
            source: io::Error::other(format!("encoding PKCS#8: {e}")),
        })?;
    match write_new(path, pem.as_bytes()) {
        Ok(()) => Ok(key.info),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => existing(path, if_missing),
        Err(source) => Err(KeyError::Write {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn existing(path: &Path, if_missing: bool) -> Result<KeyInfo, KeyError> {
    if if_missing {
        load(path).map(|k| k.info)
    } else {
        Err(KeyError::Exists {
            path: path.to_path_buf(),
        })
    }
}

/// Publishes `bytes` at `path` only if nothing is there: temp file (0600, `O_EXCL`),
/// `write_all`, fsync, hard link to `path` (fails with `AlreadyExists` instead of
/// replacing, unlike `durable::write_atomic`'s rename), unlink the temp name, fsync the
/// directory so the new name survives a crash.
fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{:016x}",
        name.to_string_lossy(),
        std::process::id(),
        fastrand::u64(..)
    ));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    let linked = written.and_then(|()| fs::hard_link(&tmp, path));
    // Best effort: after a successful link the temp name is a second name for the key;
    // after a failure it is garbage. Either way it must go, and its removal cannot undo
    // the link.
    let _ = fs::remove_file(&tmp);
    linked?;
    File::open(dir)?.sync_all()
}

/// Loads the key at `path`, refusing a file group or others may read or write.
///
/// # Errors
/// [`KeyError::Missing`], [`KeyError::Read`], [`KeyError::NotAFile`],
/// [`KeyError::LoosePermissions`] or [`KeyError::Malformed`], each naming the path.
pub fn load(path: &Path) -> Result<HeartbeatKey, KeyError> {
    let read_err = |source: io::Error| {
        if source.kind() == io::ErrorKind::NotFound {
            KeyError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            KeyError::Read {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let file = File::open(path).map_err(read_err)?;
    // The mode of the file we opened, not of whatever the path names a moment later.
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(KeyError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::LoosePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut text = String::new();
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData {
                KeyError::Malformed {
                    path: path.to_path_buf(),
                    reason: "not text".into(),
                }
            } else {
                read_err(e)
            }
        })?;
    let result = if text.len() as u64 > MAX_KEY_FILE_BYTES {
        Err(format!("larger than {MAX_KEY_FILE_BYTES} bytes"))
    } else {
        HeartbeatKey::from_pkcs8_pem(&text)
    };
    // The PEM text is the secret in another encoding; don't leave it in freed memory.
    zeroize_string(text);
    result.map_err(|reason| KeyError::Malformed {
        path: path.to_path_buf(),
        reason,
    })
}

fn zeroize_string(text: String) {
    let mut bytes = text.into_bytes();
    bytes.fill(0);
    // Keeps the compiler from proving the buffer dead and dropping the fill.
    std::hint::black_box(&bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn generate_writes_0600_and_load_gives_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hb.key");
        let info = generate(&p, false).unwrap();
        assert_eq!(mode(&p), 0o600);
        let text = fs::read_to_string(&p).unwrap();
        // PKCS#8 v1 with the Ed25519 OID, the prefix OpenSSL's own Ed25519 keys share.
        assert!(
            text.starts_with("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI"),
            "{text}"
        );
        let key = load(&p).unwrap();
        assert_eq!(key.info(), &info);
        // Only the key file: no temp file left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn generate_refuses_an_existing_file_and_if_missing_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hb.key");
        let first = generate(&p, false).unwrap();
        let before = fs::read(&p).unwrap();
        assert!(matches!(generate(&p, false), Err(KeyError::Exists { .. })));
        assert_eq!(generate(&p, true).unwrap(), first);
        assert_eq!(fs::read(&p).unwrap(), before);
    }

    #[test]
    fn write_new_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        fs::write(&p, b"old").unwrap();
        let e = write_new(&p, b"new").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn load_refuses_loose_modes_naming_path_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hb.key");
        generate(&p, false).unwrap();
        for m in [0o644, 0o640, 0o604, 0o620, 0o602, 0o660] {
            fs::set_permissions(&p, fs::Permissions::from_mode(m)).unwrap();
            let e = load(&p).unwrap_err();
            assert!(
                matches!(e, KeyError::LoosePermissions { mode, .. } if mode == m),
                "{e}"
            );
            assert_eq!(
                e.to_string(),
                format!(
                    "key file {0} has mode {m:04o}; it must be 0600 (chmod 600 {0})",
                    p.display()
                )
            );
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).unwrap();
        load(&p).unwrap();
    }

    #[test]
    fn load_reports_missing_malformed_and_non_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hb.key");
        assert!(matches!(load(&p), Err(KeyError::Missing { .. })));
        fs::write(
            &p,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let e = load(&p).unwrap_err();
        assert!(matches!(e, KeyError::Malformed { .. }), "{e}");
        assert!(e.to_string().contains(&p.display().to_string()));
        fs::write(&p, vec![b'A'; 10_000]).unwrap();
        assert!(matches!(load(&p), Err(KeyError::Malformed { .. })));
        fs::write(&p, [0xff, 0xfe, 0x00]).unwrap();
        assert!(matches!(load(&p), Err(KeyError::Malformed { .. })));
        let d = dir.path().join("d");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(load(&d), Err(KeyError::NotAFile { .. })));
    }

    #[test]
    fn an_openssl_style_v1_key_loads() {
        // RFC 9421 B.1.4 test-key-ed25519, PKCS#8 v1 (seed only), as OpenSSL writes it.
        let pem = "-----BEGIN PRIVATE KEY-----\n\
                   MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n\
                   -----END PRIVATE KEY-----\n";
        let key = HeartbeatKey::from_pkcs8_pem(pem).unwrap();
        // The same appendix's JWK `x`, re-encoded as standard base64.
        let x = URL_SAFE_NO_PAD
            .decode("JrQLj5P_89iXES9-vFgrIy29clF9CC_oPPsw3c5D0bs")
            .unwrap();
        assert_eq!(key.info().public_key_b64, STANDARD.encode(x));
    }

    #[test]
    fn debug_shows_no_key_material() {
        let key = HeartbeatKey::from_signing_key(SigningKey::from_bytes(&[7u8; 32]));
        let dbg = format!("{key:?}");
        assert_eq!(
            dbg,
            format!("HeartbeatKey {{ key_id: {:?}, .. }}", key.info().key_id)
        );
        assert!(!dbg.contains(&key.info().public_key_b64));
    }

    #[test]
    fn key_id_is_base64url_sha256_of_the_raw_public_key() {
        let public = [1u8; 32];
        let id = key_id(&public);
        assert_eq!(id.len(), 43);
        assert!(!id.contains(['=', '+', '/']));
        assert_eq!(
            URL_SAFE_NO_PAD.decode(&id).unwrap(),
            Sha256::digest(public).to_vec()
        );
    }

    #[test]
    fn public_key_from_b64_round_trips_and_rejects_junk() {
        let key = HeartbeatKey::from_signing_key(SigningKey::from_bytes(&[9u8; 32]));
        let p = PublicKey::from_b64(&key.info().public_key_b64).unwrap();
        assert_eq!(p.info(), key.info());
        assert!(PublicKey::from_b64("AAAA").is_err());
        assert!(PublicKey::from_b64("not base64!").is_err());
    }

    #[test]
    fn small_order_public_keys_are_refused() {
        // The identity (y = 1) and the order-2 point (y = -1): valid encodings, weak keys.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut order2 = [0xffu8; 32];
        order2[0] = 0xec;
        order2[31] = 0x7f;
        for raw in [identity, order2] {
            let err = PublicKey::from_b64(&STANDARD.encode(raw)).unwrap_err();
            assert!(err.to_string().contains("small-order"), "{err}");
        }
    }
}
