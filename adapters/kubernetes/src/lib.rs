//! Kubernetes discovery adapter: Services, EndpointSlices and Pods through kube-runtime.
//!
//! [`KubernetesDiscovery`] runs one kube-runtime reflector per resource kind (Services,
//! `discovery.k8s.io/v1` EndpointSlices, Pods, ReplicaSets), shared by every watch, and derives
//! each watched service's [`Snapshot`] from the stores:
//! - the Service's ports (name, port, appProtocol as [`trellis_discovery::ProtocolHint`]);
//!   a missing Service is [`Snapshot::NotFound`], a Service without slices an empty set;
//! - one [`trellis_discovery::Endpoint`] per EndpointSlice address, with the slice's named
//!   ports, the appProtocol hint, the zone, and readiness from the conditions (ready ->
//!   `Ready`; serving && terminating -> `Terminating`; else `NotReady`; missing
//!   `ready`/`serving` mean true as the API says);
//! - from the endpoint's `targetRef` Pod: the identity (namespace + `spec.serviceAccountName`,
//!   `default` when the pod names none, as Kubernetes does), the labels, and the owner workload
//!   (Pod -> ReplicaSet -> Deployment; StatefulSet, DaemonSet, ... directly; the Pod when it has
//!   no controller). An endpoint whose pod is not known yet is `NotReady` until it is (identity
//!   unknown: fail safe); a slice entry with no pod (selectorless Service) has the service's name
//!   as identity and the Service as owner.
//!
//! Addresses (transparent mode, [`Discovery::watch_address`]): a Service's `spec.clusterIPs`
//! (headless `None` is no address) name the Service and its ports; an EndpointSlice address
//! names that endpoint (identity from its pod, as above).
//!
//! A new snapshot is emitted whenever any input changes (a pod's service account or labels, a
//! ReplicaSet's owner, a slice, the Service). Watcher failures are yielded as `Err` items (kind and
//! temporary flag; 410 Gone is a relist, not a failure); the watcher backs off with the shared
//! policy ([`trellis_discovery::Backoff`], 2 s cap) and the consumer keeps the last snapshot.
//! The RBAC this needs is in `rbac.yaml` next to this crate.

pub mod backoff;
mod failure;
mod follow;
mod reflectors;
mod snapshot;

pub use backoff::WatchBackoff;
pub use snapshot::DEFAULT_SERVICE_ACCOUNT;

use std::sync::Arc;
use std::time::SystemTime;

use futures::stream::BoxStream;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use trellis_discovery::{
    AddressOwner, Capabilities, ChangeDelivery, Discovery, DiscoveryError, ErrorKind,
    IdentitySource, ServiceCatalog, ServiceKey, Snapshot, SourceId,
};

use crate::follow::Follower;
use crate::reflectors::{Kind, Signal, Stores};

/// What to watch.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Watch only this namespace (a Role instead of a ClusterRole suffices); `None`: all.
    pub namespace: Option<String>,
}

/// The Kubernetes adapter. Cheap to share; its reflectors stop when the last handle and the last
/// open watch are dropped.
#[derive(Clone)]
pub struct KubernetesDiscovery {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KubernetesDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesDiscovery")
            .field("source", &self.shared.source)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    source: SourceId,
    stores: Stores,
    signals: broadcast::Sender<Signal>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl KubernetesDiscovery {
    /// Connects with `config` (e.g. `kube::Config::infer().await?`, or a kubeconfig). The source
    /// id is `kubernetes:<cluster URL>`. Must be called inside a Tokio runtime.
    pub fn new(config: kube::Config, options: Options) -> Result<Self, DiscoveryError> {
        let source: SourceId = format!("kubernetes:{}", config.cluster_url).into();
        let client = kube::Client::try_from(config).map_err(|e| {
            DiscoveryError::new(
                ErrorKind::Config,
                false,
                source.clone(),
                format!("building the Kubernetes client: {e}"),
            )
            .with_cause(e)
        })?;
        Ok(Self::with_client(client, source, options))
    }

    /// Uses an existing client; `source` names this adapter instance in endpoints and errors.
    pub fn with_client(client: kube::Client, source: SourceId, options: Options) -> Self {
        // Large enough that a burst of changes rarely lags a watch; a lagging watch recomputes.
        let (signals, _) = broadcast::channel(4096);
        let (stores, tasks) =
            reflectors::spawn_all(&client, options.namespace.as_deref(), &signals);
        Self {
            shared: Arc::new(Shared {
                source,
                stores,
                signals,
                tasks,
            }),
        }
    }
}

impl Discovery for KubernetesDiscovery {
    fn source_id(&self) -> SourceId {
        self.shared.source.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delivery: ChangeDelivery::Push,
            health: true,
            terminating: true,
            weights: false,
            zones: true,
            owners: true,
            identity: IdentitySource::Platform,
            version_subsets: false,
        }
    }

