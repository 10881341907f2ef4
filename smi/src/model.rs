//! The normalized policy model: one type per SMI kind, with the latest semantics, that every
//! version converts into and out of (see [`crate::convert`]), plus Trellis's own
//! [`TrafficPolicy`] and [`ExternalService`]. The controller consumes only these.
//!
//! Each type keeps the object's `metadata` so conversion back to any version is exact. Fields a
//! newer version dropped but an older one had (the v1alpha1/v1alpha2 destination port) are part
//! of the model, so a port restriction is never lost on the way to the controller.

pub use crate::api::external::{ExternalPort, ExternalProtocol, OriginateTls};
pub use crate::api::headers::HeaderMatch;
pub use crate::api::policy::TargetRef;
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::fmt;

/// Any SMI policy resource in normalized form.
#[derive(Clone, Debug, PartialEq)]
pub enum Policy {
    TrafficSplit(TrafficSplit),
    AccessPolicy(AccessPolicy),
    HttpRouteGroup(HttpRouteGroup),
    TcpRoute(PortRoute),
    UdpRoute(PortRoute),
    /// Trellis's TrafficPolicy (`policy.trellis.io`), not an SMI kind. Boxed: its settings are
    /// several times the size of any SMI kind, and sets hold many policies.
    TrafficPolicy(Box<TrafficPolicy>),
    /// Trellis's ExternalService (`policy.trellis.io`), not an SMI kind.
    ExternalService(Box<ExternalService>),
}

/// The kind of a resource: the SMI kinds and Trellis's TrafficPolicy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    TrafficSplit,
    TrafficTarget,
    HttpRouteGroup,
    TcpRoute,
    UdpRoute,
    /// `policy.trellis.io` TrafficPolicy.
    TrafficPolicy,
    /// `policy.trellis.io` ExternalService.
    ExternalService,
}

impl Kind {
    /// The Kubernetes kind name (`HTTPRouteGroup`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::TrafficSplit => "TrafficSplit",
            Kind::TrafficTarget => "TrafficTarget",
            Kind::HttpRouteGroup => "HTTPRouteGroup",
            Kind::TcpRoute => "TCPRoute",
            Kind::UdpRoute => "UDPRoute",
            Kind::TrafficPolicy => "TrafficPolicy",
            Kind::ExternalService => "ExternalService",
        }
    }

    /// The API group of this kind.
    pub fn group(self) -> &'static str {
        match self {
            Kind::TrafficSplit => crate::api::SPLIT_GROUP,
            Kind::TrafficTarget => crate::api::ACCESS_GROUP,
            Kind::TrafficPolicy | Kind::ExternalService => crate::api::POLICY_GROUP,
            _ => crate::api::SPECS_GROUP,
        }
    }

    /// The versions of this kind, oldest first; the last one is stored.
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            Kind::TrafficTarget => &["v1alpha1", "v1alpha2", "v1alpha3"],
            Kind::UdpRoute => &["v1alpha4"],
            Kind::TrafficPolicy | Kind::ExternalService => &["v1alpha1"],
            _ => &["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4"],
        }
    }

    /// Every kind: the SMI kinds, then TrafficPolicy and ExternalService.
    pub const ALL: [Kind; 7] = [
        Kind::TrafficSplit,
        Kind::TrafficTarget,
        Kind::HttpRouteGroup,
        Kind::TcpRoute,
        Kind::UdpRoute,
        Kind::TrafficPolicy,
        Kind::ExternalService,
    ];

    /// Whether this is an SMI kind (TrafficPolicy and ExternalService are Trellis's own).
    pub fn is_smi(self) -> bool {
        !matches!(self, Kind::TrafficPolicy | Kind::ExternalService)
    }

    /// The kind called `name` on the wire.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Kind, namespace and name of a resource: how errors and reports name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId {
    pub kind: String,
    /// The namespace as written, or `default` when the document names none.
    pub namespace: String,
    pub name: String,
}

