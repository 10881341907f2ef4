//! The Kubernetes policy source: the SMI CRDs and Trellis's TrafficPolicy and ExternalService
//! through kube-runtime watchers.
//!
//! One watcher per kind (TrafficSplit, TrafficTarget, HTTPRouteGroup, TCPRoute, UDPRoute,
//! TrafficPolicy, ExternalService) at its stored version, as `DynamicObject`s: the API server
//! converts objects written in any other version through the conversion webhook
//! (`crate::webhook`), so seven watches see everything, and
//! a dynamic object always decodes, so one bad object cannot stop a watch. Each object goes
//! through the smi crate (`SmiObject::from_value`, `to_policy`, `validate_policy`) into the
//! normalized model.
//!
//! Rules:
//! - Every resource's origin (`PolicySet::origins`), and so the location of every problem about
//!   it, here or in the index, is the object: `kubernetes TrafficSplit ns/name`
//!   ([`object_location`]; [`located_object`] reads it back, which is how Events find it).
//! - A bad object (does not parse, or fails validation) keeps the last good version of that
//!   resource in force and is reported as a [`PolicyProblem`] (located at the object, resource
//!   `TrafficSplit ns/name`, one problem per field at fault, field paths in the stored version's
//!   shape). A bad object never seen good is reported and contributes no policy.
//! - A relist (start, 410 Gone, reconnect) replaces a kind's resources with what the list holds,
//!   still keeping the last good version of resources that are now bad.
//! - Watch errors (API server down, RBAC, CRD not installed) back off (100 ms doubling to 2 s,
//!   the discovery policy) and keep the last set. They are logged (a warning per new error of a
//!   kind) and reported in the set as one problem per failing kind, tied to no object and saying
//!   so (location `kubernetes TrafficSplit watch`, resource `TrafficSplit
//!   (split.smi-spec.io/v1alpha4)`, message `watch failing since <RFC 3339>: <error>; the last
//!   policy stays in force`), so `trellis check` and `/api/v1/state` show a source that is not
//!   fresh. A watch that resumes sends no event, so while a kind is failing the source probes it
//!   (a LIST of one item every [`PROBE_EVERY`]); the problem goes when a probe or an event
//!   succeeds. A missing CRD (404) or missing RBAC (403) keeps failing the probe, so it stays.
//! - The first set is emitted once every kind has listed or failed once; after that, a new set
//!   after each change (events that arrive together are coalesced into one set).
//! - Read-only: the source never writes to SMI objects (Flagger compares what it wrote).
//!
//! Decision: the source keeps converted policies, not a reflector `Store` of raw objects, so each
//! change converts one object and memory holds the model only (managed fields are never kept).
//!
//! [`KubernetesPolicySource::objects`] gives the object reference (apiVersion, kind, namespace,
//! name, uid) of every SMI object the source holds, by the object a problem's location names
//! (`TrafficSplit shop/web`), so Events can be attached to the object a problem is about
//! (`crate::events`) without changing [`PolicyProblem`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use trellis_smi::api::{access, external, policy, specs, split};
use trellis_smi::convert::{SmiObject, wire_field};
use trellis_smi::model::{Kind, Policy, ResourceId};

use trellis_adapter_kubernetes::WatchBackoff;
use trellis_controller_core::policy::{Origin, PolicyProblem, PolicySet, PolicySource};

/// How every location this source gives starts.
pub const LOCATION: &str = "kubernetes";

/// The origin of the object `id` (`kubernetes TrafficSplit shop/web`): the location of every
/// problem about it.
pub fn object_location(id: &ResourceId) -> String {
    format!("{LOCATION} {id}")
}

/// The object (`TrafficSplit shop/web`, the key of [`ObjectRefs`]) a problem's location names,
/// if it is one of this source's objects; `None` for files, discovery and failing watches.
pub fn located_object(location: &str) -> Option<&str> {
    let object = location.strip_prefix(LOCATION)?.strip_prefix(' ')?;
    // `Kind ns/name`; a failing watch is `Kind watch`, with no object.
    object.contains('/').then_some(object)
}

/// How often a failing kind is probed to see whether it recovered.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// SMI policy from the Kubernetes API (the SMI CRDs).
#[derive(Clone)]
pub struct KubernetesPolicySource {
    client: Client,
    namespace: Option<String>,
    objects: ObjectRefs,
}

