//! The control plane's endpoints, independent of the transport (tested in-process).
//!
//! - `POST /v1/heartbeats`: body ≤ 1 MiB (413; at once when `Content-Length` says more),
//!   read within [`BODY_TIMEOUT`] (408); the body's `v`, `host_id`, `seq` and `state`
//!   (400); the host's enrolled keys (401 `unknown_host`); the `keyid` of the signature
//!   among them (401 `unknown_key`); the digest, the signature and `created` within
//!   `max_clock_skew` either way (401 with the reason); `seq` above the last accepted (409
//!   with `last_seq`); stored durably, then 200 `{"seq": N}`. A store error is 503: the
//!   agent keeps the heartbeat and retries.
//! - `GET /v1/hosts[?state=&kernel=GLOB&image=GLOB&check_status=&limit=&after=]`,
//!   `GET /v1/hosts/ID` (404 if not enrolled): the hosts with their derived state.
//! - `GET /metrics`, `GET /health` (200 while serving, for a load balancer).
//!
//! # `@target-uri`
//! The signature covers the absolute URI the agent sent to. With `public_url` set, the
//! receiver checks against `public_url` + the request's path (and query): the URL the
//! agents are configured with, whatever proxy sits between. Without it, the URI is
//! rebuilt from what this listener saw: its own scheme (`https` with TLS, else `http`),
//! the `Host` header (lowercased, the scheme's default port dropped, as the agent's
//! canonical form has it) and the path. Trusting `Host` is safe for integrity: a request
//! that names another host than the one it was signed for fails the signature, and one
//! captured and replayed to this receiver meets the `seq` check. Set `public_url` when a
//! proxy rewrites `Host` or terminates TLS.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::header::{ALLOW, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{HeaderMap, Method, Request, Response, StatusCode, http::request::Parts};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;
use tracing::{debug, error, warn};

use super::body::{self, BodyError};
use super::metrics::Metrics;
use super::store::{
    AcceptOutcome, HostFilter, HostView, Incoming, Page, Store, StoreError, epoch_ms,
};
use super::verifier::Verifier;
use crate::heartbeat::sign::{self, Received, VerifyError};
use crate::lifecycle::HostState;

/// Largest heartbeat body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// How long a client may take to send the body once its headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Hosts in one page of `/v1/hosts` when `limit` is not given, and the most allowed.
pub const DEFAULT_LIMIT: usize = 1000;
/// The most hosts one page may hold.
pub const MAX_LIMIT: usize = 10_000;

/// A response.
pub type Resp = Response<Full<Bytes>>;

/// What the handlers need, shared by every connection.
pub struct App<S> {
    /// Enrolment and heartbeats.
    pub store: S,
    /// Canonical `public_url` without a trailing slash, if configured.
    pub public_url: Option<String>,
    /// `https` when this listener does TLS, else `http`.
    pub scheme: &'static str,
    /// `max_clock_skew`.
    pub max_skew: Duration,
    /// `overdue_after`.
    pub overdue_after: Duration,
    /// The metrics.
    pub metrics: Metrics,
    /// The Ed25519 checks, batched.
    pub verifier: Verifier,
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_resp(status: StatusCode, body: &impl Serialize) -> Resp {
    let mut b = serde_json::to_vec(body).unwrap_or_default();
    b.push(b'\n');
    respond(status, "application/json", b)
}

/// `{"error": message, "reason": reason}` plus `extra`'s keys.
fn error(status: StatusCode, message: &str, reason: &str, extra: serde_json::Value) -> Resp {
    let mut v = json!({ "error": message, "reason": reason });
    if let (Some(obj), serde_json::Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    json_resp(status, &v)
}

/// Answers one request.
pub async fn handle<S: Store, B>(app: &App<S>, req: Request<B>) -> Resp
where
    B: Body<Data = Bytes> + Send,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let method = &parts.method;
    let allow = |m: &'static str| {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
            "method",
            json!({}),
        );
        r.headers_mut().insert(ALLOW, HeaderValue::from_static(m));
        r
    };
    match path {
        "/v1/heartbeats" if method == Method::POST => heartbeat(app, parts, body).await,
        "/v1/heartbeats" => allow("POST"),
        _ if method != Method::GET => {
            if path == "/v1/hosts" || path.starts_with("/v1/hosts/") || path == "/metrics" {
                allow("GET")
            } else {
                not_found()
            }
        }
        "/v1/hosts" => hosts(app, parts.uri.query()).await,
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            app.metrics.render(),
        ),
        "/health" => json_resp(StatusCode::OK, &json!({ "status": "ok" })),
        p => match p.strip_prefix("/v1/hosts/") {
            Some(id) => host(app, id).await,
            None => not_found(),
        },
    }
}

