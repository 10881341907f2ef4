//! The compiled routing table: what the request path reads, compiled once per change and
//! published atomically (`arc-swap`), so the request path only reads.
//!
//! Compiling does everything once: authorities normalized, regexes compiled (linear-time `regex`
//! engine with size limits), weights turned into an interleaved schedule, endpoint addresses
//! parsed. The request path then does: look up the destination, match a route, take the next
//! backend from the schedule, let the balancer pick an endpoint.
//!
//! How updates work: a [`RoutingTable`] generation holds the listeners' side (inbound policy,
//! transparent inbound ports: compiled with it, swapped with it) and a map from destination key
//! to a *slot* (`ArcSwap<DestinationTable>`). A change to one destination (the controller's
//! profile or endpoint delta) compiles that destination alone and stores it in its slot: one
//! compile, one atomic store, no other destination recompiled or cloned, and the generation
//! itself is not replaced ([`RoutingTable::replace_destination`]). Only a destination key that
//! appears or goes away makes a new generation, which copies the map of slot pointers (the
//! destinations themselves are shared). A whole configuration (a file, at start or reloaded)
//! compiles a new generation with new slots. Each compiled destination keeps the
//! `config::Destination` it was compiled from, so `/config` is assembled on request
//! ([`RoutingTable::config`]) instead of a whole `Config` being kept per update. Writers are
//! serialized by the owner of the table ([`crate::state::Shared`]); readers never lock.
//!
//! Endpoint statistics (EWMA, ejection state) live in the [`StatsRegistry`], keyed by address,
//! and are picked up by the next compile of a destination naming the same address, whichever way
//! it is recompiled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName, Method};
use regex::{Regex, RegexBuilder};
use trellis_proxy_api::authority;

use crate::balance::{Balancer, Ejection, EndpointStats};
use crate::config::{self, Config, DefaultAction, HttpMatch, Invalid, Protocol};
use crate::metrics::Label;
use crate::resilience::{Breaker, BreakerState, RateLimiter, RequestPolicy};
use tower::retry::budget::TpsBudget;
use trellis_jwt::{ClaimMatch, JwtPolicy, Verifier};
use trellis_policy::RetryBudget;

/// Most compiled program size of one user regex (bytes).
const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Longest weight schedule; larger weight sums are scaled down to this resolution.
const MAX_SCHEDULE: u64 = 10_000;
/// The registry drops the entries of addresses no table uses any more once it holds this many
/// more than after its last sweep (and at least this many): amortized, not one sweep per new
/// address.
const STATS_SWEEP_SLACK: usize = 256;

/// Endpoint statistics kept across table generations, keyed by address.
#[derive(Debug, Default)]
pub struct StatsRegistry {
    by_address: Mutex<Addresses>,
    /// Circuit-breaker counters by destination key (requests in flight under an old table
    /// still count under the new one).
    breakers: Mutex<HashMap<String, Weak<BreakerState>>>,
    /// Retry budgets by (destination key, route name; empty for the default), with the settings
    /// they were made for: a recompile (an endpoint change) keeps spending the same budget
    /// instead of starting from a full reserve.
    budgets: Mutex<HashMap<BudgetKey, (RetryBudget, Weak<TpsBudget>)>>,
}

/// A retry budget's owner: (destination key, route name; empty for the default).
type BudgetKey = (String, String);

#[derive(Debug, Default)]
struct Addresses {
    map: HashMap<String, Weak<EndpointStats>>,
    /// Sweep when the map reaches this size.
    sweep_at: usize,
}

impl StatsRegistry {
    fn get(&self, address: &str) -> Arc<EndpointStats> {
        // Only called while compiling a table, never on the request path.
        let mut addresses = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(stats) = addresses.map.get(address).and_then(Weak::upgrade) {
            return stats;
        }
        // Sweeping on every new address made compiling N new endpoints O(N^2) (one scan of
        // every known address each); sweeping when the map has grown by a margin keeps it linear.
        if addresses.map.len() >= addresses.sweep_at {
            addresses.map.retain(|_, w| w.strong_count() > 0);
            addresses.sweep_at = addresses.map.len() * 2 + STATS_SWEEP_SLACK;
        }
        let stats = Arc::new(EndpointStats::default());
        addresses
            .map
            .insert(address.to_string(), Arc::downgrade(&stats));
        stats
    }

    fn budget(&self, key: &str, route: &str, settings: &RetryBudget) -> Arc<TpsBudget> {
        let mut map = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let id = (key.to_string(), route.to_string());
        if let Some((made_for, weak)) = map.get(&id)
            && made_for == settings
            && let Some(budget) = weak.upgrade()
        {
            return budget;
        }
        map.retain(|_, (_, w)| w.strong_count() > 0);
        let budget = crate::resilience::retry::new_budget(settings);
        map.insert(id, (settings.clone(), Arc::downgrade(&budget)));
        budget
    }

    fn breaker(&self, key: &str) -> Arc<BreakerState> {
        let mut map = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = map.get(key).and_then(Weak::upgrade) {
            return state;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let state = Arc::new(BreakerState::default());
        map.insert(key.to_string(), Arc::downgrade(&state));
        state
    }
}

/// A destination's place in a table: its compiled entry, replaced whole and atomically by an
/// update of that destination alone. Generations that share a key share its slot.
type Slot = ArcSwap<DestinationTable>;

/// The destinations of a generation.
#[derive(Debug, Default)]
struct Destinations {
    /// By normalized key (`Arc<str>`: copying the map for a new key copies pointers).
    slots: HashMap<Arc<str>, Arc<Slot>>,
    /// The keys in configuration order (files) or order of arrival (controller), for `/config`.
    order: Vec<Arc<str>>,
}

/// One generation of the routing configuration.
#[derive(Debug)]
pub struct RoutingTable {
    /// The configuration this was compiled from, without its destinations (each compiled
    /// destination keeps its own source: [`RoutingTable::config`] assembles the whole).
    pub base: Arc<Config>,
    /// Shared by the generations that differ only in their inbound side.
    destinations: Arc<Destinations>,
    /// Compiled inbound policy, when there is an inbound listener.
    pub inbound: Option<Arc<InboundTable>>,
    /// Compiled inbound policy per original port of the transparent inbound listener (the
    /// application on `127.0.0.1:<port>`).
    pub transparent_inbound: HashMap<u16, Arc<InboundTable>>,
}

/// Result of looking a destination up.
#[derive(Debug)]
pub enum Lookup {
    /// Known: its entry at the time of the lookup (later updates of the destination do not
    /// change it; the next lookup sees them).
    Found(Arc<DestinationTable>),
    /// Well-formed but unknown.
    Unknown(String),
    /// Not a valid authority.
    Invalid(authority::AuthorityError),
}

type InboundTables = (Option<Arc<InboundTable>>, HashMap<u16, Arc<InboundTable>>);

impl RoutingTable {
    /// An empty table (nothing routable yet).
    pub fn empty() -> Self {
        RoutingTable {
            base: Arc::new(Config::default()),
            destinations: Arc::default(),
            inbound: None,
            transparent_inbound: HashMap::new(),
        }
    }

    /// Compile a whole configuration; statistics of endpoints already known are kept.
    pub fn compile(mut config: Config, stats: &StatsRegistry) -> Result<Self, Invalid> {
        let sources = std::mem::take(&mut config.destinations);
        let mut destinations = Destinations {
            slots: HashMap::with_capacity(sources.len()),
            order: Vec::with_capacity(sources.len()),
        };
        for (i, d) in sources.into_iter().enumerate() {
            let field = format!("destinations[{i}]");
            let d = Arc::new(d);
            let table = DestinationTable::compile(&d, &field, stats, config.workload.as_ref())?;
            let key: Arc<str> = Arc::from(table.key.as_str());
            if destinations
                .slots
                .insert(Arc::clone(&key), Arc::new(ArcSwap::from_pointee(table)))
                .is_some()
            {
                return Err(invalid(
                    format!("{field}.authority"),
                    &d.authority,
                    format!("{key} is configured twice"),
                ));
            }
            destinations.order.push(key);
        }
        let (inbound, transparent_inbound) = compile_inbound(&config)?;
        Ok(RoutingTable {
            base: Arc::new(config),
            destinations: Arc::new(destinations),
            inbound,
            transparent_inbound,
        })
    }

