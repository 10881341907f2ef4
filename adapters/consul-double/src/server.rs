//! The HTTP side of the double: routing, blocking queries, ACL tokens, leadership, failure
//! injection, and a listener that can be stopped and brought back at the same port.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::duration::parse_go_duration;
use crate::state::{State, WriteError};
use crate::wire::{DeregisterRequest, RegisterRequest};

/// Consul's cap on `wait`.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Consul's `wait` when a blocking query names none.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// Consul adds up to `wait / JITTER_FRACTION` to every blocking wait.
pub const JITTER_FRACTION: u32 = 16;
/// Requests kept in the log for tests to inspect (oldest dropped first).
const REQUEST_LOG_CAP: usize = 50_000;

/// How to start a double.
#[derive(Clone, Debug)]
pub struct DoubleConfig {
    /// Where to listen; port 0 picks a free port (read it back with [`ConsulDouble::addr`]).
    pub listen: SocketAddr,
    pub datacenter: String,
    /// When set, ACLs are on with default-deny: this token may read and write, other tokens get
    /// 403 "ACL not found", requests without a token (anonymous) see empty reads and get 403
    /// "Permission denied" on writes.
    pub acl_token: Option<String>,
}

impl Default for DoubleConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            datacenter: "dc1".to_owned(),
            acl_token: None,
        }
    }
}

/// One request the double received, for tests that check what a client sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The raw query string.
    pub query: String,
    /// The ACL token the request carried (header or `token` parameter). Test tokens only.
    pub token: Option<String>,
    pub at: Instant,
}

impl RecordedRequest {
    /// The decoded value of query parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

#[derive(Debug)]
struct Controls {
    leader_known: bool,
    leader_lost_at: Option<Instant>,
    fail_next: u32,
    fail_status: StatusCode,
    zero_index: bool,
    ignore_blocking: bool,
}

/// What blocked queries wait on: every write bumps `writes`; an index reset bumps `abandons`,
/// which makes every blocked query return at once (Consul abandons its watches on a restore).
#[derive(Clone, Copy, Debug, Default)]
struct Generation {
    writes: u64,
    abandons: u64,
}

#[derive(Debug)]
struct Shared {
    config: DoubleConfig,
    addr: SocketAddr,
    state: Mutex<State>,
    changes: watch::Sender<Generation>,
    controls: Mutex<Controls>,
    hang: watch::Sender<bool>,
    requests: Mutex<VecDeque<RecordedRequest>>,
    running: Mutex<Option<CancellationToken>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running Consul API double. Dropping it stops the listener.
#[derive(Debug)]
pub struct ConsulDouble {
    shared: Arc<Shared>,
}

impl ConsulDouble {
    /// Starts a double on 127.0.0.1 with a free port, no ACLs.
    pub async fn start() -> io::Result<Self> {
        Self::start_with(DoubleConfig::default()).await
    }

