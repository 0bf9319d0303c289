//! The heartbeat transport: one signed `POST` to the control plane over HTTPS (rustls,
//! `ring` provider) or, to a loopback address only, plain HTTP.
//!
//! - [`Endpoint`] parses `[heartbeat].url` once and keeps the canonical `@target-uri`
//!   string ([`HeartbeatClient::target_uri`]): sign with it, and the request goes to
//!   exactly that URI, so signing and sending cannot disagree.
//! - [`HeartbeatClient::new`] builds the rustls `ClientConfig` once at startup: trust
//!   anchors from `ca_file` (PEM) or the system's store, and the client certificate for
//!   mutual TLS when configured. It is shared through an `Arc` (STYLE §4.9).
//! - [`HeartbeatClient::post`] opens one connection per request (heartbeats are a few a
//!   minute), bounded as a whole by `[heartbeat].timeout`: resolve, connect, handshake,
//!   request and response. The answer's body is read up to [`MAX_RESPONSE_BODY`].
//!
//! Errors never carry the request body: a heartbeat is the host's data, not log text.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::sign::SignedHeaders;
use crate::config::HeartbeatConfig;

/// The content type of every heartbeat (it is signed).
pub const CONTENT_TYPE: &str = "application/json";
/// The most of a response body kept; the rest is not read.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// The control plane's address, parsed from `[heartbeat].url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    tls: bool,
    /// The host as written in a URI: lowercase, IPv6 in brackets.
    host: String,
    port: u16,
    /// `Host` header value: `host` plus `:port` unless it is the scheme's default.
    authority: String,
    /// Path and query, `/` when empty.
    path: String,
    target_uri: String,
}

impl Endpoint {
    /// Parses and checks a heartbeat URL: `https://HOST[:PORT]/PATH`, or `http://` when
    /// HOST is a loopback address or `localhost`.
    ///
    /// # Errors
    /// A message for the config error: not a URL, another scheme, user info, no host,
    /// or plain HTTP to a host that is not loopback.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("invalid URL {url:?}: {e}"))?;
        let tls = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "invalid URL {url:?}: expected https://HOST[:PORT]/PATH \
                     (http:// only to a loopback address)"
                ));
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("invalid URL {url:?}: no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "invalid URL {url:?}: user info is not allowed (the request is signed instead)"
            ));
        }
        let host = authority.host().to_ascii_lowercase();
        if host.is_empty() {
            return Err(format!("invalid URL {url:?}: no host"));
        }
        if !tls && !is_loopback_host(&host) {
            return Err(format!(
                "plain http:// is allowed only to a loopback address (127.0.0.0/8, ::1 or \
                 localhost), not {host:?}: use https://"
            ));
        }
        let default_port = if tls { 443 } else { 80 };
        let port = authority.port_u16().unwrap_or(default_port);
        let authority = if port == default_port {
            host.clone()
        } else {
            format!("{host}:{port}")
        };
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") => "/".to_string(),
            Some(p) => p.to_string(),
        };
        let scheme = if tls { "https" } else { "http" };
        let target_uri = format!("{scheme}://{authority}{path}");
        if tls {
            ServerName::try_from(unbracket(&host))
                .map_err(|e| format!("invalid URL {url:?}: host is not a TLS name: {e}"))?;
        }
        Ok(Endpoint {
            tls,
            host,
            port,
            authority,
            path,
            target_uri,
        })
    }

    /// The canonical URI to sign as `@target-uri`.
    pub fn target_uri(&self) -> &str {
        &self.target_uri
    }
}

fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

