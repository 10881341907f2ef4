//! What the listeners count and limit: open client connections (the drain waits for them, the
//! global limit applies to them, counted per listener kind) and open inbound connections per
//! source IP.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::config::Protocol;
use crate::metrics::Metrics;

/// Open client connections: a drain waits for them, the global limit
/// (`limits.max_connections`) is applied on them, and they are counted per listener kind
/// (`trellis_open_connections`), as are refused connections by listener and reason
/// (`trellis_connections_refused_total`, admin `/connections`).
#[derive(Debug)]
pub struct Connections {
    open: AtomicUsize,
    idle: Notify,
    max: usize,
    metrics: Metrics,
    by_kind: [AtomicUsize; LISTENERS.len()],
    refused: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// When the global limit was last logged, and refusals since (one warning per
    /// [`LIMIT_WARNING_EVERY`], not one per refused connection during a flood).
    limit_warning: Mutex<(Option<std::time::Instant>, u64)>,
}

/// Label values of the listener kinds, in [`ListenerKind::index`] order.
pub const LISTENERS: [&str; 7] = [
    "outbound-http",
    "outbound-port",
    "inbound",
    "outbound-transparent",
    "inbound-transparent",
    "gateway",
    "gateway-redirect",
];

/// At most one "connection limit reached" warning this often.
const LIMIT_WARNING_EVERY: Duration = Duration::from_secs(10);

/// One open connection; dropping it ends it.
#[derive(Debug)]
pub struct ConnectionGuard {
    connections: Arc<Connections>,
    kind: usize,
}

impl Connections {
    /// Counts for a proxy allowing `max` open client connections in all.
    pub fn new(max: usize, metrics: Metrics) -> Self {
        Connections {
            open: AtomicUsize::new(0),
            idle: Notify::new(),
            max: max.max(1),
            metrics,
            by_kind: Default::default(),
            refused: Mutex::default(),
            limit_warning: Mutex::default(),
        }
    }

    /// Register a new connection on a `kind` listener, or None (counted and logged) when
    /// `max_connections` are open already.
    pub fn open(self: &Arc<Self>, kind: &ListenerKind) -> Option<ConnectionGuard> {
        let kind = kind.index();
        let admitted = self
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            self.refuse(kind, "global-limit");
            self.warn_limit();
            return None;
        }
        self.by_kind[kind].fetch_add(1, Ordering::SeqCst);
        self.metrics.connection_opened(LISTENERS[kind]);
        Some(ConnectionGuard {
            connections: Arc::clone(self),
            kind,
        })
    }

    /// Count a connection of a `kind` listener closed before it was served, for `reason`.
    pub fn refuse(&self, kind: usize, reason: &'static str) {
        let listener = LISTENERS[kind];
        self.metrics.connection_refused(listener, reason);
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        *refused.entry((listener, reason)).or_insert(0) += 1;
    }

    fn warn_limit(&self) {
        let mut warning = self.limit_warning.lock().unwrap_or_else(|p| p.into_inner());
        let (last, suppressed) = &mut *warning;
        if last.is_some_and(|at| at.elapsed() < LIMIT_WARNING_EVERY) {
            *suppressed += 1;
            return;
        }
        tracing::warn!(
            max_connections = self.max,
            refused_since_last_warning = *suppressed,
            "connection limit reached: new connections are closed at once (limits.max_connections)"
        );
        *last = Some(std::time::Instant::now());
        *suppressed = 0;
    }

    /// Open connections now.
    pub fn count(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// The global limit in force.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Open connections per listener kind (label value, count).
    pub fn by_listener(&self) -> impl Iterator<Item = (&'static str, usize)> + '_ {
        LISTENERS
            .iter()
            .zip(&self.by_kind)
            .map(|(name, n)| (*name, n.load(Ordering::SeqCst)))
    }

    /// Refused connections so far: ((listener, reason), count).
    pub fn refused(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Wait until no connection is open, at most `bound`; returns how many were still open.
    pub async fn wait_idle(&self, bound: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.count();
            }
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let c = &self.connections;
        c.by_kind[self.kind].fetch_sub(1, Ordering::SeqCst);
        c.metrics.connection_closed(LISTENERS[self.kind]);
        if c.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            c.idle.notify_waiters();
        }
    }
}

/// What a listener does with its connections.
#[derive(Debug, Clone)]
pub enum ListenerKind {
    /// The outbound HTTP listener (route by authority).
    OutboundHttp,
    /// A per-upstream port towards one destination.
    OutboundPort {
        /// Destination authority.
        destination: Arc<str>,
        /// Protocol override.
        protocol: Option<Protocol>,
    },
    /// The inbound listener.
    Inbound,
    /// Redirected outbound connections (transparent mode): routed by original destination.
    OutboundTransparent {
        /// The listener's own address (the loop guard compares original destinations to it).
        listen: SocketAddr,
    },
    /// Redirected inbound connections (transparent mode): authorized per original port.
    InboundTransparent {
        /// The listener's own address.
        listen: SocketAddr,
    },
    /// The gateway's HTTPS listener: TLS terminated, requests routed by host into the mesh.
    Gateway {
        /// The compiled gateway.
        gateway: Arc<crate::gateway::Gateway>,
    },
    /// The gateway's plain HTTP listener: every request redirected to HTTPS.
    GatewayRedirect {
        /// The HTTPS port redirects name.
        https_port: u16,
    },
}

impl ListenerKind {
    /// Index into [`LISTENERS`].
    pub fn index(&self) -> usize {
        match self {
            ListenerKind::OutboundHttp => 0,
            ListenerKind::OutboundPort { .. } => 1,
            ListenerKind::Inbound => 2,
            ListenerKind::OutboundTransparent { .. } => OUTBOUND_TRANSPARENT,
            ListenerKind::InboundTransparent { .. } => INBOUND_TRANSPARENT,
            ListenerKind::Gateway { .. } => 5,
            ListenerKind::GatewayRedirect { .. } => 6,
        }
    }
}

/// Index of the inbound listener in [`LISTENERS`].
pub(crate) const INBOUND: usize = 2;
/// Index of the transparent outbound listener in [`LISTENERS`].
pub(crate) const OUTBOUND_TRANSPARENT: usize = 3;
/// Index of the transparent inbound listener in [`LISTENERS`].
pub(crate) const INBOUND_TRANSPARENT: usize = 4;

/// The [`LISTENERS`] index of an inbound connection's listener.
pub(crate) fn inbound_index(transparent: bool) -> usize {
    if transparent {
        INBOUND_TRANSPARENT
    } else {
        INBOUND
    }
}

/// Counts open inbound connections per source IP.
#[derive(Debug, Default)]
pub struct SourceLimiter {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; dropping it uncounts it.
#[derive(Debug)]
pub struct SourceGuard {
    limiter: Arc<SourceLimiter>,
    ip: IpAddr,
}

impl SourceLimiter {
    /// Count a connection from `ip`, or None when `ip` already has `max` open.
    pub fn open(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<SourceGuard> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceGuard {
            limiter: Arc::clone(self),
            ip,
        })
    }
}

impl SourceLimiter {
    /// Source IPs with open inbound connections now.
    pub fn sources(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}
