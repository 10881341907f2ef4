//! Test helpers: real hyper apps on loopback, a real tonic echo service, proxies started
//! in-process from YAML, and HTTP clients on one keep-alive connection.
#![allow(dead_code)]

pub mod certs;
pub mod gateway;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_proxy::config::Config;
use trellis_proxy::{ProxyOptions, RunningProxy};

pub mod echo {
    tonic::include_proto!("trellis.test.echo");
}

pub type Body = BoxBody<Bytes, hyper::Error>;

pub fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

/// A real HTTP app (HTTP/1.1 + h2c) answering with its name. Paths:
/// `/slow` waits 300 ms; `/echo` streams the request body back; `/ws` accepts an upgrade and
/// echoes bytes; anything else returns the name, with `x-app`, `x-seen-host`, `x-seen-version`.
#[derive(Debug, Clone)]
pub struct App {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
}

impl App {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

pub async fn app(name: &'static str) -> App {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let hits = counter.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req| app_answer(name, hits.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    App { name, addr, hits }
}

async fn app_answer(
    name: &'static str,
    hits: Arc<AtomicUsize>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    hits.fetch_add(1, Ordering::SeqCst);
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let version = format!("{:?}", req.version());
    let mut resp = match req.uri().path() {
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Response::new(full(name))
        }
        "/echo" => Response::new(req.into_body().boxed()),
        "/ws" => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                .body(Empty::new().map_err(|never| match never {}).boxed())
                .unwrap()
        }
        _ => Response::new(full(name)),
    };
    resp.headers_mut().insert("x-app", name.parse().unwrap());
    if let Ok(h) = host.parse() {
        resp.headers_mut().insert("x-seen-host", h);
    }
    resp.headers_mut()
        .insert("x-seen-version", version.parse().unwrap());
    Ok(resp)
}

/// A real tonic echo server.
pub async fn grpc_app(name: &'static str) -> SocketAddr {
    use echo::EchoMessage;
    use echo::echo_server::{Echo, EchoServer};
    use futures::StreamExt;
    use tonic::{Request as TReq, Response as TResp, Status, Streaming};

    #[derive(Debug)]
    struct Svc(&'static str);

    #[tonic::async_trait]
    impl Echo for Svc {
        async fn unary(&self, req: TReq<EchoMessage>) -> Result<TResp<EchoMessage>, Status> {
            Ok(TResp::new(EchoMessage {
                text: format!("{}:{}", self.0, req.into_inner().text),
            }))
        }
        type BidiStream = futures::stream::BoxStream<'static, Result<EchoMessage, Status>>;
        async fn bidi(
            &self,
            req: TReq<Streaming<EchoMessage>>,
        ) -> Result<TResp<Self::BidiStream>, Status> {
            let name = self.0;
            let out = req.into_inner().map(move |m| {
                m.map(|m| EchoMessage {
                    text: format!("{name}:{}", m.text),
                })
            });
            Ok(TResp::new(out.boxed()))
        }
    }

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(Svc(name)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr
}

/// Parse YAML and start a proxy in-process.
pub async fn proxy(yaml: &str) -> RunningProxy {
    let config = Config::parse(yaml, Path::new("test.yaml")).unwrap_or_else(|e| panic!("{e}"));
    trellis_proxy::start(ProxyOptions::new(config))
        .await
        .unwrap()
}

/// An HTTP/1.1 client on exactly one keep-alive connection.
pub struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Body>,
}

impl H1 {
    pub async fn connect(addr: SocketAddr) -> H1 {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        H1 { sender }
    }

    pub async fn send(&mut self, req: Request<Body>) -> Response<Incoming> {
        self.sender.ready().await.expect("connection still open");
        self.sender.send_request(req).await.expect("request sent")
    }

    /// GET `path` with `Host: host`; returns status, `x-app` header and the body.
    pub async fn get(&mut self, host: &str, path: &str) -> (StatusCode, String, String) {
        let req = Request::get(path)
            .header("host", host)
            .body(full(""))
            .unwrap();
        read(self.send(req).await).await
    }
}

/// Status, `x-app` (or `x-trellis-error` when the proxy answered) and body text.
pub async fn read(resp: Response<Incoming>) -> (StatusCode, String, String) {
    let status = resp.status();
    let tag = resp
        .headers()
        .get("x-app")
        .or_else(|| resp.headers().get("x-trellis-error"))
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, tag, String::from_utf8_lossy(&body).into_owned())
}

/// An h2c (prior knowledge) client on one connection.
pub async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// A destination with the given backends (`(name, weight, [addresses])`).
pub fn destination(authority: &str, backends: &[(&str, u32, &[SocketAddr])]) -> String {
    let mut s = format!("  - authority: {authority}\n    backends:\n");
    for (name, weight, addrs) in backends {
        s += &format!("      - name: {name}\n        weight: {weight}\n        endpoints:\n");
        for a in *addrs {
            s += &format!("          - address: \"{a}\"\n");
        }
    }
    s
}