/// The object reference of every SMI object the source holds now, by the object its problems'
/// locations name (`"TrafficSplit shop/web"`, see [`located_object`]). Updated before each set is emitted, so a problem in
/// a set can always be looked up. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct ObjectRefs(Arc<RwLock<HashMap<String, ObjectReference>>>);

impl ObjectRefs {
    /// The object `object` (`TrafficSplit shop/web`), if this source holds it.
    pub fn get(&self, object: &str) -> Option<ObjectReference> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(object)
            .cloned()
    }

    fn replace(&self, refs: HashMap<String, ObjectReference>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = refs;
    }
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
            objects: ObjectRefs::default(),
        }
    }

    /// Watches one namespace only (a Role suffices instead of a ClusterRole).
    pub fn namespaced(client: Client, namespace: impl Into<String>) -> Self {
        Self {
            client,
            namespace: Some(namespace.into()),
            objects: ObjectRefs::default(),
        }
    }

    /// The references of the objects this source holds (for Events about them).
    pub fn objects(&self) -> ObjectRefs {
        self.objects.clone()
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
        Kind::TrafficPolicy => ApiResource::erase::<policy::v1alpha1::TrafficPolicy>(&()),
        Kind::ExternalService => ApiResource::erase::<external::v1alpha1::ExternalService>(&()),
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
        let probes: HashMap<Kind, Api<DynamicObject>> = Kind::ALL
            .into_iter()
            .map(|kind| (kind, self.api(&stored_resource(kind))))
            .collect();
        let tracker = Tracker {
            objects: self.objects.clone(),
            ..Tracker::default()
        };
        let mut probe_tick = tokio::time::interval(PROBE_EVERY);
        probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        futures::stream::unfold(
            (events, tracker, probes, probe_tick),
            |(mut events, mut tracker, probes, mut probe_tick)| async move {
                loop {
                    let failing = !tracker.watch_errors.is_empty();
                    let mut changed = tokio::select! {
                        // The watchers never end (they back off and retry), so neither does this.
                        item = events.next() => {
                            let (kind, event) = item?;
                            tracker.handle(kind, event)
                        }
                        _ = probe_tick.tick(), if failing => tracker.probe(&probes).await,
                    };
                    // Coalesce what has already arrived into one set.
                    while let Some(Some((kind, event))) = events.next().now_or_never() {
                        changed |= tracker.handle(kind, event);
                    }
                    if let Some(set) = tracker.emit(changed) {
                        return Some((set, (events, tracker, probes, probe_tick)));
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
    /// The object as the API server knows it now (for Events).
    reference: ObjectReference,
    /// `kubernetes Kind ns/name`: where the resource and its problems are.
    origin: Origin,
}

/// A kind whose watch is failing: the error and since when.
#[derive(Clone, Debug)]
struct WatchFailure {
    message: String,
    since: SystemTime,
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
    /// The current error per failing kind (logged once per new error, reported in the set).
    watch_errors: HashMap<Kind, WatchFailure>,
    emitted: bool,
    objects: ObjectRefs,
}

impl Tracker {
    /// Applies one watcher event; true when the set changed.
    fn handle(&mut self, kind: Kind, event: watcher::Result<Event<DynamicObject>>) -> bool {
        // `Init` comes before every (re)list, also the one about to fail again (a CRD that is
        // not installed): only an answer of the API server proves the watch works.
        let answered = matches!(&event, Ok(e) if !matches!(e, Event::Init));
        let recovered = answered && self.watch_errors.remove(&kind).is_some();
        recovered | self.apply(kind, event)
    }

    fn apply(&mut self, kind: Kind, event: watcher::Result<Event<DynamicObject>>) -> bool {
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
                let new = self
                    .watch_errors
                    .get(&kind)
                    .is_none_or(|f| f.message != message);
                if new {
                    tracing::warn!(
                        "watching {} {} failed, keeping the last policy and retrying: {message}",
                        stored_resource(kind).api_version,
                        kind.as_str(),
                    );
                    let since = self
                        .watch_errors
                        .get(&kind)
                        .map_or_else(SystemTime::now, |f| f.since);
                    self.watch_errors
                        .insert(kind, WatchFailure { message, since });
                }
                // A kind that cannot be listed (CRD not installed) must not hold back the
                // first set: it counts as settled, and the set is emitted if this settles the
                // last kind.
                self.settled.insert(kind) | new
            }
        }
    }

    /// Probes every failing kind with a LIST of one item; true when one recovered.
    async fn probe(&mut self, apis: &HashMap<Kind, Api<DynamicObject>>) -> bool {
        let failing: Vec<Kind> = self.watch_errors.keys().copied().collect();
        let mut recovered = false;
        for kind in failing {
            let Some(api) = apis.get(&kind) else { continue };
            let params = ListParams::default().limit(1);
            if let Ok(Ok(_)) = tokio::time::timeout(PROBE_EVERY, api.list(&params)).await {
                tracing::info!(
                    "watching {} {} works again",
                    stored_resource(kind).api_version,
                    kind.as_str()
                );
                self.watch_errors.remove(&kind);
                recovered = true;
            }
        }
        recovered
    }

    /// The set to emit now, if any: the first once every kind settled, then one per change.
    fn emit(&mut self, changed: bool) -> Option<PolicySet> {
        let ready = Kind::ALL.iter().all(|k| self.settled.contains(k));
        if !ready || (self.emitted && !changed) {
            return None;
        }
        self.emitted = true;
        let mut set = PolicySet::default();
        let mut refs = HashMap::with_capacity(self.entries.len());
        for ((kind, namespace, name), entry) in &self.entries {
            let id = ResourceId {
                kind: kind.as_str().to_owned(),
                namespace: namespace.clone(),
                name: name.clone(),
            };
            if let Some(good) = &entry.good {
                set.policies.push(good.clone());
                set.origins.insert(id.clone(), entry.origin.clone());
            }
            set.problems.extend(entry.problems.iter().cloned());
            refs.insert(id.to_string(), entry.reference.clone());
        }
        for kind in Kind::ALL {
            if let Some(failure) = self.watch_errors.get(&kind) {
                set.problems.push(watch_problem(kind, failure));
            }
        }
        self.objects.replace(refs);
        Some(set)
    }
}

/// The problem of a kind whose watch is failing.
fn watch_problem(kind: Kind, failure: &WatchFailure) -> PolicyProblem {
    let since = k8s_openapi::jiff::Timestamp::try_from(failure.since)
        .map(|t| {
            t.round(k8s_openapi::jiff::Unit::Second)
                .unwrap_or(t)
                .to_string()
        })
        .unwrap_or_else(|_| "?".into());
    PolicyProblem {
        resource: format!("{} ({})", kind.as_str(), stored_resource(kind).api_version),
        // A whole kind, no object: said so.
        location: format!("{LOCATION} {} watch", kind.as_str()),
        message: format!(
            "watch failing since {since}: {}; the last policy stays in force",
            failure.message
        ),
    }
}

fn key(kind: Kind, object: &DynamicObject) -> Key {
    let id = ResourceId::new(kind.as_str(), &object.metadata);
    (kind, id.namespace, id.name)
}

/// The reference Events about `object` carry (`regarding`).
fn reference(kind: Kind, object: &DynamicObject) -> ObjectReference {
    let resource = stored_resource(kind);
    let meta = &object.metadata;
    ObjectReference {
        api_version: Some(
            object
                .types
                .as_ref()
                .map_or(resource.api_version, |t| t.api_version.clone()),
        ),
        kind: Some(resource.kind),
        namespace: Some(meta.namespace.clone().unwrap_or_else(|| "default".into())),
        name: meta.name.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        field_path: None,
    }
}

/// The entry for a new version of a resource whose last good version was `old`.
fn entry(kind: Kind, object: &DynamicObject, old: Option<Policy>) -> Entry {
    let reference = reference(kind, object);
    let id = ResourceId::new(kind.as_str(), &object.metadata);
    let location = object_location(&id);
    let origin = Origin::from(location.as_str());
    match to_policy(kind, object) {
        Ok(policy) => Entry {
            good: Some(policy),
            problems: Vec::new(),
            reference,
            origin,
        },
        Err(problems) => {
            let resource = id.to_string();
            let kept = if old.is_some() {
                "; the previous version stays in force"
            } else {
                "; not applied"
            };
            Entry {
                good: old,
                reference,
                origin,
                problems: problems
                    .into_iter()
                    .map(|message| PolicyProblem {
                        resource: resource.clone(),
                        location: location.clone(),
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
