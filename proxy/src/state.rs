//! What every listener shares, composed of parts that each have a module of their own: the
//! routing table and its writers ([`Routes`]), the upstream clients
//! ([`crate::upstream::Upstreams`]), connection counting and limits ([`crate::connections`]),
//! metrics, the authorizer, the workload identity, tracing and request records; plus the
//! proxy's readiness (draining, what `/ready` still waits for).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::authz::Authorizer;
use crate::config::{Config, Limits};
use crate::connections::{Connections, SourceLimiter};
use crate::identity::IdentityStore;
use crate::metrics::Metrics;
use crate::upstream::Upstreams;

pub use crate::routes::{Resolve, Routes, StartProbes};

/// Everything a connection handler needs.
#[derive(Debug)]
pub struct Shared {
    /// The routing table and its writers ([`Routes`]).
    pub routes: Routes,
    /// Upstream HTTP clients (pooled; the own ones of connection-limited destinations too).
    pub upstreams: Upstreams,
    /// Metrics.
    pub metrics: Metrics,
    /// Inbound authorization.
    pub authorizer: Arc<dyn Authorizer>,
    /// Limits and timeouts (fixed at start).
    pub limits: Limits,
    /// Set when draining (readiness turns false).
    pub draining: AtomicBool,
    /// What `/ready` still waits for ([`Shared::wait_for`]).
    pending: Mutex<std::collections::BTreeSet<&'static str>>,
    /// This proxy's workload identity (mTLS), if it has a source.
    pub identity: Arc<IdentityStore>,
    /// Inbound TLS handshakes in progress.
    pub handshakes: Semaphore,
    /// Open inbound connections per source IP.
    pub sources: Arc<SourceLimiter>,
    /// Open client connections of every listener (drain, global limit, counts by kind).
    pub connections: Arc<Connections>,
    /// Distributed tracing, when a collector is configured ([`crate::trace`]).
    pub tracer: Option<Arc<crate::trace::Tracer>>,
    /// Per-request records for the access log and taps (off until a consumer attaches).
    pub observe: Arc<crate::observe::Observe>,
    /// The called side of UDP tunnels (UDPRoute), shared by every tunnel the inbound
    /// listeners accept (its counters are the `direction="inbound"` UDP series).
    pub udp_inbound: trellis_udp::UdpInbound,
}

impl Shared {
    /// State for `config`, with metrics registered in `registry`.
    pub fn new(
        config: &Config,
        registry: &mut prometheus_client::registry::Registry,
        authorizer: Arc<dyn Authorizer>,
        resolver: Option<Arc<dyn Resolve>>,
    ) -> Result<Self, crate::config::Invalid> {
        Self::with_identity(
            config,
            registry,
            authorizer,
            resolver,
            Arc::new(IdentityStore::new()),
        )
    }

    /// Like [`Shared::new`], with an identity store.
    pub fn with_identity(
        config: &Config,
        registry: &mut prometheus_client::registry::Registry,
        authorizer: Arc<dyn Authorizer>,
        resolver: Option<Arc<dyn Resolve>>,
        identity: Arc<IdentityStore>,
    ) -> Result<Self, crate::config::Invalid> {
        let routes = Routes::new(config.clone(), resolver)?;
        let mut metrics =
            Metrics::register(registry, config.workload.as_ref(), &config.metrics_compat);
        if config.no_request_metrics {
            metrics = metrics.without_request_series();
        }
        let observe = Arc::new(crate::observe::Observe::new(
            registry,
            config
                .workload
                .as_ref()
                .map(|w| format!("{}/{}", w.namespace, w.name))
                .unwrap_or_default(),
            Arc::clone(&identity),
        ));
        let connections = Arc::new(Connections::new(
            config.limits.effective_max_connections(),
            metrics.clone(),
        ));
        let udp_inbound = trellis_udp::UdpInbound::new(trellis_udp::InboundConfig {
            idle_timeout: config.limits.udp_inbound_idle_timeout(),
            // The header comes right after the handshake, as an HTTP request's first bytes do.
            header_timeout: config.limits.detect_timeout(),
            ..Default::default()
        });
        metrics.udp_forwarder(
            "inbound",
            crate::metrics::Label::from(""),
            udp_inbound.counters(),
        );
        Ok(Shared {
            routes,
            upstreams: Upstreams::new(&config.limits),
            metrics,
            authorizer,
            limits: config.limits.clone(),
            draining: AtomicBool::new(false),
            pending: Mutex::default(),
            identity,
            handshakes: Semaphore::new(config.limits.max_concurrent_handshakes.max(1)),
            sources: Arc::default(),
            connections,
            tracer: None,
            observe,
            udp_inbound,
        })
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Holds `/ready` at 503 until [`Shared::passed`] is called with the same `what` (e.g. the
    /// controller's first inbound policy: until then the inbound listener refuses everyone, and a
    /// registry that sent traffic here would see 403s).
    pub fn wait_for(&self, what: &'static str) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(what);
    }

    /// Releases the hold of [`Shared::wait_for`].
    pub fn passed(&self, what: &'static str) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(what);
    }

    /// Why this proxy should not get traffic yet (empty = ready): draining, a first piece of
    /// configuration not yet received, or an identity configured but no valid certificate.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut why: Vec<&'static str> = Vec::new();
        if self.is_draining() {
            why.push("draining");
        }
        why.extend(
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter(),
        );
        if self.identity.is_configured() && self.identity.current().is_none() {
            why.push("no valid certificate yet");
        }
        why
    }
}
