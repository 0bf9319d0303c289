//! The `vigil control` subcommands as the binary runs them: each prints its answer (or
//! one error line, `vigil: …`) and returns the exit code.
//!
//! Exit codes: 0 done; 1 refused (`revoke` of a key that is not enrolled), a store
//! that cannot be read, or an `--from` file that cannot be read; 2 a bad
//! `--host`/`--pubkey`/`--key-id`, or a bad line in the `--from` file; 69 the listen address or
//! the store is taken, or the PostgreSQL store cannot be reached; 73 the state directory cannot be created or written; 78 an invalid
//! config (also a TLS file that cannot be used).

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::config::{self, ControlFile, StoreSetting};
use super::store::file::{FileStore, Options};
use super::store::postgresql::PgStore;
use super::store::{AnyStore, HostFilter, Page, Store, StoreError, epoch_ms};
use super::{body, routes, server};
use crate::heartbeat::keys::PublicKey;
use crate::{exit, systemd, telemetry};

fn fail(msg: impl std::fmt::Display) {
    eprintln!("vigil: {msg}");
}

fn load(flag: Option<&Path>) -> Result<ControlFile, u8> {
    config::load(&config::resolve_path(flag)).map_err(|e| {
        for line in e.to_string().lines() {
            fail(line);
        }
        exit::CONFIG
    })
}

fn store_exit(e: &StoreError) -> u8 {
    match e {
        StoreError::Locked(_) | StoreError::Unavailable(_) => exit::UNAVAILABLE,
        StoreError::Io { .. } => exit::CANTCREAT,
        _ => exit::FAILURE,
    }
}

/// The store the CLI may use while receivers run (or none does).
fn cli_store(
    cfg: &ControlFile,
    heartbeats: bool,
    rt: &tokio::runtime::Runtime,
) -> Result<AnyStore, u8> {
    let c = &cfg.control;
    if let StoreSetting::Postgres(url) = &c.store {
        return rt
            .block_on(PgStore::open_cli(url))
            .map(AnyStore::Postgres)
            .map_err(|e| {
                fail(&e);
                store_exit(&e)
            });
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&c.state_dir)
        .map_err(|e| {
            fail(format!("creating {}: {e}", c.state_dir.display()));
            exit::CANTCREAT
        })?;
    FileStore::open_read_only(&c.state_dir, heartbeats)
        .map(AnyStore::File)
        .map_err(|e| {
            fail(&e);
            store_exit(&e)
        })
}

/// The config, the runtime, then the store on it: what every subcommand but the
/// receiver starts with.
fn cli_setup(
    flag: Option<&Path>,
    heartbeats: bool,
) -> Result<(ControlFile, AnyStore, tokio::runtime::Runtime), u8> {
    let cfg = load(flag)?;
    let rt = runtime()?;
    let store = cli_store(&cfg, heartbeats, &rt)?;
    Ok((cfg, store, rt))
}

fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            fail(format!("starting the runtime: {e}"));
            exit::SOFTWARE
        })
}

/// `vigil control enroll --host ID --pubkey B64`.
pub fn enroll(flag: Option<&Path>, host: &str, pubkey: &str) -> u8 {
    if let Err(e) = body::valid_host_id(host) {
        fail(format!("--host {host:?}: {e}"));
        return exit::USAGE;
    }
    let key = match PublicKey::from_b64(pubkey) {
        Ok(k) => k,
        Err(e) => {
            fail(format!("--pubkey: {e}"));
            return exit::USAGE;
        }
    };
    let (_, store, rt) = match cli_setup(flag, false) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let kid = &key.info().key_id;
    match rt.block_on(store.enroll(host, &key)) {
        Ok(true) => {
            println!("enrolled key {kid} for host {host}");
            exit::OK
        }
        Ok(false) => {
            println!("key {kid} was already enrolled for host {host}");
            exit::OK
        }
        Err(e) => {
            fail(&e);
            store_exit(&e)
        }
    }
}

