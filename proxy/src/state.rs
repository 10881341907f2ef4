//! State shared by every listener: the current routing table (swapped atomically), upstream
//! clients, metrics, the authorizer and, in controller mode, the on-demand resolver.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use futures::future::BoxFuture;

use crate::authz::Authorizer;
use crate::config::{Config, Limits};
use crate::http::Clients;
use crate::metrics::Metrics;
use crate::table::{RoutingTable, StatsRegistry};

/// Asks the controller about destinations the table does not know yet.
pub trait Resolve: Send + Sync + fmt::Debug + 'static {
    /// Start watching `key` (a normalized authority) if not already, and complete once the
    /// controller has answered (found or not) or a bounded wait passed.
    fn resolve(&self, key: &str) -> BoxFuture<'static, ()>;
}

/// Everything a connection handler needs.
#[derive(Debug)]
pub struct Shared {
    /// The current routing table. Each request loads it once; swaps apply to the next request,
    /// including on already-open client connections.
    pub table: ArcSwap<RoutingTable>,
    /// Endpoint statistics kept across table generations.
    pub stats: StatsRegistry,
    /// Upstream HTTP clients (pooled).
    pub clients: Clients,
    /// Metrics.
    pub metrics: Metrics,
    /// Inbound authorization.
    pub authorizer: Arc<dyn Authorizer>,
    /// Controller resolver (None with a static config).
    pub resolver: Option<Arc<dyn Resolve>>,
    /// Limits and timeouts (fixed at start).
    pub limits: Limits,
    /// Set when draining (readiness turns false).
    pub draining: AtomicBool,
}

impl Shared {
    /// State for `config`, with metrics registered in `registry`.
    pub fn new(
        config: &Config,
        registry: &mut prometheus_client::registry::Registry,
        authorizer: Arc<dyn Authorizer>,
        resolver: Option<Arc<dyn Resolve>>,
    ) -> Result<Self, crate::config::Invalid> {
        let stats = StatsRegistry::default();
        let table = RoutingTable::compile(Arc::new(config.clone()), &stats)?;
        Ok(Shared {
            table: ArcSwap::from_pointee(table),
            stats,
            clients: Clients::new(&config.limits),
            metrics: Metrics::register(registry, config.workload.as_ref()),
            authorizer,
            resolver,
            limits: config.limits.clone(),
            draining: AtomicBool::new(false),
        })
    }

    /// Compile `config` and make it current. On error the current table stays.
    pub fn apply(&self, config: Config) -> Result<(), crate::config::Invalid> {
        let table = RoutingTable::compile(Arc::new(config), &self.stats)?;
        self.table.store(Arc::new(table));
        Ok(())
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}
