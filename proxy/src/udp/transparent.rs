//! Transparent UDP: datagrams the pod's interception rules handed to the proxy
//! (`trellis-init --udp-ports`: marked in `OUTPUT`, routed to the loopback interface, given to
//! this listener by TPROXY with their original destination intact), each carried to the mesh
//! destination of its original `IP:PORT` as an `outbound.udp` listener would.
//!
//! How the datagrams of one original destination `D` are served:
//! - the first one arrives on the catch-all socket (`IP_TRANSPARENT`, `IP_RECVORIGDSTADDR`),
//!   which reads `D` from its control message;
//! - the proxy then binds a socket of its own **to `D`** (`IP_TRANSPARENT` allows binding an
//!   address the pod does not hold) and serves it with the same forwarder as an `outbound.udp`
//!   listener whose destination is `D` (the controller maps a Service's virtual address to the
//!   Service, as for intercepted TCP). TPROXY delivers later datagrams to `D` to that socket
//!   directly (its lookup finds a socket bound to the original destination before the
//!   catch-all), and replies sent from it come from `D`, which is what the application expects;
//! - datagrams for `D` that reach the catch-all before that socket exists (the first, and any
//!   already queued) are handed to the forwarder ([`trellis_udp::UdpOutbound::injector`]),
//!   never dropped.
//!
//! Bounds: at most [`MAX_DESTINATIONS`] original destinations are served at once (further ones
//! are dropped and counted); a destination's forwarder keeps its socket while the proxy runs.
//! The proxy needs `CAP_NET_ADMIN` for `IP_TRANSPARENT` (the listener refuses to start without it,
//! saying so). IPv4 only, like the rules.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;

use bytes::Bytes;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt, sockopt};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::config::UdpForward;
use crate::state::Shared;

/// Original destinations served at once.
pub const MAX_DESTINATIONS: usize = 1024;
/// Datagrams of one destination that may wait for its forwarder.
const INJECT_QUEUE: usize = 64;
/// The largest datagram read (larger ones are cut and then dropped by the forwarder).
const MAX_READ: usize = trellis_udp::MAX_DATAGRAM + 1;

/// The catch-all socket on `listen`: transparent, reporting each datagram's original
/// destination. Fails with the reason when the proxy lacks `CAP_NET_ADMIN`.
pub fn bind(listen: SocketAddr) -> io::Result<UdpSocket> {
    let socket = transparent_socket()?;
    setsockopt(&socket, sockopt::Ipv4OrigDstAddr, &true).map_err(io::Error::from)?;
    socket.bind(&listen.into())?;
    UdpSocket::from_std(socket.into())
}

/// A UDP socket with `IP_TRANSPARENT`, address reuse and non-blocking.
fn transparent_socket() -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    setsockopt(&socket, sockopt::IpTransparent, &true).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("IP_TRANSPARENT: {e} (transparent UDP needs the proxy to have CAP_NET_ADMIN)"),
        )
    })?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Serve the catch-all socket until `shutdown` says stop.
pub async fn serve(socket: UdpSocket, shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    let listen = socket.local_addr().ok();
    let mut forwarders: HashMap<SocketAddrV4, mpsc::Sender<(SocketAddr, Bytes)>> = HashMap::new();
    let mut buf = vec![0u8; MAX_READ];
    let mut stop = shutdown.clone();
    loop {
        let received = tokio::select! {
            () = crate::shutdown::stopped(&mut stop) => return,
            r = socket.async_io(Interest::READABLE, || receive(&socket, &mut buf)) => r,
        };
        let (n, source, original) = match received {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "transparent UDP: receive failed");
                continue;
            }
        };
        let Some(original) = original else {
            tracing::debug!(%source, "transparent UDP datagram dropped: no original destination (not redirected by the rules)");
            shared.metrics.udp_refused(
                "outbound",
                &crate::metrics::Label::from(""),
                "no-original-destination",
            );
            continue;
        };
        if listen == Some(SocketAddr::V4(original)) {
            tracing::debug!(%source, "transparent UDP datagram dropped: sent to the listener itself");
            continue;
        }
        let datagram = Bytes::copy_from_slice(&buf[..n]);
        if let Some(tx) = forwarders.get(&original) {
            match tx.try_send((source, datagram)) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::debug!(%source, %original, "transparent UDP datagram dropped: its forwarder is behind");
                    continue;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    forwarders.remove(&original);
                    continue;
                }
            }
        }
        if forwarders.len() >= MAX_DESTINATIONS {
            tracing::warn!(%original, max = MAX_DESTINATIONS, "transparent UDP datagram dropped: too many destinations");
            shared.metrics.udp_refused(
                "outbound",
                &crate::metrics::Label::from(""),
                "destination-limit",
            );
            continue;
        }
        match start_forwarder(original, &shared, shutdown.clone()) {
            Ok(tx) => {
                let _ = tx.try_send((source, datagram));
                forwarders.insert(original, tx);
            }
            Err(e) => {
                tracing::warn!(%original, error = %e, "transparent UDP: could not bind a socket to the original destination");
            }
        }
    }
}

/// Bind a socket to `original` and serve it as an `outbound.udp` listener whose destination is
/// `original`; the sender hands it the datagrams the catch-all received for it.
fn start_forwarder(
    original: SocketAddrV4,
    shared: &Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<mpsc::Sender<(SocketAddr, Bytes)>> {
    let socket = transparent_socket()?;
    socket.bind(&SocketAddr::V4(original).into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    let forward = UdpForward {
        listen: SocketAddr::V4(original),
        destination: original.to_string(),
    };
    let mut forwarder = super::outbound(socket, &forward, Arc::clone(shared));
    let tx = forwarder.injector(INJECT_QUEUE);
    tokio::spawn(async move {
        let stopped = async move { crate::shutdown::stopped(&mut shutdown).await };
        if let Err(e) = forwarder.run(stopped).await {
            tracing::warn!(%original, error = %e, "transparent UDP forwarder failed");
        }
    });
    Ok(tx)
}

/// One datagram from the catch-all socket: its length, source and original destination.
fn receive(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddrV4>)> {
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut control = nix::cmsg_space!(nix::libc::sockaddr_in);
    let msg = recvmsg::<SockaddrIn>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut control),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)?;
    let mut original = None;
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::Ipv4OrigDstAddr(addr) = cmsg {
            original = Some(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
                u16::from_be(addr.sin_port),
            ));
        }
    }
    let source = msg
        .address
        .map(|a| SocketAddr::V4(SocketAddrV4::new(a.ip(), a.port())))
        .ok_or_else(|| io::Error::other("a datagram without a source address"))?;
    Ok((msg.bytes, source, original))
}
