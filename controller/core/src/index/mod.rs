//! The index: the single writer that joins SMI policy with discovered endpoints and publishes,
//! through `tokio::sync::watch` channels, per destination the proxy-api [`v1::DestinationUpdate`]
//! and per (workload, port) the [`v1::InboundPolicy`].
//!
//! One task owns all state ([`Index::start`]); everything else talks to it through a channel, so
//! there are no locks on the data and readers (the gRPC streams) never wait on a registry: they
//! hold a `watch::Receiver` and see the latest value.
//!
//! Inputs: the [`PolicySet`]s of every policy source (merged into a [`PolicyView`]) and discovery
//! snapshots of the services some destination needs, watched on demand through one
//! [`Discovery`] (the controller passes `Merged` adapters) and dropped when no longer needed.
//!
//! Work proportional to the change:
//! - a discovery snapshot of service S recomputes only the destinations that read S (a reverse
//!   dependency map), reading snapshots in place (no copies);
//! - a policy change rebuilds the view (linear in the policy, not in the endpoints or the
//!   streams; the sources hand over whole sets), then diffs it with the previous view: only the
//!   roots whose split or route groups changed are recomputed, and only the inbound policies of
//!   workloads whose TrafficTargets changed (all of them only when a route changed);
//! - every channel sends only on a real change, with a new version;
//! - a destination or inbound channel nobody holds any more is dropped, with the discovery
//!   watches only it needed (a task per channel waits for its last receiver to go);
//! - the state for people ([`Status`], O(mesh) to build) is rebuilt after the pending inputs are
//!   handled, never on the proxies' path, and at most [`STATUS_SHARE`] of the writer's time: a
//!   small mesh sees it at once, a burst of changes in a large one costs one rebuild.
//!
//! Every problem in the [`Status`] is located: at the origin (`file:line`, `kubernetes Kind
//! ns/name`) of the resource at fault, which the policy sources give and the view keeps
//! (`PolicyView::origins`); a resource that only moved counts as changed, so its problems
//! follow it. Discovery errors are located at `discovery`.
//!
//! Intercepted connections name only an address: [`Index::address`] answers `IP:PORT` by
//! following who holds the IP in discovery (see the `address` module): a service's virtual
//! address gets that service's destination channel, a pod IP its one endpoint, anything else
//! "not found" (the proxy forwards it unchanged).
//!
//! Destinations outside the mesh are asked as `host:port` ([`Index::external`]): an
//! ExternalService's profile, or "not found" (see the `external` module). They read only the
//! policy, so every open one is recomputed on a policy change. The ports ExternalServices
//! declare, which every `NotFound` carries, are a channel of their own
//! ([`Index::external_ports`]): the gRPC API adds them to each answer and sends a "not found"
//! again when they change, so a proxy's open watch of an unknown address stays current.
//!
//! Nothing is published before every policy source has answered once (a first profile without
//! the split would send traffic the wrong way), and a destination waits for its root's first
//! discovery answer, so the first message a proxy gets is complete.

mod address;
pub mod external;
pub mod inbound;
pub mod outbound;
pub mod policy;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use trellis_discovery::{Discovery, ServiceKey, Snapshot};
use trellis_proxy_api::v1;

pub use policy::{DestinationPolicy, PolicyView};

use crate::policy::{PolicyProblem, PolicySet, PolicySource};

/// Mesh-wide settings of the index.
#[derive(Clone, Debug)]
pub struct IndexOptions {
    /// SPIFFE trust domain of identities (`spiffe://<trust domain>/ns/<ns>/sa/<name>`).
    pub trust_domain: String,
    /// Default allow instead of deny for inbound traffic no TrafficTarget allows.
    pub permissive: bool,
    /// Per-namespace permissive mode and plaintext callers (`inbound::AccessSwitches`).
    pub access: inbound::AccessSwitches,
    /// `--access-log-namespace`: proxies of workloads in these namespaces write access logs
    /// (sent as `InboundPolicy.access_log`).
    pub access_log_namespaces: Vec<String>,
    /// `--egress deny`: proxies refuse intercepted connections to destinations the mesh does not
    /// know (sent with every `NotFound` answer, so the proxy learns it when it needs it).
    pub egress_denied: bool,
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            permissive: false,
            access: inbound::AccessSwitches::default(),
            access_log_namespaces: Vec::new(),
            egress_denied: false,
        }
    }
}

/// The share of the writer's time the state for people may take: after a rebuild that took `t`,
/// the next one waits `t / STATUS_SHARE` (it is O(mesh); changes to proxies are never delayed by
/// it, they are sent before).
pub const STATUS_SHARE: f64 = 0.1;
/// The longest the state for people lags behind the index.
pub const STATUS_MAX_DELAY: Duration = Duration::from_secs(1);

/// A destination channel: `None` until the first complete answer.
pub type DestinationRx = watch::Receiver<Option<v1::DestinationUpdate>>;
/// An inbound channel: `None` until the policy sources have answered.
pub type InboundRx = watch::Receiver<Option<v1::InboundPolicy>>;

/// The index's state for people (`/api/v1/state`, `trellis check`/`get`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub permissive: bool,
    /// The other access switches (per-namespace permissive, plaintext callers).
    pub access: inbound::AccessSwitches,
    pub trust_domain: String,
    /// Every policy source has answered at least once.
    pub policy_ready: bool,
    pub policy_sources: Vec<PolicySourceStatus>,
    pub policies: Vec<PolicyLine>,
    pub problems: Vec<ProblemLine>,
    pub destinations: Vec<DestinationStatus>,
    pub inbound: Vec<InboundStatus>,
    /// How much resolving the index has done since it started.
    pub work: Work,
}

