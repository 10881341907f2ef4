//! Request handling: routing, blocking reads, writes (catalog and local agent), ACL and
//! leadership checks, failure injection, and the `/_double/` control API.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::Serialize;

use super::agent::AgentError;
use super::{
    ConsulDoubleRef, DEFAULT_WAIT, JITTER_FRACTION, MAX_WAIT, REQUEST_LOG_CAP, RecordedRequest,
    Shared, lock,
};
use crate::duration::parse_go_duration;
use crate::state::{State, WriteError};
use crate::wire::{AgentServiceRegistration, DeregisterRequest, RegisterRequest};

type Body = Full<Bytes>;

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(msg.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Parsed query string; repeated keys keep every value (`tag=a&tag=b`).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Self {
        Self(
            form_urlencoded::parse(raw.as_bytes())
                .into_owned()
                .collect(),
        )
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }
    fn flag(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| v != "false" && v != "0")
    }
}

/// A request refused before it touched the catalog: the status and message to answer.
type Refusal = (StatusCode, String);

enum Access {
    Full,
    Anonymous,
}

impl Shared {
    pub(super) async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let query = Query::parse(req.uri().query().unwrap_or(""));
        if let Some(control) = path.strip_prefix("/_double/") {
            return self.control(control, &query);
        }
        let token = req
            .headers()
            .get("x-consul-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| {
                req.headers()
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::to_owned)
            })
            .or_else(|| query.get("token").map(str::to_owned));
        {
            let mut log = lock(&self.requests);
            if log.len() >= REQUEST_LOG_CAP {
                log.pop_front();
            }
            log.push_back(RecordedRequest {
                method: req.method().to_string(),
                path: path.clone(),
                query: req.uri().query().unwrap_or("").to_owned(),
                token: token.clone(),
                at: Instant::now(),
            });
        }
        let mut hang = self.hang.subscribe();
        while *hang.borrow_and_update() {
            if hang.changed().await.is_err() {
                break;
            }
        }
        {
            let mut c = lock(&self.controls);
            if c.fail_next > 0 {
                c.fail_next -= 1;
                return text(c.fail_status, "injected failure (trellis-consul-double)");
            }
        }
        let access = match (&self.config.acl_token, token) {
            (None, _) => Access::Full,
            (Some(required), Some(t)) if *required == t => Access::Full,
            (Some(_), Some(_)) => return text(StatusCode::FORBIDDEN, "ACL not found"),
            (Some(_), None) => Access::Anonymous,
        };
        if query.get("filter").is_some() {
            return text(
                StatusCode::BAD_REQUEST,
                "trellis-consul-double does not implement the filter parameter",
            );
        }
        if let Some(dc) = query.get("dc")
            && !dc.is_empty()
            && dc != self.config.datacenter
        {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter");
        }
        let ns = query.get("ns").unwrap_or("").to_owned();
        let method = req.method().clone();
        match (method, path.as_str()) {
            (Method::GET, "/v1/catalog/services") => {
                self.read(&query, access, "{}", move |s| {
                    let (v, i) = s.catalog_services(&ns);
                    (json(&v), i)
                })
                .await
            }
            (Method::GET, p) if p.starts_with("/v1/health/service/") => {
                let name = percent_decode(&p["/v1/health/service/".len()..]);
                let passing = query.flag("passing");
                let tags = query.all("tag");
                self.read(&query, access, "[]", move |s| {
                    let (v, i) = s.health_service(&ns, &name, passing, &tags);
                    (json(&v), i)
                })
                .await
            }
            (Method::GET, "/v1/status/leader") => {
                let known = lock(&self.controls).leader_known;
                text(
                    StatusCode::OK,
                    if known { "\"127.0.0.1:8300\"" } else { "\"\"" },
                )
            }
            (Method::PUT, "/v1/catalog/register") => {
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                self.http_write(access, body, |s, r: RegisterRequest| s.register(&r))
            }
            (Method::PUT, "/v1/catalog/deregister") => {
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                self.http_write(access, body, |s, r: DeregisterRequest| s.deregister(&r))
            }
            (Method::PUT, "/v1/agent/service/register") => {
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let replace = query.flag("replace-existing-checks");
                match self.parse_write::<AgentServiceRegistration>(access, body, false) {
                    Ok(reg) => agent_reply(self.agent_register(&reg, replace)),
                    Err((status, message)) => text(status, message),
                }
            }
            (Method::PUT, p) if p.starts_with("/v1/agent/service/deregister/") => {
                let id = percent_decode(&p["/v1/agent/service/deregister/".len()..]);
                match self.write_allowed(access, false) {
                    Ok(()) => agent_reply(self.agent_deregister(&id, &ns)),
                    Err((status, message)) => text(status, message),
                }
            }
            (Method::PUT, p) if p.starts_with("/v1/agent/check/") => {
                let rest = &p["/v1/agent/check/".len()..];
                let (verb, id) = rest.split_once('/').unwrap_or((rest, ""));
                let status = match verb {
                    "pass" => "passing",
                    "warn" => "warning",
                    "fail" => "critical",
                    _ => return text(StatusCode::NOT_FOUND, ""),
                };
                let id = percent_decode(id);
                let note = query.get("note").unwrap_or("").to_owned();
                match self.write_allowed(access, false) {
                    Ok(()) => agent_reply(self.agent_check_update(&id, status, &note)),
                    Err((status, message)) => text(status, message),
                }
            }
            (
                _,
                "/v1/catalog/register"
                | "/v1/catalog/deregister"
                | "/v1/catalog/services"
                | "/v1/status/leader"
                | "/v1/agent/service/register",
            ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            (_, p)
                if p.starts_with("/v1/agent/service/deregister/")
                    || p.starts_with("/v1/agent/check/") =>
            {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            _ => text(StatusCode::NOT_FOUND, ""),
        }
    }

    /// Whether a write may go ahead: catalog writes need a leader (`needs_leader`); the local
    /// agent takes its writes without one, as Consul's agent does. `Err` is the refusal to send.
    fn write_allowed(&self, access: Access, needs_leader: bool) -> Result<(), Refusal> {
        if needs_leader && !lock(&self.controls).leader_known {
            return Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                "No cluster leader".into(),
            ));
        }
        if matches!(access, Access::Anonymous) {
            return Err((StatusCode::FORBIDDEN, "Permission denied".into()));
        }
        Ok(())
    }

    /// The checks of a write, then its JSON body.
    fn parse_write<T: serde::de::DeserializeOwned>(
        &self,
        access: Access,
        body: Result<Bytes, hyper::Error>,
        needs_leader: bool,
    ) -> Result<T, Refusal> {
        self.write_allowed(access, needs_leader)?;
        let body = body.map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("Request body read failed: {e}"),
            )
        })?;
        serde_json::from_slice(&body).map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: {e}"),
            )
        })
    }

    fn http_write<T: serde::de::DeserializeOwned>(
        &self,
        access: Access,
        body: Result<Bytes, hyper::Error>,
        apply: impl FnOnce(&mut State, T) -> Result<(), WriteError>,
    ) -> Response<Body> {
        let parsed: T = match self.parse_write(access, body, true) {
            Ok(p) => p,
            Err((status, message)) => return text(status, message),
        };
        match self.write(|s| apply(s, parsed)) {
            Ok(()) => {
                let mut r = Response::new(Full::new(Bytes::from_static(b"true")));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            Err(e) => text(StatusCode::BAD_REQUEST, e.0),
        }
    }

    /// A read with Consul's blocking-query semantics: with `index` > 0, hold the request until the
    /// query's index exceeds it or `wait` (capped at 10 min, plus up to wait/16 jitter) passes.
    async fn read(
        &self,
        query: &Query,
        access: Access,
        filtered_body: &'static str,
        run: impl Fn(&State) -> (Bytes, u64),
    ) -> Response<Body> {
        let stale = query.get("stale").is_some();
        if !stale && !lock(&self.controls).leader_known {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "No cluster leader");
        }
        let min_index = match query.get("index").map(str::parse::<u64>) {
            None => 0,
            Some(Ok(i)) => i,
            Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "Invalid index"),
        };
        let wait = match query.get("wait").map(parse_go_duration) {
            None => DEFAULT_WAIT,
            Some(Some(w)) if w.is_zero() => DEFAULT_WAIT,
            Some(Some(w)) => w.min(MAX_WAIT),
            Some(None) => return text(StatusCode::BAD_REQUEST, "Invalid wait time"),
        };
        let jitter_cap = (wait / JITTER_FRACTION).as_nanos() as u64;
        let jitter = Duration::from_nanos(if jitter_cap == 0 {
            0
        } else {
            fastrand::u64(0..jitter_cap)
        });
        let deadline = tokio::time::Instant::now() + wait + jitter;

        let mut changes = self.changes.subscribe();
        let started = *changes.borrow_and_update();
        loop {
            let current = *changes.borrow_and_update();
            let (body, mut index) = run(&lock(&self.state));
            let (zero_index, ignore_blocking) = {
                let c = lock(&self.controls);
                (c.zero_index, c.ignore_blocking)
            };
            if zero_index {
                // The buggy server's index really is 0: a client waiting on 1 blocks until `wait`.
                index = 0;
            }
            let abandoned = current.abandons != started.abandons || ignore_blocking;
            let timed_out = tokio::time::Instant::now() >= deadline;
            if min_index == 0 || index > min_index || abandoned || timed_out {
                return self.respond(body, index, access, filtered_body);
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() {
                    return self.respond(body, index, access, filtered_body);
                },
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    fn respond(
        &self,
        body: Bytes,
        index: u64,
        access: Access,
        filtered_body: &'static str,
    ) -> Response<Body> {
        let c = lock(&self.controls);
        // Consul never reports an index below 1 (its blocking-query code clamps it), unless the
        // zero-index bug is being simulated.
        let index = if c.zero_index { 0 } else { index.max(1) };
        let (body, filtered) = match access {
            Access::Full => (body, false),
            Access::Anonymous => (Bytes::from_static(filtered_body.as_bytes()), true),
        };
        let mut r = Response::new(Full::new(body));
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert("x-consul-index", HeaderValue::from(index));
        h.insert(
            "x-consul-knownleader",
            HeaderValue::from_static(if c.leader_known { "true" } else { "false" }),
        );
        let last_contact = c
            .leader_lost_at
            .map_or(0, |t| t.elapsed().as_millis() as u64);
        h.insert("x-consul-lastcontact", HeaderValue::from(last_contact));
        if filtered {
            h.insert(
                "x-consul-results-filtered-by-acls",
                HeaderValue::from_static("true"),
            );
        }
        r
    }

    /// The double's own test API under `/_double/` (for a double running as a process).
    fn control(self: Arc<Self>, what: &str, q: &Query) -> Response<Body> {
        let num = |k: &str| q.get(k).and_then(|v| v.parse::<u64>().ok());
        let double = ConsulDoubleRef(&self);
        match what {
            "reset-index" => double.reset_index(num("to").unwrap_or(0)),
            "zero-index" => double.report_zero_index(q.flag("on")),
            "ignore-blocking" => {
                lock(&self.controls).ignore_blocking = q.flag("on");
                self.changes.send_modify(|g| g.abandons += 1);
            }
            "leader" => double.set_leader(q.flag("known")),
            "fail" => {
                let mut c = lock(&self.controls);
                c.fail_next = num("count").unwrap_or(1) as u32;
                c.fail_status = num("status")
                    .and_then(|s| StatusCode::from_u16(s as u16).ok())
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            }
            "hang" => {
                self.hang.send_replace(q.flag("on"));
            }
            "check" => {
                let (Some(node), Some(check), Some(status)) =
                    (q.get("node"), q.get("check"), q.get("status"))
                else {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "check needs node, check and status",
                    );
                };
                if let Err(e) = self.write(|s| s.set_check_status(node, check, status)) {
                    return text(StatusCode::BAD_REQUEST, e.0);
                }
            }
            "outage" => {
                let ms = num("ms").unwrap_or(10_000);
                let this = self.clone();
                tokio::spawn(async move {
                    // Let this response go out before the connections are cut.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    this.stop();
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let _ = Shared::restart(&this).await;
                });
            }
            _ => return text(StatusCode::NOT_FOUND, format!("unknown control {what:?}")),
        }
        text(StatusCode::OK, "ok")
    }
}

/// An agent endpoint's answer: 200 with an empty body, as Consul's agent answers.
fn agent_reply(result: Result<(), AgentError>) -> Response<Body> {
    match result {
        Ok(()) => text(StatusCode::OK, ""),
        Err(AgentError::Invalid(e)) => text(StatusCode::BAD_REQUEST, e.0),
        Err(AgentError::NotFound(m)) => text(StatusCode::NOT_FOUND, m),
        Err(AgentError::NotTtl(m)) => text(StatusCode::INTERNAL_SERVER_ERROR, m),
    }
}

fn json<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("catalog types always serialize"))
}

fn percent_decode(s: &str) -> String {
    // form_urlencoded also turns '+' into ' ', which a path must not; protect it first.
    let protected = s.replace('+', "%2B");
    form_urlencoded::parse(format!("x={protected}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}
