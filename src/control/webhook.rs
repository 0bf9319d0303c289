//! The webhook: one JSON `POST` per change of a host's derived state.
//!
//! The state tracker queues a [`Change`] (bounded at [`QUEUE`]; a full queue drops and
//! counts, it never blocks tracking); one task sends them in order, each retried with
//! exponential backoff and jitter (1 s doubling to 60 s, at most [`MAX_TRIES`] tries) on
//! a connection error, a timeout, a 5xx or a 429. Any other answer ends that call: a 4xx
//! will not get better by repeating it. One at a time keeps a host's changes in order.
//!
//! Body: `{"host_id", "state", "previous", "reported_state", "last_seen", "seq", "at"}`
//! (times RFC 3339 UTC). HTTPS uses the system's trust store.
//!
//! # Not lost across a restart
//! The state last *notified* per host is durable in the store ([`Store::notified`]): the
//! file store keeps it in `state_dir/notified.json`, replaced atomically at most once a
//! tracker round when it changed; the PostgreSQL store in `hosts.notified_state`. The
//! state tracker starts from it, so its first round after a start compares each host's
//! derived state with what the webhook was last told and sends one change per host that
//! differs: a host that went silent (or came back) while the receiver was down, or whose
//! change was still queued when it stopped, is reported after the restart. A host with no
//! notified state yet (newly enrolled, or the first start of this version) is recorded
//! as it is without a call, as a restart is not a change of every host.
//!
//! The sender claims each change just before its call ([`Store::claim_notified`]). On
//! PostgreSQL the claim is one atomic `UPDATE`, so of several receivers on one database
//! that all notice a change exactly one calls the webhook. A call cut short by shutdown
//! gives its claim back ([`Store::release_notified`]) and is sent after the restart; a
//! try already under way when shutdown comes is let finish (at most [`TRY_TIMEOUT`]),
//! since only its answer tells whether the webhook got the change.
//! Limits, by design:
//! - a change whose every try failed is logged (`webhook call failed; change not
//!   delivered`, with the host and both states) and counted
//!   (`vigil_control_webhook_calls_total{result="failed"}`), and stays claimed: it is not
//!   retried later, since the webhook is told about the host's *next* change, whose
//!   `previous` says where it came from, and a webhook down for longer than the tries
//!   (about four minutes) would otherwise get a flood of stale changes;
//! - a change dropped because the queue was full is not claimed, so it is sent after the
//!   next restart;
//! - a receiver killed (SIGKILL, power loss) during a call loses that one change on
//!   PostgreSQL (it is claimed); the file store writes its claims once a round, so a
//!   change claimed less than a round before such a crash is sent again after the
//!   restart. Delivery is at most once per change on PostgreSQL and at least once on the
//!   file store;
//! - when the store cannot record a claim, the change is sent anyway (a page twice is
//!   better than none).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::routes::App;
use super::store::{HostBrief, Store};
use crate::lifecycle::{HostState, rfc3339};

/// Changes waiting to be sent, at most.
pub const QUEUE: usize = 10_000;
/// Tries per change.
pub const MAX_TRIES: usize = 8;
/// Limit of one try: connect, handshake, request and answer.
pub const TRY_TIMEOUT: Duration = Duration::from_secs(10);

/// One change of derived state.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    host_id: String,
    state: HostState,
    previous: HostState,
    reported_state: Option<HostState>,
    last_seen: Option<String>,
    seq: Option<u64>,
    at: String,
    /// `at` in ms since the epoch: what a claim is ordered by.
    #[serde(skip)]
    at_ms: u64,
}

impl Change {
    /// The change of `h` from `previous` to `state`, noticed at `now_ms`.
    pub fn new(h: &HostBrief, previous: HostState, state: HostState, now_ms: u64) -> Change {
        let t = |ms: u64| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        Change {
            host_id: h.host_id.clone(),
            state,
            previous,
            reported_state: h.last.map(|(_, _, s)| s),
            last_seen: h.last.map(|(_, at, _)| t(at)),
            seq: h.last.map(|(seq, _, _)| seq),
            at: t(now_ms),
            at_ms: now_ms,
        }
    }
}