fn not_found() -> Resp {
    error(StatusCode::NOT_FOUND, "not found", "not_found", json!({}))
}

/// A database that went away is logged once by the store itself (loss and recovery);
/// logging it again per request would flood the log at thousands of requests a second.
fn log_store_error(e: &StoreError) {
    match e {
        StoreError::Unavailable(_) => debug!(error = %e, "store not available"),
        _ => error!(error = %e, "store error"),
    }
}

fn store_unavailable(app: &App<impl Store>, e: &StoreError) -> Resp {
    log_store_error(e);
    app.metrics.reject("store_error");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the store is not available; retry later",
        "store_error",
        json!({}),
    )
}

/// A header's value; several lines are joined with ", " (RFC 9110 §5.3). `None` when
/// absent or not visible ASCII.
fn header(h: &HeaderMap, name: &str) -> Option<String> {
    let mut vals = h.get_all(name).iter();
    let first = vals.next()?.to_str().ok()?.to_string();
    vals.try_fold(first, |mut acc, v| {
        acc.push_str(", ");
        acc.push_str(v.to_str().ok()?);
        Some(acc)
    })
}

/// The `@target-uri` to verify against (see the module doc).
fn target_uri<S>(app: &App<S>, parts: &Parts) -> Result<String, &'static str> {
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    if let Some(base) = &app.public_url {
        return Ok(format!("{base}{path}"));
    }
    let host = match parts.uri.authority() {
        Some(a) => a.as_str().to_string(),
        None => header(&parts.headers, HOST.as_str()).ok_or("no Host header")?,
    };
    let host = host.trim().to_ascii_lowercase();
    if host.is_empty() {
        return Err("empty Host header");
    }
    let default = if app.scheme == "https" { ":443" } else { ":80" };
    let host = host.strip_suffix(default).unwrap_or(&host);
    Ok(format!("{}://{host}{path}", app.scheme))
}

fn verify_reason(e: &VerifyError) -> &'static str {
    match e {
        VerifyError::MissingHeader(_) => "missing_header",
        VerifyError::MissingComponent(_) => "missing_component",
        VerifyError::KeyIdMismatch { .. } => "unknown_key",
        VerifyError::CreatedOutOfWindow { .. } => "created_out_of_window",
        VerifyError::BadDigest => "bad_digest",
        VerifyError::BadSignature => "bad_signature",
        VerifyError::Malformed { .. }
        | VerifyError::WrongLabel { .. }
        | VerifyError::UnexpectedComponent(_)
        | VerifyError::DuplicateComponent(_)
        | VerifyError::UnexpectedParameter(_)
        | VerifyError::MissingParameter(_)
        | VerifyError::WrongAlgorithm(_)
        | VerifyError::WrongTag(_)
        | VerifyError::BadComponent { .. }
        | VerifyError::NoSha256Digest => "malformed_signature",
    }
}

