//! Listeners and connections: accept, detect the protocol, serve HTTP/1 or HTTP/2 with hyper
//! (limits and timeouts applied) or forward opaque TCP; drain on shutdown.
//!
//! Draining: accept loops stop, every HTTP connection is asked to shut down gracefully (HTTP/1
//! finishes the request in flight then closes, HTTP/2 sends GOAWAY and finishes open streams),
//! and [`Connections::wait_idle`] waits until all connections are gone or the bound passes.
//!
//! Waiting for requests is bounded by `header_read_timeout` on both HTTP versions, as HAProxy's
//! `timeout http-request` is: an HTTP/1 head that is still incomplete then gets `408 Request
//! Timeout` (hyper itself would close silently), an idle keep-alive connection is closed without
//! a word, and an HTTP/2 connection with no request in progress (which includes a header block
//! that never ends) gets GOAWAY and is closed.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::authz::{Caller, Verdict};
use crate::config::{Limits, Protocol};
use crate::detect::{Detected, PrefixedIo, read_prefix};
use crate::http::{ProxyBody, Side, handle};
use crate::metrics::Label;
use crate::shutdown::stopped;
use crate::state::Shared;

pub mod gateway;
pub mod transparent;

pub use crate::connections::{ConnectionGuard, Connections, LISTENERS, ListenerKind};
pub(crate) use crate::connections::{INBOUND_TRANSPARENT, OUTBOUND_TRANSPARENT, inbound_index};

/// Bind a listener with `backlog` (tokio's `TcpListener::bind` always asks for 128, as std
/// does: bursts of new connections overflowed the accept queue and lost SYNs).
/// SO_REUSEADDR as `TcpListener::bind` sets it, so a restart can bind while old connections
/// linger in TIME_WAIT.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Accept connections until `shutdown` turns true.
pub async fn accept_loop(
    listener: TcpListener,
    kind: ListenerKind,
    shared: Arc<Shared>,
    connections: Arc<Connections>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => return,
        };
        // Over the global limit: closed at once (counted and logged by `open`).
        let Some(guard) = connections.open(&kind) else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let kind = kind.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            serve_connection(stream, peer, kind, shared, shutdown).await;
            drop(guard);
        });
    }
}

/// Serve one accepted connection as its listener `kind` says.
pub(crate) async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let local_port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let limits = shared.limits.clone();
    let (protocol, side) = match &kind {
        ListenerKind::OutboundTransparent { listen } => {
            // Boxed: the original destination decides what follows (a per-destination
            // connection like a per-upstream port's, or bytes copied unchanged).
            return Box::pin(crate::server::transparent::outbound(
                stream, peer, *listen, shared, shutdown,
            ))
            .await;
        }
        ListenerKind::InboundTransparent { listen } => {
            return Box::pin(crate::server::transparent::inbound(
                stream, peer, *listen, shared, shutdown,
            ))
            .await;
        }
        ListenerKind::OutboundHttp => (
            Protocol::Http,
            Side::Outbound {
                fixed: None,
                gateway: None,
            },
        ),
        ListenerKind::Gateway { gateway } => {
            return Box::pin(gateway::serve_https(
                stream,
                peer,
                Arc::clone(gateway),
                shared,
                shutdown,
            ))
            .await;
        }
        ListenerKind::GatewayRedirect { https_port } => {
            return Box::pin(gateway::serve_redirect(
                stream,
                *https_port,
                &limits,
                shutdown,
            ))
            .await;
        }
        ListenerKind::OutboundPort {
            destination,
            protocol,
        } => {
            let protocol = protocol.unwrap_or_else(|| {
                let table = shared.routes.table.load();
                match table.lookup(destination) {
                    crate::table::Lookup::Found(d) => d.protocol,
                    _ => Protocol::Detect,
                }
            });
            (
                protocol,
                Side::Outbound {
                    fixed: Some(Arc::clone(destination)),
                    gateway: None,
                },
            )
        }
        ListenerKind::Inbound => {
            // Boxed: the task of a connection still in detection stays small (its future is
            // as large as its largest state, and the TLS and HTTP states are large).
            return Box::pin(serve_inbound(
                stream, peer, local_port, false, shared, shutdown,
            ))
            .await;
        }
    };
    if protocol == Protocol::Tcp {
        return Box::pin(forward_tcp(stream, &kind, &side, shared, None)).await;
    }
    let timeout = if protocol == Protocol::Detect {
        limits.detect_timeout()
    } else {
        limits.header_read_timeout()
    };
    let (detected, prefix) = match read_prefix(&mut stream, timeout).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "connection closed during protocol detection");
            return;
        }
    };
    let first_byte = silent(detected, &prefix).then(|| limits.opaque_first_byte_timeout());
    let io = PrefixedIo::new(prefix, stream);
    match detected {
        Detected::Http2 => Box::pin(serve_http2(io, side, shared, &limits, shutdown)).await,
        // Outbound listeners take no UDP tunnels: those bytes are the client's, opaque.
        Detected::Opaque | Detected::UdpTunnel if protocol == Protocol::Detect => {
            Box::pin(forward_tcp(io, &kind, &side, shared, first_byte)).await
        }
        // HTTP/1 or garbage on an HTTP port: hyper answers garbage with 400.
        _ => Box::pin(serve_http1(io, side, shared, &limits, shutdown)).await,
    }
}

