//! A service's snapshot derived from the shared stores: the Service gives the ports, its
//! EndpointSlices the endpoints, each endpoint's Pod the identity, labels and owner.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointSlice};
use kube::runtime::reflector::ObjectRef;
use trellis_discovery::{
    AddressOwner, Endpoint, EndpointPort, EndpointSet, OwnerRef, ProtocolHint, Provenance,
    Readiness, ServiceKey, ServicePort, Snapshot, SourceId, WorkloadIdentity,
};

use crate::reflectors::{SERVICE_NAME_LABEL, Stores};

/// The ServiceAccount Kubernetes gives a pod whose spec names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// The snapshot of `key` as the stores hold it now. Provenance times are left at the epoch so
/// two computations compare equal when nothing changed; [`stamp`] sets them when emitting.
pub(crate) fn compute(stores: &Stores, key: &ServiceKey, source: &SourceId) -> Snapshot {
    let service_ref = ObjectRef::<Service>::new(&key.name).within(&key.namespace);
    let Some(service) = stores.services.get(&service_ref) else {
        return Snapshot::NotFound;
    };
    let ports = service_ports(&service);
    let slices = stores.slices.state_filter(|s| {
        s.metadata.namespace.as_deref() == Some(key.namespace.as_str())
            && s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                == Some(&key.name)
    });
    let mut endpoints: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
    for slice in &slices {
        add_slice(stores, key, source, &ports, slice, &mut endpoints);
    }
    Snapshot::Endpoints(EndpointSet {
        service: key.clone(),
        ports,
        endpoints: endpoints.into_values().collect(),
    })
}

/// Who holds `address` as the stores hold it now: a Service whose `spec.clusterIPs` (or
/// `clusterIP`) has it, else the first Service (by namespace/name) with an EndpointSlice
/// endpoint at it, else nobody. Provenance times are left at the epoch (see [`compute`]).
pub(crate) fn address_owner(stores: &Stores, address: IpAddr, source: &SourceId) -> AddressOwner {
    let mut services: Vec<ServiceKey> = Vec::new();
    for service in stores.services.state() {
        let Some(spec) = service.spec.as_ref() else {
            continue;
        };
        let holds = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .any(|ip| ip.parse::<IpAddr>().ok() == Some(address));
        if holds {
            services.push(ServiceKey::new(
                service.metadata.namespace.clone().unwrap_or_default(),
                service.metadata.name.clone().unwrap_or_default(),
            ));
        }
    }
    services.sort();
    if let Some(key) = services.into_iter().next() {
        let service_ref = ObjectRef::<Service>::new(&key.name).within(&key.namespace);
        let ports = stores
            .services
            .get(&service_ref)
            .map(|s| service_ports(&s))
            .unwrap_or_default();
        return AddressOwner::Service {
            service: key,
            ports,
        };
    }
    let spelled = address.to_string();
    let mut selecting: Vec<ServiceKey> = stores
        .slices
        .state()
        .iter()
        .filter(|slice| {
            slice.endpoints.iter().flatten().any(|e| {
                e.addresses
                    .iter()
                    .any(|a| *a == spelled || a.parse::<IpAddr>().ok() == Some(address))
            })
        })
        .filter_map(|slice| {
            let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
            Some(ServiceKey::new(
                slice.metadata.namespace.clone().unwrap_or_default(),
                name.clone(),
            ))
        })
        .collect();
    selecting.sort();
    selecting.dedup();
    for key in selecting {
        if let Snapshot::Endpoints(set) = compute(stores, &key, source)
            && let Some(endpoint) = set.endpoints.into_iter().find(|e| e.address == address)
        {
            return AddressOwner::Endpoint {
                service: key,
                endpoint: Box::new(endpoint),
            };
        }
    }
    AddressOwner::Unknown
}

/// Sets every endpoint's `confirmed_at` to `at`.
pub(crate) fn stamp(mut snapshot: Snapshot, at: SystemTime) -> Snapshot {
    if let Snapshot::Endpoints(set) = &mut snapshot {
        for e in &mut set.endpoints {
            e.provenance.confirmed_at = at;
        }
    }
    snapshot
}

fn service_ports(service: &Service) -> Vec<ServicePort> {
    let ports = service.spec.as_ref().and_then(|s| s.ports.as_ref());
    ports
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: u16::try_from(p.port).ok()?,
                protocol: p.app_protocol.as_deref().and_then(ProtocolHint::parse),
            })
        })
        .collect()
}

