//! `vigil image prep`: removes host-unique state before a machine image is snapshotted, so
//! every host booted from the image gets its own identity: its own key (made on first
//! boot, e.g. `vigil keygen --if-missing` in `ExecStartPre`), its own `seq`, an empty
//! spool and audit log, no cooldowns, budgets or pause, and the config's
//! `initial_lifecycle`.
//!
//! Only names vigil itself writes are removed ([`STATE_ENTRIES`] in `state_dir`, plus the
//! configured key file), never "everything in the directory": a `state_dir` pointed at a
//! shared directory by mistake must not be emptied. The host id is never cached (it is
//! read from `/etc/machine-id` at each start), so there is nothing else to forget in
//! `state_dir`; but a machine id baked into the image itself gives every host booted from
//! it the same host id, so [`machine_id_warnings`] says so (a warning: clearing the machine
//! id is the image build's job, usually its last step, and not vigil's to do).
//!
//! Nothing here writes to `/etc`: prep works on an image whose `/etc` is read-only.

use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::agent::LOCK_FILE;
use crate::config::Config;

/// Entries of `state_dir` that belong to one host, removed by `image prep`.
pub const STATE_ENTRIES: &[&str] = &[
    crate::heartbeat::seq::FILE_NAME,
    "spool",
    "lifecycle.json",
    crate::remediation::state::FILE,
    "audit",
    "heartbeat.key",
    ".write-probe",
];

