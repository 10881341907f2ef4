//! One kube-runtime reflector per resource kind (Services, EndpointSlices, Pods, ReplicaSets),
//! shared by every watch of an adapter instance: N watched services cost four watches, not 4N.
//!
//! Each reflector keeps its store current and announces what changed on a broadcast channel, so a
//! service's watch recomputes its snapshot only when an input in its namespace changed. Failures
//! go out on the same channel; the watcher backs off with the shared discovery policy
//! ([`WatchBackoff`]: 100 ms doubling to a 2 s cap, jittered, forever), so recovery after an
//! outage comes within one 2 s backoff period, the same promise as every other adapter.

use std::fmt::Debug;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, PodSpec, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::backoff::WatchBackoff;
use crate::failure::{Failure, classify};

/// The label EndpointSlices carry to name their Service.
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Which reflector a signal comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Service,
    EndpointSlice,
    Pod,
    ReplicaSet,
}

/// Something in a store changed. `namespace: None` means "anything may have changed" (a relist).
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub kind: Kind,
    pub namespace: Option<String>,
    /// The Service concerned (its name, or an EndpointSlice's service-name label).
    pub service: Option<String>,
}

#[derive(Clone, Debug)]
pub(crate) enum Signal {
    Changed(Change),
    Failed(Failure),
}

/// The four shared stores.
#[derive(Clone)]
pub(crate) struct Stores {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub pods: Store<Pod>,
    pub replicasets: Store<ReplicaSet>,
}

impl Stores {
    /// Resolves once every store has completed its first list.
    pub(crate) async fn ready(&self) {
        // A store's writer only goes away when its reflector task ends, i.e. on shutdown.
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
        let _ = self.replicasets.wait_until_ready().await;
    }
}

/// Starts the four reflectors on `client`, cluster-wide or in `namespace`.
pub(crate) fn spawn_all(
    client: &Client,
    namespace: Option<&str>,
    signals: &broadcast::Sender<Signal>,
) -> (Stores, Vec<JoinHandle<()>>) {
    let (services, t1) = spawn(
        api(client, namespace),
        Kind::Service,
        strip_service,
        signals,
    );
    let (slices, t2) = spawn(
        api(client, namespace),
        Kind::EndpointSlice,
        strip_slice,
        signals,
    );
    let (pods, t3) = spawn(api(client, namespace), Kind::Pod, strip_pod, signals);
    let (replicasets, t4) = spawn(
        api(client, namespace),
        Kind::ReplicaSet,
        strip_replicaset,
        signals,
    );
    let stores = Stores {
        services,
        slices,
        pods,
        replicasets,
    };
    (stores, vec![t1, t2, t3, t4])
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn spawn<K>(
    api: Api<K>,
    kind: Kind,
    strip: fn(&mut K),
    signals: &broadcast::Sender<Signal>,
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let plural = K::plural(&()).into_owned();
    let signals = signals.clone();
    let events = watcher(api)
        .backoff(WatchBackoff::default())
        .modify(strip)
        .reflect(writer);
    let task = tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            let signal = match event {
                Ok(Event::Apply(obj) | Event::Delete(obj)) => Signal::Changed(Change {
                    kind,
                    namespace: obj.namespace(),
                    service: service_of(kind, &obj),
                }),
                Ok(Event::InitDone) => Signal::Changed(Change {
                    kind,
                    namespace: None,
                    service: None,
                }),
                Ok(Event::Init | Event::InitApply(_)) => continue,
                Err(e) => match classify(&plural, &e) {
                    Some(failure) => {
                        tracing::debug!("{}", failure.message);
                        Signal::Failed(failure)
                    }
                    None => {
                        tracing::debug!("{plural}: resource version expired; relisting");
                        continue;
                    }
                },
            };
            // No receivers (no open watch) is fine: the store is still kept current.
            let _ = signals.send(signal);
        }
    });
    (reader, task)
}

fn watcher<K>(api: Api<K>) -> impl futures::Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    // The default ListWatch strategy: paged LIST, then WATCH with bookmarks.
    watcher::watcher(api, watcher::Config::default())
}

fn service_of<K: Resource>(kind: Kind, obj: &K) -> Option<String> {
    match kind {
        Kind::Service => Some(obj.meta().name.clone().unwrap_or_default()),
        Kind::EndpointSlice => obj
            .meta()
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned(),
        Kind::Pod | Kind::ReplicaSet => None,
    }
}

// Memory: the stores keep only what snapshots read. Managed fields and annotations are often
// most of an object's size.

fn strip_meta(meta: &mut kube::core::ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
}

fn strip_service(service: &mut Service) {
    strip_meta(&mut service.metadata);
    service.status = None;
}

fn strip_slice(slice: &mut EndpointSlice) {
    strip_meta(&mut slice.metadata);
}

fn strip_pod(pod: &mut Pod) {
    strip_meta(&mut pod.metadata);
    let (sa, legacy_sa) = pod
        .spec
        .as_ref()
        .map(|s| (s.service_account_name.clone(), s.service_account.clone()))
        .unwrap_or_default();
    pod.spec = Some(PodSpec {
        service_account_name: sa,
        service_account: legacy_sa,
        ..PodSpec::default()
    });
    pod.status = None;
}

fn strip_replicaset(rs: &mut ReplicaSet) {
    strip_meta(&mut rs.metadata);
    rs.metadata.labels = None;
    rs.spec = Default::default();
    rs.status = None;
}
