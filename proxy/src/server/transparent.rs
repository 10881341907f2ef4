//! Transparent mode: connections the pod's interception rules redirected to the proxy (iptables
//! nat `REDIRECT`, installed by the init container `trellis-init`: outbound TCP of every UID but
//! the proxy's to the outbound port, inbound TCP to the inbound port). The application knows
//! nothing of the proxy; the original destination, read from the socket, is all there is.
//!
//! - **Outbound**: the original destination `IP:PORT` is looked up as a destination key (the
//!   controller maps it back to the mesh, see `Destinations.Watch`): a Service's virtual address
//!   gets that Service's profile and the connection is served exactly as a per-upstream port to
//!   it would be (protocol detection, HTTP/1, h2, opaque TCP, split, routes, mTLS); a pod IP gets
//!   that pod; an address the mesh does not know is forwarded **unchanged** as opaque TCP to the
//!   original destination, unless egress is locked down (`outbound.egress:
//!   deny`): then it is closed at once (`reason="egress-denied"`). The answer is cached per
//!   `IP:PORT` like any destination (one watch per key, no controller call per connection).
//!   Before either, on a port an ExternalService declares, the connection's first bytes are
//!   peeked for the name it was meant for (SNI or Host, [`crate::external::peek_name`]): a
//!   declared outside name is served as that destination, whatever its address.
//! - **Inbound**: authorized with the inbound policy of the original port (TrafficTargets of this
//!   workload for that port, mTLS detection, deny by default), then delivered to the application
//!   on `127.0.0.1:<original port>`. The policy of a port is watched from the controller on the
//!   first connection to it; until its first answer the connection waits a bounded time, and is
//!   refused if none comes (fail safe).
//! - **Never loop**: a connection without an original destination (not redirected: no conntrack
//!   entry), or whose original destination is the proxy's own transparent listener (the rules are
//!   missing, or someone connected to the port directly), is refused with a log line saying so.
//!   The proxy's own upstream connections are not redirected again because the rules skip its
//!   UID.
//!
//! An IPv4 listener on loopback or the unspecified address gets an IPv6 twin (`[::1]:P`,
//! `[::]:P`, IPv6-only) when the host has IPv6, since the rules redirect IPv6 connections as well.
//!
//! Cost per connection: one `getsockopt` (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` on an
//! IPv6 listener) and a hash lookup in the routing table.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::metrics::{Label, TcpLabels};
use crate::server::{
    INBOUND_TRANSPARENT, ListenerKind, OUTBOUND_TRANSPARENT, serve_connection, serve_inbound,
};
use crate::state::Shared;
use crate::table::Lookup;

/// The destination a redirected connection was addressed to, before the redirect. `listen` is
/// the listener's address: its family says which option to read (an IPv6 listener may also
/// carry IPv4 connections, as v4-mapped addresses).
pub fn original_destination(stream: &TcpStream, listen: SocketAddr) -> io::Result<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let address = if listen.is_ipv4() {
        socket.original_dst_v4()?
    } else {
        match socket.original_dst_v6() {
            Ok(a) => a,
            Err(_) => socket.original_dst_v4()?,
        }
    };
    address
        .as_socket()
        .ok_or_else(|| io::Error::other("the original destination is not an IP address"))
}

/// The IPv6 twin of an IPv4 transparent listener address: `127.0.0.1:P` -> `[::1]:P`,
/// `0.0.0.0:P` -> `[::]:P`; `None` for other addresses. The interception rules redirect IPv6
/// connections too (ip6tables `REDIRECT` sends them to `[::1]:P` or the pod's IPv6 address), so
/// an IPv4-only listener would leave the application's IPv6 connections refused.
pub fn ipv6_twin(listen: SocketAddr) -> Option<SocketAddr> {
    let SocketAddr::V4(v4) = listen else {
        return None;
    };
    let ip = if v4.ip().is_loopback() {
        std::net::Ipv6Addr::LOCALHOST
    } else if v4.ip().is_unspecified() {
        std::net::Ipv6Addr::UNSPECIFIED
    } else {
        return None;
    };
    Some(SocketAddr::new(ip.into(), listen.port()))
}

/// Binds an IPv6-only listener on `addr` (so `[::]:P` does not collide with `0.0.0.0:P`).
pub fn bind_v6_only(addr: SocketAddr, backlog: u32) -> io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Whether `original` is the listener itself (no redirect happened: forwarding would loop).
fn is_self(original: SocketAddr, listen: SocketAddr) -> bool {
    original.port() == listen.port()
        && (listen.ip().is_unspecified() || original.ip() == listen.ip())
}