async fn heartbeat<S: Store, B>(app: &App<S>, parts: Parts, body: B) -> Resp
where
    B: Body<Data = Bytes> + Send,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let m = &app.metrics;
    let refuse = |status: StatusCode, reason: &'static str, msg: &str| {
        m.reject(reason);
        debug!(reason, error = msg, "heartbeat refused");
        error(status, msg, reason, json!({}))
    };
    // A body declared (Content-Length) over the limit is refused before a byte of it is
    // read. Reading would only end at the limit, or at BODY_TIMEOUT for a client that
    // never sends it, holding a connection slot that counts as busy (never evicted) all
    // that time.
    if usize::try_from(body.size_hint().lower()).map_or(true, |n| n > MAX_BODY) {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "heartbeat body over 1 MiB",
        );
    }
    let bytes =
        match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) if e.is::<LengthLimitError>() => {
                return refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "heartbeat body over 1 MiB",
                );
            }
            Ok(Err(e)) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    &format!("reading the body: {e}"),
                );
            }
            Err(_) => {
                return refuse(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    "the body took too long",
                );
            }
        };
    let started = Instant::now();
    let received_at = SystemTime::now();
    let parsed = match body::parse(&bytes) {
        Ok(p) => p,
        Err(e @ BodyError::Version(_)) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "unsupported_version",
                &e.to_string(),
            );
        }
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "bad_body", &e.to_string()),
    };
    let signature_input = header(&parts.headers, "signature-input");
    // Read before the key lookup (a caching store needs the keyid), refused after it, so
    // an unknown host is still told so first.
    let key_id = signature_input.as_deref().map(sign::signature_key_id);
    let want = match &key_id {
        Some(Ok(k)) => Some(k.as_str()),
        _ => None,
    };
    let keys = match app.store.keys(&parsed.host_id, want).await {
        Ok(k) => k,
        Err(e) => return store_unavailable(app, &e),
    };
    if keys.is_empty() {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "unknown_host",
            &format!("host {:?} is not enrolled", parsed.host_id),
        );
    }
    let (Some(input), Some(key_id)) = (signature_input.as_deref(), key_id) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "missing_header",
            "missing Signature-Input header",
        );
    };
    let key_id = match key_id {
        Ok(k) => k,
        Err(e) => return refuse(StatusCode::UNAUTHORIZED, verify_reason(&e), &e.to_string()),
    };
    let Some(key) = keys.iter().find(|k| k.info().key_id == key_id) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "unknown_key",
            &format!(
                "key {key_id:?} is not enrolled for host {:?}",
                parsed.host_id
            ),
        );
    };
    let target = match target_uri(app, &parts) {
        Ok(t) => t,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, "bad_target", why),
    };
    let (content_type, content_digest, signature) = (
        header(&parts.headers, CONTENT_TYPE.as_str()),
        header(&parts.headers, "content-digest"),
        header(&parts.headers, "signature"),
    );
    let req = Received {
        method: parts.method.as_str(),
        target_uri: &target,
        content_type: content_type.as_deref(),
        content_digest: content_digest.as_deref(),
        signature_input: Some(input),
        signature: signature.as_deref(),
        body: &bytes,
    };
    let now = received_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let t = Instant::now();
    let verified = match sign::prepare(key, &req, now, app.max_skew) {
        Ok((signed, rest)) => {
            let ok = app
                .verifier
                .verify(*key.verifying_key(), signed.message, signed.signature)
                .await;
            rest.finish(ok)
        }
        Err(e) => Err(e),
    };
    m.verify.observe(t.elapsed().as_secs_f64());
    if let Err(e) = verified {
        let reason = verify_reason(&e);
        if matches!(reason, "bad_signature" | "created_out_of_window") {
            // Worth seeing in the log: a wrong key, a proxy rewriting the URI, a bad clock.
            warn!(host_id = %parsed.host_id, %key_id, reason, target_uri = %target, error = %e, "heartbeat signature refused");
        }
        return refuse(StatusCode::UNAUTHORIZED, reason, &e.to_string());
    }
    let seq = parsed.seq;
    let host_id = parsed.host_id.clone();
    let incoming = Incoming {
        host_id: parsed.host_id,
        seq,
        key_id: key_id.clone(),
        received_at_ms: epoch_ms(received_at),
        // A copy of exactly the body: the collected `Bytes` may be a slice of hyper's
        // read buffer, and the store keeps each host's latest body for as long as the
        // host lives; without the copy every host would pin a whole buffer.
        body: Bytes::copy_from_slice(&bytes),
        summary: parsed.summary,
    };
    match app.store.accept(incoming).await {
        Ok(AcceptOutcome::Accepted) => {
            m.accepted.inc();
            m.accept.observe(started.elapsed().as_secs_f64());
            json_resp(StatusCode::OK, &json!({ "seq": seq }))
        }
        Ok(AcceptOutcome::Stale { last_seq }) => {
            m.reject("stale_seq");
            error(
                StatusCode::CONFLICT,
                &format!("seq {seq} is not above the last accepted {last_seq}"),
                "stale_seq",
                json!({ "last_seq": last_seq }),
            )
        }
        Ok(AcceptOutcome::Revoked) => {
            // Revoked while this request was verified: tell which refusal it now is.
            let reason = match app.store.keys(&host_id, None).await {
                Ok(k) if k.is_empty() => "unknown_host",
                _ => "unknown_key",
            };
            refuse(
                StatusCode::UNAUTHORIZED,
                reason,
                &format!("key {key_id:?} of host {host_id:?} is no longer enrolled"),
            )
        }
        // A value the store cannot hold (a seq above 2^63-1 in PostgreSQL): retrying the
        // same heartbeat cannot succeed, so it is the client's error, not a 503.
        Err(StoreError::Invalid(e)) => refuse(StatusCode::BAD_REQUEST, "bad_body", &e),
        Err(e) => store_unavailable(app, &e),
    }
}