    /// The next generation with `base`'s listeners' side (inbound policy, transparent inbound
    /// ports) compiled, and this generation's destinations as they are (shared, not
    /// recompiled). `base.destinations` is ignored.
    pub fn rebase(&self, mut base: Config) -> Result<Self, Invalid> {
        base.destinations = Vec::new();
        let (inbound, transparent_inbound) = compile_inbound(&base)?;
        Ok(RoutingTable {
            base: Arc::new(base),
            destinations: Arc::clone(&self.destinations),
            inbound,
            transparent_inbound,
        })
    }

    /// Compile one destination against this table's base (errors name `field`, e.g.
    /// `destinations[web.shop].routes[0].path_regex`), to give to
    /// [`RoutingTable::replace_destination`].
    pub fn compile_destination(
        &self,
        source: config::Destination,
        field: &str,
        stats: &StatsRegistry,
    ) -> Result<DestinationTable, Invalid> {
        DestinationTable::compile(&Arc::new(source), field, stats, self.base.workload.as_ref())
    }

    /// Put `compiled` in its destination's slot. A known key: stored in its slot, which this
    /// and later generations share (nothing else is touched), and `None` is returned. A new key:
    /// the next generation to publish is returned, with the map of slot pointers copied and
    /// the new slot added. Callers serialize their writes (a slot stored into while another
    /// writer publishes a generation without that key would be lost).
    #[must_use = "a new destination is only visible once the returned generation is published"]
    pub fn replace_destination(&self, compiled: DestinationTable) -> Option<RoutingTable> {
        if let Some(slot) = self.destinations.slots.get(compiled.key.as_str()) {
            slot.store(Arc::new(compiled));
            return None;
        }
        let key: Arc<str> = Arc::from(compiled.key.as_str());
        let mut slots = self.destinations.slots.clone();
        slots.insert(Arc::clone(&key), Arc::new(ArcSwap::from_pointee(compiled)));
        let mut order = self.destinations.order.clone();
        order.push(key);
        Some(self.with_destinations(Destinations { slots, order }))
    }

    /// The next generation without the destination `key`, to publish; `None` when it is not in
    /// this one.
    #[must_use = "the removal is only visible once the returned generation is published"]
    pub fn remove_destination(&self, key: &str) -> Option<RoutingTable> {
        if !self.destinations.slots.contains_key(key) {
            return None;
        }
        let mut slots = self.destinations.slots.clone();
        slots.remove(key);
        let order = self
            .destinations
            .order
            .iter()
            .filter(|k| ***k != *key)
            .cloned()
            .collect();
        Some(self.with_destinations(Destinations { slots, order }))
    }

    fn with_destinations(&self, destinations: Destinations) -> RoutingTable {
        RoutingTable {
            base: Arc::clone(&self.base),
            destinations: Arc::new(destinations),
            inbound: self.inbound.clone(),
            transparent_inbound: self.transparent_inbound.clone(),
        }
    }

    /// Give every inbound table of this generation with a `jwt` section its verifier, from
    /// `verifiers` (the one of an equal policy in a generation before, else a new one, which
    /// starts loading its keys). Called on the runtime by the table's owner before the
    /// generation becomes current, so keys load ahead of the first request; compiling alone
    /// never does it.
    pub fn authenticate(&self, verifiers: &Verifiers) {
        for inbound in self.inbound.iter().chain(self.transparent_inbound.values()) {
            if let Some(jwt) = &inbound.jwt {
                jwt.verifier(verifiers);
            }
        }
    }

    /// The configuration in force, assembled from the base and each destination's source (the
    /// admin port's `/config`; a file reload's comparison with what runs).
    pub fn config(&self) -> Config {
        let mut config = Config::clone(&self.base);
        config.destinations = self
            .destinations
            .order
            .iter()
            .filter_map(|key| self.destinations.slots.get(key))
            .map(|slot| config::Destination::clone(&slot.load().source))
            .collect();
        config
    }

    /// Check a file configuration without keeping the result.
    pub fn validate(config: &Config) -> Result<(), Invalid> {
        let table = RoutingTable::compile(config.clone(), &StatsRegistry::default())?;
        for (i, port) in config.outbound.ports.iter().enumerate() {
            if let Lookup::Unknown(_) | Lookup::Invalid(_) = table.lookup(&port.destination) {
                return Err(invalid(
                    format!("outbound.ports[{i}].destination"),
                    &port.destination,
                    format!(
                        "{:?} is not one of the configured destinations",
                        port.destination
                    ),
                ));
            }
        }
        for (i, udp) in config.outbound.udp.iter().enumerate() {
            let field = format!("outbound.udp[{i}].destination");
            if let Lookup::Unknown(_) | Lookup::Invalid(_) = table.lookup(&udp.destination) {
                return Err(invalid(
                    field,
                    &udp.destination,
                    format!(
                        "{:?} is not one of the configured destinations",
                        udp.destination
                    ),
                ));
            }
            if udp_port(&udp.destination) == Some(0) {
                return Err(invalid(
                    field,
                    &udp.destination,
                    "port 0 names no application port".into(),
                ));
            }
        }
        Ok(())
    }

    /// Find the destination for an authority as written by a client.
    pub fn lookup(&self, written: &str) -> Lookup {
        // Fast path: clients usually write exactly the configured key (no allocation).
        if let Some(d) = self.get(written) {
            return Lookup::Found(d);
        }
        if let Some((host, port)) = written.rsplit_once(':')
            && !host.contains(':')
            && port.bytes().all(|b| b.is_ascii_digit())
            && let Some(d) = self.get(host)
        {
            return Lookup::Found(d);
        }
        match authority::normalize(written) {
            Ok(a) => {
                let key = a.key();
                match self.get(&key) {
                    Some(d) => Lookup::Found(d),
                    None => Lookup::Unknown(key),
                }
            }
            Err(e) => Lookup::Invalid(e),
        }
    }

    /// The current entry of the destination with normalized key `key`.
    pub fn get(&self, key: &str) -> Option<Arc<DestinationTable>> {
        // `load_full`: the request holds its destination for its whole life, longer than an
        // arc-swap guard should be kept.
        self.destinations
            .slots
            .get(key)
            .map(|slot| slot.load_full())
    }

    /// The current entry of every destination (in configuration order).
    pub fn entries(&self) -> impl Iterator<Item = Arc<DestinationTable>> + '_ {
        self.destinations
            .order
            .iter()
            .filter_map(|key| self.get(key))
    }

    /// Destination keys, sorted (for logs and tests).
    pub fn destination_keys(&self) -> Vec<String> {
        let mut keys: Vec<_> = self
            .destinations
            .slots
            .keys()
            .map(|k| k.to_string())
            .collect();
        keys.sort();
        keys
    }
}

/// The UDP port written in an `outbound.udp` destination (`dns.default:53` -> 53), if any.
pub fn udp_port(destination: &str) -> Option<u16> {
    let (host, port) = destination.rsplit_once(':')?;
    if host.is_empty() || (host.contains(':') && !host.ends_with(']')) {
        // An IPv6 address without brackets: no port.
        return None;
    }
    port.parse().ok()
}

/// The listeners' side of `config`: the inbound listener's policy and the transparent inbound
/// ports' policies.
fn compile_inbound(config: &Config) -> Result<InboundTables, Invalid> {
    let inbound = match &config.inbound {
        Some(inbound) => Some(Arc::new(InboundTable::compile(inbound)?)),
        None => None,
    };
    let mut transparent_inbound = HashMap::new();
    for (i, port) in config.transparent.inbound_ports.iter().enumerate() {
        let as_inbound = config::Inbound {
            listen: config
                .transparent
                .inbound
                .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
            app: std::net::SocketAddr::from(([127, 0, 0, 1], port.port)),
            protocol: port.protocol,
            policy: port.policy.clone(),
        };
        let table = InboundTable::compile(&as_inbound).map_err(|mut e| {
            e.field = e
                .field
                .replacen("inbound.", &format!("transparent.inbound_ports[{i}]."), 1);
            e
        })?;
        if transparent_inbound
            .insert(port.port, Arc::new(table))
            .is_some()
        {
            return Err(invalid(
                format!("transparent.inbound_ports[{i}].port"),
                &port.port.to_string(),
                format!("port {} is configured twice", port.port),
            ));
        }
    }
    Ok((inbound, transparent_inbound))
}

