//! UDP carried between Trellis proxies (SMI UDPRoute): the data-plane library behind the
//! proxy's UDP listeners, generic over the stream the datagrams travel in and over the routing
//! and authorization decisions, which stay with the proxy.
//!
//! ```text
//! client ──UDP──> UdpOutbound ══ tunnel (mTLS in the proxy) ══> UdpInbound ──UDP──> app
//!        <──UDP──  per-source   <══ framed replies ═══════════  one connected  <──UDP──
//!                  session                                       socket per stream
//! ```
//!
//! - [`UdpOutbound`] (calling side): one session per client address; a new session asks the
//!   [`Route`] for a tunnel (the proxy picks the TrafficSplit backend per session, balances, and
//!   opens the mutual-TLS connection to the endpoint's proxy), then frames the client's
//!   datagrams into it and sends the frames coming back to the client. Bounded sessions, idle
//!   timeout, per-source retry hold ([`outbound`]).
//! - [`UdpInbound`] (called side): serves one accepted stream, whose caller the proxy has
//!   verified: reads the header, asks the proxy's `authorize` callback (the TrafficTarget's
//!   UDPRoute rules, for the header's port), then unframes datagrams to the application from a
//!   socket of the stream's own and frames the replies back ([`inbound`]).
//! - [`Counters`]: plain atomics per forwarder, for the proxy's Prometheus export.
//!
//! # Wire format (version 1)
//!
//! A tunnel is one byte stream per session, in both directions:
//!
//! ```text
//! caller -> called, once:  FF 55 44 50 | 01      | port (u16 BE)      header, 7 bytes
//!                          magic "\xFFUDP" version  called app's UDP port (not 0)
//! then, both directions:   len (u16 BE) | len bytes of datagram        one frame per datagram
//! ```
//!
//! The magic's first byte (`0xFF`) starts no TLS record, HTTP/1 request or HTTP/2 preface, so a
//! listener that also serves those tells a UDP tunnel by its first byte ([`wire::MAGIC`],
//! [`Header::parse`] for a prefix already read). There is no answer to the header: a refused
//! caller sees its stream closed. Datagram boundaries are kept exactly (an empty datagram is a
//! frame of length 0). The largest frame is 65,535 bytes ([`MAX_DATAGRAM`], what a u16 says, and
//! more than any UDP payload); a lower `max_datagram` may be configured. Oversized datagrams
//! (longer than `max_datagram`) received on a UDP socket are dropped and counted
//! (`dropped_oversized`), never truncated: sockets are read with one spare byte to see them. A
//! frame announcing more than `max_datagram` is a protocol violation: that stream is closed
//! (counted in `dropped_oversized` and `tunnel_failures`). Framing is
//! [`tokio_util::codec::LengthDelimitedCodec`] with a 2-byte length field ([`wire::codec`]).
//!
//! # Overhead
//!
//! Measured by `tests/mtls.rs` (`wire_overhead_per_datagram_inside_tls`, exact, asserted):
//! inside TLS 1.3, a datagram sent on its own costs **24 bytes** more than its payload on the
//! TCP stream: 2 of length prefix and 22 of TLS record (5 header, 1 content type, 16 AEAD tag);
//! 64-byte datagrams take 88 bytes, 1,200-byte ones 1,224. Under load both sides write up to 32
//! queued datagrams per flush, so they share records and the record's 22 bytes are split among
//! them. Once per session: the 7-byte header and the caller's TLS handshake (834 bytes from
//! the caller with a one-certificate ECDSA P-256 chain, 406 resumed, in the same test; the
//! proxy's own chains may be longer). Below that, TCP/IP headers (40 bytes, 52 with
//! timestamps) per segment replace UDP/IP's 28 per datagram; segments carry several frames
//! when datagrams come faster than they are sent. What the stream costs beyond bytes: a lost
//! segment delays the session's later datagrams until it is resent (head-of-line blocking,
//! which plain UDP does not have), the price of the caller's proven identity; and each session
//! holds a TCP connection, a small queue and the codec buffers.
//!
//! Packets per second and round trips, tunnel next to direct:
//! `cargo bench -p trellis-udp --bench pps` (2026-12-07 07:57 UTC, this 2-core VM, quiet;
//! outbound and inbound forwarders in one process over loopback TCP, plaintext; 4 clients x 16 in
//! flight, 500 ms per phase): 64-byte datagrams 213,985 pps through the tunnel against 424,505 direct
//! (0.50x), round trip p50 79 us against 63 us; 1,200-byte datagrams 178,368 pps against 407,118
//! (0.44x), p50 75 us against 39 us. Two proxy processes with mTLS between them:
//! `scripts/bench/udp` (figures in `scripts/bench/README.md`, "UDP": 0.30-0.47x of direct, 4.6 to
//! 8.5 us of CPU per round trip for both proxies together, on a shared machine).
//!
//! # Wiring into the proxy
//!
//! - Outbound: bind a [`UdpSocket`](tokio::net::UdpSocket) per UDP port to serve and implement
//!   [`Route`] over the routing table: per session, the TrafficSplit backend and a balanced
//!   endpoint, then the mTLS connection as for opaque TCP (`tls::connect` with `Alpn::None`),
//!   returned as [`Opened`] with the endpoint's port; [`Refused`] reasons match the TCP ones.
//! - Inbound: after the mTLS handshake, a stream whose first bytes are [`wire::MAGIC`] is a UDP
//!   tunnel ([`Header::parse`] tells from the detection prefix). Hand the stream with its
//!   prefix replayed to [`UdpInbound::serve`], which reads the header itself (or, with the
//!   header consumed, call [`UdpInbound::forward`]); the `authorize` callback runs the
//!   authorizer with the caller's identity and the header's port (what UDPRoute rules name) and
//!   returns the application's address; `revoked` is the same policy-change watch as opaque
//!   TCP's. The application sees datagrams from the proxy's address, not the client's (as with
//!   TCP through the proxy).
//! - Metrics: read [`Counters`] when scraped.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod counters;
mod idle;
pub mod inbound;
pub mod outbound;
pub mod wire;

pub use counters::{Counters, Snapshot};
pub use inbound::{Ended, InboundConfig, UdpInbound};
pub use outbound::{Opened, OutboundConfig, Refused, Route, Tunnel, UdpOutbound};
pub use wire::{Header, HeaderError, MAX_DATAGRAM};

/// Whether a decoding error is the codec refusing a frame longer than the maximum.
fn oversized_frame(e: &std::io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<tokio_util::codec::LengthDelimitedCodecError>())
}
