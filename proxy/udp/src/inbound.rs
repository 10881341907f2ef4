//! The called side: one accepted stream (a caller proxy's tunnel) carries one caller session;
//! its datagrams go to the local application from a UDP socket of their own, connected to the
//! application, so the application's replies come back to that socket (and only the
//! application's: a connected socket takes no datagrams from anyone else) and are framed back.
//!
//! Authorization stays with the proxy, which knows the caller: it has verified the peer's
//! certificate before handing the stream over, and decides in the `authorize` callback of
//! [`UdpInbound::serve`] from the stream header (the target port, which is what a
//! TrafficTarget's UDPRoute rule names) whether this caller may reach that port, and at which
//! address. It can also end a served stream at any time (`revoked`), e.g. when the policy
//! changes and no longer allows the caller, as it does for opaque TCP.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::counters::{Counters, OpenSession, add, inc};
use crate::idle::Clock;
use crate::outbound::Refused;
use crate::wire::{Header, HeaderError, MAX_DATAGRAM, codec};

/// The bounds of a [`UdpInbound`].
#[derive(Debug, Clone)]
pub struct InboundConfig {
    /// A stream with no datagram either way for this long is closed (and its socket). Longer
    /// than the calling side's (the default is), so that the caller, which knows when its
    /// client went quiet, is the one that closes.
    pub idle_timeout: Duration,
    /// How long the stream header may take to arrive.
    pub header_timeout: Duration,
    /// Longer datagrams from the application are dropped (`dropped_oversized`), and a caller
    /// sending a longer frame has its stream closed; at most (and by default) [`MAX_DATAGRAM`].
    pub max_datagram: usize,
}

impl Default for InboundConfig {
    fn default() -> Self {
        InboundConfig {
            idle_timeout: Duration::from_secs(75),
            header_timeout: Duration::from_secs(10),
            max_datagram: MAX_DATAGRAM,
        }
    }
}

/// How serving a stream ended.
#[derive(Debug)]
pub enum Ended {
    /// The stream header was missing, late or wrong (nothing was forwarded).
    BadHeader(HeaderError),
    /// `authorize` refused the caller (nothing was forwarded).
    Refused(Refused),
    /// No datagram either way for the idle timeout.
    Idle,
    /// The caller closed the stream.
    CallerClosed,
    /// `revoked` resolved.
    Revoked,
    /// The stream failed, or the caller broke the protocol (a frame over the maximum).
    Tunnel(io::Error),
    /// The application's UDP socket could not be made, or failed.
    Socket(io::Error),
}

/// The called side of UDP forwarding (see the module docs). One per listener or per proxy;
/// [`UdpInbound::serve`] runs once per accepted stream, concurrently.
#[derive(Debug)]
pub struct UdpInbound {
    config: InboundConfig,
    counters: Arc<Counters>,
}

/// Datagrams from the application written to the tunnel per flush at most.
const BATCH: usize = 32;

impl UdpInbound {
    /// A forwarder with these bounds.
    pub fn new(mut config: InboundConfig) -> Self {
        config.max_datagram = config.max_datagram.min(MAX_DATAGRAM);
        UdpInbound {
            config,
            counters: Arc::new(Counters::default()),
        }
    }

