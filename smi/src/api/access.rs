//! `access.smi-spec.io` TrafficTarget, v1alpha1 to v1alpha3.
//!
//! v1alpha1 has no `spec:` wrapper and calls its rules `specs`; v1alpha1 and v1alpha2 carry an
//! optional `destination.port`; v1alpha3 moved ports into TCPRoute/UDPRoute and added UDPRoute
//! rules. The wrapper-less v1alpha1 uses kube's `no_spec` derive (the spec struct is flattened
//! onto the root object), so every version is a real `kube::CustomResource`.

use serde::{Deserialize, Serialize};

/// A ServiceAccount identity (`kind: ServiceAccount`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subject {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// The destination of v1alpha1/v1alpha2: a subject and an optional port (absent = all ports).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortDestination {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// Rule kinds of v1alpha1 and v1alpha2 (no UDPRoute yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LegacyRuleKind {
    #[serde(rename = "HTTPRouteGroup")]
    HttpRouteGroup,
    #[serde(rename = "TCPRoute")]
    TcpRoute,
}

/// Rule kinds of v1alpha3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RuleKind {
    #[serde(rename = "HTTPRouteGroup")]
    HttpRouteGroup,
    #[serde(rename = "TCPRoute")]
    TcpRoute,
    #[serde(rename = "UDPRoute")]
    UdpRoute,
}

/// A rule: a route resource and optionally the names of the matches allowed in it
/// (absent = every match of that resource).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule<K> {
    pub kind: K,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<String>>,
}

pub mod v1alpha1 {
    //! TrafficTarget v1alpha1: no `spec:` wrapper, `specs` instead of `rules`, destination port.
    use super::*;
    use kube_derive::CustomResource;

    #[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[kube(
        group = "access.smi-spec.io",
        version = "v1alpha1",
        kind = "TrafficTarget",
        namespaced
    )]
    #[kube(
        crates(kube_core = "::kube_core"),
        schema = "disabled",
        derive = "PartialEq",
        shortname = "tt",
        no_spec
    )]
    #[serde(deny_unknown_fields)]
    pub struct TrafficTargetSpec {
        pub destination: PortDestination,
        #[serde(default)]
        pub specs: Vec<Rule<LegacyRuleKind>>,
        #[serde(default)]
        pub sources: Vec<Subject>,
    }
}

pub mod v1alpha2 {
    //! TrafficTarget v1alpha2: `spec:` wrapper and `rules`, destination port.
    use super::*;
    use kube_derive::CustomResource;

    #[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[kube(
        group = "access.smi-spec.io",
        version = "v1alpha2",
        kind = "TrafficTarget",
        namespaced
    )]
    #[kube(
        crates(kube_core = "::kube_core"),
        schema = "disabled",
        derive = "PartialEq",
        shortname = "tt"
    )]
    #[serde(deny_unknown_fields)]
    pub struct TrafficTargetSpec {
        pub destination: PortDestination,
        #[serde(default)]
        pub rules: Vec<Rule<LegacyRuleKind>>,
        #[serde(default)]
        pub sources: Vec<Subject>,
    }
}

pub mod v1alpha3 {
    //! TrafficTarget v1alpha3 (the stored version): destination, rules and sources all required.
    use super::*;
    use kube_derive::CustomResource;

    #[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[kube(
        group = "access.smi-spec.io",
        version = "v1alpha3",
        kind = "TrafficTarget",
        namespaced
    )]
    #[kube(
        crates(kube_core = "::kube_core"),
        schema = "disabled",
        derive = "PartialEq",
        shortname = "tt"
    )]
    #[serde(deny_unknown_fields)]
    pub struct TrafficTargetSpec {
        pub destination: Subject,
        pub rules: Vec<Rule<RuleKind>>,
        pub sources: Vec<Subject>,
    }
}
