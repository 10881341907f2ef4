//! The Kubernetes policy source: the SMI CRDs through kube-runtime watchers.
//!
//! One watcher per kind (TrafficSplit, TrafficTarget, HTTPRouteGroup, TCPRoute, UDPRoute) at its
//! stored version, as `DynamicObject`s: the API server converts objects written in any other
//! version through the conversion webhook (`crate::webhook`), so five watches see everything, and
//! a dynamic object always decodes, so one bad object cannot stop a watch. Each object goes
//! through the smi crate (`SmiObject::from_value`, `to_policy`, `validate_policy`) into the
//! normalized model.
//!
//! Rules:
//! - A bad object (does not parse, or fails validation) keeps the last good version of that
//!   resource in force and is reported as a [`PolicyProblem`] (location `kubernetes`, resource
//!   `TrafficSplit ns/name`, one problem per field at fault, field paths in the stored version's
//!   shape). A bad object never seen good is reported and contributes no policy.
//! - A relist (start, 410 Gone, reconnect) replaces a kind's resources with what the list holds,
//!   still keeping the last good version of resources that are now bad.
//! - Watch errors (API server down, RBAC, CRD not installed) back off (100 ms doubling to 2 s,
//!   the discovery policy) and keep the last set. They are logged (a warning per new error of a
//!   kind), not put in the set: a watch that resumes sends no event, so a problem entry could
//!   not be cleared when it recovers.
//! - The first set is emitted once every kind has listed or failed once; after that, a new set
//!   after each change (events that arrive together are coalesced into one set).
//! - Read-only: the source never writes to SMI objects (Flagger compares what it wrote).
//!
//! Decision: the source keeps converted policies, not a reflector `Store` of raw objects, so each
//! change converts one object and memory holds the model only (managed fields are never kept).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use trellis_smi::api::{access, specs, split};
use trellis_smi::convert::{SmiObject, wire_field};
use trellis_smi::model::{Kind, Policy, ResourceId};

use super::{PolicyProblem, PolicySet, PolicySource};

/// `location` of every problem this source reports.
pub const LOCATION: &str = "kubernetes";

/// SMI policy from the Kubernetes API (the SMI CRDs).
#[derive(Clone)]
pub struct KubernetesPolicySource {
    client: Client,
    namespace: Option<String>,
}

impl std::fmt::Debug for KubernetesPolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesPolicySource")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl KubernetesPolicySource {
    /// Watches the SMI resources of every namespace.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            namespace: None,
        }
    }

    /// Watches one namespace only (a Role suffices instead of a ClusterRole).
    pub fn namespaced(client: Client, namespace: impl Into<String>) -> Self {
        Self {
            client,
            namespace: Some(namespace.into()),
        }
    }

    fn api(&self, resource: &ApiResource) -> Api<DynamicObject> {
        match &self.namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, resource),
            None => Api::all_with(self.client.clone(), resource),
        }
    }
}

/// The resource each kind is watched as: its stored (newest) version.
pub fn stored_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::TrafficSplit => ApiResource::erase::<split::v1alpha4::TrafficSplit>(&()),
        Kind::TrafficTarget => ApiResource::erase::<access::v1alpha3::TrafficTarget>(&()),
        Kind::HttpRouteGroup => {
            ApiResource::erase::<specs::http_route_group::v1alpha4::HTTPRouteGroup>(&())
        }
        Kind::TcpRoute => ApiResource::erase::<specs::tcp_route::v1alpha4::TCPRoute>(&()),
        Kind::UdpRoute => ApiResource::erase::<specs::udp_route::v1alpha4::UDPRoute>(&()),
    }
}

type KindEvents = BoxStream<'static, (Kind, watcher::Result<Event<DynamicObject>>)>;

impl PolicySource for KubernetesPolicySource {
    fn name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("kubernetes:{ns}"),
            None => "kubernetes".to_owned(),
        }
    }

    fn watch(&self) -> BoxStream<'static, PolicySet> {
        let events: SelectAll<KindEvents> = futures::stream::select_all(Kind::ALL.map(|kind| {
            let resource = stored_resource(kind);
            watcher::watcher(self.api(&resource), watcher::Config::default())
                .backoff(WatchBackoff::default())
                .modify(|object: &mut DynamicObject| object.metadata.managed_fields = None)
                .map(move |event| (kind, event))
                .boxed()
        }));
        futures::stream::unfold(
            (events, Tracker::default()),
            |(mut events, mut tracker)| async move {
                loop {
                    // The watchers never end (they back off and retry), so neither does this.
                    let (kind, event) = events.next().await?;
                    let mut changed = tracker.handle(kind, event);
                    // Coalesce what has already arrived into one set.
                    while let Some(Some((kind, event))) = events.next().now_or_never() {
                        changed |= tracker.handle(kind, event);
                    }
                    if let Some(set) = tracker.emit(changed) {
                        return Some((set, (events, tracker)));
                    }
                }
            },
        )
        .boxed()
    }
}

/// What is known of one resource.
#[derive(Clone, Debug, Default)]
struct Entry {
    /// The last good version, still in force.
    good: Option<Policy>,
    /// What is wrong with the current version (empty when it is the good one).
    problems: Vec<PolicyProblem>,
}

type Key = (Kind, String, String);