impl ResourceId {
    /// The id of `kind` with `metadata`, defaulting the namespace to `default`.
    pub fn new(kind: impl Into<String>, metadata: &ObjectMeta) -> Self {
        Self {
            kind: kind.into(),
            namespace: effective_namespace(metadata).to_owned(),
            name: metadata.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// The namespace a resource lives in: as written, or `default`.
pub fn effective_namespace(metadata: &ObjectMeta) -> &str {
    metadata.namespace.as_deref().unwrap_or("default")
}

/// A weight held exactly in thousandths, so `"500m"` and `"1"` keep their 1:2 ratio.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Weight(pub u64);

impl Weight {
    /// A weight of whole units (`5` = 5000 milli).
    pub fn units(units: u64) -> Self {
        Weight(units * 1000)
    }
    /// The weight in thousandths.
    pub fn milli(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::api::quantity::Quantity::from_milli(self.0).fmt(f)
    }
}

/// TrafficSplit: requests for the root service are shared among backends by weight.
#[derive(Clone, Debug, PartialEq)]
pub struct TrafficSplit {
    pub metadata: ObjectMeta,
    /// The root ("apex") service clients address.
    pub service: String,
    pub backends: Vec<SplitBackend>,
    /// HTTPRouteGroups (same namespace) whose routes are split; empty = all traffic.
    pub matches: Vec<RouteGroupRef>,
}

/// One backend of a split: `weight / sum(weights)` of the traffic goes to `service`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SplitBackend {
    pub service: String,
    pub weight: Weight,
}

/// A reference to an HTTPRouteGroup in the same namespace (the only kind a split may match).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RouteGroupRef {
    pub name: String,
}

/// TrafficTarget: which identities may reach the destination identity, on which routes.
#[derive(Clone, Debug, PartialEq)]
pub struct AccessPolicy {
    pub metadata: ObjectMeta,
    pub destination: Identity,
    /// The v1alpha1/v1alpha2 destination port: when set, only this port is allowed.
    pub destination_port: Option<u16>,
    pub sources: Vec<Identity>,
    pub rules: Vec<AccessRule>,
}

/// A workload identity (`kind` is `ServiceAccount`; the namespace defaults to the target's).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
}

impl Identity {
    /// An ExternalService's "every workload of the mesh": name and namespace both `*` (any
    /// caller with a mesh identity). TrafficTargets have no wildcard: there `*` names nobody.
    pub fn is_anyone(&self) -> bool {
        self.name == "*" && self.namespace.as_deref() == Some("*")
    }
}

/// A rule of a TrafficTarget: a route resource and, optionally, which of its matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AccessRule {
    pub kind: RouteKind,
    pub name: String,
    /// `None` = every match of the route resource; `Some` = only the named matches.
    pub matches: Option<Vec<String>>,
}

/// The route kinds a TrafficTarget rule can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    HttpRouteGroup,
    TcpRoute,
    UdpRoute,
}

impl RouteKind {
    /// The resource kind this rule kind names.
    pub fn kind(self) -> Kind {
        match self {
            RouteKind::HttpRouteGroup => Kind::HttpRouteGroup,
            RouteKind::TcpRoute => Kind::TcpRoute,
            RouteKind::UdpRoute => Kind::UdpRoute,
        }
    }
}

/// HTTPRouteGroup: named HTTP request matches.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRouteGroup {
    pub metadata: ObjectMeta,
    pub matches: Vec<HttpMatch>,
}

/// One HTTP match: all given conditions must hold.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HttpMatch {
    pub name: String,
    /// Regex over the path (without query), anchored at both ends; `None` = any path.
    pub path_regex: Option<String>,
    /// `None` = every method; `*` also means every method.
    pub methods: Option<Vec<String>>,
    /// Header name (case-insensitive) to value regex (fully matched); all must hold.
    pub headers: Vec<HeaderMatch>,
}

/// TCPRoute or UDPRoute: the ports it covers (empty = every port).
#[derive(Clone, Debug, PartialEq)]
pub struct PortRoute {
    pub metadata: ObjectMeta,
    pub ports: Vec<u16>,
}

/// TrafficPolicy: resilience settings for one Service (its `targetRef`), with per-route
/// sections. The settings' meaning is documented in `trellis-policy`.
#[derive(Clone, Debug, PartialEq)]
pub struct TrafficPolicy {
    pub metadata: ObjectMeta,
    /// The target as written (a Service in the policy's namespace).
    pub target_ref: TargetRef,
    /// The destination-wide settings.
    pub policy: trellis_policy::DestinationPolicy,
    /// Per-route sections, in order.
    pub routes: Vec<PolicyRoute>,
    /// End-user JWT authentication of the Service's requests (enforced inbound).
    pub jwt: Option<trellis_policy::jwt::JwtPolicy>,
    /// Claim conditions every request to the Service must satisfy.
    pub claims: Vec<trellis_policy::jwt::ClaimMatch>,
}

/// One per-route section of a TrafficPolicy.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyRoute {
    /// An HTTPRouteGroup in the policy's namespace.
    pub http_route_group: String,
    /// Match names of that group; `None` or empty = all of them.
    pub matches: Option<Vec<String>>,
    /// The section's settings.
    pub policy: trellis_policy::RoutePolicy,
    /// Claim conditions every request matching the section must satisfy (besides the
    /// service's), whichever section comes first.
    pub claims: Vec<trellis_policy::jwt::ClaimMatch>,
}

impl PolicyRoute {
    /// Whether the section covers the match called `name`.
    pub fn covers(&self, name: &str) -> bool {
        match &self.matches {
            Some(names) if !names.is_empty() => names.iter().any(|n| n == name),
            _ => true,
        }
    }
}

