//! The endpoint model every adapter produces: services, their ports, and endpoints with identity,
//! owner, labels and provenance. Platform-neutral on purpose: a Consul instance, a Cloud Map instance
//! and a Kubernetes EndpointSlice entry all become the same [`Endpoint`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// A service, named the same way on every platform: `{namespace, name}`.
///
/// Kubernetes: the namespace and Service name. Consul: the Consul namespace (or the adapter's
/// configured default) and the service name. Cloud Map: the namespace name and the service name.
/// File: as written.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    /// `namespace/name`, the form used in logs and errors.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which adapter instance reported something, e.g. `consul:127.0.0.1:8500` or `file:/etc/mesh.yaml`.
/// Cheap to clone: every endpoint carries one.
pub type SourceId = Arc<str>;

/// What the mesh learns about a service's traffic, where the platform says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolHint {
    Http,
    Http2,
    Grpc,
    Tcp,
}

impl ProtocolHint {
    /// Parses the spellings platforms use: Kubernetes appProtocol (`http`, `kubernetes.io/h2c`,
    /// `grpc`, `tcp`), Consul service-defaults protocol (`http`, `http2`, `grpc`, `tcp`), and
    /// free-form attributes. Unknown spellings give `None` (no hint), never an error.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "http" | "http/1.1" | "http1" => Some(Self::Http),
            "http2" | "h2" | "h2c" | "kubernetes.io/h2c" => Some(Self::Http2),
            "grpc" => Some(Self::Grpc),
            "tcp" | "opaque" => Some(Self::Tcp),
            _ => None,
        }
    }
}

/// A port clients address a service on. Backends of a TrafficSplit receive traffic only on root
/// ports they also have (same port number), so the service-level port list matters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServicePort {
    /// Port name (Kubernetes named ports); `None` where the platform has one unnamed port.
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Option<ProtocolHint>,
}

/// A port an endpoint listens on. Matched to a [`ServicePort`] by name when both have one, else by
/// being the only port (Consul and Cloud Map instances have exactly one port, equal to the service
/// port).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: u16,
}

/// Whether an endpoint should receive new traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    /// Passing health / ready: send traffic.
    Ready,
    /// Failing health checks / not ready: send nothing.
    NotReady,
    /// Going away (Kubernetes `terminating`, Consul maintenance): send no new requests, let
    /// in-flight ones finish.
    Terminating,
}

/// The workload identity, SPIFFE-style: `spiffe://<trust-domain>/ns/<namespace>/sa/<service_account>`.
///
/// Kubernetes uses the pod's ServiceAccount; Consul and Cloud Map use the service name unless the
/// instance carries an explicit service-account tag/attribute. SMI TrafficTarget sources and
/// destinations (kind ServiceAccount) therefore work the same on every platform.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkloadIdentity {
    pub namespace: String,
    pub service_account: String,
}

impl WorkloadIdentity {
    pub fn new(namespace: impl Into<String>, service_account: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// The SPIFFE ID for this identity in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// The workload an endpoint belongs to. Flagger's primary and canary pods share every label but
/// `app`; they differ by owner (Pod -> ReplicaSet -> Deployment `web-primary` vs `web-canary`).
/// Platforms without owners use the service (kind `Service`, the service name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OwnerRef {
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `ReplicaSet`, `Pod`, `Service`, ...
    pub kind: String,
    pub name: String,
}

/// Where an endpoint came from and when that source last confirmed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub source: SourceId,
    pub confirmed_at: SystemTime,
}

/// One network endpoint of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub address: IpAddr,
    pub ports: Vec<EndpointPort>,
    pub readiness: Readiness,
    pub identity: WorkloadIdentity,
    pub owner: Option<OwnerRef>,
    /// Kubernetes pod labels, Consul tags and meta, Cloud Map attributes (each adapter documents
    /// its mapping). Version subsets select on the [`crate::VERSION_LABEL`] label.
    pub labels: BTreeMap<String, String>,
    /// Relative weight where the platform has one (Consul `Weights.Passing`, a Cloud Map attribute).
    pub weight: Option<u32>,
    pub zone: Option<String>,
    pub protocol: Option<ProtocolHint>,
    pub provenance: Provenance,
}

impl Endpoint {
    /// The port this endpoint serves `service_port` on: by name when both are named, else the
    /// endpoint's only port. `None` means this endpoint does not serve that port.
    pub fn target_port(&self, service_port: &ServicePort) -> Option<u16> {
        if let Some(name) = &service_port.name
            && let Some(p) = self
                .ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
        {
            return Some(p.port);
        }
        match self.ports.as_slice() {
            [only] if only.name.is_none() || service_port.name.is_none() => Some(only.port),
            _ => None,
        }
    }
}

/// The whole membership of one service as one source (or the merge of several) sees it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSet {
    pub service: ServiceKey,
    pub ports: Vec<ServicePort>,
    /// Every endpoint, whatever its readiness: consumers filter, so a health flap is an update,
    /// not a disappearance.
    pub endpoints: Vec<Endpoint>,
}

/// What `Discovery::watch` yields: the service does not exist, or its whole endpoint set.
/// "Does not exist" is an answer, not an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Snapshot {
    NotFound,
    Endpoints(EndpointSet),
}

/// Which services a source knows, as one whole list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCatalog {
    pub source: SourceId,
    pub services: Vec<ServiceKey>,
    pub observed_at: SystemTime,
}

/// Who holds an IP address, as one source (or the merge of several) sees it now: what
/// [`crate::Discovery::watch_address`] yields. Intercepted connections (transparent mode) name
/// only an address; this maps it back to the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddressOwner {
    /// No service and no endpoint of this source has the address: traffic to it leaves the mesh
    /// unchanged.
    Unknown,
    /// A service's virtual address (Kubernetes `spec.clusterIPs`, a file service's `addresses`),
    /// with the ports clients address the service on.
    Service {
        service: ServiceKey,
        ports: Vec<ServicePort>,
    },
    /// An endpoint's own address (a pod IP). When several services select the endpoint, the
    /// first by [`ServiceKey`] order is named (the endpoint, its identity and ports, is the same).
    Endpoint {
        service: ServiceKey,
        endpoint: Box<Endpoint>,
    },
}