    /// The counters (shared by every stream served).
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// Serve one accepted stream: read its header (within `header_timeout`), ask `authorize`
    /// for the application's address for the header's port (or a refusal: the stream is then
    /// closed without a byte forwarded), then [`UdpInbound::forward`].
    pub async fn serve<S, F>(
        &self,
        mut stream: S,
        authorize: F,
        revoked: impl Future<Output = ()>,
    ) -> Ended
    where
        S: AsyncRead + AsyncWrite + Unpin,
        F: FnOnce(Header) -> Result<SocketAddr, Refused>,
    {
        let header =
            match tokio::time::timeout(self.config.header_timeout, Header::read(&mut stream)).await
            {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    inc(&self.counters.sessions_refused);
                    return Ended::BadHeader(e);
                }
                Err(_) => {
                    inc(&self.counters.sessions_refused);
                    return Ended::BadHeader(HeaderError::Io(io::ErrorKind::TimedOut.into()));
                }
            };
        match authorize(header) {
            Ok(app) => self.forward(stream, app, revoked).await,
            Err(refused) => {
                tracing::debug!(%header, reason = refused.reason, "UDP tunnel refused");
                inc(&self.counters.sessions_refused);
                Ended::Refused(refused)
            }
        }
    }

    /// Forward the datagrams of `stream` (its header already read) to `app` and the replies
    /// back, until the stream ends, is idle, or `revoked` resolves.
    pub async fn forward<S>(
        &self,
        stream: S,
        app: SocketAddr,
        revoked: impl Future<Output = ()>,
    ) -> Ended
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let socket = match connect(app).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%app, error = %e, "UDP tunnel closed: no socket to the application");
                return Ended::Socket(e);
            }
        };
        let _open = OpenSession::new(Arc::clone(&self.counters));
        let max = self.config.max_datagram;
        let counters = &self.counters;
        let (r, w) = tokio::io::split(stream);
        let mut reader = FramedRead::new(r, codec(max));
        let mut writer = FramedWrite::new(w, codec(max));
        let clock = Clock::new();
        let ended = {
            let up = async {
                loop {
                    let frame = match reader.next().await {
                        None => return Ended::CallerClosed,
                        Some(Ok(f)) => f,
                        Some(Err(e)) => {
                            if crate::oversized_frame(&e) {
                                inc(&counters.dropped_oversized);
                            }
                            return Ended::Tunnel(e);
                        }
                    };
                    clock.touch();
                    match socket.send(&frame).await {
                        Ok(n) => {
                            inc(&counters.sent_datagrams);
                            add(&counters.sent_bytes, n as u64);
                        }
                        // The application's port closed (an ICMP error of an earlier datagram
                        // surfaces here): this datagram is lost, as it would be without the
                        // mesh; the application may be back for the next.
                        Err(e) => {
                            tracing::debug!(%app, error = %e, "UDP datagram not sent to the application");
                            inc(&counters.send_errors);
                        }
                    }
                }
            };
            let down = async {
                let mut buf = vec![0u8; max + 1];
                loop {
                    let n = match socket.recv(&mut buf).await {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                        Err(e) => return Ended::Socket(e),
                    };
                    let (mut taken, mut framed) = (0, 0);
                    let mut next = Some(n);
                    // This datagram, then those already waiting, up to a batch per flush.
                    while let Some(n) = next.take() {
                        taken += 1;
                        inc(&counters.received_datagrams);
                        add(&counters.received_bytes, n as u64);
                        if n > max {
                            inc(&counters.dropped_oversized);
                        } else {
                            let datagram = Bytes::copy_from_slice(&buf[..n]);
                            if let Err(e) = writer.feed(datagram).await {
                                return Ended::Tunnel(e);
                            }
                            framed += 1;
                        }
                        if taken < BATCH {
                            next = socket.try_recv(&mut buf).ok();
                        }
                    }
                    if let Err(e) = SinkExt::<Bytes>::flush(&mut writer).await {
                        return Ended::Tunnel(e);
                    }
                    add(&counters.tunneled_datagrams, framed as u64);
                    clock.touch();
                }
            };
            tokio::select! {
                e = up => e,
                e = down => e,
                () = clock.idle_for(self.config.idle_timeout) => Ended::Idle,
                () = revoked => Ended::Revoked,
            }
        };
        match &ended {
            Ended::Idle | Ended::Revoked => {
                if matches!(ended, Ended::Idle) {
                    inc(&counters.sessions_idle);
                }
                tracing::debug!(%app, ?ended, "UDP tunnel closed");
                // Tell the caller (TLS: close_notify) rather than vanish; bounded.
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), writer.get_mut().shutdown()).await;
            }
            Ended::Tunnel(e) => {
                tracing::debug!(%app, error = %e, "UDP tunnel failed");
                inc(&counters.tunnel_failures);
            }
            _ => {}
        }
        ended
    }
}

/// A UDP socket connected to `app`, bound to an ephemeral port of its address family.
async fn connect(app: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = if app.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(any).await?;
    socket.connect(app).await?;
    Ok(socket)
}
