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
//! OVERHEAD
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
