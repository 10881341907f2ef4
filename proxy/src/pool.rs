//! Upstream connection pools on hyper's `client::conn`: the connections to each endpoint address,
//! HTTP/1.1 or HTTP/2, each driven by its own task, and a request sent on the first one that is
//! free.
//!
//! Why not hyper-util's pooled (legacy) client, which this replaced: per request it hashed the
//! pool key under a mutex, raced a connect against waiting for an idle connection, and spawned a
//! task to hand each HTTP/1 connection back to the pool once its response ended; profiles of the
//! closed-loop benchmark put that at about 6% of the proxy's CPU (`scripts/bench/README.md`).
//! Here an HTTP/1 connection never leaves its endpoint's list: a request takes the first one
//! whose dispatcher says it is idle ([`http1::SendRequest::is_ready`], an atomic load) and
//! queues itself on it in the same step, under the lock, so two requests cannot take the same
//! connection. An HTTP/2 connection carries every request to its endpoint while it is open.
//!
//! Kept from the client it replaced: a request that must open a connection also takes a pooled
//! one that frees up first (which is what lets requests queued under a circuit breaker's
//! `maxConnections` proceed: see `Freed`), and the connect it no longer needs finishes in the
//! background and joins the pool (abandoned, a TLS handshake would be an error at the server); a
//! request that a pooled connection refused without sending a byte (the server had just closed
//! it) is sent once more on a new connection; HTTP/1 requests go out in origin form with a
//! `Host` (from the URI when the caller sent none); idle connections are closed after the idle
//! timeout; connections are made by the same connectors (plaintext with the breaker's connection
//! limit, or TLS), so their timeouts and permits hold.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::RequestBody;

pub use crate::connect::{ConnectError, Negotiated};

/// The answer to a request sent through a [`Pool`].
pub struct ResponseFuture(
    Pin<Box<dyn Future<Output = Result<Response<Incoming>, UpstreamError>> + Send>>,
);

impl Future for ResponseFuture {
    type Output = Result<Response<Incoming>, UpstreamError>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}

/// Why an upstream request got no response.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection: the connector failed (TCP, the breaker's limit, TLS) or hyper's handshake
    /// on the new connection did.
    Connect(ConnectError),
    /// The request was sent (or its connection broke) and no response head came back.
    Request(hyper::Error),
    /// The request has no authority to connect to (a bug of the caller's).
    NoAuthority,
}

impl UpstreamError {
    /// Whether no connection could be made (nothing of the request reached the endpoint).
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "connecting to the endpoint: {e}"),
            UpstreamError::Request(e) => write!(f, "sending the request: {e}"),
            UpstreamError::NoAuthority => f.write_str("the upstream request names no authority"),
        }
    }
}

impl StdError for UpstreamError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            UpstreamError::Connect(e) => Some(&**e),
            UpstreamError::Request(e) => Some(e),
            UpstreamError::NoAuthority => None,
        }
    }
}

/// A connection being made.
type Connecting<C> =
    Pin<Box<dyn Future<Output = Result<<C as Connect>::Stream, ConnectError>> + Send>>;

/// What makes connections for a pool: a tower service from the endpoint's URI to a stream.
pub trait Connect: Clone + Send + Sync + 'static {
    /// The connection.
    type Stream: hyper::rt::Read + hyper::rt::Write + Negotiated + Unpin + Send + 'static;
    /// Opens a connection to `uri`'s authority.
    fn connect(
        &self,
        uri: Uri,
    ) -> Pin<Box<dyn Future<Output = Result<Self::Stream, ConnectError>> + Send>>;
}