    fn services(&self) -> BoxStream<'static, Result<ServiceCatalog, DiscoveryError>> {
        let source = self.shared.source.clone();
        Follower::new(
            Arc::clone(&self.shared),
            Box::new(|c| c.kind == Kind::Service || c.namespace.is_none()),
            Box::new(move |shared: &Shared| {
                let mut services: Vec<ServiceKey> = shared
                    .stores
                    .services
                    .state()
                    .iter()
                    .map(|s| {
                        ServiceKey::new(
                            s.metadata.namespace.clone().unwrap_or_default(),
                            s.metadata.name.clone().unwrap_or_default(),
                        )
                    })
                    .collect();
                services.sort();
                ServiceCatalog {
                    source: source.clone(),
                    services,
                    observed_at: SystemTime::UNIX_EPOCH,
                }
            }),
            |mut catalog| {
                catalog.observed_at = SystemTime::now();
                catalog
            },
        )
        .into_stream()
    }

    fn watch(&self, service: ServiceKey) -> BoxStream<'static, Result<Snapshot, DiscoveryError>> {
        let key = service.clone();
        Follower::new(
            Arc::clone(&self.shared),
            Box::new(move |c| relevant(c, &service)),
            Box::new(move |shared: &Shared| {
                snapshot::compute(&shared.stores, &key, &shared.source)
            }),
            |s| snapshot::stamp(s, SystemTime::now()),
        )
        .into_stream()
    }

    /// Service `spec.clusterIPs` first, then EndpointSlice addresses (with the pod's identity,
    /// as in the service's snapshot). Recomputed from the shared stores when a Service,
    /// EndpointSlice or Pod changes, and yielded only when the answer changed: the cost is per
    /// store change and watched address, never per connection (the controller asks once per
    /// address, proxies cache per `IP:PORT`).
    fn watch_address(
        &self,
        address: std::net::IpAddr,
    ) -> BoxStream<'static, Result<AddressOwner, DiscoveryError>> {
        Follower::new(
            Arc::clone(&self.shared),
            Box::new(|c| c.kind != Kind::ReplicaSet || c.namespace.is_none()),
            Box::new(move |shared: &Shared| {
                snapshot::address_owner(&shared.stores, address, &shared.source)
            }),
            |owner| match owner {
                AddressOwner::Endpoint {
                    service,
                    mut endpoint,
                } => {
                    endpoint.provenance.confirmed_at = SystemTime::now();
                    AddressOwner::Endpoint { service, endpoint }
                }
                other => other,
            },
        )
        .into_stream()
    }
}

/// Whether a store change may affect `service`'s snapshot. Pods and ReplicaSets are not indexed
/// by service, so any change in the namespace triggers a recomputation (compared before emitting).
fn relevant(change: &reflectors::Change, service: &ServiceKey) -> bool {
    let Some(namespace) = &change.namespace else {
        return true;
    };
    if *namespace != service.namespace {
        return false;
    }
    match change.kind {
        Kind::Service | Kind::EndpointSlice => {
            change.service.as_deref().is_none_or(|s| s == service.name)
        }
        Kind::Pod | Kind::ReplicaSet => true,
    }
}