/// `vigil control enroll --from FILE`: every line checked first (`FILE:LINE: reason` and
/// nothing enrolled on the first bad one), then all enrolled at once
/// ([`Store::enroll_many`]).
pub fn enroll_from(flag: Option<&Path>, from: &Path) -> u8 {
    let (name, bytes) = if from == Path::new("-") {
        let mut buf = Vec::new();
        if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf) {
            fail(format!("reading standard input: {e}"));
            return exit::FAILURE;
        }
        ("stdin".to_string(), buf)
    } else {
        match std::fs::read(from) {
            Ok(b) => (from.display().to_string(), b),
            Err(e) => {
                fail(format!("{}: {e}", from.display()));
                return exit::FAILURE;
            }
        }
    };
    let keys = match parse_enrolments(&bytes) {
        Ok(k) => k,
        Err((line, reason)) => {
            fail(format!("{name}:{line}: {reason}"));
            return exit::USAGE;
        }
    };
    let (_, store, rt) = match cli_setup(flag, false) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match rt.block_on(store.enroll_many(&keys)) {
        Ok(n) => {
            println!(
                "enrolled {} keys for {} hosts ({} already enrolled)",
                n.keys, n.hosts, n.already
            );
            exit::OK
        }
        Err(e) => {
            fail(&e);
            store_exit(&e)
        }
    }
}

/// The `HOST_ID PUBKEY_B64` lines of an enrolment file; blank lines and `#` comments are
/// skipped. The first bad line is `Err((line number, reason))`.
pub fn parse_enrolments(bytes: &[u8]) -> Result<Vec<(String, PublicKey)>, (usize, String)> {
    let mut keys = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let n = i + 1;
        let line = std::str::from_utf8(raw)
            .map_err(|_| (n, "not UTF-8 text".to_string()))?
            .trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(host), Some(key), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err((n, "expected two fields, HOST_ID PUBKEY_B64".into()));
        };
        body::valid_host_id(host).map_err(|e| (n, format!("host id {host:?}: {e}")))?;
        let key = PublicKey::from_b64(key).map_err(|e| (n, format!("public key: {e}")))?;
        keys.push((host.to_string(), key));
    }
    Ok(keys)
}

/// `vigil control revoke --host ID [--key-id KID]`.
pub fn revoke(flag: Option<&Path>, host: &str, key_id: Option<&str>) -> u8 {
    let (_, store, rt) = match cli_setup(flag, false) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match rt.block_on(store.revoke(host, key_id)) {
        Ok(0) => {
            match key_id {
                Some(k) => fail(format!("host {host:?} has no enrolled key {k:?}")),
                None => fail(format!("host {host:?} is not enrolled")),
            }
            exit::FAILURE
        }
        Ok(n) => {
            println!(
                "revoked {n} key{} of host {host}",
                if n == 1 { "" } else { "s" }
            );
            exit::OK
        }
        Err(e) => {
            fail(&e);
            store_exit(&e)
        }
    }
}

/// `vigil control hosts [--json]`: read from the store itself, so it works whether or not
/// a receiver runs.
pub fn hosts(flag: Option<&Path>, json: bool) -> u8 {
    let (cfg, store, rt) = match cli_setup(flag, true) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let overdue = cfg.control.overdue_after.get();
    let now_ms = epoch_ms(SystemTime::now());
    let filter = HostFilter {
        now_ms,
        overdue_after: overdue,
        ..HostFilter::default()
    };
    let page = Page {
        limit: usize::MAX,
        after: None,
    };
    let list = match rt.block_on(store.hosts(&filter, &page)) {
        Ok(l) => l,
        Err(e) => {
            fail(&e);
            return store_exit(&e);
        }
    };
    if json {
        print!(
            "{}",
            String::from_utf8_lossy(&routes::hosts_body(&list, now_ms, overdue))
        );
        return exit::OK;
    }
    let mut rows = vec![vec![
        "HOST".to_string(),
        "STATE".into(),
        "REPORTED".into(),
        "LAST SEEN".into(),
        "SEQ".into(),
        "KEYS".into(),
    ]];
    for h in &list {
        let last = h.last.as_ref();
        rows.push(vec![
            h.host_id.clone(),
            h.derived_state(now_ms, overdue).as_str().into(),
            last.map_or("-".into(), |l| l.summary.state.as_str().to_string()),
            last.map_or("never".into(), |l| {
                crate::lifecycle::rfc3339(
                    SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(l.received_at_ms),
                )
            }),
            last.map_or("-".into(), |l| l.seq.to_string()),
            h.keys.len().to_string(),
        ]);
    }
    print!("{}", crate::cli::table(&rows));
    exit::OK
}