impl<S> Connect for S
where
    S: tower::Service<Uri> + Clone + Send + Sync + 'static,
    S::Response: hyper::rt::Read + hyper::rt::Write + Negotiated + Unpin + Send + 'static,
    S::Error: Into<ConnectError>,
    S::Future: Send + 'static,
{
    type Stream = S::Response;
    fn connect(
        &self,
        uri: Uri,
    ) -> Pin<Box<dyn Future<Output = Result<Self::Stream, ConnectError>> + Send>> {
        // The connectors used here are always ready (hyper's `HttpConnector` and the ones on top
        // of it), so `call` without `poll_ready` is what their own docs allow.
        let call = self.clone().call(uri);
        Box::pin(async move { call.await.map_err(Into::into) })
    }
}

/// Pooled connections to endpoints, all of one protocol and made by one connector (one pool per
/// (protocol, peer identity) in [`crate::upstream::Clients`]). Cheap to clone.
pub struct Pool<C> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Pool {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C> fmt::Debug for Pool<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let endpoints = self.inner.endpoints.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("Pool")
            .field("protocol", &self.inner.protocol)
            .field("endpoints", &endpoints)
            .finish()
    }
}

struct Inner<C> {
    connector: C,
    protocol: Protocol,
    idle_timeout: Duration,
    /// Every open connection, by endpoint address.
    endpoints: Mutex<HashMap<Authority, Vec<Pooled>>>,
    /// Whether the task closing idle connections runs (started with the first connection).
    sweeping: std::sync::atomic::AtomicBool,
    /// Requests waiting for a new connection, told when a pooled one may have become free.
    freed: Arc<Freed>,
}

/// Wakes requests waiting for a connection when one of the pool's connections may have become
/// free. A request that must open a connection waits for it OR for a pooled connection to
/// free up, whichever comes first: under a circuit breaker's `maxConnections` the connect
/// waits for a connection to close, which a pooled idle connection never does, so without
/// this a queued request would wait until the idle timeout.
#[derive(Default)]
struct Freed {
    /// How many requests wait (the connection tasks only notify when someone does).
    waiting: std::sync::atomic::AtomicUsize,
    notify: tokio::sync::Notify,
}

impl Freed {
    /// After a connection task ran: its connection may be idle now (an HTTP/1 connection becomes
    /// free while its task reads the end of a response).
    fn ran(&self) {
        if self.waiting.load(std::sync::atomic::Ordering::Acquire) > 0 {
            self.notify.notify_waiters();
        }
    }
}

/// Counts a waiting request for as long as it lives.
struct Waiting<'a>(&'a Freed);

impl<'a> Waiting<'a> {
    fn new(freed: &'a Freed) -> Self {
        freed
            .waiting
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Waiting(freed)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0
            .waiting
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Runs a connection's task, telling waiting requests after each time it ran.
async fn drive<F: Future>(conn: F, freed: Arc<Freed>) -> F::Output {
    let mut conn = std::pin::pin!(conn);
    std::future::poll_fn(|cx| {
        let polled = conn.as_mut().poll(cx);
        freed.ran();
        polled
    })
    .await
}

/// What a pool's connections speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (prior knowledge in plaintext, or the only protocol offered in ALPN).
    Http2,
    /// What the server chose in ALPN (HTTP/2 when it chose `h2`, else HTTP/1.1), for TLS this
    /// proxy originates to servers outside the mesh: their HTTP/2 requests name `https`.
    Negotiated,
}

/// A connection's request side, and when it last took a request.
struct Pooled {
    sender: Sender,
    last_used: Instant,
}

enum Sender {
    Http1(http1::SendRequest<RequestBody>),
    Http2(http2::SendRequest<RequestBody>),
}

/// A request queued on a connection, or given back untouched when the connection was not free.
type Sent = Pin<
    Box<
        dyn Future<
                Output = Result<
                    Response<Incoming>,
                    hyper::client::conn::TrySendError<Request<RequestBody>>,
                >,
            > + Send,
    >,
>;

impl Sender {
    fn is_ready(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_ready(),
            Sender::Http2(s) => s.is_ready(),
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }

    /// Queues `req` now (the returned future only waits for the answer), in the form this
    /// connection's protocol wants.
    fn try_send(
        &mut self,
        mut req: Request<RequestBody>,
        endpoint: &Authority,
        protocol: Protocol,
    ) -> Sent {
        match self {
            Sender::Http1(s) => {
                to_origin_form(&mut req, endpoint);
                Box::pin(s.try_send_request(req))
            }
            Sender::Http2(s) => {
                if protocol == Protocol::Negotiated {
                    to_https_h2(&mut req, endpoint);
                }
                Box::pin(s.try_send_request(req))
            }
        }
    }
}

impl<C: Connect> Pool<C> {
    /// A pool making connections with `connector` that speak `protocol`; idle connections are
    /// closed after `idle_timeout`.
    pub fn new(connector: C, protocol: Protocol, idle_timeout: Duration) -> Self {
        Pool {
            inner: Arc::new(Inner {
                connector,
                protocol,
                idle_timeout,
                endpoints: Mutex::default(),
                sweeping: Default::default(),
                freed: Arc::default(),
            }),
        }
    }

    /// Sends `req` (absolute URI: its authority is the endpoint) on a free pooled connection, or
    /// a new one.
    pub fn request(&self, req: Request<RequestBody>) -> ResponseFuture {
        let Some(endpoint) = req.uri().authority().cloned() else {
            return ResponseFuture(Box::pin(std::future::ready(Err(
                UpstreamError::NoAuthority,
            ))));
        };
        let uri = req.uri().clone();
        let pooled = self.inner.send_pooled(&endpoint, req);
        let inner = Arc::clone(&self.inner);
        ResponseFuture(Box::pin(async move {
            let req = match pooled {
                Ok(sent) => match sent.await {
                    Ok(resp) => return Ok(resp),
                    // Refused before a byte was written (the server had closed the connection
                    // meanwhile): the request is intact, so a new connection may carry it.
                    Err(mut e) => match e.take_message() {
                        Some(req) => req,
                        None => return Err(UpstreamError::Request(e.into_error())),
                    },
                },
                Err(req) => req,
            };
            inner.send_new(endpoint, uri, req).await
        }))
    }

    /// Connections in the pool, all endpoints together (for tests and debugging).
    pub fn connections(&self) -> usize {
        let map = self
            .inner
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.values().map(Vec::len).sum()
    }
}

impl<C: Connect> Inner<C> {
    /// Queues `req` on a free connection to `endpoint`, dropping closed ones found on the way;
    /// gives the request back when none is free.
    // The request is moved back by value, as hyper's own `try_send_request` does: boxing it
    // would cost an allocation on the path that opens a connection anyway.
    #[allow(clippy::result_large_err)]
    fn send_pooled(
        &self,
        endpoint: &Authority,
        req: Request<RequestBody>,
    ) -> Result<Sent, Request<RequestBody>> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let Some(conns) = map.get_mut(endpoint) else {
            return Err(req);
        };
        // Newest first: the most recently made connections are the warmest and, for HTTP/1, the
        // idle ones the closed loop hands back.
        let mut i = conns.len();
        while i > 0 {
            i -= 1;
            if conns[i].sender.is_ready() {
                let conn = &mut conns[i];
                conn.last_used = Instant::now();
                return Ok(conn.sender.try_send(req, endpoint, self.protocol));
            }
            if conns[i].sender.is_closed() {
                conns.swap_remove(i);
            }
        }
        Err(req)
    }

