//! `split.smi-spec.io` TrafficSplit, v1alpha1 to v1alpha4.
//!
//! v1alpha1 weights are Kubernetes quantities ([`Quantity`]); v1alpha2 and later use
//! non-negative integers ([`IntWeight`]). v1alpha3 added `matches` (HTTPRouteGroup references);
//! v1alpha4 has the same shape as v1alpha3.

use super::quantity::{IntWeight, Quantity};
use serde::{Deserialize, Serialize};

/// The kind a TrafficSplit `matches` entry may reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RouteGroupKind {
    #[serde(rename = "HTTPRouteGroup")]
    HttpRouteGroup,
}

/// A reference to an HTTPRouteGroup in the split's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteGroupRef {
    pub kind: RouteGroupKind,
    pub name: String,
}

/// A backend with an integer weight (v1alpha2 and later).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub service: String,
    pub weight: IntWeight,
}

pub mod v1alpha1 {
    //! TrafficSplit v1alpha1: quantity weights, no matches.
    use super::*;
    use kube_derive::CustomResource;

    #[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[kube(
        group = "split.smi-spec.io",
        version = "v1alpha1",
        kind = "TrafficSplit",
        namespaced
    )]
    #[kube(
        crates(kube_core = "::kube_core"),
        schema = "disabled",
        derive = "PartialEq",
        shortname = "ts"
    )]
    #[kube(printcolumn(
        name = "Service",
        type_ = "string",
        description = "The apex service of this split.",
        json_path = ".spec.service"
    ))]
    #[serde(deny_unknown_fields)]
    pub struct TrafficSplitSpec {
        pub service: String,
        pub backends: Vec<QuantityBackend>,
    }

    /// A backend whose weight is a Kubernetes quantity (`"1"`, `"500m"`).
    #[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct QuantityBackend {
        pub service: String,
        pub weight: Quantity,
    }
}

pub mod v1alpha2 {
    //! TrafficSplit v1alpha2: integer weights, no matches.
    use super::*;
    use kube_derive::CustomResource;

    #[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[kube(
        group = "split.smi-spec.io",
        version = "v1alpha2",
        kind = "TrafficSplit",
        namespaced
    )]
    #[kube(
        crates(kube_core = "::kube_core"),
        schema = "disabled",
        derive = "PartialEq",
        shortname = "ts"
    )]
    #[kube(printcolumn(
        name = "Service",
        type_ = "string",
        description = "The apex service of this split.",
        json_path = ".spec.service"
    ))]
    #[serde(deny_unknown_fields)]
    pub struct TrafficSplitSpec {
        pub service: String,
        pub backends: Vec<Backend>,
    }
}

pub mod v1alpha3 {
    //! TrafficSplit v1alpha3: integer weights and HTTPRouteGroup matches.
    use super::*;
    use kube_derive::CustomResource;

    #[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[kube(
        group = "split.smi-spec.io",
        version = "v1alpha3",
        kind = "TrafficSplit",
        namespaced
    )]
    #[kube(
        crates(kube_core = "::kube_core"),
        schema = "disabled",
        derive = "PartialEq",
        shortname = "ts"
    )]
    #[kube(printcolumn(
        name = "Service",
        type_ = "string",
        description = "The apex service of this split.",
        json_path = ".spec.service"
    ))]
    #[serde(deny_unknown_fields)]
    pub struct TrafficSplitSpec {
        pub service: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub matches: Vec<RouteGroupRef>,
        pub backends: Vec<Backend>,
    }
}

pub mod v1alpha4 {
    //! TrafficSplit v1alpha4 (the stored version): same shape as v1alpha3.
    use super::*;
    use kube_derive::CustomResource;

    #[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[kube(
        group = "split.smi-spec.io",
        version = "v1alpha4",
        kind = "TrafficSplit",
        namespaced
    )]
    #[kube(
        crates(kube_core = "::kube_core"),
        schema = "disabled",
        derive = "PartialEq",
        shortname = "ts"
    )]
    #[kube(printcolumn(
        name = "Service",
        type_ = "string",
        description = "The apex service of this split.",
        json_path = ".spec.service"
    ))]
    #[serde(deny_unknown_fields)]
    pub struct TrafficSplitSpec {
        pub service: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub matches: Vec<RouteGroupRef>,
        pub backends: Vec<Backend>,
    }
}
