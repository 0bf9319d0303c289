//! The local HTTP API on hyper 1.x: a read-only TCP listener and the admin Unix socket.
//!
//! Endpoints (both listeners; answers come from the cached snapshot, never a check run):
//! - `GET /health`: 200 when the reported state is `available`, else 503 (also 503
//!   `starting` before the first round, 503 `stale` when samples are older than three
//!   intervals);
//! - `GET /health/live`, `GET /liveness`: 200 while the scheduler makes progress;
//! - `GET /checks`, `GET /checks/NAME`: check objects;
//! - `GET /metrics`: Prometheus text format 0.0.4;
//! - `GET /primary` (`/`, `/master`, `/read-write`), `/replica[?lag=16MB|10s]`,
//!   `/read-only`: Patroni-style routing answers from the `postgres.replication` check
//!   (see [`routing`]).
//!
//! Admin socket only, from a peer whose uid (SO_PEERCRED) is root or the agent's own:
//! - `POST /lifecycle` `{"state","reason"}`;
//! - `POST /automation/pause` `{"reason","for"?}`, `POST /automation/resume` `{"reason"?}`;
//! - `POST /remediations/NAME/run` `{"reason","dry_run"?}` (and `POST /remediate` with
//!   `"name"` in the body): waits for the run's outcome.
//!
//! `GET /remediations` (both listeners): the audit records, newest first; stdout and
//! stderr only on the admin socket.
//!
//! TCP peers outside `[api].allow` get 403; methods other than GET/HEAD/OPTIONS get 405.
//! Each listener caps concurrent connections (`[api].max_connections`) and bounds how long a
//! client may take to send its headers ([`HEADER_READ_TIMEOUT`]), so a slow or hostile client
//! cannot pin the agent's memory or tasks. When the cap is reached, a new connection evicts
//! the held ones that have gone longest without a request in progress (see [`slots`]): idle
//! or slow clients can never queue a load balancer's health check behind them.

pub mod metrics;
pub mod routes;
pub mod routing;
pub mod slots;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::AllowNet;
pub use routes::{Access, ApiState};
use slots::{SlotIo, Slots, spawn_conn};

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request body read (admin requests are a few hundred bytes).
const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long shutdown waits for open connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the API on a connection registered in `slots` (`io` owns its registration).
fn serve_conn<S>(
    api: Arc<ApiState>,
    access: Access,
    io: SlotIo<S>,
    graceful: &GracefulShutdown,
    slots: &Arc<Slots>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let slot = io.slot();
    let svc = service_fn({
        let (slots, slot) = (slots.clone(), slot.clone());
        move |req: Request<Incoming>| {
            let (api, slots, slot) = (api.clone(), slots.clone(), slot.clone());
            async move {
                let _busy = slots.busy(&slot);
                Ok::<_, Infallible>(dispatch(&api, access, req).await)
            }
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), svc);
    spawn_conn(logged(graceful.watch(conn)), slot);
}

/// A connection's future with its error logged (a peer that went away, a timeout).
async fn logged<E: std::fmt::Display>(conn: impl Future<Output = Result<(), E>>) {
    if let Err(e) = conn.await {
        debug!(error = %e, "connection ended with an error");
    }
}

async fn dispatch(api: &ApiState, access: Access, req: Request<Incoming>) -> routes::Resp {
    let (parts, body) = req.into_parts();
    let body = if access == Access::Admin && parts.method == hyper::Method::POST {
        match Limited::new(body, MAX_BODY_BYTES).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return routes::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large or unreadable",
                    "bad_request",
                    json!({}),
                );
            }
        }
    } else {
        Bytes::new()
    };
    if access == Access::Admin
        && parts.method == hyper::Method::POST
        && routes::is_run_path(parts.uri.path())
    {
        return routes::run(api, parts.uri.path(), &body).await;
    }
    routes::handle(
        api,
        access,
        &parts.method,
        parts.uri.path(),
        parts.uri.query(),
        &body,
    )
}

fn forbidden(reason: &str) -> routes::Resp {
    routes::error(StatusCode::FORBIDDEN, "forbidden", reason, json!({}))
}

/// Serves the read-only API on `listener` until `cancel`, then drains connections.
pub async fn serve_tcp(
    listener: TcpListener,
    api: Arc<ApiState>,
    allow: Vec<AllowNet>,
    max_conns: usize,
    cancel: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let slots = Slots::new(max_conns);
    loop {
        // Accept first, then make room: a connection left in the kernel's queue could not
        // evict anyone (see `Slots`).
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { accept_error(e).await; continue; }
            },
        };
        let Some(held) = slots.admit(&cancel).await else {
            break;
        };
        let io = SlotIo::new(stream, held);
        let access = if allow.iter().any(|n| n.contains(peer.ip())) {
            Some(Access::ReadOnly)
        } else {
            None
        };
        let api = api.clone();
        match access {
            Some(a) => serve_conn(api, a, io, &graceful, &slots),
            None => {
                debug!(%peer, "refusing a source outside [api].allow");
                serve_forbidden(io, "source address not in [api].allow", &graceful);
            }
        }
    }
    drain(graceful).await;
}

/// Serves the admin API on `listener` until `cancel`. Peers whose uid is neither root nor
/// the agent's own get 403 on every request.
pub async fn serve_unix(
    listener: UnixListener,
    api: Arc<ApiState>,
    max_conns: usize,
    cancel: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let slots = Slots::new(max_conns);
    let own_uid = nix::unistd::geteuid().as_raw();
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { accept_error(e).await; continue; }
            },
        };
        let Some(held) = slots.admit(&cancel).await else {
            break;
        };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        let io = SlotIo::new(stream, held);
        let trusted = matches!(uid, Some(u) if u == 0 || u == own_uid);
        if trusted {
            serve_conn(api.clone(), Access::Admin, io, &graceful, &slots);
        } else {
            warn!(peer_uid = ?uid, "admin socket: refusing a peer that is neither root nor the agent's user");
            serve_forbidden(io, "peer uid not allowed on the admin socket", &graceful);
        }
    }
    drain(graceful).await;
}

/// Answers every request on the connection with 403 and `reason`.
fn serve_forbidden<S>(io: SlotIo<S>, reason: &'static str, graceful: &GracefulShutdown)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Never marked busy: a refused peer is the first to make room for others.
    let slot = io.slot();
    let svc =
        service_fn(
            move |_req: Request<Incoming>| async move { Ok::<_, Infallible>(forbidden(reason)) },
        );
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), svc);
    spawn_conn(logged(graceful.watch(conn)), slot);
}

async fn drain(graceful: GracefulShutdown) {
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        debug!("closing connections still open after the shutdown grace");
    }
}

/// Accept errors: a peer that went away is routine; running out of descriptors or memory
/// is logged and retried after a pause instead of spinning.
pub(crate) async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock => {}
        _ => {
            warn!(error = %e, "accept failed; pausing");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
