//! A control-plane stand-in for the heartbeat tests: a hyper 1.x server on 127.0.0.1 in
//! its own thread and tokio runtime (the tests are synchronous), over TLS with an rcgen
//! CA and server certificate, or over plain HTTP.
//!
//! Every request is verified with `vigil::heartbeat::sign::verify` against the enrolled
//! public key and the URL the agent is configured with (the agent signs that URL's
//! canonical form, which [`Receiver::url`] already is), and recorded. What it answers is
//! set by a [`Mode`] the test switches while it runs, plus one-off answers for given seqs.

// Test helpers may unwrap freely (STYLE §4.4); clippy only exempts #[test] fns.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;

use vigil::heartbeat::keys::PublicKey;
use vigil::heartbeat::sign;

/// The path agents post to.
pub const PATH: &str = "/v1/heartbeats";

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Verify (401 on failure), require `seq` above the last accepted one (409 with
    /// `{"last_seq": N}` otherwise), store and answer 200.
    Accept,
    /// Answer this status without storing anything.
    Status(u16),
    /// Read the request, then never answer.
    Hang,
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Record {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Lowercase names; a header sent on several lines is joined with ", ".
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// `seq` of the JSON body, when it has one.
    pub seq: Option<u64>,
    /// The status answered; `None` when it hung.
    pub answer: Option<u16>,
    /// The signature check against the enrolled key (made in every mode).
    pub verified: Result<sign::VerifiedParams, String>,
    /// When the whole request had arrived.
    pub at: Instant,
}

impl Record {
    /// The value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the signature verified.
    pub fn ok(&self) -> bool {
        self.verified.is_ok()
    }

    /// One line for failure messages.
    pub fn line(&self) -> String {
        format!(
            "seq={:?} answer={:?} verified={} len={}",
            self.seq,
            self.answer,
            match &self.verified {
                Ok(_) => "yes".to_string(),
                Err(e) => format!("no ({e})"),
            },
            self.body.len()
        )
    }
}

struct State {
    mode: Mode,
    /// The last accepted seq (0: none yet).
    last_seq: u64,
    /// Answer this status to the next request with this seq, once.
    once: HashMap<u64, u16>,
    public_key: Option<PublicKey>,
    max_skew: Duration,
    records: Vec<Record>,
}

/// The running stand-in; stopped on drop.
pub struct Receiver {
    port: u16,
    url: String,
    ca_file: Option<PathBuf>,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    /// An HTTPS receiver at `https://localhost:PORT/v1/heartbeats`; its CA is written to
    /// `dir/ca.pem` ([`Receiver::ca_file`]).
    pub fn https(dir: &Path, public_key: Option<PublicKey>) -> Receiver {
        let acceptor = tls_acceptor(dir);
        Receiver::start(Some(acceptor), Some(dir.join("ca.pem")), public_key)
    }

    /// A plain HTTP receiver at `http://127.0.0.1:PORT/v1/heartbeats`.
    pub fn http(public_key: Option<PublicKey>) -> Receiver {
        Receiver::start(None, None, public_key)
    }

    fn start(
        tls: Option<TlsAcceptor>,
        ca_file: Option<PathBuf>,
        public_key: Option<PublicKey>,
    ) -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = match tls {
            Some(_) => format!("https://localhost:{port}{PATH}"),
            None => format!("http://127.0.0.1:{port}{PATH}"),
        };
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Accept,
            last_seq: 0,
            once: HashMap::new(),
            public_key,
            max_skew: Duration::from_secs(300),
            records: Vec::new(),
        }));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let shared = Arc::clone(&state);
        let target = url.clone();
        let thread = std::thread::Builder::new()
            .name(format!("receiver-{port}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(serve(listener, tls, shared, Arc::from(target), stop_rx));
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .unwrap();
        Receiver {
            port,
            url,
            ca_file,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the records from the others.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The URL to configure as `[heartbeat].url` (already canonical).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `ca.pem` of an HTTPS receiver.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    pub fn set_mode(&self, mode: Mode) {
        self.lock().mode = mode;
    }

    pub fn set_public_key(&self, key: PublicKey) {
        self.lock().public_key = Some(key);
    }

    /// Sets the last accepted seq, as if this host had been heard from before.
    pub fn set_last_seq(&self, n: u64) {
        self.lock().last_seq = n;
    }

    /// The last accepted seq (0: none).
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }

    /// Answers `status` to the next request carrying `seq` (whatever the mode), once.
    pub fn answer_once(&self, seq: u64, status: u16) {
        self.lock().once.insert(seq, status);
    }

    /// Every request so far, in arrival order.
    pub fn records(&self) -> Vec<Record> {
        self.lock().records.clone()
    }

    /// The requests answered 200 (accepted and stored), in arrival order.
    pub fn accepted(&self) -> Vec<Record> {
        self.lock()
            .records
            .iter()
            .filter(|r| r.answer == Some(200))
            .cloned()
            .collect()
    }

    /// The seqs of [`accepted`](Self::accepted).
    pub fn accepted_seqs(&self) -> Vec<u64> {
        self.lock()
            .records
            .iter()
            .filter(|r| r.answer == Some(200))
            .filter_map(|r| r.seq)
            .collect()
    }

    /// Every request in a few lines, for failure messages.
    pub fn summary(&self) -> String {
        let st = self.lock();
        let mut out = format!(
            "receiver {} mode {:?} last_seq {}, {} requests:\n",
            self.url,
            st.mode,
            st.last_seq,
            st.records.len()
        );
        let skip = st.records.len().saturating_sub(60);
        if skip > 0 {
            out.push_str(&format!("  ... {skip} earlier\n"));
        }
        for r in st.records.iter().skip(skip) {
            out.push_str("  ");
            out.push_str(&r.line());
            out.push('\n');
        }
        out
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn serve(
    listener: std::net::TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<Mutex<State>>,
    target: Arc<str>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let tcp = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
        };
        let state = Arc::clone(&state);
        let target = Arc::clone(&target);
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_conn(tcp, state, target).await,
                Some(a) => {
                    // A failed handshake (e.g. an agent that does not trust our CA) is
                    // the agent's problem to report; nothing reaches the handler.
                    if let Ok(s) = a.accept(tcp).await {
                        serve_conn(s, state, target).await;
                    }
                }
            }
        });
    }
}

