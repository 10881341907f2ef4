//! UDP carried between proxies (SMI UDPRoute), wired onto the `trellis-udp` data plane: the
//! routing and the authorization it leaves to the proxy.
//!
//! * Outbound ([`outbound`]): each `outbound.udp` entry is a UDP socket served by a
//!   [`UdpOutbound`]; per client address (session) [`MeshRoute`] looks the destination up in the
//!   routing table, takes the TrafficSplit's next backend and a balanced endpoint (per session,
//!   never per datagram), and opens the connection to the endpoint's proxy as opaque TCP does:
//!   mutual TLS (no ALPN) when the endpoint has an identity, plaintext when it has none.
//! * Inbound ([`serve_inbound`]): a stream the inbound listener detected as a UDP tunnel (after
//!   the mTLS handshake, so the caller's identity is proven) is authorized for the UDP port its
//!   header names by rules that cover `udp`, forwarded to the application on that port of the
//!   application's address, and closed when a policy change no longer allows it.
//! * Transparent ([`transparent`]): datagrams the interception rules handed over (TPROXY), each
//!   served by a forwarder of its original destination.

pub mod transparent;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use trellis_udp::{Ended, Header, Opened, OutboundConfig, Refused, Route, UdpOutbound};

use crate::authz::{Caller, Verdict};
use crate::balance::{InFlight, Outcome};
use crate::config::UdpForward;
use crate::metrics::Label;
use crate::state::Shared;
use crate::table::{Lookup, PickError};
use crate::tls::Alpn;

/// The forwarder of one `outbound.udp` entry on its bound `socket`, its counters exported as
/// the `direction="outbound"` UDP series of the destination (as written).
pub fn outbound(
    socket: UdpSocket,
    forward: &UdpForward,
    shared: Arc<Shared>,
) -> UdpOutbound<MeshRoute> {
    let limits = &shared.limits;
    let config = OutboundConfig {
        max_sessions: limits.udp_max_sessions,
        idle_timeout: limits.udp_idle_timeout(),
        // A session's tunnel is a TCP connect then (usually) a TLS handshake.
        open_timeout: limits.connect_timeout() + limits.tls_handshake_timeout(),
        ..OutboundConfig::default()
    };
    let label = Label::from(forward.destination.as_str());
    let route = MeshRoute {
        destination: Arc::from(forward.destination.as_str()),
        port: crate::table::udp_port(&forward.destination),
        label: label.clone(),
        shared: Arc::clone(&shared),
    };
    let forwarder = UdpOutbound::new(socket, route, config);
    shared
        .metrics
        .udp_forwarder("outbound", label, forwarder.counters());
    forwarder
}

/// Where the sessions of an `outbound.udp` listener go: the destination's split, balancer and
/// endpoints in the routing table current when each session starts.
#[derive(Debug)]
pub struct MeshRoute {
    /// The destination as written (looked up like a per-upstream port's).
    destination: Arc<str>,
    /// The application's UDP port written in the destination; None = the endpoint's port.
    port: Option<u16>,
    label: Label,
    shared: Arc<Shared>,
}

impl MeshRoute {
    fn refuse(&self, source: SocketAddr, reason: &'static str) -> Refused {
        tracing::debug!(%source, destination = %self.destination, reason, "UDP session refused");
        self.shared
            .metrics
            .udp_refused("outbound", &self.label, reason);
        Refused::new(reason)
    }

    async fn lookup(&self) -> Option<Arc<crate::table::DestinationTable>> {
        let found = |shared: &Shared| match shared.routes.table.load().lookup(&self.destination) {
            Lookup::Found(d) => Some(d),
            _ => None,
        };
        if let Some(d) = found(&self.shared) {
            return Some(d);
        }
        // Controller mode: ask for the destination once, as opaque TCP does.
        let resolver = self.shared.routes.resolver.as_ref()?;
        let key = trellis_proxy_api::authority::normalize(&self.destination).ok()?;
        resolver.resolve(&key.key()).await;
        found(&self.shared)
    }
}