/// Whether detection ended because the client sent nothing before the timeout (a server-first
/// protocol, or a client pinning a connection: see `limits.opaque_first_byte_timeout_ms`).
fn silent(detected: Detected, prefix: &[u8]) -> bool {
    detected == Detected::Opaque && prefix.is_empty()
}

/// The first byte of a TLS handshake record (a ClientHello starts with it; no HTTP request and
/// no HTTP/2 preface does).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// hyper's HTTP/1 limit on header fields when none is set.
const HYPER_MAX_HEADERS: usize = 100;

/// The inbound listener: per-source limit, TLS-or-plaintext detection, mTLS handshake (the
/// caller's SPIFFE id from its certificate), then HTTP or opaque TCP to the application.
pub(crate) async fn serve_inbound(
    mut stream: TcpStream,
    peer: SocketAddr,
    port: u16,
    transparent: bool,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let limits = shared.limits.clone();
    let Some(_source) = shared
        .sources
        .open(peer.ip(), limits.max_connections_per_source)
    else {
        tracing::debug!(%peer, "inbound connection refused: too many from this source");
        shared.metrics.refused("per-source-limit");
        shared
            .connections
            .refuse(inbound_index(transparent), "per-source-limit");
        return;
    };
    let caller = Caller {
        peer,
        identity: None,
        port,
        transparent,
    };
    let Some(policy) = caller.policy_in(&shared.routes.table.load()).cloned() else {
        // A transparent port without a policy: refused (fail safe).
        shared
            .connections
            .refuse(inbound_index(transparent), "no-policy");
        return;
    };
    let mtls = shared.identity.is_configured();
    if !mtls && policy.protocol == Protocol::Tcp {
        // No identity source: plaintext only, and nothing to detect (server-first protocols work).
        return Box::pin(serve_inbound_stream(
            stream, None, false, caller, shared, shutdown,
        ))
        .await;
    }
    let timeout = match policy.protocol {
        Protocol::Detect | Protocol::Tcp => limits.detect_timeout(),
        Protocol::Http | Protocol::Http2 => limits.header_read_timeout(),
    };
    let (detected, prefix) = match read_prefix(&mut stream, timeout).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "connection closed during protocol detection");
            return;
        }
    };
    let tls = mtls && prefix.first() == Some(&TLS_HANDSHAKE_RECORD);
    let quiet = silent(detected, &prefix);
    let io = PrefixedIo::new(prefix, stream);
    if !tls {
        let next = serve_inbound_stream(io, Some(detected), quiet, caller, shared, shutdown);
        return Box::pin(next).await;
    }
    // Boxed, like every state after detection: a connection waiting for its first bytes does
    // not carry the size of a TLS handshake.
    Box::pin(serve_inbound_tls(io, caller, policy, shared, shutdown)).await
}

