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
//! Work proportional to the change: a discovery snapshot of service S recomputes only the
//! destinations that read S (a reverse dependency map). A policy change rebuilds the view
//! (linear in the policy, not in the endpoints), then compares each watched destination's
//! [`DestinationPolicy`] (its split and route groups) with the previous one and recomputes only
//! those that differ; inbound policies are recomputed from the view (they read no discovery) and
//! sent only when they changed. Every channel sends only on a real change, with a new version.
//!
//! Nothing is published before every policy source has answered once (a first profile without
//! the split would send traffic the wrong way), and a destination waits for its root's first
//! discovery answer, so the first message a proxy gets is complete.

pub mod inbound;
pub mod outbound;
pub mod policy;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
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
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            permissive: false,
            access: inbound::AccessSwitches::default(),
        }
    }
}

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
}

/// A handle to the index task. Cheap to clone; the task stops when every handle is dropped.
#[derive(Clone, Debug)]
pub struct Index {
    tx: mpsc::UnboundedSender<Input>,
    status: watch::Receiver<Arc<Status>>,
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
        let writer = Writer::new(names, discovery, options, tx.downgrade(), status_tx);
        tokio::spawn(writer.run(rx));
        Index { tx, status }
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
    watches: HashMap<ServiceKey, JoinHandle<()>>,
}

impl Writer {
    fn new(
        names: Vec<String>,
        discovery: Arc<dyn Discovery>,
        options: IndexOptions,
        me: mpsc::WeakUnboundedSender<Input>,
        status: watch::Sender<Arc<Status>>,
    ) -> Self {
        Writer {
            sets: vec![None; names.len()],
            names,
            view: PolicyView::default(),
            discovery,
            options,
            me,
            status,
            destinations: BTreeMap::new(),
            inbound: BTreeMap::new(),
            snapshots: HashMap::new(),
            discovery_errors: HashMap::new(),
            readers: HashMap::new(),
            watches: HashMap::new(),
        }
    }

    fn policy_ready(&self) -> bool {
        self.sets.iter().all(Option::is_some)
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        self.publish_status();
        while let Some(input) = rx.recv().await {
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
            }
            self.publish_status();
        }
    }

    fn policies_changed(&mut self) {
        let sets: Vec<(String, PolicySet)> = self
            .names
            .iter()
            .zip(&self.sets)
            .filter_map(|(name, set)| set.as_ref().map(|(s, _)| (name.clone(), s.clone())))
            .collect();
        self.view = PolicyView::build(&sets);
        let ready = self.policy_ready();
        let changed: Vec<ServiceKey> = self
            .destinations
            .iter()
            .filter(|(root, d)| {
                (ready && d.tx.borrow().is_none()) || self.view.destination(root) != d.policy
            })
            .map(|(root, _)| root.clone())
            .collect();
        for root in changed {
            self.recompute(&root);
        }
        let keys: Vec<(ServiceKey, u16)> = self.inbound.keys().cloned().collect();
        for key in keys {
            self.recompute_inbound(&key);
        }
    }

    /// Recomputes one destination and sends it if it changed.
    fn recompute(&mut self, root: &ServiceKey) {
        let policy = self.view.destination(root);
        let inputs = outbound::inputs(root, &policy);
        self.set_inputs(root, &inputs);
        let ready = self.policy_ready();
        let snapshots = &self.snapshots;
        let lookup = |key: &ServiceKey| snapshots.get(key).cloned();
        let resolved = if ready {
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
                    self.snapshots.remove(service);
                    self.discovery_errors.remove(service);
                    if let Some(task) = self.watches.remove(service) {
                        task.abort();
                    }
                }
            }
        }
        for service in inputs {
            self.readers
                .entry(service.clone())
                .or_default()
                .insert(root.clone());
            if !self.watches.contains_key(service) {
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
        }
    }

    fn recompute_inbound(&mut self, key: &(ServiceKey, u16)) {
        if !self.policy_ready() {
            return;
        }
        let (workload, port) = key;
        let (policy, problems) = inbound::resolve(
            &self.view,
            &workload.namespace,
            &workload.name,
            *port,
            &self.options,
        );
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
        let mut push = |p: &PolicyProblem| {
            let line = ProblemLine {
                resource: p.resource.clone(),
                location: p.location.clone(),
                message: p.message.clone(),
            };
            if !problems.contains(&line) {
                problems.push(line);
            }
        };
        self.view.problems.iter().for_each(&mut push);
        self.destinations
            .values()
            .flat_map(|d| &d.problems)
            .for_each(&mut push);
        self.inbound
            .values()
            .flat_map(|i| &i.problems)
            .for_each(&mut push);
        for (service, error) in &self.discovery_errors {
            push(&PolicyProblem {
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
                .map(|(root, d)| destination_status(root, d))
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
        };
        self.status.send_replace(Arc::new(status));
    }
}

fn destination_status(root: &ServiceKey, d: &Destination) -> DestinationStatus {
    let current = d.tx.borrow();
    let mut status = DestinationStatus {
        authority: format!("{}.{}", root.name, root.namespace),
        version: current
            .as_ref()
            .map(|u| u.version.clone())
            .unwrap_or_default(),
        state: "pending".into(),
        backends: Vec::new(),
        routes: Vec::new(),
        subscribers: d.tx.receiver_count(),
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
