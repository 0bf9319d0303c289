//! Routing and handlers: `match (method, path)` over the cached snapshot.
//!
//! Handlers never run a check; they read the newest [`Snapshot`]. `HEAD` and `OPTIONS`
//! answer the status `GET` would, without a body (HAProxy's `option httpchk OPTIONS /primary`
//! relies on that). Mutating endpoints exist only on the admin socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::{info, warn};

use super::metrics;
use super::routing::{self, Want};
use crate::checks::Status;
use crate::heartbeat::delivery::{self, StatusView};
use crate::lifecycle::{self, HostState, Lifecycle, LifecycleError};
use crate::remediation::{Event, ManualError, View, audit};
use crate::state::{CheckView, Shared, Snapshot};

/// What a listener lets its peers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The TCP listener: reads only.
    ReadOnly,
    /// The admin socket, peer verified: reads and the mutating endpoints.
    Admin,
}

/// Everything handlers need.
pub struct ApiState {
    /// The published state.
    pub shared: Arc<Shared>,
    /// Where the lifecycle is persisted.
    pub state_dir: PathBuf,
    /// Heartbeat delivery, for `/health` and `/metrics`.
    pub heartbeat: Arc<delivery::Status>,
    /// The remediation engine (`None` in tests of the read endpoints alone).
    pub remediation: Option<crate::remediation::Engine>,
}

/// The response type of every handler.
pub type Resp = Response<Full<Bytes>>;

const ALLOWED_READ: &str = "GET, HEAD, OPTIONS";

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A 200 JSON answer.
pub fn json_ok(v: &Value) -> Resp {
    json_resp(StatusCode::OK, v)
}

fn json_resp(status: StatusCode, v: &Value) -> Resp {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

/// An error answer: `{"error": ..., "reason": ...}` plus any extra keys.
pub fn error(status: StatusCode, message: &str, reason: &str, extra: Value) -> Resp {
    let mut v = json!({ "error": message, "reason": reason });
    if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    json_resp(status, &v)
}

/// Answers one request. `body` is the request body (read by the caller, bounded).
pub fn handle(
    api: &ApiState,
    access: Access,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Resp {
    let read = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !read {
        if access == Access::Admin && *method == Method::POST {
            return handle_post(api, path, body);
        }
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
            "method",
            json!({}),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(ALLOWED_READ));
        return r;
    }
    let snap = api.shared.load();
    let mut resp = if path == "/remediations" {
        remediations(api, access)
    } else {
        let automation = api.remediation.as_ref().map(|e| e.view());
        handle_get(&snap, &api.heartbeat, automation.as_ref(), path, query)
    };
    if *method != Method::GET {
        *resp.body_mut() = Full::new(Bytes::new());
    }
    resp
}

fn handle_get(
    snap: &Snapshot,
    heartbeat: &delivery::Status,
    automation: Option<&View>,
    path: &str,
    query: Option<&str>,
) -> Resp {
    let now = Instant::now();
    match path {
        "/primary" | "/" | "/master" | "/read-write" => {
            routing::answer(snap, Want::Primary, query, now)
        }
        "/replica" => routing::answer(snap, Want::Replica, query, now),
        "/read-only" => routing::answer(snap, Want::ReadOnly, query, now),
        "/health" => health(snap, &heartbeat.view(), automation, now),
        "/health/live" | "/liveness" => liveness(snap, now),
        "/heartbeat" => json_resp(StatusCode::OK, &heartbeat_json(&heartbeat.view())),
        "/checks" => {
            let v: Vec<Value> = snap.checks.iter().map(|c| check_json(c)).collect();
            json_resp(StatusCode::OK, &Value::Array(v))
        }
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::render(snap, &heartbeat.view(), automation),
        ),
        p => match p.strip_prefix("/checks/").and_then(|n| snap.check(n)) {
            Some(c) => json_resp(StatusCode::OK, &check_json(c)),
            None if p.starts_with("/checks/") => error(
                StatusCode::NOT_FOUND,
                "no such check",
                "not_found",
                json!({}),
            ),
            None => error(
                StatusCode::NOT_FOUND,
                "no such endpoint",
                "not_found",
                json!({ "path": p }),
            ),
        },
    }
}

