//! What a UDP forwarder counts: plain atomics the proxy reads when it is scraped (into its
//! Prometheus registry) and the tests read through [`Counters::snapshot`]. One [`Counters`] per
//! [`UdpOutbound`](crate::UdpOutbound) or per [`UdpInbound`](crate::UdpInbound), shared by all
//! its sessions; every update is one relaxed atomic add (no lock on the datagram path).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The counters of one forwarder. "UDP side" is the local socket: the clients' on the outbound
/// side, the application's on the inbound side; "tunnel side" the framed stream.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams received on the UDP side (all of them, also those dropped afterwards).
    pub received_datagrams: AtomicU64,
    /// Their bytes.
    pub received_bytes: AtomicU64,
    /// Datagrams sent on the UDP side (unframed from a tunnel).
    pub sent_datagrams: AtomicU64,
    /// Their bytes.
    pub sent_bytes: AtomicU64,
    /// Datagrams framed into tunnels (received ones that were not dropped, once written).
    pub tunneled_datagrams: AtomicU64,
    /// Sessions (outbound: per source; inbound: per stream) opened since the start.
    pub sessions_opened: AtomicU64,
    /// Sessions open now (a gauge).
    pub sessions_open: AtomicU64,
    /// Sessions closed because nothing moved for the idle timeout.
    pub sessions_idle: AtomicU64,
    /// Sessions refused: outbound by the [`Route`](crate::Route) (or its open timing out),
    /// inbound by the `authorize` decision or a bad stream header.
    pub sessions_refused: AtomicU64,
    /// Sessions ended by their tunnel: an I/O error, a protocol violation, or the peer closing.
    pub tunnel_failures: AtomicU64,
    /// Datagrams dropped because the session bound was reached (outbound: a new source).
    pub dropped_session_limit: AtomicU64,
    /// Datagrams dropped because they were longer than the configured maximum.
    pub dropped_oversized: AtomicU64,
    /// Datagrams dropped because their session was refused or its tunnel had just failed
    /// (outbound, during the hold before the source is tried again).
    pub dropped_refused: AtomicU64,
    /// Datagrams dropped because their session's queue was full (outbound: the tunnel does not
    /// keep up).
    pub dropped_queue_full: AtomicU64,
    /// Datagrams the UDP socket refused to send (e.g. the application's port is closed).
    pub send_errors: AtomicU64,
}

/// A copy of [`Counters`] at one moment, as plain numbers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)] // the fields are the counters' of the same names
pub struct Snapshot {
    pub received_datagrams: u64,
    pub received_bytes: u64,
    pub sent_datagrams: u64,
    pub sent_bytes: u64,
    pub tunneled_datagrams: u64,
    pub sessions_opened: u64,
    pub sessions_open: u64,
    pub sessions_idle: u64,
    pub sessions_refused: u64,
    pub tunnel_failures: u64,
    pub dropped_session_limit: u64,
    pub dropped_oversized: u64,
    pub dropped_refused: u64,
    pub dropped_queue_full: u64,
    pub send_errors: u64,
}

impl Counters {
    /// Read every counter (each one atomically; together they are not one instant).
    pub fn snapshot(&self) -> Snapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            received_datagrams: r(&self.received_datagrams),
            received_bytes: r(&self.received_bytes),
            sent_datagrams: r(&self.sent_datagrams),
            sent_bytes: r(&self.sent_bytes),
            tunneled_datagrams: r(&self.tunneled_datagrams),
            sessions_opened: r(&self.sessions_opened),
            sessions_open: r(&self.sessions_open),
            sessions_idle: r(&self.sessions_idle),
            sessions_refused: r(&self.sessions_refused),
            tunnel_failures: r(&self.tunnel_failures),
            dropped_session_limit: r(&self.dropped_session_limit),
            dropped_oversized: r(&self.dropped_oversized),
            dropped_refused: r(&self.dropped_refused),
            dropped_queue_full: r(&self.dropped_queue_full),
            send_errors: r(&self.send_errors),
        }
    }
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn inc(c: &AtomicU64) {
    add(c, 1);
}

/// Counts a session open while it lives (`sessions_opened` on creation, `sessions_open` up and
/// back down on drop, however the session ends).
#[derive(Debug)]
pub(crate) struct OpenSession(Arc<Counters>);

impl OpenSession {
    pub(crate) fn new(counters: Arc<Counters>) -> Self {
        inc(&counters.sessions_opened);
        inc(&counters.sessions_open);
        OpenSession(counters)
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.0.sessions_open.fetch_sub(1, Ordering::Relaxed);
    }
}