    pub async fn start_with(config: DoubleConfig) -> io::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(&config.datacenter)),
            config,
            addr,
            changes: watch::Sender::new(Generation::default()),
            controls: Mutex::new(Controls {
                leader_known: true,
                leader_lost_at: None,
                fail_next: 0,
                fail_status: StatusCode::SERVICE_UNAVAILABLE,
                zero_index: false,
                ignore_blocking: false,
            }),
            hang: watch::Sender::new(false),
            requests: Mutex::new(VecDeque::new()),
            running: Mutex::new(None),
        });
        Shared::serve(&shared, listener);
        Ok(Self { shared })
    }

    /// The listening address (stays the same across [`Self::stop`] / [`Self::restart`]).
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:PORT`, what a client is configured with.
    pub fn http_addr(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Closes the listener and cuts every open connection (in-flight blocking queries included):
    /// new connections are refused until [`Self::restart`]. The catalog is kept.
    pub fn stop(&self) {
        self.shared.stop();
    }

    /// Listens again at the same address, with the same catalog.
    pub async fn restart(&self) -> io::Result<()> {
        Shared::restart(&self.shared).await
    }

    /// Registers as `PUT /v1/catalog/register` does (no ACL or leader checks: this is the test's hand).
    pub fn register(&self, req: &RegisterRequest) -> Result<(), WriteError> {
        self.shared.write(|s| s.register(req))
    }

    pub fn deregister(&self, req: &DeregisterRequest) -> Result<(), WriteError> {
        self.shared.write(|s| s.deregister(req))
    }

    /// Sets a check's status (`passing`, `warning`, `critical`), as a check run would.
    pub fn set_check_status(
        &self,
        node: &str,
        check_id: &str,
        status: &str,
    ) -> Result<(), WriteError> {
        self.shared
            .write(|s| s.set_check_status(node, check_id, status))
    }

    /// Forces every index down to at most `to` (a restore of an older snapshot) and makes every
    /// blocked query return at once with the lowered index.
    pub fn reset_index(&self, to: u64) {
        ConsulDoubleRef(&self.shared).reset_index(to);
    }

    /// While on, responses carry `X-Consul-Index: 0`, the bug the Consul docs warn clients about.
    pub fn report_zero_index(&self, on: bool) {
        ConsulDoubleRef(&self.shared).report_zero_index(on);
    }

    /// While on, blocking queries answer at once with the current index (a misbehaving server or
    /// proxy): clients must rate-limit their loop rather than spin.
    pub fn set_ignore_blocking(&self, on: bool) {
        lock(&self.shared.controls).ignore_blocking = on;
        self.shared.changes.send_modify(|g| g.abandons += 1);
    }

    /// Loses or regains the cluster leader: without one, default-consistency reads and all writes
    /// fail with 500 "No cluster leader"; `?stale` reads answer with `X-Consul-KnownLeader: false`.
    pub fn set_leader(&self, known: bool) {
        ConsulDoubleRef(&self.shared).set_leader(known);
    }

    /// The next `count` API requests fail with `status` (e.g. 503).
    pub fn fail_next(&self, count: u32, status: u16) {
        let mut c = lock(&self.shared.controls);
        c.fail_next = count;
        c.fail_status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    }

    /// While on, API requests are accepted but not answered (a hung server).
    pub fn set_hang(&self, on: bool) {
        self.shared.hang.send_replace(on);
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).iter().cloned().collect()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Service instances in the catalog, all namespaces.
    pub fn instance_count(&self) -> usize {
        lock(&self.shared.state).instance_count()
    }
}

impl Drop for ConsulDouble {
    fn drop(&mut self) {
        self.shared.stop();
    }
}

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

enum Access {
    Full,
    Anonymous,
}

impl Shared {
    fn serve(this: &Arc<Self>, listener: TcpListener) {
        let stop = CancellationToken::new();
        *lock(&this.running) = Some(stop.clone());
        let shared = this.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        // Out of file descriptors or similar: do not spin on accept.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(shared.handle(req).await) }
                    });
                    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
    }

    fn stop(&self) {
        if let Some(token) = lock(&self.running).take() {
            token.cancel();
        }
    }

    async fn restart(this: &Arc<Self>) -> io::Result<()> {
        this.stop();
        let mut attempts = 0;
        let listener = loop {
            match TcpListener::bind(this.addr).await {
                Ok(l) => break l,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempts < 50 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        };
        Self::serve(this, listener);
        Ok(())
    }

    fn write(
        &self,
        f: impl FnOnce(&mut State) -> Result<(), WriteError>,
    ) -> Result<(), WriteError> {
        f(&mut lock(&self.state))?;
        self.changes.send_modify(|g| g.writes += 1);
        Ok(())
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
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
            (
                _,
                "/v1/catalog/register"
                | "/v1/catalog/deregister"
                | "/v1/catalog/services"
                | "/v1/status/leader",
            ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            _ => text(StatusCode::NOT_FOUND, ""),
        }
    }

    fn http_write<T: serde::de::DeserializeOwned>(
        &self,
        access: Access,
        body: Result<Bytes, hyper::Error>,
        apply: impl FnOnce(&mut State, T) -> Result<(), WriteError>,
    ) -> Response<Body> {
        if !lock(&self.controls).leader_known {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "No cluster leader");
        }
        if matches!(access, Access::Anonymous) {
            return text(StatusCode::FORBIDDEN, "Permission denied");
        }
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("Request body read failed: {e}"),
                );
            }
        };
        let parsed: T = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: {e}"),
                );
            }
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

/// Control operations shared by the in-process API and the `/_double/` HTTP API.
struct ConsulDoubleRef<'a>(&'a Shared);

impl ConsulDoubleRef<'_> {
    fn reset_index(&self, to: u64) {
        lock(&self.0.state).reset_index(to);
        self.0.changes.send_modify(|g| g.abandons += 1);
    }
    fn report_zero_index(&self, on: bool) {
        lock(&self.0.controls).zero_index = on;
        self.0.changes.send_modify(|g| g.abandons += 1);
    }
    fn set_leader(&self, known: bool) {
        let mut c = lock(&self.0.controls);
        c.leader_known = known;
        c.leader_lost_at = if known { None } else { Some(Instant::now()) };
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
