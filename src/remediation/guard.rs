//! The guard between an approved remediation script and its execution.
//!
//! Two moments, the same rules:
//! - **at config load** ([`check_at_load`]): the script resolves (symlinks followed) to a
//!   regular file inside `[automation].dir`, owned by root or the agent's user, not
//!   writable by group or others, in a directory not writable by group or others, and
//!   hashing to the pinned SHA-256; `run_as` names a user this agent can switch to. A
//!   violation refuses the config with the key and line, so nothing fails at 3 a.m.
//! - **at execution** ([`seal`]): the file is opened once; owner, mode and real path are
//!   checked on the *open* file (fstat, `/proc/self/fd`), its bytes are read and hashed,
//!   and exactly those bytes are copied into a sealed memfd (`F_SEAL_WRITE`, `_GROW`,
//!   `_SHRINK`, `_SEAL`). The runner executes the memfd, never the path: a rename over the
//!   script, an in-place write, or a symlink swap after the check cannot change what runs.
//!   The only bytes ever executed are bytes whose hash equalled the pinned one.
//!
//! Every refusal carries a reason that starts with a stable keyword (`hash_mismatch`,
//! `bad_owner`, `bad_mode`, `outside_dir`, `not_regular_file`, `unreadable`,
//! `too_large`), followed by `: ` and the detail; the audit log and the API show it as is.

use std::ffi::CStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use sha2::{Digest, Sha256};

use crate::config::RemediationConfig;

/// The largest script the guard copies (a remediation is a short script, not a payload).
pub const MAX_SCRIPT_BYTES: u64 = 16 * 1024 * 1024;

/// Why a script may not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct Refusal {
    /// A stable keyword (see the module doc).
    pub code: &'static str,
    /// What exactly, for a person.
    pub detail: String,
}

impl Refusal {
    fn new(code: &'static str, detail: impl Into<String>) -> Self {
        Refusal {
            code,
            detail: detail.into(),
        }
    }
}

