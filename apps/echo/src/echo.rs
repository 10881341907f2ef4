//! The echo app: the small test workload of the conformance suite and of `trellis demo`.
//!
//! Like the SMI conformance app, it answers every request with who it is, counts the requests it
//! received per caller and per path, and can call other services (through a mesh proxy) on
//! request, so a harness can drive "A calls B" scenarios and then ask B what it saw.
//!
//! - any path outside `/_echo/`: `200` with an [`EchoReply`] JSON body, counted. Query parameters
//!   shape the answer, so a test can make known failures and latency ([`Shape`]):
//!   - `status=CODE` answers with that status (same body);
//!   - `delay_ms=N` answers after N ms (at most 60 s);
//!   - `fail_every=N`: every Nth request carrying `fail_every` that this instance receives
//!     (counted per instance since start or the last reset, whatever its N) answers `503`; the
//!     others answer as usual. With `N=2` and a fresh count, requests 2, 4, 6... fail: a known
//!     share of failures that a retry (the next request in this instance's count) always turns
//!     into an answer;
//!   - `fail_version=V`: this instance answers `503` when its version is `V`; others answer as
//!     usual. Behind one service with several instances, exactly one of them fails (outlier
//!     ejection).
//!
//!   A failure of `fail_every` or `fail_version` takes precedence over `status`; the body is the
//!   same [`EchoReply`] either way, so a caller still sees which instance answered.
//! - `GET /_echo/counts`: the [`Counts`] seen since start or the last reset (not counted).
//! - `POST /_echo/reset`: zero the counts and the `fail_every` count.
//! - `POST /_echo/call` with a [`CallPlan`] body: make the calls and answer a [`CallReport`].
//!
//! The caller is named by the `x-echo-caller` request header (the conformance app's convention:
//! each app says who it is when it calls). Once mTLS is in place the server-side proxy's verified
//! identity header is the stronger source; the harness checks both.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::client::{self, CallPlan};

/// The header a calling app names itself with.
pub const CALLER_HEADER: &str = "x-echo-caller";

/// Who this echo instance is.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    /// The service it serves as (e.g. `web`).
    pub service: String,
    /// Its version (e.g. `v1`); reported so splits can be counted per version.
    pub version: String,
}

/// The body of every counted reply.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EchoReply {
    pub service: String,
    pub version: String,
    pub method: String,
    pub path: String,
    /// The `x-echo-caller` header, or `unknown`.
    pub caller: String,
}

/// What an echo instance has seen.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub by_caller: BTreeMap<String, u64>,
    pub by_path: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct State {
    identity: Identity,
    counts: Mutex<Counts>,
    /// Requests carrying `fail_every` since start or the last reset.
    fail_every_seen: AtomicU64,
}

