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
//! the held ones that have gone longest without a request in progress (see [`Slots`]): idle
//! or slow clients can never queue a load balancer's health check behind them.

pub mod metrics;
pub mod routes;
pub mod routing;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::AllowNet;
pub use routes::{Access, ApiState};

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request body read (admin requests are a few hundred bytes).
const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long shutdown waits for open connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often a connection waiting at the cap looks again for one to evict, when none
/// could be (every held one busy or not yet read from).
const EVICT_RETRY: Duration = Duration::from_millis(10);

/// The connections one listener holds: at most `max` (a semaphore permit each), and for
/// each one whether a request is in progress and when it last had one.
///
/// Why eviction rather than a plain queue: with the semaphore alone, a full set of idle
/// connections (a flood, a slowloris per slot, a pool of keep-alive clients that went quiet)
/// leaves every new connection in the kernel's accept queue until header-read timeouts free
/// slots, so a health check waits seconds to minutes behind them. Instead, a connection that
/// arrives at the cap closes the held connection that has gone longest without a request in
/// progress (nginx reuses idle keep-alive connections the same way), and only waits when
/// every held connection is in the middle of a request, which cached answers finish in
/// milliseconds. The cost falls on the oldest idle client, which can reconnect.
struct Slots {
    /// One permit per held connection; a permit lives in the connection's [`PermitIo`].
    limit: Arc<Semaphore>,
    /// The cap (`limit`'s size).
    limit_max: usize,
    /// Held connections by id; each connection task removes its own entry when it ends.
    held: Mutex<HashMap<u64, Arc<Slot>>>,
    next_id: AtomicU64,
    /// Reference point for [`Slot::last_active_ms`].
    epoch: Instant,
}

/// One held connection.
struct Slot {
    /// A request is being answered: never evicted meanwhile. (hyper writes the response
    /// after the service returns; by then `last_active_ms` is fresh, so such a connection
    /// is the last candidate for eviction, not the first.)
    busy: AtomicBool,
    /// The connection's task has tried to read from it at least once. Until then it is
    /// never evicted: its request may be sitting unread in the socket while the accept loop
    /// takes a burst of others, and evicting it would reset a client that did nothing
    /// wrong, a health check included. Once read from, a connection with no request in
    /// progress is idle for real (nothing came, or only part of a head).
    read: AtomicBool,
    /// When a request last started or ended (or the connection was accepted), in ms since
    /// [`Slots::epoch`].
    last_active_ms: AtomicU64,
    /// Cancelled to evict; the connection task watches it and drops the connection.
    evict: CancellationToken,
}

impl Slots {
    fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            limit: Arc::new(Semaphore::new(max.max(1))),
            limit_max: max.max(1),
            held: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A permit for a connection just accepted: at once when below the cap, else once the
    /// longest-idle held connections evicted by [`Slots::evict_some`] have closed (or, when
    /// every one is busy, once one ends). `None` when `cancel` fires first.
    async fn admit(&self, cancel: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.limit.clone().try_acquire_owned() {
            return Some(p);
        }
        loop {
            self.evict_some();
            // Held connections not yet read from become candidates once their task has
            // run: look again shortly unless a permit comes first.
            tokio::select! {
                _ = cancel.cancelled() => return None,
                p = self.limit.clone().acquire_owned() => return p.ok(),
                _ = tokio::time::sleep(EVICT_RETRY) => {}
            }
        }
    }

