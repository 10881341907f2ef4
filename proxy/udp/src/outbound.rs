//! The calling side: a UDP socket the local clients send to, one session per client address
//! (source), each carried in its own tunnel that a [`Route`] opens.
//!
//! One task reads the socket and hands each datagram to its source's session through a small
//! queue (it never waits for a session: a full queue drops the datagram, as a full socket
//! buffer would). A session task asks the route for a tunnel, writes the stream header and the
//! datagrams into it, and sends the frames coming back to its source from the same socket, so
//! the client sees its replies come from the address it sent to.
//!
//! Bounds, all in [`OutboundConfig`]: at most `max_sessions` sources at once (datagrams of a
//! new source beyond that are dropped and counted, the sessions in place keep working); a
//! session closes after `idle_timeout` without a datagram either way; a source opens at most
//! one tunnel per `retry_after` when its tunnels are refused or fail (so a caller the far side
//! denies costs one handshake per `retry_after`, not one per datagram); datagrams longer than
//! `max_datagram` are dropped.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::counters::{Counters, OpenSession, add, inc};
use crate::idle::Clock;
use crate::wire::{Header, MAX_DATAGRAM, codec};

/// A byte stream a session's datagrams travel in: in the proxy, the mutual-TLS connection to
/// the chosen endpoint's proxy; in tests, also a plain TCP connection or an in-memory pipe.
pub trait Tunnel: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Tunnel for T {}

/// A tunnel opened for a session, and the UDP port of the called application it is for (sent
/// in the stream header; the called side authorizes for and forwards to that port).
pub struct Opened {
    /// The stream.
    pub tunnel: Box<dyn Tunnel>,
    /// The application's UDP port on the called side.
    pub port: u16,
}

impl Opened {
    /// A tunnel for datagrams to `port` on the far side.
    pub fn new(tunnel: impl Tunnel, port: u16) -> Self {
        Opened {
            tunnel: Box::new(tunnel),
            port,
        }
    }
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opened").field("port", &self.port).finish()
    }
}

/// A session that may not be opened (or a stream that may not be served), and why: a short,
/// fixed reason fit for a metric label and a log line ("unknown-destination", "no-endpoints",
/// "connect-failed", "forbidden"...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("UDP session refused: {reason}")]
pub struct Refused {
    /// Why.
    pub reason: &'static str,
}

impl Refused {
    /// Refused for `reason`.
    pub fn new(reason: &'static str) -> Self {
        Refused { reason }
    }
}

/// Where a new session goes: the proxy's routing (the TrafficSplit picked per session, a
/// balanced endpoint, the mTLS connection to it). Asked once per session, never per datagram.
pub trait Route: Send + Sync + 'static {
    /// Open the tunnel for the datagrams of `source`, or refuse them. Bounded by
    /// [`OutboundConfig::open_timeout`] (a late answer counts as refused, "open-timeout").
    fn open(&self, source: SocketAddr) -> impl Future<Output = Result<Opened, Refused>> + Send;
}

/// The bounds of a [`UdpOutbound`].
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Sources served at once; datagrams of further sources are dropped (counted in
    /// `dropped_session_limit`) until a session closes.
    pub max_sessions: usize,
    /// A session with no datagram either way for this long is closed (its tunnel too).
    pub idle_timeout: Duration,
    /// Datagrams waiting per session (while its tunnel opens, or when it is slower than the
    /// source); further ones are dropped (`dropped_queue_full`).
    pub queue: usize,
    /// How long [`Route::open`] may take.
    pub open_timeout: Duration,
    /// A source opens at most one tunnel per this long while its tunnels are refused or fail;
    /// its datagrams in between are dropped (`dropped_refused`).
    pub retry_after: Duration,
    /// Longer datagrams are dropped (`dropped_oversized`); at most (and by default)
    /// [`MAX_DATAGRAM`]. Both ends should use the same value: the called side closes a tunnel
    /// that brings it a longer frame.
    pub max_datagram: usize,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            max_sessions: 1024,
            // Conntrack's UDP stream timeout is 120 s, Envoy's UDP proxy idles out at 60 s.
            idle_timeout: Duration::from_secs(60),
            queue: 128,
            open_timeout: Duration::from_secs(10),
            retry_after: Duration::from_secs(1),
            max_datagram: MAX_DATAGRAM,
        }
    }
}

/// The calling side of UDP forwarding (see the module docs).
#[derive(Debug)]
pub struct UdpOutbound<R> {
    ctx: Arc<Context<R>>,
    /// Datagrams received elsewhere for this forwarder ([`UdpOutbound::injector`]).
    injected: Option<mpsc::Receiver<(SocketAddr, Bytes)>>,
}

#[derive(Debug)]
struct Context<R> {
    socket: UdpSocket,
    route: R,
    config: OutboundConfig,
    counters: Arc<Counters>,
}