fn invalid(field: String, value: &str, message: String) -> Invalid {
    Invalid {
        field,
        value: value.to_string(),
        message,
    }
}

/// A compiled destination.
#[derive(Debug)]
pub struct DestinationTable {
    /// Normalized key.
    pub key: String,
    /// Protocol towards the destination.
    pub protocol: Protocol,
    /// What requests matching no route get (timeouts, retries, faults, mirror).
    pub policy: Arc<RequestPolicy>,
    /// Limits on what the destination may hold open, when its policy sets them.
    pub breaker: Option<Breaker>,
    /// Which failures count towards outlier ejection (when the policy ejects).
    pub ejection_counts: trellis_policy::FailureKind,
    /// Share of new traces sampled towards this destination (None = the proxy's default).
    pub trace_sampling: Option<f64>,
    /// Active health checks of the endpoints, when the policy sets them (probing is started
    /// by [`crate::state::Shared`] when this entry becomes current, never by compiling).
    pub health: Option<crate::health::Checks>,
    /// Backends, referenced by index from splits.
    pub backends: Vec<BackendTable>,
    /// Label value naming the destination on metrics.
    pub label: Label,
    /// What this was compiled from (`/config`; the base of the controller's endpoint deltas).
    pub source: Arc<config::Destination>,
    /// Set for a declared destination outside the mesh: who may call it, its ports, the TLS
    /// originated to it.
    pub external: Option<crate::external::ExternalTable>,
    routes: Vec<RouteTable>,
    split: Split,
}

/// The route a request matched in a [`DestinationTable`] (None: the default split).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRef(Option<usize>);

impl DestinationTable {
    fn compile(
        d: &Arc<config::Destination>,
        field: &str,
        stats: &StatsRegistry,
        _source: Option<&config::Workload>,
    ) -> Result<Self, Invalid> {
        let key = authority::normalize(&d.authority)
            .map_err(|e| invalid(format!("{field}.authority"), &d.authority, e.to_string()))?
            .key();
        let namespace = key
            .split_once('.')
            .map_or("default", |(_, ns)| ns)
            .to_string();
        let mut backends = Vec::with_capacity(d.backends.len());
        let mut index = HashMap::new();
        for (i, b) in d.backends.iter().enumerate() {
            let bfield = format!("{field}.backends[{i}]");
            if index.insert(b.name.as_str(), i).is_some() {
                return Err(invalid(
                    format!("{bfield}.name"),
                    &b.name,
                    format!("backend {:?} is listed twice", b.name),
                ));
            }
            let workload = b
                .workload
                .clone()
                .or_else(|| d.workload.clone())
                .unwrap_or_else(|| config::Workload {
                    kind: "service".into(),
                    name: b.name.clone(),
                    namespace: namespace.clone(),
                });
            backends.push((b, bfield, workload));
        }
        let ejection = checked_policy(d, field)?;
        let external = d
            .external
            .as_ref()
            .map(|e| crate::external::ExternalTable::compile(e, &key, &format!("{field}.external")))
            .transpose()?;
        let health = match d.policy.as_ref().and_then(|p| p.health_check.as_ref()) {
            Some(h) => Some(crate::health::Checks::compile(h, field)?),
            None => None,
        };
        let backends = backends
            .into_iter()
            .map(|(b, bfield, workload)| {
                BackendTable::compile(b, &bfield, d, &workload, stats, ejection, health.is_some())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ready: Vec<bool> = backends.iter().map(|b| !b.endpoints.is_empty()).collect();
        let split = Split::new(shares(
            d.backends.iter().enumerate().map(|(i, b)| (i, b.weight)),
            &ready,
        ));
        let legacy_timeout = d
            .request_timeout_ms
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        let mirror = check_mirror(
            d.policy.as_ref().and_then(|p| p.mirror.as_ref()),
            &format!("{field}.policy.mirror"),
            &index,
        )?;
        let mut routes = Vec::with_capacity(d.routes.len());
        for (i, r) in d.routes.iter().enumerate() {
            let rfield = format!("{field}.routes[{i}]");
            let mut route = RouteTable::compile(r, &rfield, &index, &ready)?;
            if let Some(own) = &r.policy {
                let applied = match &d.policy {
                    Some(dp) => own.over(dp),
                    None => own.clone(),
                };
                let mirror = check_mirror(
                    applied.mirror.as_ref(),
                    &format!("{rfield}.policy.mirror"),
                    &index,
                )?;
                route.policy = Some(Arc::new(RequestPolicy::compile(
                    &applied,
                    legacy_timeout,
                    mirror,
                    |b| stats.budget(&key, r.name.as_str(), b),
                )));
            }
            routes.push(route);
        }
        let breaker = d
            .policy
            .as_ref()
            .and_then(|p| p.circuit_breaker.as_ref())
            .map(|b| Breaker::compile(b, stats.breaker(&key)));
        if let Some(r) = d.trace_sampling
            && !(0.0..=1.0).contains(&r)
        {
            return Err(invalid(
                format!("{field}.trace_sampling"),
                &r.to_string(),
                "must be between 0.0 and 1.0".to_string(),
            ));
        }
        let policy = Arc::new(RequestPolicy::for_destination(
            d.policy.as_ref(),
            legacy_timeout,
            mirror,
            |b| stats.budget(&key, "", b),
        ));
        Ok(DestinationTable {
            trace_sampling: d.trace_sampling,
            label: Label::from(key.as_str()),
            key,
            protocol: d.protocol,
            policy,
            breaker,
            ejection_counts: d
                .policy
                .as_ref()
                .and_then(|p| p.outlier_detection.as_ref())
                .map(|o| o.failures)
                .unwrap_or_default(),
            health,
            backends,
            source: Arc::clone(d),
            external,
            routes,
            split,
        })
    }

    /// The route a request takes: the first route that matches it, else the default split.
    pub fn match_route(&self, method: &Method, path: &str, headers: &HeaderMap) -> RouteRef {
        RouteRef(self.routes.iter().position(|route| {
            route.matches.is_empty()
                || route
                    .matches
                    .iter()
                    .any(|m| m.matches(method, path, headers))
        }))
    }

    /// The route's name (empty for the default split).
    pub fn route_name(&self, route: RouteRef) -> &Label {
        static DEFAULT_ROUTE: std::sync::LazyLock<Label> =
            std::sync::LazyLock::new(|| Label::from(""));
        route
            .0
            .and_then(|i| self.routes.get(i))
            .map_or(&DEFAULT_ROUTE, |r| &r.name)
    }

    /// The policy of the route's requests (the route's own, else the destination's).
    pub fn route_policy(&self, route: RouteRef) -> &Arc<RequestPolicy> {
        route
            .0
            .and_then(|i| self.routes.get(i))
            .and_then(|r| r.policy.as_ref())
            .unwrap_or(&self.policy)
    }

    /// The index of the backend named `name`, if this destination still has it. A task that
    /// outlives the table it started from (a mirror copy) finds its backend again by name: a
    /// controller update may have removed it or moved the others.
    pub fn backend_named(&self, name: &str) -> Option<usize> {
        self.backends.iter().position(|b| b.name.as_str() == name)
    }

    /// The next backend of the route's split (index into `backends`); None when every weight
    /// is 0 or there are no backends.
    pub fn split(&self, route: RouteRef) -> Option<usize> {
        let split = route
            .0
            .and_then(|i| self.routes.get(i))
            .and_then(|r| r.split.as_ref())
            .unwrap_or(&self.split);
        split.next()
    }

    /// Pick a backend for a new TCP connection (routes do not apply).
    pub fn route_connection(&self) -> Option<&BackendTable> {
        self.split.next().map(|i| &self.backends[i])
    }
}

/// Weighted choice as a precomputed, evenly interleaved schedule walked by one atomic counter:
/// exact proportions over every full cycle, no locks, no randomness to flake, weight 0 never
/// scheduled.
#[derive(Debug)]
struct Split {
    schedule: Box<[u16]>,
    next: AtomicUsize,
}

impl Split {
    fn new(weights: impl Iterator<Item = (usize, u32)>) -> Self {
        let mut weights: Vec<(usize, u64)> = weights
            .filter(|(_, w)| *w > 0)
            .map(|(i, w)| (i, u64::from(w)))
            .collect();
        let g = weights.iter().fold(0, |g, (_, w)| gcd(g, *w)).max(1);
        weights.iter_mut().for_each(|(_, w)| *w /= g);
        let total: u64 = weights.iter().map(|(_, w)| w).sum();
        if total > MAX_SCHEDULE {
            // Keep proportions at 1/MAX_SCHEDULE resolution; every positive weight keeps a slot.
            weights
                .iter_mut()
                .for_each(|(_, w)| *w = (*w * MAX_SCHEDULE / total).max(1));
        }
        // Smooth weighted round robin (nginx): spreads each backend evenly over the cycle.
        let total: i64 = weights.iter().map(|(_, w)| *w as i64).sum();
        let mut current = vec![0i64; weights.len()];
        let mut schedule = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (k, (_, w)) in weights.iter().enumerate() {
                current[k] += *w as i64;
                if current[k] > current[best] {
                    best = k;
                }
            }
            current[best] -= total;
            schedule.push(weights[best].0 as u16);
        }
        Split {
            schedule: schedule.into_boxed_slice(),
            next: AtomicUsize::new(fastrand::usize(..1 << 16)),
        }
    }

    fn next(&self) -> Option<usize> {
        match self.schedule.len() {
            0 => None,
            1 => Some(self.schedule[0] as usize),
            n => Some(self.schedule[self.next.fetch_add(1, Ordering::Relaxed) % n] as usize),
        }
    }
}

/// The destination's policy, checked (every value in range), and the balancer's outlier
/// ejection from it.
fn checked_policy(d: &config::Destination, field: &str) -> Result<Option<Ejection>, Invalid> {
    let Some(policy) = &d.policy else {
        return Ok(None);
    };
    let prefix = format!("{field}.policy");
    let mut problems = trellis_policy::validate_destination(policy, &prefix);
    for (i, route) in d.routes.iter().enumerate() {
        if let Some(p) = &route.policy {
            problems.extend(trellis_policy::validate_route(
                p,
                &format!("{field}.routes[{i}].policy"),
            ));
        }
    }
    if let Some(problem) = problems.into_iter().next() {
        return Err(policy_problem(problem));
    }
    Ok(policy.outlier_detection.as_ref().map(|o| Ejection {
        threshold: o.consecutive_failures,
        base: o.base_ejection_time.get(),
        max: o.max_ejection_time.get(),
        max_percent: o.max_ejected_percent,
    }))
}

/// The balancer: the policy's `loadBalancer` when it sets one, else the destination's.
fn balancer_kind(d: &config::Destination) -> config::BalancerKind {
    use trellis_policy::LoadBalancer;
    match d.policy.as_ref().and_then(|p| p.load_balancer) {
        Some(LoadBalancer::Ewma) => config::BalancerKind::Ewma,
        Some(LoadBalancer::RoundRobin) => config::BalancerKind::RoundRobin,
        Some(LoadBalancer::LeastRequest) => config::BalancerKind::LeastRequest,
        None => d.balancer,
    }
}

/// A mirror must name one of the destination's backends (the copies' endpoints come from it).
fn check_mirror(
    mirror: Option<&trellis_policy::Mirror>,
    field: &str,
    backends: &HashMap<&str, usize>,
) -> Result<Option<usize>, Invalid> {
    let Some(m) = mirror else { return Ok(None) };
    match backends.get(m.backend.as_str()) {
        Some(&i) => Ok(Some(i)),
        None => Err(invalid(
            format!("{field}.backend"),
            &m.backend,
            format!(
                "backend {:?} is not one of the destination's backends (add it with weight 0)",
                m.backend
            ),
        )),
    }
}

/// A policy problem as an [`Invalid`]: the value searched for to find its line is the field's
/// last name (`perTry`), the closest thing the file holds.
fn policy_problem(p: trellis_policy::Problem) -> Invalid {
    let leaf = p
        .field
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .split('[')
        .next()
        .unwrap_or_default()
        .to_string();
    Invalid {
        field: p.field,
        value: leaf,
        message: p.message,
    }
}

/// A problem of an inbound policy's `jwt` section as an [`Invalid`] under
/// `inbound.policy.jwt`. The value searched for to find its line is the offending value as
/// written when it is a string (an issuer, a URL, an algorithm, a duration), else the field's
/// last name.
/// The claim requirements of an inbound policy, checked: each has conditions, each condition
/// is usable, and the policy has the `jwt` that verifies the claims.
fn compile_claim_requirements(
    policy: &config::InboundPolicy,
) -> Result<Vec<ClaimRequirementTable>, Invalid> {
    let mut out = Vec::with_capacity(policy.claim_requirements.len());
    for (i, r) in policy.claim_requirements.iter().enumerate() {
        let field = format!("inbound.policy.claim_requirements[{i}]");
        if r.claims.is_empty() {
            return Err(invalid(
                format!("{field}.claims"),
                "claims",
                "a requirement without conditions requires nothing: name at least one claim".into(),
            ));
        }
        for (j, m) in r.claims.iter().enumerate() {
            if let Some(p) = m.validate().into_iter().next() {
                let value = if m.claim.trim().is_empty() {
                    "claims"
                } else {
                    m.claim.as_str()
                };
                return Err(invalid(
                    format!("{field}.claims[{j}].{}", p.field),
                    value,
                    p.message,
                ));
            }
        }
        if policy.jwt.is_none() {
            return Err(invalid(
                format!("{field}.claims"),
                "claim_requirements",
                "claim requirements need the policy's jwt: without it no request has verified claims, and every request they cover would be refused".into(),
            ));
        }
        let mut matches = Vec::with_capacity(r.matches.len());
        for (j, m) in r.matches.iter().enumerate() {
            matches.push(Matcher::compile(m, &format!("{field}.matches[{j}]"))?);
        }
        out.push(ClaimRequirementTable {
            name: r.name.clone(),
            matches,
            claims: r.claims.clone(),
        });
    }
    Ok(out)
}

fn jwt_problem(p: trellis_policy::Problem, policy: &JwtPolicy) -> Invalid {
    let written = serde_json::to_value(policy).ok().and_then(|mut value| {
        for step in p.field.split('.') {
            let (name, index) = match step.split_once('[') {
                Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
                None => (step, None),
            };
            value = value.get_mut(name)?.take();
            if let Some(i) = index {
                value = value.get_mut(i)?.take();
            }
        }
        value
            .as_str()
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string)
    });
    let leaf = policy_problem(p.clone()).value;
    // A duration is written back in its own spelling (`600s` as `10m`): its name is safer.
    let written = written.filter(|_| !matches!(leaf.as_str(), "clockSkew" | "refreshInterval"));
    Invalid {
        field: format!("inbound.policy.jwt.{}", p.field),
        value: written.unwrap_or(leaf),
        message: p.message,
    }
}