/// A running echo server; it stops when dropped.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    /// Starts serving on `listen` (HTTP/1.1 and h2c, keep-alive).
    pub async fn start(listen: SocketAddr, identity: Identity) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            identity,
            counts: Mutex::new(Counts::default()),
            fail_every_seen: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, state));
        Ok(Self { addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
            // Connection errors (a client going away) concern only that connection.
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().to_string();
    let reply = match (req.method(), path.as_str()) {
        (&Method::GET, "/_echo/counts") => {
            let counts = state.counts.lock().expect("counts lock").clone();
            json(StatusCode::OK, &counts)
        }
        (&Method::POST, "/_echo/reset") => {
            *state.counts.lock().expect("counts lock") = Counts::default();
            state.fail_every_seen.store(0, Ordering::SeqCst);
            json(StatusCode::OK, &Counts::default())
        }
        (&Method::POST, "/_echo/call") => call(req).await,
        _ => {
            let caller = req
                .headers()
                .get(CALLER_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("unknown")
                .to_owned();
            {
                let mut counts = state.counts.lock().expect("counts lock");
                counts.total += 1;
                *counts.by_caller.entry(caller.clone()).or_default() += 1;
                *counts.by_path.entry(path.clone()).or_default() += 1;
            }
            let shape = Shape::parse(req.uri().query());
            // Counted on arrival, so concurrent requests take distinct places in the count.
            let nth = shape
                .fail_every
                .map(|_| state.fail_every_seen.fetch_add(1, Ordering::SeqCst) + 1);
            let status = shape.status_for(&state.identity.version, nth);
            // Drain the request body so keep-alive connections stay usable.
            let _ = req.into_body().collect().await;
            if !shape.delay.is_zero() {
                tokio::time::sleep(shape.delay).await;
            }
            json(
                status,
                &EchoReply {
                    service: state.identity.service.clone(),
                    version: state.identity.version.clone(),
                    method,
                    path,
                    caller,
                },
            )
        }
    };
    Ok(reply)
}

/// How the query shapes an answer (unknown parameters and bad values are ignored).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    /// `status=CODE`.
    pub status: Option<StatusCode>,
    /// `delay_ms=N` (at most 60 s).
    pub delay: std::time::Duration,
    /// `fail_every=N` (N of at least 1).
    pub fail_every: Option<u64>,
    /// `fail_version=V`.
    pub fail_version: Option<String>,
}

impl Shape {
    /// Reads the query parameters.
    pub fn parse(query: Option<&str>) -> Self {
        let mut shape = Shape::default();
        for pair in query.unwrap_or_default().split('&') {
            match pair.split_once('=') {
                Some(("status", code)) => {
                    if let Some(code) = code
                        .parse::<u16>()
                        .ok()
                        .and_then(|c| StatusCode::from_u16(c).ok())
                    {
                        shape.status = Some(code);
                    }
                }
                Some(("delay_ms", ms)) => {
                    if let Ok(ms) = ms.parse::<u64>() {
                        shape.delay = std::time::Duration::from_millis(ms.min(60_000));
                    }
                }
                Some(("fail_every", n)) => {
                    shape.fail_every = n.parse::<u64>().ok().filter(|n| *n > 0);
                }
                Some(("fail_version", v)) if !v.is_empty() => {
                    shape.fail_version = Some(v.to_owned());
                }
                _ => {}
            }
        }
        shape
    }

    /// The status of the answer of an instance of `version`, for the `nth` request carrying
    /// `fail_every` (None when this one does not carry it).
    pub fn status_for(&self, version: &str, nth: Option<u64>) -> StatusCode {
        let every = match (self.fail_every, nth) {
            (Some(every), Some(nth)) => nth % every == 0,
            _ => false,
        };
        if every || self.fail_version.as_deref() == Some(version) {
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        self.status.unwrap_or(StatusCode::OK)
    }
}

async fn call(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("reading body: {e}")),
    };
    let plan: CallPlan = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("call plan: {e}")),
    };
    match client::run(&plan).await {
        Ok(report) => json(StatusCode::OK, &report),
        Err(e) => text(StatusCode::BAD_GATEWAY, format!("{e:#}")),
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).expect("serializable reply");
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn text(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(message)))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_delay_come_from_the_query() {
        let shape = Shape::parse(Some("status=503&delay_ms=40"));
        assert_eq!(
            shape.status_for("v1", None),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(shape.delay, std::time::Duration::from_millis(40));
        let ignored = Shape::parse(Some(
            "x=1&status=abc&delay_ms=-3&fail_every=0&fail_version=",
        ));
        assert_eq!(ignored, Shape::default());
        assert_eq!(ignored.status_for("v1", Some(7)), StatusCode::OK);
        assert_eq!(Shape::parse(None), Shape::default());
        assert_eq!(
            Shape::parse(Some("delay_ms=999999")).delay,
            std::time::Duration::from_secs(60)
        );
    }

    #[test]
    fn fail_every_fails_each_nth_request_and_fail_version_one_instance() {
        let shape = Shape::parse(Some("fail_every=3&status=201"));
        let statuses: Vec<u16> = (1..=6)
            .map(|n| shape.status_for("v1", Some(n)).as_u16())
            .collect();
        assert_eq!(statuses, [201, 201, 503, 201, 201, 503]);
        let shape = Shape::parse(Some("fail_version=b"));
        assert_eq!(shape.status_for("b", None), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(shape.status_for("c", None), StatusCode::OK);
    }
}