/// The inbound mTLS handshake (within the handshake limit and timeout), then HTTP by ALPN or
/// opaque TCP.
async fn serve_inbound_tls(
    io: PrefixedIo<TcpStream>,
    mut caller: Caller,
    policy: Arc<crate::table::InboundTable>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let limits = shared.limits.clone();
    let peer = caller.peer;
    let Some(generation) = shared.identity.current() else {
        tracing::debug!(%peer, "mTLS connection refused: this proxy has no valid certificate");
        shared.metrics.tls_error("inbound", "no-identity");
        return;
    };
    let deadline = tokio::time::Instant::now() + limits.tls_handshake_timeout();
    let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, shared.handshakes.acquire()).await
    else {
        shared.metrics.refused("handshake-limit");
        shared
            .connections
            .refuse(inbound_index(caller.transparent), "handshake-limit");
        return;
    };
    let started = std::time::Instant::now();
    let accepted = tokio::time::timeout_at(deadline, crate::tls::accept(&generation, io)).await;
    drop(permit);
    let tls = match accepted {
        Ok(Ok((tls, id))) => {
            shared.metrics.tls_handshake("inbound", started.elapsed());
            caller.identity = Some(Label::from(id.as_str()));
            tls
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "inbound mTLS handshake failed");
            shared
                .metrics
                .tls_error("inbound", crate::tls::io_reason(&e));
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "inbound mTLS handshake timed out");
            shared.metrics.tls_error("inbound", "timeout");
            return;
        }
    };
    let side = |caller| Side::Inbound { caller };
    if policy.protocol == Protocol::Tcp {
        // An opaque port stays opaque whatever the client offered in ALPN.
        return Box::pin(serve_inbound_stream(
            tls, None, false, caller, shared, shutdown,
        ))
        .await;
    }
    match tls.get_ref().1.alpn_protocol() {
        Some(crate::tls::ALPN_H2) => {
            Box::pin(serve_http2(tls, side(caller), shared, &limits, shutdown)).await
        }
        Some(crate::tls::ALPN_HTTP1) => {
            Box::pin(serve_http1(tls, side(caller), shared, &limits, shutdown)).await
        }
        _ => {
            Box::pin(serve_inbound_stream(
                tls, None, false, caller, shared, shutdown,
            ))
            .await
        }
    }
}

/// Serve an inbound byte stream (plaintext, or inside TLS without ALPN): detect unless
/// `detected` says already (`silent`: the client sent nothing), then HTTP, a UDP tunnel or
/// (authorized) opaque TCP.
async fn serve_inbound_stream<IO>(
    mut io: IO,
    detected: Option<Detected>,
    silent_client: bool,
    caller: Caller,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(policy) = caller.policy_in(&shared.routes.table.load()).cloned() else {
        return;
    };
    let limits = shared.limits.clone();
    if policy.protocol == Protocol::Tcp {
        return forward_inbound_tcp(io, caller, shared, None).await;
    }
    let (detected, quiet, io) = match detected {
        Some(d) => (d, silent_client, PrefixedIo::new(bytes::Bytes::new(), io)),
        None => {
            let timeout = if policy.protocol == Protocol::Detect {
                limits.detect_timeout()
            } else {
                limits.header_read_timeout()
            };
            match read_prefix(&mut io, timeout).await {
                Ok((d, prefix)) => (d, silent(d, &prefix), PrefixedIo::new(prefix, io)),
                Err(e) => {
                    tracing::debug!(peer = %caller.peer, error = %e, "connection closed during protocol detection");
                    return;
                }
            }
        }
    };
    if detected == Detected::UdpTunnel {
        // A UDP tunnel from another proxy (UDPRoute), on any port that detects: the header
        // names the application's UDP port, which the caller is authorized for.
        return Box::pin(crate::udp::serve_inbound(io, caller, shared)).await;
    }
    let side = Side::Inbound { caller };
    let first_byte = quiet.then(|| limits.opaque_first_byte_timeout());
    match detected {
        Detected::Http2 => Box::pin(serve_http2(io, side, shared, &limits, shutdown)).await,
        Detected::Opaque if policy.protocol == Protocol::Detect => {
            let Side::Inbound { caller } = side else {
                return;
            };
            Box::pin(forward_inbound_tcp(io, caller, shared, first_byte)).await
        }
        _ => Box::pin(serve_http1(io, side, shared, &limits, shutdown)).await,
    }
}