/// Counters of the index's work: with them a test (or a person) can see that a change touched
/// only what it had to.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Work {
    /// Destination profiles resolved (each change a destination had to look at).
    pub destinations_resolved: u64,
    /// Inbound policies resolved.
    pub inbound_resolved: u64,
    /// Policy views built (one per policy set received).
    pub policy_views: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PolicySourceStatus {
    pub name: String,
    /// Seconds since the Unix epoch of the last set received.
    pub last_update_unix: Option<u64>,
    pub resources: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct PolicyLine {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub summary: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ProblemLine {
    pub resource: String,
    pub location: String,
    pub message: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct DestinationStatus {
    pub authority: String,
    pub version: String,
    /// `profile` or `not found: <reason>`.
    pub state: String,
    pub backends: Vec<BackendStatus>,
    pub routes: Vec<String>,
    pub subscribers: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendStatus {
    pub name: String,
    pub weight: u32,
    pub endpoints: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct InboundStatus {
    pub workload: String,
    pub port: u16,
    pub authorizations: usize,
    pub default_action: String,
}

enum Input {
    Policies(usize, PolicySet),
    Snapshot(ServiceKey, Snapshot),
    DiscoveryError(ServiceKey, String),
    WatchDestination(ServiceKey, oneshot::Sender<DestinationRx>),
    WatchInbound(ServiceKey, u16, oneshot::Sender<InboundRx>),
    /// The last receiver of a destination channel went away (it may have come back since).
    DestinationUnwatched(ServiceKey),
    /// The last receiver of an inbound channel went away.
    InboundUnwatched((ServiceKey, u16)),
    WatchAddress(SocketAddr, oneshot::Sender<DestinationRx>),
    /// The follower of an address ended: nobody held its channel (someone may again since).
    AddressUnwatched(SocketAddr),
    /// A `host:port` outside the mesh (`external`).
    WatchExternal(external::ExternalKey, oneshot::Sender<DestinationRx>),
    /// The last receiver of an external channel went away.
    ExternalUnwatched(external::ExternalKey),
}

/// The ports ExternalServices declare, mesh-wide (`external::external_ports`), with a
/// generation that grows on every change (part of the version of `NotFound` answers, which
/// carry them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExternalPorts {
    pub generation: u64,
    pub ports: Arc<[u32]>,
}

/// A handle to the index task. Cheap to clone; the task stops when every handle is dropped.
#[derive(Clone, Debug)]
pub struct Index {
    tx: mpsc::UnboundedSender<Input>,
    status: watch::Receiver<Arc<Status>>,
    external_ports: watch::Receiver<ExternalPorts>,
}

impl Index {
    /// Starts the index task over `sources` (merged in this order) and `discovery`.
    pub fn start(
        sources: Vec<Arc<dyn PolicySource>>,
        discovery: Arc<dyn Discovery>,
        options: IndexOptions,
    ) -> Index {
        let (tx, rx) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(Arc::new(Status::default()));
        let (ports_tx, external_ports) = watch::channel(ExternalPorts::default());
        let mut names = Vec::new();
        for (i, source) in sources.iter().enumerate() {
            names.push(source.name());
            let mut sets = source.watch();
            let tx = tx.downgrade();
            tokio::spawn(async move {
                while let Some(set) = sets.next().await {
                    let Some(tx) = tx.upgrade() else { return };
                    if tx.send(Input::Policies(i, set)).is_err() {
                        return;
                    }
                }
            });
        }
        let mut writer = Writer::new(names, discovery, options, tx.downgrade(), status_tx);
        writer.external_ports = ports_tx;
        tokio::spawn(writer.run(rx));
        Index {
            tx,
            status,
            external_ports,
        }
    }

    /// The channel of destination `service` (registering interest on first use). `None` only when
    /// the index has stopped.
    pub async fn destination(&self, service: ServiceKey) -> Option<DestinationRx> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Input::WatchDestination(service, reply)).ok()?;
        rx.await.ok()
    }

    /// The channel of the inbound policy of `workload` (namespace/name) on `port`.
    pub async fn inbound(&self, workload: ServiceKey, port: u16) -> Option<InboundRx> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::WatchInbound(workload, port, reply))
            .ok()?;
        rx.await.ok()
    }

    /// The channel of the destination at `address` (an intercepted connection's original
    /// destination): a service's virtual address and port, an endpoint, or "not found". `None`
    /// only when the index has stopped.
    pub async fn address(&self, address: SocketAddr) -> Option<DestinationRx> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Input::WatchAddress(address, reply)).ok()?;
        rx.await.ok()
    }

    /// The channel of `host` (normalized, not a mesh service name; the port asked does not
    /// choose another destination): an ExternalService's profile or "not found" (see the
    /// `external` module). `None` only when the index has stopped.
    pub async fn external(&self, host: String) -> Option<DestinationRx> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::WatchExternal(
                external::ExternalKey::Host(host),
                reply,
            ))
            .ok()?;
        rx.await.ok()
    }

    /// The ports ExternalServices declare, mesh-wide, as every `NotFound` answer carries them
    /// (empty until every policy source has answered).
    pub fn external_ports(&self) -> watch::Receiver<ExternalPorts> {
        self.external_ports.clone()
    }

    /// The state for people, updated after every change.
    pub fn status(&self) -> watch::Receiver<Arc<Status>> {
        self.status.clone()
    }
}

struct Destination {
    tx: watch::Sender<Option<v1::DestinationUpdate>>,
    policy: DestinationPolicy,
    inputs: Vec<ServiceKey>,
    problems: Vec<PolicyProblem>,
    version: u64,
}

struct Inbound {
    tx: watch::Sender<Option<v1::InboundPolicy>>,
    problems: Vec<PolicyProblem>,
    version: u64,
}

struct Writer {
    names: Vec<String>,
    sets: Vec<Option<(PolicySet, SystemTime)>>,
    view: PolicyView,
    /// `view` was built with every source answered (the last `policies_changed` saw them all).
    view_ready: bool,
    discovery: Arc<dyn Discovery>,
    options: IndexOptions,
    me: mpsc::WeakUnboundedSender<Input>,
    status: watch::Sender<Arc<Status>>,
    destinations: BTreeMap<ServiceKey, Destination>,
    inbound: BTreeMap<(ServiceKey, u16), Inbound>,
    snapshots: HashMap<ServiceKey, Snapshot>,
    discovery_errors: HashMap<ServiceKey, String>,
    /// Service -> destinations reading it.
    readers: HashMap<ServiceKey, HashSet<ServiceKey>>,
    /// The services TrafficPolicies target: watched whether or not a destination reads them, to
    /// report a target that does not exist and to place rate limits (`inbound::rate_limits`).
    policy_targets: HashSet<ServiceKey>,
    watches: HashMap<ServiceKey, JoinHandle<()>>,
    /// Destinations by address, each fed by its follower task (`address::follow`).
    addresses: HashMap<SocketAddr, watch::Sender<Option<v1::DestinationUpdate>>>,
    /// Destinations outside the mesh by `host:port` (`external`).
    externals: BTreeMap<external::ExternalKey, watch::Sender<Option<v1::DestinationUpdate>>>,
    /// The mesh-wide external ports, sent on change.
    external_ports: watch::Sender<ExternalPorts>,
    /// The version of the last external answer sent (one counter for every external channel:
    /// a channel dropped and asked again never repeats a version).
    external_version: u64,
    work: Work,
}

impl Writer {
    fn new(
        names: Vec<String>,
        discovery: Arc<dyn Discovery>,
        options: IndexOptions,
        me: mpsc::WeakUnboundedSender<Input>,
        status: watch::Sender<Arc<Status>>,
    ) -> Self {
        // With no policy source at all, the (empty) policy is complete from the start.
        let view_ready = names.is_empty();
        Writer {
            sets: vec![None; names.len()],
            names,
            view: PolicyView::default(),
            view_ready,
            discovery,
            options,
            me,
            status,
            destinations: BTreeMap::new(),
            inbound: BTreeMap::new(),
            snapshots: HashMap::new(),
            discovery_errors: HashMap::new(),
            readers: HashMap::new(),
            policy_targets: HashSet::new(),
            watches: HashMap::new(),
            addresses: HashMap::new(),
            externals: BTreeMap::new(),
            external_ports: watch::channel(ExternalPorts::default()).0,
            external_version: 0,
            work: Work::default(),
        }
    }