/// The destination key of an address, as `trellis_proxy_api::authority` spells it
/// (`10.0.0.1:80`, `[fd00::1]:80`): IPv4-mapped IPv6 addresses are their IPv4 address.
fn key_of(original: SocketAddr) -> String {
    let ip = original.ip().to_canonical();
    SocketAddr::new(ip, original.port()).to_string()
}

/// The original destination of a connection on a transparent listener, or `None` (refused and
/// logged) when it has none or it is the listener itself.
fn checked_original(
    stream: &TcpStream,
    peer: SocketAddr,
    listen: SocketAddr,
    shared: &Shared,
    index: usize,
) -> Option<SocketAddr> {
    let listener = crate::server::LISTENERS[index];
    match original_destination(stream, listen) {
        Ok(original) if is_self(original, listen) => {
            tracing::warn!(
                %peer, %original, listener,
                "connection refused: its original destination is this proxy's own transparent listener, so no redirect happened (are the interception rules installed?) and forwarding it would loop"
            );
            shared.connections.refuse(index, "loop");
            None
        }
        Ok(original) => Some(original),
        Err(e) => {
            tracing::warn!(
                %peer, listener, error = %e,
                "connection refused: it has no original destination (it was not redirected by the interception rules), and forwarding it could loop"
            );
            shared.connections.refuse(index, "no-original-destination");
            None
        }
    }
}

/// A redirected outbound connection: served as a per-upstream port to the destination of its
/// original address when the mesh knows it, else forwarded unchanged.
pub(crate) async fn outbound(
    stream: TcpStream,
    peer: SocketAddr,
    listen: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let Some(original) = checked_original(&stream, peer, listen, &shared, OUTBOUND_TRANSPARENT)
    else {
        return;
    };
    let key = key_of(original);
    let known =
        |shared: &Shared| matches!(shared.routes.table.load().lookup(&key), Lookup::Found(_));
    if !known(&shared)
        && let Some(resolver) = &shared.routes.resolver
    {
        // Once per key: later connections find the answer (or the "not found") in the table.
        resolver.resolve(&key).await;
    }
    if known(&shared) {
        let kind = ListenerKind::OutboundPort {
            destination: Arc::from(key.as_str()),
            protocol: None,
        };
        return Box::pin(serve_connection(stream, peer, kind, shared, shutdown)).await;
    }
    if shared.routes.is_external_port(original.port())
        && let Some(named) = declared_outside(&stream, original.port(), &shared).await
    {
        let kind = ListenerKind::OutboundPort {
            destination: Arc::from(named.as_str()),
            protocol: None,
        };
        return Box::pin(serve_connection(stream, peer, kind, shared, shutdown)).await;
    }
    if egress_denied(&shared, original) {
        // Closed at once, never forwarded: opaque TCP has no way to say why, the counter and
        // the log line do.
        tracing::debug!(%peer, %original, "connection refused: egress is denied and the mesh does not know its original destination");
        shared
            .connections
            .refuse(OUTBOUND_TRANSPARENT, "egress-denied");
        return;
    }
    passthrough(stream, original, &shared).await;
}

/// The declared outside destination (`name:port`) a connection to an unknown address is
/// meant for: the name its first bytes carry (SNI or Host, peeked, nothing consumed), when the
/// mesh declares that name as an ExternalService. A mesh service's name is not taken from an
/// unknown address's bytes: such a connection stays what its address says.
async fn declared_outside(stream: &TcpStream, port: u16, shared: &Shared) -> Option<String> {
    let name = crate::external::peek_name(stream, shared.limits.detect_timeout()).await?;
    let named = format!("{name}:{port}");
    let key = trellis_proxy_api::authority::normalize(&named).ok()?.key();
    let external = |shared: &Shared| match shared.routes.table.load().lookup(&key) {
        Lookup::Found(d) => Some(d.external.is_some()),
        _ => None,
    };
    if external(shared).is_none()
        && let Some(resolver) = &shared.routes.resolver
    {
        resolver.resolve(&key).await;
    }
    external(shared)?.then_some(named)
}

/// Whether the egress lockdown (`outbound.egress: deny`, or the controller's `--egress deny`)
/// refuses a connection to `original`,
/// an address the mesh does not know. Loopback destinations are never refused: the rules do not
/// redirect them, so one arriving here was sent on purpose (and the loop guard already refused
/// the listener's own address).
fn egress_denied(shared: &Shared, original: SocketAddr) -> bool {
    !original.ip().to_canonical().is_loopback() && shared.routes.egress_denied()
}

