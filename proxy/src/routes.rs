//! The routing table in force and its writers. Each request loads the table once (an
//! `arc-swap` load); writes go through [`Routes`]' methods, one at a time: a whole configuration
//! ([`Routes::apply`]), the listeners' side only ([`Routes::apply_base`]), or one destination
//! ([`Routes::apply_destination`], [`Routes::remove_destination`]; see [`crate::table`] for
//! what each replaces). A destination entry made current starts its health checks and one
//! replaced or removed stops them (through the hook of [`Routes::start_health_checks`]).
//! Likewise, once [`Routes::start_authentication`] was called, an inbound side made current gets
//! its JWT verifiers before it is published: the same verifier as before for an unchanged `jwt`
//! policy (its keys and refresh state kept), a new one otherwise ([`crate::table::Verifiers`]).

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::config::{Config, Destination, Invalid};
use crate::table::{RoutingTable, StatsRegistry, Verifiers};

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
/// [`Routes::start_health_checks`]; the prober lives in [`crate::probe`], above this state).
pub type StartProbes = Box<dyn Fn(&Arc<crate::table::DestinationTable>) + Send + Sync>;

/// The installed [`StartProbes`] hook.
struct Probing(StartProbes);

impl fmt::Debug for Probing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Probing")
    }
}

/// The routing table in force, the statistics kept across its generations, and the resolver
/// that asks the controller about destinations it does not know yet.
#[derive(Debug)]
pub struct Routes {
    /// The current routing table. Each request loads it once; swaps (and a destination's
    /// replacement in its slot) apply to the next request, including on already-open client
    /// connections. Written only through `Routes`' methods.
    pub table: ArcSwap<RoutingTable>,
    /// Serializes table writers (never taken on the request path): a destination stored into
    /// its slot while another writer publishes a generation made from the one before would be
    /// lost.
    writes: Mutex<()>,
    /// Endpoint statistics kept across table generations.
    pub stats: StatsRegistry,
    /// Controller resolver (None with a static config).
    pub resolver: Option<Arc<dyn Resolve>>,
    /// Bumped on every change of the inbound side (whole configuration or base): open opaque
    /// TCP connections re-check their authorization. Destination updates do not bump it.
    pub table_changes: watch::Sender<u64>,
    /// The controller said the mesh denies egress to destinations it does not know (`--egress
    /// deny`, with its last not-found answer); the proxy's own `outbound.egress` is the other
    /// half of the switch ([`Routes::egress_denied`]).
    controller_denies_egress: std::sync::atomic::AtomicBool,
    /// The ports the mesh's ExternalServices declare (the controller's last not-found answer):
    /// with the external destinations of the proxy's own file, where a transparent connection to
    /// an unknown address is read for the name it was meant for ([`Routes::is_external_port`]).
    controller_external_ports: ArcSwap<Vec<u16>>,
    /// The hook that starts probers, once [`Routes::start_health_checks`] was called (never for
    /// routes only used to compile).
    probing: OnceLock<Probing>,
    /// The JWT verifiers the inbound sides of the table generations use, kept across them.
    pub verifiers: Verifiers,
    /// Set by [`Routes::start_authentication`] (on the runtime): verifiers are made when an
    /// inbound side becomes current. Before (and for routes only used to compile), never.
    authenticating: OnceLock<()>,
}

impl Routes {
    /// Routes compiled from `config`; on error nothing is made.
    pub fn new(config: Config, resolver: Option<Arc<dyn Resolve>>) -> Result<Self, Invalid> {
        let stats = StatsRegistry::default();
        let table = RoutingTable::compile(config, &stats)?;
        Ok(Routes {
            table: ArcSwap::from_pointee(table),
            writes: Mutex::new(()),
            stats,
            resolver,
            table_changes: watch::channel(0).0,
            controller_denies_egress: Default::default(),
            controller_external_ports: ArcSwap::from_pointee(Vec::new()),
            probing: OnceLock::new(),
            verifiers: Verifiers::default(),
            authenticating: OnceLock::new(),
        })
    }

    /// Make the JWT verifiers of the inbound sides in force, and from now on of every inbound
    /// side before it is made current. Call it on the proxy's runtime (verifiers start their
    /// key-refresh tasks); once, later calls do nothing. Until then the first request of a
    /// table generation makes its verifiers.
    pub fn start_authentication(&self) {
        let _writing = self.write_lock();
        if self.authenticating.set(()).is_ok() {
            self.table.load().authenticate(&self.verifiers);
        }
    }

    /// Give `table`'s inbound sides their verifiers, once authentication has started.
    fn authenticate(&self, table: &RoutingTable) {
        if self.authenticating.get().is_some() {
            table.authenticate(&self.verifiers);
        }
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
        // Before the swap: the previous generation still holds the verifiers to reuse.
        self.authenticate(&table);
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
        self.authenticate(&table);
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

    /// Record the controller's egress switch (from a not-found answer).
    pub fn set_egress_denied(&self, denied: bool) {
        self.controller_denies_egress
            .store(denied, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether egress to destinations the mesh does not know is denied: by this proxy's config
    /// (`outbound.egress: deny`) or by the controller (`--egress deny`).
    pub fn egress_denied(&self) -> bool {
        self.controller_denies_egress
            .load(std::sync::atomic::Ordering::Relaxed)
            || self.table.load().base.outbound.egress == crate::config::Egress::Deny
    }

    /// Record the ports the mesh's ExternalServices declare (from a not-found answer; the
    /// latest wins).
    pub fn set_external_ports(&self, ports: &[u32]) {
        let mut ports: Vec<u16> = ports
            .iter()
            .filter_map(|p| u16::try_from(*p).ok())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        if **self.controller_external_ports.load() != ports {
            self.controller_external_ports.store(Arc::new(ports));
        }
    }

    /// Whether some declared outside destination listens on `port`: the controller's
    /// ExternalServices, or an `external` destination in the table (the proxy's own file, or
    /// one the controller sent). Only on these ports is a transparent connection to an unknown
    /// address held back to read its name. The table's part is a scan of its destinations, paid
    /// only by connections to addresses the mesh does not know.
    pub fn is_external_port(&self, port: u16) -> bool {
        if self
            .controller_external_ports
            .load()
            .binary_search(&port)
            .is_ok()
        {
            return true;
        }
        self.table
            .load()
            .entries()
            .any(|d| d.external.as_ref().is_some_and(|e| e.port(port).is_some()))
    }

    fn write_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }
}