/// The weights a split schedules: a weighted backend with no endpoints gives its share to the
/// others (a canary scaled to zero in the same tick as its weight goes to 0, a version whose pods
/// all went away) instead of failing its share with 503 `no-endpoints`, as long as some weighted
/// backend has endpoints; when none has, the weights stay, and requests get `no-endpoints`
/// (which says more than `no-backends`). `ready[i]`: backend `i` has endpoints.
fn shares(
    weights: impl Iterator<Item = (usize, u32)>,
    ready: &[bool],
) -> impl Iterator<Item = (usize, u32)> {
    let weights: Vec<(usize, u32)> = weights.collect();
    let any_ready = weights
        .iter()
        .any(|&(i, w)| w > 0 && ready.get(i).copied().unwrap_or(false));
    weights.into_iter().map(move |(i, w)| {
        if any_ready && !ready.get(i).copied().unwrap_or(false) {
            (i, 0)
        } else {
            (i, w)
        }
    })
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[derive(Debug)]
struct RouteTable {
    name: Label,
    matches: Vec<Matcher>,
    split: Option<Split>,
    /// Set when the route has a policy of its own.
    policy: Option<Arc<RequestPolicy>>,
}

impl RouteTable {
    fn compile(
        r: &config::Route,
        field: &str,
        backends: &HashMap<&str, usize>,
        ready: &[bool],
    ) -> Result<Self, Invalid> {
        let mut matches = Vec::new();
        if r.path_regex.is_some() || !r.methods.is_empty() || !r.headers.is_empty() {
            let shorthand = HttpMatch {
                path_regex: r.path_regex.clone(),
                methods: r.methods.clone(),
                headers: r.headers.clone(),
            };
            matches.push(Matcher::compile(&shorthand, field)?);
        }
        for (i, m) in r.matches.iter().enumerate() {
            matches.push(Matcher::compile(m, &format!("{field}.matches[{i}]"))?);
        }
        let split = if r.backends.is_empty() {
            None
        } else {
            let mut weights = Vec::with_capacity(r.backends.len());
            for (i, b) in r.backends.iter().enumerate() {
                let Some(&index) = backends.get(b.name.as_str()) else {
                    return Err(invalid(
                        format!("{field}.backends[{i}]"),
                        &b.name,
                        format!(
                            "backend {:?} is not one of the destination's backends",
                            b.name
                        ),
                    ));
                };
                weights.push((index, b.weight));
            }
            Some(Split::new(shares(weights.into_iter(), ready)))
        };
        Ok(RouteTable {
            name: Label::from(r.name.as_str()),
            matches,
            split,
            policy: None,
        })
    }
}

/// A compiled HTTPRouteGroup match (all present parts must match).
#[derive(Debug)]
pub struct Matcher {
    path: Option<Regex>,
    methods: Option<Vec<Method>>,
    headers: Vec<(HeaderName, Regex)>,
}

impl Matcher {
    /// Compile one match; `field` names it in errors.
    pub fn compile(m: &HttpMatch, field: &str) -> Result<Self, Invalid> {
        let path = match &m.path_regex {
            Some(re) => Some(compile_regex(re, &format!("{field}.path_regex"))?),
            None => None,
        };
        let methods = if m.methods.is_empty() || m.methods.iter().any(|m| m == "*") {
            None
        } else {
            let mut methods = Vec::with_capacity(m.methods.len());
            for (i, name) in m.methods.iter().enumerate() {
                let method =
                    Method::from_bytes(name.to_ascii_uppercase().as_bytes()).map_err(|_| {
                        invalid(
                            format!("{field}.methods[{i}]"),
                            name,
                            format!("{name:?} is not an HTTP method"),
                        )
                    })?;
                methods.push(method);
            }
            Some(methods)
        };
        let mut headers = Vec::with_capacity(m.headers.len());
        for (name, re) in &m.headers {
            let hfield = format!("{field}.headers.{name}");
            let header =
                HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    invalid(
                        hfield.clone(),
                        name,
                        format!("{name:?} is not a header name"),
                    )
                })?;
            headers.push((header, compile_regex(re, &hfield)?));
        }
        Ok(Matcher {
            path,
            methods,
            headers,
        })
    }

    /// Whether a request matches.
    pub fn matches(&self, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        if let Some(methods) = &self.methods
            && !methods.contains(method)
        {
            return false;
        }
        if let Some(re) = &self.path
            && !re.is_match(path)
        {
            return false;
        }
        self.headers.iter().all(|(name, re)| {
            headers
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| re.is_match(v)))
        })
    }
}