/// The state behind the stream: every resource by kind, namespace and name.
#[derive(Debug, Default)]
struct Tracker {
    entries: BTreeMap<Key, Entry>,
    /// A relist in progress per kind: what it has delivered so far.
    relists: HashMap<Kind, BTreeMap<Key, Entry>>,
    /// Kinds that have listed or failed once (the first set waits for all).
    settled: HashSet<Kind>,
    /// The last error logged per kind, so a retry loop logs each new error once.
    watch_errors: HashMap<Kind, String>,
    emitted: bool,
}

impl Tracker {
    /// Applies one watcher event; true when the set changed.
    fn handle(&mut self, kind: Kind, event: watcher::Result<Event<DynamicObject>>) -> bool {
        if event.is_ok() {
            self.watch_errors.remove(&kind);
        }
        match event {
            Ok(Event::Apply(object)) => {
                let key = key(kind, &object);
                let old = self.entries.remove(&key).and_then(|e| e.good);
                self.entries.insert(key, entry(kind, &object, old));
                true
            }
            Ok(Event::Delete(object)) => self.entries.remove(&key(kind, &object)).is_some(),
            Ok(Event::Init) => {
                self.relists.insert(kind, BTreeMap::new());
                false
            }
            Ok(Event::InitApply(object)) => {
                let key = key(kind, &object);
                let old = self.entries.get(&key).and_then(|e| e.good.clone());
                self.relists
                    .entry(kind)
                    .or_default()
                    .insert(key, entry(kind, &object, old));
                false
            }
            Ok(Event::InitDone) => {
                let fresh = self.relists.remove(&kind).unwrap_or_default();
                self.entries.retain(|(k, _, _), _| *k != kind);
                self.entries.extend(fresh);
                self.settled.insert(kind);
                true
            }
            // 410 Gone: the watcher relists at once; nothing is wrong.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                tracing::debug!("{}: resource version expired; relisting", kind.as_str());
                false
            }
            Err(error) => {
                let message = error.to_string();
                if self.watch_errors.get(&kind) != Some(&message) {
                    tracing::warn!(
                        "watching {} {} failed, keeping the last policy and retrying: {message}",
                        stored_resource(kind).api_version,
                        kind.as_str(),
                    );
                    self.watch_errors.insert(kind, message);
                }
                // A kind that cannot be listed (CRD not installed) must not hold back the
                // first set: it counts as settled, and the set is emitted if this settles the
                // last kind.
                self.settled.insert(kind)
            }
        }
    }

    /// The set to emit now, if any: the first once every kind settled, then one per change.
    fn emit(&mut self, changed: bool) -> Option<PolicySet> {
        let ready = Kind::ALL.iter().all(|k| self.settled.contains(k));
        if !ready || (self.emitted && !changed) {
            return None;
        }
        self.emitted = true;
        let mut set = PolicySet::default();
        for entry in self.entries.values() {
            set.policies.extend(entry.good.iter().cloned());
            set.problems.extend(entry.problems.iter().cloned());
        }
        Some(set)
    }
}

fn key(kind: Kind, object: &DynamicObject) -> Key {
    let id = ResourceId::new(kind.as_str(), &object.metadata);
    (kind, id.namespace, id.name)
}

/// The entry for a new version of a resource whose last good version was `old`.
fn entry(kind: Kind, object: &DynamicObject, old: Option<Policy>) -> Entry {
    match to_policy(kind, object) {
        Ok(policy) => Entry {
            good: Some(policy),
            problems: Vec::new(),
        },
        Err(problems) => {
            let resource = ResourceId::new(kind.as_str(), &object.metadata).to_string();
            let kept = if old.is_some() {
                "; the previous version stays in force"
            } else {
                "; not applied"
            };
            Entry {
                good: old,
                problems: problems
                    .into_iter()
                    .map(|message| PolicyProblem {
                        resource: resource.clone(),
                        location: LOCATION.to_owned(),
                        message: format!("{message}{kept}"),
                    })
                    .collect(),
            }
        }
    }
}

/// Converts a stored object into the model and validates it; the error is one message per
/// problem, `field: message`.
fn to_policy(kind: Kind, object: &DynamicObject) -> Result<Policy, Vec<String>> {
    let mut value = serde_json::to_value(object).map_err(|e| vec![e.to_string()])?;
    // The watch of the stored version carries its apiVersion/kind; make sure they are set even
    // for objects built without type metadata.
    if object.types.is_none() {
        let resource = stored_resource(kind);
        value["apiVersion"] = resource.api_version.into();
        value["kind"] = resource.kind.into();
    }
    let typed = SmiObject::from_value(&value).map_err(|e| vec![e.to_string()])?;
    let policy = typed.to_policy().map_err(|e| vec![e.to_string()])?;
    let version = typed.version();
    let issues = trellis_smi::validate::validate_policy(&policy, version);
    if issues.is_empty() {
        Ok(policy)
    } else {
        Err(issues
            .iter()
            .map(|issue| {
                format!(
                    "{}: {}",
                    wire_field(kind, version, &issue.field),
                    issue.message
                )
            })
            .collect())
    }
}

/// The discovery backoff policy (100 ms doubling to a 2 s cap, jittered) in kube-runtime's shape:
/// a policy source must recover as quickly as the discovery adapters after an outage.
#[derive(Default)]
struct WatchBackoff(trellis_discovery::Backoff);

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.0.next_delay())
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.0.reset();
    }
}