/// `first_byte`: the client sent nothing yet and must within this long (see
/// `limits.opaque_first_byte_timeout_ms`).
async fn forward_inbound_tcp<IO>(
    io: IO,
    caller: Caller,
    shared: Arc<Shared>,
    first_byte: Option<Duration>,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let Some(policy) = caller.policy_in(&shared.routes.table.load()).cloned() else {
        return;
    };
    if shared.authorizer.authorize_connection(&policy, &caller) == Verdict::Deny {
        tracing::debug!(peer = %caller.peer, identity = ?caller.identity, "inbound TCP connection denied");
        return;
    }
    crate::tcp::forward_inbound(shared, policy.app, &caller, io, first_byte).await
}

async fn forward_tcp<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    kind: &ListenerKind,
    side: &Side,
    shared: Arc<Shared>,
    first_byte: Option<Duration>,
) {
    match (kind, side) {
        (ListenerKind::OutboundPort { destination, .. }, _) => {
            crate::tcp::forward_outbound(shared, destination, io, first_byte).await
        }
        (
            ListenerKind::Inbound
            | ListenerKind::OutboundHttp
            | ListenerKind::OutboundTransparent { .. }
            | ListenerKind::InboundTransparent { .. }
            | ListenerKind::Gateway { .. }
            | ListenerKind::GatewayRedirect { .. },
            _,
        ) => {}
    }
}

/// Serve HTTP/1.1 on `io` with the proxy's limits (exposed for the fuzz target).
pub async fn serve_http1<IO>(
    io: IO,
    side: Side,
    shared: Arc<Shared>,
    limits: &Limits,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let service = tracked_service(side, shared, Arc::clone(&activity));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // `HeadDeadline` enforces the limit (with a 408); hyper's own timer, which would close
        // without an answer, is only the backstop.
        .header_read_timeout(limits.header_read_timeout() + Duration::from_secs(1))
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_header_size(limits.max_header_bytes)
        .keep_alive(true);
    // hyper's own limit is 100 fields; set explicitly, even to 100, it fills two 100-entry
    // arrays for every request head it parses (0.6% of the proxy's CPU in the benchmark).
    if limits.max_headers != HYPER_MAX_HEADERS {
        builder.max_headers(limits.max_headers);
    }
    let io = HeadDeadline::new(io, activity, limits.header_read_timeout());
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => log_conn_end(result),
        _ = stopped(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            log_conn_end(conn.await);
        }
    }
}

/// Serve HTTP/2 (prior knowledge) on `io` with the proxy's limits.
pub async fn serve_http2<IO>(
    io: IO,
    side: Side,
    shared: Arc<Shared>,
    limits: &Limits,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let service = tracked_service(side, shared, Arc::clone(&activity));
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let idle_limit = limits.header_read_timeout();
    tokio::select! {
        result = conn.as_mut() => log_conn_end(result),
        _ = stopped(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            log_conn_end(conn.await);
        }
        _ = activity.idle_for(idle_limit) => {
            // No request in progress for the whole limit (a header block that never ends looks
            // like this too): GOAWAY, then a bounded wait for the peer to see it.
            tracing::debug!("closing an idle HTTP/2 connection");
            conn.as_mut().graceful_shutdown();
            if let Ok(result) = tokio::time::timeout(idle_limit, conn.as_mut()).await {
                log_conn_end(result);
            }
        }
    }
}