/// The lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Whether `s` is 64 hex digits.
pub fn is_well_formed(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The line `vigil approve FILE` prints: `sha256 = "<64 hex>"`.
///
/// # Errors
/// The file cannot be read.
pub fn approve_line(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(format!("sha256 = \"{}\"", sha256_hex(&bytes)))
}

/// Owner and mode rules shared by load and execution: owned by root or `me`, not writable
/// by group or others.
fn owner_and_mode(what: &str, path: &Path, uid: u32, mode: u32, me: u32) -> Result<(), Refusal> {
    if uid != 0 && uid != me {
        return Err(Refusal::new(
            "bad_owner",
            format!(
                "{what} {} is owned by uid {uid}; it must be owned by root or the agent's user (uid {me})",
                path.display()
            ),
        ));
    }
    if mode & 0o022 != 0 {
        return Err(Refusal::new(
            "bad_mode",
            format!(
                "{what} {} is writable by group or others (mode {:04o}); chmod go-w",
                path.display(),
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

/// The canonical `[automation].dir`, checked: a directory not writable by group or others.
fn checked_dir(dir: &Path) -> Result<PathBuf, Refusal> {
    let real = dir.canonicalize().map_err(|e| {
        Refusal::new(
            "unreadable",
            format!("[automation].dir {}: {e}", dir.display()),
        )
    })?;
    let meta = std::fs::metadata(&real).map_err(|e| {
        Refusal::new(
            "unreadable",
            format!("[automation].dir {}: {e}", dir.display()),
        )
    })?;
    if !meta.is_dir() {
        return Err(Refusal::new(
            "not_regular_file",
            format!("[automation].dir {} is not a directory", dir.display()),
        ));
    }
    // The directory's owner is not restricted (it may be root's /etc/vigil/remediations.d
    // while the agent runs as vigil), but nobody else may add or rename files in it.
    if meta.mode() & 0o022 != 0 {
        return Err(Refusal::new(
            "bad_mode",
            format!(
                "directory {} is writable by group or others (mode {:04o}); chmod go-w",
                real.display(),
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(real)
}

/// The config-load checks of one enabled remediation: `(key leaf, message)` per problem.
/// `me` is the agent's effective uid; `via_runner`: a privileged runner is configured, so
/// `run_as` may name any existing user ([`crate::runner::Runner::usable_user`]).
pub fn check_at_load(
    dir: &Path,
    r: &RemediationConfig,
    me: u32,
    via_runner: bool,
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if let Err(e) = check_script_at_load(dir, r, me) {
        let leaf = if e.code == "hash_mismatch" {
            "sha256"
        } else {
            "script"
        };
        problems.push((leaf, e.detail));
    }
    if let Some(user) = &r.run_as {
        if let Err(e) = crate::runner::Runner::usable_user(user, via_runner) {
            problems.push(("run_as", e.to_string()));
        }
    }
    problems
}

fn check_script_at_load(dir: &Path, r: &RemediationConfig, me: u32) -> Result<(), Refusal> {
    let real_dir = checked_dir(dir)?;
    let real = r
        .script
        .canonicalize()
        .map_err(|e| Refusal::new("unreadable", format!("script {}: {e}", r.script.display())))?;
    if !real.starts_with(&real_dir) {
        return Err(outside(&r.script, &real, &real_dir));
    }
    let meta = std::fs::metadata(&real)
        .map_err(|e| Refusal::new("unreadable", format!("script {}: {e}", real.display())))?;
    if !meta.is_file() {
        return Err(Refusal::new(
            "not_regular_file",
            format!("script {} is not a regular file", real.display()),
        ));
    }
    owner_and_mode("script", &real, meta.uid(), meta.mode(), me)?;
    if is_well_formed(&r.sha256) {
        // Reading the file twice (here and at execution) is the point: the load check
        // tells the operator now, the execution check is the one that protects.
        let bytes = std::fs::read(&real)
            .map_err(|e| Refusal::new("unreadable", format!("script {}: {e}", real.display())))?;
        let actual = sha256_hex(&bytes);
        if !actual.eq_ignore_ascii_case(&r.sha256) {
            return Err(mismatch(&r.script, &actual));
        }
    }
    Ok(())
}

fn outside(script: &Path, real: &Path, dir: &Path) -> Refusal {
    Refusal::new(
        "outside_dir",
        format!(
            "script {} resolves to {}, outside [automation].dir {}",
            script.display(),
            real.display(),
            dir.display()
        ),
    )
}

fn mismatch(script: &Path, actual: &str) -> Refusal {
    Refusal::new(
        "hash_mismatch",
        format!(
            "script {} hashes to {actual}, not the pinned sha256 (review it, then pin it \
             again with `vigil approve`)",
            script.display()
        ),
    )
}

/// A verified script: its bytes in a sealed memfd, ready to execute.
#[derive(Debug)]
pub struct Sealed {
    /// The sealed memfd (close-on-exec in the agent; the runner hands it to the child).
    pub fd: OwnedFd,
    /// The SHA-256 of the sealed bytes (equal to the pinned one).
    pub sha256: String,
    /// Their length.
    pub len: usize,
}

/// Opens `script`, checks it on the open file, hashes it and seals a copy of exactly the
/// hashed bytes. `me` is the agent's effective uid.
///
/// # Errors
/// A [`Refusal`] saying why the script may not run.
pub fn seal(dir: &Path, script: &Path, pinned: &str, me: u32) -> Result<Sealed, Refusal> {
    let real_dir = checked_dir(dir)?;
    let unreadable =
        |e: std::io::Error| Refusal::new("unreadable", format!("script {}: {e}", script.display()));
    // O_NONBLOCK: a FIFO planted under the name must not hang the engine in open(); it is
    // refused below as not a regular file.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(script)
        .map_err(unreadable)?;
    // The real path of what was opened, not of what the name points at now.
    let real =
        std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(unreadable)?;
    if !real.starts_with(&real_dir) {
        return Err(outside(script, &real, &real_dir));
    }
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(Refusal::new(
            "not_regular_file",
            format!("script {} is not a regular file", real.display()),
        ));
    }
    owner_and_mode("script", &real, meta.uid(), meta.mode(), me)?;
    if meta.len() > MAX_SCRIPT_BYTES {
        return Err(Refusal::new(
            "too_large",
            format!(
                "script {} is {} bytes, more than {MAX_SCRIPT_BYTES}",
                real.display(),
                meta.len()
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // One more byte than allowed, so that a file grown since the fstat is caught too.
    (&mut file)
        .take(MAX_SCRIPT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_SCRIPT_BYTES {
        return Err(Refusal::new(
            "too_large",
            format!(
                "script {} grew past {MAX_SCRIPT_BYTES} bytes",
                real.display()
            ),
        ));
    }
    let actual = sha256_hex(&bytes);
    if !actual.eq_ignore_ascii_case(pinned) {
        return Err(mismatch(script, &actual));
    }
    let fd = sealed_copy(&bytes)
        .map_err(|e| Refusal::new("runner", format!("sealing a copy of the script: {e}")))?;
    Ok(Sealed {
        fd,
        sha256: actual,
        len: bytes.len(),
    })
}

const MEMFD_NAME: &CStr = c"vigil-remediation";

/// `bytes` in a memfd that nobody can change any more.
fn sealed_copy(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let fd = memfd_create(
        MEMFD_NAME,
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut f = File::from(fd);
    f.write_all(bytes)?;
    let fd = OwnedFd::from(f);
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    // The child gets the memfd under its own number; std's stdio set-up dup2s onto 0-2,
    // so a memfd that landed there (a daemon started with stdin closed) would be replaced.
    if fd.as_raw_fd() < 3 {
        // std's try_clone duplicates with F_DUPFD_CLOEXEC starting at 3.
        return fd.try_clone();
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn script(dir: &Path, name: &str, body: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    #[test]
    fn sha256_of_a_known_string() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_well_formed(&sha256_hex(b"")));
        assert!(!is_well_formed("abc"));
        assert!(!is_well_formed(&"g".repeat(64)));
    }

    #[test]
    fn seal_copies_exactly_the_hashed_bytes() {
        let d = dir();
        let body = "#!/bin/sh\necho hi\n";
        let p = script(d.path(), "a.sh", body, 0o755);
        let s = seal(d.path(), &p, &sha256_hex(body.as_bytes()), me()).unwrap();
        assert_eq!(s.len, body.len());
        let copy = std::fs::read(format!("/proc/self/fd/{}", s.fd.as_raw_fd())).unwrap();
        assert_eq!(copy, body.as_bytes());
        // Sealed: a write through a fresh descriptor is refused, and so is a truncation.
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{}", s.fd.as_raw_fd()))
            .and_then(|mut f| f.write_all(b"evil"));
        assert!(w.is_err(), "a sealed memfd must not be writable");
        let t = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{}", s.fd.as_raw_fd()))
            .and_then(|f| f.set_len(0));
        assert!(t.is_err(), "a sealed memfd must not shrink");
        let copy = std::fs::read(format!("/proc/self/fd/{}", s.fd.as_raw_fd())).unwrap();
        assert_eq!(copy, body.as_bytes());
    }

    #[test]
    fn seal_refuses_a_changed_script_a_writable_one_and_one_outside_the_dir() {
        let d = dir();
        let p = script(d.path(), "a.sh", "#!/bin/sh\ntrue\n", 0o755);
        let pinned = sha256_hex(b"#!/bin/sh\ntrue\n");
        std::fs::write(&p, "#!/bin/sh\nrm -rf /\n").unwrap();
        assert_eq!(
            seal(d.path(), &p, &pinned, me()).unwrap_err().code,
            "hash_mismatch"
        );

        let p = script(d.path(), "b.sh", "x", 0o775);
        assert_eq!(
            seal(d.path(), &p, &sha256_hex(b"x"), me())
                .unwrap_err()
                .code,
            "bad_mode"
        );

        let other = dir();
        let outside_file = script(other.path(), "c.sh", "x", 0o755);
        let link = d.path().join("c.sh");
        std::os::unix::fs::symlink(&outside_file, &link).unwrap();
        let e = seal(d.path(), &link, &sha256_hex(b"x"), me()).unwrap_err();
        assert_eq!(e.code, "outside_dir", "{e}");
    }

    #[test]
    fn a_group_writable_directory_is_refused() {
        let d = dir();
        let p = script(d.path(), "a.sh", "x", 0o755);
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = seal(d.path(), &p, &sha256_hex(b"x"), me()).unwrap_err();
        assert_eq!(e.code, "bad_mode");
        assert!(e.detail.starts_with("directory "), "{e}");
    }

    #[test]
    fn another_owner_is_refused_unless_root_or_me() {
        let p = Path::new("/x");
        assert!(owner_and_mode("script", p, 0, 0o755, 1000).is_ok());
        assert!(owner_and_mode("script", p, 1000, 0o755, 1000).is_ok());
        let e = owner_and_mode("script", p, 1001, 0o755, 1000).unwrap_err();
        assert_eq!(e.code, "bad_owner");
        assert_eq!(
            owner_and_mode("script", p, 0, 0o757, 1000)
                .unwrap_err()
                .code,
            "bad_mode"
        );
    }
}
