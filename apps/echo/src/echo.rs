//! The echo app: the small test workload of the conformance suite and of `trellis demo`.
//!
//! Like the SMI conformance app, it answers every request with who it is, counts the requests it
//! received per caller and per path, and can call other services (through a mesh proxy) on
//! request, so a harness can drive "A calls B" scenarios and then ask B what it saw.
//!
//! - any path outside `/_echo/`: `200` with an [`EchoReply`] JSON body, counted.
//! - `GET /_echo/counts`: the [`Counts`] seen since start or the last reset (not counted).
//! - `POST /_echo/reset`: zero the counts.
//! - `POST /_echo/call` with a [`CallPlan`] body: make the calls and answer a [`CallReport`].
//!
//! The caller is named by the `x-echo-caller` request header (the conformance app's convention:
//! each app says who it is when it calls). Once mTLS is in place the server-side proxy's verified
//! identity header is the stronger source; the harness checks both.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
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
            // Drain the request body so keep-alive connections stay usable.
            let _ = req.into_body().collect().await;
            json(
                StatusCode::OK,
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