/// ExternalService: a destination outside the mesh, declared once (see
/// [`crate::api::external`] for what each field means).
#[derive(Clone, Debug, PartialEq)]
pub struct ExternalService {
    pub metadata: ObjectMeta,
    /// Exact DNS names, as written.
    pub hosts: Vec<String>,
    pub ports: Vec<ExternalPort>,
    /// PEM trust anchors for originated TLS; `None` = the system's roots.
    pub ca_bundle: Option<String>,
    /// Fixed IP addresses (as written) instead of resolving the host.
    pub addresses: Vec<String>,
    /// Who may call it (service accounts; the namespace defaults to the ExternalService's).
    pub sources: Vec<Identity>,
}

impl Policy {
    /// The kind of this policy.
    pub fn kind(&self) -> Kind {
        match self {
            Policy::TrafficSplit(_) => Kind::TrafficSplit,
            Policy::AccessPolicy(_) => Kind::TrafficTarget,
            Policy::HttpRouteGroup(_) => Kind::HttpRouteGroup,
            Policy::TcpRoute(_) => Kind::TcpRoute,
            Policy::UdpRoute(_) => Kind::UdpRoute,
            Policy::TrafficPolicy(_) => Kind::TrafficPolicy,
            Policy::ExternalService(_) => Kind::ExternalService,
        }
    }

    /// The object metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Policy::TrafficSplit(p) => &p.metadata,
            Policy::AccessPolicy(p) => &p.metadata,
            Policy::HttpRouteGroup(p) => &p.metadata,
            Policy::TcpRoute(p) | Policy::UdpRoute(p) => &p.metadata,
            Policy::TrafficPolicy(p) => &p.metadata,
            Policy::ExternalService(e) => &e.metadata,
        }
    }

    /// Kind, namespace and name.
    pub fn id(&self) -> ResourceId {
        ResourceId::new(self.kind().as_str(), self.metadata())
    }

    /// A one-line human summary of what the policy says.
    pub fn summary(&self) -> String {
        match self {
            Policy::TrafficSplit(s) => {
                let backends: Vec<String> = s
                    .backends
                    .iter()
                    .map(|b| format!("{} {}", b.service, b.weight))
                    .collect();
                let mut line = format!("root {} -> {}", s.service, backends.join(", "));
                if !s.matches.is_empty() {
                    let names: Vec<&str> = s.matches.iter().map(|m| m.name.as_str()).collect();
                    line.push_str(&format!(" for route groups {}", names.join(", ")));
                }
                line
            }
            Policy::AccessPolicy(a) => {
                let sources: Vec<&str> = a.sources.iter().map(|s| s.name.as_str()).collect();
                let port = a
                    .destination_port
                    .map(|p| format!(" port {p}"))
                    .unwrap_or_default();
                format!(
                    "allow {} -> {}{port}, {} rule(s)",
                    sources.join(", "),
                    a.destination.name,
                    a.rules.len()
                )
            }
            Policy::HttpRouteGroup(g) => {
                let names: Vec<&str> = g.matches.iter().map(|m| m.name.as_str()).collect();
                format!("{} match(es): {}", g.matches.len(), names.join(", "))
            }
            Policy::TrafficPolicy(p) => {
                let d = &p.policy;
                let sections: Vec<&str> = [
                    ("timeouts", d.timeouts.is_some()),
                    ("retries", d.retries.is_some()),
                    ("fault", d.fault.is_some()),
                    ("rateLimit", d.rate_limit.is_some()),
                    ("mirror", d.mirror.is_some()),
                    ("circuitBreaker", d.circuit_breaker.is_some()),
                    ("outlierDetection", d.outlier_detection.is_some()),
                    ("healthCheck", d.health_check.is_some()),
                    ("loadBalancer", d.load_balancer.is_some()),
                ]
                .into_iter()
                .filter_map(|(name, set)| set.then_some(name))
                .collect();
                let mut line = format!("service {}", p.target_ref.name);
                if !sections.is_empty() {
                    line.push_str(&format!(": {}", sections.join(", ")));
                }
                if !p.routes.is_empty() {
                    line.push_str(&format!(", {} route section(s)", p.routes.len()));
                }
                line
            }
            Policy::ExternalService(e) => {
                let ports: Vec<String> = e
                    .ports
                    .iter()
                    .map(|p| format!("{}/{}", p.port, p.protocol.as_str()))
                    .collect();
                let sources: Vec<&str> = e.sources.iter().map(|s| s.name.as_str()).collect();
                format!(
                    "{} ports {} allow {}",
                    e.hosts.join(", "),
                    ports.join(", "),
                    sources.join(", ")
                )
            }
            Policy::TcpRoute(r) | Policy::UdpRoute(r) if r.ports.is_empty() => "all ports".into(),
            Policy::TcpRoute(r) | Policy::UdpRoute(r) => {
                let ports: Vec<String> = r.ports.iter().map(u16::to_string).collect();
                format!("ports {}", ports.join(", "))
            }
        }
    }
}
