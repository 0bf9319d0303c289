//! A small HTTP/1 client for the commands that talk to a running agent (`status`,
//! `lifecycle`): over the admin socket or the TCP listener.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::config::Config;

/// How long a whole request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a running agent answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The admin socket.
    Socket(PathBuf),
    /// `host:port` of the TCP listener.
    Tcp(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Socket(p) => write!(f, "{}", p.display()),
            Target::Tcp(a) => write!(f, "http://{a}"),
        }
    }
}

/// Why an agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("cannot reach the agent at {target}: {source}")]
    Connect {
        /// Where.
        target: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("talking to the agent at {target}: {message}")]
    Http {
        /// Where.
        target: String,
        /// Why.
        message: String,
    },
    /// A bad `--url`.
    #[error("invalid --url {0:?}: expected http://HOST:PORT")]
    Url(String),
}

/// Parses `--url`: `http://host:port[/...]` or `host:port`.
///
/// # Errors
/// Anything else.
pub fn parse_url(url: &str) -> Result<Target, ClientError> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || url.starts_with("https://") || !authority.contains(':') {
        return Err(ClientError::Url(url.to_string()));
    }
    Ok(Target::Tcp(authority.to_string()))
}

/// The target a config points at: its admin socket when this user may connect to it,
/// else its TCP listener.
pub fn target_from_config(config: &Config) -> Target {
    let sock = &config.api.admin_socket;
    if socket_usable(sock) {
        Target::Socket(sock.clone())
    } else {
        Target::Tcp(config.api.listen.to_string())
    }
}

fn socket_usable(path: &Path) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// Sends one request; returns the status code and body.
///
/// # Errors
/// The agent cannot be reached or the exchange fails or times out.
pub async fn request(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, Vec<u8>), ClientError> {
    request_within(target, method, path, body, REQUEST_TIMEOUT).await
}

/// Sends one request that may take up to `limit` (a manual remediation waits for the
/// script and its verification).
///
/// # Errors
/// As [`request`].
pub async fn request_within(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    limit: Duration,
) -> Result<(u16, Vec<u8>), ClientError> {
    let t = target.to_string();
    let fut = async {
        match target {
            Target::Socket(p) => {
                let s = UnixStream::connect(p)
                    .await
                    .map_err(|source| ClientError::Connect {
                        target: t.clone(),
                        source,
                    })?;
                exchange(s, &t, "localhost", method, path, body).await
            }
            Target::Tcp(a) => {
                let s = TcpStream::connect(a)
                    .await
                    .map_err(|source| ClientError::Connect {
                        target: t.clone(),
                        source,
                    })?;
                exchange(s, &t, a, method, path, body).await
            }
        }
    };
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
        Err(ClientError::Http {
            target: t.clone(),
            message: format!("no answer within {limit:?}"),
        })
    })
}

async fn exchange<S>(
    io: S,
    target: &str,
    host: &str,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, Vec<u8>), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http = |e: hyper::Error| ClientError::Http {
        target: target.to_string(),
        message: e.to_string(),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(http)?;
    tokio::spawn(async move {
        // The connection ends with the exchange; its error, if any, surfaces through `sender`.
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host);
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| ClientError::Http {
            target: target.to_string(),
            message: e.to_string(),
        })?;
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
    Ok((status, bytes.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_host_and_port() {
        assert_eq!(
            parse_url("http://127.0.0.1:9797").unwrap(),
            Target::Tcp("127.0.0.1:9797".into())
        );
        assert_eq!(
            parse_url("127.0.0.1:9797/health").unwrap(),
            Target::Tcp("127.0.0.1:9797".into())
        );
        assert!(parse_url("https://x:1").is_err());
        assert!(parse_url("http://nohost").is_err());
    }
}