impl Route for MeshRoute {
    async fn open(&self, source: SocketAddr) -> Result<Opened, Refused> {
        let shared = &self.shared;
        let Some(dest) = self.lookup().await else {
            return Err(self.refuse(source, "unknown-destination"));
        };
        let Some(backend) = dest.route_connection() else {
            return Err(self.refuse(source, "no-backends"));
        };
        let endpoint = match backend.pick_for(None, None) {
            Ok(i) => &backend.endpoints[i],
            Err(PickError::NoEndpoints) => return Err(self.refuse(source, "no-endpoints")),
            Err(PickError::Overloaded) => return Err(self.refuse(source, "overloaded")),
        };
        let Some(port) = self.port.or_else(|| endpoint.authority.port_u16()) else {
            return Err(self.refuse(source, "no-port"));
        };
        // The session counts as in flight on its endpoint while its tunnel lives (what
        // least-request balancing weighs), as an opaque TCP connection does.
        let in_flight = endpoint.stats.start();
        let connect = TcpStream::connect(endpoint.authority.as_str());
        let tcp = match tokio::time::timeout(shared.limits.connect_timeout(), connect).await {
            Ok(Ok(s)) => s,
            _ => {
                in_flight.record_failure(Outcome::ConnectFailure, dest.ejection_counts);
                return Err(self.refuse(source, "connect-failed"));
            }
        };
        // Datagrams are small and latency-bound: never wait to coalesce them.
        let _ = tcp.set_nodelay(true);
        let expected = endpoint
            .identity
            .as_deref()
            .filter(|_| shared.identity.is_configured());
        let Some(expected) = expected else {
            tracing::debug!(%source, endpoint = %endpoint.authority, port, "UDP session opened (plaintext)");
            return Ok(Opened::new(Held::new(tcp, in_flight), port));
        };
        let tls = crate::tls::connect(
            &shared.identity,
            &shared.metrics,
            expected,
            endpoint.authority.as_str(),
            tcp,
            Alpn::None,
            shared.limits.tls_handshake_timeout(),
        )
        .await;
        match tls {
            Ok(tls) => {
                tracing::debug!(%source, endpoint = %endpoint.authority, port, "UDP session opened");
                Ok(Opened::new(Held::new(tls, in_flight), port))
            }
            Err(e) => {
                tracing::debug!(%source, endpoint = %endpoint.authority, error = %e, "UDP session: mTLS to the endpoint failed");
                Err(self.refuse(source, e.reason()))
            }
        }
    }
}

/// A tunnel that holds its endpoint's in-flight mark until it is dropped.
struct Held<T> {
    io: T,
    _in_flight: InFlight,
}

impl<T> Held<T> {
    fn new(io: T, in_flight: InFlight) -> Self {
        Held {
            io,
            _in_flight: in_flight,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Held<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Held<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Serve a stream the inbound listener detected as a UDP tunnel (`io` replays the detected
/// prefix): read its header, authorize `caller` for the header's port with the rules covering
/// `udp`, then forward datagrams to the application's UDP port until the tunnel ends, goes
/// idle or a policy change no longer allows it.
pub async fn serve_inbound<IO>(mut io: IO, caller: Caller, shared: Arc<Shared>)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    // A transparent listener's policies are watched per port on demand, and the port a tunnel
    // is authorized for is the UDP port its header names: ask about it first (as the first TCP
    // connection to a port does), then hand the header on with the stream.
    let mut header = bytes::Bytes::new();
    if caller.transparent {
        let read = tokio::time::timeout(shared.limits.header_read_timeout(), Header::read(&mut io));
        let Ok(Ok(h)) = read.await else {
            tracing::debug!(peer = %caller.peer, "inbound UDP tunnel closed: no valid header");
            return;
        };
        if let Some(resolver) = &shared.routes.resolver {
            resolver.inbound(h.port).await;
        }
        header = bytes::Bytes::copy_from_slice(&h.encode());
    }
    let io = crate::detect::PrefixedIo::new(header, io);
    // Subscribed before the first decision: a change between the two is seen by `revoked`'s
    // first check.
    let mut changes = shared.routes.table_changes.subscribe();
    let authorized: OnceLock<Caller> = OnceLock::new();
    let refuse = |caller: &Caller, reason: &'static str| {
        tracing::debug!(peer = %caller.peer, identity = ?caller.identity, port = caller.port, reason, "inbound UDP tunnel refused");
        shared
            .metrics
            .udp_refused("inbound", &Label::from(""), reason);
        Refused::new(reason)
    };
    let authorize = |header: Header| {
        // What UDPRoute rules name is the application's UDP port: the header's.
        let caller = Caller {
            port: header.port,
            ..caller.clone()
        };
        let table = shared.routes.table.load();
        let Some(policy) = caller.policy_in(&table) else {
            return Err(refuse(&caller, "no-policy"));
        };
        if shared.authorizer.authorize_udp(policy, &caller) != Verdict::Allow {
            return Err(refuse(&caller, "forbidden"));
        }
        let app = SocketAddr::new(policy.app.ip(), header.port);
        let _ = authorized.set(caller);
        Ok(app)
    };
    let revoked = async {
        // Polled only once `authorize` allowed the tunnel.
        match authorized.get() {
            Some(caller) => revoked(&shared, caller, &mut changes).await,
            None => std::future::pending().await,
        }
    };
    match shared.udp_inbound.serve(io, authorize, revoked).await {
        Ended::Revoked => {
            tracing::info!(peer = %caller.peer, identity = ?caller.identity, "closing inbound UDP tunnel: the policy no longer allows it");
        }
        Ended::BadHeader(e) => {
            tracing::debug!(peer = %caller.peer, error = %e, "inbound UDP tunnel closed: bad header");
        }
        ended => tracing::debug!(peer = %caller.peer, ?ended, "inbound UDP tunnel ended"),
    }
}

/// Resolves when a policy change no longer allows `caller`'s tunnel (checked at once too).
async fn revoked(shared: &Shared, caller: &Caller, changes: &mut watch::Receiver<u64>) {
    loop {
        let allowed = {
            let table = shared.routes.table.load();
            caller.policy_in(&table).is_some_and(|policy| {
                shared.authorizer.authorize_udp(policy, caller) == Verdict::Allow
            })
        };
        if !allowed {
            return;
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}