/// `vigil control`: runs the receiver until SIGTERM or SIGINT; exit 0 once requests in
/// flight have finished.
pub fn serve(flag: Option<&Path>) -> u8 {
    let cfg = match load(flag) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let _telemetry = match telemetry::init(&cfg.log) {
        Ok(t) => t,
        Err(e) => {
            fail(format!("logging: {e}"));
            return exit::CONFIG;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            fail(format!("starting the runtime: {e}"));
            return exit::SOFTWARE;
        }
    };
    let code = rt.block_on(run(cfg));
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}

async fn run(cfg: ControlFile) -> u8 {
    let c = &cfg.control;
    let tls = match server::tls_acceptor(c) {
        Ok(t) => t,
        Err(e) => {
            fail(&e);
            return exit::CONFIG;
        }
    };
    let store = match &c.store {
        StoreSetting::File => {
            let dir = c.state_dir.clone();
            match tokio::task::spawn_blocking(move || FileStore::open(&dir, Options::default()))
                .await
            {
                Ok(Ok(s)) => AnyStore::File(s),
                Ok(Err(e)) => {
                    fail(&e);
                    return store_exit(&e);
                }
                Err(e) => {
                    fail(format!("opening the store: {e}"));
                    return exit::SOFTWARE;
                }
            }
        }
        StoreSetting::Postgres(url) => match PgStore::open(url).await {
            Ok(s) => AnyStore::Postgres(s),
            Err(e) => {
                fail(&e);
                return store_exit(&e);
            }
        },
    };
    // A deep accept backlog: a burst of connections (a fleet reconnecting at once, a
    // flood of idle clients) waits there while the server evicts idle ones.
    let listener = match crate::http::slots::listen_tcp(c.listen) {
        Ok(l) => l,
        Err(e) => {
            fail(format!("listening on {}: {e}", c.listen));
            return exit::UNAVAILABLE;
        }
    };
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            fail(format!("installing signal handlers: {e}"));
            return exit::SOFTWARE;
        }
    };
    let app = match server::app(store, c, tls.is_some()) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            fail(e.to_string());
            return exit::SOFTWARE;
        }
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
        }
        systemd::stopping();
        stop.cancel();
    });
    let addr = listener.local_addr().map_or(c.listen, |a| a);
    let store_kind = match c.store {
        StoreSetting::File => "file",
        StoreSetting::Postgres(_) => "postgresql",
    };
    info!(listen = %addr, tls = tls.is_some(), store = store_kind, state_dir = %c.state_dir.display(), "vigil control started");
    systemd::ready(&format!("receiving heartbeats on {addr}"));
    server::run(listener, tls, app, c, shutdown).await;
    info!("vigil control stopped");
    exit::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrolment_lines_are_checked_and_the_first_bad_one_is_named() {
        let k = crate::heartbeat::keys::HeartbeatKey::from_signing_key(
            ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
        );
        let b64 = &k.info().public_key_b64;
        let good = format!("# fleet\n\ndb-1 {b64}\n  db-2\t{b64}  \r\n");
        let keys = parse_enrolments(good.as_bytes()).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!((keys[0].0.as_str(), keys[1].0.as_str()), ("db-1", "db-2"));
        let bad = |text: String| parse_enrolments(text.as_bytes()).unwrap_err();
        assert_eq!(bad(format!("db-1 {b64}\ndb-2\n")).0, 2);
        assert_eq!(bad(format!("db-1 {b64} extra\n")).0, 1);
        let (line, why) = bad(format!("# x\ndb/1 {b64}\n"));
        assert_eq!(line, 2);
        assert!(why.starts_with("host id \"db/1\""), "{why}");
        let (line, why) = bad("db-1 nope\n".into());
        assert_eq!(line, 1);
        assert!(why.starts_with("public key: "), "{why}");
        assert_eq!(parse_enrolments(b"db-1 \xff\n").unwrap_err().0, 1);
    }
}