fn compile_regex(re: &str, field: &str) -> Result<Regex, Invalid> {
    RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| invalid(field.to_string(), re, format!("invalid regex {re:?}: {e}")))
}

/// A compiled backend.
#[derive(Debug)]
pub struct BackendTable {
    /// Backend name as a metric label.
    pub name: Label,
    /// Endpoints.
    pub endpoints: Vec<EndpointTable>,
    /// Destination workload labels.
    pub workload: WorkloadLabels,
    /// This backend's outbound request series, found once per label set.
    pub series: crate::metrics::SeriesCache,
    balancer: Balancer,
}

/// Metric labels of a destination workload.
#[derive(Debug, Clone)]
pub struct WorkloadLabels {
    /// Kind.
    pub kind: Label,
    /// Name.
    pub name: Label,
    /// Namespace.
    pub namespace: Label,
}

impl From<&config::Workload> for WorkloadLabels {
    fn from(w: &config::Workload) -> Self {
        WorkloadLabels {
            kind: Label::from(w.kind.as_str()),
            name: Label::from(w.name.as_str()),
            namespace: Label::from(w.namespace.as_str()),
        }
    }
}

impl BackendTable {
    fn compile(
        b: &config::Backend,
        field: &str,
        d: &config::Destination,
        workload: &config::Workload,
        stats: &StatsRegistry,
        ejection: Option<Ejection>,
        health_checked: bool,
    ) -> Result<Self, Invalid> {
        let mut endpoints = Vec::with_capacity(b.endpoints.len());
        for (i, e) in b.endpoints.iter().enumerate() {
            let efield = format!("{field}.endpoints[{i}].address");
            let authority: http::uri::Authority = e.address.parse().map_err(|err| {
                invalid(
                    efield.clone(),
                    &e.address,
                    format!("{:?} is not host:port: {err}", e.address),
                )
            })?;
            // An outside endpoint takes the port of each call ([`crate::external`]).
            if authority.port_u16().is_none() && d.external.is_none() {
                return Err(invalid(
                    efield,
                    &e.address,
                    format!("{:?} has no port", e.address),
                ));
            }
            let http2 = matches!(e.protocol.unwrap_or(d.protocol), Protocol::Http2);
            endpoints.push(EndpointTable {
                authority,
                http2,
                identity: e.identity.as_deref().map(Label::from),
                weight: e.weight,
                stats: stats.get(&e.address),
            });
        }
        Ok(BackendTable {
            name: Label::from(b.name.as_str()),
            endpoints,
            workload: WorkloadLabels::from(workload),
            series: Default::default(),
            balancer: Balancer::new(balancer_kind(d))
                .with_ejection(ejection)
                .with_health_checks(health_checked),
        })
    }

    /// Pick an endpoint for a request: the balancer's choice, unless it is `avoid` (the endpoint
    /// a retry's last try failed on) or full (the breaker's `maxRequestsPerEndpoint`); then
    /// the next endpoint round the list that is neither (nor ejected, nor unhealthy: health
    /// checks). `avoid` is used when it is the only one with room.
    pub fn pick_for(
        &self,
        avoid: Option<usize>,
        breaker: Option<&Breaker>,
    ) -> Result<usize, PickError> {
        let choice = self
            .balancer
            .pick(self.endpoints.iter().map(|e| (&*e.stats, e.weight)))
            .ok_or(PickError::NoEndpoints)?;
        let has_room = |i: usize| {
            breaker.is_none_or(|b| b.endpoint_has_room(self.endpoints[i].stats.in_flight()))
        };
        if Some(choice) != avoid && has_room(choice) {
            return Ok(choice);
        }
        let n = self.endpoints.len();
        let other = (1..n).map(|k| (choice + k) % n).find(|&i| {
            Some(i) != avoid && has_room(i) && self.balancer.available(&self.endpoints[i].stats)
        });
        match other {
            Some(i) => Ok(i),
            None if has_room(choice) => Ok(choice),
            None => Err(PickError::Overloaded),
        }
    }

    /// Pick an endpoint (None when the backend has none).
    pub fn pick(&self) -> Option<&EndpointTable> {
        self.balancer
            .pick(self.endpoints.iter().map(|e| (&*e.stats, e.weight)))
            .map(|i| &self.endpoints[i])
    }
}

/// Why no endpoint was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    /// The backend has none.
    NoEndpoints,
    /// Every endpoint has its maximum of requests in flight.
    Overloaded,
}

/// A compiled endpoint.
#[derive(Debug)]
pub struct EndpointTable {
    /// Address as a URI authority (cheap to clone into request URIs).
    pub authority: http::uri::Authority,
    /// Speak h2c to this endpoint.
    pub http2: bool,
    /// Expected SPIFFE identity: non-empty = mTLS, the server certificate must name it.
    pub identity: Option<Label>,
    /// Relative weight within the backend (the balancer's; 0 counts as 1).
    pub weight: u32,
    /// Shared statistics.
    pub stats: Arc<EndpointStats>,
}

/// The compiled inbound side.
#[derive(Debug)]
pub struct InboundTable {
    /// The local application.
    pub app: std::net::SocketAddr,
    /// The application's address as a URI authority.
    pub app_authority: http::uri::Authority,
    /// How the application speaks.
    pub protocol: Protocol,
    /// Default action.
    pub default_action: DefaultAction,
    /// Allow rules.
    pub authorizations: Vec<AuthorizationTable>,
    /// Local rate limits, first match decides.
    rate_limits: Vec<(Vec<Matcher>, RateLimiter)>,
    /// JWT authentication, when the policy has a `jwt` section.
    pub jwt: Option<InboundJwt>,
    /// Claim requirements ([`config::InboundPolicy::claim_requirements`]), all that match apply.
    pub claim_requirements: Vec<ClaimRequirementTable>,
}