fn rfc3339(t: Option<SystemTime>) -> Value {
    t.map_or(Value::Null, |t| Value::String(lifecycle::rfc3339(t)))
}

/// One check as `/checks` and `vigil check --json` show it.
pub fn check_json(c: &CheckView) -> Value {
    json!({
        "name": c.name,
        "kind": c.kind,
        "status": c.status,
        "tripped": c.hysteresis.tripped,
        "value": c.value,
        "unit": c.unit.as_str(),
        "message": c.message,
        "since": rfc3339(c.since),
        "sampled_at": rfc3339(c.sampled_at),
        "streak": c.hysteresis.streak,
    })
}

/// The `automation` block of `/health`.
pub fn automation_json(v: Option<&View>) -> Value {
    match v {
        Some(v) => json!({
            "paused": v.paused,
            "reason": v.reason,
            "until": rfc3339(v.until),
            "escalated": v.escalated,
        }),
        None => json!({ "paused": false, "reason": null, "until": null, "escalated": [] }),
    }
}

/// `GET /remediations`: the audit records, newest first; stdout/stderr on the admin socket
/// only.
fn remediations(api: &ApiState, access: Access) -> Resp {
    let records = api
        .remediation
        .as_ref()
        .map(|e| e.records(audit::RECENT_MAX, access == Access::Admin))
        .unwrap_or_default();
    json_resp(StatusCode::OK, &Value::Array(records))
}

/// The `/health` document (also what `vigil status` prints).
pub fn health_json(
    snap: &Snapshot,
    heartbeat: &StatusView,
    automation: Option<&View>,
    now: Instant,
) -> Value {
    let mut counts = serde_json::Map::new();
    for s in [
        Status::Ok,
        Status::Warning,
        Status::Critical,
        Status::Unknown,
    ] {
        let n = snap
            .checks
            .iter()
            .filter(|c| c.sampled_at.is_some() && c.status == s)
            .count();
        counts.insert(s.as_str().into(), json!(n));
    }
    let tripped: Vec<&str> = snap
        .checks
        .iter()
        .filter(|c| c.hysteresis.tripped)
        .map(|c| c.name.as_str())
        .collect();
    json!({
        "state": snap.state(),
        "health": snap.health(),
        "lifecycle": snap.lifecycle.state,
        "counts": counts,
        "tripped": tripped,
        "stale": !snap.stale(now).is_empty(),
        "automation": automation_json(automation),
        "heartbeat": {
            "last_success": rfc3339(heartbeat.last_success),
            "spooled": heartbeat.spooled + heartbeat.pending,
            "rejected": heartbeat.rejected,
        },
        "config_error": snap.config_error,
        "state_writes": state_writes_json(),
    })
}

/// Writes under `state_dir` (lifecycle, cooldowns, audit log, sequence, spool): failures
/// since start and the files whose latest write failed, with the error (a full or
/// read-only state directory shows here, not only in the log).
fn state_writes_json() -> Value {
    let (failures, failing) = crate::durable::write_failures();
    json!({ "failures": failures, "failing": failing })
}

/// `GET /heartbeat`: delivery in detail (`/health` carries the contract's three keys).
pub fn heartbeat_json(hb: &StatusView) -> Value {
    json!({
        "enabled": hb.enabled,
        "last_success": rfc3339(hb.last_success),
        "spooled": hb.spooled + hb.pending,
        "spool_bytes": hb.spool_bytes,
        "rejected": hb.rejected,
        "error": hb.error,
        "seq": hb.seq,
        "sent_total": hb.sent_total,
        "duplicate_total": hb.duplicate_total,
        "failures": hb.failures,
        "dropped": hb.dropped,
    })
}

fn health(
    snap: &Snapshot,
    heartbeat: &StatusView,
    automation: Option<&View>,
    now: Instant,
) -> Resp {
    let mut v = health_json(snap, heartbeat, automation, now);
    let stale = snap.stale(now);
    let (code, reason, message) = if !snap.first_round_done {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("starting".to_string()),
            "the first round of checks has not finished".to_string(),
        )
    } else if !stale.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("stale".into()),
            format!("samples are stale: {}", stale.join(", ")),
        )
    } else if snap.state() != HostState::Available {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(snap.state().as_str().to_string()),
            format!("host is {}", snap.state()),
        )
    } else {
        (StatusCode::OK, None, String::new())
    };
    if let (Some(reason), Some(obj)) = (reason, v.as_object_mut()) {
        obj.insert("error".into(), json!(message));
        obj.insert("reason".into(), json!(reason));
    }
    json_resp(code, &v)
}