    fn policy_ready(&self) -> bool {
        self.sets.iter().all(Option::is_some)
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        self.publish_status();
        // Inputs are handled as they come; the status is rebuilt once the queue is empty and at
        // most STATUS_SHARE of the time (a burst of changes costs one rebuild, not one per change).
        let mut status_due: Option<Instant> = None;
        let mut next_status = Instant::now();
        loop {
            let input = match status_due {
                Some(due) => tokio::select! {
                    biased;
                    () = tokio::time::sleep_until(due) => {
                        let started = Instant::now();
                        self.publish_status();
                        let took = started.elapsed();
                        next_status = Instant::now()
                            + took.div_f64(STATUS_SHARE).min(STATUS_MAX_DELAY);
                        status_due = None;
                        continue;
                    }
                    input = rx.recv() => input,
                },
                None => rx.recv().await,
            };
            let Some(input) = input else { return };
            self.handle(input);
            if status_due.is_none() {
                status_due = Some(next_status.max(Instant::now()));
            }
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Policies(i, set) => {
                self.sets[i] = Some((set, SystemTime::now()));
                self.policies_changed();
            }
            Input::Snapshot(service, snapshot) => {
                self.discovery_errors.remove(&service);
                if self.snapshots.get(&service) != Some(&snapshot) {
                    self.snapshots.insert(service.clone(), snapshot);
                    let readers: Vec<ServiceKey> = self
                        .readers
                        .get(&service)
                        .map(|r| r.iter().cloned().collect())
                        .unwrap_or_default();
                    for root in readers {
                        self.recompute(&root);
                    }
                    if self.policy_targets.contains(&service) {
                        // Its workloads may have changed: the rate limits of the namespace's
                        // inbound policies follow.
                        let keys: Vec<(ServiceKey, u16)> = self
                            .inbound
                            .keys()
                            .filter(|(w, _)| w.namespace == service.namespace)
                            .cloned()
                            .collect();
                        for key in keys {
                            self.recompute_inbound(&key);
                        }
                    }
                }
            }
            Input::DiscoveryError(service, error) => {
                // The last good snapshot stays in force; the error is shown in the state.
                self.discovery_errors.insert(service, error);
            }
            Input::WatchDestination(service, reply) => {
                let rx = match self.destinations.get(&service) {
                    Some(d) => d.tx.subscribe(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        self.when_unwatched(&tx, Input::DestinationUnwatched(service.clone()));
                        self.destinations.insert(
                            service.clone(),
                            Destination {
                                tx,
                                policy: DestinationPolicy::default(),
                                inputs: Vec::new(),
                                problems: Vec::new(),
                                version: 0,
                            },
                        );
                        self.recompute(&service);
                        rx
                    }
                };
                let _ = reply.send(rx);
            }
            Input::WatchInbound(workload, port, reply) => {
                let key = (workload, port);
                let rx = match self.inbound.get(&key) {
                    Some(i) => i.tx.subscribe(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        self.when_unwatched(&tx, Input::InboundUnwatched(key.clone()));
                        self.inbound.insert(
                            key.clone(),
                            Inbound {
                                tx,
                                problems: Vec::new(),
                                version: 0,
                            },
                        );
                        self.recompute_inbound(&key);
                        rx
                    }
                };
                let _ = reply.send(rx);
            }
            Input::DestinationUnwatched(service) => {
                let Some(d) = self.destinations.get(&service) else {
                    return;
                };
                if d.tx.receiver_count() > 0 {
                    // Watched again meanwhile: wait for the new receivers to go.
                    let tx = d.tx.clone();
                    self.when_unwatched(&tx, Input::DestinationUnwatched(service));
                    return;
                }
                self.set_inputs(&service, &[]);
                self.destinations.remove(&service);
            }
            Input::WatchAddress(address, reply) => {
                let rx = match self.addresses.get(&address) {
                    Some(tx) => tx.subscribe(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        self.follow_address(address, tx.clone());
                        self.addresses.insert(address, tx);
                        rx
                    }
                };
                let _ = reply.send(rx);
            }
            Input::AddressUnwatched(address) => {
                let Some(tx) = self.addresses.get(&address) else {
                    return;
                };
                if tx.receiver_count() > 0 {
                    // Asked for again between the follower's end and now: follow again.
                    let tx = tx.clone();
                    self.follow_address(address, tx);
                } else {
                    self.addresses.remove(&address);
                }
            }
            Input::WatchExternal(key, reply) => {
                let rx = match self.externals.get(&key) {
                    Some(tx) => tx.subscribe(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        self.when_unwatched(&tx, Input::ExternalUnwatched(key.clone()));
                        self.externals.insert(key.clone(), tx);
                        self.recompute_external(&key);
                        rx
                    }
                };
                let _ = reply.send(rx);
            }
            Input::ExternalUnwatched(key) => {
                let Some(tx) = self.externals.get(&key) else {
                    return;
                };
                if tx.receiver_count() > 0 {
                    let tx = tx.clone();
                    self.when_unwatched(&tx, Input::ExternalUnwatched(key));
                    return;
                }
                self.externals.remove(&key);
            }
            Input::InboundUnwatched(key) => {
                let Some(i) = self.inbound.get(&key) else {
                    return;
                };
                if i.tx.receiver_count() > 0 {
                    let tx = i.tx.clone();
                    self.when_unwatched(&tx, Input::InboundUnwatched(key));
                    return;
                }
                self.inbound.remove(&key);
            }
        }
    }

    /// Starts the follower of `address` (it ends when nobody holds `tx`'s channel).
    fn follow_address(
        &self,
        address: SocketAddr,
        tx: watch::Sender<Option<v1::DestinationUpdate>>,
    ) {
        let me = self.me.clone();
        let discovery = self.discovery.clone();
        let trust_domain = self.options.trust_domain.clone();
        tokio::spawn(async move {
            address::follow(address, discovery, me.clone(), tx, trust_domain).await;
            if let Some(me) = me.upgrade() {
                let _ = me.send(Input::AddressUnwatched(address));
            }
        });
    }