/// Datagrams written to a tunnel per flush at most (they queued while the last flush ran):
/// fewer writes, and with TLS fewer records, under load.
const BATCH: usize = 32;

impl<R: Route> UdpOutbound<R> {
    /// Serve the clients of `socket` (bound by the caller: the port a UDPRoute names, or the
    /// local port of an upstream) through `route`.
    pub fn new(socket: UdpSocket, route: R, mut config: OutboundConfig) -> Self {
        config.max_datagram = config.max_datagram.min(MAX_DATAGRAM);
        config.max_sessions = config.max_sessions.max(1);
        config.queue = config.queue.max(1);
        UdpOutbound {
            ctx: Arc::new(Context {
                socket,
                route,
                config,
                counters: Arc::new(Counters::default()),
            }),
            injected: None,
        }
    }

    /// A sender of datagrams that reached this proxy elsewhere but belong to this forwarder's
    /// clients: each `(source, datagram)` is served as if the socket had received it (sessions,
    /// bounds and counters alike). A transparent catch-all socket uses it for the datagrams of
    /// a destination that came in before this forwarder's own socket was bound for it. At most
    /// `capacity` wait; `try_send` refuses more.
    pub fn injector(&mut self, capacity: usize) -> mpsc::Sender<(SocketAddr, Bytes)> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.injected = Some(rx);
        tx
    }

    /// The counters (shared: they keep counting while [`UdpOutbound::run`] runs).
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.ctx.counters)
    }

    /// The socket's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.ctx.socket.local_addr()
    }

    /// Forward until `shutdown` resolves (then every session is closed at once) or the socket
    /// fails for good.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let ctx = self.ctx;
        let mut injected = self.injected;
        let max = ctx.config.max_datagram;
        let mut sessions: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
        // Dropping the set (when this returns) aborts the sessions.
        let mut tasks = JoinSet::new();
        // One byte more than the largest datagram allowed: a datagram that fills it was longer.
        let mut buf = vec![0u8; max + 1];
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    match done {
                        // A newer session of the same source (opened after this one let go
                        // of its queue) stays.
                        Ok(source) => {
                            if sessions.get(&source).is_some_and(|tx| tx.is_closed()) {
                                sessions.remove(&source);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "UDP session task failed");
                            sessions.retain(|_, tx| !tx.is_closed());
                        }
                    }
                }
                Some((source, datagram)) = next_injected(&mut injected) => {
                    admit(&ctx, &mut sessions, &mut tasks, source, datagram);
                }
                received = ctx.socket.recv_from(&mut buf) => {
                    let (n, source) = match received {
                        Ok(r) => r,
                        Err(e) if transient(&e) => continue,
                        Err(e) => return Err(e),
                    };
                    admit(&ctx, &mut sessions, &mut tasks, source, Bytes::copy_from_slice(&buf[..n]));
                }
            }
        }
    }
}