/// A port for a child process to listen on, chosen below Linux's ephemeral range
/// (32768-60999), where the kernel also picks the local ports of every outgoing connection:
/// a port from `bind(0)` could be taken as a client's local port by another test before the
/// child binds it (seen once in CI: the proxy never became ready). Random in 20000-32767 and
/// checked bindable; another test picking the same one is a 1-in-12,768 chance per port.
pub fn free_port() -> u16 {
    loop {
        let port = fastrand::u16(20_000..32_768);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// How a [`Flaky`] upstream answers. Counters (`hits`) always count every request received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 200 with its name.
    Ok,
    /// The first `n` requests get `status`, then 200.
    FailFirst(usize, u16),
    /// `percent` of requests (at random) get `status`, the others 200.
    FailPercent(u32, u16),
    /// 200 after waiting this long.
    Slow(Duration),
    /// The first `n` requests wait this long, then answer at once.
    SlowFirst(usize, Duration),
    /// The connection is closed without an answer.
    Reset,
    /// Headers and 5 of 100 promised bytes, then the connection is cut.
    CloseMidBody,
    /// Headers, then a body that never sends a byte.
    StallBody,
    /// Never answers (the request hangs until the client gives up).
    Stall,
}

/// A real HTTP/1.1 + h2c upstream that misbehaves on command, counting what it receives.
#[derive(Debug, Clone)]
pub struct Flaky {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub mode: Arc<std::sync::Mutex<Mode>>,
    /// Requests being answered now, and the most seen at once.
    pub in_flight: Arc<AtomicUsize>,
    pub max_in_flight: Arc<AtomicUsize>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
}

impl Flaky {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

pub async fn flaky(name: &'static str, mode: Mode) -> Flaky {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let f = Flaky {
        name,
        addr: listener.local_addr().unwrap(),
        hits: Arc::new(AtomicUsize::new(0)),
        mode: Arc::new(std::sync::Mutex::new(mode)),
        in_flight: Arc::new(AtomicUsize::new(0)),
        max_in_flight: Arc::new(AtomicUsize::new(0)),
        connections: Arc::new(AtomicUsize::new(0)),
    };
    let server = f.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            server.connections.fetch_add(1, Ordering::SeqCst);
            let f = server.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| flaky_answer(f.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    f
}

struct Leave(Arc<AtomicUsize>);
impl Drop for Leave {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type FlakyError = Box<dyn std::error::Error + Send + Sync>;
type FlakyBody = BoxBody<Bytes, FlakyError>;

async fn flaky_answer(
    f: Flaky,
    req: Request<Incoming>,
) -> Result<Response<FlakyBody>, std::io::Error> {
    let n = f.hits.fetch_add(1, Ordering::SeqCst);
    let now = f.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    f.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _leave = Leave(f.in_flight.clone());
    // Read the request body (it must arrive whole for the test to count it).
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mode = *f.mode.lock().unwrap();
    let status = |code: u16| {
        let text = format!("{} {code} {}", f.name, body.len());
        let mut r = Response::new(
            Full::new(Bytes::from(text))
                .map_err(|never| match never {})
                .boxed(),
        );
        *r.status_mut() = StatusCode::from_u16(code).unwrap();
        r.headers_mut().insert("x-app", f.name.parse().unwrap());
        Ok(r)
    };
    match mode {
        Mode::Ok => status(200),
        Mode::FailFirst(k, code) => status(if n < k { code } else { 200 }),
        Mode::FailPercent(p, code) => status(if fastrand::u32(..100) < p { code } else { 200 }),
        Mode::Slow(d) => {
            tokio::time::sleep(d).await;
            status(200)
        }
        Mode::SlowFirst(k, d) => {
            if n < k {
                tokio::time::sleep(d).await;
            }
            status(200)
        }
        Mode::Reset => Err(std::io::Error::other("reset on command")),
        Mode::CloseMidBody => {
            let chunks = futures::stream::iter(vec![
                Ok(http_body::Frame::data(Bytes::from_static(b"12345"))),
                Err(std::io::Error::other("cut on command")),
            ]);
            let body = http_body_util::StreamBody::new(chunks);
            let mut r = Response::new(body.map_err(FlakyError::from).boxed());
            r.headers_mut()
                .insert("content-length", "100".parse().unwrap());
            Ok(r)
        }
        Mode::StallBody => {
            let body = http_body_util::StreamBody::new(futures::stream::pending::<
                Result<http_body::Frame<Bytes>, FlakyError>,
            >());
            Ok(Response::new(body.boxed()))
        }
        Mode::Stall => {
            futures::future::pending::<()>().await;
            unreachable!()
        }
    }
}
