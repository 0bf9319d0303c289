//! Connection slots: the per-listener cap on held connections, with eviction of the
//! longest-idle ones at the cap. Shared by the agent's API ([`super::serve_tcp`],
//! [`super::serve_unix`]) and the control plane's receiver
//! ([`crate::control::server::serve`]).
//!
//! # Why eviction rather than a plain queue
//! With a semaphore alone, a full set of idle connections (a flood, a slowloris per slot,
//! a pool of keep-alive clients that went quiet, TCP connections that never start TLS)
//! leaves every new connection in the kernel's accept queue until header-read or
//! handshake timeouts free slots, so a health check or a heartbeat waits seconds to minutes
//! behind them. Instead, a connection that arrives at the cap closes the held connection
//! that has gone longest without a request in progress (nginx reuses idle keep-alive
//! connections the same way), and only waits when every held connection is in the middle
//! of a request. The cost falls on the oldest idle client, which can reconnect.
//!
//! # How a server uses it
//! Accept first, then [`Slots::admit`] (a connection left in the kernel's queue could not
//! evict anyone); wrap the stream in [`SlotIo`] (it owns the [`Held`] registration: the
//! permit and the entry in the held map go when the stream is dropped, however the
//! connection ends); mark each request with [`Slots::busy`] in the service; run the
//! connection with [`spawn_conn`], which drops it when the slot is evicted.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How often a connection waiting at the cap looks again for one to evict, when none
/// could be (every held one busy or not yet read from).
const EVICT_RETRY: Duration = Duration::from_millis(10);

/// The connections one listener holds: at most `max` (a semaphore permit each, kept in
/// the connection's [`Held`]), and for each one whether a request is in progress and
/// when it last had one. See the module doc for why.
pub(crate) struct Slots {
    /// One permit per held connection.
    limit: Arc<Semaphore>,
    /// The cap (`limit`'s size).
    limit_max: usize,
    /// Held connections by id; a connection's [`Held`] removes its entry when dropped.
    held: Mutex<HashMap<u64, Arc<Slot>>>,
    next_id: AtomicU64,
    /// Reference point for [`Slot::last_active_ms`].
    epoch: Instant,
}

/// One held connection's state, shared by its stream, its service and the map.
pub(crate) struct Slot {
    /// A request is being answered: never evicted meanwhile. (hyper writes the response
    /// after the service returns; by then `last_active_ms` is fresh, so such a connection
    /// is the last candidate for eviction, not the first.)
    busy: AtomicBool,
    /// The connection's task has tried to read from it at least once. Until then it is
    /// never evicted: its request may be sitting unread in the socket while the accept loop
    /// takes a burst of others, and evicting it would reset a client that did nothing
    /// wrong, a health check included. Once read from, a connection with no request in
    /// progress is idle for real (nothing came, only part of a head, or a TLS handshake
    /// that has not finished).
    read: AtomicBool,
    /// When a request last started or ended (or the connection was accepted), in ms since
    /// [`Slots::epoch`].
    last_active_ms: AtomicU64,
    /// Cancelled to evict; the connection task watches it and drops the connection.
    evict: CancellationToken,
}

/// A connection's registration: its permit and its entry in the held map, both given
/// back when this is dropped (with the stream that owns it, see [`SlotIo`]).
pub(crate) struct Held {
    slots: Arc<Slots>,
    id: u64,
    slot: Arc<Slot>,
    _permit: OwnedSemaphorePermit,
}

impl Held {
    /// The slot, for [`Slots::busy`] and [`spawn_conn`].
    pub(crate) fn slot(&self) -> Arc<Slot> {
        self.slot.clone()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.slots.map().remove(&self.id);
    }
}

impl Slots {
    /// Slots for at most `max` connections (at least one).
    pub(crate) fn new(max: usize) -> Arc<Slots> {
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

    fn map(&self) -> MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        match self.held.lock() {
            Ok(h) => h,
            // A panic while holding this lock left only a map of tokens behind; still usable.
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Registers a connection just accepted: at once when below the cap, else once the
    /// longest-idle held connections evicted by [`Slots::evict_some`] have closed (or, when
    /// every one is busy, once one ends). `None` when `cancel` fires first.
    pub(crate) async fn admit(self: &Arc<Self>, cancel: &CancellationToken) -> Option<Held> {
        let permit = match self.limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => loop {
                self.evict_some();
                // Held connections not yet read from become candidates once their task has
                // run: look again shortly unless a permit comes first.
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    p = self.limit.clone().acquire_owned() => break p.ok()?,
                    _ = tokio::time::sleep(EVICT_RETRY) => {}
                }
            },
        };
        Some(self.register(permit))
    }

    fn register(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Held {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            read: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            last_active_ms: AtomicU64::new(self.now_ms()),
            evict: CancellationToken::new(),
        });
        self.map().insert(id, slot.clone());
        Held {
            slots: self.clone(),
            id,
            slot,
            _permit: permit,
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
        let held = self.map();
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

    /// Marks a request on `slot` as started; the guard marks it ended when dropped.
    pub(crate) fn busy<'a>(&'a self, slot: &'a Slot) -> BusyGuard<'a> {
        slot.busy.store(true, Ordering::Release);
        slot.last_active_ms.store(self.now_ms(), Ordering::Release);
        BusyGuard { slots: self, slot }
    }
}

/// See [`Slots::busy`].
pub(crate) struct BusyGuard<'a> {
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

/// Runs `conn` (the whole life of one connection, owning its [`SlotIo`]) on its own task
/// until it ends or `slot` is evicted. Either way `conn` is dropped, which closes the
/// socket and gives the slot back.
pub(crate) fn spawn_conn<F>(conn: F, slot: Arc<Slot>)
where
    F: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        tokio::select! {
            () = conn => {}
            () = slot.evict.cancelled() => {}
        }
    });
}