    /// Makes a connection to `endpoint`, pools it and sends `req` on it; or sends `req` on a
    /// pooled connection that frees up before the new one is made (see [`Freed`]).
    async fn send_new(
        self: Arc<Self>,
        endpoint: Authority,
        uri: Uri,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut connect = Some(self.connector.connect(uri.clone()));
        // Whether the connect has been polled (it may have begun connecting or handshaking).
        let mut started = false;
        let waiting = Waiting::new(&self.freed);
        let io = loop {
            // Registered before looking, so a connection freed in between is not missed.
            let freed = self.freed.notify.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            match self.send_pooled(&endpoint, req) {
                Ok(sent) => {
                    // A connect already under way goes on without this request and its
                    // connection joins the pool (as hyper-util's client did): abandoned, a TLS
                    // handshake would count as an error on the server's side.
                    if let Some(pending) = connect.take().filter(|_| started) {
                        Arc::clone(&self).pool_in_background(endpoint.clone(), pending);
                    }
                    match sent.await {
                        Ok(resp) => return Ok(resp),
                        Err(mut e) => match e.take_message() {
                            // Refused unsent (that connection closed): connect again.
                            Some(back) => {
                                req = back;
                                // (polled at once below, so `started` stays true)
                                connect = Some(self.connector.connect(uri.clone()));
                            }
                            None => return Err(UpstreamError::Request(e.into_error())),
                        },
                    }
                }
                Err(back) => req = back,
            }
            let Some(pending) = connect.as_mut() else {
                unreachable!("a connect is set whenever the loop goes on")
            };
            started = true;
            tokio::select! {
                io = pending => break io.map_err(UpstreamError::Connect)?,
                () = &mut freed => {}
            }
        };
        drop(waiting);
        let mut sender = self.establish(io).await?;
        // Queued before the connection is shared, so no other request can take it first (a new
        // HTTP/1 sender takes one request before its connection task has run).
        let sent = sender.try_send(req, &endpoint, self.protocol);
        self.add(endpoint, sender);
        sent.await
            .map_err(|e| UpstreamError::Request(e.into_error()))
    }

    /// Starts HTTP/1.1 or HTTP/2 on a new connection (as the pool's protocol or the connection's
    /// ALPN says) and spawns the task that drives it.
    async fn establish(&self, io: C::Stream) -> Result<Sender, UpstreamError> {
        let http2 = match self.protocol {
            Protocol::Http1 => false,
            Protocol::Http2 => true,
            Protocol::Negotiated => io.negotiated_h2(),
        };
        let freed = Arc::clone(&self.freed);
        if http2 {
            let (mut sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| UpstreamError::Connect(Box::new(e)))?;
            tokio::spawn(async move {
                if let Err(e) = drive(conn, freed).await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            sender
                .ready()
                .await
                .map_err(|e| UpstreamError::Connect(Box::new(e)))?;
            Ok(Sender::Http2(sender))
        } else {
            let (sender, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| UpstreamError::Connect(Box::new(e)))?;
            tokio::spawn(async move {
                // With upgrades: a 101 answer hands the connection to `hyper::upgrade::on`.
                if let Err(e) = drive(conn.with_upgrades(), freed).await {
                    tracing::debug!(error = %e, "upstream HTTP/1 connection ended");
                }
            });
            Ok(Sender::Http1(sender))
        }
    }

    /// Lets a connect the request no longer needs finish, and pools its connection.
    fn pool_in_background(self: Arc<Self>, endpoint: Authority, connect: Connecting<C>) {
        tokio::spawn(async move {
            let io = match connect.await {
                Ok(io) => io,
                Err(e) => {
                    tracing::debug!(endpoint = %endpoint, error = %e, "a connection made for the pool failed");
                    return;
                }
            };
            if let Ok(sender) = self.establish(io).await {
                self.add(endpoint, sender);
            }
        });
    }

    fn add(self: &Arc<Self>, endpoint: Authority, sender: Sender) {
        let pooled = Pooled {
            sender,
            last_used: Instant::now(),
        };
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(endpoint)
            .or_default()
            .push(pooled);
        if !self
            .sweeping
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tokio::spawn(sweep(Arc::downgrade(self), self.idle_timeout));
        }
    }

    /// Drops closed connections and those idle for longer than the idle timeout (dropping an
    /// HTTP/1 connection's sender closes it; an HTTP/2 connection closes once its last stream
    /// ends).
    fn sweep(&self) {
        let now = Instant::now();
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, conns| {
            conns.retain(|c| {
                let idle_too_long =
                    c.sender.is_ready() && now.duration_since(c.last_used) >= self.idle_timeout;
                !(c.sender.is_closed() || idle_too_long)
            });
            !conns.is_empty()
        });
    }
}