    /// Sends `input` to the index once every receiver of `tx` is gone.
    fn when_unwatched<T: Send + Sync + 'static>(&self, tx: &watch::Sender<T>, input: Input) {
        let tx = tx.clone();
        let me = self.me.clone();
        tokio::spawn(async move {
            tx.closed().await;
            drop(tx);
            if let Some(me) = me.upgrade() {
                let _ = me.send(input);
            }
        });
    }

    fn policies_changed(&mut self) {
        let was_ready = self.view_ready;
        let sets: Vec<(&str, &PolicySet)> = self
            .names
            .iter()
            .zip(&self.sets)
            .filter_map(|(name, set)| set.as_ref().map(|(s, _)| (name.as_str(), s)))
            .collect();
        let view = PolicyView::build_from(&sets);
        self.work.policy_views += 1;
        let old = std::mem::replace(&mut self.view, view);
        let targets: HashSet<ServiceKey> = self.view.traffic_targets().cloned().collect();
        let gone: Vec<ServiceKey> = self.policy_targets.difference(&targets).cloned().collect();
        let new: Vec<ServiceKey> = targets.difference(&self.policy_targets).cloned().collect();
        self.policy_targets = targets;
        for service in &gone {
            self.unwatch_if_unread(service);
        }
        for service in &new {
            self.watch_service(service);
        }
        self.view_ready = self.policy_ready();
        if !self.view_ready {
            return; // nothing is published before every source has answered
        }
        // Only what the diff names is recomputed (everything, once, when policy becomes ready).
        let roots: Vec<ServiceKey> = if was_ready {
            self.view
                .changed_roots(&old)
                .into_iter()
                .filter(|root| self.destinations.contains_key(root))
                .collect()
        } else {
            self.destinations.keys().cloned().collect()
        };
        for root in roots {
            self.recompute(&root);
        }
        let keys: Vec<(ServiceKey, u16)> = match self.view.changed_workloads(&old) {
            Some(workloads) if was_ready => workloads
                .iter()
                .flat_map(|w| {
                    self.inbound
                        .range((w.clone(), 0)..=(w.clone(), u16::MAX))
                        .map(|(k, _)| k.clone())
                })
                .collect(),
            _ => self.inbound.keys().cloned().collect(),
        };
        for key in keys {
            self.recompute_inbound(&key);
        }
        // External answers read only the policy: all of them (few, one lookup each).
        let keys: Vec<external::ExternalKey> = self.externals.keys().cloned().collect();
        for key in keys {
            self.recompute_external(&key);
        }
        let ports = external::external_ports(&self.view);
        self.external_ports.send_if_modified(|current| {
            if *current.ports == *ports {
                return false;
            }
            current.generation += 1;
            current.ports = ports.into();
            true
        });
    }

    /// Recomputes one external destination and sends it if it changed.
    fn recompute_external(&mut self, key: &external::ExternalKey) {
        if !self.view_ready {
            return;
        }
        let Some(tx) = self.externals.get(key) else {
            return;
        };
        let kind = external::resolve_key(&self.view, key, &self.options.trust_domain);
        let unchanged = tx.borrow().as_ref().and_then(|u| u.kind.as_ref()) == Some(&kind);
        if !unchanged {
            self.external_version += 1;
            tx.send_replace(Some(v1::DestinationUpdate {
                version: self.external_version.to_string(),
                kind: Some(kind),
            }));
        }
    }

    /// Recomputes one destination and sends it if it changed.
    fn recompute(&mut self, root: &ServiceKey) {
        let policy = self.view.destination(root);
        let inputs = outbound::inputs(root, &policy);
        self.set_inputs(root, &inputs);
        let ready = self.view_ready;
        let snapshots = &self.snapshots;
        let lookup = |key: &ServiceKey| snapshots.get(key);
        let resolved = if ready {
            self.work.destinations_resolved += 1;
            outbound::resolve(root, &policy, &lookup, &self.options.trust_domain)
        } else {
            None
        };
        let Some(d) = self.destinations.get_mut(root) else {
            return;
        };
        d.policy = policy;
        d.inputs = inputs;
        let Some(resolved) = resolved else { return };
        d.problems = resolved.problems;
        let unchanged =
            d.tx.borrow().as_ref().and_then(|u| u.kind.as_ref()) == Some(&resolved.kind);
        if !unchanged {
            d.version += 1;
            let version = d.version.to_string();
            d.tx.send_replace(Some(v1::DestinationUpdate {
                version,
                kind: Some(resolved.kind),
            }));
        }
    }

    /// Records which services `root` reads; starts and stops discovery watches accordingly.
    fn set_inputs(&mut self, root: &ServiceKey, inputs: &[ServiceKey]) {
        let old = self
            .destinations
            .get(root)
            .map(|d| d.inputs.clone())
            .unwrap_or_default();
        for service in old.iter().filter(|s| !inputs.contains(s)) {
            if let Some(readers) = self.readers.get_mut(service) {
                readers.remove(root);
                if readers.is_empty() {
                    self.readers.remove(service);
                    self.unwatch_if_unread(service);
                }
            }
        }
        for service in inputs {
            self.readers
                .entry(service.clone())
                .or_default()
                .insert(root.clone());
            self.watch_service(service);
        }
    }

    /// Starts the discovery watch of `service` unless it runs already.
    fn watch_service(&mut self, service: &ServiceKey) {
        if self.watches.contains_key(service) {
            return;
        }
        let mut stream = self.discovery.watch(service.clone());
        let tx = self.me.clone();
        let key = service.clone();
        let task = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                let Some(tx) = tx.upgrade() else { return };
                let input = match item {
                    Ok(snapshot) => Input::Snapshot(key.clone(), snapshot),
                    Err(e) => Input::DiscoveryError(key.clone(), e.to_string()),
                };
                if tx.send(input).is_err() {
                    return;
                }
            }
        });
        self.watches.insert(service.clone(), task);
    }

    /// Stops the discovery watch of `service` (and forgets its snapshot) once neither a
    /// destination reads it nor a TrafficPolicy targets it.
    fn unwatch_if_unread(&mut self, service: &ServiceKey) {
        if self.readers.contains_key(service) || self.policy_targets.contains(service) {
            return;
        }
        self.snapshots.remove(service);
        self.discovery_errors.remove(service);
        if let Some(task) = self.watches.remove(service) {
            task.abort();
        }
    }

    fn recompute_inbound(&mut self, key: &(ServiceKey, u16)) {
        if !self.policy_ready() {
            return;
        }
        let (workload, port) = key;
        self.work.inbound_resolved += 1;
        let (mut policy, mut problems) = inbound::resolve(
            &self.view,
            &workload.namespace,
            &workload.name,
            *port,
            &self.options,
        );
        let snapshots = &self.snapshots;
        policy.rate_limits = inbound::rate_limits(
            &self.view,
            &workload.namespace,
            &workload.name,
            *port,
            &|key| snapshots.get(key),
        );
        let end_user = inbound::end_user(
            &self.view,
            &workload.namespace,
            &workload.name,
            *port,
            &|key| snapshots.get(key),
        );
        if end_user.refuse {
            // Fail closed: what the port needs cannot be applied (see `inbound::end_user`).
            policy.authorizations.clear();
            policy.default_action = v1::DefaultAction::Deny as i32;
        }
        policy.jwt = end_user.jwt;
        policy.claim_requirements = end_user.claim_requirements;
        problems.extend(end_user.problems);
        let Some(i) = self.inbound.get_mut(key) else {
            return;
        };
        i.problems = problems;
        let unchanged = i.tx.borrow().as_ref().is_some_and(|old| {
            v1::InboundPolicy {
                version: String::new(),
                ..old.clone()
            } == policy
        });
        if !unchanged {
            i.version += 1;
            i.tx.send_replace(Some(v1::InboundPolicy {
                version: i.version.to_string(),
                ..policy
            }));
        }
    }

    fn publish_status(&self) {
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        };
        let mut problems: Vec<ProblemLine> = Vec::new();
        let mut seen: HashSet<(&str, &str, &str)> = HashSet::new();
        let found = self
            .view
            .problems
            .iter()
            .chain(self.destinations.values().flat_map(|d| &d.problems))
            .chain(self.inbound.values().flat_map(|i| &i.problems));
        for p in found {
            if seen.insert((&p.resource, &p.location, &p.message)) {
                problems.push(ProblemLine {
                    resource: p.resource.clone(),
                    location: p.location.clone(),
                    message: p.message.clone(),
                });
            }
        }
        // A TrafficPolicy whose target no platform has (once discovery answered).
        let mut targets: Vec<&ServiceKey> = self.policy_targets.iter().collect();
        targets.sort();
        for target in targets {
            if self.snapshots.get(target) != Some(&Snapshot::NotFound) {
                continue;
            }
            for policy in self.view.traffic.get(target).into_iter().flatten() {
                let id = policy::policy_rid(policy);
                problems.push(ProblemLine {
                    resource: id.to_string(),
                    location: self.view.location(&id),
                    message: format!(
                        "spec.targetRef: no service {target} on any platform: the policy applies to nothing"
                    ),
                });
            }
        }
        for (service, error) in &self.discovery_errors {
            problems.push(ProblemLine {
                resource: format!("service {service}"),
                location: "discovery".into(),
                message: format!("{error} (the last good endpoints stay in force)"),
            });
        }
        let status = Status {
            permissive: self.options.permissive,
            access: self.options.access.clone(),
            trust_domain: self.options.trust_domain.clone(),
            policy_ready: self.policy_ready(),
            policy_sources: self
                .names
                .iter()
                .zip(&self.sets)
                .map(|(name, set)| PolicySourceStatus {
                    name: name.clone(),
                    last_update_unix: set.as_ref().and_then(|(_, t)| unix(*t)),
                    resources: set.as_ref().map_or(0, |(s, _)| s.policies.len()),
                })
                .collect(),
            policies: self
                .view
                .policies
                .iter()
                .map(|p| {
                    let id = p.id();
                    PolicyLine {
                        kind: id.kind,
                        namespace: id.namespace,
                        name: id.name,
                        summary: p.summary(),
                    }
                })
                .collect(),
            problems,
            destinations: self
                .destinations
                .iter()
                .map(|(root, d)| {
                    destination_status(format!("{}.{}", root.name, root.namespace), &d.tx)
                })
                .chain(
                    self.externals
                        .iter()
                        .map(|(key, e)| destination_status(key.to_string(), e)),
                )
                .collect(),
            inbound: self
                .inbound
                .iter()
                .map(|((workload, port), i)| {
                    let current = i.tx.borrow();
                    InboundStatus {
                        workload: workload.to_string(),
                        port: *port,
                        authorizations: current.as_ref().map_or(0, |p| p.authorizations.len()),
                        default_action: match current.as_ref().map(|p| p.default_action) {
                            Some(a) if a == v1::DefaultAction::Allow as i32 => "allow".into(),
                            Some(_) => "deny".into(),
                            None => "pending".into(),
                        },
                    }
                })
                .collect(),
            work: self.work,
        };
        self.status.send_replace(Arc::new(status));
    }
}

