//! State shared by every listener: the current routing table (swapped atomically), upstream
//! clients, metrics, the authorizer, the workload identity, connection limits and, in
//! controller mode, the on-demand resolver.
//!
//! Table writes go through [`Shared`]'s methods, one at a time: a whole configuration
//! ([`Shared::apply`]), the listeners' side only ([`Shared::apply_base`]), or one destination
//! ([`Shared::apply_destination`], [`Shared::remove_destination`]; see [`crate::table`] for
//! what each replaces).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use tokio::sync::{Semaphore, watch};

use crate::authz::Authorizer;
use crate::config::{Config, Destination, Invalid, Limits};
use crate::connections::{Connections, SourceLimiter};
use crate::identity::IdentityStore;
use crate::metrics::Metrics;
use crate::table::{RoutingTable, StatsRegistry};
use crate::upstream::Upstreams;

/// Asks the controller about destinations the table does not know yet.
pub trait Resolve: Send + Sync + fmt::Debug + 'static {
    /// Start watching `key` (a normalized authority) if not already, and complete once the
    /// controller has answered (found or not) or a bounded wait passed.
    fn resolve(&self, key: &str) -> BoxFuture<'static, ()>;

    /// Start watching the inbound policy of `port` for the transparent inbound listener if not
    /// already, and complete once the controller has answered or a bounded wait passed. The
    /// default (no controller) completes at once: only configured ports have a policy.
    fn inbound(&self, port: u16) -> BoxFuture<'static, ()> {
        let _ = port;
        Box::pin(std::future::ready(()))
    }
}

/// Starts the health checks of a destination entry that became current (installed once by
/// [`Shared::start_health_checks`]; the prober lives in [`crate::probe`], above this state).
pub type StartProbes = Box<dyn Fn(&Arc<crate::table::DestinationTable>) + Send + Sync>;

/// The installed [`StartProbes`] hook.
struct Probing(StartProbes);

impl fmt::Debug for Probing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Probing")
    }
}

/// Everything a connection handler needs.
#[derive(Debug)]
pub struct Shared {
    /// The current routing table. Each request loads it once; swaps (and a destination's
    /// replacement in its slot) apply to the next request, including on already-open client
    /// connections. Written only through `Shared`'s methods.
    pub table: ArcSwap<RoutingTable>,
    /// Serializes table writers (never taken on the request path): a destination stored into
    /// its slot while another writer publishes a generation made from the one before would be
    /// lost.
    writes: Mutex<()>,
    /// Endpoint statistics kept across table generations.
    pub stats: StatsRegistry,
    /// Upstream HTTP clients (pooled; the own ones of connection-limited destinations too).
    pub upstreams: Upstreams,
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
    /// What `/ready` still waits for ([`Shared::wait_for`]).
    pending: Mutex<std::collections::BTreeSet<&'static str>>,
    /// This proxy's workload identity (mTLS), if it has a source.
    pub identity: Arc<IdentityStore>,
    /// Bumped on every change of the inbound side (whole configuration or base): open opaque
    /// TCP connections re-check their authorization. Destination updates do not bump it.
    pub table_changes: watch::Sender<u64>,
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
    /// This state and the runtime health-check probers run on, once
    /// [`Shared::start_health_checks`] was called (never for a state only used to compile).
    probing: OnceLock<Probing>,
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
        let stats = StatsRegistry::default();
        let table = RoutingTable::compile(config.clone(), &stats)?;
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
        Ok(Shared {
            table: ArcSwap::from_pointee(table),
            writes: Mutex::new(()),
            stats,
            upstreams: Upstreams::new(&config.limits),
            metrics,
            authorizer,
            resolver,
            limits: config.limits.clone(),
            draining: AtomicBool::new(false),
            pending: Mutex::default(),
            identity,
            table_changes: watch::channel(0).0,
            handshakes: Semaphore::new(config.limits.max_concurrent_handshakes.max(1)),
            sources: Arc::default(),
            connections,
            tracer: None,
            observe,
            probing: OnceLock::new(),
        })
    }

    /// Start the health checks of the destinations in force, and of every destination made
    /// current from now on, with `start` ([`crate::probe::starter`]). Once; later calls do
    /// nothing.
    pub fn start_health_checks(&self, start: StartProbes) {
        if self.probing.set(Probing(start)).is_err() {
            return;
        }
        for dest in self.table.load().entries() {
            self.probe(&dest);
        }
    }

    /// Start `dest`'s health checks, if it has some and probing has started.
    fn probe(&self, dest: &Arc<crate::table::DestinationTable>) {
        if let Some(Probing(start)) = self.probing.get() {
            start(dest);
        }
    }

    /// Stop the health checks of an entry that is no longer current.
    fn unprobe(dest: &crate::table::DestinationTable) {
        if let Some(checks) = &dest.health {
            checks.stop();
        }
    }

    /// Compile a whole configuration and make it current. On error the current table stays.
    pub fn apply(&self, config: Config) -> Result<(), Invalid> {
        let _writing = self.write_lock();
        let table = Arc::new(RoutingTable::compile(config, &self.stats)?);
        let previous = self.table.swap(Arc::clone(&table));
        self.table_changes.send_modify(|n| *n += 1);
        // Every destination was recompiled: the new entries' probers take over (keeping each
        // endpoint's state and probe rhythm, which live in its statistics).
        for dest in previous.entries() {
            Self::unprobe(&dest);
        }
        for dest in table.entries() {
            self.probe(&dest);
        }
        Ok(())
    }

    /// Make `base`'s listeners' side (inbound policy, transparent inbound ports) current, keeping
    /// the destinations as they are (not recompiled). `base.destinations` is ignored. On error
    /// the current table stays.
    pub fn apply_base(&self, base: Config) -> Result<(), Invalid> {
        let _writing = self.write_lock();
        let table = self.table.load().rebase(base)?;
        self.table.store(Arc::new(table));
        self.table_changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Compile one destination and make it current, alone: the others are neither recompiled
    /// nor cloned. Errors name `field` (e.g. `destinations[web.shop]`); on error the
    /// destination's last good entry stays (or it stays unknown).
    pub fn apply_destination(&self, source: Destination, field: &str) -> Result<(), Invalid> {
        let _writing = self.write_lock();
        let current = self.table.load_full();
        let compiled = current.compile_destination(source, field, &self.stats)?;
        let key = compiled.key.clone();
        let previous = current.get(&key);
        if let Some(next) = current.replace_destination(compiled) {
            self.table.store(Arc::new(next));
        }
        if let Some(previous) = previous {
            Self::unprobe(&previous);
        }
        if let Some(dest) = self.table.load().get(&key) {
            self.probe(&dest);
        }
        Ok(())
    }

    /// Forget the destination `key` (normalized); whether it was known.
    pub fn remove_destination(&self, key: &str) -> bool {
        let _writing = self.write_lock();
        let current = self.table.load_full();
        match current.remove_destination(key) {
            Some(next) => {
                self.table.store(Arc::new(next));
                if let Some(previous) = current.get(key) {
                    Self::unprobe(&previous);
                }
                true
            }
            None => false,
        }
    }

    fn write_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
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