/// One host as `/v1/hosts` shows it.
#[derive(Serialize)]
struct HostJson<'a> {
    host_id: &'a str,
    state: HostState,
    reported_state: Option<HostState>,
    last_seen: Option<String>,
    seq: Option<u64>,
    key_ids: Vec<&'a str>,
    last_heartbeat: Option<Box<RawValue>>,
}

fn host_json<'a>(h: &'a HostView, now_ms: u64, overdue_after: Duration) -> HostJson<'a> {
    let last = h.last.as_ref();
    HostJson {
        host_id: &h.host_id,
        state: h.derived_state(now_ms, overdue_after),
        reported_state: last.map(|l| l.summary.state),
        last_seen: last.map(|l| {
            crate::lifecycle::rfc3339(
                SystemTime::UNIX_EPOCH + Duration::from_millis(l.received_at_ms),
            )
        }),
        seq: last.map(|l| l.seq),
        key_ids: h
            .keys
            .iter()
            .map(|k| k.key.info().key_id.as_str())
            .collect(),
        // Stored bodies parsed as JSON at receipt; a body that somehow does not is shown
        // as null rather than failing the whole answer.
        last_heartbeat: last.and_then(|l| {
            String::from_utf8(l.body.to_vec())
                .ok()
                .and_then(|s| RawValue::from_string(s).ok())
        }),
    }
}

/// The `/v1/hosts` JSON array of `list` (also what `vigil control hosts --json` prints).
pub fn hosts_body(list: &[HostView], now_ms: u64, overdue_after: Duration) -> Vec<u8> {
    let out: Vec<HostJson<'_>> = list
        .iter()
        .map(|h| host_json(h, now_ms, overdue_after))
        .collect();
    let mut b = serde_json::to_vec(&out).unwrap_or_default();
    b.push(b'\n');
    b
}

/// Parses the `/v1/hosts` query.
///
/// # Errors
/// A message naming the bad parameter.
pub fn parse_query(
    query: Option<&str>,
    now_ms: u64,
    overdue_after: Duration,
) -> Result<(HostFilter, Page), String> {
    let mut f = HostFilter {
        now_ms,
        overdue_after,
        ..HostFilter::default()
    };
    let mut page = Page {
        limit: DEFAULT_LIMIT,
        after: None,
    };
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let glob =
            |v: &str| glob::Pattern::new(v).map_err(|e| format!("{k}: invalid GLOB {v:?}: {e}"));
        match &*k {
            "state" => {
                f.state = Some(
                    serde_json::from_value(json!(v))
                        .map_err(|_| format!("state: unknown state {v:?}"))?,
                );
            }
            "kernel" => f.kernel = Some(glob(&v)?),
            "image" => f.image = Some(glob(&v)?),
            "check_status" => {
                f.check_status = Some(body::status_bit(&v).ok_or_else(|| {
                    format!("check_status: expected ok, warning, critical or unknown, not {v:?}")
                })?);
            }
            "limit" => {
                page.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| format!("limit: expected 1 to {MAX_LIMIT}, not {v:?}"))?;
            }
            "after" => page.after = Some(v.into_owned()),
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    Ok((f, page))
}

async fn hosts<S: Store>(app: &App<S>, query: Option<&str>) -> Resp {
    let now_ms = epoch_ms(SystemTime::now());
    let (filter, page) = match parse_query(query, now_ms, app.overdue_after) {
        Ok(x) => x,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e, "bad_query", json!({})),
    };
    match app.store.hosts(&filter, &page).await {
        Ok(list) => respond(
            StatusCode::OK,
            "application/json",
            hosts_body(&list, now_ms, app.overdue_after),
        ),
        Err(e) => {
            log_store_error(&e);
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the store is not available",
                "store_error",
                json!({}),
            )
        }
    }
}

async fn host<S: Store>(app: &App<S>, id: &str) -> Resp {
    if body::valid_host_id(id).is_err() {
        return not_found();
    }
    match app.store.host(id).await {
        Ok(Some(h)) => json_resp(
            StatusCode::OK,
            &host_json(&h, epoch_ms(SystemTime::now()), app.overdue_after),
        ),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            &format!("host {id:?} is not enrolled"),
            "not_enrolled",
            json!({}),
        ),
        Err(e) => {
            log_store_error(&e);
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the store is not available",
                "store_error",
                json!({}),
            )
        }
    }
}