/// Sends queued changes to `url` until `shutdown` (changes still queued then are dropped:
/// the receiver is stopping).
pub async fn send_loop<S: Store>(
    url: Uri,
    mut rx: mpsc::Receiver<Change>,
    app: Arc<App<S>>,
    shutdown: CancellationToken,
) {
    let client = Client::new(url);
    loop {
        let change = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = rx.recv() => match c { Some(c) => c, None => return },
        };
        match app
            .store
            .claim_notified(&change.host_id, change.state, change.at_ms)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                debug!(host_id = %change.host_id, state = change.state.as_str(), "change notified already (by another receiver)");
                continue;
            }
            Err(e) => {
                warn!(host_id = %change.host_id, error = %e, "cannot record the change as notified; sending it anyway");
            }
        }
        let body = Bytes::from(serde_json::to_vec(&change).unwrap_or_default());
        // A try under way is never cut by shutdown (it is bounded by TRY_TIMEOUT): only
        // its answer tells whether the webhook got the change. Shutdown cuts the pause
        // between tries, and no try starts after it.
        let send = || async {
            if shutdown.is_cancelled() {
                return Err(TryError {
                    message: "stopping".into(),
                    retryable: false,
                });
            }
            client.post(body.clone()).await
        };
        let stop = shutdown.clone();
        let pause = move |d: Duration| {
            let shutdown = stop.clone();
            async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(d) => {}
                }
            }
        };
        let outcome = send
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_secs(1))
                    .with_max_delay(Duration::from_secs(60))
                    .with_max_times(MAX_TRIES - 1)
                    .with_jitter(),
            )
            .sleep(pause)
            .when(|e: &TryError| e.retryable)
            .notify(|e: &TryError, after| {
                debug!(error = %e.message, retry_in = ?after, "webhook call failed; retrying");
            })
            .await;
        if outcome.is_err() && shutdown.is_cancelled() {
            // Not delivered, and stopping: sent again after the restart.
            release(&*app, &change).await;
            return;
        }
        match outcome {
            Ok(()) => app.metrics.webhook.with_label_values(&["ok"]).inc(),
            Err(e) => {
                app.metrics.webhook.with_label_values(&["failed"]).inc();
                warn!(host_id = %change.host_id, from = change.previous.as_str(), to = change.state.as_str(), error = %e.message, "webhook call failed; change not delivered");
            }
        }
    }
}

/// Gives back the claim of a call cut short by shutdown, so it is sent after the restart;
/// bounded, as the store may be what is going away.
async fn release<S: Store>(app: &App<S>, c: &Change) {
    let give_back = app
        .store
        .release_notified(&c.host_id, c.state, c.at_ms, c.previous);
    match tokio::time::timeout(Duration::from_secs(2), give_back).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(host_id = %c.host_id, error = %e, "cannot give back an unsent webhook change; it is lost")
        }
        Err(_) => {
            warn!(host_id = %c.host_id, "giving back an unsent webhook change timed out; it is lost")
        }
    }
}

#[derive(Debug)]
struct TryError {
    message: String,
    retryable: bool,
}

fn retry(message: String) -> TryError {
    TryError {
        message,
        retryable: true,
    }
}

struct Client {
    url: Uri,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Client {
    fn new(url: Uri) -> Client {
        let tls = (url.scheme_str() == Some("https")).then(|| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth());
            match config {
                Ok(c) => Some(tokio_rustls::TlsConnector::from(Arc::new(c))),
                Err(e) => {
                    warn!(error = %e, "webhook: TLS client not available");
                    None
                }
            }
        });
        Client {
            url,
            tls: tls.flatten(),
        }
    }

    async fn post(&self, body: Bytes) -> Result<(), TryError> {
        match tokio::time::timeout(TRY_TIMEOUT, self.exchange(body)).await {
            Ok(r) => r,
            Err(_) => Err(retry("timed out".into())),
        }
    }

    async fn exchange(&self, body: Bytes) -> Result<(), TryError> {
        let host = self.url.host().unwrap_or_default();
        let https = self.url.scheme_str() == Some("https");
        let port = self.url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = TcpStream::connect((bare, port))
            .await
            .map_err(|e| retry(format!("connecting to {host}:{port}: {e}")))?;
        let authority = self
            .url
            .authority()
            .map_or_else(|| host.to_string(), |a| a.as_str().to_string());
        let path = self.url.path_and_query().map_or("/", |p| p.as_str());
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| TryError {
                message: format!("building the request: {e}"),
                retryable: false,
            })?;
        let status = if https {
            let connector = self.tls.as_ref().ok_or_else(|| TryError {
                message: "no TLS client".into(),
                retryable: false,
            })?;
            let name = ServerName::try_from(bare.to_string()).map_err(|e| TryError {
                message: format!("{host} is not a TLS name: {e}"),
                retryable: false,
            })?;
            let s = connector
                .connect(name, tcp)
                .await
                .map_err(|e| retry(format!("TLS with {host}: {e}")))?;
            send(s, req).await?
        } else {
            send(tcp, req).await?
        };
        match status {
            200..=299 => Ok(()),
            429 | 500..=599 => Err(retry(format!("answered {status}"))),
            _ => Err(TryError {
                message: format!("answered {status}"),
                retryable: false,
            }),
        }
    }
}

async fn send<IO>(io: IO, req: Request<Full<Bytes>>) -> Result<u16, TryError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| retry(format!("HTTP: {e}")))?;
    let _conn = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn));
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| retry(format!("HTTP: {e}")))?;
    let status = resp.status().as_u16();
    // Drain a little of the answer so the connection ends cleanly; its content is unused.
    let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
        .collect()
        .await;
    Ok(status)
}
