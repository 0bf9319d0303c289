//! The receiver: hyper 1.x HTTP/1.1 over rustls (or plain HTTP on loopback), plus the
//! background tasks that keep derived state and history in shape.
//!
//! - Connections are capped (`max_connections`) by the agent's machinery
//!   ([`crate::http::slots`]): at the cap, a new connection closes the held ones that have
//!   gone longest without a request in progress, so idle clients (a flood of TCP
//!   connections that never send a byte or never start TLS, a slowloris, keep-alive
//!   connections gone quiet) cannot keep a real heartbeat waiting in the kernel's backlog.
//!   The slot is taken at `accept`, before the TLS handshake, and covers it: a connection
//!   stuck in its handshake is idle, and evictable, like one stuck in its headers.
//! - A TLS handshake must finish within [`HANDSHAKE_TIMEOUT`], request headers within
//!   [`HEADER_READ_TIMEOUT`], a body within [`super::routes::BODY_TIMEOUT`]: a slow or
//!   silent client holds one slot for a bounded time, never the receiver. (A client that
//!   sends its body slowly is mid-request, so never evicted: at most `max_connections` of
//!   them are held, each for at most `BODY_TIMEOUT`, with at most [`super::routes::MAX_BODY`]
//!   buffered.)
//! - With `client_ca`, rustls requires a client certificate signed by it before any
//!   HTTP is spoken (the signature still decides which host a heartbeat is from).
//! - Shutdown ([`run`]'s token, cancelled on SIGTERM by `main`): the listener closes,
//!   in-flight requests finish (hyper-util's graceful shutdown, capped at
//!   [`SHUTDOWN_GRACE`]), then the store is dropped, which lets its writer thread answer
//!   what it holds and end.
//! - The state tracker ([`track_states`]) recomputes every host's derived state each
//!   [`TRACK_EVERY`] for `vigil_control_hosts{state}` and hands each change to the
//!   webhook (when configured); the pruner calls [`Store::prune`] each [`PRUNE_EVERY`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::Request;
use hyper::body::Incoming as Body;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::ControlConfig;
use super::metrics::{ALL_STATES, Metrics};
use super::routes::{self, App};
use super::store::{Store, epoch_ms};
use super::verifier::Verifier;
use super::webhook::{self, Change};
use crate::http::accept_error;
use crate::http::slots::{Slot, SlotIo, Slots, spawn_conn};
use crate::lifecycle::HostState;

/// How long a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often derived states are recomputed (bounds how late `uncertain` is noticed).
pub const TRACK_EVERY: Duration = Duration::from_secs(1);
/// How often the store is pruned and snapshotted.
pub const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// Why the receiver could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A TLS file is missing, unreadable or unusable.
    #[error("control.{key}: {}: {reason}", path.display())]
    TlsFile {
        /// The config key.
        key: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS: {0}")]
    Tls(String),
}