/// A compiled claim requirement: the requests it covers and the claims they must carry.
#[derive(Debug)]
pub struct ClaimRequirementTable {
    /// For logs.
    pub name: String,
    /// Matches (ORed); empty = every request.
    pub matches: Vec<Matcher>,
    /// Conditions, all of which must hold.
    pub claims: Vec<ClaimMatch>,
}

/// A compiled allow rule.
#[derive(Debug)]
pub struct AuthorizationTable {
    /// Allowed identities (`*` = anyone).
    pub identities: Vec<String>,
    /// Ports (empty = all).
    pub ports: Vec<u16>,
    /// Routes (empty = every request and opaque TCP).
    pub routes: Vec<Matcher>,
    /// Callers without identity match too.
    pub unauthenticated: bool,
    /// Source networks (empty = any).
    pub networks: Vec<ipnet::IpNet>,
    /// The transport protocols the rule covers.
    pub protocols: Covers,
    /// Conditions on the verified JWT's claims, all of which must hold (empty = none).
    pub claims: Vec<ClaimMatch>,
}

/// The JWT authentication of an inbound table: its policy, and the [`Verifier`] checking
/// tokens against it. Compiling makes no verifier (a verifier starts key-refresh tasks, and
/// compiling must not need a runtime): the table's owner hands it one from its [`Verifiers`]
/// when the table becomes current ([`RoutingTable::authenticate`]), or the first request does.
#[derive(Debug)]
pub struct InboundJwt {
    /// The policy (validated).
    pub policy: JwtPolicy,
    /// `None` inside: no verifier could be made (every token is refused, fail closed).
    verifier: OnceLock<Option<Arc<Verifier>>>,
}

impl InboundJwt {
    /// The verifier of this table: the one `verifiers` holds for an equal policy, else a new
    /// one (call it on the runtime). `None`: it could not be made.
    pub fn verifier(&self, verifiers: &Verifiers) -> Option<&Arc<Verifier>> {
        self.verifier
            .get_or_init(|| verifiers.get(&self.policy))
            .as_ref()
    }
}

/// The JWT verifiers in use, by policy, so that a recompiled table (a file reload, a new
/// inbound policy with the same `jwt`) keeps the verifier of its policy, and with it the keys
/// loaded and the refresh state (backoff, last good key set). Held weakly: a verifier lives as
/// long as some table generation uses it, and its refresh tasks stop when the last one goes.
#[derive(Debug, Default)]
pub struct Verifiers {
    /// Few policies per proxy (one per inbound port at most): a list, compared by equality.
    by_policy: Mutex<Vec<(JwtPolicy, Weak<Verifier>)>>,
}

impl Verifiers {
    /// The verifier of `policy`: the live one of an equal policy, or a new one (which starts
    /// its key loading: call it on the runtime). `None` if the policy is refused (compiling
    /// validated it, so only a bug gets here; tokens are then refused).
    pub fn get(&self, policy: &JwtPolicy) -> Option<Arc<Verifier>> {
        let mut by_policy = self.by_policy.lock().unwrap_or_else(|p| p.into_inner());
        by_policy.retain(|(_, verifier)| verifier.strong_count() > 0);
        if let Some(live) = by_policy
            .iter()
            .find(|(p, _)| p == policy)
            .and_then(|(_, verifier)| verifier.upgrade())
        {
            return Some(live);
        }
        match Verifier::new(policy) {
            Ok(verifier) => {
                let verifier = Arc::new(verifier);
                by_policy.push((policy.clone(), Arc::downgrade(&verifier)));
                Some(verifier)
            }
            Err(problems) => {
                tracing::error!(?problems, "JWT policy refused; its tokens are refused");
                None
            }
        }
    }

    /// How many verifiers are alive (for tests and status).
    pub fn live(&self) -> usize {
        self.by_policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, verifier)| verifier.strong_count() > 0)
            .count()
    }
}

/// The transport protocols an allow rule covers ([`config::Authorization::protocols`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Covers {
    /// TCP connections (opaque TCP and HTTP).
    pub tcp: bool,
    /// UDP tunnels.
    pub udp: bool,
}

impl Covers {
    /// What `protocols` lists; an empty list is TCP only.
    pub fn of(protocols: &[config::L4Protocol]) -> Self {
        if protocols.is_empty() {
            return Covers {
                tcp: true,
                udp: false,
            };
        }
        Covers {
            tcp: protocols.contains(&config::L4Protocol::Tcp),
            udp: protocols.contains(&config::L4Protocol::Udp),
        }
    }
}

impl InboundTable {
    /// Compile the inbound config.
    pub fn compile(inbound: &config::Inbound) -> Result<Self, Invalid> {
        let mut authorizations = Vec::with_capacity(inbound.policy.authorizations.len());
        for (i, a) in inbound.policy.authorizations.iter().enumerate() {
            let field = format!("inbound.policy.authorizations[{i}]");
            let mut routes = Vec::with_capacity(a.routes.len());
            for (j, m) in a.routes.iter().enumerate() {
                routes.push(Matcher::compile(m, &format!("{field}.routes[{j}]"))?);
            }
            let mut networks = Vec::with_capacity(a.networks.len());
            for (j, n) in a.networks.iter().enumerate() {
                // A bare address is a one-host network.
                let parsed = n
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| n.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
                networks.push(parsed.map_err(|_| {
                    invalid(
                        format!("{field}.networks[{j}]"),
                        n,
                        format!("{n:?} is not a CIDR (e.g. 10.0.0.0/8) or an IP address"),
                    )
                })?);
            }
            let protocols = Covers::of(&a.protocols);
            if protocols.udp && !routes.is_empty() {
                return Err(invalid(
                    format!("{field}.protocols"),
                    "protocols",
                    "a rule with routes covers HTTP requests only; allow udp in a rule without routes".into(),
                ));
            }
            for (j, m) in a.claims.iter().enumerate() {
                let at = format!("{field}.claims[{j}]");
                if let Some(p) = m.validate().into_iter().next() {
                    // The claim's name finds its line; an empty one, the list's.
                    let value = if m.claim.trim().is_empty() {
                        "claims"
                    } else {
                        m.claim.as_str()
                    };
                    return Err(invalid(format!("{at}.{}", p.field), value, p.message));
                }
                if inbound.policy.jwt.is_none() {
                    return Err(invalid(
                        at,
                        &m.claim,
                        "a claim condition needs the policy's jwt: without it no request has verified claims, and this rule would never match".into(),
                    ));
                }
            }
            authorizations.push(AuthorizationTable {
                identities: a.identities.clone(),
                ports: a.ports.clone(),
                routes,
                unauthenticated: a.unauthenticated,
                networks,
                protocols,
                claims: a.claims.clone(),
            });
        }
        let jwt = match &inbound.policy.jwt {
            Some(policy) => {
                if let Some(p) = policy.validate().into_iter().next() {
                    return Err(jwt_problem(p, policy));
                }
                Some(InboundJwt {
                    policy: policy.clone(),
                    verifier: OnceLock::new(),
                })
            }
            None => None,
        };
        let app_authority = inbound.app.to_string().parse().map_err(|e| {
            invalid(
                "inbound.app".into(),
                &inbound.app.to_string(),
                format!("{e}"),
            )
        })?;
        let claim_requirements = compile_claim_requirements(&inbound.policy)?;
        let mut rate_limits = Vec::with_capacity(inbound.policy.rate_limits.len());
        for (i, l) in inbound.policy.rate_limits.iter().enumerate() {
            let field = format!("inbound.policy.rate_limits[{i}]");
            let problems = trellis_policy::validate_route(
                &trellis_policy::RoutePolicy {
                    rate_limit: Some(l.limit.clone()),
                    ..Default::default()
                },
                &field,
            );
            if let Some(p) = problems.into_iter().next() {
                return Err(policy_problem(p));
            }
            let mut matchers = Vec::with_capacity(l.matches.len());
            for (j, m) in l.matches.iter().enumerate() {
                matchers.push(Matcher::compile(m, &format!("{field}.matches[{j}]"))?);
            }
            rate_limits.push((matchers, RateLimiter::compile(&l.limit)));
        }
        Ok(InboundTable {
            app: inbound.app,
            app_authority,
            protocol: inbound.protocol,
            default_action: inbound.policy.default_action,
            authorizations,
            rate_limits,
            jwt,
            claim_requirements,
        })
    }