/// The requests of one connection: how many are in progress (from the service call to the end
/// of their response body) and a generation that moves at every start and end, so a watchdog
/// can tell "idle for the whole limit" from "busy in between".
#[derive(Debug, Default)]
struct Activity {
    open: AtomicUsize,
    generation: AtomicU64,
    /// The connection became a tunnel (101 Switching Protocols): no more heads to wait for.
    upgraded: std::sync::atomic::AtomicBool,
}

impl Activity {
    fn start(self: &Arc<Self>) -> RequestGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.generation.fetch_add(1, Ordering::AcqRel);
        RequestGuard(Arc::clone(self))
    }

    fn busy(&self) -> bool {
        self.open.load(Ordering::Acquire) > 0 || self.upgraded.load(Ordering::Acquire)
    }

    /// Completes once no request has been in progress for `limit` (between `limit` and twice
    /// `limit` after the last one ended).
    async fn idle_for(&self, limit: Duration) {
        loop {
            let generation = self.generation.load(Ordering::Acquire);
            let was_idle = !self.busy();
            tokio::time::sleep(limit).await;
            if was_idle && !self.busy() && self.generation.load(Ordering::Acquire) == generation {
                return;
            }
        }
    }
}

/// One request in progress; dropped when its response body ends or is dropped.
#[derive(Debug)]
struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in progress until it ends.
#[derive(Debug)]
struct TrackedBody {
    body: ProxyBody,
    _request: RequestGuard,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = crate::http::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::http::BodyError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The proxy's request handler for one connection, counting its requests in `activity`.
fn tracked_service(
    side: Side,
    shared: Arc<Shared>,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<TrackedBody>,
    Error = std::convert::Infallible,
    Future = RequestFuture,
> + Clone {
    let side = Arc::new(side);
    service_fn(move |req| {
        let request = activity.start();
        let shared = Arc::clone(&shared);
        let side = Arc::clone(&side);
        let activity = Arc::clone(&activity);
        // Boxed, and `handle`'s future made inside the box: a request's future is several KiB
        // (the outbound stack, the access-log and trace states), and unboxed it was copied
        // whole each time it moved: into HTTP/2's per-stream task, into HTTP/1's dispatcher
        // slot, into its first poll. One allocation instead: measured in a profile of h2c with
        // 10 streams per connection, memmove took 21% of the proxy's CPU before.
        Box::pin(async move {
            let resp = handle(shared, side, req).await?;
            if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                activity.upgraded.store(true, Ordering::Release);
            }
            Ok(resp.map(|body| TrackedBody {
                body,
                _request: request,
            }))
        }) as RequestFuture
    })
}

/// The boxed future of one request ([`tracked_service`]).
type RequestFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<http::Response<TrackedBody>, std::convert::Infallible>,
            > + Send,
    >,
>;

/// The HTTP/1 request-head deadline, enforced where hyper cannot answer: in the connection's
/// reads. While no request is in progress, hyper's reads wait for the next head; if it has not
/// arrived within the limit, a started head is answered `408 Request Timeout` and an idle
/// keep-alive connection is simply closed. Either way the read fails, so hyper closes the
/// connection without an answer of its own.
struct HeadDeadline<IO> {
    io: IO,
    activity: Arc<Activity>,
    limit: Duration,
    /// The head being waited for: the generation when the wait began, and its deadline.
    waiting: Option<(u64, Pin<Box<tokio::time::Sleep>>)>,
    /// Bytes of the awaited head received so far (0: an idle keep-alive connection).
    head_bytes: usize,
}

/// What a client whose head did not arrive in time is told (then the connection closes).
const REQUEST_TIMEOUT_408: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\nx-trellis-error: header-timeout\r\n\r\n";

impl<IO> HeadDeadline<IO> {
    fn new(io: IO, activity: Arc<Activity>, limit: Duration) -> Self {
        HeadDeadline {
            io,
            activity,
            limit,
            waiting: None,
            head_bytes: 0,
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadDeadline<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.activity.busy() {
            // A request is in progress: reads are its body (or a pipelined head, whose wait
            // starts when the response is done; the generation will have moved by then).
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let generation = this.activity.generation.load(Ordering::Acquire);
        match &mut this.waiting {
            Some((g, _)) if *g == generation => {}
            Some((g, deadline)) => {
                // A new head is awaited: the same timer, re-armed (no allocation per request).
                *g = generation;
                deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + this.limit);
                this.head_bytes = 0;
            }
            None => {
                this.waiting = Some((generation, Box::pin(tokio::time::sleep(this.limit))));
                this.head_bytes = 0;
            }
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.head_bytes += buf.filled().len() - before;
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        let expired = this
            .waiting
            .as_mut()
            .is_some_and(|(_, deadline)| deadline.as_mut().poll(cx).is_ready());
        if !expired {
            return Poll::Pending;
        }
        if this.head_bytes > 0 {
            // Best effort: the socket buffer of a connection waiting for its head is empty.
            if let Poll::Ready(Ok(n)) = Pin::new(&mut this.io).poll_write(cx, REQUEST_TIMEOUT_408)
                && n == REQUEST_TIMEOUT_408.len()
            {
                let _ = Pin::new(&mut this.io).poll_flush(cx);
            }
        }
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "request head not received in time",
        )))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn log_conn_end(result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's task is as large as its future's largest state, and that is what each
    /// connection of a flood costs while it waits for its first bytes. The TLS, HTTP and TCP
    /// states are boxed, so the futures of a connection in detection stay small: measured
    /// 12,096 bytes (debug) before for `serve_connection`, and the boxed `serve_inbound` was
    /// ~12 KB a connection on the inbound port in a release build.
    #[tokio::test]
    async fn the_futures_of_a_connection_in_detection_are_small() {
        let config = crate::config::Config::default();
        let mut registry = prometheus_client::registry::Registry::default();
        let shared = Arc::new(
            Shared::new(
                &config,
                &mut registry,
                Arc::new(crate::authz::PolicyAuthorizer),
                None,
            )
            .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let (_stop, shutdown) = watch::channel(false);
        const BOUND: usize = 2048;
        let connection = serve_connection(
            stream,
            peer,
            ListenerKind::OutboundHttp,
            Arc::clone(&shared),
            shutdown.clone(),
        );
        let size = std::mem::size_of_val(&connection);
        drop(connection);
        println!("serve_connection: {size} bytes");
        assert!(size < BOUND, "serve_connection: {size} bytes");

        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let inbound = serve_inbound(
            stream,
            peer,
            1,
            false,
            Arc::clone(&shared),
            shutdown.clone(),
        );
        let size = std::mem::size_of_val(&inbound);
        println!("serve_inbound: {size} bytes");
        assert!(size < BOUND, "serve_inbound: {size} bytes");

        let caller = Caller {
            peer,
            identity: None,
            port: 1,
            transparent: false,
        };
        let (_c, io) = tokio::io::duplex(16);
        let opaque = forward_inbound_tcp(
            io,
            caller,
            Arc::clone(&shared),
            Some(Duration::from_secs(1)),
        );
        let size = std::mem::size_of_val(&opaque);
        println!("forward_inbound_tcp: {size} bytes");
        assert!(size < 2 * BOUND, "forward_inbound_tcp: {size} bytes");
    }
}