fn read_certs(
    key: &'static str,
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, StartError> {
    let err = |reason: String| StartError::TlsFile {
        key,
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// Builds the TLS acceptor of the config, or `None` for plain HTTP.
///
/// # Errors
/// [`StartError`] naming the key and file that is wrong.
pub fn tls_acceptor(c: &ControlConfig) -> Result<Option<TlsAcceptor>, StartError> {
    let (Some(cert), Some(key)) = (&c.tls_cert, &c.tls_key) else {
        return Ok(None);
    };
    let chain = read_certs("tls_cert", cert)?;
    let pem = std::fs::read(key).map_err(|e| StartError::TlsFile {
        key: "tls_key",
        path: key.clone(),
        reason: e.to_string(),
    })?;
    let private = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| StartError::TlsFile {
        key: "tls_key",
        path: key.clone(),
        reason: format!("no usable PEM private key: {e}"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?;
    let builder = match &c.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs("client_ca", ca)? {
                roots.add(cert).map_err(|e| StartError::TlsFile {
                    key: "client_ca",
                    path: ca.clone(),
                    reason: format!("unusable certificate: {e}"),
                })?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| StartError::Tls(format!("client_ca: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, private)
        .map_err(|e| StartError::Tls(format!("tls_cert/tls_key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// Why the handler state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The metrics could not be registered (a programming error).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The OS refused a verify thread.
    #[error("starting the verify threads: {0}")]
    Threads(#[from] std::io::Error),
}

/// Builds the shared handler state, with one verify thread per CPU.
///
/// # Errors
/// [`AppError`].
pub fn app<S: Store>(store: S, c: &ControlConfig, tls: bool) -> Result<App<S>, AppError> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    Ok(App {
        verifier: Verifier::start(cpus)?,
        store,
        public_url: c.public_url.as_ref().map(|u| u.as_str().to_string()),
        scheme: if tls { "https" } else { "http" },
        max_skew: c.max_clock_skew.get(),
        overdue_after: c.overdue_after.get(),
        metrics: Metrics::new()?,
    })
}

/// Serves until `shutdown`, then waits (at most [`SHUTDOWN_GRACE`]) for requests in
/// flight. Runs the state tracker, the webhook sender and the pruner alongside.
pub async fn run<S: Store>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Arc<App<S>>,
    c: &ControlConfig,
    shutdown: CancellationToken,
) {
    let tasks = tokio_util::task::TaskTracker::new();
    let hooks = c.webhook.as_ref().map(|w| {
        let (tx, rx) = mpsc::channel(webhook::QUEUE);
        tasks.spawn(webhook::send_loop(
            w.0.clone(),
            rx,
            app.clone(),
            shutdown.clone(),
        ));
        tx
    });
    tasks.spawn(track_states(app.clone(), hooks, shutdown.clone()));
    tasks.spawn(prune_loop(app.clone(), c.retention.get(), shutdown.clone()));
    tasks.close();
    serve(listener, tls, app.clone(), c.max_connections, shutdown).await;
    tasks.wait().await;
    // The sender may have given back a claim after the tracker's last flush.
    if c.webhook.is_some() {
        if let Err(e) = app.store.flush_notified().await {
            warn!(error = %e, "cannot record the webhook's notified states");
        }
    }
}

/// The accept loop alone (tests drive it directly).
pub async fn serve<S: Store>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Arc<App<S>>,
    max_conns: usize,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let slots = Slots::new(max_conns);
    loop {
        // Accept first, then make room: a connection left in the kernel's queue could not
        // evict anyone (see `crate::http::slots`).
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { accept_error(e).await; continue; }
            },
        };
        let Some(held) = slots.admit(&shutdown).await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        // Under TLS too: the handshake reads through it, so a connection that never
        // finishes (or never starts) one is idle and evictable.
        let io = SlotIo::new(stream, held);
        let slot = io.slot();
        let (app, tls, slots) = (app.clone(), tls.clone(), slots.clone());
        let watcher = graceful.watcher();
        spawn_conn(
            async move {
                let slot = io.slot();
                match tls {
                    None => serve_conn(app, io, watcher, slots, slot).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                            Ok(Ok(s)) => serve_conn(app, s, watcher, slots, slot).await,
                            Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => debug!(%peer, "TLS handshake timed out"),
                        }
                    }
                }
            },
            slot,
        );
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("requests still open after the shutdown grace were cut");
    }
}

/// Serves HTTP/1.1 on one connection; each request marks `slot` busy while it runs, so
/// a heartbeat being verified and stored is never evicted.
async fn serve_conn<S, IO>(
    app: Arc<App<S>>,
    io: IO,
    watcher: hyper_util::server::graceful::Watcher,
    slots: Arc<Slots>,
    slot: Arc<Slot>,
) where
    S: Store,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Body>| {
        let (app, slots, slot) = (app.clone(), slots.clone(), slot.clone());
        async move {
            let _busy = slots.busy(&slot);
            Ok::<_, std::convert::Infallible>(routes::handle(&app, req).await)
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), svc);
    if let Err(e) = watcher.watch(conn).await {
        debug!(error = %e, "connection ended with an error");
    }
}

/// Every [`TRACK_EVERY`]: each enrolled host's derived state, counted into
/// `vigil_control_hosts{state}`; with a webhook, a change from the previous round is sent
/// to it. The first round compares with the states last notified, as the store kept them
/// across the restart ([`Store::notified`]); a host with none is recorded without a call
/// (a restart is not a change of every host). See the webhook's module doc.
///
/// Cost per round at 100,000 hosts: one [`Store::briefs`] (id, seq, time and reported
/// state per host: no body, key or summary copied) and, with a webhook only, one map of
/// id → state, built by moving the ids out of the briefs.
async fn track_states<S: Store>(
    app: Arc<App<S>>,
    hooks: Option<mpsc::Sender<Change>>,
    shutdown: CancellationToken,
) {
    let mut known: Option<HashMap<String, HostState>> = None;
    let mut failing = false;
    let mut tick = tokio::time::interval(TRACK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now_ms = epoch_ms(SystemTime::now());
        let hosts = match app.store.briefs().await {
            Ok(h) => h,
            Err(e) => {
                // Once per outage: the store logs its own loss and recovery.
                if !failing {
                    warn!(error = %e, "state tracker: store not available");
                    failing = true;
                }
                continue;
            }
        };
        failing = false;
        if hooks.is_some() && known.is_none() {
            match app.store.notified().await {
                Ok(n) => known = Some(n),
                Err(e) => {
                    warn!(error = %e, "state tracker: cannot read the notified states; retrying");
                    continue;
                }
            }
        }
        let mut baseline = Vec::new();
        let mut counts: HashMap<HostState, i64> = HashMap::new();
        let mut now_known = HashMap::with_capacity(if hooks.is_some() { hosts.len() } else { 0 });
        for h in hosts {
            let state = h.derived_state(now_ms, app.overdue_after);
            *counts.entry(state).or_default() += 1;
            let Some(tx) = &hooks else { continue };
            match known.as_ref().and_then(|k| k.get(&h.host_id)) {
                None => baseline.push((h.host_id.clone(), state)),
                Some(prev) if *prev != state => {
                    info!(host_id = %h.host_id, from = prev.as_str(), to = state.as_str(), "host state changed");
                    let change = Change::new(&h, *prev, state, now_ms);
                    if tx.try_send(change).is_err() {
                        app.metrics.webhook.with_label_values(&["dropped"]).inc();
                        warn!(host_id = %h.host_id, "webhook queue full; change dropped");
                    }
                }
                Some(_) => {}
            }
            now_known.insert(h.host_id, state);
        }
        if hooks.is_some() {
            if !baseline.is_empty() {
                if let Err(e) = app.store.baseline_notified(baseline, now_ms).await {
                    warn!(error = %e, "state tracker: cannot record the notified states");
                }
            }
            if let Err(e) = app.store.flush_notified().await {
                warn!(error = %e, "state tracker: cannot record the notified states");
            }
        }
        for s in ALL_STATES {
            app.metrics
                .hosts
                .with_label_values(&[s.as_str()])
                .set(counts.get(&s).copied().unwrap_or(0));
        }
        if hooks.is_some() {
            known = Some(now_known);
        }
    }
}

async fn prune_loop<S: Store>(app: Arc<App<S>>, retention: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match app.store.prune(retention, SystemTime::now()).await {
            Ok(s) if s.files_removed > 0 || s.rows_removed > 0 => {
                info!(
                    files = s.files_removed,
                    bytes = s.bytes_removed,
                    rows = s.rows_removed,
                    "pruned heartbeat history"
                )
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "pruning heartbeat history failed"),
        }
    }
}