/// The next injected datagram; pending for ever without an injector (or once every sender is
/// gone).
async fn next_injected(
    injected: &mut Option<mpsc::Receiver<(SocketAddr, Bytes)>>,
) -> Option<(SocketAddr, Bytes)> {
    match injected {
        Some(rx) => match rx.recv().await {
            Some(d) => Some(d),
            None => {
                *injected = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// One received datagram of `source`: into its session's queue, or a new session (within the
/// bounds), or dropped and counted.
fn admit<R: Route>(
    ctx: &Arc<Context<R>>,
    sessions: &mut HashMap<SocketAddr, mpsc::Sender<Bytes>>,
    tasks: &mut JoinSet<SocketAddr>,
    source: SocketAddr,
    datagram: Bytes,
) {
    let max = ctx.config.max_datagram;
    inc(&ctx.counters.received_datagrams);
    add(&ctx.counters.received_bytes, datagram.len() as u64);
    if datagram.len() > max {
        inc(&ctx.counters.dropped_oversized);
        tracing::debug!(%source, max, "UDP datagram dropped: longer than the maximum");
        return;
    }
    let datagram = match sessions.get(&source) {
        Some(tx) => match tx.try_send(datagram) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => {
                inc(&ctx.counters.dropped_queue_full);
                return;
            }
            // The session ended and has not been reaped yet: a new one.
            Err(mpsc::error::TrySendError::Closed(d)) => {
                sessions.remove(&source);
                d
            }
        },
        None => datagram,
    };
    if sessions.len() >= ctx.config.max_sessions {
        inc(&ctx.counters.dropped_session_limit);
        tracing::debug!(%source, max = ctx.config.max_sessions, "UDP datagram of a new source dropped: too many sessions");
        return;
    }
    let (tx, rx) = mpsc::channel(ctx.config.queue);
    // Cannot fail: the queue is new and holds at least one.
    let _ = tx.try_send(datagram);
    sessions.insert(source, tx);
    tasks.spawn(session(Arc::clone(ctx), source, rx));
}

/// Errors of `recv_from` that concern one datagram or peer, not the socket (ICMP errors are
/// reported this way on some systems).
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// How a session's tunnel ended.
enum End {
    Idle,
    /// The tunnel failed, broke the protocol or was closed by the far side.
    Tunnel(Option<io::Error>),
    /// The forwarder is stopping (its end of the queue is gone).
    Stopped,
}

/// One source's session; returns the source when it is over, so the map entry can go.
async fn session<R: Route>(
    ctx: Arc<Context<R>>,
    source: SocketAddr,
    mut rx: mpsc::Receiver<Bytes>,
) -> SocketAddr {
    let started = Instant::now();
    let opened = tokio::time::timeout(ctx.config.open_timeout, ctx.route.open(source)).await;
    let opened = match opened {
        Ok(Ok(o)) => o,
        Ok(Err(refused)) => {
            tracing::debug!(%source, reason = refused.reason, "UDP session refused");
            inc(&ctx.counters.sessions_refused);
            hold(&ctx, &mut rx, started).await;
            return source;
        }
        Err(_) => {
            tracing::debug!(%source, timeout = ?ctx.config.open_timeout, "UDP session refused: opening its tunnel timed out");
            inc(&ctx.counters.sessions_refused);
            hold(&ctx, &mut rx, started).await;
            return source;
        }
    };
    let open = OpenSession::new(Arc::clone(&ctx.counters));
    let end = carry(&ctx, source, opened, &mut rx).await;
    drop(open);
    match end {
        End::Idle => {
            tracing::debug!(%source, "UDP session closed: idle");
            inc(&ctx.counters.sessions_idle);
        }
        End::Tunnel(e) => {
            tracing::debug!(%source, error = ?e, "UDP session closed: its tunnel ended");
            inc(&ctx.counters.tunnel_failures);
            hold(&ctx, &mut rx, started).await;
        }
        End::Stopped => {}
    }
    source
}

/// Drop (and count) the source's datagrams until `retry_after` from `started`, so that a source
/// whose tunnels are refused or fail opens at most one per `retry_after`.
async fn hold<R>(ctx: &Context<R>, rx: &mut mpsc::Receiver<Bytes>, started: Instant) {
    let until = started + ctx.config.retry_after;
    // Whatever queued while the tunnel was being opened (or was not written yet) is lost too.
    while rx.try_recv().is_ok() {
        inc(&ctx.counters.dropped_refused);
    }
    while let Ok(Some(_)) = tokio::time::timeout_at(until, rx.recv()).await {
        inc(&ctx.counters.dropped_refused);
    }
}

/// Carry one session's datagrams through its tunnel until it is idle, fails or is stopped.
async fn carry<R>(
    ctx: &Context<R>,
    source: SocketAddr,
    opened: Opened,
    rx: &mut mpsc::Receiver<Bytes>,
) -> End {
    let max = ctx.config.max_datagram;
    let (r, w) = tokio::io::split(opened.tunnel);
    let mut writer = FramedWrite::new(w, codec(max));
    // The header goes out with the first datagram, in one write.
    writer
        .write_buffer_mut()
        .extend_from_slice(&Header::new(opened.port).encode());
    let mut reader = FramedRead::new(r, codec(max));
    let clock = Clock::new();
    let counters = &ctx.counters;
    let end = {
        let up = async {
            loop {
                let Some(first) = rx.recv().await else {
                    return Ok(End::Stopped);
                };
                writer.feed(first).await?;
                let mut n = 1;
                while n < BATCH {
                    let Ok(next) = rx.try_recv() else { break };
                    writer.feed(next).await?;
                    n += 1;
                }
                SinkExt::<Bytes>::flush(&mut writer).await?;
                add(&counters.tunneled_datagrams, n as u64);
                clock.touch();
            }
        };
        let down = async {
            loop {
                let frame = match reader.next().await {
                    None => return End::Tunnel(None),
                    Some(Ok(f)) => f,
                    Some(Err(e)) => {
                        if crate::oversized_frame(&e) {
                            inc(&counters.dropped_oversized);
                        }
                        return End::Tunnel(Some(e));
                    }
                };
                clock.touch();
                match ctx.socket.send_to(&frame, source).await {
                    Ok(n) => {
                        inc(&counters.sent_datagrams);
                        add(&counters.sent_bytes, n as u64);
                    }
                    Err(e) => {
                        tracing::debug!(%source, error = %e, "UDP reply could not be sent to the client");
                        inc(&counters.send_errors);
                    }
                }
            }
        };
        tokio::select! {
            e = up => e.unwrap_or_else(|e: io::Error| End::Tunnel(Some(e))),
            e = down => e,
            () = clock.idle_for(ctx.config.idle_timeout) => End::Idle,
        }
    };
    if matches!(end, End::Idle) {
        // Tell the far side (TLS: close_notify) rather than vanish; bounded, it may be gone.
        let _ = tokio::time::timeout(Duration::from_secs(1), writer.get_mut().shutdown()).await;
    }
    end
}