    /// Evicts a batch (1/16 of the cap, at least one) of the held connections that have
    /// gone longest without a request in progress.
    ///
    /// A batch rather than one: each eviction makes the accept loop wait for the victim's
    /// task to close it, and one wait per accepted connection made a burst of connections
    /// outrun the loop, overflow the kernel's accept queue and have SYNs dropped (a 1 s
    /// retransmit for whoever came next, a health check included).
    fn evict_some(&self) {
        let held = match self.held.lock() {
            Ok(h) => h,
            // A panic while holding this lock left only a map of tokens behind; still usable.
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut idle: Vec<&Arc<Slot>> = held
            .values()
            .filter(|s| {
                s.read.load(Ordering::Acquire)
                    && !s.busy.load(Ordering::Acquire)
                    && !s.evict.is_cancelled()
            })
            .collect();
        idle.sort_by_key(|s| s.last_active_ms.load(Ordering::Acquire));
        let batch = (self.limit_max / 16).max(1);
        if !idle.is_empty() {
            debug!(
                closing = idle.len().min(batch),
                "connection cap reached: closing the longest-idle connections"
            );
        }
        for s in idle.into_iter().take(batch) {
            s.evict.cancel();
        }
    }

    /// Registers a new connection; returns its id and slot.
    fn register(&self) -> (u64, Arc<Slot>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            read: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            last_active_ms: AtomicU64::new(self.now_ms()),
            evict: CancellationToken::new(),
        });
        let mut held = match self.held.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        held.insert(id, slot.clone());
        (id, slot)
    }

    fn remove(&self, id: u64) {
        let mut held = match self.held.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        held.remove(&id);
    }

    /// Marks a request on `slot` as started; the guard marks it ended when dropped.
    fn busy<'a>(&'a self, slot: &'a Slot) -> BusyGuard<'a> {
        slot.busy.store(true, Ordering::Release);
        slot.last_active_ms.store(self.now_ms(), Ordering::Release);
        BusyGuard { slots: self, slot }
    }
}

/// See [`Slots::busy`].
struct BusyGuard<'a> {
    slots: &'a Slots,
    slot: &'a Slot,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.slot
            .last_active_ms
            .store(self.slots.now_ms(), Ordering::Release);
        self.slot.busy.store(false, Ordering::Release);
    }
}

/// Runs `conn` (a hyper connection already watched by the graceful shutdown) on its own
/// task until it ends or `slot` is evicted; then forgets the slot.
fn spawn_conn<F, E>(conn: F, slots: Arc<Slots>, id: u64, slot: Arc<Slot>)
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        tokio::select! {
            r = conn => {
                if let Err(e) = r {
                    debug!(error = %e, "connection ended with an error");
                }
            }
            // Dropping the connection closes the socket and releases its permit.
            _ = slot.evict.cancelled() => {}
        }
        slots.remove(id);
    });
}

async fn serve_conn<S>(
    api: Arc<ApiState>,
    access: Access,
    io: S,
    graceful: &GracefulShutdown,
    slots: &Arc<Slots>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (id, slot) = slots.register();
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
        .serve_connection(TokioIo::new(SlotIo::new(io, slot.clone())), svc);
    spawn_conn(graceful.watch(conn), slots.clone(), id, slot);
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
        let Some(permit) = slots.admit(&cancel).await else {
            break;
        };
        let access = if allow.iter().any(|n| n.contains(peer.ip())) {
            Some(Access::ReadOnly)
        } else {
            None
        };
        let api = api.clone();
        match access {
            Some(a) => serve_conn(api, a, PermitIo::new(stream, permit), &graceful, &slots).await,
            None => {
                debug!(%peer, "refusing a source outside [api].allow");
                serve_forbidden(
                    PermitIo::new(stream, permit),
                    "source address not in [api].allow",
                    &graceful,
                    &slots,
                )
                .await;
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
        let Some(permit) = slots.admit(&cancel).await else {
            break;
        };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        let trusted = matches!(uid, Some(u) if u == 0 || u == own_uid);
        if trusted {
            serve_conn(
                api.clone(),
                Access::Admin,
                PermitIo::new(stream, permit),
                &graceful,
                &slots,
            )
            .await;
        } else {
            warn!(peer_uid = ?uid, "admin socket: refusing a peer that is neither root nor the agent's user");
            serve_forbidden(
                PermitIo::new(stream, permit),
                "peer uid not allowed on the admin socket",
                &graceful,
                &slots,
            )
            .await;
        }
    }
    drain(graceful).await;
}

/// Answers every request on the connection with 403 and `reason`.
async fn serve_forbidden<S>(
    io: S,
    reason: &'static str,
    graceful: &GracefulShutdown,
    slots: &Arc<Slots>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Never marked busy: a refused peer is the first to make room for others.
    let (id, slot) = slots.register();
    let svc =
        service_fn(
            move |_req: Request<Incoming>| async move { Ok::<_, Infallible>(forbidden(reason)) },
        );
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(SlotIo::new(io, slot.clone())), svc);
    spawn_conn(graceful.watch(conn), slots.clone(), id, slot);
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

pin_project_lite::pin_project! {
    /// A stream that marks its [`Slot`] as read from at the first read attempt.
    struct SlotIo<S> {
        #[pin]
        inner: S,
        slot: Arc<Slot>,
    }
}

impl<S> SlotIo<S> {
    fn new(inner: S, slot: Arc<Slot>) -> Self {
        SlotIo { inner, slot }
    }
}

impl<S: AsyncRead> AsyncRead for SlotIo<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        let poll = this.inner.poll_read(cx, buf);
        // After the read: a request already in the socket is taken (and the service marks
        // the slot busy) before the slot becomes evictable.
        this.slot.read.store(true, Ordering::Release);
        poll
    }
}