/// Copies an outbound connection's bytes unchanged to its original destination (outside the
/// mesh). The proxy's own connection is not redirected again: the rules skip its UID.
async fn passthrough(client: TcpStream, original: SocketAddr, shared: &Shared) {
    // Access log / tap (None when nobody listens): emitted when `rec` drops.
    let mut rec = shared.observe.begin_tcp(
        crate::observe::Direction::Outbound,
        &original.to_string(),
        None,
    );
    if let Some(r) = &rec {
        r.tally().choose(&original.to_string(), None, None);
    }
    let mut client = crate::observe::Counted::new(client, rec.as_ref().map(|r| r.tally()));
    let labels = |error: &str| TcpLabels {
        direction: Label::from("outbound"),
        // One label value for every address outside the mesh (bounded cardinality).
        destination: Label::from("passthrough"),
        backend: Label::from(""),
        error: Label::from(error),
    };
    let connect = TcpStream::connect(original);
    let mut upstream = match tokio::time::timeout(shared.limits.connect_timeout(), connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%original, error = %e, "passthrough connection failed");
            shared.metrics.tcp(&labels("connect-failed"));
            if let Some(r) = &mut rec {
                r.error("connect-failed");
            }
            return;
        }
        Err(_) => {
            tracing::debug!(%original, "passthrough connection timed out");
            shared.metrics.tcp(&labels("connect-failed"));
            if let Some(r) = &mut rec {
                r.error("connect-failed");
            }
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    shared.metrics.tcp(&labels(""));
    let idle = shared.limits.tcp_idle_timeout();
    if let Err(e) = crate::tcp::copy_with_idle_timeout(&mut client, &mut upstream, idle, None).await
    {
        tracing::debug!(%original, error = %e, "passthrough connection ended with an error");
    }
}

/// A redirected inbound connection: authorized with the policy of its original port and
/// delivered to the application on `127.0.0.1:<port>`.
pub(crate) async fn inbound(
    stream: TcpStream,
    peer: SocketAddr,
    listen: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let Some(original) = checked_original(&stream, peer, listen, &shared, INBOUND_TRANSPARENT)
    else {
        return;
    };
    let port = original.port();
    let known = |shared: &Shared| {
        shared
            .routes
            .table
            .load()
            .transparent_inbound
            .contains_key(&port)
    };
    if !known(&shared)
        && let Some(resolver) = &shared.routes.resolver
    {
        resolver.inbound(port).await;
    }
    if !known(&shared) {
        tracing::info!(%peer, port, "inbound connection refused: no inbound policy for this port (yet)");
        shared.connections.refuse(INBOUND_TRANSPARENT, "no-policy");
        return;
    }
    Box::pin(serve_inbound(stream, peer, port, true, shared, shutdown)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_listeners_have_ipv6_twins() {
        let twin = |a: &str| ipv6_twin(a.parse().unwrap()).map(|t| t.to_string());
        assert_eq!(twin("127.0.0.1:15001").as_deref(), Some("[::1]:15001"));
        assert_eq!(twin("0.0.0.0:15006").as_deref(), Some("[::]:15006"));
        assert_eq!(twin("10.0.0.1:15001"), None);
        assert_eq!(twin("[::1]:15001"), None);
    }

    #[test]
    fn the_listener_itself_is_a_loop() {
        let listen: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        assert!(is_self("127.0.0.1:15001".parse().unwrap(), listen));
        assert!(!is_self("10.96.0.10:80".parse().unwrap(), listen));
        assert!(!is_self("10.96.0.10:15001".parse().unwrap(), listen));
        let any: SocketAddr = "0.0.0.0:15006".parse().unwrap();
        assert!(is_self("10.0.0.7:15006".parse().unwrap(), any));
        assert!(!is_self("10.0.0.7:8080".parse().unwrap(), any));
    }

    #[test]
    fn keys_are_the_authority_keys_of_addresses() {
        for written in ["10.96.0.10:80", "[fd00::10]:8080"] {
            let a: SocketAddr = written.parse().unwrap();
            let normalized = trellis_proxy_api::authority::normalize(written).unwrap();
            assert_eq!(key_of(a), normalized.key(), "{written}");
        }
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(key_of(mapped), "10.0.0.1:80");
    }

    /// Without a redirect the socket has no original destination (no conntrack NAT entry), or
    /// one equal to the listener: either way it is refused, never forwarded.
    #[tokio::test]
    async fn a_connection_that_was_not_redirected_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = listener.local_addr().unwrap();
        let _client = TcpStream::connect(listen).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        match original_destination(&stream, listen) {
            Err(_) => {}
            Ok(original) => assert!(is_self(original, listen), "{original}"),
        }
    }
}