/// Closes idle connections every half idle timeout, while the pool exists.
async fn sweep<C: Connect>(pool: Weak<Inner<C>>, idle_timeout: Duration) {
    let mut every = tokio::time::interval(idle_timeout / 2);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        match pool.upgrade() {
            Some(inner) => inner.sweep(),
            None => return,
        }
    }
}

/// HTTP/2 over TLS this proxy originated: `:scheme` `https` and `:authority` the endpoint (no
/// `host` beside it, which would name the service the app called: strict servers refuse two
/// different authorities, RFC 9113 8.3.1). The request may come back from an HTTP/1 connection
/// that refused it unsent, in origin form.
fn to_https_h2(req: &mut Request<RequestBody>, endpoint: &Authority) {
    req.headers_mut().remove(http::header::HOST);
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if let Ok(uri) = Uri::builder()
        .scheme(http::uri::Scheme::HTTPS)
        .authority(endpoint.clone())
        .path_and_query(path)
        .build()
    {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = http::Version::HTTP_2;
}

/// HTTP/1 requests name only the path on the request line (the authority-form for `CONNECT`),
/// with the authority in `Host`: added from the URI when the caller sent none.
fn to_origin_form(req: &mut Request<RequestBody>, endpoint: &Authority) {
    *req.version_mut() = http::Version::HTTP_11;
    if !req.headers().contains_key(http::header::HOST)
        && let Ok(host) = HeaderValue::from_str(endpoint.as_str())
    {
        req.headers_mut().insert(http::header::HOST, host);
    }
    let uri = if req.method() == Method::CONNECT {
        Uri::from(endpoint.clone())
    } else {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Uri::from(path)
    };
    *req.uri_mut() = uri;
}

#[cfg(test)]
mod tests {
    //! Against real hyper servers on loopback, counting the connections they accept.

    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper_util::client::legacy::connect::HttpConnector;
    use tokio::net::TcpListener;

    use super::*;
    use crate::connect::PlainConnector;

    /// A server answering `hello`, the request line's URI and `Host` (HTTP/1.1, or h2c when
    /// `http2`) after `delay`. Counts accepted connections.
    async fn server(http2: bool, delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let svc =
                        hyper::service::service_fn(move |req: Request<Incoming>| async move {
                            tokio::time::sleep(delay).await;
                            let host = req
                                .headers()
                                .get(http::header::HOST)
                                .map(|h| h.to_str().unwrap().to_string())
                                .unwrap_or_default();
                            let body = format!("hello {} {host}", req.uri());
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                        });
                    if http2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn pool(http2: bool, idle: Duration) -> Pool<PlainConnector> {
        let mut http = HttpConnector::new();
        http.enforce_http(true);
        let protocol = if http2 {
            Protocol::Http2
        } else {
            Protocol::Http1
        };
        Pool::new(PlainConnector::new(http, None), protocol, idle)
    }

    fn get(addr: SocketAddr, http2: bool) -> Request<RequestBody> {
        let mut req = Request::get(format!("http://{addr}/path?q=1"))
            .body(RequestBody::empty())
            .unwrap();
        if http2 {
            *req.version_mut() = http::Version::HTTP_2;
        }
        req
    }

    async fn text(resp: Response<Incoming>) -> String {
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn http1_requests_reuse_an_idle_connection_and_go_out_in_origin_form() {
        let (addr, accepted) = server(false, Duration::ZERO).await;
        let pool = pool(false, Duration::from_secs(90));
        for _ in 0..5 {
            let resp = pool.request(get(addr, false)).await.unwrap();
            // Origin form on the request line, Host from the URI (the caller sent none).
            assert_eq!(text(resp).await, format!("hello /path?q=1 {addr}"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.connections(), 1);
    }

    #[tokio::test]
    async fn concurrent_http1_requests_each_get_a_connection_of_their_own() {
        let (addr, accepted) = server(false, Duration::ZERO).await;
        let pool = pool(false, Duration::from_secs(90));
        let sent: Vec<_> = (0..4).map(|_| pool.request(get(addr, false))).collect();
        let resps = futures::future::join_all(sent).await;
        for resp in resps {
            assert!(text(resp.unwrap()).await.starts_with("hello /path"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        // All four are free again: four more requests in sequence make no new connection.
        for _ in 0..4 {
            text(pool.request(get(addr, false)).await.unwrap()).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_not_used_again() {
        // A raw server that answers one request as keep-alive, then closes the connection while
        // it is idle in the pool (as apps with a short keep-alive timeout do): the next request
        // must go out on a new connection, not fail on the closed one.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = tcp.read(&mut buf).await.unwrap();
                        assert!(n > 0, "client closed before a request");
                        head.extend_from_slice(&buf[..n]);
                    }
                    tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                });
            }
        });
        let pool = pool(false, Duration::from_secs(90));
        for _ in 0..5 {
            let resp = pool.request(get(addr, false)).await.unwrap();
            assert_eq!(text(resp).await, "hello");
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
        // Closed ones leave the pool when a request or the sweep passes them: only the last.
        assert_eq!(pool.connections(), 1);
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection() {
        let (addr, accepted) = server(true, Duration::ZERO).await;
        let pool = pool(true, Duration::from_secs(90));
        let resp = pool.request(get(addr, true)).await.unwrap();
        // HTTP/2 keeps the absolute URI (`:scheme` and `:authority`).
        assert!(
            text(resp)
                .await
                .starts_with(&format!("hello http://{addr}/path?q=1"))
        );
        let sent: Vec<_> = (0..10).map(|_| pool.request(get(addr, true))).collect();
        for resp in futures::future::join_all(sent).await {
            assert!(text(resp.unwrap()).await.starts_with("hello"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn under_a_connection_limit_queued_requests_take_the_connection_when_it_frees_up() {
        // maxConnections 1: the first request's connection is the only one; the others wait for
        // a connection (the breaker's pending queue) and must get that one when it is free, not
        // wait for it to close (it never does while pooled).
        let (addr, accepted) = server(false, Duration::from_millis(20)).await;
        let breaker = crate::resilience::Breaker::compile(
            &trellis_policy::CircuitBreaker {
                max_connections: Some(1),
                max_pending_requests: Some(10),
                ..Default::default()
            },
            Arc::default(),
        );
        let mut http = HttpConnector::new();
        http.enforce_http(true);
        let pool = Pool::new(
            PlainConnector::new(http, Some(breaker)),
            Protocol::Http1,
            Duration::from_secs(90),
        );
        let sent: Vec<_> = (0..4).map(|_| pool.request(get(addr, false))).collect();
        let all = tokio::time::timeout(Duration::from_secs(5), async {
            for resp in futures::future::join_all(sent).await {
                assert!(text(resp.unwrap()).await.starts_with("hello"));
            }
        });
        all.await
            .expect("the queued requests got the freed connection");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let unused = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = unused.local_addr().unwrap();
        drop(unused);
        let err = pool(false, Duration::from_secs(90))
            .request(get(addr, false))
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err}");
        assert!(
            err.source().is_some(),
            "the connector's error is kept as the cause"
        );
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let (addr, accepted) = server(false, Duration::ZERO).await;
        let pool = pool(false, Duration::from_millis(200));
        text(pool.request(get(addr, false)).await.unwrap()).await;
        assert_eq!(pool.connections(), 1);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(pool.connections(), 0, "swept after the idle timeout");
        text(pool.request(get(addr, false)).await.unwrap()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