impl<S: AsyncWrite> AsyncWrite for SlotIo<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// A stream that holds a connection-limit permit for as long as it lives.
    struct PermitIo<S> {
        #[pin]
        inner: S,
        _permit: OwnedSemaphorePermit,
    }
}

impl<S> PermitIo<S> {
    fn new(inner: S, permit: OwnedSemaphorePermit) -> Self {
        PermitIo {
            inner,
            _permit: permit,
        }
    }
}

impl<S: AsyncRead> AsyncRead for PermitIo<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for PermitIo<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_longest_idle_connections_are_evicted_never_a_busy_one() {
        // A cap of 32: batches of 2.
        let slots = Slots::new(32);
        let cancel = CancellationToken::new();
        let mut permits = Vec::new();
        let mut held = Vec::new();
        for _ in 0..32 {
            permits.push(slots.admit(&cancel).await.unwrap());
            held.push(slots.register());
            // Distinct `last_active_ms` for a deterministic order.
            tokio::time::advance(Duration::from_millis(2)).await;
        }
        // Nobody has been read from yet: their requests may be waiting in the socket.
        slots.evict_some();
        assert!(held.iter().all(|(_, s)| !s.evict.is_cancelled()));
        for (_, s) in &held {
            s.read.store(true, Ordering::Release);
        }
        // The oldest is mid-request: the next two oldest go.
        let busy = slots.busy(&held[0].1);
        slots.evict_some();
        let evicted = |held: &[(u64, Arc<Slot>)]| -> Vec<usize> {
            (0..held.len())
                .filter(|&i| held[i].1.evict.is_cancelled())
                .collect()
        };
        assert_eq!(evicted(&held), [1, 2]);
        // Evicted ones are not picked twice.
        slots.evict_some();
        assert_eq!(evicted(&held), [1, 2, 3, 4]);
        // A request that ends makes its connection the most recently active.
        drop(busy);
        slots.evict_some();
        assert_eq!(evicted(&held), [1, 2, 3, 4, 5, 6]);
        // 0 ended a request last: it goes only with the last of the 25 older ones (batches
        // of 2: twelve batches take 24 of them).
        for _ in 0..12 {
            slots.evict_some();
        }
        assert!(!held[0].1.evict.is_cancelled());
        slots.evict_some();
        assert!(held[0].1.evict.is_cancelled());
        // At the cap a new connection waits for a permit until an evicted one's task ends.
        assert_eq!(slots.limit.available_permits(), 0);
        let waiting = slots.admit(&cancel);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), &mut waiting)
                .await
                .is_err()
        );
        slots.remove(held[1].0);
        drop(permits.remove(1));
        assert!(waiting.await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn busy_connections_are_never_evicted() {
        let slots = Slots::new(2);
        let a = slots.register();
        let b = slots.register();
        a.1.read.store(true, Ordering::Release);
        b.1.read.store(true, Ordering::Release);
        let _x = slots.busy(&a.1);
        let _y = slots.busy(&b.1);
        tokio::time::advance(Duration::from_secs(60)).await;
        slots.evict_some();
        assert!(!a.1.evict.is_cancelled() && !b.1.evict.is_cancelled());
    }
}