/// Why `image prep` did not (completely) run.
#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    /// The agent holds the state directory's lock.
    #[error(
        "an agent is running with state directory {} (stop it first, or use --force)",
        dir.display()
    )]
    AgentRunning {
        /// The state directory.
        dir: PathBuf,
    },
    /// A path that would be removed cannot be (a read-only file system, no permission);
    /// found before anything was removed.
    #[error("{} cannot be removed: {source}; nothing was removed", path.display())]
    NotRemovable {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Something could not be removed.
    #[error("removing {}: {source}", path.display())]
    Remove {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Removes the host-unique state of `config`; returns what was removed. Refuses while an
/// agent holds the state directory unless `force`.
///
/// Every path that exists is first checked to be removable (its directory writable, e.g.
/// a key file under a read-only `/etc`), so such a prep fails before it removes
/// anything rather than half-way.
///
/// # Errors
/// [`PrepError::AgentRunning`]; [`PrepError::NotRemovable`] before anything was removed;
/// or [`PrepError::Remove`] for the first path that could not be removed after all (what
/// was removed before it stays removed; running again continues).
pub fn prep(config: &Config, force: bool) -> Result<Vec<PathBuf>, PrepError> {
    let dir = &config.agent.state_dir;
    // Hold the agent's lock while removing, so an agent starting meanwhile waits for us
    // (it fails to lock and exits; systemd restarts it after prep is done).
    let _lock = match lock(dir) {
        Ok(l) => l,
        Err(_) if force => None,
        Err(e) => return Err(e),
    };
    let mut paths: Vec<PathBuf> = STATE_ENTRIES.iter().map(|e| dir.join(e)).collect();
    if let Some(hb) = &config.heartbeat {
        if !paths.contains(&hb.key_file) {
            paths.push(hb.key_file.clone());
        }
    }
    let mut present = Vec::new();
    for path in paths {
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => {
                removable(&path, meta.is_dir())?;
                present.push(path);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(PrepError::NotRemovable { path, source }),
        }
    }
    let mut removed = Vec::new();
    for path in present {
        if remove(&path)? {
            removed.push(path);
        }
    }
    Ok(removed)
}

/// What `image prep` warns about when `root` (`/` in `vigil image prep`) still carries a
/// machine id: a non-empty `etc/machine-id`, or a `var/lib/dbus/machine-id` (systemd
/// copies D-Bus's id into an empty `/etc/machine-id` at boot). Every host booted from
/// such an image gets the same machine id, so, with `host_id = "auto"`, the same host id.
/// Each line names the file and the fix. An unreadable file is reported too: whether it
/// holds an id cannot be told.
pub fn machine_id_warnings(root: &Path) -> Vec<String> {
    let mut warnings = Vec::new();
    let etc = root.join("etc/machine-id");
    match std::fs::read(&etc) {
        Ok(id) if id.iter().all(u8::is_ascii_whitespace) => {}
        Ok(_) => warnings.push(format!(
            "{} is not empty: every host booted from this image gets the same machine id, \
             and with host_id = \"auto\" the same host id; clear it as the image's last \
             step: truncate -s0 {}",
            etc.display(),
            etc.display()
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warnings.push(format!(
            "{}: {e}; an image must not carry a machine id (truncate -s0 {})",
            etc.display(),
            etc.display()
        )),
    }
    let dbus = root.join("var/lib/dbus/machine-id");
    match std::fs::symlink_metadata(&dbus) {
        // Debian links it to /etc/machine-id; as a link it adds nothing of its own.
        Ok(m) if m.file_type().is_symlink() => {}
        Ok(_) => warnings.push(format!(
            "{} exists: systemd copies it into an empty /etc/machine-id at boot, so every \
             host booted from this image gets the same machine id; remove it: rm {}",
            dbus.display(),
            dbus.display()
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warnings.push(format!(
            "{}: {e}; an image must not carry a machine id (rm {})",
            dbus.display(),
            dbus.display()
        )),
    }
    warnings
}

/// Whether `path` can be removed: its directory (and, for a directory, itself: its
/// entries go first) must be writable and searchable. `access(2)` also says EROFS for a
/// read-only file system, which root's permissions do not override.
fn removable(path: &Path, is_dir: bool) -> Result<(), PrepError> {
    use nix::unistd::{AccessFlags, access};
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut dirs = vec![parent];
    if is_dir {
        dirs.push(path);
    }
    for dir in dirs {
        access(dir, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|errno| {
            PrepError::NotRemovable {
                path: path.to_path_buf(),
                source: errno.into(),
            }
        })?;
    }
    Ok(())
}

/// Takes the agent's lock if the directory exists (`None` when there is no directory, so
/// nothing to protect).
fn lock(dir: &Path) -> Result<Option<Flock<std::fs::File>>, PrepError> {
    let path = dir.join(LOCK_FILE);
    let file = match std::fs::OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        // No lock file: no agent has run here, or it was removed by an earlier prep.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PrepError::Remove { path, source }),
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, Errno::EWOULDBLOCK)) => Err(PrepError::AgentRunning {
            dir: dir.to_path_buf(),
        }),
        Err((_, errno)) => Err(PrepError::Remove {
            path,
            source: errno.into(),
        }),
    }
}

/// Removes a file or a directory tree; false when it did not exist.
fn remove(path: &Path) -> Result<bool, PrepError> {
    let err = |source| PrepError::Remove {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(err(e)),
    };
    if meta.is_dir() {
        std::fs::remove_dir_all(path).map_err(err)?;
    } else {
        std::fs::remove_file(path).map_err(err)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, key: Option<&Path>) -> Config {
        let mut text = format!("[agent]\nstate_dir = {:?}\n", dir.display().to_string());
        if let Some(k) = key {
            text.push_str(&format!(
                "[heartbeat]\nurl = \"https://c.example/hb\"\nkey_file = {:?}\n",
                k.display().to_string()
            ));
        }
        crate::config::parse(Path::new("t.toml"), &text).unwrap()
    }

    #[test]
    fn removes_host_state_and_the_key_but_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        std::fs::create_dir_all(state.join("spool")).unwrap();
        std::fs::write(state.join("spool/00000000000000000001.seg"), b"x").unwrap();
        std::fs::write(state.join("heartbeat-seq.json"), b"{}").unwrap();
        std::fs::write(state.join("lifecycle.json"), b"{}").unwrap();
        std::fs::write(state.join("notes.txt"), b"operator's").unwrap();
        let key = d.path().join("etc-key.pem");
        std::fs::write(&key, b"k").unwrap();

        let removed = prep(&config(&state, Some(&key)), false).unwrap();
        let mut names: Vec<String> = removed
            .iter()
            .map(|p| p.strip_prefix(d.path()).unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "etc-key.pem",
                "state/heartbeat-seq.json",
                "state/lifecycle.json",
                "state/spool"
            ]
        );
        assert!(state.join("notes.txt").exists(), "unknown files are kept");
        assert!(prep(&config(&state, Some(&key)), false).unwrap().is_empty());
    }

    #[test]
    fn a_path_it_cannot_remove_stops_it_before_it_removes_anything() {
        use std::os::unix::fs::PermissionsExt;
        if nix::unistd::geteuid().is_root() {
            // Root's permissions override the mode; .ci/systemd-it covers this as root
            // with a key file under a read-only /etc.
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("lifecycle.json"), b"{}").unwrap();
        let etc = d.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("key.pem"), b"k").unwrap();
        std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o555)).unwrap();

        let e = prep(&config(&state, Some(&etc.join("key.pem"))), false).unwrap_err();
        std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(e, PrepError::NotRemovable { .. }), "{e}");
        assert!(e.to_string().contains("nothing was removed"), "{e}");
        assert!(state.join("lifecycle.json").exists(), "nothing removed");
    }

    #[test]
    fn warns_about_a_machine_id_in_the_image() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        // No files at all (a tree without systemd), then empty ones: nothing to say.
        assert!(machine_id_warnings(root).is_empty());
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("var/lib/dbus")).unwrap();
        std::fs::write(root.join("etc/machine-id"), b"").unwrap();
        assert!(machine_id_warnings(root).is_empty());
        std::fs::write(root.join("etc/machine-id"), b"\n").unwrap();
        assert!(machine_id_warnings(root).is_empty());
        // Debian's link from D-Bus's id to systemd's is not an id of its own.
        std::os::unix::fs::symlink("/etc/machine-id", root.join("var/lib/dbus/machine-id"))
            .unwrap();
        assert!(machine_id_warnings(root).is_empty());

        std::fs::write(
            root.join("etc/machine-id"),
            b"0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        let w = machine_id_warnings(root);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("etc/machine-id is not empty"), "{w:?}");
        assert!(w[0].contains("truncate -s0 "), "{w:?}");

        std::fs::remove_file(root.join("var/lib/dbus/machine-id")).unwrap();
        std::fs::write(root.join("var/lib/dbus/machine-id"), b"0123\n").unwrap();
        std::fs::write(root.join("etc/machine-id"), b"").unwrap();
        let w = machine_id_warnings(root);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("var/lib/dbus/machine-id exists"), "{w:?}");
        assert!(w[0].contains("rm "), "{w:?}");
    }

    #[test]
    fn refuses_while_the_lock_is_held_unless_forced() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("lifecycle.json"), b"{}").unwrap();
        let f = std::fs::File::create(d.path().join(LOCK_FILE)).unwrap();
        let held = Flock::lock(f, FlockArg::LockExclusiveNonblock).unwrap();
        let cfg = config(d.path(), None);
        let e = prep(&cfg, false).unwrap_err();
        assert!(e.to_string().contains("an agent is running"), "{e}");
        assert!(d.path().join("lifecycle.json").exists());
        assert_eq!(
            prep(&cfg, true).unwrap(),
            vec![d.path().join("lifecycle.json")]
        );
        drop(held);
    }
}