fn liveness(snap: &Snapshot, now: Instant) -> Resp {
    if snap.is_live(now) {
        json_resp(StatusCode::OK, &json!({ "live": true }))
    } else {
        let overdue: Vec<&str> = snap
            .checks
            .iter()
            .filter(|c| c.is_overdue(now))
            .map(|c| c.name.as_str())
            .collect();
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the scheduler is not making progress",
            "overdue",
            json!({ "live": false, "overdue": overdue }),
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LifecycleRequest {
    state: String,
    reason: String,
}

fn handle_post(api: &ApiState, path: &str, body: &[u8]) -> Resp {
    match path {
        "/lifecycle" => set_lifecycle(api, body),
        "/automation/pause" => pause(api, body),
        "/automation/resume" => resume(api, body),
        _ => error(
            StatusCode::NOT_FOUND,
            "no such endpoint",
            "not_found",
            json!({ "path": path }),
        ),
    }
}

fn bad_request(msg: &str) -> Resp {
    error(StatusCode::BAD_REQUEST, msg, "bad_request", json!({}))
}

fn no_engine() -> Resp {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "remediation is not running",
        "unavailable",
        json!({}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseRequest {
    reason: String,
    #[serde(default, rename = "for")]
    for_: Option<String>,
}

fn pause(api: &ApiState, body: &[u8]) -> Resp {
    let req: PauseRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return bad_request(&format!("invalid body: {e}")),
    };
    if req.reason.trim().is_empty() {
        return bad_request("a reason is required");
    }
    let duration = match req
        .for_
        .as_deref()
        .map(crate::config::types::parse_duration)
    {
        None => None,
        Some(Ok(d)) if !d.get().is_zero() => Some(d.get()),
        Some(Ok(_)) => return bad_request("`for` must be greater than zero"),
        Some(Err(e)) => return bad_request(&e),
    };
    let Some(engine) = api.remediation.as_ref() else {
        return no_engine();
    };
    match engine.pause(&req.reason, duration) {
        Ok(v) => json_ok(&automation_json(Some(&v))),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("pause not persisted: {e}"),
            "persist",
            json!({}),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeRequest {
    #[serde(default)]
    reason: Option<String>,
}

fn resume(api: &ApiState, body: &[u8]) -> Resp {
    // An empty body is a resume without a reason.
    let req: ResumeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ResumeRequest { reason: None }
    } else {
        match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return bad_request(&format!("invalid body: {e}")),
        }
    };
    let Some(engine) = api.remediation.as_ref() else {
        return no_engine();
    };
    match engine.resume(req.reason.as_deref().unwrap_or("resumed by an operator")) {
        Ok(v) => json_ok(&automation_json(Some(&v))),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("resume not persisted: {e}"),
            "persist",
            json!({}),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunRequest {
    /// Only in `POST /remediate`; the contract's path names it.
    #[serde(default)]
    name: Option<String>,
    reason: String,
    #[serde(default)]
    dry_run: bool,
}

/// Whether `path` is a manual run, which waits for the outcome (async, see [`run`]).
pub fn is_run_path(path: &str) -> bool {
    path == "/remediate"
        || path
            .strip_prefix("/remediations/")
            .and_then(|r| r.strip_suffix("/run"))
            .is_some_and(|n| !n.is_empty() && !n.contains('/'))
}

/// `POST /remediations/NAME/run` `{"reason","dry_run"}` (also `POST /remediate`
/// `{"name","reason","dry_run"}`): runs one remediation through every guardrail and
/// answers with its final audit record: 200 when it ran (or a requested dry run passed),
/// 423 when a guardrail refused it, 404 for an unknown name.
pub async fn run(api: &ApiState, path: &str, body: &[u8]) -> Resp {
    let req: RunRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return bad_request(&format!("invalid body: {e}")),
    };
    let name = match (path, req.name) {
        ("/remediate", Some(n)) => n,
        ("/remediate", None) => return bad_request("`name` is required"),
        (_, Some(_)) => return bad_request("`name` is given by the path"),
        (p, None) => p
            .trim_start_matches("/remediations/")
            .trim_end_matches("/run")
            .to_string(),
    };
    if req.reason.trim().is_empty() {
        return bad_request("a reason is required");
    }
    let Some(engine) = api.remediation.as_ref() else {
        return no_engine();
    };
    match engine.run_manual(&name, &req.reason, req.dry_run).await {
        Ok(rec) => {
            let v = serde_json::to_value(&rec).unwrap_or(Value::Null);
            let refused = match rec.event {
                Event::Refused => true,
                // A requested dry run that passed every guardrail is what was asked for.
                Event::Skipped => {
                    !(req.dry_run
                        && rec
                            .reason
                            .as_deref()
                            .is_some_and(|r| r.starts_with("dry_run")))
                }
                _ => false,
            };
            if refused {
                error(
                    StatusCode::LOCKED,
                    &format!(
                        "refused by a guardrail: {}",
                        rec.reason.as_deref().unwrap_or("")
                    ),
                    rec.reason.as_deref().unwrap_or("refused"),
                    json!({ "record": v }),
                )
            } else {
                json_ok(&v)
            }
        }
        Err(ManualError::Unknown) => error(
            StatusCode::NOT_FOUND,
            &format!("no remediation named {name:?}"),
            "not_found",
            json!({}),
        ),
        Err(ManualError::Stopped) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is stopping",
            "stopping",
            json!({}),
        ),
    }
}

fn set_lifecycle(api: &ApiState, body: &[u8]) -> Resp {
    let req: LifecycleRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("invalid body: {e}"),
                "bad_request",
                json!({}),
            );
        }
    };
    if req.reason.trim().is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "a reason is required",
            "bad_request",
            json!({}),
        );
    }
    let to: Lifecycle = match req.state.parse() {
        Ok(l) => l,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e, "bad_request", json!({})),
    };
    // Under the writer lock, so two concurrent requests cannot both pass the table check
    // against the same old state.
    let result = api.shared.update(|s| {
        let from = s.lifecycle.state;
        lifecycle::transition(&api.state_dir, from, to, &req.reason).map(|rec| {
            s.lifecycle = rec.clone();
            (from, rec)
        })
    });
    match result {
        Ok((from, rec)) => {
            info!(from = %from, to = %rec.state, reason = %rec.reason, "lifecycle changed");
            json_resp(
                StatusCode::OK,
                &json!({ "state": rec.state, "previous": from, "reason": rec.reason, "changed_at": rec.changed_at }),
            )
        }
        Err(LifecycleError::Illegal { from, to }) => {
            let legal: Vec<&str> = from.legal_next().iter().map(|l| l.as_str()).collect();
            error(
                StatusCode::CONFLICT,
                &format!("illegal transition from {from} to {to}"),
                "illegal_transition",
                json!({ "from": from, "to": to, "legal": legal }),
            )
        }
        Err(e) => {
            warn!(error = %e, "lifecycle change not persisted");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &e.to_string(),
                "persist",
                json!({}),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::checks::Unit;
    use crate::lifecycle::LifecycleRecord;
    use crate::state::Hysteresis;

    fn view(name: &str, status: Status, age: Duration) -> Arc<CheckView> {
        let mut v = CheckView::pending(
            name,
            "disk",
            Unit::Ratio,
            Duration::from_secs(1),
            Duration::from_secs(1),
            false,
            Hysteresis::new(1, 1),
        );
        v.hysteresis.observe(status);
        v.status = status;
        v.sampled_at = Some(SystemTime::now() - age);
        v.sampled_mono = Some(Instant::now() - age);
        Arc::new(v)
    }

    fn api(checks: Vec<Arc<CheckView>>, lifecycle: Lifecycle) -> (ApiState, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let snap = Snapshot {
            checks,
            lifecycle: LifecycleRecord {
                v: 1,
                state: lifecycle,
                reason: String::new(),
                changed_at: String::new(),
            },
            config_error: None,
            first_round_done: true,
        };
        (
            ApiState {
                shared: Arc::new(Shared::new(snap)),
                state_dir: dir.path().to_path_buf(),
                heartbeat: Arc::new(delivery::Status::new(false)),
                remediation: None,
            },
            dir,
        )
    }

    fn get(api: &ApiState, path: &str) -> (StatusCode, Value) {
        let r = handle(api, Access::ReadOnly, &Method::GET, path, None, b"");
        let code = r.status();
        let body = futures_body(r);
        (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    fn futures_body(r: Resp) -> Bytes {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(r.into_body().collect()).unwrap().to_bytes()
    }

    #[test]
    fn fresh_ok_samples_are_available() {
        let (api, _d) = api(
            vec![view("a", Status::Ok, Duration::ZERO)],
            Lifecycle::Available,
        );
        let (code, v) = get(&api, "/health");
        assert_eq!(code, StatusCode::OK);
        assert_eq!(v["state"], "available");
        assert_eq!(v["stale"], false);
    }

    #[test]
    fn samples_older_than_three_intervals_are_503_stale() {
        let (api, _d) = api(
            vec![view("a", Status::Ok, Duration::from_secs(4))],
            Lifecycle::Available,
        );
        let (code, v) = get(&api, "/health");
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["reason"], "stale");
        assert_eq!(v["stale"], true);
        // /checks still answers and shows the sample time.
        let (code, v) = get(&api, "/checks");
        assert_eq!(code, StatusCode::OK);
        assert!(v[0]["sampled_at"].is_string());
    }

    #[test]
    fn tripped_critical_is_unavailable_and_lifecycle_wins_over_health() {
        let (api1, _d) = api(
            vec![view("a", Status::Critical, Duration::ZERO)],
            Lifecycle::Available,
        );
        let (code, v) = get(&api1, "/health");
        assert_eq!(
            (code, v["state"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable"))
        );
        assert_eq!(v["tripped"], json!(["a"]));
        let (api2, _d) = api(
            vec![view("a", Status::Ok, Duration::ZERO)],
            Lifecycle::Retiring,
        );
        let (code, v) = get(&api2, "/health");
        assert_eq!(
            (code, v["state"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("retiring"))
        );
        assert_eq!(v["health"], "available");
    }

    #[test]
    fn head_and_options_give_the_status_alone_and_writes_are_405() {
        let (api, _d) = api(
            vec![view("a", Status::Critical, Duration::ZERO)],
            Lifecycle::Available,
        );
        for m in [Method::HEAD, Method::OPTIONS] {
            let r = handle(&api, Access::ReadOnly, &m, "/health", None, b"");
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert!(futures_body(r).is_empty());
        }
        let r = handle(
            &api,
            Access::ReadOnly,
            &Method::POST,
            "/lifecycle",
            None,
            br#"{"state":"retiring","reason":"x"}"#,
        );
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[ALLOW], ALLOWED_READ);
    }

    #[test]
    fn lifecycle_posts_follow_the_table() {
        let (api, _d) = api(vec![], Lifecycle::Available);
        let post = |body: &str| {
            let r = handle(
                &api,
                Access::Admin,
                &Method::POST,
                "/lifecycle",
                None,
                body.as_bytes(),
            );
            let code = r.status();
            (
                code,
                serde_json::from_slice::<Value>(&futures_body(r)).unwrap(),
            )
        };
        assert_eq!(
            post(r#"{"state":"retiring","reason":"drain"}"#).0,
            StatusCode::OK
        );
        let (code, v) = post(r#"{"state":"upgrading","reason":"x"}"#);
        assert_eq!(code, StatusCode::CONFLICT);
        assert_eq!(v["legal"], json!(["retired", "available"]));
        assert_eq!(
            post(r#"{"state":"archived","reason":"x"}"#).0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(post(r#"{"state":"available"}"#).0, StatusCode::BAD_REQUEST);
        assert_eq!(post("not json").0, StatusCode::BAD_REQUEST);
        assert_eq!(api.shared.load().lifecycle.state, Lifecycle::Retiring);
    }

    #[test]
    fn unknown_paths_and_checks_are_json_404() {
        let (api, _d) = api(
            vec![view("a", Status::Ok, Duration::ZERO)],
            Lifecycle::Available,
        );
        assert_eq!(get(&api, "/checks/a").0, StatusCode::OK);
        let (code, v) = get(&api, "/checks/nope");
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert!(v["error"].is_string() && v["reason"].is_string());
        assert_eq!(get(&api, "/nope").0, StatusCode::NOT_FOUND);
    }
}