pin_project_lite::pin_project! {
    /// A held connection's stream: owns its [`Held`] registration (so the permit lives
    /// exactly as long as the socket) and marks the slot as read from at the first read
    /// attempt.
    pub(crate) struct SlotIo<S> {
        #[pin]
        inner: S,
        held: Held,
    }
}

impl<S> SlotIo<S> {
    /// Wraps `inner`, registered as `held`.
    pub(crate) fn new(inner: S, held: Held) -> Self {
        SlotIo { inner, held }
    }

    /// The connection's slot, for [`Slots::busy`] and [`spawn_conn`].
    pub(crate) fn slot(&self) -> Arc<Slot> {
        self.held.slot()
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
        this.held.slot.read.store(true, Ordering::Release);
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

/// Backlog for TCP listeners served through [`Slots`] (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default since Linux 5.4). tokio's `bind` asks for 1024;
/// a burst of new connections larger than the backlog (a flood of idle clients, a fleet
/// reconnecting at once) overflows it and the kernel drops SYNs, so whoever arrives then
/// waits a 1 s retransmit. The server evicts idle connections quickly; a deeper queue
/// lets it.
pub const TCP_BACKLOG: u32 = 4096;

/// Binds a TCP listener with [`TCP_BACKLOG`] (`SO_REUSEADDR` as tokio's `bind` sets it,
/// so a restart does not wait for TIME_WAIT).
///
/// # Errors
/// The socket, bind or listen error.
pub fn listen_tcp(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(TCP_BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_longest_idle_connections_are_evicted_never_a_busy_one() {
        // A cap of 32: batches of 2.
        let slots = Slots::new(32);
        let cancel = CancellationToken::new();
        let mut held = Vec::new();
        for _ in 0..32 {
            held.push(slots.admit(&cancel).await.unwrap());
            // Distinct `last_active_ms` for a deterministic order.
            tokio::time::advance(Duration::from_millis(2)).await;
        }
        // Nobody has been read from yet: their requests may be waiting in the socket.
        slots.evict_some();
        assert!(held.iter().all(|h| !h.slot.evict.is_cancelled()));
        for h in &held {
            h.slot.read.store(true, Ordering::Release);
        }
        // The oldest is mid-request: the next two oldest go.
        let oldest = held[0].slot();
        let busy = slots.busy(&oldest);
        slots.evict_some();
        let evicted = |held: &[Held]| -> Vec<usize> {
            (0..held.len())
                .filter(|&i| held[i].slot.evict.is_cancelled())
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
        assert!(!held[0].slot.evict.is_cancelled());
        slots.evict_some();
        assert!(held[0].slot.evict.is_cancelled());
        // At the cap a new connection waits for a permit until an evicted one's stream (and
        // with it its registration) is dropped.
        assert_eq!(slots.limit.available_permits(), 0);
        let waiting = slots.admit(&cancel);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), &mut waiting)
                .await
                .is_err()
        );
        assert_eq!(slots.map().len(), 32);
        drop(held.remove(1));
        assert_eq!(
            slots.map().len(),
            31,
            "the dropped registration left the map"
        );
        let admitted = waiting.await.unwrap();
        assert_eq!(slots.map().len(), 32);
        assert!(slots.map().contains_key(&admitted.id));
    }

    #[tokio::test(start_paused = true)]
    async fn busy_connections_are_never_evicted() {
        let slots = Slots::new(2);
        let cancel = CancellationToken::new();
        let a = slots.admit(&cancel).await.unwrap();
        let b = slots.admit(&cancel).await.unwrap();
        a.slot.read.store(true, Ordering::Release);
        b.slot.read.store(true, Ordering::Release);
        let (sa, sb) = (a.slot(), b.slot());
        let _x = slots.busy(&sa);
        let _y = slots.busy(&sb);
        tokio::time::advance(Duration::from_secs(60)).await;
        slots.evict_some();
        assert!(!a.slot.evict.is_cancelled() && !b.slot.evict.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn an_evicted_connection_is_dropped_and_its_permit_returned() {
        let slots = Slots::new(1);
        let cancel = CancellationToken::new();
        let held = slots.admit(&cancel).await.unwrap();
        let slot = held.slot();
        let (client, server) = tokio::io::duplex(64);
        let io = SlotIo::new(server, held);
        // A connection that never sends anything: its task only reads.
        spawn_conn(
            async move {
                use tokio::io::AsyncReadExt;
                let mut io = io;
                let mut buf = [0u8; 1];
                let _ = io.read(&mut buf).await;
                std::future::pending::<()>().await;
            },
            slot.clone(),
        );
        // Once read from, it is the one a new connection evicts.
        tokio::time::timeout(Duration::from_secs(1), async {
            while !slot.read.load(Ordering::Acquire) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        let next = tokio::time::timeout(Duration::from_secs(1), slots.admit(&cancel))
            .await
            .expect("admitted after the eviction")
            .unwrap();
        assert!(slot.evict.is_cancelled());
        assert_eq!(slots.map().len(), 1);
        assert!(slots.map().contains_key(&next.id));
        // The evicted stream was dropped: its peer sees the end.
        drop(next);
        let mut client = client;
        let mut buf = [0u8; 1];
        use tokio::io::AsyncReadExt;
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
    }
}