async fn serve_conn<S>(io: S, state: Arc<Mutex<State>>, target: Arc<str>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| handle(req, Arc::clone(&state), Arc::clone(&target)));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

async fn handle(
    req: hyper::Request<Incoming>,
    state: Arc<Mutex<State>>,
    target: Arc<str>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let mut headers: Vec<(String, String)> = Vec::new();
    for name in req.headers().keys() {
        let joined: Vec<String> = req
            .headers()
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        headers.push((name.as_str().to_string(), joined.join(", ")));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        // The agent went away mid-request (e.g. SIGKILL): nothing to record.
        Err(_) => return Ok(respond(400, "{\"error\":\"incomplete request\"}".into())),
    };
    let seq = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64));

    let (answer, text) = {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        let header = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        let verified = match &st.public_key {
            None => Err("no public key enrolled for this host".to_string()),
            Some(pk) => sign::verify(
                pk,
                &sign::Received {
                    method: &method,
                    target_uri: &target,
                    content_type: header("content-type"),
                    content_digest: header("content-digest"),
                    signature_input: header("signature-input"),
                    signature: header("signature"),
                    body: &body,
                },
                now_secs(),
                st.max_skew,
            )
            .map_err(|e| e.to_string()),
        };
        let once = seq.and_then(|s| st.once.remove(&s));
        let (answer, text) = match (once, st.mode) {
            (Some(code), _) => (
                Some(code),
                format!("{{\"error\":\"told to answer {code}\"}}"),
            ),
            (None, Mode::Hang) => (None, String::new()),
            (None, Mode::Status(code)) => (Some(code), format!("{{\"error\":\"status {code}\"}}")),
            (None, Mode::Accept) => match (&verified, seq) {
                (Err(e), _) => (
                    Some(401),
                    serde_json::json!({ "error": format!("signature: {e}") }).to_string(),
                ),
                (Ok(_), None) => (Some(400), "{\"error\":\"no seq\"}".to_string()),
                (Ok(_), Some(s)) if s <= st.last_seq => (
                    Some(409),
                    serde_json::json!({ "last_seq": st.last_seq }).to_string(),
                ),
                (Ok(_), Some(s)) => {
                    st.last_seq = s;
                    (Some(200), serde_json::json!({ "seq": s }).to_string())
                }
            },
        };
        st.records.push(Record {
            method,
            path,
            headers,
            body,
            seq,
            answer,
            verified,
            at: Instant::now(),
        });
        (answer, text)
    };
    match answer {
        Some(code) => Ok(respond(code, text)),
        None => std::future::pending().await,
    }
}

fn respond(code: u16, text: String) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(code)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(text)))
        .unwrap()
}

/// A CA (written to `dir/ca.pem`) and a server certificate for `localhost` and
/// 127.0.0.1 signed by it, as a rustls acceptor.
fn tls_acceptor(dir: &Path) -> TlsAcceptor {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "vigil it receiver CA");
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = PrivateKeyDer::from_pem_slice(server_key.serialize_pem().as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![server.der().clone()], key)
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}
