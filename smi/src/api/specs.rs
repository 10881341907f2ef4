//! `specs.smi-spec.io` route resources: HTTPRouteGroup and TCPRoute v1alpha1 to v1alpha4,
//! UDPRoute v1alpha4.
//!
//! v1alpha1 and v1alpha2 have no `spec:` wrapper (kube's `no_spec` derive). HTTPRouteGroup
//! v1alpha1 has no header matches. TCPRoute has no content before v1alpha4 (`spec: {}` in
//! v1alpha3), where `spec.matches.ports` appeared.

use super::headers::HeaderMatches;
use serde::{Deserialize, Serialize};

/// An HTTP match of v1alpha1: no headers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatchNoHeaders {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
}

/// An HTTP match of v1alpha2 and later.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "HeaderMatches::is_empty")]
    pub headers: HeaderMatches,
}

/// The port matches of TCPRoute/UDPRoute v1alpha4 (an empty list means every port).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortMatches {
    pub ports: Vec<u16>,
}

macro_rules! http_route_group {
    ($version:ident, $version_str:literal, $match:ty, $($no_spec:ident)?) => {
        pub mod $version {
            //! HTTPRouteGroup of this version.
            use super::*;
            use kube_derive::CustomResource;

            #[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize)]
            #[kube(group = "specs.smi-spec.io", version = $version_str, kind = "HTTPRouteGroup", namespaced)]
            #[kube(crates(kube_core = "::kube_core"), schema = "disabled", derive = "PartialEq", shortname = "htr" $(, $no_spec)?)]
            #[serde(deny_unknown_fields)]
            pub struct HTTPRouteGroupSpec {
                pub matches: Vec<$match>,
            }
        }
    };
}

pub mod http_route_group {
    //! HTTPRouteGroup, one module per version.
    use super::*;
    http_route_group!(v1alpha1, "v1alpha1", HttpMatchNoHeaders, no_spec);
    http_route_group!(v1alpha2, "v1alpha2", HttpMatch, no_spec);
    http_route_group!(v1alpha3, "v1alpha3", HttpMatch,);
    http_route_group!(v1alpha4, "v1alpha4", HttpMatch,);
}

macro_rules! empty_tcp_route {
    ($version:ident, $version_str:literal, $($no_spec:ident)?) => {
        pub mod $version {
            //! TCPRoute of this version: no content beyond its metadata.
            use super::*;
            use kube_derive::CustomResource;

            #[derive(CustomResource, Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
            #[kube(group = "specs.smi-spec.io", version = $version_str, kind = "TCPRoute", namespaced)]
            #[kube(crates(kube_core = "::kube_core"), schema = "disabled", derive = "PartialEq", shortname = "tr" $(, $no_spec)?)]
            #[serde(deny_unknown_fields)]
            pub struct TCPRouteSpec {}
        }
    };
}

pub mod tcp_route {
    //! TCPRoute, one module per version.
    use super::*;
    empty_tcp_route!(v1alpha1, "v1alpha1", no_spec);
    empty_tcp_route!(v1alpha2, "v1alpha2", no_spec);
    empty_tcp_route!(v1alpha3, "v1alpha3",);

    pub mod v1alpha4 {
        //! TCPRoute v1alpha4 (the stored version): the ports it covers.
        use super::*;
        use kube_derive::CustomResource;

        #[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[kube(
            group = "specs.smi-spec.io",
            version = "v1alpha4",
            kind = "TCPRoute",
            namespaced
        )]
        #[kube(
            crates(kube_core = "::kube_core"),
            schema = "disabled",
            derive = "PartialEq",
            shortname = "tr"
        )]
        #[serde(deny_unknown_fields)]
        pub struct TCPRouteSpec {
            pub matches: PortMatches,
        }
    }
}

pub mod udp_route {
    //! UDPRoute (only v1alpha4 exists).
    use super::*;

    pub mod v1alpha4 {
        //! UDPRoute v1alpha4: the ports it covers.
        use super::*;
        use kube_derive::CustomResource;

        #[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[kube(
            group = "specs.smi-spec.io",
            version = "v1alpha4",
            kind = "UDPRoute",
            namespaced
        )]
        #[kube(
            crates(kube_core = "::kube_core"),
            schema = "disabled",
            derive = "PartialEq",
            shortname = "ur"
        )]
        #[serde(deny_unknown_fields)]
        pub struct UDPRouteSpec {
            pub matches: PortMatches,
        }
    }
}