    /// The first claim requirement `claims` fail for this request (`None`: every requirement
    /// whose matches the request matches holds, or none does). A request without verified
    /// claims fails every requirement that covers it.
    pub fn unmet_claims(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        claims: Option<&trellis_jwt::Claims>,
    ) -> Option<&ClaimRequirementTable> {
        self.claim_requirements.iter().find(|r| {
            let covers =
                r.matches.is_empty() || r.matches.iter().any(|m| m.matches(method, path, headers));
            covers && !claims.is_some_and(|claims| r.claims.iter().all(|m| m.matches(claims)))
        })
    }

    /// The rate limit a request falls under, if any (the first whose matches it matches).
    pub fn rate_limit_for(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<&RateLimiter> {
        self.rate_limits
            .iter()
            .find(|(matches, _)| {
                matches.is_empty() || matches.iter().any(|m| m.matches(method, path, headers))
            })
            .map(|(_, limiter)| limiter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A destination with a regex route splitting 90/10 over two backends; `v1` has
    /// `endpoints`, `v2` one endpoint of its own.
    fn destination(authority: &str, endpoints: &[&str]) -> config::Destination {
        let endpoints: Vec<_> = endpoints
            .iter()
            .map(|a| serde_json::json!({ "address": a }))
            .collect();
        serde_json::from_value(serde_json::json!({
            "authority": authority,
            "routes": [{
                "name": "api",
                "path_regex": "/api/v[0-9]+/.*",
                "backends": [{ "name": "v1", "weight": 90 }, { "name": "v2", "weight": 10 }],
            }],
            "backends": [
                { "name": "v1", "endpoints": endpoints },
                { "name": "v2", "endpoints": [{ "address": format!("{authority}-v2:80") }] },
            ],
        }))
        .expect("a valid destination")
    }

    fn three() -> Config {
        Config {
            destinations: vec![
                destination("a.shop", &["10.0.1.1:80"]),
                destination("b.shop", &["10.0.2.1:80"]),
                destination("c.shop", &["10.0.3.1:80"]),
            ],
            ..Default::default()
        }
    }

    fn entry(table: &RoutingTable, key: &str) -> Arc<DestinationTable> {
        table
            .get(key)
            .unwrap_or_else(|| panic!("{key} is in the table"))
    }

    #[test]
    fn a_recompiled_destination_keeps_spending_its_retry_budget() {
        // An endpoint change recompiles the destination: its retries must not get a full
        // reserve again (churning endpoints would otherwise multiply a failing service's load).
        let stats = StatsRegistry::default();
        let table = RoutingTable::compile(three(), &stats).unwrap();
        let mut source = config::Destination::clone(&entry(&table, "b.shop").source);
        source.policy = Some(
            serde_json::from_str(
                r#"{"retries": {"attempts": 3, "budget": {"ratio": 0.1, "minPerSecond": 1, "ttl": "1s"}}}"#,
            )
            .unwrap(),
        );
        let compile = |source: &config::Destination| {
            let compiled = table
                .compile_destination(source.clone(), "destinations[b.shop]", &stats)
                .unwrap();
            assert!(
                table.replace_destination(compiled).is_none(),
                "replaced in its slot"
            );
            entry(&table, "b.shop")
        };
        let first = compile(&source);
        let retry = first.policy.retry.as_ref().unwrap();
        // The floor (1 per second over 1 s) is all there is without traffic: spend it.
        assert!(retry.withdraw());
        assert!(!retry.withdraw());
        source.backends[0].endpoints.pop();
        let second = compile(&source);
        let again = second.policy.retry.as_ref().unwrap();
        assert!(again.shares_budget_with(retry));
        assert!(!again.withdraw(), "the spent budget stays spent");
        // Other budget settings: a budget of their own.
        source
            .policy
            .as_mut()
            .unwrap()
            .retries
            .as_mut()
            .unwrap()
            .budget
            .ratio = 0.2;
        let third = compile(&source);
        assert!(
            !third
                .policy
                .retry
                .as_ref()
                .unwrap()
                .shares_budget_with(retry)
        );
    }

    #[test]
    fn a_task_finds_its_backend_by_name_in_the_table_in_force() {
        // A mirror copy routed with one table runs with the next: the index it was given may
        // name another backend there, or none (the proxy once panicked on that index).
        let stats = StatsRegistry::default();
        let table = RoutingTable::compile(three(), &stats).unwrap();
        let old = entry(&table, "b.shop");
        assert_eq!(old.backend_named("v2"), Some(1));
        let mut source = config::Destination::clone(&old.source);
        source.backends.reverse();
        let compiled = table
            .compile_destination(source.clone(), "destinations[b.shop]", &stats)
            .unwrap();
        assert!(
            table.replace_destination(compiled).is_none(),
            "replaced in its slot"
        );
        assert_eq!(entry(&table, "b.shop").backend_named("v2"), Some(0));
        source.backends.retain(|b| b.name == "v1");
        source.routes[0].backends.retain(|b| b.name == "v1");
        let compiled = table
            .compile_destination(source, "destinations[b.shop]", &stats)
            .unwrap();
        assert!(
            table.replace_destination(compiled).is_none(),
            "replaced in its slot"
        );
        let new = entry(&table, "b.shop");
        assert_eq!(new.backends.len(), 1);
        assert_eq!(new.backend_named("v2"), None);
        assert_eq!(new.backend_named("v1"), Some(0));
    }

    #[test]
    fn replacing_one_destination_leaves_the_others_untouched_and_keeps_endpoint_stats() {
        let stats = StatsRegistry::default();
        let table = RoutingTable::compile(three(), &stats).unwrap();
        let (a, b, c) = (
            entry(&table, "a.shop"),
            entry(&table, "b.shop"),
            entry(&table, "c.shop"),
        );
        let b_stats = Arc::clone(&b.backends[0].endpoints[0].stats);
        let mut source = config::Destination::clone(&b.source);
        source.backends[0].endpoints.push(config::Endpoint {
            address: "10.0.2.2:80".into(),
            identity: None,
            labels: Default::default(),
            weight: 1,
            protocol: None,
        });
        let compiled = table
            .compile_destination(source, "destinations[b.shop]", &stats)
            .unwrap();
        assert!(
            table.replace_destination(compiled).is_none(),
            "a known destination is replaced in its slot, without a new generation"
        );
        assert!(
            Arc::ptr_eq(&a, &entry(&table, "a.shop")),
            "a not recompiled"
        );
        assert!(
            Arc::ptr_eq(&c, &entry(&table, "c.shop")),
            "c not recompiled"
        );
        let b2 = entry(&table, "b.shop");
        assert!(!Arc::ptr_eq(&b, &b2));
        assert_eq!(b2.backends[0].endpoints.len(), 2);
        assert!(
            Arc::ptr_eq(&b_stats, &b2.backends[0].endpoints[0].stats),
            "the endpoint that stayed keeps its statistics"
        );
        // Lookups as clients write the authority find the new entry.
        let Lookup::Found(found) = table.lookup("b.shop:80") else {
            panic!("b.shop:80 is b.shop");
        };
        assert!(Arc::ptr_eq(&found, &b2));
        // `/config`: assembled from the sources, in configuration order, with the change.
        let config = table.config();
        let keys: Vec<_> = config.destinations.iter().map(|d| &d.authority).collect();
        assert_eq!(keys, ["a.shop", "b.shop", "c.shop"]);
        assert_eq!(config.destinations[1].backends[0].endpoints.len(), 2);
    }

    #[test]
    fn a_new_or_removed_destination_makes_a_generation_sharing_the_other_slots() {
        let stats = StatsRegistry::default();
        let table = RoutingTable::compile(three(), &stats).unwrap();
        let a = entry(&table, "a.shop");
        let d = table
            .compile_destination(destination("d.shop", &["10.0.4.1:80"]), "d", &stats)
            .unwrap();
        let next = table
            .replace_destination(d)
            .expect("a new key makes a new generation");
        assert!(
            table.get("d.shop").is_none(),
            "the old generation is as it was"
        );
        assert!(Arc::ptr_eq(&a, &entry(&next, "a.shop")));
        // The generations share the slots: a replacement through either is seen by both.
        let a2 = next
            .compile_destination(destination("a.shop", &["10.0.1.9:80"]), "a", &stats)
            .unwrap();
        assert!(next.replace_destination(a2).is_none());
        assert!(Arc::ptr_eq(
            &entry(&table, "a.shop"),
            &entry(&next, "a.shop")
        ));
        assert!(!Arc::ptr_eq(&a, &entry(&next, "a.shop")));
        let c = entry(&next, "c.shop");
        let without = next.remove_destination("b.shop").expect("b was there");
        assert!(matches!(without.lookup("b.shop"), Lookup::Unknown(_)));
        assert!(Arc::ptr_eq(&c, &entry(&without, "c.shop")));
        assert_eq!(without.destination_keys(), ["a.shop", "c.shop", "d.shop"]);
        let order: Vec<_> = without
            .config()
            .destinations
            .into_iter()
            .map(|d| d.authority)
            .collect();
        assert_eq!(order, ["a.shop", "c.shop", "d.shop"]);
        assert!(without.remove_destination("b.shop").is_none());
    }

    #[test]
    fn rebasing_recompiles_the_inbound_side_only() {
        let stats = StatsRegistry::default();
        let table = RoutingTable::compile(three(), &stats).unwrap();
        let a = entry(&table, "a.shop");
        let base: Config = serde_json::from_value(serde_json::json!({
            "inbound": {
                "listen": "127.0.0.1:0",
                "app": "127.0.0.1:8080",
                "policy": { "default_action": "allow" },
            },
            "destinations": [destination("ignored.shop", &["10.0.9.1:80"])],
        }))
        .unwrap();
        let next = table.rebase(base).unwrap();
        assert!(table.inbound.is_none() && next.inbound.is_some());
        assert!(Arc::ptr_eq(&a, &entry(&next, "a.shop")));
        assert_eq!(next.destination_keys(), ["a.shop", "b.shop", "c.shop"]);
        assert!(next.base.destinations.is_empty());
    }

    #[test]
    fn the_stats_registry_forgets_unused_addresses_in_amortized_sweeps() {
        let stats = StatsRegistry::default();
        let held: Vec<_> = (0..10)
            .map(|i| stats.get(&format!("10.1.0.{i}:80")))
            .collect();
        for i in 0..3 * STATS_SWEEP_SLACK {
            drop(stats.get(&format!("10.2.{}.{}:80", i / 250, i % 250)));
        }
        let len = stats.by_address.lock().unwrap().map.len();
        assert!(len < 2 * STATS_SWEEP_SLACK + 10, "swept: {len} entries");
        for (i, h) in held.iter().enumerate() {
            assert!(
                Arc::ptr_eq(h, &stats.get(&format!("10.1.0.{i}:80"))),
                "live statistics are kept by sweeps"
            );
        }
    }

    #[test]
    fn a_backend_without_endpoints_gives_its_share_to_the_others() {
        let ready = [true, false, true];
        let got: Vec<_> = shares([(0, 50), (1, 30), (2, 20)].into_iter(), &ready).collect();
        assert_eq!(got, [(0, 50), (1, 0), (2, 20)]);
        // Nobody ready: the weights stay (requests then say `no-endpoints`).
        let got: Vec<_> = shares([(0, 50), (1, 50)].into_iter(), &[false, false]).collect();
        assert_eq!(got, [(0, 50), (1, 50)]);
        // Only a weight-0 backend is ready: it still gets nothing.
        let got: Vec<_> = shares([(0, 0), (1, 50)].into_iter(), &[true, false]).collect();
        assert_eq!(got, [(0, 0), (1, 50)]);
    }

    #[test]
    fn split_schedules_are_exact_and_interleaved() {
        let s = Split::new([(0, 75), (1, 25)].into_iter());
        assert_eq!(s.schedule.len(), 4);
        let ones = s.schedule.iter().filter(|i| **i == 1).count();
        assert_eq!(ones, 1);
        let s = Split::new([(0, 1), (1, 0)].into_iter());
        assert!((0..100).all(|_| s.next() == Some(0)));
        let s = Split::new([(0, 0), (1, 0)].into_iter());
        assert_eq!(s.next(), None);
        let s = Split::new([(0, 1), (1, 1_000_000), (2, 0)].into_iter());
        assert!(s.schedule.contains(&0) && !s.schedule.contains(&2));
        assert!(s.schedule.len() as u64 <= MAX_SCHEDULE + 2);
    }

    #[test]
    fn matchers_anchor_paths_and_ignore_header_case() {
        let m = Matcher::compile(
            &HttpMatch {
                path_regex: Some("/api/.*".into()),
                methods: vec!["get".into()],
                headers: [("X-User".to_string(), "beta.*".to_string())].into(),
            },
            "m",
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-user", "beta-7".parse().unwrap());
        assert!(m.matches(&Method::GET, "/api/x", &h));
        assert!(!m.matches(&Method::POST, "/api/x", &h));
        assert!(
            !m.matches(&Method::GET, "/v1/api/x", &h),
            "anchored at the start"
        );
        h.insert("x-user", "alpha".parse().unwrap());
        assert!(
            !m.matches(&Method::GET, "/api/x", &h),
            "whole value must match"
        );
    }

    /// `a.shop` over three endpoints, with `policy` (JSON) when given.
    fn checked(policy: Option<serde_json::Value>) -> config::Destination {
        let mut d = serde_json::json!({
            "authority": "a.shop",
            "balancer": "round_robin",
            "backends": [{ "name": "a", "endpoints": [
                { "address": "10.0.1.1:80" }, { "address": "10.0.1.2:80" }, { "address": "10.0.1.3:80" },
            ]}],
        });
        if let Some(p) = policy {
            d["policy"] = p;
        }
        serde_json::from_value(d).expect("a valid destination")
    }

    #[test]
    fn compiling_and_validating_a_health_check_spawns_nothing() {
        // No tokio runtime here: a spawn would panic.
        let config = Config {
            destinations: vec![checked(Some(serde_json::json!({
                "healthCheck": { "httpPath": "/healthz", "interval": "100ms", "timeout": "50ms" },
            })))],
            ..Default::default()
        };
        RoutingTable::validate(&config).expect("valid");
        let table = RoutingTable::compile(config, &StatsRegistry::default()).unwrap();
        let a = entry(&table, "a.shop");
        let checks = a.health.as_ref().expect("compiled");
        assert_eq!(checks.path.as_ref().map(|p| p.as_str()), Some("/healthz"));
        assert_eq!(checks.interval, Duration::from_millis(100));
        assert_eq!(
            (checks.thresholds.unhealthy, checks.thresholds.healthy),
            (3, 2),
            "the policy's defaults"
        );
    }

    #[test]
    fn unhealthy_endpoints_are_skipped_only_while_the_destination_checks_health() {
        let stats = StatsRegistry::default();
        let check = serde_json::json!({ "healthCheck": { "interval": "1s" } });
        let table = RoutingTable::compile(
            Config {
                destinations: vec![checked(Some(check))],
                ..Default::default()
            },
            &stats,
        )
        .unwrap();
        let a = entry(&table, "a.shop");
        let bad = &a.backends[0].endpoints[1].stats;
        let one = crate::health::Thresholds {
            unhealthy: 1,
            healthy: 1,
        };
        assert_eq!(bad.health.record(false, one), Some(false));
        let picks = |d: &DestinationTable, avoid: Option<usize>| {
            (0..30)
                .map(|_| d.backends[0].pick_for(avoid, None).unwrap())
                .collect::<Vec<_>>()
        };
        assert!(!picks(&a, None).contains(&1));
        assert!(
            !picks(&a, Some(0)).contains(&1),
            "a retry avoiding 0 goes to 2, not to the unhealthy 1"
        );
        // The same endpoints without a health check: the flag (kept with the address's
        // statistics) no longer counts.
        let unchecked = table
            .compile_destination(checked(None), "a", &stats)
            .unwrap();
        assert!(Arc::ptr_eq(bad, &unchecked.backends[0].endpoints[1].stats));
        assert!(picks(&unchecked, None).contains(&1));
    }

    #[test]
    fn huge_regexes_are_refused() {
        let err = compile_regex("(a{1000}){1000}", "f").unwrap_err();
        assert!(err.message.contains("invalid regex"), "{err}");
    }
}