fn add_slice(
    stores: &Stores,
    key: &ServiceKey,
    source: &SourceId,
    service_ports: &[ServicePort],
    slice: &EndpointSlice,
    out: &mut BTreeMap<IpAddr, Endpoint>,
) {
    if slice.address_type == "FQDN" {
        return;
    }
    let slice_ports = slice.ports.as_deref().unwrap_or_default();
    let ports: Vec<EndpointPort> = slice_ports
        .iter()
        .filter_map(|p| {
            Some(EndpointPort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: u16::try_from(p.port?).ok()?,
            })
        })
        .collect();
    // The slice's appProtocol, else the Service port's of the same name.
    let protocol = slice_ports
        .iter()
        .find_map(|p| p.app_protocol.as_deref().and_then(ProtocolHint::parse))
        .or_else(|| {
            slice_ports.iter().find_map(|p| {
                service_ports
                    .iter()
                    .find(|sp| sp.name.is_some() && sp.name == p.name)
                    .and_then(|sp| sp.protocol)
            })
        });
    for ep in slice.endpoints.iter().flatten() {
        let mut readiness = readiness(ep.conditions.as_ref());
        let workload = match ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
        {
            Some(target) => match pod_of(stores, key, target) {
                Some(pod) => Workload::of_pod(stores, &pod, key),
                // The slice arrived before its pod: the identity is unknown, so the endpoint
                // gets no traffic until the pod is seen (the mesh fails safe).
                None => {
                    readiness = Readiness::NotReady;
                    Workload::unknown(key)
                }
            },
            // No pod behind it (a selectorless Service's hand-made slice): the service itself
            // is the workload, as on platforms without ServiceAccounts.
            None => Workload::service(key),
        };
        for address in &ep.addresses {
            let Ok(address) = address.parse::<IpAddr>() else {
                tracing::debug!(
                    "{key}: EndpointSlice {}: skipping unparsable address {address:?}",
                    slice.metadata.name.as_deref().unwrap_or("")
                );
                continue;
            };
            let endpoint = Endpoint {
                address,
                ports: ports.clone(),
                readiness,
                identity: workload.identity.clone(),
                owner: workload.owner.clone(),
                labels: workload.labels.clone(),
                weight: None,
                zone: ep.zone.clone(),
                protocol,
                provenance: Provenance {
                    source: source.clone(),
                    confirmed_at: UNIX_EPOCH,
                },
            };
            // The same address in two slices (slice rebalancing): keep the more available one.
            match out.get(&address) {
                Some(existing) if rank(existing.readiness) >= rank(readiness) => {}
                _ => {
                    out.insert(address, endpoint);
                }
            }
        }
    }
}

/// EndpointSlice conditions to readiness. Per the API, a missing `ready` or `serving` means
/// true, a missing `terminating` false; `ready` is never true while terminating.
pub(crate) fn readiness(conditions: Option<&EndpointConditions>) -> Readiness {
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    if ready && !terminating {
        Readiness::Ready
    } else if serving && terminating {
        Readiness::Terminating
    } else {
        Readiness::NotReady
    }
}

fn rank(r: Readiness) -> u8 {
    match r {
        Readiness::Ready => 2,
        Readiness::Terminating => 1,
        Readiness::NotReady => 0,
    }
}

fn pod_of(
    stores: &Stores,
    key: &ServiceKey,
    target: &ObjectReference,
) -> Option<std::sync::Arc<Pod>> {
    let name = target.name.as_deref()?;
    let namespace = target.namespace.as_deref().unwrap_or(&key.namespace);
    stores.pods.get(&ObjectRef::new(name).within(namespace))
}

/// What an endpoint's pod says about it.
struct Workload {
    identity: WorkloadIdentity,
    owner: Option<OwnerRef>,
    labels: BTreeMap<String, String>,
}

impl Workload {
    fn of_pod(stores: &Stores, pod: &Pod, key: &ServiceKey) -> Self {
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| key.namespace.clone());
        let spec = pod.spec.as_ref();
        let service_account = spec
            .and_then(|s| {
                s.service_account_name
                    .clone()
                    .or_else(|| s.service_account.clone())
            })
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned());
        Self {
            identity: WorkloadIdentity::new(namespace, service_account),
            owner: Some(owner(stores, pod)),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
        }
    }

    fn unknown(key: &ServiceKey) -> Self {
        Self {
            identity: WorkloadIdentity::new(&key.namespace, DEFAULT_SERVICE_ACCOUNT),
            owner: None,
            labels: BTreeMap::new(),
        }
    }

    fn service(key: &ServiceKey) -> Self {
        Self {
            identity: WorkloadIdentity::new(&key.namespace, &key.name),
            owner: Some(OwnerRef {
                kind: "Service".into(),
                name: key.name.clone(),
            }),
            labels: BTreeMap::new(),
        }
    }
}

/// The pod's workload: Pod -> ReplicaSet -> Deployment; StatefulSet, DaemonSet, Job... directly;
/// the pod itself when it has no controller. A ReplicaSet not (yet) in the store is reported as
/// the ReplicaSet.
fn owner(stores: &Stores, pod: &Pod) -> OwnerRef {
    let controller =
        |refs: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
            refs.into_iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .cloned()
        };
    let Some(parent) = controller(pod.metadata.owner_references.as_ref()) else {
        return OwnerRef {
            kind: "Pod".into(),
            name: pod.metadata.name.clone().unwrap_or_default(),
        };
    };
    if parent.kind == "ReplicaSet"
        && let Some(namespace) = pod.metadata.namespace.as_deref()
        && let Some(rs) = stores
            .replicasets
            .get(&ObjectRef::new(&parent.name).within(namespace))
        && let Some(grandparent) = controller(rs.metadata.owner_references.as_ref())
    {
        return OwnerRef {
            kind: grandparent.kind,
            name: grandparent.name,
        };
    }
    OwnerRef {
        kind: parent.kind,
        name: parent.name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conditions(
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> EndpointConditions {
        EndpointConditions {
            ready,
            serving,
            terminating,
        }
    }

    #[test]
    fn conditions_map_to_readiness_as_the_api_defines_them() {
        assert_eq!(readiness(None), Readiness::Ready);
        assert_eq!(
            readiness(Some(&conditions(Some(true), Some(true), Some(false)))),
            Readiness::Ready
        );
        assert_eq!(
            readiness(Some(&conditions(Some(false), Some(true), Some(true)))),
            Readiness::Terminating
        );
        assert_eq!(
            readiness(Some(&conditions(Some(false), Some(false), Some(true)))),
            Readiness::NotReady
        );
        assert_eq!(
            readiness(Some(&conditions(Some(false), None, None))),
            Readiness::NotReady
        );
        assert_eq!(
            readiness(Some(&conditions(Some(false), Some(true), Some(false)))),
            Readiness::NotReady
        );
    }
}