fn is_loopback_host(host: &str) -> bool {
    let h = unbracket(host);
    h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Why the client could not be built (at startup, from the config).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `[heartbeat].url` is not usable.
    #[error("heartbeat.url: {0}")]
    Url(String),
    /// A PEM file (CA, client certificate or key) cannot be used.
    #[error("heartbeat.{key} {}: {reason}", path.display())]
    File {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// No `ca_file` and the system's store holds no usable certificate.
    #[error("no trusted root certificates in the system's store (set heartbeat.ca_file)")]
    NoRoots,
    /// The TLS configuration was refused (e.g. a client key that does not match its
    /// certificate).
    #[error("heartbeat TLS setup: {0}")]
    Tls(String),
}

/// Why one send failed. None of these carries the request body.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Resolving or connecting failed.
    #[error("cannot connect to {target}: {reason}")]
    Connect {
        /// `host:port`.
        target: String,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed or a TLS alert ended the exchange.
    #[error("TLS with {target}: {reason}")]
    Tls {
        /// `host:port`.
        target: String,
        /// Why.
        reason: String,
    },
    /// No complete answer within `[heartbeat].timeout`.
    #[error("no answer from {target} within {}", humantime::format_duration(*limit))]
    Timeout {
        /// `host:port`.
        target: String,
        /// The limit.
        limit: Duration,
    },
    /// The HTTP exchange failed.
    #[error("HTTP with {target}: {reason}")]
    Http {
        /// `host:port`.
        target: String,
        /// Why.
        reason: String,
    },
}

/// The control plane's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body, at most [`MAX_RESPONSE_BODY`] bytes of it.
    pub body: Vec<u8>,
}

/// Sends heartbeats to one endpoint; cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct HeartbeatClient {
    endpoint: Endpoint,
    /// `None` for plain HTTP.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
}