fn destination_status(
    authority: String,
    tx: &watch::Sender<Option<v1::DestinationUpdate>>,
) -> DestinationStatus {
    let current = tx.borrow();
    let mut status = DestinationStatus {
        authority,
        version: current
            .as_ref()
            .map(|u| u.version.clone())
            .unwrap_or_default(),
        state: "pending".into(),
        backends: Vec::new(),
        routes: Vec::new(),
        subscribers: tx.receiver_count(),
    };
    match current.as_ref().and_then(|u| u.kind.as_ref()) {
        Some(v1::destination_update::Kind::Profile(p)) => {
            status.state = "profile".into();
            status.backends = p
                .backends
                .iter()
                .map(|b| BackendStatus {
                    name: b.name.clone(),
                    weight: b.weight,
                    endpoints: b.endpoints.len(),
                })
                .collect();
            status.routes = p
                .routes
                .iter()
                .map(|r| {
                    let refs: Vec<String> = r
                        .backends
                        .iter()
                        .map(|b| format!("{} {}", b.name, b.weight))
                        .collect();
                    format!("{} -> {}", r.name, refs.join(", "))
                })
                .collect();
        }
        Some(v1::destination_update::Kind::NotFound(n)) => {
            status.state = format!("not found: {}", n.reason);
        }
        _ => {}
    }
    status
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use tokio_stream::wrappers::WatchStream;
    use trellis_discovery::{
        Capabilities, ChangeDelivery, Endpoint, EndpointPort, EndpointSet, IdentitySource,
        Provenance, Readiness, ServicePort, WorkloadIdentity,
    };

    use super::policy::tests::{policies, split};
    use super::*;

    /// A registry the test edits: every service's snapshot behind a watch channel (so a test
    /// can also count who watches it).
    #[derive(Clone, Default)]
    struct Registry(Arc<Mutex<HashMap<ServiceKey, watch::Sender<Snapshot>>>>);

    impl Registry {
        fn sender(&self, name: &str) -> watch::Sender<Snapshot> {
            let mut services = self.0.lock().unwrap();
            services
                .entry(key(name))
                .or_insert_with(|| watch::channel(Snapshot::NotFound).0)
                .clone()
        }

        fn set(&self, name: &str, addresses: &[&str]) {
            self.sender(name).send_replace(endpoints(name, addresses));
        }

        fn watchers(&self, name: &str) -> usize {
            self.sender(name).receiver_count()
        }
    }

    impl Discovery for Registry {
        fn source_id(&self) -> trellis_discovery::SourceId {
            Arc::from("test")
        }

        fn capabilities(&self) -> Capabilities {
            Capabilities {
                delivery: ChangeDelivery::Push,
                health: true,
                terminating: false,
                weights: false,
                zones: false,
                owners: false,
                identity: IdentitySource::AttributeOrServiceName,
                version_subsets: false,
            }
        }

        fn services(
            &self,
        ) -> futures::stream::BoxStream<
            'static,
            Result<trellis_discovery::ServiceCatalog, trellis_discovery::DiscoveryError>,
        > {
            futures::stream::pending().boxed()
        }

        fn watch(
            &self,
            service: ServiceKey,
        ) -> futures::stream::BoxStream<'static, Result<Snapshot, trellis_discovery::DiscoveryError>>
        {
            let rx = self.sender(&service.name).subscribe();
            WatchStream::new(rx).map(Ok).boxed()
        }
    }

    /// A policy source the test edits.
    struct Policies(watch::Sender<PolicySet>);

    impl PolicySource for Policies {
        fn name(&self) -> String {
            "test".into()
        }

        fn watch(&self) -> futures::stream::BoxStream<'static, PolicySet> {
            WatchStream::new(self.0.subscribe()).boxed()
        }
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("demo", name)
    }

    fn endpoints(name: &str, addresses: &[&str]) -> Snapshot {
        Snapshot::Endpoints(EndpointSet {
            service: key(name),
            ports: vec![ServicePort {
                name: None,
                port: 8080,
                protocol: None,
            }],
            endpoints: addresses
                .iter()
                .map(|a| Endpoint {
                    address: a.parse().unwrap(),
                    ports: vec![EndpointPort {
                        name: None,
                        port: 8080,
                    }],
                    readiness: Readiness::Ready,
                    identity: WorkloadIdentity::new("demo", name),
                    owner: None,
                    labels: Default::default(),
                    weight: None,
                    zone: None,
                    protocol: None,
                    provenance: Provenance {
                        source: Arc::from("test"),
                        confirmed_at: SystemTime::UNIX_EPOCH,
                    },
                })
                .collect(),
        })
    }

    fn set_of(yaml: &str) -> PolicySet {
        PolicySet {
            policies: policies(yaml),
            ..PolicySet::default()
        }
    }

    const TARGET: &str = "---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: { name: to-api, namespace: demo }
spec:
  destination: { kind: ServiceAccount, name: api, namespace: demo }
  sources:
  - { kind: ServiceAccount, name: web, namespace: demo }
  rules:
  - { kind: TCPRoute, name: http }
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: { name: http, namespace: demo }
spec:
  matches:
    ports: [8080]
";

    /// web split over web-v1/web-v2, api plain; a TrafficTarget to api.
    fn mesh(w1: u32, w2: u32) -> (Index, Registry, watch::Sender<PolicySet>) {
        let registry = Registry::default();
        registry.set("web", &["10.0.0.1", "10.0.0.2"]);
        registry.set("web-v1", &["10.0.0.1"]);
        registry.set("web-v2", &["10.0.0.2"]);
        registry.set("api", &["10.0.1.1"]);
        let yaml = split("web", "web", &[("web-v1", w1), ("web-v2", w2)], None) + TARGET;
        let (policy, _) = watch::channel(set_of(&yaml));
        let source = Policies(policy.clone());
        let index = Index::start(
            vec![Arc::new(source)],
            Arc::new(registry.clone()),
            IndexOptions::default(),
        );
        (index, registry, policy)
    }

    async fn answered(index: &Index, name: &str) -> DestinationRx {
        let mut rx = index.destination(key(name)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(Option::is_some))
            .await
            .expect("answered within 5 s")
            .unwrap();
        rx.borrow_and_update();
        rx
    }

    fn version(rx: &DestinationRx) -> String {
        rx.borrow().as_ref().unwrap().version.clone()
    }

    /// The work counters once the status shows `wanted` and then stops changing (the index
    /// has nothing left to do).
    async fn work_settles(index: &Index, wanted: impl Fn(&Work) -> bool) -> Work {
        let mut status = index.status();
        let mut last =
            tokio::time::timeout(Duration::from_secs(5), status.wait_for(|s| wanted(&s.work)))
                .await
                .expect("the work shows within 5 s")
                .unwrap()
                .work;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = index.status().borrow().work;
            if now == last {
                return now;
            }
            last = now;
        }
    }

    const PAYMENTS: &str = "---
apiVersion: policy.trellis.io/v1alpha1
kind: ExternalService
metadata: { name: payments, namespace: demo }
spec:
  hosts: [api.pay.example]
  ports: [{ port: 443, protocol: tls }]
  sources: [{ kind: ServiceAccount, name: web }]
";

    /// An external channel follows the policy: not found before the ExternalService exists, its
    /// profile after, and the ports channel moves with it; the state lists the channel and a
    /// conflicting declaration's problems.
    #[tokio::test]
    async fn external_channels_and_ports_follow_the_policy() {
        let (index, _registry, policy) = mesh(1, 1);
        let _web = answered(&index, "web").await; // the policy is in force
        let mut rx = index.external("api.pay.example".into()).await.unwrap();
        let first = rx.wait_for(Option::is_some).await.unwrap().clone().unwrap();
        assert!(
            matches!(first.kind, Some(v1::destination_update::Kind::NotFound(_))),
            "{first:?}"
        );
        let ports = index.external_ports();
        assert!(ports.borrow().ports.is_empty());

        let yaml = split("web", "web", &[("web-v1", 1), ("web-v2", 1)], None) + TARGET;
        policy.send_replace(set_of(&format!("{yaml}{PAYMENTS}")));
        let next = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|u| {
                matches!(
                    u.as_ref().and_then(|u| u.kind.as_ref()),
                    Some(v1::destination_update::Kind::Profile(_))
                )
            }),
        )
        .await
        .expect("the profile within 5 s")
        .unwrap()
        .clone()
        .unwrap();
        assert_ne!(next.version, first.version);
        let mut ports = index.external_ports();
        let now = ports
            .wait_for(|p| !p.ports.is_empty())
            .await
            .unwrap()
            .clone();
        assert_eq!(*now.ports, [443]);
        assert_eq!(now.generation, 1);

        // A second declaration of the same host:port: both reported, nobody allowed.
        let other = PAYMENTS.replace("name: payments", "name: payments-copy");
        policy.send_replace(set_of(&format!("{yaml}{PAYMENTS}{other}")));
        let denied = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|u| match u.as_ref().and_then(|u| u.kind.as_ref()) {
                Some(v1::destination_update::Kind::Profile(p)) => {
                    p.external.as_ref().unwrap().allowed_identities.is_empty()
                }
                _ => false,
            }),
        )
        .await;
        assert!(denied.is_ok(), "the conflict denies every caller");
        let mut status = index.status();
        let status = tokio::time::timeout(
            Duration::from_secs(5),
            status.wait_for(|s| {
                s.problems
                    .iter()
                    .filter(|p| p.message.contains("is also declared by"))
                    .count()
                    == 2
            }),
        )
        .await
        .expect("both declarations reported within 5 s")
        .unwrap()
        .clone();
        assert!(
            status
                .destinations
                .iter()
                .any(|d| d.authority == "api.pay.example" && d.state == "profile")
        );
        assert_eq!(
            index.external_ports().borrow().generation,
            1,
            "the same ports: no new generation"
        );
    }

    #[tokio::test]
    async fn an_endpoint_change_resolves_only_the_destinations_that_read_the_service() {
        let (index, registry, _policy) = mesh(1, 1);
        let mut web = answered(&index, "web").await;
        let api = answered(&index, "api").await;
        let mut inbound = index.inbound(key("api"), 8080).await.unwrap();
        inbound.wait_for(Option::is_some).await.unwrap();
        inbound.borrow_and_update();
        let before = work_settles(&index, |_| true).await;
        let api_version = version(&api);

        registry.set("web-v2", &["10.0.0.2", "10.0.0.3"]);
        tokio::time::timeout(Duration::from_secs(5), web.changed())
            .await
            .expect("web changed")
            .unwrap();
        let after = work_settles(&index, |w| {
            w.destinations_resolved > before.destinations_resolved
        })
        .await;
        assert_eq!(
            after.destinations_resolved,
            before.destinations_resolved + 1,
            "only web"
        );
        assert_eq!(after.inbound_resolved, before.inbound_resolved);
        assert!(!api.has_changed().unwrap(), "api untouched");
        assert_eq!(version(&api), api_version);
        assert!(!inbound.has_changed().unwrap());
    }

    #[tokio::test]
    async fn a_split_change_resolves_only_its_root_and_no_inbound_policy() {
        let (index, _registry, policy) = mesh(1, 1);
        let mut web = answered(&index, "web").await;
        let api = answered(&index, "api").await;
        let mut inbound = index.inbound(key("api"), 8080).await.unwrap();
        inbound.wait_for(Option::is_some).await.unwrap();
        let before = work_settles(&index, |_| true).await;
        let api_version = version(&api);

        let yaml = split("web", "web", &[("web-v1", 1), ("web-v2", 3)], None) + TARGET;
        policy.send_replace(set_of(&yaml));
        tokio::time::timeout(Duration::from_secs(5), web.changed())
            .await
            .expect("web changed")
            .unwrap();
        let after = work_settles(&index, |w| w.policy_views > before.policy_views).await;
        assert_eq!(
            after.destinations_resolved,
            before.destinations_resolved + 1,
            "only web"
        );
        assert_eq!(
            after.inbound_resolved, before.inbound_resolved,
            "no inbound policy"
        );
        assert!(!api.has_changed().unwrap());
        assert_eq!(version(&api), api_version);

        // A TrafficTarget change resolves the inbound policy of its workload only.
        let other = "---\napiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: { name: to-web, namespace: demo }\nspec:\n  destination: { kind: ServiceAccount, name: web, namespace: demo }\n  sources:\n  - { kind: ServiceAccount, name: api, namespace: demo }\n  rules:\n  - { kind: TCPRoute, name: http }\n";
        let yaml = split("web", "web", &[("web-v1", 1), ("web-v2", 3)], None) + TARGET + other;
        policy.send_replace(set_of(&yaml));
        let later = work_settles(&index, |w| w.policy_views > after.policy_views).await;
        assert_eq!(later.destinations_resolved, after.destinations_resolved);
        assert_eq!(
            later.inbound_resolved, after.inbound_resolved,
            "api's targets did not change"
        );
        assert!(!api.has_changed().unwrap());
    }

    #[tokio::test]
    async fn a_destination_nobody_watches_is_dropped_with_its_discovery_watches() {
        let (index, registry, _policy) = mesh(1, 1);
        let web = answered(&index, "web").await;
        let second = index.destination(key("web")).await.unwrap();
        assert_eq!(registry.watchers("web-v1"), 1);
        drop(web);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            registry.watchers("web-v1"),
            1,
            "still watched by the second receiver"
        );
        drop(second);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while registry.watchers("web-v1") > 0 || registry.watchers("web") > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "discovery watches stopped within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut status = index.status();
        tokio::time::timeout(
            Duration::from_secs(5),
            status.wait_for(|s| s.destinations.is_empty()),
        )
        .await
        .expect("the destination is gone from the state")
        .unwrap();

        // Asked for again, it comes back complete.
        let web = answered(&index, "web").await;
        assert!(matches!(
            web.borrow().as_ref().unwrap().kind,
            Some(v1::destination_update::Kind::Profile(_))
        ));
        assert_eq!(registry.watchers("web-v1"), 1);
    }

    /// End to end, as `/api/v1/state` and `trellis check` show them: a directory of several
    /// files through the files source and the index; every problem the index finds is located at
    /// `file:line` of the resource at fault.
    #[tokio::test]
    async fn every_problem_from_a_policy_directory_is_located_at_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        // A route group the loader rejects (its regex does not compile): not in force, so the
        // split naming it has no group.
        std::fs::write(
            dir.path().join("10-routes.yaml"),
            "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {name: api-routes, namespace: demo}\nspec:\n  matches:\n  - {name: all, pathRegex: '(('}\n",
        )
        .unwrap();
        // zero starts on line 4 (after a comment, a blank line and `---`), routed on line 12.
        let splits = format!(
            "# shop splits\n\n{}{}  matches:\n  - {{kind: HTTPRouteGroup, name: api-routes}}\n",
            split("zero", "db", &[("db-v1", 0)], None),
            split("routed", "api", &[("api-v2", 1)], None),
        );
        std::fs::write(dir.path().join("20-splits.yaml"), splits).unwrap();
        // web's backend web-v3 does not exist: found when a proxy asks for web.
        std::fs::write(
            dir.path().join("30-web.yaml"),
            split("web", "web", &[("web-v1", 1), ("web-v3", 1)], None),
        )
        .unwrap();
        let registry = Registry::default();
        registry.set("web", &["10.0.0.1"]);
        registry.set("web-v1", &["10.0.0.1"]);
        let source = crate::policy::files::FilePolicySource::new(vec![dir.path().to_owned()]);
        let index = Index::start(
            vec![Arc::new(source)],
            Arc::new(registry),
            IndexOptions::default(),
        );
        let _web = answered(&index, "web").await;

        let at = |file: &str| format!("{}:", dir.path().join(file).display());
        let expected = [
            format!(
                "{}12: TrafficSplit demo/routed: HTTPRouteGroup demo/api-routes is referenced but missing: its requests go to the root service",
                at("20-splits.yaml")
            ),
            format!(
                "{}4: TrafficSplit demo/zero: weights sum to 0: the split is inactive and traffic goes to the root service",
                at("20-splits.yaml")
            ),
            format!(
                "{}2: TrafficSplit demo/web: backend demo/web-v3: backend service does not exist (yet): its share gets no endpoints",
                at("30-web.yaml")
            ),
        ];
        // The lines `trellis check` prints (`location: resource: message`).
        let lines = |s: &Status| -> Vec<String> {
            s.problems
                .iter()
                .map(|p| format!("{}: {}: {}", p.location, p.resource, p.message))
                .collect()
        };
        let mut status = index.status();
        let status = tokio::time::timeout(
            Duration::from_secs(5),
            status.wait_for(|s| expected.iter().all(|e| lines(s).contains(e))),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "located problems within 5 s: {:#?}",
                lines(&index.status().borrow())
            )
        })
        .unwrap()
        .clone();
        // Nothing else but the loader's own problem with the route group, at its line too.
        let rest: Vec<String> = lines(&status)
            .into_iter()
            .filter(|l| !expected.contains(l))
            .collect();
        assert_eq!(rest.len(), 1, "{rest:#?}");
        assert!(
            rest[0].starts_with(&format!(
                "{}6: HTTPRouteGroup demo/api-routes: ",
                at("10-routes.yaml")
            )),
            "{rest:#?}"
        );
    }

    /// Through the index task: a TrafficPolicy's rate limit reaches the inbound policy of the
    /// workload discovery puts behind its target, and follows discovery; a policy whose target
    /// no platform has is reported at its origin.
    #[tokio::test]
    async fn traffic_policies_reach_inbound_policies_and_a_missing_target_is_located() {
        use super::policy::tests::{located_set, traffic_policy};
        let registry = Registry::default();
        registry.set("web", &["10.0.0.1"]);
        let yaml =
            traffic_policy(
                "web-limits",
                "web",
                None,
                "  rateLimit: {requestsPerSecond: 50}\n",
            ) + &traffic_policy("ghost-policy", "ghost", None, "  timeouts: {request: 1s}\n");
        let (policy, _) = watch::channel(located_set("p.yaml", &yaml));
        let index = Index::start(
            vec![Arc::new(Policies(policy.clone()))],
            Arc::new(registry.clone()),
            IndexOptions::default(),
        );
        let limits = |p: &Option<v1::InboundPolicy>| -> Vec<(String, f64)> {
            p.iter()
                .flat_map(|p| &p.rate_limits)
                .map(|l| (l.name.clone(), l.requests_per_second))
                .collect()
        };
        let mut web = index.inbound(key("web"), 8080).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            web.wait_for(|p| !limits(p).is_empty()),
        )
        .await
        .expect("the rate limit reaches web's inbound policy")
        .unwrap();
        assert_eq!(limits(&web.borrow()), [("demo/web".to_string(), 50.0)]);
        let other = index.inbound(key("api"), 8080).await.unwrap();
        assert!(limits(&other.borrow()).is_empty());

        let expected = "p.yaml:9: TrafficPolicy demo/ghost-policy: spec.targetRef: no service demo/ghost on any platform: the policy applies to nothing";
        let lines = |s: &Status| -> Vec<String> {
            s.problems
                .iter()
                .map(|p| format!("{}: {}: {}", p.location, p.resource, p.message))
                .collect()
        };
        let mut status = index.status();
        tokio::time::timeout(
            Duration::from_secs(5),
            status.wait_for(|s| lines(s).iter().any(|l| l == expected)),
        )
        .await
        .unwrap_or_else(|_| panic!("located within 5 s: {:#?}", lines(&index.status().borrow())))
        .unwrap();

        // web's pods go: the limit has nobody to protect; ghost appears: no problem any more.
        registry.sender("web").send_replace(Snapshot::NotFound);
        tokio::time::timeout(
            Duration::from_secs(5),
            web.wait_for(|p| limits(p).is_empty()),
        )
        .await
        .expect("the limit follows discovery")
        .unwrap();
        registry.set("ghost", &["10.0.0.7"]);
        tokio::time::timeout(
            Duration::from_secs(5),
            status.wait_for(|s| !lines(s).iter().any(|l| l.contains("demo/ghost-policy"))),
        )
        .await
        .expect("the problem goes with the service's arrival")
        .unwrap();
    }

    /// A TrafficPolicy's jwt and route claims reach the inbound policy of the workload behind its
    /// target, beside the rules; when the policy stops being applicable (its route group goes)
    /// the port closes: no rule is left, the default denies, and the problem is located.
    #[tokio::test]
    async fn jwt_and_claims_reach_inbound_policies_and_an_unapplicable_one_closes_the_port() {
        use super::policy::tests::{located_set, traffic_policy};
        let registry = Registry::default();
        registry.set("web", &["10.0.0.1"]);
        let yaml = traffic_policy(
            "web-auth",
            "web",
            None,
            "  jwt:
    providers: [{issuer: 'https://auth', audiences: [web], jwks: {file: /k.json}}]
  routes:
  - {httpRouteGroup: api, claims: [{claim: role, values: [admin]}]}
",
        ) + "---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: api, namespace: demo}
spec:
  matches:
  - {name: admin, pathRegex: '/admin/.*'}
";
        let set = located_set("p.yaml", &yaml);
        let (policy, _) = watch::channel(set.clone());
        let options = IndexOptions {
            access: inbound::AccessSwitches {
                plaintext_namespaces: vec!["demo".into()],
                ..Default::default()
            },
            ..IndexOptions::default()
        };
        let index = Index::start(
            vec![Arc::new(Policies(policy.clone()))],
            Arc::new(registry.clone()),
            options,
        );
        let mut web = index.inbound(key("web"), 8080).await.unwrap();
        let gated = |p: &Option<v1::InboundPolicy>| {
            p.as_ref()
                .is_some_and(|p| p.jwt.is_some() && !p.claim_requirements.is_empty())
        };
        tokio::time::timeout(Duration::from_secs(5), web.wait_for(gated))
            .await
            .expect("jwt and claims reach web's inbound policy")
            .unwrap();
        {
            let p = web.borrow();
            let p = p.as_ref().unwrap();
            assert_eq!(p.claim_requirements[0].name, "demo/web/api");
            assert_eq!(p.claim_requirements[0].matches[0].path_regex, "/admin/.*");
            assert_eq!(
                p.authorizations.len(),
                1,
                "the plaintext switch's rule stays"
            );
        }

        // The group goes (the files source would keep its last good version; Kubernetes
        // deletes it): the policy is not applied, and its claims must not simply vanish.
        let mut without_group = set;
        without_group
            .policies
            .retain(|p| !matches!(p, trellis_smi::model::Policy::HttpRouteGroup(_)));
        policy.send_replace(without_group);
        tokio::time::timeout(
            Duration::from_secs(5),
            web.wait_for(|p| p.as_ref().is_some_and(|p| p.authorizations.is_empty())),
        )
        .await
        .expect("the port closes")
        .unwrap();
        {
            let p = web.borrow();
            let p = p.as_ref().unwrap();
            assert_eq!(p.default_action, v1::DefaultAction::Deny as i32);
            assert!(p.jwt.is_none() && p.claim_requirements.is_empty());
        }
        let mut status = index.status();
        tokio::time::timeout(
            Duration::from_secs(5),
            status.wait_for(|s| {
                s.problems.iter().any(|p| {
                    p.resource == "TrafficPolicy demo/web-auth"
                        && p.message
                            .contains("workload demo/web refuses every request on port 8080")
                })
            }),
        )
        .await
        .expect("the closed port is reported at the policy")
        .unwrap();
    }

    /// The registry, plus who holds which address (edited by the test).
    #[derive(Clone)]
    struct Addressed {
        registry: Registry,
        owners: Arc<watch::Sender<HashMap<std::net::IpAddr, trellis_discovery::AddressOwner>>>,
    }

    impl Discovery for Addressed {
        fn source_id(&self) -> trellis_discovery::SourceId {
            self.registry.source_id()
        }

        fn capabilities(&self) -> Capabilities {
            self.registry.capabilities()
        }

        fn services(
            &self,
        ) -> futures::stream::BoxStream<
            'static,
            Result<trellis_discovery::ServiceCatalog, trellis_discovery::DiscoveryError>,
        > {
            self.registry.services()
        }

        fn watch(
            &self,
            service: ServiceKey,
        ) -> futures::stream::BoxStream<'static, Result<Snapshot, trellis_discovery::DiscoveryError>>
        {
            self.registry.watch(service)
        }

        fn watch_address(
            &self,
            address: std::net::IpAddr,
        ) -> futures::stream::BoxStream<
            'static,
            Result<trellis_discovery::AddressOwner, trellis_discovery::DiscoveryError>,
        > {
            WatchStream::new(self.owners.subscribe())
                .map(move |owners| {
                    Ok(owners
                        .get(&address)
                        .cloned()
                        .unwrap_or(trellis_discovery::AddressOwner::Unknown))
                })
                .boxed()
        }
    }

    /// Waits until the channel holds an update `pred` accepts; returns its kind.
    async fn until_kind(
        rx: &mut DestinationRx,
        what: &str,
        pred: impl Fn(&v1::destination_update::Kind) -> bool,
    ) -> v1::destination_update::Kind {
        let waited = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|u| u.as_ref().and_then(|u| u.kind.as_ref()).is_some_and(&pred)),
        )
        .await
        .map(|r| r.unwrap().clone());
        let Ok(update) = waited else {
            panic!("{what}: not within 5 s; last {:?}", rx.borrow());
        };
        update.and_then(|u| u.kind).unwrap()
    }

    fn profile_endpoints(kind: &v1::destination_update::Kind) -> Option<Vec<(String, String)>> {
        let v1::destination_update::Kind::Profile(p) = kind else {
            return None;
        };
        Some(
            p.backends
                .iter()
                .flat_map(|b| b.endpoints.iter())
                .map(|e| (e.address.clone(), e.identity.clone()))
                .collect(),
        )
    }

    #[tokio::test]
    async fn an_address_is_its_service_its_endpoint_or_not_found_and_follows_discovery() {
        use trellis_discovery::AddressOwner;
        let registry = Registry::default();
        registry.set("web", &["10.0.0.1"]);
        let (owners, _) = watch::channel(HashMap::new());
        let discovery = Addressed {
            registry: registry.clone(),
            owners: Arc::new(owners),
        };
        let index = Index::start(vec![], Arc::new(discovery.clone()), IndexOptions::default());
        let not_found = |k: &v1::destination_update::Kind| {
            matches!(k, v1::destination_update::Kind::NotFound(_))
        };
        let vip: std::net::IpAddr = "10.96.0.10".parse().unwrap();
        let mut by_vip = index.address((vip, 8080).into()).await.unwrap();
        until_kind(&mut by_vip, "unknown address", not_found).await;

        // The service appears on the address after the first ask: found.
        let ports = vec![ServicePort {
            name: None,
            port: 8080,
            protocol: None,
        }];
        discovery.owners.send_modify(|o| {
            o.insert(
                vip,
                AddressOwner::Service {
                    service: key("web"),
                    ports: ports.clone(),
                },
            );
        });
        let kind = until_kind(&mut by_vip, "the service's profile", |k| {
            profile_endpoints(k).is_some()
        })
        .await;
        let v1::destination_update::Kind::Profile(profile) = &kind else {
            unreachable!()
        };
        assert_eq!(profile.authority, "10.96.0.10:8080");
        assert_eq!(
            profile_endpoints(&kind).unwrap(),
            vec![(
                "10.0.0.1:8080".to_string(),
                "spiffe://cluster.local/ns/demo/sa/web".to_string()
            )]
        );
        // Endpoint changes of the service follow.
        registry.set("web", &["10.0.0.1", "10.0.0.2"]);
        until_kind(&mut by_vip, "the new endpoint", |k| {
            profile_endpoints(k).is_some_and(|e| e.len() == 2)
        })
        .await;

        // Another port of the address: not the service's.
        let mut other_port = index.address((vip, 9999).into()).await.unwrap();
        let kind = until_kind(&mut other_port, "a port the service lacks", not_found).await;
        assert!(format!("{kind:?}").contains("has no port 9999"), "{kind:?}");

        // A pod IP: that endpoint alone, with its identity.
        let Snapshot::Endpoints(set) = endpoints("web", &["10.0.0.1"]) else {
            unreachable!()
        };
        discovery.owners.send_modify(|o| {
            o.insert(
                "10.0.0.1".parse().unwrap(),
                AddressOwner::Endpoint {
                    service: key("web"),
                    endpoint: Box::new(set.endpoints[0].clone()),
                },
            );
        });
        let mut pod = index
            .address(("10.0.0.1".parse::<std::net::IpAddr>().unwrap(), 8080).into())
            .await
            .unwrap();
        let kind = until_kind(&mut pod, "the pod", |k| profile_endpoints(k).is_some()).await;
        assert_eq!(
            profile_endpoints(&kind).unwrap(),
            vec![(
                "10.0.0.1:8080".to_string(),
                "spiffe://cluster.local/ns/demo/sa/web".to_string()
            )]
        );

        // The service is deleted: not found again (the proxy forwards unchanged).
        discovery.owners.send_modify(|o| {
            o.remove(&vip);
        });
        until_kind(&mut by_vip, "deleted", not_found).await;
    }
}