impl std::fmt::Debug for HeartbeatClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeartbeatClient")
            .field("target_uri", &self.endpoint.target_uri)
            .field("tls", &self.tls.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HeartbeatClient {
    /// Builds the client: parses the URL and, for `https`, the TLS configuration.
    ///
    /// # Errors
    /// [`ClientError`] naming the key and file at fault.
    pub fn new(config: &HeartbeatConfig) -> Result<HeartbeatClient, ClientError> {
        let endpoint = Endpoint::parse(&config.url).map_err(ClientError::Url)?;
        let tls = if endpoint.tls {
            let tls_config = tls_config(config)?;
            let name = ServerName::try_from(unbracket(&endpoint.host).to_string())
                .map_err(|e| ClientError::Url(e.to_string()))?;
            Some((TlsConnector::from(Arc::new(tls_config)), name))
        } else {
            None
        };
        Ok(HeartbeatClient {
            endpoint,
            tls,
            timeout: config.timeout.get(),
        })
    }

    /// The canonical URI to sign as `@target-uri`; requests go to exactly this URI.
    pub fn target_uri(&self) -> &str {
        self.endpoint.target_uri()
    }

    /// Sends `body` with its signature headers as `POST` to the endpoint.
    ///
    /// # Errors
    /// [`SendError`]; any status code, 5xx included, is an `Ok` [`Response`].
    pub async fn post(&self, body: &[u8], headers: &SignedHeaders) -> Result<Response, SendError> {
        match tokio::time::timeout(self.timeout, self.exchange(body, headers)).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Timeout {
                target: self.target(),
                limit: self.timeout,
            }),
        }
    }

    fn target(&self) -> String {
        format!("{}:{}", self.endpoint.host, self.endpoint.port)
    }

    async fn exchange(&self, body: &[u8], headers: &SignedHeaders) -> Result<Response, SendError> {
        let tcp = self.connect().await?;
        match &self.tls {
            None => self.http(tcp, body, headers).await,
            Some((connector, name)) => {
                let stream =
                    connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| SendError::Tls {
                            target: self.target(),
                            reason: e.to_string(),
                        })?;
                self.http(stream, body, headers).await
            }
        }
    }

    async fn connect(&self) -> Result<TcpStream, SendError> {
        let connect_err = |reason: String| SendError::Connect {
            target: self.target(),
            reason,
        };
        let host = unbracket(&self.endpoint.host);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, self.endpoint.port))
            .await
            .map_err(|e| connect_err(e.to_string()))?
            // Plain HTTP stays on this host even if `localhost` resolves elsewhere.
            .filter(|a| self.endpoint.tls || a.ip().is_loopback())
            .collect();
        let mut last = "no address".to_string();
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(connect_err(last))
    }

    async fn http<S>(
        &self,
        io: S,
        body: &[u8],
        headers: &SignedHeaders,
    ) -> Result<Response, SendError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| self.http_error(&e))?;
        // Aborted when this exchange ends (answered, failed or timed out): one connection
        // per request, never left behind.
        let _conn = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn));
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.endpoint.path.as_str())
            .header(hyper::header::HOST, self.endpoint.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, CONTENT_TYPE)
            .header("content-digest", headers.content_digest.as_str())
            .header("signature-input", headers.signature_input.as_str())
            .header("signature", headers.signature.as_str())
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| SendError::Http {
                target: self.target(),
                reason: format!("cannot build the request: {e}"),
            })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.http_error(&e))?;
        let status = resp.status().as_u16();
        let mut incoming = resp.into_body();
        let mut out = Vec::new();
        while out.len() < MAX_RESPONSE_BODY {
            let Some(frame) = incoming.frame().await else {
                break;
            };
            let frame = frame.map_err(|e| self.http_error(&e))?;
            if let Some(data) = frame.data_ref() {
                let room = MAX_RESPONSE_BODY - out.len();
                out.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
        Ok(Response { status, body: out })
    }

    /// A hyper error as a [`SendError`]: `Tls` when a TLS alert caused it (a server that
    /// wants a client certificate says so only after the handshake, in TLS 1.3).
    fn http_error(&self, e: &hyper::Error) -> SendError {
        let reason = error_chain(e);
        if tls_cause(e) {
            SendError::Tls {
                target: self.target(),
                reason,
            }
        } else {
            SendError::Http {
                target: self.target(),
                reason,
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn tls_cause(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.is::<rustls::Error>() {
            return true;
        }
        if let Some(inner) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if inner.is::<rustls::Error>() {
                return true;
            }
        }
        cur = c.source();
    }
    false
}

fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::File {
        key,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn tls_config(config: &HeartbeatConfig) -> Result<rustls::ClientConfig, ClientError> {
    let mut store = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            let file_err = |reason: String| ClientError::File {
                key: "ca_file",
                path: path.clone(),
                reason,
            };
            let pem = read_pem("ca_file", path)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_err(format!("invalid PEM: {e}")))?;
            if certs.is_empty() {
                return Err(file_err("no PEM certificate in the file".into()));
            }
            for c in certs {
                store
                    .add(c)
                    .map_err(|e| file_err(format!("unusable certificate: {e}")))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(ClientError::NoRoots);
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::Tls(e.to_string()))?
    .with_root_certificates(store);
    match (&config.client_cert, &config.client_key) {
        (Some(cert), Some(key)) => {
            let pem = read_pem("client_cert", cert)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ClientError::File {
                    key: "client_cert",
                    path: cert.clone(),
                    reason: format!("invalid PEM: {e}"),
                })?;
            if chain.is_empty() {
                return Err(ClientError::File {
                    key: "client_cert",
                    path: cert.clone(),
                    reason: "no PEM certificate in the file".into(),
                });
            }
            let pem = read_pem("client_key", key)?;
            let private = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| ClientError::File {
                key: "client_key",
                path: key.clone(),
                reason: format!("no usable PEM private key: {e}"),
            })?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| ClientError::Tls(format!("client_cert/client_key: {e}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        // Config validation refuses one without the other.
        _ => Err(ClientError::Tls(
            "client_cert and client_key go together".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::config::types::{ByteSize, Duration as CfgDuration};
    use crate::heartbeat::{keys, sign};

    /// What the test server saw.
    #[derive(Debug)]
    struct Seen {
        method: String,
        path: String,
        headers: hyper::HeaderMap,
        body: Vec<u8>,
    }

    struct Pki {
        dir: tempfile::TempDir,
        server_chain: Vec<CertificateDer<'static>>,
        server_key: String,
        ca_der: CertificateDer<'static>,
    }

    impl Pki {
        fn path(&self, name: &str) -> std::path::PathBuf {
            self.dir.path().join(name)
        }
    }

    fn ca(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    }

    /// A CA (`ca.pem`), a server certificate for 127.0.0.1 and localhost, a client
    /// certificate (`client.pem`, `client.key`) and another CA (`other-ca.pem`).
    fn pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("vigil test CA");
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
        cp.distinguished_name.push(DnType::CommonName, "host-1");
        let client = cp.signed_by(&client_key, &ca).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(
            dir.path().join("other-ca.pem"),
            super::tests::ca("other").pem(),
        )
        .unwrap();
        std::fs::write(dir.path().join("client.pem"), client.pem()).unwrap();
        std::fs::write(dir.path().join("client.key"), client_key.serialize_pem()).unwrap();
        Pki {
            server_chain: vec![server.der().clone()],
            server_key: server_key.serialize_pem(),
            ca_der: ca.der().clone(),
            dir,
        }
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn acceptor(pki: &Pki, require_client_cert: bool) -> TlsAcceptor {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(pki.ca_der.clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = PrivateKeyDer::from_pem_slice(pki.server_key.as_bytes()).unwrap();
        let config = builder
            .with_single_cert(pki.server_chain.clone(), key)
            .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }

    async fn handle(
        req: Request<Incoming>,
        tx: mpsc::UnboundedSender<Seen>,
    ) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
        let method = req.method().to_string();
        let path = req.uri().to_string();
        let headers = req.headers().clone();
        let body = req.into_body().collect().await?.to_bytes().to_vec();
        let _ = tx.send(Seen {
            method,
            path,
            headers,
            body,
        });
        Ok(hyper::Response::builder()
            .status(202)
            .body(Full::new(Bytes::from_static(b"{\"ok\":true}")))
            .unwrap())
    }

    async fn serve_conn<S>(io: S, tx: mpsc::UnboundedSender<Seen>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let svc = service_fn(move |req| handle(req, tx.clone()));
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), svc)
            .await;
    }

    /// A server on 127.0.0.1 (TLS when `tls` is given); returns its port and what it saw.
    async fn server(tls: Option<TlsAcceptor>) -> (u16, mpsc::UnboundedReceiver<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_conn(tcp, tx).await,
                        Some(a) => {
                            if let Ok(s) = a.accept(tcp).await {
                                serve_conn(s, tx).await;
                            }
                        }
                    }
                });
            }
        });
        (port, rx)
    }

    fn config(url: String) -> HeartbeatConfig {
        HeartbeatConfig {
            url,
            interval: CfgDuration::from_secs(15),
            key_file: "/nonexistent".into(),
            ca_file: None,
            client_cert: None,
            client_key: None,
            spool_max: ByteSize(1 << 20),
            max_backoff: CfgDuration::from_secs(120),
            timeout: CfgDuration::from_secs(5),
        }
    }

    /// Signs `body` for `client` with a fresh key; returns the headers and the public key.
    fn signed(client: &HeartbeatClient, body: &[u8]) -> (SignedHeaders, keys::PublicKey) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hb.key");
        keys::generate(&p, false).unwrap();
        let key = keys::load(&p).unwrap();
        let h = sign::sign(&key, "POST", client.target_uri(), CONTENT_TYPE, body, now()).unwrap();
        (h, key.public_key())
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// The server saw exactly what was sent, and the signature verifies against the URI
    /// the server rebuilds from the request (scheme it serves, Host header, path).
    fn assert_received(
        seen: &Seen,
        scheme: &str,
        body: &[u8],
        h: &SignedHeaders,
        pk: &keys::PublicKey,
    ) {
        let header = |n: &str| seen.headers.get(n).map(|v| v.to_str().unwrap());
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.body, body);
        assert_eq!(header("content-type"), Some(CONTENT_TYPE));
        assert_eq!(header("content-digest"), Some(h.content_digest.as_str()));
        assert_eq!(header("signature-input"), Some(h.signature_input.as_str()));
        assert_eq!(header("signature"), Some(h.signature.as_str()));
        let target_uri = format!("{scheme}://{}{}", header("host").unwrap(), seen.path);
        let received = sign::Received {
            method: &seen.method,
            target_uri: &target_uri,
            content_type: header("content-type"),
            content_digest: header("content-digest"),
            signature_input: header("signature-input"),
            signature: header("signature"),
            body: &seen.body,
        };
        sign::verify(pk, &received, now(), std::time::Duration::from_secs(60)).unwrap();
    }

    #[test]
    fn urls_are_checked_and_made_canonical() {
        let ok = |u: &str| Endpoint::parse(u).unwrap().target_uri().to_string();
        assert_eq!(
            ok("HTTPS://Control.Internal:8443/v1/heartbeats"),
            "https://control.internal:8443/v1/heartbeats"
        );
        assert_eq!(ok("https://c.example:443/v1/hb"), "https://c.example/v1/hb");
        assert_eq!(ok("https://c.example"), "https://c.example/");
        assert_eq!(
            ok("http://127.0.0.1:8080/hb?x=1"),
            "http://127.0.0.1:8080/hb?x=1"
        );
        assert_eq!(ok("http://[::1]/hb"), "http://[::1]/hb");
        assert_eq!(ok("http://LOCALHOST:80/hb"), "http://localhost/hb");
        assert_eq!(ok("http://127.9.9.9:1/"), "http://127.9.9.9:1/");
        for bad in [
            "http://10.0.0.1/hb",
            "http://control.internal/hb",
            "http://[::2]/hb",
            "ftp://127.0.0.1/x",
            "/v1/heartbeats",
            "https://user:pw@c.example/hb",
            "not a url",
            "",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad} accepted");
        }
        let e = Endpoint::parse("http://10.0.0.1/hb").unwrap_err();
        assert!(e.contains("loopback"), "{e}");
    }

    #[tokio::test]
    async fn posts_over_tls_with_the_configured_ca_and_the_signature_verifies() {
        let pki = pki();
        let (port, mut rx) = server(Some(acceptor(&pki, false))).await;
        for host in ["127.0.0.1", "localhost"] {
            let mut cfg = config(format!("https://{host}:{port}/v1/heartbeats"));
            cfg.ca_file = Some(pki.path("ca.pem"));
            let client = HeartbeatClient::new(&cfg).unwrap();
            let body = br#"{"v":1,"seq":42}"#;
            let (h, pk) = signed(&client, body);
            let resp = client.post(body, &h).await.unwrap();
            assert_eq!(resp.status, 202);
            assert_eq!(resp.body, br#"{"ok":true}"#);
            let seen = rx.recv().await.unwrap();
            assert_eq!(seen.path, "/v1/heartbeats");
            assert_received(&seen, "https", body, &h, &pk);
        }
    }

    #[tokio::test]
    async fn a_server_certificate_from_another_ca_is_a_tls_error() {
        let pki = pki();
        let (port, _rx) = server(Some(acceptor(&pki, false))).await;
        let mut cfg = config(format!("https://127.0.0.1:{port}/hb"));
        cfg.ca_file = Some(pki.path("other-ca.pem"));
        let client = HeartbeatClient::new(&cfg).unwrap();
        let body = b"{}";
        let (h, _) = signed(&client, body);
        let e = client.post(body, &h).await.unwrap_err();
        assert!(matches!(e, SendError::Tls { .. }), "{e}");
        assert!(!e.to_string().contains("{}"), "{e}");
    }

    #[tokio::test]
    async fn mutual_tls_works_with_the_client_certificate_and_fails_without() {
        let pki = pki();
        let (port, mut rx) = server(Some(acceptor(&pki, true))).await;
        let mut cfg = config(format!("https://localhost:{port}/hb"));
        cfg.ca_file = Some(pki.path("ca.pem"));
        let without = HeartbeatClient::new(&cfg).unwrap();
        cfg.client_cert = Some(pki.path("client.pem"));
        cfg.client_key = Some(pki.path("client.key"));
        let with = HeartbeatClient::new(&cfg).unwrap();

        let body = br#"{"v":1,"seq":1}"#;
        let (h, pk) = signed(&with, body);
        let e = without.post(body, &h).await.unwrap_err();
        assert!(matches!(e, SendError::Tls { .. }), "{e}");

        let resp = with.post(body, &h).await.unwrap();
        assert_eq!(resp.status, 202);
        assert_received(&rx.recv().await.unwrap(), "https", body, &h, &pk);
    }

    #[tokio::test]
    async fn plain_http_to_loopback_works() {
        let (port, mut rx) = server(None).await;
        let client = HeartbeatClient::new(&config(format!("http://127.0.0.1:{port}/hb"))).unwrap();
        let body = br#"{"v":1,"seq":3}"#;
        let (h, pk) = signed(&client, body);
        assert_eq!(client.post(body, &h).await.unwrap().status, 202);
        let seen = rx.recv().await.unwrap();
        assert_eq!(seen.headers["host"], format!("127.0.0.1:{port}").as_str());
        assert_received(&seen, "http", body, &h, &pk);
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out_within_the_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                conns.push(s);
            }
        });
        for scheme in ["http", "https"] {
            let pki = pki();
            let mut cfg = config(format!("{scheme}://127.0.0.1:{port}/hb"));
            cfg.ca_file = Some(pki.path("ca.pem"));
            cfg.timeout = CfgDuration::from_secs(1);
            let client = HeartbeatClient::new(&cfg).unwrap();
            let (h, _) = signed(&client, b"{}");
            let start = Instant::now();
            let e = client.post(b"{}", &h).await.unwrap_err();
            let took = start.elapsed();
            assert!(matches!(e, SendError::Timeout { .. }), "{e}");
            assert!(took >= std::time::Duration::from_secs(1), "{took:?}");
            assert!(took < std::time::Duration::from_secs(2), "{took:?}");
        }
        held.abort();
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let client = HeartbeatClient::new(&config(format!("http://127.0.0.1:{port}/hb"))).unwrap();
        let (h, _) = signed(&client, b"{}");
        let e = client.post(b"{}", &h).await.unwrap_err();
        assert!(matches!(e, SendError::Connect { .. }), "{e}");
    }

    #[test]
    fn unusable_ca_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let missing = dir.path().join("missing.pem");
        for path in [empty, junk, missing] {
            let mut cfg = config("https://c.example/hb".into());
            cfg.ca_file = Some(path.clone());
            let e = HeartbeatClient::new(&cfg).unwrap_err();
            assert!(matches!(e, ClientError::File { key: "ca_file", .. }), "{e}");
            let text = e.to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(text.starts_with("heartbeat.ca_file "), "{text}");
        }
    }

    #[test]
    fn a_client_key_that_is_not_a_key_is_an_error() {
        let pki = pki();
        let mut cfg = config("https://c.example/hb".into());
        cfg.ca_file = Some(pki.path("ca.pem"));
        cfg.client_cert = Some(pki.path("client.pem"));
        cfg.client_key = Some(pki.path("ca.pem"));
        let e = HeartbeatClient::new(&cfg).unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::File {
                    key: "client_key",
                    ..
                }
            ),
            "{e}"
        );
    }
}
